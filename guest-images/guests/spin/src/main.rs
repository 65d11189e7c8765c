//! `spin`: prints `spinning`, then loops forever without a single exit (no
//! port, no MMIO, no HLT): the guest that stops exiting, which the VMM must
//! notice on its own.
#![no_std]
#![no_main]

rt::entry!(main);

fn main(_boot: &rt::BootParams) -> u32 {
    rt::println!("spinning");
    loop {
        core::hint::spin_loop();
    }
}
