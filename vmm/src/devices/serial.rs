//! The serial console: a 16550 UART at COM1 ([`ftvm_abi::COM1_PORT`]),
//! emulated by vm-superio. Output only: every byte the guest transmits leaves
//! through the output sink, tagged with the exit index of the write that
//! sent it, so the replication layer can hold it for the output rule (primary)
//! or drop it (secondary).
//!
//! The UART writes into a byte buffer the device owns; after each guest
//! write the device drains that buffer into the sink, so no byte outlives the
//! exit that produced it. The interrupt trigger is a no-op: lockstep guests
//! poll LSR and never get an interrupt.
//!
//! There is no serial *input* from the host: the receive FIFO only ever fills
//! in the UART's loopback mode, from the guest's own writes. Host input would
//! be an input from the world: it would have to be taken at an exit through
//! the input source and logged, like the clock, never pushed in by a host
//! thread (`enqueue_raw_bytes` is deliberately not called).
//!
//! Threat note: the guest controls offsets, widths, register values and how
//! often it accesses. Only one-byte accesses at offsets that pass
//! `u8::try_from` and fall inside the 8 registers reach the UART; the rest
//! read [`UNMAPPED_READ`] and are counted. Each guest write emits at most one
//! byte, and the buffer is drained on every write, so it never grows; the
//! loopback FIFO is bounded by vm-superio at 64 bytes (CVE-2020-27173). A
//! saved state is input too: a FIFO longer than the UART's is refused.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::{BusDevice, UNMAPPED_READ};
use crate::devices::DeviceError;
use crate::hook::ExitCtx;
use crate::state::{Persist, StateError, StateVersion};

/// Ports the UART decodes.
// u16 to u64 widens (`From` is not const).
pub const LEN: u64 = ftvm_abi::COM1_LEN as u64;

const NAME: &str = "serial";

/// The UART's interrupt line: not wired. Lockstep guests poll, and an
/// interrupt raised on the host's schedule would break replay.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// vm-superio's UART with no interrupt, no metrics, and a byte buffer the
/// device drains after every guest write.
type Uart = vm_superio::Serial<NoInterrupt, NoEvents, Vec<u8>>;

/// The serial console device.
#[derive(Debug)]
pub struct Serial {
    uart: Uart,
    ignored: u64,
}

/// ftvm's copy of vm-superio's `SerialState`, field by field, so that a
/// dependency upgrade cannot change what is saved. `From` converts both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR).
    pub interrupt_identification: u8,
    /// Line control register (LCR).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Receive FIFO, oldest byte first; at most 64 bytes.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    /// The state of a UART at reset.
    fn default() -> Self {
        vm_superio::SerialState::default().into()
    }
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Saved state of [`Serial`]: the UART's registers and FIFO, and the
/// device's own counter. The output buffer is not saved: it is empty
/// between exits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// The UART.
    pub uart: SerialState,
    /// Accesses the device did not decode.
    pub ignored: u64,
}

impl Default for Serial {
    fn default() -> Self {
        Serial::new()
    }
}

impl Serial {
    /// A UART in its reset state.
    pub fn new() -> Self {
        Serial { uart: Uart::new(NoInterrupt, Vec::new()), ignored: 0 }
    }

    fn ignore(&mut self) {
        // Counters come back from a peer's checkpoint: wrap, never
        // overflow-panic.
        self.ignored = self.ignored.wrapping_add(1);
    }

    /// The UART register a one-byte access at `offset` addresses, if it is
    /// one the device decodes.
    fn register(offset: u64, len: usize) -> Option<u8> {
        let reg = u8::try_from(offset).ok()?;
        (len == 1 && u64::from(reg) < LEN).then_some(reg)
    }

    /// Hand what the UART transmitted during this exit to the sink, tagged
    /// with this exit.
    fn drain(&mut self, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let out = self.uart.writer_mut();
        if out.is_empty() {
            return Ok(());
        }
        let sent = ctx.output.serial(ctx.exit, out);
        // Clear even if the sink failed: these bytes belong to this exit and
        // must never leave later, tagged with another one.
        out.clear();
        sent.map_err(|source| DeviceError::Hook { device: NAME, source })
    }
}

