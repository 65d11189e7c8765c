//! `panic`: panics with the message `deliberate panic`. The runtime's panic
//! handler prints `guest panicked at <file>:<line>:<col>: deliberate panic`,
//! reports through pvpanic and halts.
#![no_std]
#![no_main]

rt::entry!(main);

fn main(_boot: &rt::BootParams) -> u32 {
    panic!("deliberate panic");
}
