//! Heartbeats over UDP: a tokio task that sends this side's heartbeats
//! ([`SENDS_PER_INTERVAL`] per interval), receives and validates the peer's,
//! and keeps a [`Detector`] of the peer; a [`Service`] handle to ask it what
//! it knows.
//!
//! # Why more than one heartbeat per interval
//!
//! The peer is dead after `dead_after` intervals of silence. With one
//! datagram per interval, `dead_after` consecutive losses are enough for a
//! false alarm, and delay jitter makes fewer enough: at 10 % independent
//! loss and 5 ms ± 5 ms delay (the lossy-link experiment), 10 ms × 5 raises
//! a false "dead" in about one 60-s run in four (simulated). Sending every
//! half interval needs about nine consecutive losses instead (none in 400
//! simulated runs; about one in 40 000 by the arithmetic), for 100 more small
//! datagrams a second each way. The silence limit, and so the failover time,
//! do not change.
//!
//! # Addresses
//!
//! The socket is bound to the same address and port number as the logging
//! channel, over UDP (DESIGN "Failure detection and split brain"): the
//! secondary binds its `--listen` address. The peer's address is either
//! given ([`ServiceConfig::peer`], the primary's `--peer`) or, if `None`,
//! learnt from the source of the last accepted heartbeat: a secondary need
//! not know which port the primary sends from. Until a peer address is
//! known nothing is sent, so two services that both wait to learn never
//! meet. Heartbeats are accepted from any source address: what makes one
//! valid is its MAC, pair, role and freshness, not where it came from.
//!
//! # States and what the caller does with them
//!
//! [`Service::peer_state`] is the detector's answer at the moment of asking;
//! [`Service::watch`] changes only when the state changes kind (Unknown →
//! Up, Up → Dead, Dead → Up), and a Dead value carries the silence at the
//! moment the task decided, which is the reaction time (last sign of life →
//! decision). The task wakes at the detector's deadline and also looks at
//! the state on every datagram, so Dead is decided when the silence limit
//! passes, not at the next heartbeat tick, flood or no flood.
//!
//! A peer never heard from stays [`PeerState::Unknown`] for as long as it
//! stays silent; it never becomes Dead without having been Up. Whether a
//! peer that never appears is an error, and after how long, is the caller's
//! decision. Log traffic counts as life: the caller reports it with
//! [`Service::note_life`].
//!
//! # Proving heartbeats fresh
//!
//! Each side's heartbeats carry its receiver's challenge and echo the
//! peer's (see [`crate::detector`]). A heartbeat that is authentic but does
//! not echo this side's challenge (the first ones of a peer that has not
//! heard from this side yet, a restarted peer's, or one replayed from an
//! earlier run) is not life; the task answers it at once, to the address it
//! came from, with a heartbeat echoing its challenge, at most once per send
//! period for each incarnation (and [`MAX_ANSWERS_PER_PERIOD`] in all), so a
//! replay flood is answered one for one at worst and never amplified. A
//! real peer then proves itself with its next heartbeat. The peer's address
//! is learnt only from a proven heartbeat.
//!
//! # Errors on the way
//!
//! Send and receive errors (no route while the link is down, a full socket
//! buffer) do not stop the service: they are counted in [`ServiceStats`] and
//! logged at doubling intervals (1st, 2nd, 4th, 8th …), as are datagrams the
//! receiver refuses, so a flood of forged datagrams cannot flood the log.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::detector::{check_timing, Counters, Detector, DetectorError, PeerState, Receiver, Verdict};
use crate::detector::{DEFAULT_DEAD_AFTER, DEFAULT_INTERVAL, STALL};
use crate::message::{Challenge, HeartbeatKey, Incarnation, MessageError, PairId, Progress, Role, DATAGRAM_LEN};
use crate::sender::Sender;

