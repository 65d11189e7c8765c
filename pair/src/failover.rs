//! The failover policy, one for both roles: detection signals in (the
//! heartbeats' silence, the logging channel failing), one claim on the
//! arbiter, one verdict out.
//!
//! Safety rests on the arbiter alone: exactly one claim per generation
//! wins, and a side that does not win (lost, or could not reach the
//! arbiter) stops its guest. Detection only decides *when* to claim. When
//! the channel breaks while heartbeats still flow (a middlebox reset, say),
//! both sides are alive and both claim; the secondary waits
//! [`FailoverConfig::head_start`] first, so the primary normally wins and the
//! guest does not move needlessly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use heartbeat::{Arbiter, ArbiterError, Claim, Generation, Owner, Role};
use tokio::sync::Notify;

use crate::status::{Board, Detection, Loss};

/// Settings of failover (PAIR-OPTS).
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// `--arbiter file:PATH`.
    pub arbiter: String,
    /// `--heartbeat-ms`.
    pub heartbeat: Duration,
    /// `--dead-after`.
    pub dead_after: u32,
    /// The silence limit adapts to the link (no `--dead-after`): see
    /// `heartbeat::detector`.
    pub adaptive: bool,
    /// How long a secondary that saw the channel close, while the primary's
    /// heartbeats were still arriving, waits before claiming.
    pub head_start: Duration,
    /// `--max-lag-ms`: how far (in the primary's execution time) the
    /// secondary's replay may fall behind before the primary treats it as
    /// lost. A failover to a secondary that far behind would take that long.
    pub max_lag: Duration,
}

/// `--max-lag-ms` when not given: generous, because on a lossy link TCP
/// retransmissions alone delay the log by up to ~1.6 s (10 % loss).
pub const DEFAULT_MAX_LAG: Duration = Duration::from_millis(3000);

impl FailoverConfig {
    /// Defaults for everything but the arbiter; the head start is half a
    /// heartbeat interval.
    pub fn new(arbiter: impl Into<String>, heartbeat: Duration, dead_after: u32) -> FailoverConfig {
        FailoverConfig {
            arbiter: arbiter.into(),
            heartbeat,
            dead_after,
            adaptive: false,
            head_start: heartbeat / 2,
            max_lag: DEFAULT_MAX_LAG,
        }
    }
}

/// What the claim gave.
#[derive(Debug)]
pub enum Verdict {
    /// This side won the arbiter: it is (or stays) the live copy.
    Won,
    /// The other side won: stop the guest, emit nothing more, exit 4.
    Lost,
    /// The arbiter could not be read or written: never a win.
    Unreachable(ArbiterError),
}

impl Verdict {
    pub fn won(&self) -> bool {
        matches!(self, Verdict::Won)
    }
}

/// Heartbeats and the arbiter of one pair process.
pub struct Failover {
    service: heartbeat::Service,
    /// Where the heartbeats run (after `service`: dropped last).
    _runtime: HeartbeatRuntime,
    arbiter: Arbiter,
    generation: Generation,
    owner: Owner,
    role: Role,
    head_start: Duration,
    channel_lost: Notify,
    lagging: Notify,
    lag_since: std::sync::Mutex<Option<Instant>>,
    stats: tokio::sync::watch::Receiver<heartbeat::ServiceStats>,
    /// Whether this side may still claim, and what it won. Held across a
    /// claim's file operation, so that [`Failover::release`] either sees the
    /// win or stops the claim from being made.
    ownership: Arc<std::sync::Mutex<Hold>>,
}

/// This side's hold on the arbiter.
#[derive(Clone, Copy, Debug)]
enum Hold {
    /// Not claimed (yet).
    Open,
    /// Won this generation: this side is the live copy.
    Won(Generation),
    /// The guest stopped: nothing is claimed any more.
    Retired,
    /// The guest faulted and is being handed over: this side claims
    /// nothing unless the handover fails ([`Failover::claim_after_handover`]).
    Yielded,
}

fn lock_hold(m: &std::sync::Mutex<Hold>) -> std::sync::MutexGuard<'_, Hold> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Niceness of the heartbeat thread: ahead of the guests' vCPU threads and
/// of whatever else the host runs, so that a busy host does not go silent
/// (Corosync runs its own at real-time priority for the same reason).
pub const HEARTBEAT_NICE: i32 = -10;

