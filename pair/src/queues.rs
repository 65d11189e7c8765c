//! Every hand-off between a session's threads, with its bound, in one place.
//!
//! | from → to | what | bound |
//! | --- | --- | --- |
//! | vCPU → shipper (primary) | the log tail ([`replication::log::LogShared`]) | records are taken as a whole; the channel refuses more than [`replication::channel::DEFAULT_MAX_UNACKED_BYTES`] unacknowledged, after which the shipper keeps them (backlog) and retries every [`SHIP_BACKOFF`] |
//! | vCPU → releaser (primary) | held outputs ([`replication::output_rule`]) | unbounded (the hardening issue bounds them in bytes) |
//! | channel task → replayer (secondary) | received records, [`received_records`] | [`RECEIVED_RECORDS`]: when full the channel task stops reading, acks stop, and the primary sees the lag |
//! | failover → replayer (secondary) | the go-live decision, [`decisions`] | [`DECISIONS`] (one decision per session) |
//! | channel task → ack delayer (secondary, test knob) | acks to send later, [`delayed_acks`] | [`DELAYED_ACKS`] |
//! | any → failover | "the channel failed" | a `Notify` (a flag, not a queue) |

use std::time::Duration;

use replication::go_live::Decision;
use replication::record::{LogPosition, Record};

/// Received records waiting for the replayer. At ~100 bytes a record this
/// is a few tens of MiB at most; past it the receiving task stops reading.
pub const RECEIVED_RECORDS: usize = 1 << 18;
/// The failover decision: one per session.
pub const DECISIONS: usize = 1;
/// Acks held back by `--ack-delay-ms` (a test knob): one per batch.
pub const DELAYED_ACKS: usize = 1 << 16;
/// How long the shipper waits before retrying a batch the channel refused.
pub const SHIP_BACKOFF: Duration = Duration::from_millis(1);
/// How long the channel task waits before retrying a full record queue.
pub const RECEIVE_BACKOFF: Duration = Duration::from_millis(1);
/// How often the shipper ships on its own when nothing asked it to.
pub const SHIP_PERIOD: Duration = Duration::from_millis(2);

/// Channel task → replayer.
pub fn received_records() -> (crossbeam_channel::Sender<Record>, crossbeam_channel::Receiver<Record>) {
    crossbeam_channel::bounded(RECEIVED_RECORDS)
}

/// Failover → replayer.
pub fn decisions() -> (crossbeam_channel::Sender<Decision>, crossbeam_channel::Receiver<Decision>) {
    crossbeam_channel::bounded(DECISIONS)
}

/// An ack to send at a given instant.
pub type DelayedAck = (tokio::time::Instant, LogPosition);

/// Channel task → ack delayer.
pub fn delayed_acks() -> (tokio::sync::mpsc::Sender<DelayedAck>, tokio::sync::mpsc::Receiver<DelayedAck>) {
    tokio::sync::mpsc::channel(DELAYED_ACKS)
}
