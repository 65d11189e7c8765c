//! The failure detector and the heartbeat receiver: pure logic, no sockets,
//! no sleeping, no clock of its own. Every method that depends on time takes
//! `now`, so tests drive it with simulated loss, delay, jitter and
//! reordering, and the service feeds it real `Instant`s.
//!
//! # When a peer is dead
//!
//! A [`Detector`] remembers the last sign of life: a heartbeat the
//! [`Receiver`] accepted, or log traffic (the caller reports that too, with
//! [`Detector::heard`]). The peer is [`PeerState::Dead`] once
//! `dead_after × interval` has passed without one (defaults
//! [`DEFAULT_DEAD_AFTER`] × [`DEFAULT_INTERVAL`], 50 ms). A peer never heard
//! from is [`PeerState::Unknown`], and stays Unknown however long the
//! silence: the detector cannot tell a peer that died from one that has not
//! started yet, so what a never-seen peer means (wait, give up after a
//! start-up timeout) is the caller's decision. The state is not latched: a
//! Dead peer heard again is Up again; acting on Dead (the arbiter) is the
//! caller's and is not undone by this.
//!
//! The reaction time the caller measures is [`Detector::last_heard`] → the
//! moment it saw Dead; it is at least the silence limit and, with the
//! service's timer, at most that plus scheduling delay.
//!
//! # An adaptive silence limit
//!
//! [`Detector::adaptive`] sets the limit from the heartbeats it measures
//! instead (the default when `--dead-after` is not given). It keeps the last
//! [`WINDOW`] heartbeats' inter-arrival gaps and how many heartbeats each
//! gap missed (from the sequence numbers), and from them estimates the
//! send period (gaps over the sends they span), the loss rate `p` (missed
//! over sent, counting one more loss than seen, so it is never 0), and the
//! jitter `J` (the largest deviation of a gap from its whole number of
//! periods). The limit is then `(k + 1) × period + J + period / 2`, where
//! `k` is the smallest run of consecutive losses with probability under
//! [`FALSE_ALARM`] (`p^k`): on a quiet link (`p` ≈ 1/2000, `J` ≈ 1 ms, a
//! 2.5-ms period) that is 13–15 ms; at 10 % loss and 5 ms ± 5 ms delay,
//! 60–85 ms (the jitter reorders the heartbeats, and one overtaken by a
//! later one counts as lost too). The limit rises at once when a gap
//! deviates more than any before, and is recomputed every 32 heartbeats,
//! within [`ADAPTIVE_FLOOR`] … `ceiling`; until [`MIN_SAMPLES`] heartbeats
//! are in, it is the fixed one (`dead_after × interval`).
//!
//! # This side's own stalls
//!
//! A silence that this side could not have heard (its own thread did not
//! run: a host that stalls its VMs, a starved process) is not the peer's:
//! the service calls [`Detector::excuse`] when its timer fires late by more
//! than [`STALL`], and the silence then counts from that moment, and the gap
//! across it is no sample of the link. On a host whose VMs stall for 50–190
//! ms at times, both sides of a pair stall together and neither blames the
//! other.
//!
//! # What counts as a heartbeat
//!
//! The [`Receiver`] accepts a datagram only if it decodes and its MAC is
//! right ([`crate::message`]), it comes from this pair and from the peer's
//! role, it is proven fresh, and its (incarnation, sequence number) is new:
//! a strictly greater sequence number than any accepted for the same
//! incarnation. Everything else is ignored and counted ([`Counters`]): a
//! replayed or reordered-older heartbeat never counts as life, so an
//! attacker on the link who records heartbeats cannot keep a dead peer
//! alive by playing them back.
//!
//! # Fresh, and a restart believed only once proven
//!
//! The receiver holds a [`Challenge`], random when it starts, which this
//! side's heartbeats carry; the peer echoes the latest one it saw. A
//! heartbeat is proven fresh when it echoes the receiver's current
//! challenge, or, from the incarnation the receiver follows, the challenge
//! it was believed with (it may not have seen the next one yet). A
//! heartbeat recorded before the receiver started cannot echo a challenge
//! drawn after it was sent, and nobody without the key can make one that
//! does.
//!
//! A heartbeat that is authentic but not proven fresh is
//! [`Verdict::Unproven`]: not life, and nothing changes, whatever incarnation
//! it claims; the caller answers it with a heartbeat echoing the stranger's
//! challenge (so a peer that really restarted can prove itself: its next
//! heartbeat echoes this side's challenge) and the current incarnation stays
//! in force until then. When a new incarnation is proven, the receiver
//! retires the old one and moves to the next challenge
//! ([`HeartbeatKey::next_challenge`]), so heartbeats of any other
//! incarnation made before (which can echo only the old challenge) are
//! refused too; it still remembers the last [`RETIRED_INCARNATIONS`]
//! incarnations it moved on from, as a second guard.
//!
//! So one datagram replayed from an earlier run of the pair (the same key
//! and pair) is at worst answered once; it never retires the live peer's
//! incarnation, and the live peer's heartbeats go on counting.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::message::{Challenge, Heartbeat, HeartbeatKey, Incarnation, MessageError, PairId, Role};

/// The default heartbeat interval (`--heartbeat-ms 10`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// The default number of intervals of silence after which the peer is dead
/// (`--dead-after 5`).
pub const DEFAULT_DEAD_AFTER: u32 = 5;
/// How many earlier incarnations of the peer the receiver refuses.
pub const RETIRED_INCARNATIONS: usize = 16;
/// Heartbeat gaps the adaptive limit is computed from.
pub const WINDOW: usize = 2048;
/// Heartbeats measured before the adaptive limit replaces the fixed one.
pub const MIN_SAMPLES: usize = 64;
/// The adaptive limit's floor.
pub const ADAPTIVE_FLOOR: Duration = Duration::from_millis(5);
/// The probability, per heartbeat, of a false alarm from losses that the
/// adaptive limit allows for.
pub const FALSE_ALARM: f64 = 1e-9;
/// A timer that fires this late means this side itself did not run.
pub const STALL: Duration = Duration::from_millis(5);
/// How often (in heartbeats) the adaptive limit is recomputed in full.
const RECOMPUTE_EVERY: u32 = 32;

