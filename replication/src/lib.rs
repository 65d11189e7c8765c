//! Lockstep replication: log records, wire format, logging channel,
//! recorder, replayer, output rule. `vmm` knows nothing of this crate: the
//! recorder and the replayer are its input sources, the output gate and the
//! suppressor its output sinks.
//!
//! - [`record`]: every log record type;
//! - [`frame`]: the versioned, CRC-checked, MACed wire format and its
//!   incremental decoder;
//! - [`key`]: the shared key of a pair (`--key-file`, `ftvm keygen`);
//! - [`channel`]: the logging channel over TCP: handshake with mutual
//!   authentication, batched records one way, cumulative acks the other;
//! - [`log`], [`recorder`], [`output_rule`]: the primary's side;
//! - [`replayer`], [`suppressed`]: the secondary's side;
//! - [`transfer`]: live state transfer to a host with nothing (repair).
#![forbid(unsafe_code)]

pub mod channel;
pub mod cost;
pub mod frame;
pub mod go_live;
pub mod key;
pub mod log;
pub mod output_rule;
pub mod record;
pub mod recorder;
pub mod replayer;
pub mod suppressed;
pub mod transfer;

pub use channel::{Acker, ChannelConfig, ChannelError, IdentityValue, PrimaryChannel, RecordBatch, SecondaryChannel};
pub use frame::{FrameDecoder, FrameEncoder, FrameError, GuestIdentity, IdentityField};
pub use key::{KeyError, SharedKey};
pub use record::{LogPosition, Record, RecordKind};
