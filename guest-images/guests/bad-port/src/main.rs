//! `bad-port`: prints `bad-port: writing to port 0x1234`, then does a 32-bit
//! `out` to port 0x1234, which no ftvm device serves. If the VMM lets the
//! guest go on, it prints `bad-port: still running` and powers off with 0.
#![no_std]
#![no_main]

rt::entry!(main);

/// A port in no device's range (see ftvm_abi's port map).
const UNSERVED_PORT: u16 = 0x1234;

fn main(_boot: &rt::BootParams) -> u32 {
    rt::println!("bad-port: writing to port {UNSERVED_PORT:#x}");
    // SAFETY: no device serves this port, so nothing can act on guest
    // memory: the VMM either ignores the write or stops the guest.
    unsafe { rt::port::outl(UNSERVED_PORT, 0) };
    rt::println!("bad-port: still running");
    0
}
