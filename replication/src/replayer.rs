//! The secondary's input source: every value comes from the log, at the exit
//! index the primary logged it at. Anything else is a divergence, reported
//! with both sides' view. A HLT does not sleep: the secondary runs as fast as
//! the log lets it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, ExitKind, HookError, InputSource, Wake};
use vmm::vcpu::StopHandle;

use crate::record::Record;

/// How far the secondary may replay, as the receiving side learns it: the
/// last barrier received and a guest fault the primary reported. Shared
/// between the task that receives records and the replaying vCPU.
///
/// With containment on, once a barrier has been received the secondary
/// replays no further than the exit of the last one: what lies past it may
/// lead into a fault. Before the first barrier (a guest that does not report
/// health) replay is free. A fault reported with no barrier before it stops
/// replay before the fault's exit.
#[derive(Debug, Default)]
pub struct ReplayLimits {
    containment: bool,
    /// The exit of the last barrier received; 0: none.
    barrier: AtomicU64,
    /// The exit of the primary's guest fault; 0: none.
    fault: AtomicU64,
    /// The primary ended cleanly (its Shutdown record, an orderly close):
    /// replay everything to that end.
    ended: std::sync::atomic::AtomicBool,
}

/// Where replay must wait at an exit, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Past the last barrier received: wait for the next one (or go live
    /// from here after a containment decision).
    Barrier { barrier: ExitIndex },
    /// The primary's guest faulted: this exit would replay into the fault
    /// (or past the last barrier before it). Replay ends here.
    Fault { fault: ExitIndex },
}

impl ReplayLimits {
    /// Limits for a secondary; `containment` off (VMware FT's behaviour)
    /// never holds replay.
    pub fn new(containment: bool) -> ReplayLimits {
        ReplayLimits { containment, ..ReplayLimits::default() }
    }

    /// Whether containment is on.
    pub fn containment(&self) -> bool {
        self.containment
    }

    /// A barrier for `exit` was received (queued for replay).
    pub fn barrier_received(&self, exit: ExitIndex) {
        self.barrier.fetch_max(exit.0, Ordering::SeqCst);
    }

