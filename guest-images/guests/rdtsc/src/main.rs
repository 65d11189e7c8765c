//! `rdtsc`: breaks the lockstep contract on purpose. Executes RDTSC (a value
//! no log records) and stores it in memory, 200 times, reading the clock
//! device between (so there are inputs, exits and digest points), then
//! prints `rdtsc done` and powers off. Replayed, its memory differs from the
//! primary's: the divergence detector must say so within one digest interval.
#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, write_volatile};

rt::entry!(main);

static mut SAMPLES: [u64; 200] = [0; 200];

fn main(_boot: &rt::BootParams) -> u32 {
    let samples = addr_of_mut!(SAMPLES);
    for slot in 0..200 {
        let (lo, hi): (u32, u32);
        // SAFETY: RDTSC reads the time-stamp counter into edx:eax; it has no
        // memory effect. (The whole point of this guest is that real guests
        // must not use it.)
        unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
        let tsc = (u64::from(hi) << 32) | u64::from(lo);
        // SAFETY: SAMPLES is only touched here, by the guest's one thread,
        // and `slot` < 200 keeps the write inside it.
        unsafe { write_volatile(samples.cast::<u64>().add(slot), tsc.wrapping_add(rt::clock_ns())) };
    }
    rt::println!("rdtsc done");
    0
}
