//! The secondary's output sink: outputs are suppressed, never emitted, but
//! kept with the log position they were produced at until the primary
//! reports them released. Those still held at go-live may never have reached
//! the world and are re-emitted then (duplicates are possible, losses not).
//!
//! A released frame is not yet a frame on the wire: the primary writes it to
//! its TAP and then says "released", and a host that dies right then takes
//! the frames still queued in its bridge or NIC with it. So frames released
//! less than [`RELEASED_RETAIN`] before the latest "released" report are
//! kept too (at most [`RELEASED_RETAIN_MAX`]) and re-emitted at go-live,
//! before the held ones: a few duplicates, which TCP and a numbered stream
//! discard, rather than a hole. Serial bytes are not retained: the primary's
//! console is on the primary's host, not a stream the secondary continues.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::hook::{ExitIndex, HookError, OutputSink};

/// An output the secondary's guest produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Serial bytes.
    Serial(Vec<u8>),
    /// A transmitted frame.
    Frame(Vec<u8>),
}

/// How long before the latest "released" report a released frame is still
/// re-emitted at go-live (see the module documentation).
pub const RELEASED_RETAIN: Duration = Duration::from_millis(20);
/// At most this many released frames are retained.
pub const RELEASED_RETAIN_MAX: usize = 256;

/// Held outputs, shared with whoever learns the primary's released-up-to.
#[derive(Default)]
pub struct HeldOutputs {
    queues: Mutex<Queues>,
    released: AtomicU64,
}

/// What [`HeldOutputs`] keeps, under one lock.
#[derive(Default)]
struct Queues {
    /// Outputs not yet released: (log position, exit, output).
    held: VecDeque<(u64, ExitIndex, Output)>,
    /// Frames released recently: (when the report came, exit, frame).
    recent: VecDeque<(Instant, ExitIndex, Output)>,
}

impl HeldOutputs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary released every output up to `upto`: stop holding them
    /// (frames stay retained for a while, see the module documentation).
    pub fn released(&self, upto: u64) {
        self.released_at(upto, Instant::now());
    }

    fn released_at(&self, upto: u64, now: Instant) {
        self.released.fetch_max(upto, Ordering::SeqCst);
        let upto = self.released.load(Ordering::SeqCst);
        let mut q = self.lock();
        while q.held.front().is_some_and(|(p, _, _)| *p <= upto) {
            if let Some((_, exit, out @ Output::Frame(_))) = q.held.pop_front() {
                q.recent.push_back((now, exit, out));
            }
        }
        while q.recent.front().is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > RELEASED_RETAIN)
            || q.recent.len() > RELEASED_RETAIN_MAX
        {
            q.recent.pop_front();
        }
    }

    /// Outputs held now.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.lock().held.is_empty()
    }

    /// Take the recently released frames and every held output, oldest
    /// first (go-live re-emits them).
    pub fn drain(&self) -> Vec<(ExitIndex, Output)> {
        let mut q = self.lock();
        let recent = q.recent.drain(..).map(|(_, e, o)| (e, o));
        let mut out: Vec<_> = recent.collect();
        out.extend(q.held.drain(..).map(|(_, e, o)| (e, o)));
        out
    }
}

/// The secondary's output sink.
pub struct Suppressor {
    held: Arc<HeldOutputs>,
    position: Arc<AtomicU64>,
}

impl Suppressor {
    /// Keep outputs in `held`, tagged with the replay position read from
    /// `position` (records consumed so far).
    pub fn new(held: Arc<HeldOutputs>, position: Arc<AtomicU64>) -> Self {
        Suppressor { held, position }
    }

    fn keep(&self, exit: ExitIndex, out: Output) {
        let pos = self.position.load(Ordering::SeqCst);
        if pos <= self.held.released.load(Ordering::SeqCst) {
            // The primary already released it: nothing to keep.
            return;
        }
        self.held.lock().held.push_back((pos, exit, out));
    }
}

impl OutputSink for Suppressor {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.keep(exit, Output::Serial(bytes.to_vec()));
        Ok(())
    }

    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        self.keep(exit, Output::Frame(frame.to_vec()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Output {
        Output::Frame(vec![n])
    }

    #[test]
    fn go_live_re_emits_frames_released_just_before_the_last_report_and_everything_held() {
        let held = Arc::new(HeldOutputs::default());
        let position = Arc::new(AtomicU64::new(0));
        let mut sink = Suppressor::new(held.clone(), position.clone());
        let t0 = Instant::now();
        for n in 1..=6u8 {
            position.store(u64::from(n), Ordering::SeqCst);
            sink.transmit_frame(ExitIndex(u64::from(n)), &[n]).unwrap();
        }
        position.store(7, Ordering::SeqCst);
        sink.serial(ExitIndex(7), b"x").unwrap();
        position.store(8, Ordering::SeqCst);
        sink.transmit_frame(ExitIndex(8), &[8]).unwrap();
        // 1 and 2 released long before the last report; 3 and 4 just before
        // it; the serial bytes at 7 released with it; 8 still held.
        held.released_at(2, t0);
        held.released_at(4, t0 + RELEASED_RETAIN);
        held.released_at(7, t0 + RELEASED_RETAIN + Duration::from_millis(1));
        assert_eq!(held.len(), 1);
        let out: Vec<_> = held.drain().into_iter().map(|(_, o)| o).collect();
        assert_eq!(out, vec![frame(3), frame(4), frame(5), frame(6), frame(8)]);
        assert!(held.is_empty() && held.drain().is_empty());
    }

    #[test]
    fn retained_frames_are_bounded_in_number() {
        let held = HeldOutputs::default();
        {
            let mut q = held.lock();
            for n in 0..(RELEASED_RETAIN_MAX as u64 + 10) {
                q.held.push_back((n + 1, ExitIndex(n), frame(n as u8)));
            }
        }
        held.released_at(u64::MAX, Instant::now());
        assert_eq!(held.drain().len(), RELEASED_RETAIN_MAX);
    }
}
