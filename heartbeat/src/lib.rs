//! Failure detection and split brain (DESIGN "Failure detection and split
//! brain"): authenticated UDP heartbeats both ways on the dedicated link, a
//! failure detector that declares the peer dead after a configurable
//! silence, and the arbiter both sides must win before one of them carries
//! on alone. This crate knows nothing of the VMM or of replication: the
//! binary wires it to both.
//!
//! - [`message`]: the heartbeat datagram and its key;
//! - [`detector`]: the clock-injected failure detector and the receiver that
//!   decides which datagrams are signs of life;
//! - [`sender`]: one incarnation's numbered heartbeats;
//! - [`service`]: the tokio task that sends, receives and watches the peer;
//! - [`arbiter`]: the test-and-set on shared storage (`--arbiter file:PATH`).
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::arithmetic_side_effects)
)]
#![deny(clippy::cast_possible_truncation)]

pub mod arbiter;
pub mod detector;
pub mod message;
pub mod sender;
pub mod service;

pub use arbiter::{Arbiter, ArbiterError, Claim, Generation, Owner};
pub use detector::{
    check_timing, Counters, Detector, DetectorError, PeerState, Receiver, Verdict, DEFAULT_DEAD_AFTER,
    DEFAULT_INTERVAL, STALL,
};
pub use message::{Challenge, Heartbeat, HeartbeatKey, Incarnation, MessageError, PairId, Progress, Role};
pub use sender::Sender;
pub use service::{Service, ServiceConfig, ServiceError, ServiceStats};
