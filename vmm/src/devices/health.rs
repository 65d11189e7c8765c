//! The application's health report: a write says "the application is
//! healthy"; the device passes it to the output sink as
//! [`GuestSignal::Healthy`], tagged with the exit index, and the replication
//! layer turns it into a barrier. Takes no input.
//!
//! Register ([`ftvm_abi::HEALTH_PORT`]): a write of 1, 2 or 4 bytes at
//! offset 0 reports the (zero-extended) value, e.g. a counter. A read of 1, 2
//! or 4 bytes returns the low bytes of the number of reports so far.
//!
//! Threat note: the guest controls offsets, widths, the value and how often
//! it writes. Each decoded write is one signal of fixed size (no allocation
//! here); how often signals may turn into barriers is the replication layer's
//! call. Other accesses are ignored and counted. A guest can claim to be
//! healthy when it is not: the value is a report, not a proof, which is why a
//! host-side probe may be required on top.

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::{read_u32_reg, write_u32_reg, DeviceError};
use crate::hook::{ExitCtx, ExitIndex, GuestSignal};
use crate::state::{Persist, StateError, StateVersion};

/// Offset of the report register.
pub const REPORT: u64 = 0;
/// Ports the health device decodes: one 32-bit register.
pub const LEN: u64 = 4;

const NAME: &str = "health";

/// The health device.
#[derive(Debug, Default)]
pub struct Health {
    state: HealthState,
}

/// Saved state of [`Health`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    /// Reports since boot.
    pub count: u64,
    /// The value of the last report, 0 before the first.
    pub last_value: u32,
    /// The exit index of the last report, `None` before the first.
    pub last_exit: Option<ExitIndex>,
    /// Accesses the device did not decode.
    pub ignored: u64,
}

impl Health {
    /// A health device with no report yet.
    pub fn new() -> Self {
        Health::default()
    }

    /// Reports since boot.
    pub fn count(&self) -> u64 {
        self.state.count
    }

    /// The last report: its value and the exit index it was made at.
    pub fn last(&self) -> Option<(u32, ExitIndex)> {
        self.state.last_exit.map(|exit| (self.state.last_value, exit))
    }
}

impl BusDevice for Health {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data.len()) {
            (REPORT, 1 | 2 | 4) => {
                // The low 32 bits of the count, without an `as` cast.
                let [a, b, c, d, ..] = self.state.count.to_le_bytes();
                read_u32_reg(u32::from_le_bytes([a, b, c, d]), data);
            }
            _ => {
                data.fill(UNMAPPED_READ);
                self.state.ignored = self.state.ignored.wrapping_add(1);
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let value = match (offset, write_u32_reg(data)) {
            (REPORT, Some(value)) => value,
            _ => {
                self.state.ignored = self.state.ignored.wrapping_add(1);
                return Ok(());
            }
        };
        // The state records what the guest did, whatever the sink makes of
        // it: both hosts' devices stay identical even where one sink drops
        // signals. Counters come back from a peer's checkpoint: wrap.
        self.state.count = self.state.count.wrapping_add(1);
        self.state.last_value = value;
        self.state.last_exit = Some(ctx.exit);
        ctx.output
            .signal(ctx.exit, GuestSignal::Healthy { value })
            .map_err(|source| DeviceError::Hook { device: NAME, source })
    }
}

impl Persist for Health {
    type State = HealthState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> HealthState {
        self.state.clone()
    }

    fn restore(&mut self, state: &HealthState) -> Result<(), StateError> {
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::state::check_persist;

    #[test]
    fn writes_signal_healthy_at_their_exit() {
        let mut world = Scripted::default();
        let mut dev = Health::new();
        world.with_ctx(ExitIndex(10), |ctx| dev.write(REPORT, &0xdead_beef_u32.to_le_bytes(), ctx)).unwrap();
        world.with_ctx(ExitIndex(12), |ctx| dev.write(REPORT, &[0x34, 0x12], ctx)).unwrap();
        world.with_ctx(ExitIndex(15), |ctx| dev.write(REPORT, &[0x80], ctx)).unwrap();
        assert_eq!(
            world.signals,
            vec![
                (ExitIndex(10), GuestSignal::Healthy { value: 0xdead_beef }),
                (ExitIndex(12), GuestSignal::Healthy { value: 0x1234 }),
                (ExitIndex(15), GuestSignal::Healthy { value: 0x80 }),
            ]
        );
        assert_eq!(dev.count(), 3);
        assert_eq!(dev.last(), Some((0x80, ExitIndex(15))));
        assert!(world.clock_reads.is_empty() && world.serial.is_empty());
    }

    #[test]
    fn a_read_returns_the_count_low_bits() {
        let mut world = Scripted::default();
        let mut dev = Health::new();
        dev.state.count = 0x1_0000_0002;
        let (word, byte) = world.with_ctx(ExitIndex(1), |ctx| {
            let mut word = [0u8; 4];
            let mut byte = [0u8; 1];
            dev.read(REPORT, &mut word, ctx).unwrap();
            dev.read(REPORT, &mut byte, ctx).unwrap();
            (u32::from_le_bytes(word), byte[0])
        });
        assert_eq!((word, byte), (2, 2));
        assert!(world.signals.is_empty(), "a read must not signal");
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut world = Scripted::default();
        let mut dev = Health::new();
        world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(REPORT, &[1, 2, 3], ctx).unwrap();
            dev.write(REPORT, &[1, 2, 3, 4, 5, 6, 7, 8], ctx).unwrap();
            dev.write(2, &[1, 0], ctx).unwrap();
            let mut b = [0u8; 1];
            dev.read(3, &mut b, ctx).unwrap();
            assert_eq!(b, [UNMAPPED_READ]);
        });
        assert!(world.signals.is_empty());
        assert_eq!(dev.count(), 0);
        assert_eq!(dev.last(), None);
        assert_eq!(dev.save().ignored, 4);
    }

    #[test]
    fn persist() {
        check_persist(Health::new(), Health::new(), |h| {
            h.state.count = 4;
            h.state.last_value = 77;
            h.state.last_exit = Some(ExitIndex(1234));
        });
    }
}