/// A heartbeat interval and silence limit that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DetectorError {
    /// `--heartbeat-ms 0`: heartbeats would be sent without pause.
    #[error("the heartbeat interval must be at least 1 ms")]
    ZeroInterval,
    /// `--dead-after 0`: the peer would be dead as soon as it was heard.
    #[error("--dead-after must be at least 1 interval")]
    ZeroDeadAfter,
    /// `dead_after × interval` does not fit in a `Duration`.
    #[error("{dead_after} × {interval:?} is too long a silence limit")]
    TooLong { interval: Duration, dead_after: u32 },
}

/// Check a heartbeat interval and silence limit and return the silence after
/// which the peer is dead, `dead_after × interval`. The command line calls
/// it to refuse a bad `--heartbeat-ms`/`--dead-after` as bad usage.
pub fn check_timing(interval: Duration, dead_after: u32) -> Result<Duration, DetectorError> {
    if interval < Duration::from_millis(1) {
        return Err(DetectorError::ZeroInterval);
    }
    if dead_after == 0 {
        return Err(DetectorError::ZeroDeadAfter);
    }
    interval.checked_mul(dead_after).ok_or(DetectorError::TooLong { interval, dead_after })
}

/// What the detector thinks of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Never heard from: not started yet, or dead before it ever spoke.
    Unknown,
    /// Heard from within the silence limit.
    Up,
    /// Silent for `since_last` (at least the silence limit).
    Dead {
        /// Time since the last sign of life, when the state was taken.
        since_last: Duration,
    },
}

impl PeerState {
    /// Whether two states are the same kind (Dead states with different
    /// silences are the same kind): what a state *change* is.
    pub fn same_kind(&self, other: &PeerState) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// Decides whether the peer is alive from when it was last heard.
#[derive(Debug, Clone)]
pub struct Detector {
    interval: Duration,
    dead_after: u32,
    timeout: Duration,
    last_heard: Option<Instant>,
    /// This side did not run until then: silence counts from there.
    excused: Option<Instant>,
    adaptive: Option<Adaptive>,
}

/// What the adaptive limit is computed from.
#[derive(Debug, Clone)]
struct Adaptive {
    /// (gap, heartbeats it missed), newest last.
    samples: VecDeque<(Duration, u64)>,
    last_beat: Option<Instant>,
    since_recompute: u32,
    /// The period and jitter of the last recomputation.
    period: Duration,
    jitter: Duration,
    ceiling: Duration,
}

impl Detector {
    /// A detector that declares the peer dead after `dead_after × interval`
    /// of silence. Values [`check_timing`] refuses are raised to the nearest
    /// that work (1 ms, 1 interval, the longest `Duration`) rather than
    /// panic; the command line refuses them before they get here.
    pub fn new(interval: Duration, dead_after: u32) -> Detector {
        let interval = interval.max(Duration::from_millis(1));
        let dead_after = dead_after.max(1);
        let timeout = interval.checked_mul(dead_after).unwrap_or(Duration::MAX);
        Detector { interval, dead_after, timeout, last_heard: None, excused: None, adaptive: None }
    }

    /// A detector whose silence limit adapts to the heartbeats it measures
    /// (see the module doc): `dead_after × interval` until it has measured
    /// enough, then between [`ADAPTIVE_FLOOR`] and `ceiling`.
    pub fn adaptive(interval: Duration, dead_after: u32, ceiling: Duration) -> Detector {
        let mut detector = Detector::new(interval, dead_after);
        let ceiling = ceiling.max(ADAPTIVE_FLOOR);
        detector.timeout = detector.timeout.min(ceiling);
        detector.adaptive = Some(Adaptive {
            samples: VecDeque::with_capacity(WINDOW),
            last_beat: None,
            since_recompute: 0,
            period: Duration::ZERO,
            jitter: Duration::ZERO,
            ceiling,
        });
        detector
    }

    /// Whether the limit adapts.
    pub fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    /// A heartbeat arrived at `now`, `missed` heartbeats after the previous
    /// one it accepted (the sequence numbers' gap less one; 0 if unknown):
    /// a sign of life and, when adaptive, a sample of the link.
    pub fn heartbeat(&mut self, now: Instant, missed: u64) {
        self.heard(now);
        let Some(a) = &mut self.adaptive else { return };
        let previous = a.last_beat.replace(now);
        let Some(gap) = previous.and_then(|p| now.checked_duration_since(p)) else { return };
        // A gap across this side's own stall is no sample of the link.
        if self.excused.is_some_and(|e| previous.is_some_and(|p| e > p)) {
            return;
        }
        if a.samples.len() >= WINDOW {
            a.samples.pop_front();
        }
        let missed = missed.min(1000);
        a.samples.push_back((gap, missed));
        a.since_recompute = a.since_recompute.saturating_add(1);
        let deviation = deviation(gap, missed, a.period);
        if a.samples.len() >= MIN_SAMPLES && (a.since_recompute >= RECOMPUTE_EVERY || deviation > a.jitter) {
            self.timeout = a.recompute();
        }
    }

    /// This side did not run until `now` (its timer fired late): the
    /// silence before does not count against the peer.
    pub fn excuse(&mut self, now: Instant) {
        if self.excused.is_none_or(|e| now > e) {
            self.excused = Some(now);
        }
    }

    /// When the adaptive limit was last computed: the estimated send
    /// period and jitter (zero while not adaptive or not measured yet).
    pub fn estimates(&self) -> (Duration, Duration) {
        self.adaptive.as_ref().map_or((Duration::ZERO, Duration::ZERO), |a| (a.period, a.jitter))
    }

