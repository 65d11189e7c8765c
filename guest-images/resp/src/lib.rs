//! The Redis-protocol engine of the `kvstore` guest.
//!
//! `kvstore` is a freestanding lockstep guest that serves unmodified `redis-cli` and
//! `redis-benchmark` (Redis 7.0) on port 6379. This crate is everything between the bytes a
//! client sends and the bytes it gets back: the RESP2 parser (multibulk and inline requests,
//! any fragmentation, pipelining), the string commands, and the keyspace. The guest wires it
//! to smoltcp and virtio-net; the crate itself needs only `core` and `alloc`.
//!
//! ```
//! use kvstore_resp::{Conn, ConnStatus, Store};
//!
//! let mut store = Store::with_limit(16 << 20);
//! let mut conn = Conn::new();
//! let mut out = Vec::new();
//! let now_ns = 1_000;
//! assert_eq!(conn.feed(b"SET k v\r\n*2\r\n$3\r\nGET\r\n$1\r\nk", &mut store, now_ns, &mut out), ConnStatus::Open);
//! assert_eq!(conn.feed(b"\r\n", &mut store, now_ns, &mut out), ConnStatus::Open);
//! assert_eq!(out, b"+OK\r\n$1\r\nv\r\n");
//! ```
//!
//! # Determinism
//!
//! Lockstep replication replays the guest, so the same inputs must give the same replies and
//! the same memory: the engine never reads a clock (the caller passes `now_ns`, a guest-clock
//! reading), uses ordered maps only (no hash seeds), and has no global state. Client ids come
//! from the [`Store`], in the order connections first send bytes.
//!
//! # Threat note
//!
//! Clients are untrusted and the guest's memory is bounded; no input may panic it or make it
//! allocate without bound. Every length is parsed strictly and capped before allocation (see
//! [`limits`]); buffer reads are `get`-checked; integer arithmetic is checked (INCR overflow
//! is an error reply, as in Redis). What one connection can hold is bounded by
//! [`limits::MAX_BUFFERED_INPUT`] of input, [`limits::MAX_REQUEST_ARG_BYTES`] of parsed
//! arguments and, when the caller applies back-pressure as [`Conn::feed`] asks,
//! [`limits::OUTPUT_HIGH_WATER`] plus one reply of output; what the keyspace can hold is
//! bounded by [`Store::with_limit`].
//!
//! # Compatibility
//!
//! Replies are byte-exact with Redis 7.0 for the supported commands (checked against a real
//! `redis-server` 7.0.15 by `tools/diff_against_redis.py`). Known differences, all deliberate:
//! `HELLO 3` is refused with `-NOPROTO` (RESP2 only); `SELECT` accepts only 0; `COMMAND DOCS`
//! is an unknown subcommand, as in Redis 6, so that redis-cli falls back to its built-in help
//! and hints; `COMMAND INFO` entries are abbreviated; `CLIENT SETINFO` (Redis 7.2) is
//! accepted; a key expires when the clock reaches its deadline (Redis: one millisecond later);
//! the limits below are far smaller than Redis's; and commands on types other than strings
//! (and SCAN, WATCH/MULTI, pub/sub, persistence) are unknown commands, so redis-benchmark
//! needs `-t` with string tests (`-t ping,set,get,incr,mset`): its default run stops at LPUSH.

#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation
    )
)]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod command;
mod conn;
mod glob;
mod int;
mod parse;
mod reply;
mod store;

pub use conn::{Conn, ConnStatus};
pub use store::Store;

/// The bounds that keep one client from exhausting the guest. Redis's own limits are far
/// larger (512 MiB bulk strings, a 1 GiB query buffer); these fit a guest with a few MiB.
pub mod limits {
    /// Longest bulk string accepted in a request: values up to 64 KiB, plus room for a key or
    /// option in the same size class. A longer `$` length is a protocol error (`invalid bulk
    /// length`) and closes the connection; APPEND refuses to grow a value past it.
    pub const MAX_BULK_LEN: usize = 64 * 1024 + 1024;

    /// Most arguments in one request, command name included. More is a protocol error.
    pub const MAX_ARGS: usize = 1024;

    /// Longest inline command line, and longest `*`/`$` header line, as in Redis
    /// (`PROTO_INLINE_MAX_SIZE`).
    pub const MAX_INLINE_LEN: usize = 64 * 1024;

    /// Most argument bytes in one request (the sum of its bulk lengths). More is a protocol
    /// error: without it one request could ask for `MAX_ARGS * MAX_BULK_LEN` (65 MiB).
    pub const MAX_REQUEST_ARG_BYTES: usize = 1024 * 1024;

    /// Most unparsed input a connection keeps between feeds. Without back-pressure problems
    /// at most one partial request element is left over (under `MAX_BULK_LEN` + 2 bytes or
    /// `MAX_INLINE_LEN` + 1 bytes); more accumulates only when the caller keeps feeding a
    /// connection whose output it does not drain, and past this it is closed with a protocol
    /// error.
    pub const MAX_BUFFERED_INPUT: usize = 256 * 1024;

    /// [`crate::Conn::feed`] stops executing requests while the output buffer holds this much
    /// or more, leaving them buffered until the caller drains the output and feeds again.
    pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;

    /// Largest reply to one MGET or KEYS; a bigger one is refused with an error reply instead
    /// of being built.
    pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

    /// Bytes accounted per key besides the key and value: the map node share, the two vector
    /// headers, the deadline slot.
    pub const ENTRY_OVERHEAD: usize = 64;

    /// Bytes accounted per deadline besides the copy of its key in the deadline index.
    pub const EXPIRY_OVERHEAD: usize = 48;
}
