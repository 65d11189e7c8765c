//! Power-off: the guest writes its exit status and the VMM stops the run
//! once the exit is handled ([`StopRequest::PowerOff`]). Takes no input and
//! emits no output; what a power-off means for the pair (a clean end, not a
//! fault) is the caller's business.
//!
//! Register ([`ftvm_abi::POWER_PORT`]): a write of 1, 2 or 4 bytes at offset
//! 0 powers off with the (zero-extended) status, 0 meaning success. A read of
//! 1, 2 or 4 bytes at offset 0 returns 0.
//!
//! Threat note: the guest controls offsets, widths and the status, and may
//! stop itself at any exit, which it could do anyway (HLT forever, triple
//! fault). The status is reported, never interpreted here. Other accesses are
//! ignored and counted. Nothing here allocates.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::{read_u32_reg, write_u32_reg, DeviceError};
use crate::hook::{ExitCtx, StopRequest};
use crate::state::{Persist, StateError, StateVersion};

/// Offset of the status register.
pub const STATUS: u64 = 0;
/// Ports the power device decodes: one 32-bit register.
pub const LEN: u64 = 4;

const NAME: &str = "power";

/// The power device.
#[derive(Debug, Default)]
pub struct Power {
    powered_off: Option<u32>,
    ignored: u64,
}

/// Saved state of [`Power`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerState {
    /// The status of the last power-off the guest asked for, if any.
    pub powered_off: Option<u32>,
    /// Accesses the device did not decode.
    pub ignored: u64,
}

impl Power {
    /// A powered-on device.
    pub fn new() -> Self {
        Power::default()
    }

    /// The status the guest powered off with, if it did.
    pub fn powered_off(&self) -> Option<u32> {
        self.powered_off
    }
}

impl BusDevice for Power {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data.len()) {
            (STATUS, 1 | 2 | 4) => read_u32_reg(0, data),
            _ => {
                data.fill(UNMAPPED_READ);
                self.ignored = self.ignored.wrapping_add(1);
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, write_u32_reg(data)) {
            (STATUS, Some(status)) => {
                self.powered_off = Some(status);
                ctx.request_stop(StopRequest::PowerOff { status });
            }
            // Counters come back from a peer's checkpoint: wrap, never
            // overflow-panic.
            _ => self.ignored = self.ignored.wrapping_add(1),
        }
        Ok(())
    }
}

impl Persist for Power {
    type State = PowerState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> PowerState {
        PowerState { powered_off: self.powered_off, ignored: self.ignored }
    }

    fn restore(&mut self, state: &PowerState) -> Result<(), StateError> {
        self.powered_off = state.powered_off;
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
    fn a_write_requests_power_off_with_its_status() {
        let mut world = Scripted::default();
        let mut dev = Power::new();
        let request = world.with_ctx(ExitIndex(40), |ctx| {
            assert_eq!(ctx.stop_request(), None);
            dev.write(STATUS, &3u32.to_le_bytes(), ctx).unwrap();
            ctx.stop_request()
        });
        assert_eq!(request, Some(StopRequest::PowerOff { status: 3 }));
        assert_eq!(dev.powered_off(), Some(3));
        // Nothing leaves through the sink, nothing is taken from the world.
        assert!(world.signals.is_empty() && world.serial.is_empty());
        assert!(world.clock_reads.is_empty());
    }

    #[test]
    fn narrow_writes_are_zero_extended() {
        let mut world = Scripted::default();
        let mut dev = Power::new();
        let one = world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(STATUS, &[0xff], ctx).unwrap();
            ctx.stop_request()
        });
        assert_eq!(one, Some(StopRequest::PowerOff { status: 0xff }));
        let two = world.with_ctx(ExitIndex(2), |ctx| {
            dev.write(STATUS, &[0, 1], ctx).unwrap();
            ctx.stop_request()
        });
        assert_eq!(two, Some(StopRequest::PowerOff { status: 0x100 }));
        assert_eq!(dev.powered_off(), Some(0x100));
    }

    #[test]
    fn reads_return_zero_and_do_not_stop() {
        let mut world = Scripted::default();
        let mut dev = Power::new();
        let (value, request) = world.with_ctx(ExitIndex(1), |ctx| {
            let mut b = [0xaa; 4];
            dev.read(STATUS, &mut b, ctx).unwrap();
            (b, ctx.stop_request())
        });
        assert_eq!(value, [0; 4]);
        assert_eq!(request, None);
        assert_eq!(dev.powered_off(), None);
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut world = Scripted::default();
        let mut dev = Power::new();
        let request = world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(STATUS, &[0, 0, 0], ctx).unwrap();
            dev.write(1, &[0], ctx).unwrap();
            dev.write(STATUS, &[0; 8], ctx).unwrap();
            let mut b = [0u8; 2];
            dev.read(2, &mut b, ctx).unwrap();
            assert_eq!(b, [UNMAPPED_READ; 2]);
            ctx.stop_request()
        });
        assert_eq!(request, None);
        assert_eq!(dev.powered_off(), None);
        assert_eq!(dev.save().ignored, 4);
    }

    #[test]
    fn persist() {
        check_persist(Power::new(), Power::new(), |p| {
            p.powered_off = Some(0);
        });
    }
}
