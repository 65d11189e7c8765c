//! How far the secondary's replay is behind, in the primary's execution
//! time. The secondary puts the records it has *replayed* into its
//! heartbeats; the primary remembers when its log reached each position and
//! so knows since when the secondary has been behind. Past `--max-lag-ms`
//! the secondary is alive but useless (a failover to it would take that
//! long): the primary treats it as lost and the arbiter decides.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::log::LogShared;

use crate::failover::Failover;
use crate::primary::{Phase, PrimaryShared};
use crate::status::Board;

/// How often the primary samples its log position and checks the lag.
pub const LAG_SAMPLE: Duration = Duration::from_millis(2);

/// Samples kept at most (24 bytes each): at [`LAG_SAMPLE`] apart, half a
/// minute of an unanswered log at full resolution.
pub(crate) const MAX_LAG_SAMPLES: usize = 1 << 14;

/// When the primary's log reached each position, oldest first; positions
/// the secondary has replayed are forgotten.
#[derive(Default)]
pub(crate) struct LagClock {
    samples: VecDeque<(Instant, u64)>,
    /// The least time between two samples kept (zero: every one).
    min_gap: Duration,
}

impl LagClock {
    /// The log stood at `position` at `at`. Past [`MAX_LAG_SAMPLES`] (a
    /// secondary whose heartbeats never tell its position: UDP filtered
    /// while the log flows, say) the samples are thinned to twice the
    /// spacing, evenly, the oldest kept: a lag is never under-stated by
    /// more than that spacing, and the memory stays bounded.
    pub(crate) fn sample(&mut self, at: Instant, position: u64) {
        let due = |&(t, p): &(Instant, u64)| p < position && at.saturating_duration_since(t) >= self.min_gap;
        if self.samples.back().is_none_or(due) {
            self.samples.push_back((at, position));
        }
        while self.samples.len() > MAX_LAG_SAMPLES {
            self.min_gap = (self.min_gap * 2).max(LAG_SAMPLE);
            let (gap, mut last) = (self.min_gap, None::<Instant>);
            self.samples.retain(|&(t, _)| {
                let keep = last.is_none_or(|l| t.saturating_duration_since(l) >= gap);
                if keep {
                    last = Some(t);
                }
                keep
            });
        }
    }

    /// The secondary has replayed up to `replayed`: for how long has the
    /// log been past it, as of `now`?
    pub(crate) fn lag(&mut self, now: Instant, replayed: u64) -> Duration {
        while self.samples.front().is_some_and(|&(_, p)| p <= replayed) {
            self.samples.pop_front();
        }
        if self.samples.len() <= MAX_LAG_SAMPLES / 4 {
            // Caught up enough: full resolution again.
            self.min_gap = Duration::ZERO;
        }
        self.samples.front().map_or(Duration::ZERO, |&(t, _)| now.saturating_duration_since(t))
    }
}

/// The primary's watch: samples, reports its own progress, and tells the
/// failover policy once the lag passes `max_lag`.
pub(crate) fn spawn_primary_watch(
    rt: &tokio::runtime::Handle,
    log: Arc<LogShared>,
    board: Arc<Board>,
    failover: Arc<Failover>,
    shared: Arc<PrimaryShared>,
    max_lag: Duration,
) {
    rt.spawn(async move {
        let mut clock = LagClock::default();
        let mut tick = tokio::time::interval(LAG_SAMPLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if shared.phase() != Phase::Protected || shared.guest_has_ended() {
                board.replay_lag_us.store(u64::MAX, Ordering::SeqCst);
                return;
            }
            let (now, appended) = (Instant::now(), log.appended().0);
            failover.report_progress(board.exit_index.load(Ordering::Relaxed), appended);
            clock.sample(now, appended);
            let Some(replayed) = failover.peer_position() else { continue };
            let lag = clock.lag(now, replayed);
            board.replay_lag_us.store(u64::try_from(lag.as_micros()).unwrap_or(u64::MAX - 1), Ordering::SeqCst);
            if lag > max_lag {
                board.set_state(format!("secondary lagging: replay {} ms behind", lag.as_millis()));
                tracing::warn!(lag_ms = lag.as_millis() as u64, "the secondary's replay is too far behind");
                failover.secondary_lagging(now.checked_sub(lag).unwrap_or(now));
                return;
            }
        }
    });
}

/// The secondary's reporter: its replayed position into its heartbeats,
/// twice per heartbeat interval.
pub(crate) fn spawn_secondary_reporter(
    rt: &tokio::runtime::Handle,
    board: Arc<Board>,
    failover: Arc<Failover>,
    consumed: Arc<AtomicU64>,
    every: Duration,
) {
    rt.spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let exit = board.exit_index.load(Ordering::Relaxed);
            failover.report_progress(exit, consumed.load(Ordering::Relaxed));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_position_not_replayed() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = LagClock::default();
        c.sample(ms(0), 10);
        c.sample(ms(5), 10); // no progress: not a new sample
        c.sample(ms(10), 20);
        c.sample(ms(20), 30);
        assert_eq!(c.lag(ms(25), 30), Duration::ZERO, "caught up");
        c.sample(ms(30), 40);
        c.sample(ms(40), 50);
        // Replayed 35: the log passed it at 30 (when it reached 40).
        assert_eq!(c.lag(ms(100), 35), Duration::from_millis(70));
        // A frozen replayer: the lag grows with the primary's time.
        assert_eq!(c.lag(ms(1000), 35), Duration::from_millis(970));
        assert_eq!(c.lag(ms(1000), 50), Duration::ZERO);
    }

    #[test]
    fn samples_stay_bounded_while_the_secondary_never_tells_its_position() {
        let t0 = Instant::now();
        let mut c = LagClock::default();
        // 2000 s of a log advancing at every sample, never asked for the lag
        // (the primary asks only once a heartbeat told a position).
        for i in 0..1_000_000u64 {
            c.sample(t0 + LAG_SAMPLE * u32::try_from(i).unwrap(), i + 1);
        }
        assert!(c.samples.len() <= MAX_LAG_SAMPLES, "{} samples kept", c.samples.len());
        // The oldest position not replayed is still dated exactly.
        let now = t0 + Duration::from_secs(2000);
        assert_eq!(c.lag(now, 0), Duration::from_secs(2000));
        // Later ones within the spacing of what is left.
        let mid = c.lag(now, 500_000);
        assert!(mid <= Duration::from_secs(1000) && mid > Duration::from_secs(999), "{mid:?}");
    }
}
