//! The seams replication plugs into: every value a device takes from the
//! world comes through an [`InputSource`], every output leaves through an
//! [`OutputSink`], and the vCPU loop reports every guest exit to the input
//! source before it dispatches it.
//!
//! `vmm` declares the traits and a live implementation (`LiveInput` and
//! `LiveOutput` in `world.rs`) that reads the real clock and entropy and writes outputs
//! straight out; the recorder and replayer of the `replication` crate are
//! other implementations. Devices never know which one they talk to.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The count of guest exits since boot: the position of everything in the
/// log. Identical on primary and secondary for the same execution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExitIndex(pub u64);

impl fmt::Display for ExitIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The three hashes compared at a digest point, computed by
/// [`digest`](crate::digest) and handed to [`InputSource::digest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StateDigest {
    /// vCPU registers.
    pub vcpu: u64,
    /// Every device's state.
    pub devices: u64,
    /// Guest pages written since the previous digest.
    pub memory: u64,
}

/// Direction of a PIO or MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// The guest reads (`in`, MMIO load).
    Read,
    /// The guest writes (`out`, MMIO store).
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// What a guest exit was, as the replayer compares it: everything here is
/// decided by the guest alone, so it is identical on both hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitKind {
    /// `in`/`out` on `port`, `size` bytes.
    Pio { port: u16, size: u8, access: Access },
    /// A load or store at a guest-physical address outside RAM.
    Mmio { addr: u64, size: u8, access: Access },
    /// HLT.
    Hlt,
    /// Triple fault or shutdown.
    Shutdown,
}

/// Why a halted guest woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The deadline the guest armed has passed.
    Deadline,
    /// Something arrived for the guest (a frame) or the host asked the vCPU
    /// to stop; the loop checks which.
    Event,
}

/// Something the guest told the VMM that is neither an input nor an output
/// to the world: the replication layer turns these into barriers and faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestSignal {
    /// The application wrote the health device.
    Healthy { value: u32 },
    /// The guest wrote pvpanic.
    Panicked { event: u8 },
}

/// Errors the hook reports back into the vCPU loop. Any of them stops the
/// guest: the hook could not supply an input or place an output.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// Writing an output failed.
    #[error("writing guest output failed")]
    Output(#[source] std::io::Error),
    /// Reading the host's entropy failed.
    #[error("reading host entropy failed")]
    Entropy(#[source] std::io::Error),
    /// Reading or writing the NIC's host side failed.
    #[error("the NIC's host device failed")]
    Network(#[source] std::io::Error),
    /// Waiting for the guest's deadline or an event failed.
    #[error("waiting in HLT failed")]
    Wait(#[source] std::io::Error),
    /// The replayer saw an exit or a request for an input that the log does
    /// not have at this exit index.
    #[error("diverged at exit {exit_index}: the log has {expected}, this guest did {found}")]
    Diverged { exit_index: ExitIndex, expected: String, found: String },
    /// The input source has nothing more to give (end of log, stop asked).
    #[error("the input source ended at exit {exit_index}")]
    Ended { exit_index: ExitIndex },
    /// The guest halted with no wake-up deadline armed: nothing would ever
    /// wake it (what `halt` does to an OS). A fault when application health
    /// is watched; the guests always arm a deadline when they idle.
    #[error("the guest halted with no wake-up deadline at exit {exit_index}")]
    HaltedForever { exit_index: ExitIndex },
}

/// Where every value from the world comes from.
pub trait InputSource: Send {
    /// Called at every guest exit, before it is dispatched: the recorder
    /// notes the position, the replayer checks the exit is the one logged.
    fn on_exit(&mut self, _exit: ExitIndex, _kind: &ExitKind) -> Result<(), HookError> {
        Ok(())
    }

    /// The guest's monotonic clock, in nanoseconds since the guest booted.
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError>;

    /// Fill `buf` with random bytes.
    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError>;

    /// The guest executed HLT with `deadline` (guest-clock ns) armed, or none.
    /// A live source sleeps until the deadline or an event; a replaying one
    /// returns at once.
    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError>;

    /// The next frame that arrived for the guest's NIC since the last call,
    /// if any. Called only while the NIC has a posted receive buffer, so a
    /// frame is taken from the world exactly when the guest can consume it.
    /// Default: no NIC, no frames.
    fn receive_frame(&mut self, _exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        Ok(None)
    }

    /// The state digest computed after exit `exit` (every N exits, when the
    /// VM was built with digests): the recorder logs it, the replayer
    /// compares it with the logged one. Default: ignored.
    fn digest(&mut self, _exit: ExitIndex, _digest: &StateDigest) -> Result<(), HookError> {
        Ok(())
    }
}

/// Where every output goes.
pub trait OutputSink: Send {
    /// Bytes the guest wrote to its serial console.
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError>;

    /// A frame the guest's NIC transmitted (Ethernet, no virtio header).
    /// Default: dropped.
    fn transmit_frame(&mut self, _exit: ExitIndex, _frame: &[u8]) -> Result<(), HookError> {
        Ok(())
    }

    /// A signal from the guest (health, panic). Default: ignored.
    fn signal(&mut self, _exit: ExitIndex, _signal: GuestSignal) -> Result<(), HookError> {
        Ok(())
    }
}

/// What a device may use while it handles one exit: the exit's index, the
/// input source, the output sink, and a way to ask the VMM to stop.
///
/// Devices get this per exit and never hold on to it: a device can only take
/// an input or emit an output while the guest waits on an exit it made.
pub struct ExitCtx<'a> {
    /// The index of the exit being handled.
    pub exit: ExitIndex,
    /// Values from the world.
    pub input: &'a mut dyn InputSource,
    /// Outputs to the world.
    pub output: &'a mut dyn OutputSink,
    request: Option<StopRequest>,
    halt: bool,
}

/// A device's request to end the run once the current exit is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// The guest powered off with this status.
    PowerOff { status: u32 },
    /// The guest reported a panic through pvpanic.
    Panic { event: u8 },
}

impl<'a> ExitCtx<'a> {
    /// A context for handling exit `exit`.
    pub fn new(exit: ExitIndex, input: &'a mut dyn InputSource, output: &'a mut dyn OutputSink) -> Self {
        ExitCtx { exit, input, output, request: None, halt: false }
    }

    /// Ask the VMM to halt the guest once this exit is handled, exactly as
    /// if it had executed HLT (the halt port of guests at CPL 3).
    pub fn request_halt(&mut self) {
        self.halt = true;
    }

    /// Whether a halt was requested while handling this exit.
    pub fn halt_requested(&self) -> bool {
        self.halt
    }

    /// Ask the VMM to stop after this exit. The first request wins.
    pub fn request_stop(&mut self, request: StopRequest) {
        self.request.get_or_insert(request);
    }

    /// The stop request made while handling this exit, if any.
    pub fn stop_request(&self) -> Option<StopRequest> {
        self.request
    }
}
