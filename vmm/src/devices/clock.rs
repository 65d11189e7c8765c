//! The guest's clock: monotonic nanoseconds since the guest booted, read at
//! an exit through the input source (live on the primary, from the log on the
//! secondary).
//!
//! Registers ([`ftvm_abi::CLOCK_LO_PORT`], [`ftvm_abi::CLOCK_HI_PORT`]): a
//! read of LO takes one reading (one input), latches it and returns its low
//! 32 bits; a read of HI returns the latched high 32 bits.
//!
//! Threat note: the guest controls offsets, widths and how often it reads.
//! Reads of other widths or offsets return [`UNMAPPED_READ`] bytes and are
//! counted; writes are ignored and counted. Nothing here allocates.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::{low_half, read_u32_reg, DeviceError};
use crate::hook::ExitCtx;
use crate::state::{Persist, StateError, StateVersion};

/// Offset of the low half (a read takes a reading).
pub const LO: u64 = 0;
/// Offset of the high half.
pub const HI: u64 = (ftvm_abi::CLOCK_HI_PORT - ftvm_abi::CLOCK_LO_PORT) as u64;
/// Ports the clock decodes.
pub const LEN: u64 = HI + 4;

/// The clock device.
#[derive(Debug, Default)]
pub struct Clock {
    latched: u64,
    readings: u64,
    ignored: u64,
}

/// Saved state of [`Clock`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// The last reading, whose high half HI returns.
    pub latched: u64,
    /// Readings taken since boot.
    pub readings: u64,
    /// Accesses the device did not decode.
    pub ignored: u64,
}

impl Clock {
    /// A clock with nothing latched.
    pub fn new() -> Self {
        Clock::default()
    }

    /// Readings taken since boot.
    pub fn readings(&self) -> u64 {
        self.readings
    }
}

impl BusDevice for Clock {
    fn name(&self) -> &'static str {
        "clock"
    }

    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data.len()) {
            (LO, 4) => {
                let now =
                    ctx.input.clock_ns(ctx.exit).map_err(|source| DeviceError::Hook { device: "clock", source })?;
                self.latched = now;
                self.readings = self.readings.wrapping_add(1);
                read_u32_reg(low_half(now), data);
            }
            (HI, 4) => read_u32_reg((self.latched >> 32) as u32, data),
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

impl Persist for Clock {
    type State = ClockState;
    const VERSION: StateVersion = StateVersion { kind: "clock", major: 1, minor: 0 };

    fn save(&self) -> ClockState {
        ClockState { latched: self.latched, readings: self.readings, ignored: self.ignored }
    }

    fn restore(&mut self, state: &ClockState) -> Result<(), StateError> {
        self.latched = state.latched;
        self.readings = state.readings;
        self.ignored = state.ignored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::hook::ExitIndex;
    use crate::state::check_persist;

    #[test]
    fn reads_latch_one_input_per_lo_read() {
        let mut world = Scripted::with_clock(vec![0x1_2345_6789_abcd]);
        let mut clock = Clock::new();
        let (lo, hi) = world.with_ctx(ExitIndex(3), |ctx| {
            let mut lo = [0u8; 4];
            let mut hi = [0u8; 4];
            clock.read(LO, &mut lo, ctx).unwrap();
            clock.read(HI, &mut hi, ctx).unwrap();
            (u32::from_le_bytes(lo), u32::from_le_bytes(hi))
        });
        assert_eq!((u64::from(hi) << 32) | u64::from(lo), 0x1_2345_6789_abcd);
        assert_eq!(world.clock_reads, vec![ExitIndex(3)]);
        assert_eq!(clock.readings(), 1);
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut world = Scripted::default();
        let mut clock = Clock::new();
        world.with_ctx(ExitIndex(1), |ctx| {
            let mut b = [0u8; 2];
            clock.read(LO, &mut b, ctx).unwrap();
            assert_eq!(b, [UNMAPPED_READ; 2]);
            clock.write(LO, &[1, 2, 3, 4], ctx).unwrap();
        });
        assert!(world.clock_reads.is_empty());
        assert_eq!(clock.save().ignored, 2);
    }

    #[test]
    fn persist() {
        check_persist(Clock::new(), Clock::new(), |c| {
            c.latched = 99;
            c.readings = 3;
        });
    }
}
