//! The output rule on the primary: an output produced at log position p is
//! released only after the secondary acknowledged every record up to p.
//!
//! The vCPU thread never waits: an output that may go out at once (the
//! secondary already holds everything up to p, and nothing is queued before
//! it) is written straight away; any other is queued, a flush of the log is
//! requested, and the releaser thread writes it when the ack arrives. Outputs
//! leave in the order the guest produced them.
//!
//! Held outputs are bounded in bytes ([`DEFAULT_MAX_HELD_BYTES`]): an output
//! that takes them past the bound is queued, and then the vCPU waits until
//! acks bring them back under it, as a guest waits on a full NIC queue. A
//! secondary that stops acking cannot make the primary grow without limit;
//! what happens to such a secondary is the failover policy's business.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::hook::{ExitIndex, GuestSignal, HookError, OutputSink};

use crate::log::LogShared;
use crate::record::LogPosition;

/// One output waiting for its ack.
enum Held {
    Serial(Vec<u8>),
    Frame(Vec<u8>),
}

/// Outputs the releaser writes under one hold of the gate's lock.
const RELEASE_BURST: usize = 32;

/// Bytes of held outputs past which the guest's output side waits.
pub const DEFAULT_MAX_HELD_BYTES: usize = 32 << 20;

/// Asked while the vCPU waits for room: `true` ends the wait (the guest is
/// being stopped).
pub type Abort = Box<dyn Fn() -> bool + Send + Sync>;

struct Gate<S> {
    sink: S,
    held: VecDeque<(LogPosition, ExitIndex, Held, Instant)>,
    /// Bytes in `held`.
    held_bytes: usize,
    max_held_bytes: usize,
    /// The vCPU is waiting for room right now.
    full: bool,
    abort: Option<Abort>,
    stopped: bool,
    /// How long the last released output waited for its ack, in µs: the
    /// output rule's added latency, about one log round trip.
    last_wait_us: Arc<AtomicU64>,
}

/// The primary's output sink: gates every output behind the acks.
pub struct OutputGate<S> {
    gate: Arc<Mutex<Gate<S>>>,
    log: Arc<LogShared>,
}

/// Releases held outputs as acks arrive; one thread per primary.
pub struct Releaser<S> {
    gate: Arc<Mutex<Gate<S>>>,
    log: Arc<LogShared>,
}

/// An output gate over `sink`, and the releaser that drains it.
pub fn gate<S: OutputSink>(sink: S, log: Arc<LogShared>) -> (OutputGate<S>, Releaser<S>) {
    let gate = Arc::new(Mutex::new(Gate {
        sink,
        held: VecDeque::new(),
        held_bytes: 0,
        max_held_bytes: DEFAULT_MAX_HELD_BYTES,
        full: false,
        abort: None,
        stopped: false,
        last_wait_us: Arc::new(AtomicU64::new(0)),
    }));
    (OutputGate { gate: gate.clone(), log: log.clone() }, Releaser { gate, log })
}

fn lock<S>(m: &Mutex<Gate<S>>) -> std::sync::MutexGuard<'_, Gate<S>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Serial(b) | Held::Frame(b) => b.len(),
        }
    }
}

impl<S: OutputSink> Gate<S> {
    fn emit(&mut self, exit: ExitIndex, out: &Held) -> Result<(), HookError> {
        match out {
            Held::Serial(b) => self.sink.serial(exit, b),
            Held::Frame(f) => self.sink.transmit_frame(exit, f),
        }
    }
}

impl<S: OutputSink> OutputGate<S> {
    fn output(&mut self, exit: ExitIndex, out: Held) -> Result<(), HookError> {
        let pos = self.log.appended();
        let mut gate = lock(&self.gate);
        if gate.held.is_empty() && self.log.releasable(pos) {
            gate.emit(exit, &out)?;
            self.log.set_released(pos);
            return Ok(());
        }
        gate.held_bytes = gate.held_bytes.saturating_add(out.len());
        gate.held.push_back((pos, exit, out, Instant::now()));
        let full = gate.held_bytes > gate.max_held_bytes;
        drop(gate);
        self.log.request_flush();
        if full {
            self.wait_for_room();
        }
        Ok(())
    }

    /// Held outputs are over the bound: wait (the guest's output side is
    /// full) until acks release enough, the gate stops, or the abort check
    /// says the guest is being stopped.
    fn wait_for_room(&self) {
        loop {
            {
                let mut gate = lock(&self.gate);
                let aborted = gate.abort.as_ref().is_some_and(|f| f());
                if gate.held_bytes <= gate.max_held_bytes || gate.stopped || aborted {
                    gate.full = false;
                    return;
                }
                gate.full = true;
            }
            self.log.wait_changed(Duration::from_millis(10));
        }
    }

