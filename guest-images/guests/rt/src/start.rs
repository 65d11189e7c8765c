//! `_start`, the ELF entry point, and the first Rust code the guest runs.
//!
//! The VMM enters in 64-bit mode with the low 4 GiB identity-mapped, SSE
//! enabled, interrupts off and no IDT, `rsp` = [`STACK_TOP`](ftvm_abi::STACK_TOP)
//! and `rdi` = [`BOOT_PARAMS_ADDR`]. There is no C runtime: `_start` only
//! zeroes `.bss` (the symbols come from `ftvm-guest.ld`) and calls
//! [`start_rust`] with the SysV ABI's stack alignment.

use ftvm_abi::{BootParams, BOOT_PARAMS_ADDR};

core::arch::global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    // The SysV ABI wants the direction flag clear on function entry.
    "    cld",
    // Terminates frame-pointer walks.
    "    xor ebp, ebp",
    "    mov rbx, rdi",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    rep stosb",
    "    mov rdi, rbx",
    // 16-byte aligned before the call, as the ABI wants (STACK_TOP is).
    "    and rsp, -16",
    "    call {start_rust}",
    // start_rust never returns.
    "    ud2",
    ".size _start, . - _start",
    ".popsection",
    start_rust = sym start_rust,
);

extern "Rust" {
    /// The guest's main, defined by [`entry!`](crate::entry).
    fn __ftvm_guest_main(boot: &'static BootParams) -> u32;
}

/// Checks the boot-parameter block, sets up the heap, runs the guest and
/// powers off with its status.
extern "sysv64" fn start_rust(rdi: u64) -> ! {
    crate::port::init();
    let boot = boot_params(rdi);
    crate::heap::init(boot.mem_size);
    // SAFETY: `entry!` defines `__ftvm_guest_main` with exactly this
    // signature (it type-checks the guest's function against it); a guest
    // without `entry!` fails to link instead.
    let status = unsafe { __ftvm_guest_main(boot) };
    crate::power_off(status)
}

/// The boot-parameter block the VMM wrote, after checking it.
fn boot_params(rdi: u64) -> &'static BootParams {
    // Only the ABI's own address is known to be RAM that nothing else in
    // the guest uses; any other pointer is a VMM bug.
    if rdi != BOOT_PARAMS_ADDR {
        panic!("rdi is {rdi:#x} at entry, not the boot parameters' address {BOOT_PARAMS_ADDR:#x}");
    }
    // SAFETY: BOOT_PARAMS_ADDR is guest RAM (page 1 of the ABI's memory map),
    // identity-mapped and 8-byte aligned, and the VMM wrote a block of
    // size_of::<BootParams>() <= one page there before the first
    // instruction. Nothing in the guest writes that page (the image starts at
    // 1 MiB, the stack lies between STACK_BOTTOM and STACK_TOP, the heap
    // above the image), so a shared 'static borrow holds. Every bit pattern
    // is a valid BootParams: it holds only integers and byte arrays.
    let boot = unsafe { &*(BOOT_PARAMS_ADDR as *const BootParams) };
    if !boot.is_valid() {
        panic!(
            "invalid boot parameters at {BOOT_PARAMS_ADDR:#x}: magic {:#x}, version {}, size {}, params_len {}",
            boot.magic, boot.version, boot.size, boot.params_len
        );
    }
    boot
}
