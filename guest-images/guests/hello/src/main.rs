//! `hello`: prints `Hello from ftvm!` and powers off with status 0.
#![no_std]
#![no_main]

rt::entry!(main);

fn main(_boot: &rt::BootParams) -> u32 {
    rt::println!("Hello from ftvm!");
    0
}