    /// Where silence counts from: the last sign of life, or the end of this
    /// side's own stall if later.
    fn silence_from(&self) -> Option<Instant> {
        self.last_heard.map(|last| self.excused.map_or(last, |e| e.max(last)))
    }

    /// The heartbeat interval.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many intervals of silence make the peer dead.
    pub fn dead_after(&self) -> u32 {
        self.dead_after
    }

    /// The silence after which the peer is dead: `dead_after × interval`.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A sign of life at `now`: an accepted heartbeat or log traffic. A
    /// `now` earlier than one already reported (callers on several threads)
    /// does not move the last sign of life back.
    pub fn heard(&mut self, now: Instant) {
        if self.last_heard.is_none_or(|last| now > last) {
            self.last_heard = Some(now);
        }
    }

    /// The last sign of life, if there was one.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// The first instant at which the peer is dead if nothing is heard
    /// before: just past the last sign of life plus the timeout. `None`
    /// while the peer is Unknown (it never turns Dead from Unknown) or if
    /// that instant is not representable.
    pub fn deadline(&self) -> Option<Instant> {
        self.silence_from().and_then(|last| last.checked_add(self.timeout)?.checked_add(Duration::from_nanos(1)))
    }

    /// The peer's state at `now`: Dead once the silence is longer than the
    /// timeout. A silence of exactly the timeout is still Up, so a gap of
    /// `dead_after - 1` lost heartbeats between one that came 5 ms early
    /// and one that came 5 ms late (a 10 ms interval with ±5 ms jitter) is
    /// tolerated, not declared dead on the boundary.
    pub fn state(&self, now: Instant) -> PeerState {
        match (self.last_heard, self.silence_from()) {
            (Some(last), Some(from)) => {
                let since_last = now.saturating_duration_since(last);
                if now.saturating_duration_since(from) > self.timeout {
                    PeerState::Dead { since_last }
                } else {
                    PeerState::Up
                }
            }
            _ => PeerState::Unknown,
        }
    }
}

/// How far `gap` is from `missed + 1` whole periods.
fn deviation(gap: Duration, missed: u64, period: Duration) -> Duration {
    let expected = period.saturating_mul(u32::try_from(missed.saturating_add(1)).unwrap_or(u32::MAX));
    gap.abs_diff(expected)
}

impl Adaptive {
    /// The limit from the samples (at least [`MIN_SAMPLES`] of them).
    fn recompute(&mut self) -> Duration {
        self.since_recompute = 0;
        let sent: u64 = self.samples.iter().map(|&(_, m)| m.saturating_add(1)).sum();
        let lost: u64 = self.samples.iter().map(|&(_, m)| m).sum();
        let total: Duration = self.samples.iter().map(|&(g, _)| g).sum();
        self.period = total.checked_div(u32::try_from(sent.max(1)).unwrap_or(u32::MAX)).unwrap_or(total);
        self.jitter = self.samples.iter().map(|&(g, m)| deviation(g, m, self.period)).max().unwrap_or_default();
        // One more loss than seen: never 0, and cautious on few samples.
        let p = (lost as f64 + 1.0) / (sent as f64 + 1.0);
        let k = (FALSE_ALARM.ln() / p.ln()).ceil().clamp(1.0, 64.0);
        let periods = Duration::try_from_secs_f64(self.period.as_secs_f64() * (k + 1.5)).unwrap_or(self.ceiling);
        periods.saturating_add(self.jitter).clamp(ADAPTIVE_FLOOR, self.ceiling)
    }
}

/// What the receiver did with datagrams, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Valid, new heartbeats from the peer: signs of life.
    pub accepted: u64,
    /// Heartbeats whose MAC was wrong: forged, damaged or another key.
    pub forged: u64,
    /// Valid heartbeats that were not new: replayed, duplicated, overtaken
    /// by a later one, or from a retired incarnation.
    pub replayed: u64,
    /// Valid heartbeats for another pair, or from this side's own role
    /// (reflected back, or a second host configured with the same role).
    pub foreign: u64,
    /// Datagrams that are not heartbeats this version understands (length,
    /// magic, version), or correctly MACed ones with undefined role or flags.
    pub malformed: u64,
    /// Valid heartbeats of the peer that did not echo this side's challenge:
    /// recorded before it (a replay from an earlier run), or a restarted
    /// peer that has not seen the challenge yet. Answered, never life.
    pub unproven: u64,
}

/// What the receiver made of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A valid new heartbeat from the peer: a sign of life.
    Accepted(Heartbeat),
    /// The MAC was wrong.
    Forged,
    /// Valid but not new: `newest` is the highest sequence number accepted
    /// for that incarnation (none if the incarnation is retired).
    Replayed {
        /// The incarnation it claimed.
        incarnation: Incarnation,
        /// Its sequence number.
        seq: u64,
        /// The highest sequence accepted for it, if it is the current one.
        newest: Option<u64>,
    },
    /// Valid but from another pair or from this side's own role.
    Foreign {
        /// The pair it was for.
        pair: PairId,
        /// The role it came from.
        role: Role,
    },
    /// Not a heartbeat this version understands.
    Malformed(MessageError),
    /// Valid, of this pair and from the peer's role, but not proven fresh
    /// (it does not echo this side's challenge): not life, nothing changes.
    /// The caller answers it, to the address it came from, with a heartbeat
    /// echoing `challenge`.
    Unproven {
        /// The incarnation it claimed.
        incarnation: Incarnation,
        /// Its sequence number.
        seq: u64,
        /// Its sender's challenge, to echo in the answer.
        challenge: Challenge,
    },
}

/// The incarnation the receiver follows.
#[derive(Debug, Clone, Copy)]
struct Current {
    incarnation: Incarnation,
    /// The highest sequence number accepted from it.
    newest: u64,
    /// The challenge it was proven with: it may echo this one until it has
    /// seen the receiver's next.
    proven_with: Challenge,
    /// Its latest challenge, which this side's heartbeats echo.
    challenge: Challenge,
}

