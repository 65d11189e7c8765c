//! pvpanic, as QEMU and Linux define it (QEMU docs/specs/pvpanic.rst, Linux
//! drivers/misc/pvpanic): the guest reports a panic by writing an event bit;
//! the device passes it to the output sink as [`GuestSignal::Panicked`],
//! tagged with the exit index, and asks the VMM to stop
//! ([`StopRequest::Panic`]) so the replication layer can treat it as a guest
//! fault instead of replaying into it. Takes no input.
//!
//! Register ([`ftvm_abi::PVPANIC_PORT`], one byte): a read returns the
//! supported events, [`PVPANIC_PANICKED`] | [`PVPANIC_CRASH_LOADED`]; a write
//! reports the supported bits it carries. A write of 0 does nothing.
//!
//! Threat note: the guest controls the byte written and how often. Unsupported
//! bits are masked off; a write with no supported bit left is ignored and
//! counted, as is every access wider than a byte. A guest can stop itself at
//! any exit this way, which it could do anyway. Nothing here allocates.

use ftvm_abi::{PVPANIC_CRASH_LOADED, PVPANIC_PANICKED};
use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::DeviceError;
use crate::hook::{ExitCtx, GuestSignal, StopRequest};
use crate::state::{Persist, StateError, StateVersion};

/// Offset of the event register.
pub const EVENT: u64 = 0;
/// Ports pvpanic decodes: one byte.
pub const LEN: u64 = 1;
/// The events this device supports, as a read returns them.
pub const SUPPORTED: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

const NAME: &str = "pvpanic";

/// The pvpanic device.
#[derive(Debug, Default)]
pub struct PvPanic {
    state: PvPanicState,
}

/// Saved state of [`PvPanic`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvPanicState {
    /// Panic events reported since boot.
    pub events: u64,
    /// The supported bits of the last event, `None` before the first.
    pub last_event: Option<u8>,
    /// Accesses the device did not decode, and writes with no supported bit.
    pub ignored: u64,
}

impl PvPanic {
    /// A pvpanic device that has seen no panic.
    pub fn new() -> Self {
        PvPanic::default()
    }

    /// Panic events reported since boot.
    pub fn events(&self) -> u64 {
        self.state.events
    }

    /// The last event's supported bits, if any.
    pub fn last_event(&self) -> Option<u8> {
        self.state.last_event
    }

    fn ignore(&mut self) {
        // Counters come back from a peer's checkpoint: wrap, never
        // overflow-panic.
        self.state.ignored = self.state.ignored.wrapping_add(1);
    }
}

impl BusDevice for PvPanic {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data) {
            (EVENT, [byte]) => *byte = SUPPORTED,
            (_, data) => {
                data.fill(UNMAPPED_READ);
                self.ignore();
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let written = match (offset, data) {
            (EVENT, &[byte]) => byte,
            _ => {
                self.ignore();
                return Ok(());
            }
        };
        if written == 0 {
            // Not an event (Linux never writes it): nothing to report.
            return Ok(());
        }
        let event = written & SUPPORTED;
        if event == 0 {
            self.ignore();
            return Ok(());
        }
        self.state.events = self.state.events.wrapping_add(1);
        self.state.last_event = Some(event);
        // Ask for the stop first: it cannot fail, and a sink error must not
        // let the guest run on past its panic.
        ctx.request_stop(StopRequest::Panic { event });
        ctx.output
            .signal(ctx.exit, GuestSignal::Panicked { event })
            .map_err(|source| DeviceError::Hook { device: NAME, source })
    }
}

impl Persist for PvPanic {
    type State = PvPanicState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> PvPanicState {
        self.state.clone()
    }

