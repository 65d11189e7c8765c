//! An input source wrapper that publishes the exit index and the log
//! position on the status board as the guest runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, ExitKind, HookError, InputSource, Wake};

use crate::status::Board;

/// Where the log position comes from (the primary's log, or the
/// secondary's count of records replayed).
pub(crate) type Position = Arc<dyn Fn() -> u64 + Send + Sync>;

pub(crate) struct Observed<I> {
    pub(crate) inner: I,
    pub(crate) board: Arc<Board>,
    pub(crate) position: Position,
}

impl<I> Observed<I> {
    fn publish(&self) {
        self.board.log_position.store((self.position)(), Ordering::Relaxed);
    }
}

impl<I: InputSource> InputSource for Observed<I> {
    fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
        self.board.exit_index.store(exit.0, Ordering::Relaxed);
        self.inner.on_exit(exit, kind)
    }
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        let r = self.inner.clock_ns(exit);
        self.publish();
        r
    }
    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        let r = self.inner.entropy(exit, buf);
        self.publish();
        r
    }
    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        self.inner.halt(exit, deadline)
    }
    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        let r = self.inner.receive_frame(exit);
        self.publish();
        r
    }
    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        let r = self.inner.digest(exit, digest);
        self.publish();
        r
    }
}