/// Validates the peer's heartbeats: MAC, pair, role, freshness.
#[derive(Debug)]
pub struct Receiver {
    key: HeartbeatKey,
    pair: PairId,
    from: Role,
    /// The challenge a heartbeat must echo to be proven fresh.
    challenge: Challenge,
    current: Option<Current>,
    /// Incarnations the peer has moved on from, newest last.
    retired: VecDeque<Incarnation>,
    counters: Counters,
}

impl Receiver {
    /// A receiver for heartbeats of pair `pair` sent by the peer whose role
    /// is `from` (the other side's: `my_role.peer()`), holding `challenge`
    /// (normally [`Challenge::random`], once per process), which this side's
    /// heartbeats must carry ([`Receiver::challenge`]).
    pub fn new(key: HeartbeatKey, pair: PairId, from: Role, challenge: Challenge) -> Receiver {
        Receiver { key, pair, from, challenge, current: None, retired: VecDeque::new(), counters: Counters::default() }
    }

    /// Judge one datagram. Only [`Verdict::Accepted`] is a sign of life:
    /// the caller then reports it to its [`Detector`].
    pub fn receive(&mut self, datagram: &[u8]) -> Verdict {
        let verdict = self.judge(datagram);
        let counter = match &verdict {
            Verdict::Accepted(_) => &mut self.counters.accepted,
            Verdict::Forged => &mut self.counters.forged,
            Verdict::Replayed { .. } => &mut self.counters.replayed,
            Verdict::Foreign { .. } => &mut self.counters.foreign,
            Verdict::Malformed(_) => &mut self.counters.malformed,
            Verdict::Unproven { .. } => &mut self.counters.unproven,
        };
        *counter = counter.saturating_add(1);
        verdict
    }

    fn judge(&mut self, datagram: &[u8]) -> Verdict {
        let heartbeat = match Heartbeat::decode(datagram, &self.key) {
            Ok(heartbeat) => heartbeat,
            Err(MessageError::BadMac) => return Verdict::Forged,
            Err(error) => return Verdict::Malformed(error),
        };
        if heartbeat.pair != self.pair || heartbeat.role != self.from {
            return Verdict::Foreign { pair: heartbeat.pair, role: heartbeat.role };
        }
        let (incarnation, seq) = (heartbeat.incarnation, heartbeat.seq);
        let unproven = Verdict::Unproven { incarnation, seq, challenge: heartbeat.challenge };
        match &mut self.current {
            Some(current) if current.incarnation == incarnation => {
                if seq <= current.newest {
                    return Verdict::Replayed { incarnation, seq, newest: Some(current.newest) };
                }
                if heartbeat.echo != self.challenge && heartbeat.echo != current.proven_with {
                    return unproven;
                }
                current.newest = seq;
                current.challenge = heartbeat.challenge;
                return Verdict::Accepted(heartbeat);
            }
            _ if self.retired.contains(&incarnation) => {
                return Verdict::Replayed { incarnation, seq, newest: None };
            }
            _ if heartbeat.echo != self.challenge => return unproven,
            _ => {}
        }
        // A new incarnation, proven fresh: believe it.
        let previous = self.current.map(|current| current.incarnation);
        match previous {
            None => tracing::info!(peer = %self.from, %incarnation, seq, "first heartbeat from the peer"),
            Some(previous) => tracing::info!(
                peer = %self.from, %incarnation, %previous, seq,
                "the peer restarted: heartbeats from a new incarnation, proven fresh"
            ),
        }
        if let Some(previous) = previous {
            if self.retired.len() >= RETIRED_INCARNATIONS {
                self.retired.pop_front();
            }
            self.retired.push_back(previous);
        }
        self.current =
            Some(Current { incarnation, newest: seq, proven_with: self.challenge, challenge: heartbeat.challenge });
        self.challenge = self.key.next_challenge(self.challenge, incarnation);
        Verdict::Accepted(heartbeat)
    }

    /// What the receiver did with datagrams so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The peer's current incarnation, once one was accepted.
    pub fn incarnation(&self) -> Option<Incarnation> {
        self.current.map(|current| current.incarnation)
    }

    /// The challenge this side's heartbeats must carry now.
    pub fn challenge(&self) -> Challenge {
        self.challenge
    }

