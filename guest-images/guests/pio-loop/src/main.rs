//! `pio-loop`: benchmark guest. Does `--param count=N` (default 1000000)
//! 32-bit `out`s to the test device's port in a tight loop, then powers off
//! with 0. Prints nothing unless the parameter is bad (then powers off with 1).
#![no_std]
#![no_main]

rt::entry!(main);

const DEFAULT_COUNT: u64 = 1_000_000;

fn main(boot: &rt::BootParams) -> u32 {
    let count = match boot.param("count").map(str::parse::<u64>) {
        None => DEFAULT_COUNT,
        Some(Ok(count)) => count,
        Some(Err(_)) => {
            rt::println!("pio-loop: --param count must be a whole number");
            return 1;
        }
    };
    for i in 0..count {
        // The value is irrelevant: the low bits of the index.
        rt::testdev_write(i as u32);
    }
    0
}
