//! The primary's log tail: records the vCPU thread appended and the logging
//! channel has not taken yet, and the positions the output rule compares.
//!
//! The vCPU thread never waits here: appending takes an uncontended mutex
//! for a few nanoseconds. The channel side takes whole batches.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::record::{LogPosition, Record};

/// No secondary has acknowledged anything yet.
const NO_ACK: u64 = u64::MAX;

#[derive(Default)]
struct Tail {
    /// Position of the first record in `pending`.
    first: u64,
    pending: Vec<Record>,
    flush: bool,
}

/// Shared between the vCPU thread (appends, reads positions) and the
/// channel (takes batches, stores acks).
pub struct LogShared {
    tail: Mutex<Tail>,
    /// Signalled when records are appended with a flush request, or when an
    /// ack or a release arrives.
    changed: Condvar,
    /// Records appended so far: the log position of the latest record.
    appended: AtomicU64,
    /// The highest position the secondary acknowledged, or NO_ACK.
    acked: AtomicU64,
    /// The highest position whose outputs were released to the world.
    released: AtomicU64,
    /// Ships the log tail at once, on the calling thread (set by whoever
    /// owns the channel); without it a flush request only wakes the shipper.
    flusher: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// `--output-mode strict`: an output is releasable only once a barrier
    /// logged after it is acknowledged.
    strict: AtomicBool,
    /// Positions of barriers appended and not yet acknowledged (strict).
    barriers: Mutex<std::collections::VecDeque<u64>>,
    /// The highest acknowledged barrier's position (strict).
    acked_barrier: AtomicU64,
    /// Every output may go (the primary runs alone, unprotected).
    unprotected: AtomicBool,
}

impl Default for LogShared {
    fn default() -> Self {
        LogShared {
            tail: Mutex::new(Tail { first: 1, ..Tail::default() }),
            changed: Condvar::new(),
            appended: AtomicU64::new(0),
            acked: AtomicU64::new(NO_ACK),
            released: AtomicU64::new(0),
            flusher: OnceLock::new(),
            strict: AtomicBool::new(false),
            barriers: Mutex::new(std::collections::VecDeque::new()),
            acked_barrier: AtomicU64::new(0),
            unprotected: AtomicBool::new(false),
        }
    }
}

