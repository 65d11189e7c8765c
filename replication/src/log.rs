//! The primary's log tail: records the vCPU thread appended and the logging
//! channel has not taken yet, and the positions the output rule compares.
//!
//! The vCPU thread never waits here: appending takes an uncontended mutex
//! for a few nanoseconds. The channel side takes whole batches.

use std::sync::atomic::{AtomicU64, Ordering};
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
        let mut tail = self.lock();
        tail.pending.push(record);
        let pos = self.appended.fetch_add(1, Ordering::SeqCst) + 1;
        LogPosition(pos)
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

    /// Whether an output produced at `pos` may be released now.
    pub fn releasable(&self, pos: LogPosition) -> bool {
        self.acked().is_some_and(|a| a >= pos)
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