/// The heartbeats' own runtime: one thread, named `heartbeat`, at
/// [`HEARTBEAT_NICE`], apart from the logging channel's worker, which a busy
/// channel keeps busy.
struct HeartbeatRuntime {
    /// Taken on drop.
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl HeartbeatRuntime {
    fn new() -> std::io::Result<HeartbeatRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("heartbeat")
            .on_thread_start(|| {
                let me = rustix::thread::gettid();
                if let Err(e) = rustix::process::setpriority_process(Some(me), HEARTBEAT_NICE) {
                    tracing::debug!(error = %e, "cannot raise the heartbeat thread's priority");
                }
            })
            .enable_all()
            .build()?;
        Ok(HeartbeatRuntime { handle: rt.handle().clone(), rt: Some(rt) })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for HeartbeatRuntime {
    fn drop(&mut self) {
        // Dropped possibly from within the session's runtime: never block.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The arbiter names a live copy of this guest: starting another could make
/// two. Released by that copy when its guest stops, or by an operator who
/// knows it is gone (`ftvm arbiter release`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the arbiter {spec} names {owner} as the live copy of this guest: refusing to start another \
     (if that copy is gone for good, release it with `ftvm arbiter --release --arbiter {spec}`)"
)]
pub struct LiveElsewhere {
    pub spec: String,
    pub owner: String,
}

impl Failover {
    /// Start heartbeats (their counters reported on `board`) and read the
    /// arbiter's generation: the one a claim of this pair can win. Must be
    /// called inside the session's tokio runtime.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &FailoverConfig,
        board: &Board,
        name: &str,
        role: Role,
        key: &[u8],
        local: SocketAddr,
        peer: Option<SocketAddr>,
    ) -> anyhow::Result<Failover> {
        let arbiter = Arbiter::open(&config.arbiter)?;
        let probe = arbiter.clone();
        let (generation, holder) = tokio::task::spawn_blocking(move || probe.current()).await??;
        if let Some(holder) = holder {
            return Err(LiveElsewhere { spec: config.arbiter.clone(), owner: holder.to_string() }.into());
        }
        board.set_arbiter(&config.arbiter, generation.0);
        let mut hb = heartbeat::ServiceConfig::new(role, heartbeat::PairId::for_vm_name(name), local, peer);
        hb.interval = config.heartbeat;
        hb.dead_after = config.dead_after;
        hb.adaptive = config.adaptive;
        let runtime = HeartbeatRuntime::new()?;
        let key = key.to_vec();
        let service = runtime.handle().spawn(async move { heartbeat::Service::start(hb, &key).await }).await??;
        let owner = Owner::of(name, role, service.incarnation())?;
        let stats = service.watch_stats();
        board.watch_heartbeats(service.watch_stats());
        Ok(Failover {
            service,
            _runtime: runtime,
            arbiter,
            generation,
            owner,
            role,
            head_start: config.head_start,
            channel_lost: Notify::new(),
            lagging: Notify::new(),
            lag_since: std::sync::Mutex::new(None),
            stats,
            ownership: Arc::new(std::sync::Mutex::new(Hold::Open)),
        })
    }

    /// The logging channel failed without the peer's clean end. A peer
    /// process that dies has its kernel close the connection, so this is the
    /// fast sign of its death; a dead host closes nothing, and the
    /// heartbeats' silence decides.
    pub fn channel_failed(&self) {
        self.channel_lost.notify_one();
    }

    /// The secondary's replay is too far behind (primary only): it has
    /// not kept up since `since`.
    pub fn secondary_lagging(&self, since: Instant) {
        *self.lag_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(since);
        self.lagging.notify_one();
    }

    /// Put this side's progress (exit index, log position: on a secondary
    /// the records *replayed*) into its heartbeats.
    pub fn report_progress(&self, exit_index: u64, log_position: u64) {
        self.service.set_progress(exit_index, log_position);
    }

    /// The log position in the peer's last accepted heartbeat.
    pub fn peer_position(&self) -> Option<u64> {
        self.stats.borrow().peer_progress.map(|p| p.log_position)
    }

    /// Log traffic arrived: a sign of life as good as a heartbeat.
    pub fn note_life(&self) {
        self.service.note_life();
    }

    /// Stop sending heartbeats (a live copy is no longer this role; a
    /// stopping one is gone).
    pub fn stop_heartbeats(&self) {
        self.service.stop();
    }

    /// Wait until the peer is lost: silent for `--dead-after` intervals, or
    /// its channel failed.
    pub async fn peer_lost(&self) -> Loss {
        let mut w = self.service.watch();
        let silence = async {
            loop {
                if matches!(*w.borrow_and_update(), heartbeat::PeerState::Dead { .. }) {
                    break;
                }
                if w.changed().await.is_err() {
                    break;
                }
            }
        };
        let by = tokio::select! {
            () = silence => Detection::Silence,
            () = self.channel_lost.notified() => Detection::ChannelClosed,
            () = self.lagging.notified() => Detection::Lagging,
        };
        let now = Instant::now();
        // Lagging, the secondary is heard from: what it stopped doing is
        // keeping up.
        let lag_since = *self.lag_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let last_heard = match by {
            Detection::Lagging => lag_since,
            _ => self.service.last_heard(),
        };
        Loss { last_heard: last_heard.unwrap_or(now), decided: now, by }
    }

    /// Claim the arbiter for a loss. A secondary that saw only the channel
    /// close while the peer's heartbeats were recent gives the primary its
    /// head start first. The claim itself (file I/O, fsync) runs on a
    /// blocking thread, not on the async workers.
    pub async fn claim(&self, loss: &Loss) -> Verdict {
        let recently_heard = self.service.last_heard().is_some_and(|t| t.elapsed() < self.service.timeout());
        if self.role == Role::Secondary && loss.by == Detection::ChannelClosed && recently_heard {
            tokio::time::sleep(self.head_start).await;
        }
        let (arbiter, generation, owner) = (self.arbiter.clone(), self.generation, self.owner.clone());
        let ownership = self.ownership.clone();
        let claimed = tokio::task::spawn_blocking(move || {
            let mut held = lock_hold(&ownership);
            if matches!(*held, Hold::Retired | Hold::Yielded) {
                // The guest stopped while the decision was under way: a
                // stopped copy takes nothing (it would never give it back).
                return Ok(None);
            }
            let claim = arbiter.claim(generation, &owner)?;
            if let Claim::Won { generation } = claim {
                *held = Hold::Won(generation);
            }
            Ok(Some(claim))
        })
        .await;
        match claimed {
            Ok(Ok(Some(Claim::Won { .. }))) => Verdict::Won,
            Ok(Ok(Some(Claim::Lost { .. }) | None)) => Verdict::Lost,
            Ok(Err(e)) => Verdict::Unreachable(e),
            Err(join) => Verdict::Unreachable(ArbiterError::Io {
                path: self.arbiter.path().to_path_buf(),
                source: std::io::Error::other(join.to_string()),
            }),
        }
    }

    /// This copy's guest stopped: if it owns the arbiter, give it up, so
    /// that a new pair may form; and claim nothing from now on (a claim
    /// under way finishes first, then is released). Blocking (file I/O);
    /// call it off the async workers.
    pub fn release(&self) {
        let mut held = lock_hold(&self.ownership);
        let was = std::mem::replace(&mut *held, Hold::Retired);
        if let Hold::Won(generation) = was {
            if let Err(e) = self.arbiter.release(generation, Some(&self.owner)) {
                tracing::warn!(error = %e, "could not release the arbiter");
            }
        }
    }

    /// This copy's guest stopped on purpose, but its peer may not know (it
    /// did not acknowledge the log's end, which may never reach it): take
    /// this pair's generation if it is still free and give it straight
    /// back, so that the peer's claim fails and it does not take over a
    /// guest that was stopped. `false` when the peer had already won: it is
    /// the live copy. Blocking (file I/O); call it off the async workers.
    pub fn retire_fencing(&self) -> bool {
        let mut held = lock_hold(&self.ownership);
        let (won, peer_live) = match std::mem::replace(&mut *held, Hold::Retired) {
            Hold::Won(generation) => (Some(generation), false),
            Hold::Retired | Hold::Yielded => (None, false),
            Hold::Open => match self.arbiter.claim(self.generation, &self.owner) {
                Ok(Claim::Won { generation }) => (Some(generation), false),
                Ok(Claim::Lost { .. }) => (None, true),
                Err(e) => {
                    tracing::warn!(error = %e, "could not fence the peer off the stopped guest");
                    (None, false)
                }
            },
        };
        if let Some(generation) = won {
            if let Err(e) = self.arbiter.release(generation, Some(&self.owner)) {
                tracing::warn!(error = %e, "could not release the arbiter");
            }
        }
        !peer_live
    }

    /// The guest faulted: hand it over, claiming nothing from now on (a
    /// claim under way finishes first). `true` when this side already won
    /// the arbiter (it runs alone: there is nobody to hand over to).
    pub fn yield_claim(&self) -> bool {
        let mut held = lock_hold(&self.ownership);
        match *held {
            Hold::Won(_) => true,
            Hold::Open => {
                *held = Hold::Yielded;
                false
            }
            Hold::Retired | Hold::Yielded => false,
        }
    }

    /// A planned switchover was given up before the secondary was told: this
    /// side may claim again, as before [`Failover::yield_claim`].
    pub fn unyield(&self) {
        let mut held = lock_hold(&self.ownership);
        if let Hold::Yielded = *held {
            *held = Hold::Open;
        }
    }

    /// After a handover: whether the peer won this pair's generation
    /// (the arbiter moved past it, owned by someone else) within `wait`.
    /// Blocking (file I/O, polling every millisecond); call it off the
    /// async workers.
    pub fn taken_by_peer(&self, wait: Duration) -> Result<bool, ArbiterError> {
        let deadline = Instant::now() + wait;
        loop {
            let (generation, owner) = self.arbiter.current()?;
            if generation != self.generation && owner.as_ref() != Some(&self.owner) {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The handover did not go through (the peer never acknowledged the
    /// fault): claim now, as for a lost peer. Won: this side keeps the
    /// guest and applies `--on-fault`; lost: the peer went live. Blocking
    /// (file I/O); call it off the async workers.
    pub fn claim_after_handover(&self) -> Verdict {
        let mut held = lock_hold(&self.ownership);
        if let Hold::Won(_) = *held {
            return Verdict::Won;
        }
        match self.arbiter.claim(self.generation, &self.owner) {
            Ok(Claim::Won { generation }) => {
                *held = Hold::Won(generation);
                Verdict::Won
            }
            Ok(Claim::Lost { .. }) => Verdict::Lost,
            Err(e) => Verdict::Unreachable(e),
        }
    }

    /// Wait for the peer's loss, then claim: the one decision of a session.
    pub async fn decide(self: Arc<Self>) -> (Loss, Verdict) {
        let loss = self.peer_lost().await;
        let verdict = self.claim(&loss).await;
        (loss, verdict)
    }
}

/// Refuse to start a pair while the arbiter names a live copy of the guest.
/// Checked before anything else (waiting for a peer can take minutes); the
/// check is repeated when the pair forms.
pub fn check_free(spec: &str) -> anyhow::Result<()> {
    let arbiter = Arbiter::open(spec)?;
    match arbiter.current()? {
        (_, Some(holder)) => Err(LiveElsewhere { spec: spec.to_string(), owner: holder.to_string() }.into()),
        (_, None) => Ok(()),
    }
}

/// A copy that runs without a peer (`--unprotected-start`) and will emit to
/// the world: it claims the arbiter first, and only a free one (no live
/// copy named). Returns the ownership to release when the guest stops.
pub fn claim_alone(spec: &str, name: &str) -> anyhow::Result<Ownership> {
    let arbiter = Arbiter::open(spec)?;
    let (generation, holder) = arbiter.current()?;
    if let Some(holder) = holder {
        return Err(LiveElsewhere { spec: spec.to_string(), owner: holder.to_string() }.into());
    }
    let owner = Owner::new(format!("{name}-standalone-{}", std::process::id()))?;
    match arbiter.claim(generation, &owner)? {
        Claim::Won { generation } => Ok(Ownership { arbiter, generation, owner }),
        Claim::Lost { owner: holder, .. } => Err(LiveElsewhere {
            spec: spec.to_string(),
            owner: holder.map_or_else(|| "another copy".to_string(), |o| o.to_string()),
        }
        .into()),
    }
}

/// The arbiter, won by this process.
pub struct Ownership {
    arbiter: Arbiter,
    generation: Generation,
    owner: Owner,
}

impl Ownership {
    /// The guest stopped: free the arbiter.
    pub fn release(self) {
        if let Err(e) = self.arbiter.release(self.generation, Some(&self.owner)) {
            tracing::warn!(error = %e, "could not release the arbiter");
        }
    }
}