    /// What this side's heartbeats echo: the current incarnation's latest
    /// challenge, or [`Challenge::NONE`] before one was accepted.
    pub fn echo(&self) -> Challenge {
        self.current.map_or(Challenge::NONE, |current| current.challenge)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Progress;

    const MS: Duration = Duration::from_millis(1);

    /// Heartbeats every `period`, each lost with probability `loss`, each
    /// delayed by `delay` ± `jitter` (uniform; so reordered too), as the
    /// receiver sees them: only a higher sequence number than any before is
    /// a heartbeat. Returns the arrivals (time since the start, missed).
    fn link(period: Duration, count: u64, loss: f64, delay: f64, jitter: f64, seed: u64) -> Vec<(Duration, u64)> {
        let mut rng = Rng(seed);
        let mut sent: Vec<(f64, u64)> = (0..count)
            .filter_map(|seq| {
                let lost = rng.unit() < loss;
                let at = seq as f64 * period.as_secs_f64() + delay + jitter * (2.0 * rng.unit() - 1.0);
                (!lost).then_some((at, seq))
            })
            .collect();
        sent.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut newest = None;
        let mut out = Vec::new();
        for (at, seq) in sent {
            if newest.is_some_and(|n| seq <= n) {
                continue;
            }
            let missed = newest.map_or(0, |n| seq - n - 1);
            newest = Some(seq);
            out.push((Duration::from_secs_f64(at), missed));
        }
        out
    }

    /// Feed `arrivals` to an adaptive detector (10-ms interval, 2.5-ms
    /// period); the longest silence relative to the limit in force, just
    /// before each arrival (> 1: a false alarm), and the detector.
    fn run_adaptive(arrivals: &[(Duration, u64)]) -> (f64, Detector) {
        let start = Instant::now();
        let mut d = Detector::adaptive(10 * MS, 5, 200 * MS);
        let mut worst = 0.0f64;
        for &(at, missed) in arrivals {
            let now = start + at;
            if let (Some(last), true) = (d.last_heard(), d.timeout() > Duration::ZERO) {
                let silence = now.saturating_duration_since(last);
                worst = worst.max(silence.as_secs_f64() / d.timeout().as_secs_f64());
                assert!(
                    silence <= d.timeout() || matches!(d.state(now), PeerState::Dead { .. }),
                    "state and limit disagree"
                );
            }
            d.heartbeat(now, missed);
        }
        (worst, d)
    }

    #[test]
    fn on_a_quiet_link_the_adaptive_limit_is_under_20_ms() {
        let arrivals = link(Duration::from_micros(2500), 4000, 0.0, 0.000_05, 0.000_3, 7);
        let (worst, d) = run_adaptive(&arrivals);
        assert!(worst < 1.0, "a false alarm on a quiet link ({worst:.2} of the limit)");
        assert!(d.timeout() <= 15 * MS, "limit {:?}", d.timeout());
        assert!(d.timeout() >= ADAPTIVE_FLOOR);
        let (period, jitter) = d.estimates();
        assert!(period.abs_diff(Duration::from_micros(2500)) < Duration::from_micros(100), "period {period:?}");
        assert!(jitter < MS, "jitter {jitter:?}");
        // A dead peer: declared within 20 ms of its last heartbeat.
        let last = d.last_heard().unwrap();
        assert_eq!(d.state(last + d.timeout()), PeerState::Up);
        assert!(matches!(d.state(last + 20 * MS), PeerState::Dead { .. }));
        assert!(d.deadline().unwrap() <= last + 20 * MS);
    }

    #[test]
    fn ten_minutes_of_a_lossy_jittery_link_raise_no_false_alarm() {
        // 10 % loss, 5 ms ± 5 ms: the lossy-link experiment, simulated for
        // ten minutes of 2.5-ms heartbeats (240 000), three times.
        for seed in [1, 2, 3] {
            let arrivals = link(Duration::from_micros(2500), 240_000, 0.10, 0.005, 0.005, seed);
            let (worst, d) = run_adaptive(&arrivals);
            assert!(worst < 1.0, "seed {seed}: a silence of {worst:.2} of the limit");
            // The limit widened for the link, and stayed under its ceiling.
            assert!(d.timeout() > 20 * MS && d.timeout() < 100 * MS, "seed {seed}: limit {:?}", d.timeout());
        }
    }

    #[test]
    fn a_fixed_detector_ignores_what_it_measures() {
        let start = Instant::now();
        let mut d = Detector::new(10 * MS, 30);
        for i in 0..500u32 {
            d.heartbeat(start + i * MS, 0);
        }
        assert!(!d.is_adaptive());
        assert_eq!(d.timeout(), 300 * MS);
    }

    #[test]
    fn this_sides_own_stall_is_not_the_peers_silence() {
        let start = Instant::now();
        let mut d = Detector::adaptive(10 * MS, 5, 200 * MS);
        for i in 0..200u32 {
            d.heartbeat(start + i * Duration::from_micros(2500), 0);
        }
        let limit = d.timeout();
        let last = d.last_heard().unwrap();
        // This side did not run for 150 ms; it wakes and excuses the silence.
        let woke = last + 150 * MS;
        d.excuse(woke);
        assert_eq!(d.state(woke), PeerState::Up);
        assert_eq!(d.deadline(), Some(woke + limit + Duration::from_nanos(1)));
        // A peer that is really gone is still declared, one limit later.
        assert!(matches!(d.state(woke + limit + MS), PeerState::Dead { .. }));
        // The gap across the stall is no sample: the limit did not widen.
        d.heartbeat(woke + MS, 0);
        assert_eq!(d.timeout(), limit);
    }

    fn key() -> HeartbeatKey {
        HeartbeatKey::derive(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn pair() -> PairId {
        PairId::for_vm_name("vm")
    }

    /// The receiver's first challenge.
    const C0: Challenge = Challenge([0xc0; 16]);

    /// A heartbeat that echoes the receiver's first challenge.
    fn datagram(role: Role, incarnation: u64, seq: u64) -> Vec<u8> {
        echoing(role, incarnation, seq, C0)
    }

    /// A heartbeat that echoes `echo`; its own challenge names its incarnation.
    fn echoing(role: Role, incarnation: u64, seq: u64, echo: Challenge) -> Vec<u8> {
        Heartbeat {
            role,
            pair: pair(),
            incarnation: Incarnation(incarnation),
            seq,
            progress: Progress::default(),
            challenge: Challenge([incarnation.to_le_bytes()[0]; 16]),
            echo,
        }
        .encode(&key())
        .to_vec()
    }

    fn receiver() -> Receiver {
        Receiver::new(key(), pair(), Role::Primary, C0)
    }

    /// A deterministic xorshift generator: the simulations below are the
    /// same run every time, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Uniform in `0..n`.
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn timing_is_checked() {
        assert_eq!(check_timing(10 * MS, 5), Ok(50 * MS));
        assert_eq!(check_timing(Duration::from_micros(999), 5), Err(DetectorError::ZeroInterval));
        assert_eq!(check_timing(10 * MS, 0), Err(DetectorError::ZeroDeadAfter));
        assert!(matches!(check_timing(Duration::MAX, 2), Err(DetectorError::TooLong { .. })));
        let detector = Detector::new(Duration::ZERO, 0);
        assert_eq!((detector.interval(), detector.dead_after(), detector.timeout()), (MS, 1, MS));
        assert_eq!(Detector::new(Duration::MAX, 3).timeout(), Duration::MAX);
    }

    #[test]
    fn unknown_until_heard_and_never_dead_before() {
        let t0 = Instant::now();
        let mut detector = Detector::new(DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER);
        assert_eq!(detector.state(t0), PeerState::Unknown);
        assert_eq!(detector.state(t0 + Duration::from_secs(3600)), PeerState::Unknown);
        assert_eq!(detector.deadline(), None);
        detector.heard(t0 + MS);
        assert_eq!(detector.last_heard(), Some(t0 + MS));
        let deadline = t0 + 51 * MS + Duration::from_nanos(1);
        assert_eq!(detector.deadline(), Some(deadline));
        assert_eq!(detector.state(t0 + 51 * MS), PeerState::Up);
        assert_eq!(detector.state(deadline), PeerState::Dead { since_last: 50 * MS + Duration::from_nanos(1) });
        // Life again: Up again (the detector does not latch).
        detector.heard(t0 + 60 * MS);
        assert_eq!(detector.state(t0 + 61 * MS), PeerState::Up);
        // A late report from another thread does not move time back.
        detector.heard(t0 + 2 * MS);
        assert_eq!(detector.last_heard(), Some(t0 + 60 * MS));
    }

    /// A simulated link: for each heartbeat (by sequence number), the
    /// delay of each copy delivered: none if it is lost, two if duplicated.
    type Link<'a> = &'a mut dyn FnMut(u64) -> Vec<Duration>;

    /// One simulated run of a peer heartbeating every 10 ms for `send_for`,
    /// then silenced, over `link`. Arrivals pass through a real receiver
    /// into the detector (so reordered-older and duplicated ones are
    /// refused, not lived on); the clock steps 100 µs at a time and the
    /// state is looked at on every step.
    struct Run {
        /// When the peer sent its last heartbeat.
        last_sent: Instant,
        /// The last accepted heartbeat's arrival, the detector's last sign of life.
        last_heard: Option<Instant>,
        /// Each time the detector turned Dead while the peer was still
        /// sending (a false "dead"): how many heartbeats in a row the link
        /// had lost after the last one accepted.
        false_dead: Vec<u64>,
        /// The first step at which the detector said Dead after the peer fell silent.
        dead_at: Option<Instant>,
        sent: u64,
        counters: Counters,
    }

    const STEP: Duration = Duration::from_micros(100);

    fn simulate(send_for: Duration, watch_for: Duration, link: Link) -> Run {
        let t0 = Instant::now();
        let mut receiver = receiver();
        let mut detector = Detector::new(DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER);
        let mut in_flight: Vec<(Instant, u64)> = Vec::new();
        let mut lost = vec![false]; // by sequence number; there is no 0
        let (mut seq, mut sent_at, mut last_sent) = (0, t0, t0);
        while sent_at < t0 + send_for {
            seq += 1;
            last_sent = sent_at;
            let copies = link(seq);
            lost.push(copies.is_empty());
            in_flight.extend(copies.into_iter().map(|delay| (sent_at + delay, seq)));
            sent_at += DEFAULT_INTERVAL;
        }
        in_flight.sort_by_key(|(at, _)| *at);
        let mut arrivals = in_flight.into_iter().peekable();
        let (mut false_dead, mut dead_at, mut was_dead, mut last_accepted) = (Vec::new(), None, false, 0);
        let mut now = t0;
        while now <= t0 + send_for + watch_for {
            // The state is looked at before this step's arrivals are
            // delivered: the timer firing just before a datagram is read.
            let dead = matches!(detector.state(now), PeerState::Dead { .. });
            if dead && !was_dead && now <= last_sent {
                let after =
                    lost.iter().skip(usize::try_from(last_accepted).unwrap() + 1).take_while(|lost| **lost).count();
                false_dead.push(after as u64);
            }
            if dead && now > last_sent {
                dead_at = dead_at.or(Some(now));
            }
            was_dead = dead;
            while let Some((_, seq)) = arrivals.next_if(|(at, _)| *at <= now) {
                if let Verdict::Accepted(_) = receiver.receive(&datagram(Role::Primary, 99, seq)) {
                    detector.heard(now);
                    last_accepted = seq;
                }
            }
            now += STEP;
        }
        Run {
            last_sent,
            last_heard: detector.last_heard(),
            false_dead,
            dead_at,
            sent: seq,
            counters: receiver.counters(),
        }
    }

    /// A link that loses `loss_percent` of heartbeats at random, delays the
    /// rest by 5 ms ± 5 ms (so later ones overtake earlier ones), and
    /// delivers one in fifty twice.
    fn lossy_link(seed: u64, loss_percent: u64) -> impl FnMut(u64) -> Vec<Duration> {
        let mut rng = Rng(seed | 1);
        move |_| {
            if rng.below(100) < loss_percent {
                return Vec::new();
            }
            let delay = Duration::from_micros(rng.below(10_001));
            if rng.below(50) == 0 {
                vec![delay, delay + 3 * MS]
            } else {
                vec![delay]
            }
        }
    }

    #[test]
    fn three_lost_in_a_row_with_the_worst_jitter_are_not_dead() {
        // Deliver one, lose three, over and over; each delivered one comes
        // alternately 0 ms and 10 ms late (5 ms ± 5 ms at its extremes), so
        // every other gap is 3 × 10 + 10 + 10 = 50 ms: exactly the limit.
        let mut link = |seq: u64| match seq % 8 {
            1 => vec![Duration::ZERO],
            5 => vec![10 * MS],
            _ => vec![],
        };
        let run = simulate(Duration::from_secs(10), Duration::ZERO, &mut link);
        assert_eq!(run.false_dead, Vec::<u64>::new());
        assert_eq!(run.counters.accepted, run.sent / 4);
    }

    #[test]
    fn no_false_dead_with_ten_percent_loss_and_jitter_unless_four_are_lost_in_a_row() {
        // 100 runs of 10 s: 100 000 heartbeats, about 10 000 lost at random.
        // With a 10 ms interval, ±5 ms jitter and a 50 ms limit, the detector
        // tolerates any three lost in a row (the test above); a false "dead"
        // needs four (and the jitter against it: probability 1/2) or five.
        // At 10 % independent loss that is about 0.9 × 10^-4 / 2 + 10^-5 ≈
        // 5.5 × 10^-5 per heartbeat, one every 3 minutes or so: the price
        // of a 50 ms reaction on a link this bad (--dead-after 8 makes it
        // about 10^-8).
        let (mut heartbeats, mut false_deads) = (0, 0);
        for seed in 1..=100u64 {
            let mut link = lossy_link(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 10);
            let run = simulate(Duration::from_secs(10), Duration::ZERO, &mut link);
            for lost_in_a_row in &run.false_dead {
                assert!(*lost_in_a_row >= 4, "seed {seed}: dead after only {lost_in_a_row} lost in a row");
            }
            assert!(run.counters.accepted > 800, "seed {seed}: {:?}", run.counters);
            heartbeats += run.sent;
            false_deads += run.false_dead.len() as u64;
        }
        let rate = false_deads as f64 / heartbeats as f64;
        println!("{false_deads} false deads in {heartbeats} heartbeats at 10% loss, ±5 ms jitter: {rate:.1e} each");
        assert!(rate < 2e-4, "false-dead rate {rate:.1e} per heartbeat");
    }

    #[test]
    fn no_false_dead_with_jitter_and_reordering_and_no_loss() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
            // Every heartbeat delivered 5 ms ± 5 ms late, and one in ten a
            // second time 1 to 20 ms later (a duplicate that arrives after
            // newer ones: reordered-older).
            let mut link = |_| {
                let delay = Duration::from_micros(rng.below(10_001));
                if rng.below(10) == 0 {
                    vec![delay, delay + Duration::from_micros(1_000 + rng.below(19_001))]
                } else {
                    vec![delay]
                }
            };
            let run = simulate(Duration::from_secs(10), Duration::ZERO, &mut link);
            assert_eq!(run.false_dead, Vec::<u64>::new(), "seed {seed}");
            // With ±5 ms jitter on a 10 ms interval, later ones overtake.
            assert!(run.counters.replayed > 0, "seed {seed}: {:?}", run.counters);
        }
    }

    #[test]
    fn a_silenced_peer_is_dead_within_the_limit_plus_one_interval() {
        let limit = DEFAULT_INTERVAL * DEFAULT_DEAD_AFTER;
        let mut worst = Duration::ZERO;
        for seed in 1..=100u64 {
            let mut link = lossy_link(seed.wrapping_mul(0xdead_beef_cafe_f00d), 10);
            let run = simulate(Duration::from_secs(1), Duration::from_secs(1), &mut link);
            let dead_at = run.dead_at.expect("a silenced peer is declared dead");
            let last_heard = run.last_heard.expect("the peer was heard");
            // Dead as soon as the limit has passed since the last sign of
            // life (to the simulation's step) …
            let reaction = dead_at - last_heard;
            assert!(reaction > limit && reaction <= limit + STEP, "seed {seed}: reaction {reaction:?}");
            // … so within limit + one interval of the last heartbeat the
            // peer sent (which arrives up to 10 ms late, or is lost).
            let after_last_sent = dead_at.saturating_duration_since(run.last_sent);
            assert!(after_last_sent <= limit + DEFAULT_INTERVAL + STEP, "seed {seed}: {after_last_sent:?}");
            worst = worst.max(after_last_sent);
        }
        println!("dead at most {worst:?} after the last heartbeat sent");
    }

    #[test]
    fn replayed_forged_and_foreign_heartbeats_are_not_life() {
        let mut receiver = receiver();
        let mut detector = Detector::new(DEFAULT_INTERVAL, DEFAULT_DEAD_AFTER);
        let t0 = Instant::now();
        let first = datagram(Role::Primary, 1, 1);
        assert!(matches!(receiver.receive(&first), Verdict::Accepted(_)));
        detector.heard(t0);
        // The same datagram played back again and again, later on.
        for i in 1..=100u32 {
            let verdict = receiver.receive(&first);
            assert_eq!(verdict, Verdict::Replayed { incarnation: Incarnation(1), seq: 1, newest: Some(1) });
            if let Verdict::Accepted(_) = verdict {
                detector.heard(t0 + i * MS);
            }
        }
        // A forged one: right shape, wrong key.
        let forged = Heartbeat {
            role: Role::Primary,
            pair: pair(),
            incarnation: Incarnation(1),
            seq: 1000,
            progress: Progress::default(),
            challenge: C0,
            echo: C0,
        }
        .encode(&HeartbeatKey::derive(&[0u8; 32]).unwrap());
        assert_eq!(receiver.receive(&forged), Verdict::Forged);
        // Our own heartbeat reflected back, and another pair's.
        assert!(matches!(receiver.receive(&datagram(Role::Secondary, 1, 5)), Verdict::Foreign { .. }));
        let other_pair = Heartbeat {
            role: Role::Primary,
            pair: PairId([1; 32]),
            incarnation: Incarnation(1),
            seq: 7,
            progress: Progress::default(),
            challenge: C0,
            echo: C0,
        };
        assert!(matches!(receiver.receive(&other_pair.encode(&key())), Verdict::Foreign { .. }));
        assert!(matches!(receiver.receive(b"hello"), Verdict::Malformed(MessageError::WrongLength { .. })));
        assert!(matches!(detector.state(t0 + 51 * MS), PeerState::Dead { .. }));
        assert_eq!(
            receiver.counters(),
            Counters { accepted: 1, forged: 1, replayed: 100, foreign: 2, malformed: 1, unproven: 0 }
        );
    }

    #[test]
    fn sequence_must_grow_within_an_incarnation() {
        let mut receiver = receiver();
        assert!(matches!(receiver.receive(&datagram(Role::Primary, 5, 10)), Verdict::Accepted(_)));
        assert!(matches!(receiver.receive(&datagram(Role::Primary, 5, 9)), Verdict::Replayed { .. }));
        assert!(matches!(receiver.receive(&datagram(Role::Primary, 5, 10)), Verdict::Replayed { .. }));
        // A gap (lost heartbeats) is fine.
        assert!(matches!(receiver.receive(&datagram(Role::Primary, 5, 15)), Verdict::Accepted(_)));
        assert_eq!(receiver.counters().accepted, 2);
        assert_eq!(receiver.counters().replayed, 2);
    }

    #[test]
    fn a_restarted_peer_is_believed_once_proven_and_its_old_run_refused() {
        let mut receiver = receiver();
        assert!(matches!(receiver.receive(&datagram(Role::Primary, 1, 500)), Verdict::Accepted(_)));
        assert_eq!(receiver.echo(), Challenge([1; 16]));
        let c1 = receiver.challenge();
        assert_ne!(c1, C0, "a new incarnation moves the challenge on");
        // The peer restarts: new incarnation, sequence from 1. Until it
        // echoes the current challenge it is answered, not believed.
        for echo in [Challenge::NONE, C0] {
            let verdict = receiver.receive(&echoing(Role::Primary, 2, 1, echo));
            assert_eq!(
                verdict,
                Verdict::Unproven { incarnation: Incarnation(2), seq: 1, challenge: Challenge([2; 16]) }
            );
            assert_eq!(receiver.incarnation(), Some(Incarnation(1)));
        }
        // The incarnation in force still counts (it echoes the challenge it
        // was proven with until it sees the next).
        assert!(matches!(receiver.receive(&datagram(Role::Primary, 1, 501)), Verdict::Accepted(_)));
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 1, 502, c1)), Verdict::Accepted(_)));
        // Proven: the restart is believed.
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 2, 2, c1)), Verdict::Accepted(_)));
        assert_eq!(receiver.incarnation(), Some(Incarnation(2)));
        let c2 = receiver.challenge();
        // The old run's heartbeats, even newer-numbered ones, are replays now.
        assert_eq!(
            receiver.receive(&echoing(Role::Primary, 1, 503, c1)),
            Verdict::Replayed { incarnation: Incarnation(1), seq: 503, newest: None }
        );
        assert_eq!(receiver.incarnation(), Some(Incarnation(2)));
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 2, 3, c2)), Verdict::Accepted(_)));
        // After more restarts than RETIRED_INCARNATIONS, incarnation 1 is
        // forgotten, and its heartbeats still cannot come back: they echo a
        // challenge the receiver has moved on from.
        for incarnation in 3..3 + RETIRED_INCARNATIONS as u64 {
            let proven = echoing(Role::Primary, incarnation, 1, receiver.challenge());
            assert!(matches!(receiver.receive(&proven), Verdict::Accepted(_)));
        }
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 2, 4, c2)), Verdict::Replayed { .. }));
        for echo in [C0, c1, c2] {
            assert!(matches!(receiver.receive(&echoing(Role::Primary, 1, 504, echo)), Verdict::Unproven { .. }));
        }
        assert_eq!(receiver.incarnation(), Some(Incarnation(2 + RETIRED_INCARNATIONS as u64)));
    }

    #[test]
    fn heartbeats_replayed_from_an_earlier_run_never_retire_the_live_peer() {
        // The earlier run: the same key and pair, another receiver challenge.
        let earlier = Challenge([0xee; 16]);
        let old_run: Vec<Vec<u8>> = (1..=200).map(|seq| echoing(Role::Primary, 7, seq, earlier)).collect();
        let mut receiver = receiver();
        // Replayed before the live peer was ever heard: not even a first heartbeat.
        assert!(matches!(receiver.receive(&old_run[0]), Verdict::Unproven { .. }));
        assert_eq!(receiver.incarnation(), None);
        // The live peer, not yet proven, is answered; then it proves itself.
        let live = 9;
        assert!(matches!(
            receiver.receive(&echoing(Role::Primary, live, 1, Challenge::NONE)),
            Verdict::Unproven { .. }
        ));
        assert!(matches!(receiver.receive(&echoing(Role::Primary, live, 2, C0)), Verdict::Accepted(_)));
        let proven_echo = receiver.challenge();
        // Old heartbeats interleaved with live ones, the live peer now
        // echoing the next challenge: every live one counts, no old one does,
        // and the incarnation in force never changes.
        for (i, old) in old_run.iter().enumerate().skip(1) {
            let seq = 3 + u64::try_from(i).unwrap();
            assert!(matches!(receiver.receive(old), Verdict::Unproven { .. }), "old {i}");
            let verdict = receiver.receive(&echoing(Role::Primary, live, seq, proven_echo));
            assert!(matches!(verdict, Verdict::Accepted(_)), "live {seq}: {verdict:?}");
            assert_eq!(receiver.incarnation(), Some(Incarnation(live)));
        }
        let counters = receiver.counters();
        assert_eq!((counters.accepted, counters.unproven, counters.replayed), (200, 201, 0));
    }

    #[test]
    fn a_replay_of_a_proven_heartbeat_of_another_incarnation_is_refused_after_the_switch() {
        // A peer process that ran while this receiver ran (so it echoed the
        // receiver's challenge), replaced by a new one: its later heartbeats,
        // replayed, echo a challenge the receiver moved on from.
        let mut receiver = receiver();
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 1, 1, C0)), Verdict::Accepted(_)));
        let c1 = receiver.challenge();
        let recorded = echoing(Role::Primary, 1, 50, c1);
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 2, 1, c1)), Verdict::Accepted(_)));
        assert!(matches!(receiver.receive(&recorded), Verdict::Replayed { newest: None, .. }));
        // Another incarnation, never seen, echoing the old challenge: unproven.
        assert!(matches!(receiver.receive(&echoing(Role::Primary, 3, 1, c1)), Verdict::Unproven { .. }));
        assert_eq!(receiver.incarnation(), Some(Incarnation(2)));
    }
}
