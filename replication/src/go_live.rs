//! Go-live: the secondary becomes the live copy of the guest.
//!
//! Until a decision is made the secondary replays; when its input source
//! reaches the end of the log (every received record consumed, the channel
//! gone), it waits for the failover decision. On [`Decision::GoLive`] it
//! attaches the real world *at that very input*: the live input source (its
//! clock continuing from the last logged reading), the live output sink (its
//! TAP opened now), and re-emits, oldest first, every output the primary may
//! not have released (duplicates are possible, losses are not). On
//! [`Decision::Stop`] replay ends (the other copy lives). The exit index
//! simply goes on: the guest never notices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, ExitKind, GuestSignal, HookError, InputSource, OutputSink, Wake};
use vmm::vcpu::StopHandle;

use crate::replayer::{ReplayLimits, Replayer};
use crate::suppressed::{HeldOutputs, Output, Suppressor};

/// What the failover logic decided for this secondary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The primary is gone and this side won the arbiter: go live.
    GoLive,
    /// The primary's guest faulted and handed over, and this side won the
    /// arbiter: go live from the last barrier, never replaying into the
    /// fault.
    Contain,
    /// Replay ends here (the other side lives, or the process stops).
    Stop,
}

/// The live world, built at go-live from the last logged clock reading.
pub struct LiveWorld {
    /// The live input source (clock from the given offset, entropy, TAP).
    pub input: Box<dyn InputSource>,
    /// The live output sink (serial, TAP).
    pub output: Box<dyn OutputSink>,
}

/// Builds the live world at go-live; gets the clock offset (ns).
pub type Attach = Box<dyn FnOnce(u64) -> Result<LiveWorld, HookError> + Send>;

/// Outputs: suppressed while replaying, live after go-live.
pub struct SwitchOutput {
    suppressor: Suppressor,
    live: Arc<Mutex<Option<Box<dyn OutputSink>>>>,
}

impl SwitchOutput {
    /// Suppress into `held` at the replay `position` until go-live.
    pub fn new(held: Arc<HeldOutputs>, position: Arc<AtomicU64>) -> (SwitchOutput, LiveSlot) {
        let live = Arc::new(Mutex::new(None));
        (SwitchOutput { suppressor: Suppressor::new(held, position), live: live.clone() }, LiveSlot(live))
    }

    fn with_live<R>(&mut self, f: impl FnOnce(&mut dyn OutputSink) -> R) -> Option<R> {
        let mut slot = self.live.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_mut().map(|sink| f(sink.as_mut()))
    }
}

/// Where the live sink goes at go-live.
#[derive(Clone)]
pub struct LiveSlot(Arc<Mutex<Option<Box<dyn OutputSink>>>>);

impl OutputSink for SwitchOutput {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        match self.with_live(|s| s.serial(exit, bytes)) {
            Some(r) => r,
            None => self.suppressor.serial(exit, bytes),
        }
    }

    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        match self.with_live(|s| s.transmit_frame(exit, frame)) {
            Some(r) => r,
            None => self.suppressor.transmit_frame(exit, frame),
        }
    }

    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        self.with_live(|s| s.signal(exit, signal)).unwrap_or(Ok(()))
    }
}

/// Inputs: from the log while replaying, from the live world after go-live.
pub struct SwitchInput {
    replayer: Replayer,
    live: Option<Box<dyn InputSource>>,
    decisions: Receiver<Decision>,
    attach: Option<Attach>,
    slot: LiveSlot,
    held: Arc<HeldOutputs>,
    stop: StopHandle,
    /// The exit index at which the guest went live (0: not live).
    went_live_at: Arc<AtomicU64>,
    /// Where replay must hold (barriers, a fault).
    limits: Arc<ReplayLimits>,
    /// A plain failover was decided: replay everything received.
    lifted: bool,
    /// A decision read while holding, for the end of the log.
    pending: Option<Decision>,
}

impl SwitchInput {
    /// Replay with `replayer`; on a go-live decision from `decisions`, build
    /// the live world with `attach`, put its sink in `slot`, re-emit what
    /// `held` still holds.
    pub fn new(
        replayer: Replayer,
        decisions: Receiver<Decision>,
        attach: Attach,
        slot: LiveSlot,
        held: Arc<HeldOutputs>,
        stop: StopHandle,
        went_live_at: Arc<AtomicU64>,
    ) -> Self {
        SwitchInput {
            replayer,
            live: None,
            decisions,
            attach: Some(attach),
            slot,
            held,
            stop,
            went_live_at,
            limits: Arc::new(ReplayLimits::new(false)),
            lifted: false,
            pending: None,
        }
    }

    /// Hold replay at the barriers and the fault in `limits` (containment).
    pub fn with_limits(mut self, limits: Arc<ReplayLimits>) -> Self {
        self.limits = limits;
        self
    }

