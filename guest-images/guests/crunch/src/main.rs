//! `crunch`: a CPU-bound benchmark guest. `--param rounds=N` (default 4000)
//! rounds of 1 000 000 xorshift steps over a 64 KiB table, with one clock
//! reading between rounds (so a protected run has a few inputs and digest
//! points, as a real service would); prints the checksum and the guest
//! time it took, then powers off.
#![no_std]
#![no_main]

rt::entry!(main);

const TABLE: usize = 8192;

fn main(boot: &rt::BootParams) -> u32 {
    let rounds: u64 = boot.param("rounds").and_then(|s| s.parse().ok()).unwrap_or(4000);
    let mut table = alloc_table();
    let start = rt::clock_ns();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..rounds {
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let slot = (x as usize) % TABLE;
            table[slot] = table[slot].wrapping_add(x);
        }
        x ^= rt::clock_ns() & 1;
    }
    let took_ms = (rt::clock_ns() - start) / 1_000_000;
    let sum = table.iter().fold(0u64, |a, b| a.wrapping_add(*b));
    rt::println!("crunch: {rounds} rounds, checksum {sum:#018x}, {took_ms} ms");
    0
}

fn alloc_table() -> alloc::vec::Vec<u64> {
    alloc::vec![0u64; TABLE]
}

extern crate alloc;
