//! Where the time of a protected request goes: per-stage timings of the
//! output path (primary: flush to written (encode, MAC, write), the ack's
//! round trip, release; secondary: receive to ack written; the held time of
//! each output), for `ftvm-bench lockstep --breakdown`.
//!
//! Off unless the environment variable `FTVM_COST_TRACE` names a file: then
//! every stage is timed into a histogram (atomics, no lock on the hot path
//! except the stamps that pair a sent position with its ack), and each
//! session end appends one line per stage to that file:
//! `role stage count p50_us mean_us max_us`. Off, each hook is one relaxed
//! load of a flag.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// One stage of a protected output's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Primary: an output asked for the log to go out (the vCPU thread's
    /// flush) until its frames were written to the socket (encoding, MAC,
    /// the write syscall; before issue 16 also a hand-off to the network
    /// thread, then timed apart as `handoff`).
    EncodeWrite,
    /// Primary: a frame written until the ack that covers it was read (the
    /// link both ways, and all of the secondary's part).
    AckRoundTrip,
    /// Primary: the ack read until the outputs it allows were written to the
    /// TAP device (a task hand-off on the network thread, the writes).
    Release,
    /// Primary: one output held, from the guest's write until its release
    /// (what protection adds to a reply, end to end).
    Held,
    /// Secondary: a records frame decoded until its ack was written.
    ReceiveToAck,
}

const STAGES: [Stage; 5] = [Stage::EncodeWrite, Stage::AckRoundTrip, Stage::Release, Stage::Held, Stage::ReceiveToAck];

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::EncodeWrite => "encode_write",
            Stage::AckRoundTrip => "ack_round_trip",
            Stage::Release => "release",
            Stage::Held => "held",
            Stage::ReceiveToAck => "receive_to_ack",
        }
    }
}

/// Histogram buckets, one per microsecond up to 4 ms, then one overflow.
const BUCKETS: usize = 4096;

struct Acc {
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
    buckets: [AtomicU64; BUCKETS + 1],
}

impl Acc {
    const fn new() -> Acc {
        Acc {
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; BUCKETS + 1],
        }
    }
}

static ACCS: [Acc; 5] = [const { Acc::new() }; 5];
static ON: OnceLock<bool> = OnceLock::new();
static FLAG: AtomicBool = AtomicBool::new(false);

/// Whether timing is on (`FTVM_COST_TRACE` set).
#[inline]
pub fn enabled() -> bool {
    if FLAG.load(Ordering::Relaxed) {
        return true;
    }
    *ON.get_or_init(|| {
        let on = std::env::var_os("FTVM_COST_TRACE").is_some_and(|v| !v.is_empty());
        FLAG.store(on, Ordering::Relaxed);
        on
    })
}

/// Count `took` for `stage` (when timing is on).
pub fn record(stage: Stage, took: Duration) {
    if !enabled() {
        return;
    }
    let Some(i) = STAGES.iter().position(|&s| s == stage) else { return };
    let Some(acc) = ACCS.get(i) else { return };
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    acc.count.fetch_add(1, Ordering::Relaxed);
    acc.sum_ns.fetch_add(ns, Ordering::Relaxed);
    acc.max_ns.fetch_max(ns, Ordering::Relaxed);
    let bucket = usize::try_from(ns / 1000).unwrap_or(BUCKETS).min(BUCKETS);
    if let Some(b) = acc.buckets.get(bucket) {
        b.fetch_add(1, Ordering::Relaxed);
    }
}

/// Count the time since `since` for `stage`.
pub fn since(stage: Stage, since: Instant) {
    record(stage, since.elapsed());
}

/// `Instant::now()` when timing is on.
#[inline]
pub fn stamp() -> Option<Instant> {
    enabled().then(Instant::now)
}

/// Positions written (primary) or received (secondary) and when, until the
/// ack that covers them.
static PENDING: Mutex<VecDeque<(u64, Instant)>> = Mutex::new(VecDeque::new());
/// When the latest ack was read (primary), for [`Stage::Release`].
static ACK_READ: Mutex<Option<Instant>> = Mutex::new(None);

/// Position `last` went out (primary) or came in (secondary) now.
pub fn sent(last: u64) {
    if enabled() {
        let mut p = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
        if p.len() < 1 << 16 {
            p.push_back((last, Instant::now()));
        }
    }
}

/// The ack through `upto` was read (primary, [`Stage::AckRoundTrip`]) or
/// written (secondary, [`Stage::ReceiveToAck`]) now.
pub fn acked(stage: Stage, upto: u64) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    let mut p = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
    while let Some(&(last, at)) = p.front() {
        if last > upto {
            break;
        }
        p.pop_front();
        record(stage, now.saturating_duration_since(at));
    }
    drop(p);
    if stage == Stage::AckRoundTrip {
        *ACK_READ.lock().unwrap_or_else(PoisonError::into_inner) = Some(now);
    }
}

/// The outputs the latest ack allows were written (primary).
pub fn released() {
    if enabled() {
        if let Some(at) = ACK_READ.lock().unwrap_or_else(PoisonError::into_inner).take() {
            since(Stage::Release, at);
        }
    }
}

/// The figures so far: `(stage, count, p50 µs, mean µs, max µs)` for each
/// stage that saw anything.
pub fn figures() -> Vec<(&'static str, u64, f64, f64, f64)> {
    let mut out = Vec::new();
    for (stage, acc) in STAGES.iter().zip(ACCS.iter()) {
        let count = acc.count.load(Ordering::Relaxed);
        if count == 0 {
            continue;
        }
        let half = count.div_ceil(2);
        let mut seen = 0u64;
        let mut p50 = BUCKETS as f64;
        for (i, b) in acc.buckets.iter().enumerate() {
            seen = seen.saturating_add(b.load(Ordering::Relaxed));
            if seen >= half {
                p50 = i as f64 + 0.5;
                break;
            }
        }
        let mean = acc.sum_ns.load(Ordering::Relaxed) as f64 / count as f64 / 1000.0;
        let max = acc.max_ns.load(Ordering::Relaxed) as f64 / 1000.0;
        out.push((stage.name(), count, p50, mean, max));
    }
    out
}

/// Append the figures, one line per stage, to the file `FTVM_COST_TRACE`
/// names (when timing is on). `role` starts each line.
pub fn report(role: &str) {
    if !enabled() {
        return;
    }
    let Some(path) = std::env::var_os("FTVM_COST_TRACE") else { return };
    let mut text = String::new();
    for (stage, count, p50, mean, max) in figures() {
        text.push_str(&format!("{role} {stage} {count} {p50:.1} {mean:.1} {max:.1}\n"));
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
    if let Ok(mut f) = file {
        let _ = f.write_all(text.as_bytes());
    }
}

/// Reports the figures when dropped (a session's writer, however it ends).
pub struct ReportOnDrop(pub &'static str);

impl Drop for ReportOnDrop {
    fn drop(&mut self) {
        report(self.0);
    }
}