impl LogShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        // A poisoned lock means a thread panicked while appending: the data
        // (a Vec and counters) is still consistent, so go on.
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append a record; its position.
    pub fn append(&self, record: Record) -> LogPosition {
        let barrier = matches!(record, Record::Barrier { .. });
        let mut tail = self.lock();
        tail.pending.push(record);
        let pos = self.appended.fetch_add(1, Ordering::SeqCst) + 1;
        drop(tail);
        // Alone, nobody acknowledges barriers: none is kept (a repair's
        // `set_protected` starts the bookkeeping over).
        if barrier && self.strict.load(Ordering::SeqCst) && !self.unprotected.load(Ordering::SeqCst) {
            self.barriers.lock().unwrap_or_else(|e| e.into_inner()).push_back(pos);
        }
        LogPosition(pos)
    }

    /// `--output-mode strict`: from now on an output produced at position p
    /// is released only once a barrier at a position after p (logged after
    /// the output) is acknowledged, so no output a client saw can be rolled
    /// back by a containment. Set before the guest runs.
    pub fn set_strict(&self, strict: bool) {
        self.strict.store(strict, Ordering::SeqCst);
    }

    /// Whether outputs wait for an acknowledged barrier.
    pub fn is_strict(&self) -> bool {
        self.strict.load(Ordering::SeqCst)
    }

    /// The primary runs alone (it won the arbiter): every output may go.
    pub fn set_unprotected(&self) {
        self.unprotected.store(true, Ordering::SeqCst);
        self.set_acked(LogPosition(u64::MAX / 2));
    }

    /// The primary is paired again (a new secondary holds its state as of
    /// position `covered`): outputs wait for acks again, and nothing past
    /// `covered` counts as acknowledged until the new secondary says so.
    pub fn set_protected(&self, covered: LogPosition) {
        self.acked.store(covered.0, Ordering::SeqCst);
        self.unprotected.store(false, Ordering::SeqCst);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Whether the secondary acknowledged every record up to `pos`.
    pub fn is_acked(&self, pos: LogPosition) -> bool {
        self.acked().is_some_and(|a| a >= pos)
    }

    /// Ask the channel to send what it has now (an output is waiting). With
    /// a flusher set, the log tail is handed to the channel right here: an
    /// output's wait for its ack then starts without a thread hand-off.
    pub fn request_flush(&self) {
        self.lock().flush = true;
        self.changed.notify_all();
        if let Some(flush) = self.flusher.get() {
            flush();
        }
    }

    /// Set the function [`LogShared::request_flush`] calls to ship the log
    /// tail at once. It must be cheap and never block on the network.
    pub fn set_flusher(&self, flusher: impl Fn() + Send + Sync + 'static) {
        let _ = self.flusher.set(Box::new(flusher));
    }

    /// The position of the latest record appended.
    pub fn appended(&self) -> LogPosition {
        LogPosition(self.appended.load(Ordering::SeqCst))
    }

    /// Take every pending record: (position of the first, records, whether a
    /// flush was asked).
    pub fn take(&self) -> (LogPosition, Vec<Record>, bool) {
        let mut tail = self.lock();
        let first = tail.first;
        let records = std::mem::take(&mut tail.pending);
        tail.first += records.len() as u64;
        let flush = std::mem::take(&mut tail.flush);
        (LogPosition(first), records, flush)
    }

    /// Wait until a flush is requested or `timeout` passes.
    pub fn wait_flush(&self, timeout: std::time::Duration) {
        let tail = self.lock();
        if tail.flush {
            return;
        }
        let _ = self.changed.wait_timeout(tail, timeout);
    }

    /// Wait for any change (append with flush, ack, release, stop) or
    /// `timeout`.
    pub fn wait_changed(&self, timeout: std::time::Duration) {
        let tail = self.lock();
        let _ = self.changed.wait_timeout(tail, timeout);
    }

    /// The secondary acknowledged every record up to `upto`.
    pub fn set_acked(&self, upto: LogPosition) {
        let _ = self
            .acked
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |old| (old == NO_ACK || upto.0 > old).then_some(upto.0));
        if self.strict.load(Ordering::SeqCst) {
            let mut barriers = self.barriers.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(&b) = barriers.front() {
                if b > upto.0 {
                    break;
                }
                self.acked_barrier.fetch_max(b, Ordering::SeqCst);
                barriers.pop_front();
            }
        }
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// The highest acknowledged position, `None` before the secondary
    /// acknowledged anything.
    pub fn acked(&self) -> Option<LogPosition> {
        match self.acked.load(Ordering::SeqCst) {
            NO_ACK => None,
            p => Some(LogPosition(p)),
        }
    }

    /// Whether an output produced at `pos` (the log position when the
    /// guest produced it) may be released now: `fast`, once every record up
    /// to `pos` is acknowledged; `strict`, once a barrier logged after the
    /// output (at a position above `pos`) is acknowledged.
    pub fn releasable(&self, pos: LogPosition) -> bool {
        if self.unprotected.load(Ordering::SeqCst) {
            return true;
        }
        if self.strict.load(Ordering::SeqCst) {
            return self.acked_barrier.load(Ordering::SeqCst) > pos.0;
        }
        self.is_acked(pos)
    }

    /// Wait until `pos` is releasable or `timeout` passes.
    pub fn wait_releasable(&self, pos: LogPosition, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut tail = self.lock();
        loop {
            if self.releasable(pos) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            tail = self.changed.wait_timeout(tail, left).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Outputs up to `upto` reached the world.
    pub fn set_released(&self, upto: LogPosition) {
        self.released.fetch_max(upto.0, Ordering::SeqCst);
    }

    /// The highest position whose outputs were released.
    pub fn released(&self) -> LogPosition {
        LogPosition(self.released.load(Ordering::SeqCst))
    }

    /// Wake every waiter (shutdown).
    pub fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }
}