impl BusDevice for Serial {
    fn name(&self) -> &'static str {
        NAME
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match (Serial::register(offset, data.len()), data) {
            (Some(reg), [byte]) => *byte = self.uart.read(reg),
            (_, data) => {
                data.fill(UNMAPPED_READ);
                self.ignore();
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let (Some(reg), [value]) = (Serial::register(offset, data.len()), data) else {
            self.ignore();
            return Ok(());
        };
        if let Err(e) = self.uart.write(reg, *value) {
            match e {
                vm_superio::serial::Error::Trigger(never) => match never {},
                // Writing to a Vec cannot fail and FullFifo comes only from
                // host input, which this device never enqueues: should either
                // happen after an upgrade, the byte is lost, not the guest.
                _ => self.ignore(),
            }
        }
        self.drain(ctx)
    }
}

impl Persist for Serial {
    type State = SerialDeviceState;
    const VERSION: StateVersion = StateVersion { kind: NAME, major: 1, minor: 0 };

    fn save(&self) -> SerialDeviceState {
        SerialDeviceState { uart: self.uart.state().into(), ignored: self.ignored }
    }

    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), StateError> {
        let uart = Uart::from_state(&vm_superio::SerialState::from(&state.uart), NoInterrupt, NoEvents, Vec::new())
            .map_err(|e| StateError::Invalid {
                kind: NAME,
                reason: match e {
                    vm_superio::serial::Error::FullFifo => {
                        format!("receive FIFO holds {} bytes, more than the UART's", state.uart.in_buffer.len())
                    }
                    other => other.to_string(),
                },
            })?;
        self.uart = uart;
        self.ignored = state.ignored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::hook::{ExitIndex, GuestSignal, HookError, InputSource, OutputSink, Wake};
    use crate::state::check_persist;

    const THR: u64 = 0;
    const DLL: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const LCR_DLAB: u8 = 0x80;
    const MCR_LOOP: u8 = 0x10;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;

    fn write(dev: &mut Serial, world: &mut Scripted, exit: u64, offset: u64, value: u8) {
        world.with_ctx(ExitIndex(exit), |ctx| dev.write(offset, &[value], ctx)).unwrap();
    }

    fn read(dev: &mut Serial, world: &mut Scripted, offset: u64) -> u8 {
        let mut b = [0u8; 1];
        world.with_ctx(ExitIndex(1), |ctx| dev.read(offset, &mut b, ctx)).unwrap();
        b[0]
    }

    #[test]
    fn each_byte_leaves_tagged_with_its_exit() {
        let mut world = Scripted::default();
        let mut dev = Serial::new();
        assert_ne!(read(&mut dev, &mut world, LSR) & LSR_THR_EMPTY, 0);
        for (exit, byte) in [(3u64, b'h'), (4, b'i'), (7, b'\n')] {
            write(&mut dev, &mut world, exit, THR, byte);
        }
        assert_eq!(
            world.serial,
            vec![(ExitIndex(3), b"h".to_vec()), (ExitIndex(4), b"i".to_vec()), (ExitIndex(7), b"\n".to_vec()),]
        );
        assert_eq!(world.serial_bytes(), b"hi\n");
        assert!(dev.uart.writer().is_empty(), "buffer not drained");
    }

    #[test]
    fn register_writes_emit_nothing() {
        let mut world = Scripted::default();
        let mut dev = Serial::new();
        write(&mut dev, &mut world, 1, LCR, LCR_DLAB | 0x03);
        write(&mut dev, &mut world, 2, DLL, 0x01); // divisor, not data
        write(&mut dev, &mut world, 3, LCR, 0x03);
        write(&mut dev, &mut world, 4, SCR, 0x5a);
        write(&mut dev, &mut world, 5, IER, 0x02); // THR-empty interrupt: not wired
        assert!(world.serial.is_empty());
        assert_eq!(read(&mut dev, &mut world, SCR), 0x5a);
        let uart = dev.save().uart;
        assert_eq!(uart.baud_divisor_low, 0x01);
        assert_eq!(uart.line_control, 0x03);
    }

    #[test]
    fn loopback_stays_inside_the_guest_and_is_bounded() {
        let mut world = Scripted::default();
        let mut dev = Serial::new();
        write(&mut dev, &mut world, 1, MCR, MCR_LOOP);
        for i in 0..100u8 {
            write(&mut dev, &mut world, 2, THR, i);
        }
        assert!(world.serial.is_empty(), "loopback bytes left the guest");
        assert_eq!(dev.save().uart.in_buffer.len(), 64);
        assert_ne!(read(&mut dev, &mut world, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read(&mut dev, &mut world, THR), 0);
        assert_eq!(read(&mut dev, &mut world, THR), 1);
    }

    #[test]
    fn odd_accesses_are_counted_not_served() {
        let mut world = Scripted::default();
        let mut dev = Serial::new();
        world.with_ctx(ExitIndex(1), |ctx| {
            dev.write(THR, b"ab", ctx).unwrap();
            dev.write(THR, &[], ctx).unwrap();
            dev.write(LEN, b"a", ctx).unwrap();
            dev.write(0x1_0000_0000, b"a", ctx).unwrap();
            dev.write(u64::MAX, b"a", ctx).unwrap();
            let mut four = [0u8; 4];
            dev.read(THR, &mut four, ctx).unwrap();
            assert_eq!(four, [UNMAPPED_READ; 4]);
            let mut one = [0u8; 1];
            dev.read(0x100, &mut one, ctx).unwrap();
            assert_eq!(one, [UNMAPPED_READ]);
        });
        assert!(world.serial.is_empty());
        assert_eq!(dev.save().ignored, 7);
        assert_eq!(dev.save().uart, SerialState::default());
    }

    /// A sink that fails every serial write.
    struct Broken;
    impl OutputSink for Broken {
        fn serial(&mut self, exit: ExitIndex, _: &[u8]) -> Result<(), HookError> {
            Err(HookError::Ended { exit_index: exit })
        }
        fn signal(&mut self, _: ExitIndex, _: GuestSignal) -> Result<(), HookError> {
            Ok(())
        }
    }
    struct NoInput;
    impl InputSource for NoInput {
        fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
            Err(HookError::Ended { exit_index: exit })
        }
        fn entropy(&mut self, exit: ExitIndex, _: &mut [u8]) -> Result<(), HookError> {
            Err(HookError::Ended { exit_index: exit })
        }
        fn halt(&mut self, _: ExitIndex, _: Option<u64>) -> Result<Wake, HookError> {
            Ok(Wake::Deadline)
        }
    }

    #[test]
    fn a_sink_error_is_a_hook_error_and_the_byte_does_not_leak_later() {
        let mut dev = Serial::new();
        let (mut input, mut broken) = (NoInput, Broken);
        let mut ctx = ExitCtx::new(ExitIndex(8), &mut input, &mut broken);
        let err = dev.write(THR, b"x", &mut ctx).unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Hook { device: "serial", source: HookError::Ended { exit_index: ExitIndex(8) } }
        ));
        let mut world = Scripted::default();
        write(&mut dev, &mut world, 9, THR, b'y');
        assert_eq!(world.serial, vec![(ExitIndex(9), b"y".to_vec())]);
    }

    #[test]
    fn state_mirror_converts_both_ways() {
        let theirs = vm_superio::SerialState {
            baud_divisor_low: 1,
            baud_divisor_high: 2,
            interrupt_enable: 3,
            interrupt_identification: 4,
            line_control: 5,
            line_status: 6,
            modem_control: 7,
            modem_status: 8,
            scratch: 9,
            in_buffer: vec![10, 11],
        };
        let ours = SerialState::from(theirs.clone());
        assert_eq!(ours.scratch, 9);
        assert_eq!(ours.in_buffer, vec![10, 11]);
        assert_eq!(vm_superio::SerialState::from(&ours), theirs);
        assert_eq!(SerialState::default(), SerialState::from(vm_superio::SerialState::default()));
    }

    #[test]
    fn restore_refuses_an_over_long_fifo() {
        let mut world = Scripted::default();
        let mut dev = Serial::new();
        write(&mut dev, &mut world, 1, SCR, 0x77);
        let mut state = dev.save();
        state.uart.in_buffer = vec![0; 65];
        state.uart.scratch = 0x11;
        assert!(matches!(dev.restore(&state), Err(StateError::Invalid { kind: "serial", .. })));
        assert_eq!(read(&mut dev, &mut world, SCR), 0x77, "a refused state changed the UART");
        // 64 is the UART's own bound, and accepted.
        state.uart.in_buffer = vec![0; 64];
        dev.restore(&state).unwrap();
        assert_eq!(read(&mut dev, &mut world, SCR), 0x11);
    }

    #[test]
    fn persist() {
        check_persist(Serial::new(), Serial::new(), |s| {
            let mut world = Scripted::default();
            write(s, &mut world, 1, MCR, MCR_LOOP);
            write(s, &mut world, 2, THR, b'q');
            write(s, &mut world, 3, SCR, 0xa5);
            s.ignored = 2;
        });
    }
}