/// Why the heartbeat service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The UDP socket could not be bound, or the socket given could not be
    /// used.
    #[error("cannot set up the heartbeat socket on UDP {local}")]
    Socket { local: SocketAddr, source: io::Error },
    /// There is no tokio runtime to run the service's task on.
    #[error("the heartbeat service must be started from within a tokio runtime")]
    NoRuntime,
    /// The interval or silence limit cannot work.
    #[error("invalid heartbeat timing")]
    Timing(#[source] DetectorError),
    /// The shared key cannot key heartbeats.
    #[error("cannot derive the heartbeat key")]
    Key(#[source] MessageError),
    /// No random incarnation could be had.
    #[error("the operating system's random source failed")]
    Random(#[source] getrandom::Error),
}

/// What the service needs to know.
#[derive(Debug, Clone, Copy)]
pub struct ServiceConfig {
    /// This side's role; heartbeats are accepted only from the other role.
    pub role: Role,
    /// The pair both sides serve.
    pub pair: PairId,
    /// The address to bind: the logging channel's address and port number.
    pub local: SocketAddr,
    /// Where to send heartbeats; `None` to learn it from the peer's.
    pub peer: Option<SocketAddr>,
    /// Heartbeat interval (`--heartbeat-ms`).
    pub interval: Duration,
    /// Intervals of silence after which the peer is dead (`--dead-after`);
    /// with `adaptive`, the limit until the link is measured.
    pub dead_after: u32,
    /// Set the silence limit from the heartbeats measured (see
    /// [`crate::detector`]), and send [`SENDS_PER_INTERVAL_ADAPTIVE`]
    /// heartbeats per interval: what `ftvm` does when `--dead-after` is not
    /// given.
    pub adaptive: bool,
}

impl ServiceConfig {
    /// A configuration with the default interval and silence limit.
    pub fn new(role: Role, pair: PairId, local: SocketAddr, peer: Option<SocketAddr>) -> ServiceConfig {
        ServiceConfig {
            role,
            pair,
            local,
            peer,
            interval: DEFAULT_INTERVAL,
            dead_after: DEFAULT_DEAD_AFTER,
            adaptive: false,
        }
    }
}

/// What the service has seen and done, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// What the receiver did with incoming datagrams.
    pub received: Counters,
    /// Heartbeats sent.
    pub sent: u64,
    /// Sends that failed.
    pub send_errors: u64,
    /// Receives that failed.
    pub receive_errors: u64,
    /// Unproven heartbeats answered with a heartbeat echoing their challenge
    /// (also counted in `sent`).
    pub answered: u64,
    /// The progress in the peer's last accepted heartbeat.
    pub peer_progress: Option<Progress>,
    /// The peer's current incarnation.
    pub peer_incarnation: Option<Incarnation>,
    /// Where heartbeats go: configured, or learnt from the peer.
    pub peer_addr: Option<SocketAddr>,
    /// The silence limit in force (adaptive: as last computed).
    pub silence_limit: Duration,
    /// Times this side's own timer fired more than [`crate::detector::STALL`]
    /// late: silences it did not blame on the peer.
    pub stalls: u64,
}

/// State shared between the task and the handle. Locks are taken one at a
/// time, never nested, except `detector` → the `state` channel's own lock.
#[derive(Debug)]
struct Shared {
    role: Role,
    detector: Mutex<Detector>,
    /// Changes only on a change of kind; see the module doc.
    state: watch::Sender<PeerState>,
    stats: watch::Sender<ServiceStats>,
    progress: Mutex<Progress>,
}

/// A lock that a panicking holder left behind still guards plain data that
/// is valid at every step, so it is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Record a sign of life at `now` and publish any change.
    fn heard(&self, now: Instant) {
        let mut detector = lock(&self.detector);
        detector.heard(now);
        self.publish(&detector, now);
    }

    /// A heartbeat at `now`, `missed` after the previous one; the silence
    /// limit in force after it.
    fn heartbeat(&self, now: Instant, missed: u64) -> Duration {
        let mut detector = lock(&self.detector);
        detector.heartbeat(now, missed);
        self.publish(&detector, now);
        detector.timeout()
    }

    /// This side's timer fired late: it did not run until `now`.
    fn excuse(&self, now: Instant) {
        lock(&self.detector).excuse(now);
        self.update_stats(|stats| stats.stalls = stats.stalls.saturating_add(1));
    }

    /// Look at the state at `now` and publish any change.
    fn check(&self, now: Instant) {
        self.publish(&lock(&self.detector), now);
    }

    /// Publish the state at `now` if it changed kind.
    fn publish(&self, detector: &Detector, now: Instant) {
        let next = detector.state(now);
        self.state.send_if_modified(|current| {
            if current.same_kind(&next) {
                return false;
            }
            match next {
                PeerState::Up if matches!(current, PeerState::Dead { .. }) => {
                    tracing::warn!(role = %self.role, "the peer declared dead is heard from again")
                }
                PeerState::Up => tracing::info!(role = %self.role, "the peer is up"),
                PeerState::Dead { since_last } => tracing::warn!(
                    role = %self.role,
                    silence_ms = since_last.as_secs_f64() * 1e3,
                    limit_ms = detector.timeout().as_secs_f64() * 1e3,
                    "the peer is dead"
                ),
                PeerState::Unknown => {}
            }
            *current = next;
            true
        });
    }

    /// When the task must wake to decide Dead: the detector's deadline, if
    /// it is still ahead (an Unknown or already Dead peer has none).
    fn deadline(&self, now: Instant) -> Option<Instant> {
        lock(&self.detector).deadline().filter(|deadline| *deadline > now)
    }

    fn update_stats(&self, update: impl FnOnce(&mut ServiceStats)) {
        self.stats.send_modify(update);
    }
}

