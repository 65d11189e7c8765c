//! Lockstep replication: log records, recorder, replayer, output rule,
//! logging channel, checkpoints and go-live. The seams it plugs into are
//! `vmm::hook`.
//!
//! What is here so far is the log and how it travels:
//!
//! - [`record`]: every log record type;
//! - [`frame`]: the versioned, CRC-checked, MACed wire format and its
//!   incremental decoder.
#![forbid(unsafe_code)]

pub mod frame;
pub mod record;

pub use frame::{FrameDecoder, FrameEncoder, FrameError, GuestIdentity, IdentityField};
pub use record::{LogPosition, Record, RecordKind};