    fn restore(&mut self, state: &PvPanicState) -> Result<(), StateError> {
        // A recorded event is always non-empty and supported: anything else
        // did not come from this device.
        if let Some(event) = state.last_event {
            if event == 0 || event & !SUPPORTED != 0 {
                return Err(StateError::Invalid {
                    kind: NAME,
                    reason: format!("last event {event:#04x} is not a supported pvpanic event"),
                });
            }
        }
        self.state = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::hook::ExitIndex;
    use crate::state::check_persist;

    fn write(dev: &mut PvPanic, world: &mut Scripted, exit: u64, byte: u8) -> Option<StopRequest> {
        world.with_ctx(ExitIndex(exit), |ctx| {
            dev.write(EVENT, &[byte], ctx).unwrap();
            ctx.stop_request()
        })
    }

    #[test]
    fn a_read_returns_the_supported_events() {
        let mut world = Scripted::default();
        let mut dev = PvPanic::new();
        let mut b = [0u8; 1];
        world.with_ctx(ExitIndex(1), |ctx| dev.read(EVENT, &mut b, ctx)).unwrap();
        assert_eq!(b, [PVPANIC_PANICKED | PVPANIC_CRASH_LOADED]);
        assert_eq!(b, [0b11]);
    }

    #[test]
    fn a_panic_signals_and_stops_at_its_exit() {
        let mut world = Scripted::default();
        let mut dev = PvPanic::new();
        let stop = write(&mut dev, &mut world, 99, PVPANIC_PANICKED);
        assert_eq!(stop, Some(StopRequest::Panic { event: PVPANIC_PANICKED }));
        assert_eq!(world.signals, vec![(ExitIndex(99), GuestSignal::Panicked { event: PVPANIC_PANICKED })]);
        assert_eq!(dev.events(), 1);
        assert_eq!(dev.last_event(), Some(PVPANIC_PANICKED));
    }

    #[test]
    fn unsupported_bits_are_masked_off() {
        let mut world = Scripted::default();
        let mut dev = PvPanic::new();
        let stop = write(&mut dev, &mut world, 5, 0xf0 | PVPANIC_CRASH_LOADED);
        let event = PVPANIC_CRASH_LOADED;
        assert_eq!(stop, Some(StopRequest::Panic { event }));
        assert_eq!(world.signals, vec![(ExitIndex(5), GuestSignal::Panicked { event })]);
        assert_eq!(dev.save().ignored, 0);
    }

    #[test]
    fn zero_and_unsupported_only_writes_do_nothing() {
        let mut world = Scripted::default();
        let mut dev = PvPanic::new();
        assert_eq!(write(&mut dev, &mut world, 1, 0), None);
        assert_eq!(dev.save().ignored, 0, "a write of 0 is not an odd access");
        assert_eq!(write(&mut dev, &mut world, 2, 0xfc), None);
        assert_eq!(dev.save().ignored, 1);
        assert!(world.signals.is_empty());
        assert_eq!(dev.events(), 0);
        assert_eq!(dev.last_event(), None);
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut world = Scripted::default();
        let mut dev = PvPanic::new();
        let stop = world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(EVENT, &[PVPANIC_PANICKED, 0], ctx).unwrap();
            dev.write(EVENT, &u32::from(PVPANIC_PANICKED).to_le_bytes(), ctx).unwrap();
            let mut two = [0u8; 2];
            dev.read(EVENT, &mut two, ctx).unwrap();
            assert_eq!(two, [UNMAPPED_READ; 2]);
            ctx.stop_request()
        });
        assert_eq!(stop, None);
        assert!(world.signals.is_empty());
        assert_eq!(dev.save().ignored, 3);
    }

    #[test]
    fn restore_refuses_an_impossible_event() {
        let mut dev = PvPanic::new();
        for event in [0, 0x04, 0x81] {
            let bad = PvPanicState { events: 1, last_event: Some(event), ignored: 0 };
            assert!(matches!(dev.restore(&bad), Err(StateError::Invalid { kind: "pvpanic", .. })));
        }
        assert_eq!(dev.save(), PvPanicState::default());
    }

    #[test]
    fn persist() {
        check_persist(PvPanic::new(), PvPanic::new(), |p| {
            p.state.events = 2;
            p.state.last_event = Some(PVPANIC_CRASH_LOADED);
        });
    }
}
