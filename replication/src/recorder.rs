//! The primary's input source: every value comes from the live world and is
//! appended to the log, tagged with the exit index at which the guest
//! consumed it. Never blocks on the network: appending only queues.
//!
//! What is logged, one record per consumption point, so the replayer never
//! has to guess:
//! - each clock reading and each entropy read;
//! - each time the NIC asks for a received frame: the frame, or an empty
//!   `Frame` record when none was waiting (a real Ethernet frame is never
//!   empty);
//! - each state digest.
//!
//! A HLT sleep is not logged: the secondary does not sleep, and what the
//! guest sees after waking (clock, frames) is logged where it reads it.

use std::sync::Arc;

use bytes::Bytes;
use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, ExitKind, HookError, InputSource, Wake};

use crate::log::LogShared;
use crate::record::Record;

/// Records what the live world gives the guest.
pub struct Recorder<L> {
    live: L,
    log: Arc<LogShared>,
}

impl<L: InputSource> Recorder<L> {
    /// Record what `live` supplies into `log`.
    pub fn new(live: L, log: Arc<LogShared>) -> Self {
        Recorder { live, log }
    }
}

impl<L: InputSource> InputSource for Recorder<L> {
    fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
        self.live.on_exit(exit, kind)
    }

    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        let ns = self.live.clock_ns(exit)?;
        self.log.append(Record::Clock { exit, ns });
        Ok(ns)
    }

    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        self.live.entropy(exit, buf)?;
        self.log.append(Record::Entropy { exit, bytes: Bytes::copy_from_slice(buf) });
        Ok(())
    }

    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        // Outputs may be waiting for acks: make sure the log goes out before
        // the vCPU sleeps.
        self.log.request_flush();
        self.live.halt(exit, deadline)
    }

    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        let frame = self.live.receive_frame(exit)?;
        let logged = frame.as_deref().map(Bytes::copy_from_slice).unwrap_or_default();
        self.log.append(Record::Frame { exit, frame: logged });
        Ok(frame.filter(|f| !f.is_empty()))
    }

    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        self.log.append(Record::Digest { exit, vcpu: digest.vcpu, devices: digest.devices, memory: digest.memory });
        Ok(())
    }
}