/// The handle of a running heartbeat service. Dropping it stops the service.
#[derive(Debug)]
pub struct Service {
    shared: Arc<Shared>,
    local: SocketAddr,
    incarnation: Incarnation,
    stop: watch::Sender<bool>,
    finished: watch::Receiver<bool>,
}

impl Service {
    /// Bind `config.local` over UDP and start heartbeating, keyed with the
    /// pair's shared key `key` (at least 32 bytes). Must be called from
    /// within a tokio runtime, which runs the service's task.
    pub async fn start(config: ServiceConfig, key: &[u8]) -> Result<Service, ServiceError> {
        let socket = UdpSocket::bind(config.local)
            .await
            .map_err(|source| ServiceError::Socket { local: config.local, source })?;
        Service::with_socket(socket, config, key)
    }

    /// Start on a socket the caller bound (its address is used, not
    /// `config.local`), for a caller that needs socket options of its own
    /// or the port number before the peer is started. Must be called from
    /// within a tokio runtime ([`ServiceError::NoRuntime`] otherwise).
    pub fn from_std(socket: std::net::UdpSocket, config: ServiceConfig, key: &[u8]) -> Result<Service, ServiceError> {
        tokio::runtime::Handle::try_current().map_err(|_| ServiceError::NoRuntime)?;
        let local = socket.local_addr().unwrap_or(config.local);
        socket.set_nonblocking(true).map_err(|source| ServiceError::Socket { local, source })?;
        let socket = UdpSocket::from_std(socket).map_err(|source| ServiceError::Socket { local, source })?;
        Service::with_socket(socket, config, key)
    }