    /// The primary reported a guest fault at `exit`.
    pub fn fault_received(&self, exit: ExitIndex) {
        let _ = self.fault.compare_exchange(0, exit.0.max(1), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The primary ended cleanly: nothing can be rolled back, replay to
    /// its end.
    pub fn primary_ended(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// The exit of the last barrier received.
    pub fn last_barrier(&self) -> Option<ExitIndex> {
        match self.barrier.load(Ordering::SeqCst) {
            0 => None,
            b => Some(ExitIndex(b)),
        }
    }

    /// The exit of the primary's guest fault, if one was reported.
    pub fn fault(&self) -> Option<ExitIndex> {
        match self.fault.load(Ordering::SeqCst) {
            0 => None,
            f => Some(ExitIndex(f)),
        }
    }

    /// Whether replay must wait before exit `exit`. `lifted`: a plain
    /// failover of the primary's host was decided, so the secondary replays
    /// everything it received (unless a fault was reported).
    pub fn hold(&self, exit: ExitIndex, lifted: bool) -> Option<Hold> {
        if !self.containment {
            return None;
        }
        let lifted = lifted || self.ended.load(Ordering::SeqCst);
        let barrier = self.last_barrier();
        match (self.fault(), barrier) {
            (Some(_), Some(barrier)) if exit > barrier => Some(Hold::Barrier { barrier }),
            (Some(fault), None) if exit >= fault => Some(Hold::Fault { fault }),
            (Some(_), _) => None,
            (None, Some(barrier)) if !lifted && exit > barrier => Some(Hold::Barrier { barrier }),
            (None, _) => None,
        }
    }
}

/// Serves logged inputs in order.
pub struct Replayer {
    records: Receiver<Record>,
    next: Option<Record>,
    stop: StopHandle,
    /// Records consumed: the log position the guest has reached (shared with
    /// the output suppressor and the status report).
    consumed: Arc<AtomicU64>,
    /// The primary stopped cleanly at this exit: replay ends there.
    shutdown_at: Option<ExitIndex>,
    digests_checked: u64,
    /// The primary's switchover record was read: the log ended there.
    switched: bool,
    /// The last clock reading served: a go-live continues the guest's clock
    /// from here.
    last_clock: u64,
    /// Test hook ([`Replayer::skew_clock_at`]): clock readings served at
    /// or past this exit are one nanosecond off.
    skew_at: Option<ExitIndex>,
}

fn what(r: &Record) -> String {
    match r {
        Record::Clock { exit, .. } => format!("a clock reading at exit {exit}"),
        Record::Entropy { exit, bytes } => format!("{} entropy bytes at exit {exit}", bytes.len()),
        Record::Frame { exit, frame } if frame.is_empty() => format!("a frame poll with no frame at exit {exit}"),
        Record::Frame { exit, frame } => format!("a {}-byte frame at exit {exit}", frame.len()),
        Record::Digest { exit, vcpu, devices, memory } => {
            format!("digest vcpu={vcpu:#018x} devices={devices:#018x} memory={memory:#018x} at exit {exit}")
        }
        Record::Shutdown { exit } => format!("the primary's shutdown at exit {exit}"),
        Record::Barrier { exit } => format!("a barrier at exit {exit}"),
        Record::Fault { exit, fault } => format!("a guest fault ({fault}) at exit {exit}"),
        Record::Switchover { exit } => format!("the primary's switchover at exit {exit}"),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

impl Replayer {
    /// Replay the records arriving on `records`; `stop` ends a wait for the
    /// next record.
    pub fn new(records: Receiver<Record>, stop: StopHandle, consumed: Arc<AtomicU64>) -> Self {
        Replayer {
            records,
            next: None,
            stop,
            consumed,
            shutdown_at: None,
            digests_checked: 0,
            switched: false,
            last_clock: 0,
            skew_at: None,
        }
    }

    /// A test hook: serve the clock readings at or past `exit` one
    /// nanosecond off the log, so that this copy's guest state departs from
    /// the primary's and the next digest reports a divergence (what a
    /// hardware fault or a lockstep bug would do). Tests of divergence
    /// handling use it through `FTVM_TEST_DIVERGE_AT_EXIT`.
    pub fn skew_clock_at(mut self, exit: ExitIndex) -> Self {
        self.skew_at = Some(exit);
        self
    }

    /// Whether the primary's switchover was read from the log.
    pub fn switchover_seen(&self) -> bool {
        self.switched
    }

    /// Records consumed so far.
    pub fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::SeqCst)
    }

    /// The last clock reading served from the log.
    pub fn last_clock(&self) -> u64 {
        self.last_clock
    }

    /// Whether the primary's clean shutdown was read from the log.
    pub fn shutdown_seen(&self) -> bool {
        self.shutdown_at.is_some()
    }

    /// Digests compared so far (all matched, or replay would have stopped).
    pub fn digests_checked(&self) -> u64 {
        self.digests_checked
    }

    /// The next input record, waiting for it if it has not arrived.
    /// Barriers and faults before it are passed (counted): the guest needs
    /// an input at `exit`, so every barrier logged before that input lies
    /// at an earlier exit.
    fn peek(&mut self, exit: ExitIndex) -> Result<&Record, HookError> {
        loop {
            match &self.next {
                Some(Record::Barrier { .. } | Record::Fault { .. }) => self.pass(),
                Some(_) => break,
                None => {
                    if self.switched || self.stop.is_stopped() || self.shutdown_at.is_some() {
                        return Err(HookError::Ended { exit_index: exit });
                    }
                    match self.records.recv_timeout(Duration::from_millis(20)) {
                        Ok(r) => self.note(r),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return Err(HookError::Ended { exit_index: exit }),
                    }
                }
            }
        }
        self.next.as_ref().ok_or(HookError::Ended { exit_index: exit })
    }

    /// A record read from the log: the primary's clean end, a planned
    /// switchover (the log ends there, and the secondary goes live at the
    /// first input past it: the decision comes from the receiving side,
    /// which claimed the arbiter), or the next.
    fn note(&mut self, record: Record) {
        match record {
            Record::Shutdown { exit } => self.shutdown_at = Some(exit),
            Record::Switchover { .. } => self.switched = true,
            r => self.next = Some(r),
        }
    }

    /// Pass the barrier or fault in `next`. Barriers mark healthy points and
    /// faults say where not to go: the receiving side put both into the
    /// replay limits (the vCPU holds at them in `on_exit`, see `go_live`);
    /// here they only count: each is a position of the primary's log, and
    /// `consumed` must stand where the primary's log stood at the same exit
    /// (the suppressor tags held outputs with it, the lag watch and the
    /// status compare it with the primary's positions).
    fn pass(&mut self) {
        self.next = None;
        self.consumed.fetch_add(1, Ordering::SeqCst);
    }

    /// Take the next record, which must be for `exit` and pass `matches`.
    fn take(&mut self, exit: ExitIndex, found: &str, matches: impl Fn(&Record) -> bool) -> Result<Record, HookError> {
        let next = self.peek(exit)?;
        if next.exit() != exit || !matches(next) {
            return Err(HookError::Diverged { exit_index: exit, expected: what(next), found: found.to_string() });
        }
        self.consumed.fetch_add(1, Ordering::SeqCst);
        self.next.take().ok_or(HookError::Ended { exit_index: exit })
    }
}

impl InputSource for Replayer {
    fn on_exit(&mut self, exit: ExitIndex, _kind: &ExitKind) -> Result<(), HookError> {
        // Barriers and faults logged up to this exit count as consumed
        // before this exit's outputs, as they stood in the primary's log
        // before the same outputs (the primary logs a barrier at a health
        // report's exit, which outputs nothing). Never waits: they are in
        // the queue already when they matter (the vCPU is held at the last
        // barrier received).
        loop {
            match &self.next {
                Some(Record::Barrier { exit: at } | Record::Fault { exit: at, .. }) if *at <= exit => self.pass(),
                Some(_) => break,
                None if self.shutdown_at.is_some() || self.switched => break,
                None => match self.records.try_recv() {
                    Ok(r) => self.note(r),
                    Err(_) => break,
                },
            }
        }
        // A record for an earlier exit than this one was never consumed: the
        // guest skipped an input the primary's guest took.
        if let Some(next) = &self.next {
            if next.exit() < exit {
                return Err(HookError::Diverged {
                    exit_index: exit,
                    expected: what(next),
                    found: format!("no input consumed before exit {exit}"),
                });
            }
        }
        match self.shutdown_at {
            Some(at) if exit > at => Err(HookError::Ended { exit_index: exit }),
            _ => Ok(()),
        }
    }

    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        match self.take(exit, "a clock reading", |r| matches!(r, Record::Clock { .. }))? {
            Record::Clock { ns, .. } => {
                let ns = match self.skew_at {
                    Some(at) if exit >= at => ns.wrapping_add(1),
                    _ => ns,
                };
                self.last_clock = ns;
                Ok(ns)
            }
            _ => Err(HookError::Ended { exit_index: exit }),
        }
    }

    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        let len = buf.len();
        let found = format!("{len} entropy bytes");
        match self.take(exit, &found, |r| matches!(r, Record::Entropy { bytes, .. } if bytes.len() == len))? {
            Record::Entropy { bytes, .. } => {
                buf.copy_from_slice(&bytes);
                Ok(())
            }
            _ => Err(HookError::Ended { exit_index: exit }),
        }
    }

    fn halt(&mut self, _exit: ExitIndex, _deadline: Option<u64>) -> Result<Wake, HookError> {
        Ok(Wake::Deadline)
    }

    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        match self.take(exit, "a frame poll", |r| matches!(r, Record::Frame { .. }))? {
            Record::Frame { frame, .. } if frame.is_empty() => Ok(None),
            Record::Frame { frame, .. } => Ok(Some(frame.to_vec())),
            _ => Err(HookError::Ended { exit_index: exit }),
        }
    }

