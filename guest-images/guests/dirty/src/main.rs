//! `dirty`: a memory-writing load for the repair benchmark and tests.
//!
//! Fills `--param fill_mib=N` MiB (default 16) of its heap with
//! pseudo-random data, then for `--param rounds=R` rounds (default 1000;
//! 0: forever) writes 8 bytes into each of `--param pages=P` pages (default
//! 64) spread over that region, sleeping until `--param period_us=U` µs
//! (default 1000) of guest time have passed since the previous round, so it
//! dirties about P × 4 KiB per U µs. Prints a line every 1000 rounds and,
//! at the end, a checksum of the region; powers off with 0.
#![no_std]
#![no_main]

extern crate alloc;

rt::entry!(main);

fn param(boot: &rt::BootParams, name: &str, default: u64) -> u64 {
    boot.param(name).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn main(boot: &rt::BootParams) -> u32 {
    let fill = (param(boot, "fill_mib", 16) << 20).max(4096) as usize;
    let rounds = param(boot, "rounds", 1000);
    let pages = param(boot, "pages", 64);
    let period = param(boot, "period_us", 1000) * 1000;
    let mut region = alloc::vec![0u8; fill];
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ rt::random_u64();
    for chunk in region.chunks_mut(8) {
        x = xorshift(x);
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    rt::println!("dirty: filled {} MiB", fill >> 20);
    let npages = (fill / 4096) as u64;
    let mut next = rt::clock_ns();
    let mut round = 0u64;
    while rounds == 0 || round < rounds {
        for _ in 0..pages {
            x = xorshift(x);
            let page = (x % npages) as usize;
            let offset = page * 4096 + ((x >> 40) as usize % 512) * 8;
            region[offset..offset + 8].copy_from_slice(&x.to_le_bytes());
        }
        next += period;
        rt::sleep_until(next);
        round += 1;
        if round % 1000 == 0 {
            rt::println!("dirty: round {round}");
        }
    }
    let sum = region.chunks_exact(8).fold(0u64, |a, c| {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        a.rotate_left(5) ^ u64::from_le_bytes(w)
    });
    rt::println!("dirty: {round} rounds, checksum {sum:#018x}");
    0
}
