//! Lockstep replication: log records, recorder, replayer, output rule,
//! logging channel, checkpoints and go-live. The seams it plugs into are
//! `vmm::hook`.
//!
//! What is here so far is the log and how it travels:
//!
//! - [`record`]: every log record type;
//! - [`frame`]: the versioned, CRC-checked, MACed wire format and its
//!   incremental decoder;
//! - [`key`]: the shared key of a pair (`--key-file`, `ftvm keygen`);
//! - [`channel`]: the logging channel over TCP: handshake with mutual
//!   authentication, batched records one way, cumulative acks the other.
#![forbid(unsafe_code)]

pub mod channel;
pub mod frame;
pub mod key;
pub mod record;

pub use channel::{Acker, ChannelConfig, ChannelError, IdentityValue, PrimaryChannel, RecordBatch, SecondaryChannel};
pub use frame::{FrameDecoder, FrameEncoder, FrameError, GuestIdentity, IdentityField};
pub use key::{KeyError, SharedKey};
pub use record::{LogPosition, Record, RecordKind};
