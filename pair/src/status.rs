//! What `ftvm status` reports: a live [`Board`] that the session's threads
//! update, and the plain [`Status`] snapshot it serialises to.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// The role of a VMM process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Its guest is live and protected: outputs wait for the secondary.
    Primary,
    /// It replays the primary's log, outputs suppressed.
    Secondary,
    /// Its guest is live and unprotected (after a go-live, or a primary that
    /// carried on alone).
    Standalone,
}

/// Whether the peer is heard from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    Up,
    Down,
}

/// How a side learnt that its peer is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Detection {
    /// `--dead-after` intervals without a heartbeat or log traffic.
    #[serde(rename = "heartbeat silence")]
    Silence,
    /// The logging channel closed or failed without the peer's `Shutdown`.
    #[serde(rename = "log channel closed")]
    ChannelClosed,
    /// The secondary's replay fell further behind the primary than
    /// `--max-lag-ms` of the primary's execution: alive, but a failover to
    /// it would take that long.
    #[serde(rename = "replay lag")]
    Lagging,
    /// The primary's guest faulted and it handed the guest over
    /// (containment): no timeout involved.
    #[serde(rename = "guest fault")]
    GuestFault,
    /// A planned switchover (`ftvm switchover`): the primary handed the
    /// guest over on purpose.
    #[serde(rename = "switchover")]
    Switchover,
}

impl Detection {
    /// As `last_failure.detected_by` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Detection::Silence => "heartbeat silence",
            Detection::ChannelClosed => "log channel closed",
            Detection::Lagging => "replay lag",
            Detection::GuestFault => "guest fault",
            Detection::Switchover => "switchover",
        }
    }
}

/// One failure and how it was handled, with the thesis' metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailureEvent {
    /// `primary lost` or `secondary lost`.
    pub kind: &'static str,
    pub detected_by: Detection,
    /// When it was decided, RFC 3339 UTC.
    pub at: String,
    /// Last sign of life → declared lost.
    pub reaction_ms: f64,
    /// Declared lost → service resumed (arbiter won, live world attached).
    pub recovery_ms: f64,
    /// `reaction_ms + recovery_ms`.
    pub outage_ms: f64,
    /// Failure → redundancy restored (a new secondary in sync); null until
    /// then.
    pub repair_ms: Option<f64>,
}

/// One guest fault and what was done about it (containment, escalation),
/// with the thesis' metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultEvent {
    /// The health source that fired.
    pub source: crate::health::Source,
    /// The fault's kind (`halt`, `panic`, `crash`, `power_off`, `hang`,
    /// `unhealthy`, `probe`, `lan`).
    pub fault: replication::record::FaultKind,
    /// What was done: `contained` (the secondary went live from the last
    /// barrier), `handed over` (the primary's view of the same), `restart`
    /// (clean boot), `stop` (exit status 5).
    pub action: &'static str,
    /// The fault was within `--fault-window` of a containment or restart,
    /// so it was not contained again.
    pub escalated: bool,
    /// When it was handled, RFC 3339 UTC.
    pub at: String,
    /// The exit index of the fault (as the primary logged it).
    pub exit: Option<u64>,
    /// The exit of the barrier the secondary went live from.
    pub barrier_exit: Option<u64>,
    /// Last sign of health → fault declared. Primary: the last health
    /// report (deadline), the vCPU's last exit (hang), the probe's first
    /// failure, or 0 for a fault seen at an exit. Secondary: the last
    /// barrier's arrival → the fault record's arrival.
    pub reaction_ms: f64,
    /// Fault declared → service resumed. Secondary: arbiter won and live
    /// world attached; primary: the fault record acknowledged (handed over)
    /// or the guest restarted.
    pub recovery_ms: f64,
    /// `reaction_ms + recovery_ms`.
    pub outage_ms: f64,
}

/// One planned switchover (`ftvm switchover`) as this process saw it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SwitchoverEvent {
    /// What this process became: `secondary` (it was the primary and
    /// handed its guest over) or `primary` (it took the guest over).
    pub became: &'static str,
    /// When this side's part ended, RFC 3339 UTC.
    pub at: String,
    /// The exit the guest stood still at on the old primary.
    pub exit: u64,
    /// Old primary: guest stopped → the other copy won the arbiter (it goes
    /// live right after replaying the log's tail). New primary: the
    /// switchover record arrived → live world attached.
    pub pause_ms: f64,
    /// Old primary: when its guest stopped; new primary: when its guest
    /// went live; milliseconds since the Unix epoch (on one clock, their
    /// difference is the pause the guest saw).
    pub at_unix_ms: f64,
}

