//! The guest's wake-up timer: the guest writes a deadline (guest-clock
//! nanoseconds), then executes HLT; the vCPU loop hands the armed deadline to
//! the input source's `halt`, which sleeps until then on the primary and
//! returns at once on the secondary. Takes no input and raises nothing.
//!
//! Registers ([`ftvm_abi::TIMER_LO_PORT`], [`ftvm_abi::TIMER_HI_PORT`]), 32
//! bits each: a write of LO stages the low half; a write of HI arms the
//! deadline `(HI << 32) | staged LO`, and a deadline of 0 disarms. A read of
//! LO returns the staged low half; a read of HI returns 1 if a deadline is
//! armed, else 0.
//!
//! The vCPU loop reads the deadline through a [`TimerDeadline`] handle
//! ([`Timer::deadline_handle`]), so it never needs to know the device type.
//!
//! Threat note: the guest controls offsets, widths, how often it writes and
//! the deadline itself (any `u64`; a deadline in the past only means HLT
//! returns at once, and the input source bounds how long it sleeps).
//! Accesses other than 32-bit ones at LO or HI are ignored and counted.
//! Nothing here allocates.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::{read_u32_reg, DeviceError};
use crate::hook::ExitCtx;
use crate::state::{Persist, StateError, StateVersion};

/// Offset of the low half (staged).
pub const LO: u64 = 0;
/// Offset of the high half (a write arms).
// u16 to u64 widens (`From` is not const).
pub const HI: u64 = (ftvm_abi::TIMER_HI_PORT - ftvm_abi::TIMER_LO_PORT) as u64;
/// Ports the timer decodes.
pub const LEN: u64 = HI + 4;

const NAME: &str = "timer";

/// A cheap, clonable view of the timer's armed deadline, for the vCPU loop
/// to read on a HLT exit. Shares its value with the [`Timer`] it came from,
/// restores included.
#[derive(Clone, Debug, Default)]
pub struct TimerDeadline(Arc<AtomicU64>);

impl TimerDeadline {
    /// The armed deadline in guest-clock nanoseconds, or `None` when the
    /// guest has not armed one (or disarmed it).
    pub fn get(&self) -> Option<u64> {
        // Relaxed: the deadline is a self-contained value published by the
        // vCPU thread that also reads it on HLT; no other memory is ordered
        // through it.
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            deadline => Some(deadline),
        }
    }

    /// Store a deadline as the guest wrote it: 0, the ABI's "disarmed",
    /// reads back as `None`.
    fn store(&self, raw: u64) {
        self.0.store(raw, Ordering::Relaxed);
    }
}

/// The timer device.
#[derive(Debug, Default)]
pub struct Timer {
    staged_lo: u32,
    deadline: TimerDeadline,
    ignored: u64,
}

/// Saved state of [`Timer`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerState {
    /// The low half written last, waiting for (or kept after) a write of HI.
    pub staged_lo: u32,
    /// The armed deadline in guest-clock nanoseconds; never `Some(0)`
    /// (0 means disarmed).
    pub deadline: Option<u64>,
    /// Accesses the device did not decode.
    pub ignored: u64,
}

impl Timer {
    /// A disarmed timer with nothing staged.
    pub fn new() -> Self {
        Timer::default()
    }

    /// A handle on this timer's deadline for the vCPU loop. Every handle sees
    /// what the guest arms later, and what a restore sets.
    pub fn deadline_handle(&self) -> TimerDeadline {
        self.deadline.clone()
    }

    /// The armed deadline, if any.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline.get()
    }

    fn ignore(&mut self, data: Option<&mut [u8]>) {
        if let Some(data) = data {
            data.fill(UNMAPPED_READ);
        }
        // Counters come back from a peer's checkpoint: wrap, never
        // overflow-panic.
        self.ignored = self.ignored.wrapping_add(1);
    }
}

impl BusDevice for Timer {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data.len()) {
            (LO, 4) => read_u32_reg(self.staged_lo, data),
            (HI, 4) => read_u32_reg(u32::from(self.deadline.get().is_some()), data),
            _ => self.ignore(Some(data)),
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (offset, data) {
            (LO, &[a, b, c, d]) => self.staged_lo = u32::from_le_bytes([a, b, c, d]),
            (HI, &[a, b, c, d]) => {
                let hi = u64::from(u32::from_le_bytes([a, b, c, d]));
                let deadline = (hi << 32) | u64::from(self.staged_lo);
                // A deadline of 0 disarms: the handle reads 0 as `None`.
                self.deadline.store(deadline);
            }
            _ => self.ignore(None),
        }
        Ok(())
    }
}

impl Persist for Timer {
    type State = TimerState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> TimerState {
        TimerState { staged_lo: self.staged_lo, deadline: self.deadline.get(), ignored: self.ignored }
    }

