//! PIO and MMIO buses: ordered maps from address ranges to devices.
//!
//! A device sees only the offset into its own range, never where it is
//! mapped. Ranges are checked at insert (no zero-length, no overlap) and an
//! access is resolved with one ordered-map lookup; an access whose last byte
//! leaves the device's range is not delivered.

use std::collections::BTreeMap;

use crate::devices::error::DeviceError;
use crate::hook::ExitCtx;
use crate::state::Snapshot;

/// A device on a bus. Handles one access at a time, on the vCPU thread,
/// while the guest waits on the exit that made it.
///
/// A device without a snapshot story does not go on a bus: [`Snapshot`]
/// (its state as a versioned blob, and restoring from one) comes with
/// implementing [`Persist`](crate::state::Persist).
pub trait BusDevice: Snapshot + Send {
    /// Short name for logs and errors ("serial", "clock").
    fn name(&self) -> &'static str;

    /// The guest reads `data.len()` bytes at `offset` into the device's range.
    /// A device that does not decode the access leaves `data` as given
    /// (pre-filled with [`UNMAPPED_READ`]) and counts it.
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError>;

    /// The guest writes `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError>;

    /// The guest woke from HLT (the exit `ctx.exit`). A device whose inputs
    /// arrive on the host's schedule (the NIC's frames) takes now those the
    /// guest can consume. The vCPU loop calls it (through [`Bus::after_halt`])
    /// after every HLT exit, whatever woke the guest, so that primary and
    /// secondary ask at the same exits. Default: nothing.
    fn after_halt(&mut self, _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// The byte a read returns where nothing answers (as on a real ISA bus).
pub const UNMAPPED_READ: u8 = 0xff;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device was given an empty range.
    #[error("device {name} has a zero-length range at {base:#x}")]
    ZeroLength { name: &'static str, base: u64 },
    /// Two devices' ranges overlap.
    #[error("device {name} at {base:#x}+{len:#x} overlaps device {other}")]
    Overlap { name: &'static str, base: u64, len: u64, other: &'static str },
}

struct Entry {
    len: u64,
    device: Box<dyn BusDevice>,
}

/// An ordered map from `[base, base+len)` ranges to devices.
#[derive(Default)]
pub struct Bus {
    entries: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Map `device` at `[base, base+len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: Box<dyn BusDevice>) -> Result<(), BusError> {
        let name = device.name();
        if len == 0 {
            return Err(BusError::ZeroLength { name, base });
        }
        let end = base.checked_add(len).ok_or(BusError::ZeroLength { name, base })?;
        // The closest range starting at or below the new end must end at or
        // below the new base.
        if let Some((&other_base, other)) = self.entries.range(..end).next_back() {
            if other_base.saturating_add(other.len) > base {
                return Err(BusError::Overlap { name, base, len, other: other.device.name() });
            }
        }
        self.entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr+size)`, with the
    /// offset of `addr` in it.
    fn resolve(&mut self, addr: u64, size: usize) -> Option<(u64, &mut Entry)> {
        let (&base, entry) = self.entries.range_mut(..=addr).next_back()?;
        // `range(..=addr)` gives base <= addr.
        let offset = addr.checked_sub(base)?;
        let last = offset.checked_add(u64::try_from(size).ok()?)?;
        (last <= entry.len).then_some((offset, entry))
    }

    /// Deliver a read. `Ok(false)` when nothing is mapped there (then `data`
    /// holds [`UNMAPPED_READ`] bytes).
    pub fn read(&mut self, addr: u64, data: &mut [u8], ctx: &mut ExitCtx<'_>) -> Result<bool, DeviceError> {
        data.fill(UNMAPPED_READ);
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => entry.device.read(offset, data, ctx).map(|()| true),
            None => Ok(false),
        }
    }

    /// Deliver a write. `Ok(false)` when nothing is mapped there.
    pub fn write(&mut self, addr: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<bool, DeviceError> {
        match self.resolve(addr, data.len()) {
            Some((offset, entry)) => entry.device.write(offset, data, ctx).map(|()| true),
            None => Ok(false),
        }
    }

    /// Call [`BusDevice::after_halt`] on every device, in address order (a
    /// fixed order, so both hosts take inputs in the same sequence). Stops
    /// at the first error.
    pub fn after_halt(&mut self, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        self.entries.values_mut().try_for_each(|e| e.device.after_halt(ctx))
    }

    /// Every device with its base address, in address order.
    pub fn devices(&self) -> impl Iterator<Item = (u64, &dyn BusDevice)> {
        self.entries.iter().map(|(base, e)| (*base, &*e.device))
    }

    /// Every device with its base address, mutably, in address order.
    pub fn devices_mut(&mut self) -> impl Iterator<Item = (u64, &mut Box<dyn BusDevice>)> {
        self.entries.iter_mut().map(|(base, e)| (*base, &mut e.device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hook::{ExitIndex, GuestSignal, HookError, InputSource, OutputSink, Wake};
    use crate::state::{Persist, StateError, StateVersion};

    struct Nop;
    impl InputSource for Nop {
        fn clock_ns(&mut self, _: ExitIndex) -> Result<u64, HookError> {
            Ok(0)
        }
        fn entropy(&mut self, _: ExitIndex, _: &mut [u8]) -> Result<(), HookError> {
            Ok(())
        }
        fn halt(&mut self, _: ExitIndex, _: Option<u64>) -> Result<Wake, HookError> {
            Ok(Wake::Deadline)
        }
    }
    impl OutputSink for Nop {
        fn serial(&mut self, _: ExitIndex, _: &[u8]) -> Result<(), HookError> {
            Ok(())
        }
        fn signal(&mut self, _: ExitIndex, _: GuestSignal) -> Result<(), HookError> {
            Ok(())
        }
    }

    /// Remembers the last offset it saw.
    struct Probe(&'static str, u64);
    impl BusDevice for Probe {
        fn name(&self) -> &'static str {
            self.0
        }
        fn read(&mut self, offset: u64, data: &mut [u8], _: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
            self.1 = offset;
            data.fill(0x42);
            Ok(())
        }
        fn write(&mut self, offset: u64, _: &[u8], _: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
            self.1 = offset;
            Ok(())
        }
    }
    impl Persist for Probe {
        type State = u64;
        const VERSION: StateVersion = StateVersion { kind: "probe", major: 1, minor: 0 };
        fn save(&self) -> u64 {
            self.1
        }
        fn restore(&mut self, state: &u64) -> Result<(), StateError> {
            self.1 = *state;
            Ok(())
        }
    }

    #[test]
    fn refuses_overlap_and_zero_length() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Box::new(Probe("a", 0))).unwrap();
        assert!(matches!(bus.insert(0x14, 8, Box::new(Probe("b", 0))), Err(BusError::Overlap { other: "a", .. })));
        assert!(matches!(bus.insert(0x08, 9, Box::new(Probe("b", 0))), Err(BusError::Overlap { .. })));
        assert!(matches!(bus.insert(0x30, 0, Box::new(Probe("b", 0))), Err(BusError::ZeroLength { .. })));
        bus.insert(0x18, 8, Box::new(Probe("c", 0))).unwrap();
        bus.insert(0x08, 8, Box::new(Probe("d", 0))).unwrap();
    }

    #[test]
    fn resolves_offsets_and_refuses_straddling_access() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Box::new(Probe("a", 0))).unwrap();
        let (mut i, mut o) = (Nop, Nop);
        let mut ctx = ExitCtx::new(ExitIndex(1), &mut i, &mut o);
        let mut buf = [0u8; 4];
        assert!(bus.read(0x14, &mut buf, &mut ctx).unwrap());
        assert_eq!(buf, [0x42; 4]);
        // Last byte at 0x18 leaves the range.
        assert!(!bus.read(0x15, &mut buf, &mut ctx).unwrap());
        assert_eq!(buf, [UNMAPPED_READ; 4]);
        assert!(!bus.write(0x0f, &[1], &mut ctx).unwrap());
        assert!(!bus.write(u64::MAX, &[1, 2], &mut ctx).unwrap());
    }

    #[test]
    fn devices_snapshot_and_restore_through_the_bus() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Box::new(Probe("a", 0))).unwrap();
        bus.insert(0x20, 8, Box::new(Probe("b", 0))).unwrap();
        let (mut i, mut o) = (Nop, Nop);
        let mut ctx = ExitCtx::new(ExitIndex(1), &mut i, &mut o);
        bus.write(0x13, &[1], &mut ctx).unwrap();
        let saved: Vec<Vec<u8>> = bus.devices().map(|(_, d)| d.snapshot()).collect();
        assert_eq!(saved[0], crate::state::encode(Probe::VERSION, &3u64));
        bus.write(0x15, &[1], &mut ctx).unwrap();
        let mut other_kind = saved[0].clone();
        other_kind[8] = b'q';
        for (_, dev) in bus.devices_mut() {
            assert!(matches!(dev.restore_snapshot(&other_kind), Err(StateError::WrongKind { .. })));
        }
        assert_eq!(bus.devices().map(|(_, d)| d.snapshot()).next(), Some(crate::state::encode(Probe::VERSION, &5u64)));
        for ((_, dev), blob) in bus.devices_mut().zip(&saved) {
            dev.restore_snapshot(blob).unwrap();
        }
        assert_eq!(bus.devices().map(|(_, d)| d.snapshot()).collect::<Vec<_>>(), saved);
    }
}
