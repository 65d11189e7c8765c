//! The guest's entropy: random bytes read at an exit through the input
//! source (the host's entropy on the primary, the logged bytes on the
//! secondary), so both hosts' guests see the same "random" values.
//!
//! Register ([`ftvm_abi::ENTROPY_PORT`]): a read of 1, 2 or 4 bytes at
//! offset 0 returns that many random bytes and takes exactly one input of
//! that size.
//!
//! Threat note: the guest controls offsets, widths and how often it reads.
//! A read asks the input source for at most 4 bytes (the access width, which
//! the match below bounds), into the guest's own access buffer: nothing is
//! allocated and the guest cannot make an input larger. Reads of other widths
//! or offsets return [`UNMAPPED_READ`] bytes, take no input and are counted;
//! writes are ignored and counted.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::DeviceError;
use crate::hook::ExitCtx;
use crate::state::{Persist, StateError, StateVersion};

/// Offset of the data register.
pub const DATA: u64 = 0;
/// Ports the entropy device decodes: one 32-bit register.
pub const LEN: u64 = 4;

const NAME: &str = "entropy";

/// The entropy device.
#[derive(Debug, Default)]
pub struct Entropy {
    reads: u64,
    ignored: u64,
}

/// Saved state of [`Entropy`]. The device keeps no bytes: each read's bytes
/// go straight to the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntropyState {
    /// Reads served (inputs taken) since boot.
    pub reads: u64,
    /// Accesses the device did not decode.
    pub ignored: u64,
}

impl Entropy {
    /// An entropy device that has served nothing.
    pub fn new() -> Self {
        Entropy::default()
    }

    /// Reads served (inputs taken) since boot.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Accesses the device did not decode.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }
}

impl BusDevice for Entropy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data.len()) {
            (DATA, 1 | 2 | 4) => {
                ctx.input.entropy(ctx.exit, data).map_err(|source| DeviceError::Hook { device: NAME, source })?;
                // Counters come back from a peer's checkpoint: wrap, never
                // overflow-panic.
                self.reads = self.reads.wrapping_add(1);
            }
            _ => {
                data.fill(UNMAPPED_READ);
                self.ignored = self.ignored.wrapping_add(1);
            }
        }
        Ok(())
    }

    fn write(&mut self, _offset: u64, _data: &[u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        self.ignored = self.ignored.wrapping_add(1);
        Ok(())
    }
}

impl Persist for Entropy {
    type State = EntropyState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> EntropyState {
        EntropyState { reads: self.reads, ignored: self.ignored }
    }

    fn restore(&mut self, state: &EntropyState) -> Result<(), StateError> {
        self.reads = state.reads;
        self.ignored = state.ignored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::hook::{ExitIndex, HookError, InputSource, OutputSink, Wake};
    use crate::state::check_persist;

    /// Records every entropy request (exit index, size) and fills with a
    /// counter, so the test sees how many inputs each read took.
    #[derive(Default)]
    struct Recorder {
        asked: Vec<(ExitIndex, usize)>,
        next: u8,
    }

    impl InputSource for Recorder {
        fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
            Err(HookError::Ended { exit_index: exit })
        }
        fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
            self.asked.push((exit, buf.len()));
            for b in buf {
                self.next = self.next.wrapping_add(1);
                *b = self.next;
            }
            Ok(())
        }
        fn halt(&mut self, _: ExitIndex, _: Option<u64>) -> Result<Wake, HookError> {
            Ok(Wake::Deadline)
        }
    }

    struct Discard;
    impl OutputSink for Discard {
        fn serial(&mut self, _: ExitIndex, _: &[u8]) -> Result<(), HookError> {
            Ok(())
        }
    }

    #[test]
    fn each_read_takes_one_input_of_its_width() {
        let mut dev = Entropy::new();
        let mut src = Recorder::default();
        let mut out = Discard;
        let mut got = Vec::new();
        for (exit, width) in [(5u64, 4usize), (6, 1), (9, 2)] {
            let mut ctx = ExitCtx::new(ExitIndex(exit), &mut src, &mut out);
            let mut buf = vec![UNMAPPED_READ; width];
            dev.read(DATA, &mut buf, &mut ctx).unwrap();
            got.extend(buf);
        }
        assert_eq!(src.asked, vec![(ExitIndex(5), 4), (ExitIndex(6), 1), (ExitIndex(9), 2)]);
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(dev.reads(), 3);
        assert_eq!(dev.ignored(), 0);
    }

    #[test]
    fn serves_scripted_bytes_in_order() {
        let mut world = Scripted::with_entropy(vec![0xde, 0xad, 0xbe, 0xef, 0x42]);
        let mut dev = Entropy::new();
        let (word, byte) = world.with_ctx(ExitIndex(2), |ctx| {
            let mut word = [0u8; 4];
            let mut byte = [0u8; 1];
            dev.read(DATA, &mut word, ctx).unwrap();
            dev.read(DATA, &mut byte, ctx).unwrap();
            (word, byte)
        });
        assert_eq!(word, [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(byte, [0x42]);
        assert!(world.entropy.is_empty());
    }

    #[test]
    fn an_exhausted_source_is_a_hook_error_at_this_exit() {
        let mut world = Scripted::with_entropy(vec![1]);
        let mut dev = Entropy::new();
        let err = world.with_ctx(ExitIndex(17), |ctx| dev.read(DATA, &mut [0u8; 4], ctx)).unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Hook { device: "entropy", source: HookError::Ended { exit_index: ExitIndex(17) } }
        ));
        assert_eq!(dev.reads(), 0, "a failed read is not counted as served");
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut src = Recorder::default();
        let mut out = Discard;
        let mut dev = Entropy::new();
        {
            let mut ctx = ExitCtx::new(ExitIndex(1), &mut src, &mut out);
            let mut three = [0u8; 3];
            dev.read(DATA, &mut three, &mut ctx).unwrap();
            assert_eq!(three, [UNMAPPED_READ; 3]);
            let mut eight = [0u8; 8];
            dev.read(DATA, &mut eight, &mut ctx).unwrap();
            assert_eq!(eight, [UNMAPPED_READ; 8]);
            let mut one = [0u8; 1];
            dev.read(1, &mut one, &mut ctx).unwrap();
            dev.read(3, &mut one, &mut ctx).unwrap();
            assert_eq!(one, [UNMAPPED_READ]);
            dev.write(DATA, &[1, 2, 3, 4], &mut ctx).unwrap();
        }
        assert!(src.asked.is_empty(), "an undecoded access took an input");
        assert_eq!(dev.ignored(), 5);
        assert_eq!(dev.reads(), 0);
    }

    #[test]
    fn persist() {
        check_persist(Entropy::new(), Entropy::new(), |e| {
            e.reads = 7;
            e.ignored = 2;
        });
    }
}
