//! `triple-fault`: prints `triple-fault: loading an empty IDT and raising #UD`,
//! then makes the CPU triple-fault, which KVM reports as a shutdown.
//!
//! With an IDT of limit 0 every vector is out of bounds: the #UD from `ud2`
//! becomes a #GP, delivering that fails again (#DF), and failing to deliver
//! the double fault shuts the CPU down. An explicit empty IDT makes this
//! independent of whatever IDTR the VMM left at boot.
#![no_std]
#![no_main]

use core::arch::asm;

rt::entry!(main);

/// The operand of `lidt`: a 16-bit limit and a 64-bit base.
#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

static EMPTY_IDT: IdtPointer = IdtPointer { limit: 0, base: 0 };

fn main(_boot: &rt::BootParams) -> u32 {
    rt::println!("triple-fault: loading an empty IDT and raising #UD");
    // SAFETY: deliberately unsound for the machine, not for memory: after
    // loading an empty IDT, `ud2` cannot be delivered and the vCPU shuts
    // down, which is this guest's whole purpose. `lidt` only reads the
    // 10-byte operand, a static that lives for the whole program; nothing
    // after `ud2` runs.
    unsafe {
        asm!(
            "lidt [{idt}]",
            "ud2",
            idt = in(reg) &raw const EMPTY_IDT,
            options(noreturn, nostack),
        )
    }
}
