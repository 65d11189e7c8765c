//! The secondary's output sink: outputs are suppressed, never emitted, but
//! kept with the log position they were produced at until the primary
//! reports them released. Those still held at go-live may never have reached
//! the world and are re-emitted then (duplicates are possible, losses not).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm::hook::{ExitIndex, HookError, OutputSink};

/// An output the secondary's guest produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Serial bytes.
    Serial(Vec<u8>),
    /// A transmitted frame.
    Frame(Vec<u8>),
}

/// Held outputs, shared with whoever learns the primary's released-up-to.
#[derive(Default)]
pub struct HeldOutputs {
    held: Mutex<VecDeque<(u64, ExitIndex, Output)>>,
    released: AtomicU64,
}

impl HeldOutputs {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, ExitIndex, Output)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary released every output up to `upto`: forget them.
    pub fn released(&self, upto: u64) {
        self.released.fetch_max(upto, Ordering::SeqCst);
        let upto = self.released.load(Ordering::SeqCst);
        let mut held = self.lock();
        while held.front().is_some_and(|(p, _, _)| *p <= upto) {
            held.pop_front();
        }
    }

    /// Outputs held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Take every held output, oldest first (go-live re-emits them).
    pub fn drain(&self) -> Vec<(ExitIndex, Output)> {
        self.lock().drain(..).map(|(_, e, o)| (e, o)).collect()
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
        self.held.lock().push_back((pos, exit, out));
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