    /// The next decision: one read earlier, or from the failover logic
    /// (waiting in slices so that a stop is seen). `None`: stopped, or no
    /// decision can come any more.
    fn next_decision(&mut self, wait: Duration) -> Result<Option<Decision>, ()> {
        if let Some(d) = self.pending.take() {
            return Ok(Some(d));
        }
        if self.stop.is_stopped() {
            return Err(());
        }
        match self.decisions.recv_timeout(wait) {
            Ok(d) => Ok(Some(d)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(()),
        }
    }

    /// Replay is held before `exit` (past the last barrier, or at a
    /// fault): wait until a new barrier lets it go on, or a decision comes.
    /// Returns once replay may go on (or the guest went live here).
    fn held(&mut self, exit: ExitIndex) -> Result<(), HookError> {
        let ended = HookError::Ended { exit_index: exit };
        while let Some(hold) = self.limits.hold(exit, self.lifted) {
            match self.next_decision(Duration::from_millis(2)) {
                // No decision can come: end here, unless the hold was lifted
                // meanwhile (the primary's clean end arrived just before its
                // channel closed).
                Err(()) if self.limits.hold(exit, self.lifted).is_some() => return Err(ended),
                Err(()) => {}
                Ok(None) => {}
                Ok(Some(Decision::Stop)) => return Err(ended),
                Ok(Some(Decision::GoLive)) if self.limits.fault().is_none() => {
                    // A plain failover: replay everything received, go live
                    // at its end.
                    self.lifted = true;
                    self.pending = Some(Decision::GoLive);
                }
                Ok(Some(Decision::GoLive | Decision::Contain)) => {
                    tracing::info!(exit_index = %exit, ?hold, "going live from the last healthy point");
                    return self.attach_live(exit);
                }
            }
        }
        Ok(())
    }

    /// The log ended at `exit`: wait for the decision and act on it.
    fn end_of_log(&mut self, exit: ExitIndex) -> Result<(), HookError> {
        let decision = loop {
            match self.next_decision(Duration::from_millis(20)) {
                Ok(Some(d)) => break d,
                Ok(None) => {}
                Err(()) => return Err(HookError::Ended { exit_index: exit }),
            }
        };
        if decision == Decision::Stop {
            return Err(HookError::Ended { exit_index: exit });
        }
        self.attach_live(exit)
    }

    /// Attach the live world at `exit` and re-emit what the primary may not
    /// have released.
    fn attach_live(&mut self, exit: ExitIndex) -> Result<(), HookError> {
        let attach = self.attach.take().ok_or(HookError::Ended { exit_index: exit })?;
        let mut world = attach(self.replayer.last_clock())?;
        // Outputs the primary may not have released, oldest first, before
        // anything the live guest produces.
        for (at, out) in self.held.drain() {
            match out {
                Output::Serial(b) => world.output.serial(at, &b)?,
                Output::Frame(f) => world.output.transmit_frame(at, &f)?,
            }
        }
        *self.slot.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(world.output);
        self.live = Some(world.input);
        self.went_live_at.store(exit.0, Ordering::SeqCst);
        tracing::info!(exit_index = %exit, "went live");
        Ok(())
    }

    /// Serve one input: from the live world if live; else from the log, and
    /// at the end of the log from the live world once the decision is in.
    fn serve<R>(
        &mut self,
        exit: ExitIndex,
        mut f: impl FnMut(&mut dyn InputSource) -> Result<R, HookError>,
    ) -> Result<R, HookError> {
        if let Some(live) = self.live.as_mut() {
            return f(live.as_mut());
        }
        match f(&mut self.replayer) {
            Err(HookError::Ended { .. }) if !self.replayer.shutdown_seen() => {
                self.end_of_log(exit)?;
                let live = self.live.as_mut().ok_or(HookError::Ended { exit_index: exit })?;
                f(live.as_mut())
            }
            r => r,
        }
    }
}

impl InputSource for SwitchInput {
    fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
        if self.live.is_none() {
            self.held(exit)?;
        }
        match self.live.as_mut() {
            Some(live) => live.on_exit(exit, kind),
            None => self.replayer.on_exit(exit, kind),
        }
    }

    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        self.serve(exit, |s| s.clock_ns(exit))
    }

    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        self.serve(exit, |s| s.entropy(exit, buf))
    }

    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        self.serve(exit, |s| s.halt(exit, deadline))
    }

    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        self.serve(exit, |s| s.receive_frame(exit))
    }

    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        self.serve(exit, |s| s.digest(exit, digest))
    }
}

/// A gratuitous ARP request announcing `ip` at `mac` (RFC 5227 §3: sender
/// and target protocol address both `ip`), as a 42-byte Ethernet frame.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gratuitous_arp_layout() {
        let f = gratuitous_arp([2, 0, 0, 0, 0, 1], [10, 0, 0, 10]);
        assert_eq!(f.len(), 42);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "opcode request");
        assert_eq!(&f[28..32], &[10, 0, 0, 10], "sender IP");
        assert_eq!(&f[38..42], &[10, 0, 0, 10], "target IP = sender IP");
    }
}