    fn with_socket(socket: UdpSocket, config: ServiceConfig, key: &[u8]) -> Result<Service, ServiceError> {
        check_timing(config.interval, config.dead_after).map_err(ServiceError::Timing)?;
        let key = HeartbeatKey::derive(key).map_err(ServiceError::Key)?;
        let incarnation = Incarnation::random().map_err(ServiceError::Random)?;
        let challenge = Challenge::random().map_err(ServiceError::Random)?;
        let local = socket.local_addr().map_err(|source| ServiceError::Socket { local: config.local, source })?;
        let detector = if config.adaptive {
            let ceiling = config.interval.checked_mul(ADAPTIVE_CEILING_INTERVALS).unwrap_or(Duration::MAX);
            Detector::adaptive(config.interval, config.dead_after, ceiling)
        } else {
            Detector::new(config.interval, config.dead_after)
        };
        let silence_limit = detector.timeout();
        let sends = if config.adaptive { SENDS_PER_INTERVAL_ADAPTIVE } else { SENDS_PER_INTERVAL };
        let shared = Arc::new(Shared {
            role: config.role,
            detector: Mutex::new(detector),
            state: watch::Sender::new(PeerState::Unknown),
            stats: watch::Sender::new(ServiceStats {
                peer_addr: config.peer,
                silence_limit,
                ..ServiceStats::default()
            }),
            progress: Mutex::new(Progress::default()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let (finished_tx, finished) = watch::channel(false);
        let task = Task {
            socket,
            shared: shared.clone(),
            sender: Sender::new(key.clone(), config.role, config.pair, incarnation),
            receiver: Receiver::new(key, config.pair, config.role.peer(), challenge),
            fixed_peer: config.peer,
            learnt_peer: None,
            answers: Answers::default(),
            period: config.interval.checked_div(sends).unwrap_or(config.interval).max(Duration::from_micros(500)),
            last_seq: None,
        };
        tracing::info!(
            role = %config.role, %local, peer = ?config.peer, %incarnation,
            interval_ms = config.interval.as_secs_f64() * 1e3, dead_after = config.dead_after,
            adaptive = config.adaptive, "heartbeats started"
        );
        tokio::spawn(async move {
            task.run(stop_rx).await;
            // Nobody waiting for the end is fine.
            let _ = finished_tx.send(true);
        });
        Ok(Service { shared, local, incarnation, stop, finished })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// This process's incarnation, as its heartbeats carry it.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// What the detector thinks of the peer now.
    pub fn peer_state(&self) -> PeerState {
        lock(&self.shared.detector).state(Instant::now())
    }

    /// A receiver that sees each change of the peer's state (see the module
    /// doc for what a change is).
    pub fn watch(&self) -> watch::Receiver<PeerState> {
        self.shared.state.subscribe()
    }

    /// The last sign of life from the peer.
    pub fn last_heard(&self) -> Option<Instant> {
        lock(&self.shared.detector).last_heard()
    }

    /// The silence after which the peer is dead.
    pub fn timeout(&self) -> Duration {
        lock(&self.shared.detector).timeout()
    }

    /// Report a sign of life other than a heartbeat: an authenticated frame
    /// from the peer on the logging channel. Callable from any thread.
    pub fn note_life(&self) {
        self.shared.heard(Instant::now());
    }

    /// What this side's next heartbeats say about where it is.
    pub fn set_progress(&self, exit_index: u64, log_position: u64) {
        *lock(&self.shared.progress) = Progress { exit_index, log_position };
    }

    /// Counters and what is known of the peer.
    pub fn stats(&self) -> ServiceStats {
        *self.shared.stats.borrow()
    }

    /// The receiver's counters: accepted, forged, replayed, foreign, malformed.
    pub fn counters(&self) -> Counters {
        self.stats().received
    }

    /// A receiver that sees [`ServiceStats`] change (each datagram received
    /// or sent changes it).
    pub fn watch_stats(&self) -> watch::Receiver<ServiceStats> {
        self.shared.stats.subscribe()
    }

    /// Stop sending and receiving. Returns at once; the task closes the
    /// socket as it ends ([`Service::stopped`] waits for that). After it,
    /// [`Service::watch`] no longer changes, while [`Service::peer_state`]
    /// still answers from the last sign of life (so turns Dead once the
    /// silence limit has passed, as nothing is received any more).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Wait until the task has ended and the socket is closed (after
    /// [`Service::stop`], or if the runtime is shutting down).
    pub async fn stopped(&self) {
        let mut finished = self.finished.clone();
        // An error means the task was dropped without finishing (runtime
        // shut down): it is not running either way.
        let _ = finished.wait_for(|finished| *finished).await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The service's task: owns the socket, the sender and the receiver.
struct Task {
    socket: UdpSocket,
    shared: Arc<Shared>,
    sender: Sender,
    receiver: Receiver,
    fixed_peer: Option<SocketAddr>,
    learnt_peer: Option<SocketAddr>,
    /// Which unproven incarnations were answered lately.
    answers: Answers,
    /// The send period: the interval / [`SENDS_PER_INTERVAL`] (or
    /// [`SENDS_PER_INTERVAL_ADAPTIVE`]).
    period: Duration,
    /// The incarnation and sequence number of the last heartbeat accepted:
    /// how many the next one missed.
    last_seq: Option<(Incarnation, u64)>,
}

/// Unproven heartbeats answered in one send period, at most.
pub const MAX_ANSWERS_PER_PERIOD: u32 = 16;
/// Incarnations whose last answer is remembered.
const ANSWERED_INCARNATIONS: usize = 16;

/// The rate limit on answers to unproven heartbeats: one per incarnation
/// per period, [`MAX_ANSWERS_PER_PERIOD`] in all per period.
#[derive(Debug, Default)]
struct Answers {
    /// Recently answered incarnations and when, oldest first.
    recent: VecDeque<(Incarnation, Instant)>,
    /// The current period's start and the answers sent in it.
    window: Option<(Instant, u32)>,
}

impl Answers {
    /// Whether to answer `incarnation` at `now`; if so, it is counted.
    fn allow(&mut self, incarnation: Incarnation, now: Instant, period: Duration) -> bool {
        let within = |at: Instant| now.saturating_duration_since(at) < period;
        if self.recent.iter().any(|(seen, at)| *seen == incarnation && within(*at)) {
            return false;
        }
        let (start, count) = match self.window {
            Some((start, count)) if within(start) => (start, count),
            _ => (now, 0),
        };
        if count >= MAX_ANSWERS_PER_PERIOD {
            return false;
        }
        self.window = Some((start, count.saturating_add(1)));
        self.recent.retain(|(seen, _)| *seen != incarnation);
        if self.recent.len() >= ANSWERED_INCARNATIONS {
            self.recent.pop_front();
        }
        self.recent.push_back((incarnation, now));
        true
    }
}

/// Heartbeats sent per interval (`--heartbeat-ms`): the send period is the
/// interval divided by this. See the module documentation for why.
pub const SENDS_PER_INTERVAL: u32 = 2;
/// The same with the adaptive limit: a shorter period makes a shorter limit
/// for the same number of losses allowed for (2.5 ms at the default 10-ms
/// interval: 400 datagrams of 118 bytes a second each way).
pub const SENDS_PER_INTERVAL_ADAPTIVE: u32 = 4;
/// The adaptive limit's ceiling, in intervals (200 ms by default): past
/// that the link is too bad for a silence to mean anything but death.
pub const ADAPTIVE_CEILING_INTERVALS: u32 = 20;

/// Whether the `count`th event of a kind is logged: the 1st, 2nd, 4th, 8th …
fn worth_logging(count: u64) -> bool {
    count.is_power_of_two()
}

impl Task {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // One byte more than a heartbeat, so a longer datagram (truncated to
        // the buffer by recv) shows as too long rather than as a heartbeat.
        let mut buffer = [0u8; DATAGRAM_LEN + 1];
        let mut next_send = Instant::now();
        // After a receive error, receiving waits for the next timer wake: a
        // socket error that repeats must not spin this task.
        let mut receive_paused = false;
        while !*stop.borrow_and_update() {
            // Decide first, on every turn of the loop, not only when the
            // timer fires: when datagrams keep arriving (a flood of forged
            // ones, say) the turn that finds the deadline passed may be a
            // receive, and the deadline below is then behind, not ahead.
            let now = Instant::now();
            self.shared.check(now);
            let wake = match self.shared.deadline(now) {
                Some(deadline) if deadline < next_send => deadline,
                _ => next_send,
            };
            tokio::select! {
                biased;
                _ = stop.changed() => {}
                () = tokio::time::sleep_until(wake.into()) => {
                    receive_paused = false;
                    let now = Instant::now();
                    // Late by more than a stall: this side did not run, and
                    // the silence meanwhile is not the peer's. The
                    // datagrams that came meanwhile are read next.
                    if now.saturating_duration_since(wake) > STALL {
                        self.shared.excuse(now);
                    }
                    if now >= next_send {
                        self.send().await;
                        next_send = next_tick(next_send, self.period, Instant::now());
                    }
                    // The state is looked at at the top of the loop.
                }
                received = self.socket.recv_from(&mut buffer), if !receive_paused => match received {
                    Ok((len, from)) => self.received(buffer.get(..len).unwrap_or(&buffer), from),
                    Err(error) => {
                        receive_paused = true;
                        let mut count = 0;
                        self.shared.update_stats(|stats| {
                            stats.receive_errors = stats.receive_errors.saturating_add(1);
                            count = stats.receive_errors;
                        });
                        if worth_logging(count) {
                            tracing::warn!(role = %self.shared.role, %error, count, "cannot receive heartbeats");
                        }
                    }
                },
            }
        }
        tracing::info!(role = %self.shared.role, "heartbeats stopped");
    }

    fn peer(&self) -> Option<SocketAddr> {
        self.fixed_peer.or(self.learnt_peer)
    }

    async fn send(&mut self) {
        let Some(peer) = self.peer() else { return };
        let progress = *lock(&self.shared.progress);
        let datagram = self.sender.next(progress, self.receiver.challenge(), self.receiver.echo());
        match self.socket.send_to(&datagram, peer).await {
            Ok(_) => self.shared.update_stats(|stats| stats.sent = stats.sent.saturating_add(1)),
            Err(error) => {
                let count = self.count_send_error();
                if worth_logging(count) {
                    tracing::warn!(role = %self.shared.role, %peer, %error, count, "cannot send heartbeats");
                }
            }
        }
    }

    /// Count a send that failed; the count so far.
    fn count_send_error(&self) -> u64 {
        let mut count = 0;
        self.shared.update_stats(|stats| {
            stats.send_errors = stats.send_errors.saturating_add(1);
            count = stats.send_errors;
        });
        count
    }

    fn received(&mut self, datagram: &[u8], from: SocketAddr) {
        let verdict = self.receiver.receive(datagram);
        let counters = self.receiver.counters();
        if let Verdict::Accepted(heartbeat) = &verdict {
            // Life first: the stats watchers may look at the state.
            let missed = match self.last_seq.replace((heartbeat.incarnation, heartbeat.seq)) {
                Some((incarnation, seq)) if incarnation == heartbeat.incarnation => {
                    heartbeat.seq.saturating_sub(seq).saturating_sub(1)
                }
                _ => 0,
            };
            let silence_limit = self.shared.heartbeat(Instant::now(), missed);
            if self.fixed_peer.is_none() && self.learnt_peer != Some(from) {
                tracing::info!(role = %self.shared.role, peer = %from, "heartbeats go to the peer's address");
                self.learnt_peer = Some(from);
            }
            let peer_addr = self.peer();
            self.shared.update_stats(|stats| {
                stats.received = counters;
                stats.peer_progress = Some(heartbeat.progress);
                stats.peer_incarnation = Some(heartbeat.incarnation);
                stats.peer_addr = peer_addr;
                stats.silence_limit = silence_limit;
            });
            return;
        }
        self.shared.update_stats(|stats| stats.received = counters);
        let role = self.shared.role;
        match verdict {
            Verdict::Accepted(_) => {}
            Verdict::Unproven { incarnation, seq, challenge } => {
                if worth_logging(counters.unproven) {
                    tracing::info!(%role, %from, %incarnation, seq, count = counters.unproven,
                        "a heartbeat not proven fresh: answered with a challenge, not believed")
                }
                self.answer(from, incarnation, challenge);
            }
            Verdict::Forged if worth_logging(counters.forged) => {
                tracing::warn!(%role, %from, count = counters.forged, "ignored a heartbeat with a wrong MAC")
            }
            Verdict::Replayed { incarnation, seq, newest } if worth_logging(counters.replayed) => {
                // Reordering on the link causes these too: debug, not warn.
                tracing::debug!(%role, %from, %incarnation, seq, ?newest, count = counters.replayed,
                    "ignored a heartbeat that is not new")
            }
            Verdict::Foreign { pair, role: sender } if worth_logging(counters.foreign) => tracing::warn!(
                %role, %from, ?pair, %sender, count = counters.foreign,
                "ignored a heartbeat of another pair or of this side's own role"
            ),
            Verdict::Malformed(error) if worth_logging(counters.malformed) => {
                tracing::warn!(%role, %from, %error, count = counters.malformed, "ignored a datagram")
            }
            _ => {}
        }
    }
}

impl Task {
    /// Answer an unproven heartbeat of `incarnation` from `to` with one
    /// that echoes its `challenge`, unless the rate limit says no. Never
    /// waits: a full socket buffer counts as a send error.
    fn answer(&mut self, to: SocketAddr, incarnation: Incarnation, challenge: Challenge) {
        if !self.answers.allow(incarnation, Instant::now(), self.period) {
            return;
        }
        let progress = *lock(&self.shared.progress);
        let datagram = self.sender.next(progress, self.receiver.challenge(), challenge);
        match self.socket.try_send_to(&datagram, to) {
            Ok(_) => self.shared.update_stats(|stats| {
                stats.sent = stats.sent.saturating_add(1);
                stats.answered = stats.answered.saturating_add(1);
            }),
            Err(error) => {
                let count = self.count_send_error();
                if worth_logging(count) {
                    tracing::warn!(role = %self.shared.role, %to, %error, count, "cannot answer a heartbeat");
                }
            }
        }
    }
}

/// The send time after `previous`: one period on, or one period from `now`
/// if the task fell behind (a stalled host sends one heartbeat when it
/// resumes, not a burst of the ones it missed).
fn next_tick(previous: Instant, interval: Duration, now: Instant) -> Instant {
    match previous.checked_add(interval) {
        Some(next) if next > now => next,
        _ => now.checked_add(interval).unwrap_or(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_do_not_burst_after_a_stall() {
        let t0 = Instant::now();
        let ms = Duration::from_millis(1);
        assert_eq!(next_tick(t0, 10 * ms, t0 + 3 * ms), t0 + 10 * ms);
        assert_eq!(next_tick(t0, 10 * ms, t0 + 35 * ms), t0 + 45 * ms);
    }

    fn config(socket: &std::net::UdpSocket) -> ServiceConfig {
        ServiceConfig::new(Role::Primary, PairId([0; 32]), socket.local_addr().unwrap(), None)
    }

    #[test]
    fn outside_a_runtime_is_an_error_not_a_panic() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let error = Service::from_std(socket.try_clone().unwrap(), config(&socket), &[0; 32]).unwrap_err();
        assert!(matches!(error, ServiceError::NoRuntime), "{error:?}");
    }

    #[tokio::test]
    async fn bad_settings_are_refused_before_anything_runs() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let short_key = Service::from_std(socket.try_clone().unwrap(), config(&socket), &[0; 31]).unwrap_err();
        assert!(matches!(short_key, ServiceError::Key(MessageError::KeyTooShort { len: 31 })), "{short_key:?}");
        let no_limit = ServiceConfig { dead_after: 0, ..config(&socket) };
        let error = Service::from_std(socket.try_clone().unwrap(), no_limit, &[0; 32]).unwrap_err();
        assert!(matches!(error, ServiceError::Timing(DetectorError::ZeroDeadAfter)), "{error:?}");
        // Binding an address in use names it.
        let taken = socket.local_addr().unwrap();
        let error = Service::start(config(&socket), &[0; 32]).await.unwrap_err();
        assert!(error.to_string().contains(&taken.to_string()), "{error}");
    }

    #[test]
    fn answers_are_limited_per_incarnation_and_per_period() {
        let t0 = Instant::now();
        let period = Duration::from_millis(5);
        let mut answers = Answers::default();
        assert!(answers.allow(Incarnation(1), t0, period));
        assert!(!answers.allow(Incarnation(1), t0 + Duration::from_millis(1), period));
        assert!(answers.allow(Incarnation(2), t0 + Duration::from_millis(1), period));
        assert!(answers.allow(Incarnation(1), t0 + period, period));
        // A flood of incarnations gets MAX_ANSWERS_PER_PERIOD in a period.
        let t1 = t0 + 10 * period;
        let allowed = (100..200u64).filter(|i| answers.allow(Incarnation(*i), t1, period)).count();
        assert_eq!(allowed, MAX_ANSWERS_PER_PERIOD as usize);
        assert!(answers.allow(Incarnation(500), t1 + period, period));
    }

    #[test]
    fn only_doubling_counts_are_logged() {
        let logged: Vec<u64> = (1..=100).filter(|n| worth_logging(*n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64]);
    }
}