impl SwitchoverEvent {
    /// An event of this side, ending now.
    pub fn now(became: &'static str, exit: u64, pause: Duration, at: SystemTime) -> SwitchoverEvent {
        SwitchoverEvent {
            became,
            at: rfc3339(SystemTime::now()),
            exit,
            pause_ms: millis(pause),
            at_unix_ms: at.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3),
        }
    }
}

/// What answers `ftvm switchover` on this process's control socket: set by
/// a primary session while its guest runs. Returns the switchover's report
/// or one clear error.
pub type SwitchHandler = std::sync::Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

/// Heartbeat counters, when failover is on.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct HeartbeatCounts {
    pub sent: u64,
    pub accepted: u64,
    pub forged: u64,
    pub replayed: u64,
    pub foreign: u64,
    pub malformed: u64,
    /// Authentic but not proven fresh (no echo of this side's challenge):
    /// replays of an earlier run, or a restarted peer before it answers.
    pub unproven: u64,
    /// Challenges answered to unproven senders.
    pub answered: u64,
    /// The silence after which the peer is dead, as now in force (it adapts
    /// to the link unless `--dead-after` was given).
    pub silence_limit_ms: f64,
    /// Times this side's own heartbeat timer fired late (it did not run):
    /// silences not blamed on the peer.
    pub stalls: u64,
}

impl From<heartbeat::ServiceStats> for HeartbeatCounts {
    fn from(s: heartbeat::ServiceStats) -> Self {
        HeartbeatCounts {
            sent: s.sent,
            accepted: s.received.accepted,
            forged: s.received.forged,
            replayed: s.received.replayed,
            foreign: s.received.foreign,
            malformed: s.received.malformed,
            unproven: s.received.unproven,
            answered: s.answered,
            silence_limit_ms: s.silence_limit.as_secs_f64() * 1e3,
            stalls: s.stalls,
        }
    }
}

/// `ftvm status --json`: one object. Fields that do not apply to the role
/// are null (a standalone has no acks and no replay lag).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Status {
    pub name: String,
    pub role: Role,
    /// What the process is doing, in words.
    pub state: String,
    pub uptime_s: f64,
    pub exit_index: u64,
    /// Primary: records appended; secondary: records replayed.
    pub log_position: u64,
    /// Primary: acknowledged by the secondary; secondary: received.
    pub acked_position: Option<u64>,
    /// Positions whose outputs have all been released.
    pub released_position: u64,
    /// Primary: records not yet acknowledged; secondary: received, not yet
    /// replayed.
    pub replay_lag_records: Option<u64>,
    pub divergences: u64,
    /// Outputs waiting for an ack (primary) or kept for re-emission
    /// (secondary).
    pub outputs_held: u64,
    /// Primary: their bytes (bounded: past the bound the guest's output
    /// side waits).
    pub outputs_held_bytes: u64,
    /// Primary, with failover: how far the secondary's replay is behind,
    /// in milliseconds of the primary's execution.
    pub replay_lag_ms: Option<f64>,
    /// Primary: encoded bytes of the records shipped (the `Records`
    /// payloads, without the frames' headers, CRCs and MACs).
    pub log_bytes: u64,
    /// Primary: the same with each frame's header, CRC and MAC.
    pub log_wire_bytes: u64,
    pub peer: PeerState,
    /// The peer's address (`--peer`, or where the primary connected from).
    pub peer_address: Option<String>,
    /// `--arbiter`, and its generation when the pair formed.
    pub arbiter: Option<String>,
    pub arbiter_generation: Option<u64>,
    pub last_failure: Option<FailureEvent>,
    pub heartbeats: Option<HeartbeatCounts>,
    /// `--containment` on or off.
    pub containment: bool,
    /// `--output-mode`: `fast` or `strict`.
    pub output_mode: crate::health::OutputMode,
    /// Primary: barriers logged; secondary: the exit of the last barrier
    /// received (replay holds there).
    pub last_barrier_exit: Option<u64>,
    /// Guest faults handled by this process.
    pub faults: u64,
    /// The last of them.
    pub last_fault: Option<FaultEvent>,
    /// Planned switchovers this process took part in.
    pub switchovers: u64,
    /// The last of them.
    pub last_switchover: Option<SwitchoverEvent>,
}

