//! The test device: writes are counted and their value kept, reads return
//! zeros. Benchmarks hammer it to measure the cost of an exit, and test
//! guests use it on both buses: at [`ftvm_abi::TESTDEV_PORT`] on the PIO bus
//! ([`PIO_LEN`]) and at [`ftvm_abi::TESTDEV_MMIO_ADDR`] on the MMIO bus
//! ([`MMIO_LEN`]). It never carries an input and emits no output. A VM has
//! it only when its config asks ([`VmConfig::test_devices`](crate::VmConfig::test_devices)):
//! production VMs do not.
//!
//! The write path is what a benchmark measures on top of the exit itself, so
//! it is kept trivial: no allocation, no hook call, no branch on the offset.
//!
//! Threat note: the guest controls offsets, widths (any the bus delivers,
//! including widths wider than 8 bytes), values and how often it accesses.
//! Every access is served: at most the first 8 bytes of a write are kept,
//! without indexing; a read of any width is zero-filled. Counters wrap.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::devices::DeviceError;
use crate::hook::ExitCtx;
use crate::state::{Persist, StateError, StateVersion};

/// Ports the test device decodes on the PIO bus: one 32-bit register, the
/// last of the paravirtual block.
// u16 to u64 widens (`From` is not const).
pub const PIO_LEN: u64 = 4;
/// Bytes the test device decodes on the MMIO bus: one slot.
pub const MMIO_LEN: u64 = ftvm_abi::MMIO_SLOT_SIZE;

const NAME: &str = "testdev";

/// The test device. Put one instance on each bus.
#[derive(Debug, Default)]
pub struct TestDev {
    writes: u64,
    last_value: u64,
    reads: u64,
}

/// Saved state of [`TestDev`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestDevState {
    /// Writes since boot, of any width at any offset.
    pub writes: u64,
    /// The last write's first 8 bytes as a little-endian value,
    /// zero-extended.
    pub last_value: u64,
    /// Reads since boot.
    pub reads: u64,
}

impl TestDev {
    /// A test device that has seen nothing.
    pub fn new() -> Self {
        TestDev::default()
    }

    /// Writes since boot.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The last write's value (its first 8 bytes, little-endian,
    /// zero-extended); 0 before the first write.
    pub fn last_value(&self) -> u64 {
        self.last_value
    }

    /// Reads since boot.
    pub fn reads(&self) -> u64 {
        self.reads
    }
}

impl BusDevice for TestDev {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, _offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        data.fill(0);
        self.reads = self.reads.wrapping_add(1);
        Ok(())
    }

    fn write(&mut self, _offset: u64, data: &[u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let mut bytes = [0u8; 8];
        // zip stops at the shorter side: no index, no panic on any width.
        for (dst, src) in bytes.iter_mut().zip(data) {
            *dst = *src;
        }
        self.last_value = u64::from_le_bytes(bytes);
        self.writes = self.writes.wrapping_add(1);
        Ok(())
    }
}

impl Persist for TestDev {
    type State = TestDevState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> TestDevState {
        TestDevState { writes: self.writes, last_value: self.last_value, reads: self.reads }
    }

    fn restore(&mut self, state: &TestDevState) -> Result<(), StateError> {
        self.writes = state.writes;
        self.last_value = state.last_value;
        self.reads = state.reads;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, UNMAPPED_READ};
    use crate::devices::testing::Scripted;
    use crate::hook::ExitIndex;
    use crate::state::check_persist;

    #[test]
    fn lengths_match_the_abi() {
        assert_eq!(PIO_LEN, 4);
        assert_eq!(MMIO_LEN, 0x1000);
    }

    #[test]
    fn writes_of_any_width_are_counted_and_kept() {
        let mut world = Scripted::default();
        let mut dev = TestDev::new();
        world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(0, &[0x11], ctx).unwrap();
            assert_eq!(dev.last_value(), 0x11);
            dev.write(2, &[0x22, 0x33], ctx).unwrap();
            assert_eq!(dev.last_value(), 0x3322);
            dev.write(0, &0xaabb_ccddu32.to_le_bytes(), ctx).unwrap();
            assert_eq!(dev.last_value(), 0xaabb_ccdd);
            dev.write(0x800, &0x0102_0304_0506_0708u64.to_le_bytes(), ctx).unwrap();
            assert_eq!(dev.last_value(), 0x0102_0304_0506_0708);
            // Wider than 8 bytes: the first 8 are kept.
            dev.write(0, &[9; 16], ctx).unwrap();
            assert_eq!(dev.last_value(), u64::from_le_bytes([9; 8]));
            // And the empty write, should a bus ever deliver one.
            dev.write(0, &[], ctx).unwrap();
            assert_eq!(dev.last_value(), 0);
        });
        assert_eq!(dev.writes(), 6);
        // Nothing taken from the world, nothing emitted.
        assert!(world.clock_reads.is_empty());
        assert!(world.signals.is_empty() && world.serial.is_empty());
    }

    #[test]
    fn reads_of_any_width_return_zeros() {
        let mut world = Scripted::default();
        let mut dev = TestDev::new();
        world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(0, &[0xff; 4], ctx).unwrap();
            for width in [1usize, 2, 3, 4, 8] {
                let mut b = vec![UNMAPPED_READ; width];
                dev.read(1, &mut b, ctx).unwrap();
                assert_eq!(b, vec![0; width]);
            }
        });
        assert_eq!(dev.reads(), 5);
    }

    #[test]
    fn serves_both_buses() {
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        pio.insert(u64::from(ftvm_abi::TESTDEV_PORT), PIO_LEN, Box::new(TestDev::new())).unwrap();
        mmio.insert(ftvm_abi::TESTDEV_MMIO_ADDR, MMIO_LEN, Box::new(TestDev::new())).unwrap();
        let mut world = Scripted::default();
        world.with_ctx(ExitIndex(1), |ctx| {
            let port = u64::from(ftvm_abi::TESTDEV_PORT);
            assert!(pio.write(port, &[1, 0, 0, 0], ctx).unwrap());
            let last = ftvm_abi::TESTDEV_MMIO_ADDR + MMIO_LEN - 8;
            assert!(mmio.write(last, &[2; 8], ctx).unwrap());
            let mut b = [UNMAPPED_READ; 4];
            assert!(mmio.read(ftvm_abi::TESTDEV_MMIO_ADDR, &mut b, ctx).unwrap());
            assert_eq!(b, [0; 4]);
        });
        let saved: Vec<TestDevState> = [&pio, &mmio]
            .iter()
            .flat_map(|bus| bus.devices())
            .map(|(_, dev)| crate::state::decode(TestDev::VERSION, &dev.snapshot()).unwrap())
            .collect();
        assert_eq!(
            saved,
            vec![
                TestDevState { writes: 1, last_value: 1, reads: 0 },
                TestDevState { writes: 1, last_value: u64::from_le_bytes([2; 8]), reads: 1 },
            ]
        );
    }

    #[test]
    fn persist() {
        check_persist(TestDev::new(), TestDev::new(), |t| {
            t.writes = 1_000_000;
            t.last_value = 42;
            t.reads = 3;
        });
    }
}