    fn digest(&mut self, exit: ExitIndex, d: &StateDigest) -> Result<(), HookError> {
        let found = format!("digest vcpu={:#018x} devices={:#018x} memory={:#018x}", d.vcpu, d.devices, d.memory);
        self.take(exit, &found, |r| {
            matches!(r, Record::Digest { vcpu, devices, memory, .. }
                if *vcpu == d.vcpu && *devices == d.devices && *memory == d.memory)
        })?;
        self.digests_checked += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::hook::ExitKind;

    fn at(r: &mut Replayer, exit: u64) {
        r.on_exit(ExitIndex(exit), &ExitKind::Hlt).unwrap();
    }

    /// `consumed` is the primary's log position at the same exit: barriers
    /// count where the primary logged them, not later and not sooner. (It
    /// used to leave them out: the replay lag then grew by one record per
    /// barrier, and a healthy secondary was declared lost after ~10 s of a
    /// client's INCRs; held outputs were tagged short of their position.)
    #[test]
    fn barriers_count_as_positions_at_their_exit() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let consumed = Arc::new(AtomicU64::new(0));
        let mut r = Replayer::new(rx, StopHandle::detached().unwrap(), consumed.clone());
        for rec in [
            Record::Clock { exit: ExitIndex(1), ns: 10 },
            Record::Barrier { exit: ExitIndex(2) },
            Record::Clock { exit: ExitIndex(4), ns: 20 },
            Record::Barrier { exit: ExitIndex(6) },
            Record::Barrier { exit: ExitIndex(7) },
            Record::Clock { exit: ExitIndex(9), ns: 30 },
        ] {
            tx.send(rec).unwrap();
        }
        at(&mut r, 1);
        assert_eq!(r.clock_ns(ExitIndex(1)).unwrap(), 10);
        assert_eq!(consumed.load(Ordering::SeqCst), 1);
        at(&mut r, 2);
        assert_eq!(consumed.load(Ordering::SeqCst), 2, "the barrier at exit 2 counts at exit 2");
        at(&mut r, 4);
        assert_eq!(r.clock_ns(ExitIndex(4)).unwrap(), 20);
        at(&mut r, 5);
        assert_eq!(consumed.load(Ordering::SeqCst), 3, "the barrier at exit 6 does not count at exit 5");
        at(&mut r, 6);
        assert_eq!(consumed.load(Ordering::SeqCst), 4);
        // An input needed past barriers not yet counted passes them.
        assert_eq!(r.clock_ns(ExitIndex(9)).unwrap(), 30);
        assert_eq!(consumed.load(Ordering::SeqCst), 6);
    }

    #[test]
    fn a_switchover_record_ends_the_log_without_ending_the_guest() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(Record::Clock { exit: ExitIndex(1), ns: 7 }).unwrap();
        tx.send(Record::Switchover { exit: ExitIndex(2) }).unwrap();
        let stop = StopHandle::detached().unwrap();
        let mut replayer = Replayer::new(rx, stop, Arc::new(AtomicU64::new(0)));
        assert_eq!(replayer.clock_ns(ExitIndex(1)).unwrap(), 7);
        assert!(matches!(replayer.clock_ns(ExitIndex(3)), Err(HookError::Ended { .. })));
        assert!(replayer.switchover_seen() && !replayer.shutdown_seen());
        // The guest runs on past the switch (live, once the decision is in):
        // no exit is refused as past an end.
        assert!(replayer.on_exit(ExitIndex(4), &ExitKind::Hlt).is_ok());
        // Nothing after the switchover is served from the log.
        tx.send(Record::Clock { exit: ExitIndex(5), ns: 9 }).unwrap();
        assert!(matches!(replayer.clock_ns(ExitIndex(5)), Err(HookError::Ended { .. })));
        assert_eq!(replayer.consumed(), 1);
    }
}
