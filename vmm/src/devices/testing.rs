//! A scripted input source and capturing output sink for device unit tests.

use crate::hook::{ExitCtx, ExitIndex, GuestSignal, HookError, InputSource, OutputSink, Wake};

/// Serves scripted clock readings and entropy bytes, records everything it is
/// asked and everything it is given.
#[derive(Default)]
pub struct Scripted {
    /// Clock readings to serve, in order; then `Ended`.
    pub clock: std::collections::VecDeque<u64>,
    /// Entropy bytes to serve, in order; then `Ended`.
    pub entropy: std::collections::VecDeque<u8>,
    /// Exit indices at which the clock was read.
    pub clock_reads: Vec<ExitIndex>,
    /// Serial output received, with exit indices.
    pub serial: Vec<(ExitIndex, Vec<u8>)>,
    /// Signals received.
    pub signals: Vec<(ExitIndex, GuestSignal)>,
    /// Deadlines HLT was called with.
    pub halts: Vec<(ExitIndex, Option<u64>)>,
    /// Received frames to serve, in order; then `None` (nothing arrived).
    pub frames: std::collections::VecDeque<Vec<u8>>,
    /// Exit indices at which a frame was asked for.
    pub frame_reads: Vec<ExitIndex>,
    /// Frames transmitted, with exit indices.
    pub transmitted: Vec<(ExitIndex, Vec<u8>)>,
}

impl Scripted {
    /// A source that serves these clock readings.
    pub fn with_clock(clock: Vec<u64>) -> Self {
        Scripted { clock: clock.into(), ..Default::default() }
    }

    /// A source that serves these entropy bytes.
    pub fn with_entropy(entropy: Vec<u8>) -> Self {
        Scripted { entropy: entropy.into(), ..Default::default() }
    }

    /// A source that serves these received frames.
    pub fn with_frames(frames: Vec<Vec<u8>>) -> Self {
        Scripted { frames: frames.into(), ..Default::default() }
    }

    /// Run `f` with a context for exit `exit` whose input and output are
    /// this script (two halves kept apart so both can be borrowed).
    pub fn with_ctx<R>(&mut self, exit: ExitIndex, f: impl FnOnce(&mut ExitCtx<'_>) -> R) -> R {
        let mut input = ScriptIn {
            clock: std::mem::take(&mut self.clock),
            entropy: std::mem::take(&mut self.entropy),
            clock_reads: Vec::new(),
            halts: Vec::new(),
            frames: std::mem::take(&mut self.frames),
            frame_reads: Vec::new(),
        };
        let mut output = ScriptOut::default();
        let r = {
            let mut ctx = ExitCtx::new(exit, &mut input, &mut output);
            f(&mut ctx)
        };
        self.clock = input.clock;
        self.entropy = input.entropy;
        self.clock_reads.extend(input.clock_reads);
        self.halts.extend(input.halts);
        self.frames = input.frames;
        self.frame_reads.extend(input.frame_reads);
        self.transmitted.extend(output.transmitted);
        self.serial.extend(output.serial);
        self.signals.extend(output.signals);
        r
    }

    /// All serial bytes received, concatenated.
    pub fn serial_bytes(&self) -> Vec<u8> {
        self.serial.iter().flat_map(|(_, b)| b.iter().copied()).collect()
    }
}

struct ScriptIn {
    clock: std::collections::VecDeque<u64>,
    entropy: std::collections::VecDeque<u8>,
    clock_reads: Vec<ExitIndex>,
    halts: Vec<(ExitIndex, Option<u64>)>,
    frames: std::collections::VecDeque<Vec<u8>>,
    frame_reads: Vec<ExitIndex>,
}

impl InputSource for ScriptIn {
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        self.clock_reads.push(exit);
        self.clock.pop_front().ok_or(HookError::Ended { exit_index: exit })
    }

    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        for b in buf {
            *b = self.entropy.pop_front().ok_or(HookError::Ended { exit_index: exit })?;
        }
        Ok(())
    }

    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        self.halts.push((exit, deadline));
        Ok(Wake::Deadline)
    }

    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        self.frame_reads.push(exit);
        Ok(self.frames.pop_front())
    }
}

#[derive(Default)]
struct ScriptOut {
    serial: Vec<(ExitIndex, Vec<u8>)>,
    signals: Vec<(ExitIndex, GuestSignal)>,
    transmitted: Vec<(ExitIndex, Vec<u8>)>,
}

impl OutputSink for ScriptOut {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.serial.push((exit, bytes.to_vec()));
        Ok(())
    }

    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        self.signals.push((exit, signal));
        Ok(())
    }

    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        self.transmitted.push((exit, frame.to_vec()));
        Ok(())
    }
}