    /// Outputs waiting for their ack.
    pub fn held(&self) -> usize {
        lock(&self.gate).held.len()
    }
}

impl<S: OutputSink> OutputSink for OutputGate<S> {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.output(exit, Held::Serial(bytes.to_vec()))
    }

    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        self.output(exit, Held::Frame(frame.to_vec()))
    }

    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        lock(&self.gate).sink.signal(exit, signal)
    }
}

impl<S: OutputSink> Releaser<S> {
    /// Release what the acks allow; returns how many outputs went out. The
    /// gate's lock is let go every [`RELEASE_BURST`] outputs: the vCPU
    /// takes it for each output and health report, and a burst of
    /// thousands of frames written under one hold stalled it for 74 ms.
    /// Order is kept: while anything is held the vCPU's outputs queue
    /// behind it.
    pub fn release_ready(&self) -> Result<usize, HookError> {
        let mut n = 0;
        loop {
            let mut gate = lock(&self.gate);
            if gate.stopped {
                // Stopped (wound down, fenced, or the guest faulted): nothing
                // more leaves, whatever acks still arrive.
                return Ok(n);
            }
            let mut burst = 0;
            while let Some((pos, _, _, _)) = gate.held.front() {
                if !self.log.releasable(*pos) || burst == RELEASE_BURST {
                    break;
                }
                let Some((pos, exit, out, since)) = gate.held.pop_front() else { break };
                gate.held_bytes = gate.held_bytes.saturating_sub(out.len());
                gate.emit(exit, &out)?;
                crate::cost::since(crate::cost::Stage::Held, since);
                let waited = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                gate.last_wait_us.store(waited, Ordering::Relaxed);
                self.log.set_released(pos);
                n += 1;
                burst += 1;
            }
            if burst < RELEASE_BURST {
                if gate.held.is_empty() && gate.held.capacity() > 4096 {
                    // A burst held many: give the memory back once drained.
                    gate.held = VecDeque::new();
                }
                return Ok(n);
            }
        }
    }

    /// Set the bound on held bytes past which the guest's output side waits.
    pub fn set_max_held_bytes(&self, max: usize) {
        lock(&self.gate).max_held_bytes = max;
    }

    /// What ends a wait for room early (the guest's stop handle).
    pub fn set_abort(&self, abort: Abort) {
        lock(&self.gate).abort = Some(abort);
    }

    /// Bytes of outputs held.
    pub fn held_bytes(&self) -> usize {
        lock(&self.gate).held_bytes
    }

    /// Whether the guest's output side waits for room now.
    pub fn is_full(&self) -> bool {
        lock(&self.gate).full
    }

    /// Release outputs as acks arrive until [`Releaser::stop`].
    pub fn run(&self) -> Result<(), HookError> {
        loop {
            self.release_ready()?;
            let next = {
                let gate = lock(&self.gate);
                if gate.stopped {
                    return Ok(());
                }
                gate.held.front().map(|(p, _, _, _)| *p)
            };
            match next {
                Some(pos) => {
                    self.log.wait_releasable(pos, Duration::from_millis(50));
                }
                None => self.log.wait_changed(Duration::from_millis(50)),
            }
        }
    }

    /// End [`Releaser::run`].
    pub fn stop(&self) {
        lock(&self.gate).stopped = true;
        self.log.wake_all();
    }

    /// Outputs still held.
    pub fn held(&self) -> usize {
        lock(&self.gate).held.len()
    }

    /// The log position of the oldest output still held.
    pub fn oldest_held(&self) -> Option<LogPosition> {
        lock(&self.gate).held.front().map(|(p, _, _, _)| *p)
    }

    /// The highest position whose outputs have *all* reached the world,
    /// which is what the secondary may forget. Several outputs can share a
    /// position, so "the last released one was at p" is not enough: every
    /// output below the oldest held one is out (they leave in order), and
    /// the guest may still produce outputs at the current position.
    pub fn released_through(&self) -> LogPosition {
        let appended = self.log.appended().0;
        let below_held = self.oldest_held().map_or(appended, |p| p.0);
        LogPosition(appended.min(below_held).saturating_sub(1).min(self.log.released().0))
    }

