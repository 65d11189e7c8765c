//! `devices`: exercises the paravirtual devices a lockstep guest relies on
//! and says whether they behave.
//!
//! Reads the clock twice (it must not go backwards), sleeps 20 ms through
//! the timer and HLT (the clock must have advanced by at least 20 ms), reads
//! the entropy device (four 32-bit reads must not all be equal), checks
//! that the heap hands out memory that holds what is written to it (the
//! runtime's allocator, which the network guests rely on), writes the
//! health port three times. Prints `devices ok` and powers off with 0; on a
//! failed check prints `devices FAILED: <what>` and powers off with 1.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;

rt::entry!(main);

const SLEEP_NS: u64 = 20_000_000;
/// Bytes the heap check allocates: more than a page, far less than the
/// smallest guest memory (4 MiB).
const HEAP_CHECK_LEN: usize = 256 * 1024;

fn main(_boot: &rt::BootParams) -> u32 {
    match check() {
        Ok(()) => {
            rt::println!("devices ok");
            0
        }
        Err(failure) => {
            rt::println!("devices FAILED: {failure}");
            1
        }
    }
}

/// A check that did not hold, with the values seen.
enum Failure {
    ClockWentBack { first: u64, second: u64 },
    DeadlineOverflow { now: u64 },
    SleptTooShort { before: u64, after: u64 },
    EntropyStuck { value: u32 },
    HeapCorrupt { offset: usize },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::ClockWentBack { first, second } => {
                write!(f, "clock went backwards: read {first} ns, then {second} ns")
            }
            Failure::DeadlineOverflow { now } => {
                write!(f, "clock reads {now} ns: a 20 ms deadline overflows")
            }
            Failure::SleptTooShort { before, after } => write!(
                f,
                "sleep_until(+{SLEEP_NS} ns) returned after {} ns (clock {before} -> {after})",
                after.wrapping_sub(*before)
            ),
            Failure::EntropyStuck { value } => {
                write!(f, "entropy port returned {value:#010x} four times in a row")
            }
            Failure::HeapCorrupt { offset } => {
                write!(f, "heap memory did not keep what was written at offset {offset} of {HEAP_CHECK_LEN}")
            }
        }
    }
}

fn check() -> Result<(), Failure> {
    let first = rt::clock_ns();
    let second = rt::clock_ns();
    if second < first {
        return Err(Failure::ClockWentBack { first, second });
    }

    let deadline = second.checked_add(SLEEP_NS).ok_or(Failure::DeadlineOverflow { now: second })?;
    rt::sleep_until(deadline);
    let after = rt::clock_ns();
    if after < deadline {
        return Err(Failure::SleptTooShort { before: second, after });
    }

    // Four equal 32-bit values from a real source: probability 2^-96.
    let value = rt::random_u32();
    if (0..3).all(|_| rt::random_u32() == value) {
        return Err(Failure::EntropyStuck { value });
    }

    check_heap()?;

    for beat in 1..=3 {
        rt::health(beat);
    }
    Ok(())
}

/// Two live allocations, written with different patterns, copied (which
/// goes through `memcpy`) and read back.
fn check_heap() -> Result<(), Failure> {
    let pattern = |i: usize, seed: usize| (i.wrapping_mul(31) ^ seed) as u8;
    let first: Vec<u8> = (0..HEAP_CHECK_LEN).map(|i| pattern(i, 0x5a)).collect();
    let second: Vec<u8> = (0..HEAP_CHECK_LEN).map(|i| pattern(i, 0xa5)).collect();
    let mut copy = alloc::vec![0u8; HEAP_CHECK_LEN];
    copy.copy_from_slice(&first);
    for (offset, ((a, b), c)) in first.iter().zip(&second).zip(&copy).enumerate() {
        if *a != pattern(offset, 0x5a) || *b != pattern(offset, 0xa5) || c != a {
            return Err(Failure::HeapCorrupt { offset });
        }
    }
    Ok(())
}
