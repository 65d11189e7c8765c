//! Pair sessions: what runs one protected guest on one host, between the
//! replication and heartbeat crates below and the `ftvm` binary above.
//!
//! - [`primary::PrimarySession`]: the live guest's side: records, ships,
//!   gates outputs on acks, carries on alone if it wins the arbiter;
//! - [`secondary::SecondarySession`]: replays, acks, goes live if it wins;
//! - [`failover`]: the one failover policy both use (detection in, one
//!   claim on the arbiter, one verdict out);
//! - [`status`] and [`control`]: what `ftvm status` shows, and the socket
//!   it reads;
//! - [`queues`]: every hand-off between the sessions' threads, with its
//!   bound;
//! - [`live`]: the real world a secondary attaches at go-live.
//!
//! A session does not own the guest: the caller builds its VM (or, in the
//! tests, a scripted stand-in) with the session's input source and output
//! sink, runs it, and hands the outcome back to the session's `finish`.
#![forbid(unsafe_code)]

pub mod control;
pub mod failover;
pub mod health;
mod lag;
pub mod live;
mod observed;
pub mod primary;
mod progress;
pub mod queues;
pub mod repair;
pub mod secondary;
mod shipper;
pub mod status;
pub mod switchover;

pub use control::{ControlError, ControlSocket};

pub use failover::{Failover, FailoverConfig, Verdict};
pub use health::{Health, HealthConfig, OnFault, OutputMode};
pub use primary::{PrimaryConfig, PrimaryEnd, PrimarySession};
pub use secondary::{MakeLive, NoPrimary, SecondaryConfig, SecondaryEnd, SecondarySession};
pub use status::{Board, FaultEvent, Role, Status};

use replication::channel::ChannelError;

/// A session's runtime: one worker for the channel, heartbeats and the
/// failover decision; blocking work (the arbiter's claim) goes to its
/// blocking pool.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("net").enable_all().build()
}

/// SIGINT, SIGTERM or SIGHUP arrived while the session waited for its peer
/// (before any guest ran): the process ends as stopped by that signal.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {0} while waiting for the peer")]
pub struct Interrupted(pub i32);

/// Run `fut` unless SIGINT, SIGTERM or SIGHUP comes first.
async fn unless_signalled<T>(fut: impl std::future::Future<Output = T>) -> Result<T, Interrupted> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    async fn recv(s: &mut Option<Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        v = fut => Ok(v),
        () = recv(&mut int) => Err(Interrupted(libc::SIGINT)),
        () = recv(&mut term) => Err(Interrupted(libc::SIGTERM)),
        () = recv(&mut hup) => Err(Interrupted(libc::SIGHUP)),
    }
}

/// A failure to reach a secondary that is worth retrying.
fn is_retryable(e: &ChannelError) -> bool {
    matches!(e, ChannelError::Io(_) | ChannelError::Closed | ChannelError::HandshakeTimeout { .. })
}
