//! The secondary's output sink: outputs are suppressed, never emitted, but
//! kept with the log position they were produced at until the primary
//! reports them released. Those still held at go-live may never have reached
//! the world and are re-emitted then (duplicates are possible, losses not).
//!
//! A released frame is not yet a frame on the wire: the primary writes it to
//! its TAP, and a host that dies right then takes the frames still queued in
//! its bridge or NIC with it. So the primary reports an output released only
//! once it has lived [`RELEASE_REPORT_DELAY`] past its release (see the
//! shipper in the `pair` crate): a report is itself the proof that the host
//! outlived its outputs' way out. An output whose report never came (the
//! host died) is re-emitted at go-live: a few duplicates, which TCP and a
//! numbered stream discard, rather than a hole. This holds by construction
//! at any output rate, with no window or cap on the secondary's side.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm::hook::{ExitIndex, HookError, OutputSink};

/// An output the secondary's guest produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Serial bytes.
    Serial(Vec<u8>),
    /// A transmitted frame.
    Frame(Vec<u8>),
}

/// How long the primary must have lived past an output's release before it
/// reports it released (see the module documentation): far longer than a
/// frame takes to leave a working host.
pub const RELEASE_REPORT_DELAY: Duration = Duration::from_millis(20);

/// Held outputs, shared with whoever learns the primary's released-up-to.
#[derive(Default)]
pub struct HeldOutputs {
    queues: Mutex<Queues>,
    released: AtomicU64,
}

/// What [`HeldOutputs`] keeps, under one lock.
#[derive(Default)]
struct Queues {
    /// Outputs not yet reported released: (log position, exit, output).
    held: VecDeque<(u64, ExitIndex, Output)>,
}

impl HeldOutputs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary reports every output up to `upto` released (and that it
    /// lived [`RELEASE_REPORT_DELAY`] past that): stop holding them.
    pub fn released(&self, upto: u64) {
        self.released.fetch_max(upto, Ordering::SeqCst);
        let upto = self.released.load(Ordering::SeqCst);
        let mut q = self.lock();
        while q.held.front().is_some_and(|(p, _, _)| *p <= upto) {
            q.held.pop_front();
        }
        if q.held.is_empty() && q.held.capacity() > 4096 {
            q.held = VecDeque::new();
        }
    }

    /// A planned switchover: the primary released every output up to its
    /// guest's exit `exit` (it stood still there): stop holding those. What
    /// this copy produced past `exit` (replaying up to its first input past
    /// it) the primary never did: that stays, for the go-live.
    pub fn released_through_exit(&self, exit: ExitIndex) {
        self.lock().held.retain(|(_, at, _)| *at > exit);
    }

    /// Outputs held now.
    pub fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.lock().held.is_empty()
    }

    /// Take every held output, oldest first (go-live re-emits them).
    pub fn drain(&self) -> Vec<(ExitIndex, Output)> {
        self.lock().held.drain(..).map(|(_, e, o)| (e, o)).collect()
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
    fn go_live_re_emits_every_output_not_reported_released_in_order() {
        let held = Arc::new(HeldOutputs::default());
        let position = Arc::new(AtomicU64::new(0));
        let mut sink = Suppressor::new(held.clone(), position.clone());
        for n in 1..=6u8 {
            position.store(u64::from(n), Ordering::SeqCst);
            sink.transmit_frame(ExitIndex(u64::from(n)), &[n]).unwrap();
        }
        position.store(7, Ordering::SeqCst);
        sink.serial(ExitIndex(7), b"x").unwrap();
        held.released(2);
        held.released(1); // reports only move forward
        assert_eq!(held.len(), 5);
        let out: Vec<_> = held.drain().into_iter().map(|(_, o)| o).collect();
        assert_eq!(out, vec![frame(3), frame(4), frame(5), frame(6), Output::Serial(b"x".to_vec())]);
        assert!(held.is_empty() && held.drain().is_empty());
    }

    #[test]
    fn a_switchover_forgets_the_outputs_up_to_its_exit_and_keeps_the_later_ones() {
        let held = Arc::new(HeldOutputs::default());
        let position = Arc::new(AtomicU64::new(4));
        let mut sink = Suppressor::new(held.clone(), position);
        // The same log position: no input between them.
        for n in 1..=4u8 {
            sink.transmit_frame(ExitIndex(10 + u64::from(n)), &[n]).unwrap();
        }
        held.released_through_exit(ExitIndex(12));
        let out: Vec<_> = held.drain();
        assert_eq!(out, vec![(ExitIndex(13), frame(3)), (ExitIndex(14), frame(4))]);
    }

    #[test]
    fn an_output_produced_below_the_reported_position_is_not_kept() {
        let held = Arc::new(HeldOutputs::default());
        let position = Arc::new(AtomicU64::new(3));
        held.released(5);
        let mut sink = Suppressor::new(held.clone(), position);
        sink.transmit_frame(ExitIndex(3), &[3]).unwrap();
        assert!(held.is_empty());
    }

    #[test]
    fn thousands_of_unreported_frames_are_all_kept() {
        // No cap: at 20 000 frames/s the report delay covers 400 of them.
        let held = Arc::new(HeldOutputs::default());
        let position = Arc::new(AtomicU64::new(0));
        let mut sink = Suppressor::new(held.clone(), position.clone());
        for n in 1..=5000u64 {
            position.store(n, Ordering::SeqCst);
            sink.transmit_frame(ExitIndex(n), &[0; 16]).unwrap();
        }
        held.released(1000);
        assert_eq!(held.drain().len(), 4000);
    }
}