/// The live status, updated by the session's threads.
pub struct Board {
    name: Mutex<String>,
    started: Instant,
    role: Mutex<Role>,
    state: Mutex<String>,
    pub(crate) exit_index: AtomicU64,
    pub(crate) log_position: AtomicU64,
    pub(crate) acked_position: AtomicU64,
    pub(crate) released_position: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) divergences: AtomicU64,
    pub(crate) outputs_held: AtomicU64,
    pub(crate) outputs_held_bytes: AtomicU64,
    /// Microseconds; `u64::MAX`: not measured.
    pub(crate) replay_lag_us: AtomicU64,
    pub(crate) log_bytes: AtomicU64,
    pub(crate) log_wire_bytes: AtomicU64,
    peer_up: AtomicBool,
    peer_address: Mutex<Option<String>>,
    arbiter: Mutex<Option<(String, u64)>>,
    last_failure: Mutex<Option<FailureEvent>>,
    heartbeats: Mutex<Option<tokio::sync::watch::Receiver<heartbeat::ServiceStats>>>,
    /// When the last failure began (its last sign of life): what
    /// `repair_ms` counts from.
    failed_at: Mutex<Option<Instant>>,
    /// The primary's ack round trips (log shipped → acknowledged).
    pub ack_rtt: AckRtt,
    health: Mutex<(bool, crate::health::OutputMode)>,
    /// 0: none.
    pub(crate) last_barrier_exit: AtomicU64,
    faults: AtomicU64,
    last_fault: Mutex<Option<FaultEvent>>,
    switchovers: AtomicU64,
    last_switchover: Mutex<Option<SwitchoverEvent>>,
    switch: Mutex<Option<SwitchHandler>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Board {
    pub fn new(name: impl Into<String>, role: Role) -> Board {
        Board {
            name: Mutex::new(name.into()),
            started: Instant::now(),
            role: Mutex::new(role),
            state: Mutex::new(String::new()),
            exit_index: AtomicU64::new(0),
            log_position: AtomicU64::new(0),
            acked_position: AtomicU64::new(0),
            released_position: AtomicU64::new(0),
            received: AtomicU64::new(0),
            divergences: AtomicU64::new(0),
            outputs_held: AtomicU64::new(0),
            outputs_held_bytes: AtomicU64::new(0),
            replay_lag_us: AtomicU64::new(u64::MAX),
            log_bytes: AtomicU64::new(0),
            log_wire_bytes: AtomicU64::new(0),
            peer_up: AtomicBool::new(false),
            peer_address: Mutex::new(None),
            arbiter: Mutex::new(None),
            last_failure: Mutex::new(None),
            heartbeats: Mutex::new(None),
            failed_at: Mutex::new(None),
            ack_rtt: AckRtt::default(),
            health: Mutex::new((true, crate::health::OutputMode::Fast)),
            last_barrier_exit: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            last_fault: Mutex::new(None),
            switchovers: AtomicU64::new(0),
            last_switchover: Mutex::new(None),
            switch: Mutex::new(None),
        }
    }

    /// The process goes on in a new role (a planned switchover's old
    /// primary becoming the secondary): the positions, counters and peer of
    /// the last session start over; its failures, faults and switchovers
    /// stay.
    pub fn start_over(&self, role: Role, state: impl Into<String>) {
        self.set_role(role);
        self.set_state(state);
        self.set_peer(false);
        for counter in [
            &self.log_position,
            &self.acked_position,
            &self.released_position,
            &self.received,
            &self.outputs_held,
            &self.outputs_held_bytes,
            &self.log_bytes,
            &self.log_wire_bytes,
            &self.last_barrier_exit,
        ] {
            counter.store(0, Ordering::SeqCst);
        }
        self.replay_lag_us.store(u64::MAX, Ordering::SeqCst);
        *lock(&self.heartbeats) = None;
    }

    /// Record a planned switchover this process took part in.
    pub fn switched(&self, event: SwitchoverEvent) {
        tracing::info!(became = event.became, exit = event.exit, pause_ms = event.pause_ms, "switchover");
        self.switchovers.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_switchover) = Some(event);
    }

    pub fn last_switchover(&self) -> Option<SwitchoverEvent> {
        lock(&self.last_switchover).clone()
    }

    /// Set (or clear) what answers `ftvm switchover`.
    pub fn set_switch_handler(&self, handler: Option<SwitchHandler>) {
        *lock(&self.switch) = handler;
    }

    /// `ftvm switchover`: run the primary session's switchover, or say why
    /// this process cannot.
    pub fn switchover(&self) -> Result<serde_json::Value, String> {
        let handler = lock(&self.switch).clone();
        match handler {
            Some(h) => h(),
            None => Err(match self.role() {
                Role::Secondary => "this copy is the secondary: run `ftvm switchover` on the primary".to_string(),
                Role::Standalone => {
                    "this copy runs unprotected (no secondary in sync): nothing to switch over to".to_string()
                }
                Role::Primary => format!("the primary is not running its guest ({})", lock(&self.state)),
            }),
        }
    }

    /// `--containment` and `--output-mode`, as the status shows them.
    pub fn set_health(&self, containment: bool, mode: crate::health::OutputMode) {
        *lock(&self.health) = (containment, mode);
    }

    /// The exit of the last barrier logged (primary) or received
    /// (secondary).
    pub fn set_last_barrier(&self, exit: u64) {
        self.last_barrier_exit.store(exit, Ordering::Relaxed);
    }

    /// Record a handled guest fault and log it as one structured event.
    pub fn fault(&self, event: FaultEvent) {
        tracing::warn!(
            source = event.source.as_str(),
            fault = %event.fault,
            action = event.action,
            escalated = event.escalated,
            reaction_ms = event.reaction_ms,
            recovery_ms = event.recovery_ms,
            outage_ms = event.outage_ms,
            "guest fault handled"
        );
        self.faults.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_fault) = Some(event);
    }

    pub fn last_fault(&self) -> Option<FaultEvent> {
        lock(&self.last_fault).clone()
    }

    /// The guest reached exit `exit` (for a process without a pair session,
    /// `ftvm run`, whose board only feeds the metrics endpoint).
    pub fn note_exit(&self, exit: u64) {
        self.exit_index.store(exit, Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        *lock(&self.role)
    }

    /// The guest's name, learnt late (a standby takes it from the
    /// transfer).
    pub fn set_name(&self, name: &str) {
        *lock(&self.name) = name.to_string();
    }

    pub fn set_role(&self, role: Role) {
        *lock(&self.role) = role;
    }

    pub fn set_state(&self, state: impl Into<String>) {
        *lock(&self.state) = state.into();
    }

    pub fn set_peer(&self, up: bool) {
        self.peer_up.store(up, Ordering::SeqCst);
    }

    pub fn set_peer_address(&self, address: impl Into<String>) {
        *lock(&self.peer_address) = Some(address.into());
    }

    pub fn set_arbiter(&self, spec: &str, generation: u64) {
        *lock(&self.arbiter) = Some((spec.to_string(), generation));
    }

    pub fn count_divergence(&self) {
        self.divergences.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn watch_heartbeats(&self, stats: tokio::sync::watch::Receiver<heartbeat::ServiceStats>) {
        *lock(&self.heartbeats) = Some(stats);
    }

    /// Record a failure and log it as one structured event.
    pub fn failure(&self, kind: &'static str, loss: &Loss, at: SystemTime) {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let (reaction, recovery) = (loss.reaction(), loss.decided.elapsed());
        let event = FailureEvent {
            kind,
            detected_by: loss.by,
            at: rfc3339(at),
            reaction_ms: ms(reaction),
            recovery_ms: ms(recovery),
            outage_ms: ms(reaction + recovery),
            repair_ms: None,
        };
        tracing::warn!(
            kind,
            detected_by = loss.by.as_str(),
            reaction_ms = event.reaction_ms,
            recovery_ms = event.recovery_ms,
            outage_ms = event.outage_ms,
            "failure handled"
        );
        *lock(&self.last_failure) = Some(event);
        *lock(&self.failed_at) = Some(loss.decided.checked_sub(reaction).unwrap_or(loss.decided));
    }

    /// Redundancy is back after the last failure (a new secondary holds
    /// the whole log): its `repair_ms`, failure → now.
    pub fn repaired(&self) -> Option<f64> {
        let since = lock(&self.failed_at).take()?;
        let ms = (since.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        if let Some(event) = lock(&self.last_failure).as_mut() {
            event.repair_ms = Some(ms);
        }
        tracing::info!(repair_ms = ms, "redundancy restored");
        Some(ms)
    }

    pub fn last_failure(&self) -> Option<FailureEvent> {
        lock(&self.last_failure).clone()
    }

    /// The status now.
    pub fn snapshot(&self) -> Status {
        let role = self.role();
        let log = self.log_position.load(Ordering::SeqCst);
        let acked = self.acked_position.load(Ordering::SeqCst);
        let received = self.received.load(Ordering::SeqCst);
        let (acked_position, lag) = match role {
            Role::Primary => (Some(acked), Some(log.saturating_sub(acked))),
            Role::Secondary => (Some(received), Some(received.saturating_sub(log))),
            Role::Standalone => (None, None),
        };
        let arbiter = lock(&self.arbiter).clone();
        let (containment, output_mode) = *lock(&self.health);
        Status {
            name: lock(&self.name).clone(),
            role,
            state: lock(&self.state).clone(),
            uptime_s: (self.started.elapsed().as_secs_f64() * 1e3).round() / 1e3,
            exit_index: self.exit_index.load(Ordering::SeqCst),
            log_position: log,
            acked_position,
            released_position: self.released_position.load(Ordering::SeqCst),
            replay_lag_records: lag,
            divergences: self.divergences.load(Ordering::SeqCst),
            outputs_held: self.outputs_held.load(Ordering::SeqCst),
            outputs_held_bytes: self.outputs_held_bytes.load(Ordering::SeqCst),
            replay_lag_ms: match (role, self.replay_lag_us.load(Ordering::SeqCst)) {
                (Role::Primary, us) if us != u64::MAX => Some(us as f64 / 1e3),
                _ => None,
            },
            log_bytes: self.log_bytes.load(Ordering::SeqCst),
            log_wire_bytes: self.log_wire_bytes.load(Ordering::SeqCst),
            peer: if self.peer_up.load(Ordering::SeqCst) { PeerState::Up } else { PeerState::Down },
            peer_address: lock(&self.peer_address).clone(),
            arbiter: arbiter.as_ref().map(|(spec, _)| spec.clone()),
            arbiter_generation: arbiter.map(|(_, g)| g),
            last_failure: self.last_failure(),
            heartbeats: lock(&self.heartbeats).as_ref().map(|w| HeartbeatCounts::from(*w.borrow())),
            containment,
            output_mode,
            last_barrier_exit: match self.last_barrier_exit.load(Ordering::Relaxed) {
                0 => None,
                e => Some(e),
            },
            faults: self.faults.load(Ordering::SeqCst),
            last_fault: self.last_fault(),
            switchovers: self.switchovers.load(Ordering::SeqCst),
            last_switchover: self.last_switchover(),
        }
    }
}

/// Upper bounds of the ack round-trip histogram's buckets, in seconds
/// (the last bucket, `+Inf`, is implied).
pub const ACK_RTT_BOUNDS: [f64; 14] =
    [50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0, 5.0];

/// Shipped positions not yet acknowledged kept at most for timing: past
/// it new sends are not timed until acks catch up (the memory stays
/// bounded when the secondary stalls).
const MAX_TIMED_SENDS: usize = 4096;

/// The primary's ack round trips: when each shipped batch's last position
/// left (handed to the logging channel) until the secondary's ack covered
/// it, as a fixed-bucket histogram.
#[derive(Default)]
pub struct AckRtt {
    sent: Mutex<VecDeque<(Instant, u64)>>,
    /// One count per bound of [`ACK_RTT_BOUNDS`], then `+Inf`.
    buckets: [AtomicU64; ACK_RTT_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

/// A copy of [`AckRtt`]'s histogram: per-bucket (not cumulative) counts.
#[derive(Clone, Debug, PartialEq)]
pub struct AckRttSnapshot {
    /// `(upper bound in seconds, count)`, the last bound `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    pub sum_s: f64,
    pub count: u64,
}

impl AckRtt {
    /// Positions up to `upto` were handed to the channel now.
    pub(crate) fn sent(&self, upto: u64, at: Instant) {
        let mut q = lock(&self.sent);
        if q.len() < MAX_TIMED_SENDS && q.back().is_none_or(|&(_, p)| p < upto) {
            q.push_back((at, upto));
        }
    }

    /// The secondary acknowledged positions up to `upto` now: one round
    /// trip observed, from the newest send it covers.
    pub(crate) fn acked(&self, upto: u64, at: Instant) {
        let mut newest = None;
        {
            let mut q = lock(&self.sent);
            while q.front().is_some_and(|&(_, p)| p <= upto) {
                newest = q.pop_front().map(|(t, _)| t);
            }
        }
        if let Some(t) = newest {
            self.observe(at.saturating_duration_since(t));
        }
    }

    fn observe(&self, rtt: Duration) {
        let s = rtt.as_secs_f64();
        let i = ACK_RTT_BOUNDS.iter().position(|&b| s <= b).unwrap_or(ACK_RTT_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> AckRttSnapshot {
        let bounds = ACK_RTT_BOUNDS.iter().copied().chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds.zip(&self.buckets).map(|(b, c)| (b, c.load(Ordering::Relaxed))).collect();
        // The count is the buckets' sum, so that the two always agree.
        let count = buckets.iter().map(|&(_, c)| c).sum();
        AckRttSnapshot { buckets, sum_s: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9, count }
    }
}

/// A lost peer: when it was last heard, when it was declared lost, and how.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    pub last_heard: Instant,
    pub decided: Instant,
    pub by: Detection,
}

impl Loss {
    pub fn reaction(&self) -> Duration {
        self.decided.saturating_duration_since(self.last_heard)
    }
}

/// A duration in milliseconds, rounded to the microsecond.
pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `at` as RFC 3339 UTC, to the millisecond.
pub fn rfc3339(at: SystemTime) -> String {
    let d = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_798_675_200_123);
        assert_eq!(rfc3339(t), "2026-12-31T00:00:00.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn fields_follow_the_role() {
        let b = Board::new("kv", Role::Primary);
        b.log_position.store(10, Ordering::SeqCst);
        b.acked_position.store(7, Ordering::SeqCst);
        let s = b.snapshot();
        assert_eq!((s.acked_position, s.replay_lag_records), (Some(7), Some(3)));
        b.set_role(Role::Standalone);
        let v = serde_json::to_value(b.snapshot()).unwrap();
        assert_eq!(v["role"], "standalone");
        assert!(v["acked_position"].is_null() && v["replay_lag_records"].is_null(), "{v}");
        assert_eq!(v["peer"], "down");
        assert_eq!(v["name"], "kv");
    }

    #[test]
    fn ack_rtt_times_from_the_newest_send_covered() {
        let rtt = AckRtt::default();
        let t0 = Instant::now();
        rtt.sent(5, t0);
        rtt.sent(9, t0 + Duration::from_micros(300));
        // An ack up to 7 covers the first send only.
        rtt.acked(7, t0 + Duration::from_micros(80));
        // An ack up to 9 covers the second: 2 ms after it left.
        rtt.acked(9, t0 + Duration::from_micros(2_300));
        // Nothing left to time.
        rtt.acked(12, t0 + Duration::from_secs(9));
        let s = rtt.snapshot();
        assert_eq!(s.count, 2);
        assert_eq!(s.buckets.len(), ACK_RTT_BOUNDS.len() + 1);
        let at = |bound: f64| s.buckets.iter().find(|&&(b, _)| b == bound).map(|&(_, c)| c);
        assert_eq!(at(100e-6), Some(1), "{s:?}");
        assert_eq!(at(2.5e-3), Some(1), "{s:?}");
        assert!((s.sum_s - 0.00208).abs() < 1e-9, "{s:?}");
        assert_eq!(s.buckets.last().map(|&(b, _)| b), Some(f64::INFINITY));
    }

    #[test]
    fn ack_rtt_memory_is_bounded() {
        let rtt = AckRtt::default();
        let t0 = Instant::now();
        for p in 1..=(MAX_TIMED_SENDS as u64 + 100) {
            rtt.sent(p, t0);
        }
        assert_eq!(lock(&rtt.sent).len(), MAX_TIMED_SENDS);
        rtt.acked(u64::MAX, t0 + Duration::from_secs(10));
        let s = rtt.snapshot();
        assert_eq!((s.count, s.buckets[ACK_RTT_BOUNDS.len()].1), (1, 1), "10 s falls in +Inf: {s:?}");
    }

    #[test]
    fn failure_times_rounded_to_microseconds() {
        let b = Board::new("kv", Role::Secondary);
        let now = Instant::now();
        let loss = Loss { last_heard: now - Duration::from_nanos(5_266_322_001), decided: now, by: Detection::Silence };
        b.failure("primary lost", &loss, SystemTime::now());
        let v = serde_json::to_value(b.snapshot()).unwrap();
        assert_eq!(v["last_failure"]["reaction_ms"], 5266.322);
        assert_eq!(v["last_failure"]["detected_by"], "heartbeat silence");
        assert!(v["last_failure"]["repair_ms"].is_null());
    }
}