    /// How long the last released output waited for its ack, in µs.
    pub fn last_wait_us(&self) -> u64 {
        lock(&self.gate).last_wait_us.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);
    impl OutputSink for Sink {
        fn serial(&mut self, _: ExitIndex, b: &[u8]) -> Result<(), HookError> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(())
        }
    }

    #[test]
    fn outputs_wait_for_their_ack_and_released_through_never_covers_a_held_one() {
        let log = Arc::new(LogShared::default());
        let sink = Sink::default();
        let (mut gate, releaser) = gate(sink.clone(), log.clone());
        log.set_acked(LogPosition(0));
        // Two records, then two outputs at position 2.
        log.append(crate::record::Record::Clock { exit: ExitIndex(1), ns: 1 });
        log.append(crate::record::Record::Clock { exit: ExitIndex(2), ns: 2 });
        gate.serial(ExitIndex(3), b"a").unwrap();
        gate.serial(ExitIndex(4), b"b").unwrap();
        assert!(sink.0.lock().unwrap().is_empty(), "released before the ack");
        assert_eq!(gate.held(), 2);
        assert_eq!(releaser.released_through(), LogPosition(0));
        log.set_acked(LogPosition(1));
        releaser.release_ready().unwrap();
        assert!(sink.0.lock().unwrap().is_empty(), "released on an ack short of its position");
        log.set_acked(LogPosition(2));
        assert_eq!(releaser.release_ready().unwrap(), 2);
        assert_eq!(*sink.0.lock().unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        // Position 2 is the current one: the guest may still emit there.
        assert_eq!(releaser.released_through(), LogPosition(1));
        log.append(crate::record::Record::Clock { exit: ExitIndex(5), ns: 3 });
        assert_eq!(releaser.released_through(), LogPosition(2));
    }

    #[test]
    fn past_the_byte_bound_the_guest_waits_until_acks_make_room() {
        let log = Arc::new(LogShared::default());
        let sink = Sink::default();
        let (mut gate, releaser) = gate(sink.clone(), log.clone());
        let releaser = Arc::new(releaser);
        releaser.set_max_held_bytes(1000);
        log.set_acked(LogPosition(0));
        log.append(crate::record::Record::Clock { exit: ExitIndex(1), ns: 1 });
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let guest = {
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..5u64 {
                    gate.serial(ExitIndex(2 + i), &[b'x'; 400]).unwrap();
                    done.store(i + 1, Ordering::SeqCst);
                }
            })
        };
        // 400 + 400 + 400 passes the bound at the third: the guest waits.
        while !releaser.is_full() {
            std::thread::yield_now();
        }
        assert_eq!(done.load(Ordering::SeqCst), 2, "the output that crossed the bound returned");
        assert_eq!(releaser.held_bytes(), 1200);
        assert!(sink.0.lock().unwrap().is_empty());
        // The ack comes: room again, the guest goes on, everything in order.
        log.set_acked(LogPosition(1));
        while done.load(Ordering::SeqCst) < 5 {
            releaser.release_ready().unwrap();
            std::thread::yield_now();
        }
        guest.join().unwrap();
        releaser.release_ready().unwrap();
        assert_eq!(sink.0.lock().unwrap().len(), 5);
        assert_eq!(releaser.held_bytes(), 0);
    }

    #[test]
    fn a_stopping_guest_is_not_held_in_the_wait() {
        let log = Arc::new(LogShared::default());
        let (mut gate, releaser) = gate(Sink::default(), log.clone());
        releaser.set_max_held_bytes(10);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        releaser.set_abort(Box::new(move || s.load(Ordering::SeqCst)));
        log.append(crate::record::Record::Clock { exit: ExitIndex(1), ns: 1 });
        let guest = std::thread::spawn(move || gate.serial(ExitIndex(2), &[0; 100]).unwrap());
        while !releaser.is_full() {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        guest.join().unwrap();
        // Still held: nothing leaves without its ack.
        assert_eq!(releaser.held(), 1);
    }

    #[test]
    fn a_burst_longer_than_one_lock_hold_goes_out_whole_and_in_order() {
        let log = Arc::new(LogShared::default());
        let sink = Sink::default();
        let (mut gate, releaser) = gate(sink.clone(), log.clone());
        log.set_acked(LogPosition(0));
        log.append(crate::record::Record::Clock { exit: ExitIndex(1), ns: 1 });
        let count = RELEASE_BURST * 3 + 5;
        for i in 0..count {
            gate.serial(ExitIndex(2 + i as u64), &i.to_le_bytes()).unwrap();
        }
        log.set_acked(LogPosition(1));
        assert_eq!(releaser.release_ready().unwrap(), count);
        let out = sink.0.lock().unwrap().clone();
        assert_eq!(out, (0..count).map(|i| i.to_le_bytes().to_vec()).collect::<Vec<_>>());
        assert_eq!(releaser.held(), 0);
    }
}
