//! Exit statuses of `ftvm`: stable, documented in README, and relied on by
//! the cluster manager integrations.
//!
//! | status | meaning |
//! | --- | --- |
//! | 0 | the guest powered off cleanly (or, for a secondary, the primary ended cleanly and replay reached the same point) |
//! | 1 | error: one clear line on stderr |
//! | 2 | bad usage: a command line that cannot be parsed, or a flag value invalid in itself |
//! | 3 | guest fault (pvpanic, triple fault, an exit nothing serves) |
//! | 4 | lost the arbiter: this copy stopped so that the other could live (also: a primary that handed its faulted guest over to the secondary) |
//! | 5 | fault escalated: a guest fault this copy could not hand over (running alone, the channel down, within `--fault-window` of a containment or restart) and `--on-fault stop` |
//! | 128+N | stopped by signal N (SIGINT, SIGTERM, SIGHUP); `ftvm demo` too, after tearing its lab down (SIGINT, SIGTERM) |

/// An error that is not the command line's fault.
pub const EXIT_ERROR: i32 = 1;
/// Bad usage. clap uses the same value for its errors.
pub const EXIT_USAGE: i32 = 2;
/// The guest faulted.
pub const EXIT_GUEST_FAULT: i32 = 3;
/// Lost the arbiter; this copy stopped so that the other lives.
pub const EXIT_LOST_ARBITER: i32 = 4;
/// A guest fault that could not be contained: `--on-fault stop`.
pub const EXIT_FAULT_ESCALATED: i32 = 5;
/// Base of "stopped by signal N": 128 + N, as shells report it.
pub const EXIT_SIGNAL_BASE: i32 = 128;
