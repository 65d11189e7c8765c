//! The halt register ([`ftvm_abi::HALT_PORT`]): a guest at CPL 3, where HLT
//! faults, halts by writing it. The vCPU loop then does exactly what it does
//! for a HLT exit (sleep until the armed deadline or an event on a live
//! host, then let devices deliver what arrived).
//!
//! Threat note: the guest controls only when it writes; a write of any width
//! or value halts, a read returns 0. Nothing is allocated or logged here.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::devices::DeviceError;
use crate::hook::ExitCtx;
use crate::state::{Persist, StateError, StateVersion};

/// Ports the halt register decodes.
pub const LEN: u64 = 4;

/// The halt register.
#[derive(Debug, Default)]
pub struct Halt {
    halts: u64,
}

/// Saved state of [`Halt`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltState {
    /// Halts requested since boot.
    pub halts: u64,
}

impl Halt {
    /// A halt register that has not been written.
    pub fn new() -> Self {
        Halt::default()
    }
}

impl BusDevice for Halt {
    fn name(&self) -> &'static str {
        "halt"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        data.fill(0);
        Ok(())
    }

    fn write(&mut self, _offset: u64, _data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        self.halts = self.halts.wrapping_add(1);
        ctx.request_halt();
        Ok(())
    }
}

impl Persist for Halt {
    type State = HaltState;
    const VERSION: StateVersion = StateVersion { kind: "halt", major: 1, minor: 0 };

    fn save(&self) -> HaltState {
        HaltState { halts: self.halts }
    }

    fn restore(&mut self, state: &HaltState) -> Result<(), StateError> {
        self.halts = state.halts;
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
    fn a_write_requests_a_halt_and_a_read_does_not() {
        let mut world = Scripted::default();
        let mut halt = Halt::new();
        let (after_read, after_write) = world.with_ctx(ExitIndex(4), |ctx| {
            let mut b = [0xffu8; 4];
            halt.read(0, &mut b, ctx).unwrap();
            assert_eq!(b, [0; 4]);
            let r = ctx.halt_requested();
            halt.write(0, &[0, 0, 0, 0], ctx).unwrap();
            (r, ctx.halt_requested())
        });
        assert!(!after_read);
        assert!(after_write);
    }

    #[test]
    fn persist() {
        check_persist(Halt::new(), Halt::new(), |h| h.halts = 7);
    }
}