    fn restore(&mut self, state: &TimerState) -> Result<(), StateError> {
        // 0 is "disarmed" on the wire to the vCPU loop: a saved Some(0)
        // would silently turn into None, so a blob holding it is not ours.
        if state.deadline == Some(0) {
            return Err(StateError::Invalid { kind: NAME, reason: "armed deadline of 0 (0 means disarmed)".into() });
        }
        self.staged_lo = state.staged_lo;
        // Store into the shared cell, not a new one: the vCPU loop's handle
        // must see the restored deadline.
        self.deadline.store(state.deadline.unwrap_or(0));
        self.ignored = state.ignored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::hook::ExitIndex;
    use crate::state::{check_persist, Snapshot};

    fn write32(timer: &mut Timer, world: &mut Scripted, offset: u64, value: u32) {
        world.with_ctx(ExitIndex(1), |ctx| timer.write(offset, &value.to_le_bytes(), ctx)).unwrap();
    }

    fn read32(timer: &mut Timer, world: &mut Scripted, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        world.with_ctx(ExitIndex(1), |ctx| timer.read(offset, &mut b, ctx)).unwrap();
        u32::from_le_bytes(b)
    }

    #[test]
    fn hi_write_arms_the_staged_deadline() {
        let mut world = Scripted::default();
        let mut timer = Timer::new();
        let handle = timer.deadline_handle();
        assert_eq!(handle.get(), None);
        assert_eq!(read32(&mut timer, &mut world, HI), 0);

        write32(&mut timer, &mut world, LO, 0x89ab_cdef);
        assert_eq!(handle.get(), None, "staging LO must not arm");
        assert_eq!(read32(&mut timer, &mut world, LO), 0x89ab_cdef);
        write32(&mut timer, &mut world, HI, 0x0123_4567);
        assert_eq!(handle.get(), Some(0x0123_4567_89ab_cdef));
        assert_eq!(timer.deadline(), Some(0x0123_4567_89ab_cdef));
        assert_eq!(read32(&mut timer, &mut world, HI), 1);

        // A later HI write reuses the staged low half.
        write32(&mut timer, &mut world, HI, 2);
        assert_eq!(handle.get(), Some(0x2_89ab_cdef));
        // The timer takes no input and emits nothing.
        assert!(world.clock_reads.is_empty() && world.signals.is_empty());
    }

    #[test]
    fn a_zero_deadline_disarms() {
        let mut world = Scripted::default();
        let mut timer = Timer::new();
        let handle = timer.deadline_handle();
        write32(&mut timer, &mut world, LO, 5);
        write32(&mut timer, &mut world, HI, 0);
        assert_eq!(handle.get(), Some(5));
        write32(&mut timer, &mut world, LO, 0);
        write32(&mut timer, &mut world, HI, 0);
        assert_eq!(handle.get(), None);
        assert_eq!(read32(&mut timer, &mut world, HI), 0);
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut world = Scripted::default();
        let mut timer = Timer::new();
        let handle = timer.deadline_handle();
        world.with_ctx(ExitIndex(1), |ctx| {
            timer.write(LO, &[7], ctx).unwrap();
            timer.write(HI, &[1, 0], ctx).unwrap();
            timer.write(2, &[1, 0, 0, 0], ctx).unwrap();
            timer.write(HI, &[1, 0, 0, 0, 0, 0, 0, 0], ctx).unwrap();
            let mut two = [0u8; 2];
            timer.read(LO, &mut two, ctx).unwrap();
            assert_eq!(two, [UNMAPPED_READ; 2]);
            let mut four = [0u8; 4];
            timer.read(1, &mut four, ctx).unwrap();
            assert_eq!(four, [UNMAPPED_READ; 4]);
        });
        assert_eq!(handle.get(), None);
        assert_eq!(timer.save().staged_lo, 0);
        assert_eq!(timer.save().ignored, 6);
    }

    #[test]
    fn restore_updates_existing_handles() {
        let mut world = Scripted::default();
        let mut armed = Timer::new();
        write32(&mut armed, &mut world, LO, 1000);
        write32(&mut armed, &mut world, HI, 0);
        let blob = armed.snapshot();

        let mut timer = Timer::new();
        let handle = timer.deadline_handle();
        timer.restore_snapshot(&blob).unwrap();
        assert_eq!(handle.get(), Some(1000));

        // And back to disarmed.
        timer.restore_snapshot(&Timer::new().snapshot()).unwrap();
        assert_eq!(handle.get(), None);
    }

    #[test]
    fn restore_refuses_an_armed_zero() {
        let mut timer = Timer::new();
        write32(&mut timer, &mut Scripted::default(), LO, 9);
        write32(&mut timer, &mut Scripted::default(), HI, 0);
        let bad = TimerState { staged_lo: 1, deadline: Some(0), ignored: 0 };
        assert!(matches!(timer.restore(&bad), Err(StateError::Invalid { kind: "timer", .. })));
        assert_eq!(timer.deadline(), Some(9), "a refused state changed the timer");
        assert_eq!(timer.save().staged_lo, 9);
    }

    #[test]
    fn persist() {
        check_persist(Timer::new(), Timer::new(), |t| {
            t.staged_lo = 3;
            t.deadline.store(0x7_0000_0003);
            t.ignored = 1;
        });
    }
}
