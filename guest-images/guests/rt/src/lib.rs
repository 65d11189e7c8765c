//! The runtime of ftvm's freestanding guests.
//!
//! A guest is a `no_std`, `no_main` binary that names its main function with
//! [`entry!`]:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//!
//! rt::entry!(main);
//!
//! fn main(_boot: &rt::BootParams) -> u32 {
//!     rt::println!("Hello from ftvm!");
//!     0 // the status the guest powers off with
//! }
//! ```
//!
//! What the runtime does for it, in order:
//!
//! 1. `_start` (the ELF entry) zeroes `.bss` and calls into Rust with the
//!    `rdi` the VMM set ([`abi::BOOT_PARAMS_ADDR`]).
//! 2. The boot-parameter block is checked ([`BootParams::is_valid`]); a bad
//!    one is reported as a panic.
//! 3. The heap (`#[global_allocator]`) gets the RAM from the end of the image
//!    to `BootParams::mem_size`, so guests may use `alloc`.
//! 4. The guest's main runs; its return value is the power-off status.
//!
//! Everything the guest observes from the world comes through ftvm's ports
//! ([`ftvm_abi`]): time from [`clock_ns`], randomness from [`random_u32`],
//! sleeping through [`sleep_until`]. The lockstep contract forbids RDTSC,
//! RDRAND and their kind: replay could not reproduce them. A panic prints its
//! message on COM1, reports through pvpanic and halts.
#![no_std]

// The C memory functions live in their own `no_builtins` crate, which rustc
// links only when some crate names it.
extern crate mem;

pub use ftvm_abi as abi;
pub use ftvm_abi::BootParams;

mod devices;
pub mod fault;
mod heap;
#[cfg(feature = "net")]
pub mod net;
mod panic;
pub mod port;
pub mod serial;
mod start;

pub use devices::{
    clock_ns, fill_random, halt, health, power_off, pvpanic, random_u32, random_u64, set_timer, sleep_until,
    testdev_mmio_write, testdev_write,
};

/// Names the guest's main function: `fn(&'static BootParams) -> u32`.
///
/// The runtime calls it once, after zeroing `.bss`, checking the
/// boot-parameter block and setting up the heap; when it returns, the guest
/// powers off with the returned status (0 = success). A guest that serves
/// forever simply never returns.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The guest's entry point as the runtime sees it (see `rt::entry!`).
        #[export_name = "__ftvm_guest_main"]
        fn __ftvm_guest_main(boot: &'static $crate::BootParams) -> u32 {
            // Checks the guest's main against the signature the runtime calls.
            let main: fn(&'static $crate::BootParams) -> u32 = $main;
            main(boot)
        }
    };
}
