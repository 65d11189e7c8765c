//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register
//! file a virtio device shows in its MMIO slot, with no knowledge of what the
//! device does. The device ([`super::virtio_net`]) owns one, feeds it every
//! access, and acts on what [`MmioTransport::write`] reports: a notify, a queue
//! made ready or stopped, a reset, a status the driver may not write.
//!
//! The transport validates what concerns registers only (status transitions,
//! feature negotiation, which queue is selected); ring addresses and sizes are
//! checked against guest memory by the device when a queue is made ready.
//!
//! Threat note: the guest controls every offset, width and value. Registers
//! are decoded only for 32-bit accesses at their documented offsets; config
//! space for 1-, 2-, 4- and 8-byte accesses. Everything else is reported as
//! not decoded (the device counts it) and changes nothing. Values are stored
//! as written and validated when used. Nothing here allocates.

use serde::{Deserialize, Serialize};

/// "virt", little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Transport version: 2 is the virtio 1.x (non-legacy) register layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID the devices report: "FTVM", little-endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FTVM");

// Register offsets, virtio 1.2 §4.2.2, table "MMIO Device Register Layout".
/// MagicValue (R).
pub const REG_MAGIC: u64 = 0x000;
/// Version (R).
pub const REG_VERSION: u64 = 0x004;
/// DeviceID (R).
pub const REG_DEVICE_ID: u64 = 0x008;
/// VendorID (R).
pub const REG_VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures (R): 32 feature bits selected by DeviceFeaturesSel.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel (W).
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures (W): 32 feature bits selected by DriverFeaturesSel.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel (W).
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel (W).
pub const REG_QUEUE_SEL: u64 = 0x030;
/// QueueNumMax (R): 0 when the selected queue does not exist.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum (W).
pub const REG_QUEUE_NUM: u64 = 0x038;
/// QueueReady (RW).
pub const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify (W): the value is the queue index (no VIRTIO_F_NOTIFICATION_DATA).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus (R).
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK (W).
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Status (RW).
pub const REG_STATUS: u64 = 0x070;
/// QueueDescLow (W).
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh (W).
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (W): the available ring.
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh (W).
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (W): the used ring.
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh (W).
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// ConfigGeneration (R).
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

// Device status bits, virtio 1.2 §2.1.
/// The guest OS has noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// The guest OS knows how to drive the device.
pub const STATUS_DRIVER: u32 = 2;
/// The driver is set up and ready to drive the device.
pub const STATUS_DRIVER_OK: u32 = 4;
/// The driver has acknowledged the features it understands.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Set by the device: it hit an error and must be reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Set by the driver: it gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;
/// The bits a driver may write.
const DRIVER_STATUS_BITS: u32 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK | STATUS_FEATURES_OK | STATUS_FAILED;

// InterruptStatus bits, virtio 1.2 §4.2.2.
/// The device used a buffer in at least one queue.
pub const INT_USED_RING: u32 = 1;
/// The configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// VIRTIO_F_VERSION_1 (virtio 1.2 §6): the device is not legacy. This
/// transport is modern-only, so a driver must accept it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a device tells its transport about itself; fixed at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Virtio device ID (1 = network card).
    pub device_id: u32,
    /// Feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    pub features: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Largest size of each queue, a power of two.
    pub queue_max: u16,
}

/// One queue's registers as the driver wrote them. Raw values: they are
/// checked when the driver makes the queue ready, and only then.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// QueueNum.
    pub size: u32,
    /// QueueReady: set only once the device accepted the configuration.
    pub ready: bool,
    /// Descriptor table address (QueueDescLow/High).
    pub desc: u64,
    /// Driver area, the available ring (QueueDriverLow/High).
    pub driver: u64,
    /// Device area, the used ring (QueueDeviceLow/High).
    pub device: u64,
}

/// The transport registers: plain data, saved as part of the device's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioRegs {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The feature bits the driver accepted (words 0 and 1).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Per-queue registers, one per queue of the device.
    pub queues: Vec<QueueRegs>,
}

/// What a register write asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Stored; nothing more to do.
    Done,
    /// Not decoded (offset, width, a read-only register, a queue that does
    /// not exist or is live, features after FEATURES_OK): nothing changed.
    Ignored,
    /// The driver wrote this value to QueueNotify.
    Notify(u32),
    /// The driver set QueueReady on this queue. The device checks the
    /// configuration and, if it accepts it, calls [`MmioTransport::set_ready`].
    QueueReady(u16),
    /// The driver cleared QueueReady on this queue: it is stopped.
    QueueStopped(u16),
    /// The driver wrote 0 to Status: every register is back to its reset value.
    Reset,
    /// The driver wrote a status it may not write (cleared a bit, set a
    /// device-only bit, or DRIVER_OK without FEATURES_OK). Nothing changed.
    BadStatus { from: u32, to: u32 },
    /// The device stopped after an error (DEVICE_NEEDS_RESET) and the driver
    /// wrote something other than a reset or an interrupt acknowledgement:
    /// ignored.
    Stopped,
}

/// The register file of one virtio-mmio device.
#[derive(Clone, Debug)]
pub struct MmioTransport {
    info: DeviceInfo,
    regs: MmioRegs,
}

impl MmioTransport {
    /// The registers of a device as it is after reset.
    pub fn new(info: DeviceInfo) -> Self {
        let regs = Self::reset_regs(&info);
        MmioTransport { info, regs }
    }

    fn reset_regs(info: &DeviceInfo) -> MmioRegs {
        MmioRegs { queues: vec![QueueRegs::default(); usize::from(info.num_queues)], ..MmioRegs::default() }
    }

    /// What the device offers.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The registers, for saving.
    pub fn regs(&self) -> &MmioRegs {
        &self.regs
    }

    /// Device status.
    pub fn status(&self) -> u32 {
        self.regs.status
    }

    /// True when the driver set DRIVER_OK and the device has not stopped.
    pub fn driver_ok(&self) -> bool {
        self.regs.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET) == STATUS_DRIVER_OK
    }

    /// True when the device stopped after an error until the driver resets it.
    pub fn needs_reset(&self) -> bool {
        self.regs.status & STATUS_DEVICE_NEEDS_RESET != 0
    }

    /// The registers of queue `queue`, if it exists.
    pub fn queue(&self, queue: u16) -> Option<&QueueRegs> {
        self.regs.queues.get(usize::from(queue))
    }

    /// Mark queue `queue` ready: the device accepted its configuration.
    pub fn set_ready(&mut self, queue: u16) {
        if let Some(q) = self.regs.queues.get_mut(usize::from(queue)) {
            q.ready = true;
        }
    }

    /// Stop after a driver error: set DEVICE_NEEDS_RESET and raise the
    /// configuration-change interrupt bit, as virtio 1.2 §2.1.2 asks.
    pub fn set_needs_reset(&mut self) {
        self.regs.status |= STATUS_DEVICE_NEEDS_RESET;
        self.regs.interrupt_status |= INT_CONFIG;
    }

    /// Record that the device used buffers (InterruptStatus bit 0). No
    /// interrupt is raised: in lockstep mode the guest polls.
    pub fn note_used(&mut self) {
        self.regs.interrupt_status |= INT_USED_RING;
    }

    /// Check that `regs` could have been reached by this transport; used on
    /// restore, where the registers come from a peer.
    pub fn check(&self, regs: &MmioRegs) -> Result<(), String> {
        if regs.queues.len() != usize::from(self.info.num_queues) {
            return Err(format!("{} queues, the device has {}", regs.queues.len(), self.info.num_queues));
        }
        let extra = regs.driver_features & !self.info.features;
        if extra != 0 {
            return Err(format!("driver features {extra:#x} were never offered"));
        }
        let unknown = regs.status & !(DRIVER_STATUS_BITS | STATUS_DEVICE_NEEDS_RESET);
        if unknown != 0 {
            return Err(format!("unknown status bits {unknown:#x}"));
        }
        if regs.status & STATUS_FEATURES_OK != 0 && regs.driver_features & VIRTIO_F_VERSION_1 == 0 {
            return Err("FEATURES_OK without VIRTIO_F_VERSION_1".into());
        }
        if regs.status & STATUS_DRIVER_OK != 0 && regs.status & STATUS_FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        if regs.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(format!("unknown interrupt status bits {:#x}", regs.interrupt_status));
        }
        Ok(())
    }

    /// Replace the registers with `regs`, which passed [`MmioTransport::check`].
    pub fn set_regs(&mut self, regs: MmioRegs) {
        self.regs = regs;
    }

    /// The register or config-space value at `offset`, `data.len()` bytes
    /// wide. `config` is the device's configuration space. Returns false
    /// (and leaves `data` alone) when the access is not decoded.
    pub fn read(&self, offset: u64, data: &mut [u8], config: &[u8]) -> bool {
        if let Some(config_offset) = offset.checked_sub(CONFIG_OFFSET) {
            return read_config(config_offset, data, config);
        }
        let value = match (offset, data.len()) {
            (_, len) if len != 4 => return false,
            (REG_MAGIC, _) => MAGIC_VALUE,
            (REG_VERSION, _) => MMIO_VERSION,
            (REG_DEVICE_ID, _) => self.info.device_id,
            (REG_VENDOR_ID, _) => VENDOR_ID,
            (REG_DEVICE_FEATURES, _) => match self.regs.device_features_sel {
                0 => super::low_half(self.info.features),
                1 => (self.info.features >> 32) as u32,
                _ => 0,
            },
            (REG_QUEUE_NUM_MAX, _) => match self.selected() {
                Some(_) => u32::from(self.info.queue_max),
                None => 0,
            },
            (REG_QUEUE_READY, _) => self.selected().map_or(0, |q| u32::from(q.ready)),
            (REG_INTERRUPT_STATUS, _) => self.regs.interrupt_status,
            (REG_STATUS, _) => self.regs.status,
            // The configuration never changes.
            (REG_CONFIG_GENERATION, _) => 0,
            _ => return false,
        };
        data.copy_from_slice(&value.to_le_bytes());
        true
    }

    /// Apply a register write and say what the device must do about it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Written {
        // Config space is read-only for the devices built on this transport.
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Written::Ignored;
        };
        if offset >= CONFIG_OFFSET {
            return Written::Ignored;
        }
        let value = u32::from_le_bytes(bytes);
        // A stopped device waits for the reset (virtio 1.2 §2.1.2).
        if self.needs_reset() && offset != REG_STATUS && offset != REG_INTERRUPT_ACK {
            return Written::Stopped;
        }
        match offset {
            REG_DEVICE_FEATURES_SEL => self.regs.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.regs.driver_features_sel = value,
            REG_DRIVER_FEATURES => return self.write_driver_features(value),
            REG_QUEUE_SEL => self.regs.queue_sel = value,
            REG_QUEUE_NUM => return self.write_queue(|q| q.size = value),
            REG_QUEUE_DESC_LOW => return self.write_queue(|q| set_low(&mut q.desc, value)),
            REG_QUEUE_DESC_HIGH => return self.write_queue(|q| set_high(&mut q.desc, value)),
            REG_QUEUE_DRIVER_LOW => return self.write_queue(|q| set_low(&mut q.driver, value)),
            REG_QUEUE_DRIVER_HIGH => return self.write_queue(|q| set_high(&mut q.driver, value)),
            REG_QUEUE_DEVICE_LOW => return self.write_queue(|q| set_low(&mut q.device, value)),
            REG_QUEUE_DEVICE_HIGH => return self.write_queue(|q| set_high(&mut q.device, value)),
            REG_QUEUE_READY => return self.write_queue_ready(value),
            REG_QUEUE_NOTIFY => return Written::Notify(value),
            REG_INTERRUPT_ACK => self.regs.interrupt_status &= !value,
            REG_STATUS => return self.write_status(value),
            _ => return Written::Ignored,
        }
        Written::Done
    }

    fn selected(&self) -> Option<&QueueRegs> {
        self.regs.queues.get(usize::try_from(self.regs.queue_sel).ok()?)
    }

    fn selected_index(&self) -> Option<u16> {
        let index = u16::try_from(self.regs.queue_sel).ok()?;
        (index < self.info.num_queues).then_some(index)
    }

    /// Change the selected queue's configuration, unless it is live (the
    /// driver must clear QueueReady first, virtio 1.2 §4.2.3.2).
    fn write_queue(&mut self, f: impl FnOnce(&mut QueueRegs)) -> Written {
        let Some(index) = self.selected_index() else {
            return Written::Ignored;
        };
        match self.regs.queues.get_mut(usize::from(index)) {
            Some(q) if !q.ready => {
                f(q);
                Written::Done
            }
            _ => Written::Ignored,
        }
    }

    fn write_queue_ready(&mut self, value: u32) -> Written {
        let Some(index) = self.selected_index() else {
            return Written::Ignored;
        };
        let Some(q) = self.regs.queues.get_mut(usize::from(index)) else {
            return Written::Ignored;
        };
        match (q.ready, value != 0) {
            (false, true) => Written::QueueReady(index),
            (true, false) => {
                q.ready = false;
                Written::QueueStopped(index)
            }
            _ => Written::Done,
        }
    }

    fn write_driver_features(&mut self, value: u32) -> Written {
        // Features are fixed once FEATURES_OK is set (virtio 1.2 §3.1.1).
        if self.regs.status & STATUS_FEATURES_OK != 0 {
            return Written::Ignored;
        }
        let features = &mut self.regs.driver_features;
        match self.regs.driver_features_sel {
            0 => set_low(features, value),
            1 => set_high(features, value),
            _ => return Written::Ignored,
        }
        Written::Done
    }

    /// Status writes follow virtio 1.2 §3.1.1: 0 resets; otherwise the driver
    /// only adds bits, FEATURES_OK is refused (left clear) when the driver
    /// accepted a feature the device did not offer or did not accept
    /// VIRTIO_F_VERSION_1, and DRIVER_OK needs FEATURES_OK.
    fn write_status(&mut self, value: u32) -> Written {
        let from = self.regs.status;
        if value == 0 {
            self.regs = Self::reset_regs(&self.info);
            return Written::Reset;
        }
        if self.needs_reset() {
            return Written::Stopped;
        }
        if value & !DRIVER_STATUS_BITS != 0 || value & from != from {
            return Written::BadStatus { from, to: value };
        }
        let mut status = value;
        if value & !from & STATUS_FEATURES_OK != 0 {
            let features = self.regs.driver_features;
            if features & !self.info.features != 0 || features & VIRTIO_F_VERSION_1 == 0 {
                status &= !STATUS_FEATURES_OK;
            }
        }
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            return Written::BadStatus { from, to: value };
        }
        self.regs.status = status;
        Written::Done
    }
}

/// Read `data.len()` (1, 2, 4 or 8) bytes of `config` at `offset`; bytes past
/// its end read as zero.
fn read_config(offset: u64, data: &mut [u8], config: &[u8]) -> bool {
    if !matches!(data.len(), 1 | 2 | 4 | 8) {
        return false;
    }
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start.checked_add(i).and_then(|at| config.get(at)).copied().unwrap_or(0);
    }
    true
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: DeviceInfo =
        DeviceInfo { device_id: 1, features: VIRTIO_F_VERSION_1 | 1 << 5, num_queues: 2, queue_max: 256 };

    fn r(t: &MmioTransport, offset: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        t.read(offset, &mut b, &[1, 2, 3]).then(|| u32::from_le_bytes(b))
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) -> Written {
        t.write(offset, &value.to_le_bytes())
    }

    #[test]
    fn identity_and_features() {
        let mut t = MmioTransport::new(INFO);
        assert_eq!(r(&t, REG_MAGIC), Some(MAGIC_VALUE));
        assert_eq!(r(&t, REG_VERSION), Some(2));
        assert_eq!(r(&t, REG_DEVICE_ID), Some(1));
        assert_eq!(r(&t, REG_DEVICE_FEATURES), Some(1 << 5));
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&t, REG_DEVICE_FEATURES), Some(1));
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&t, REG_DEVICE_FEATURES), Some(0));
        // Write-only and reserved registers, odd widths: not decoded.
        assert_eq!(r(&t, REG_QUEUE_NUM), None);
        assert_eq!(r(&t, 0x0b0), None);
        let mut two = [0xaa; 2];
        assert!(!t.read(REG_STATUS, &mut two, &[]));
        assert_eq!(two, [0xaa; 2]);
        assert_eq!(t.write(REG_STATUS, &[1]), Written::Ignored);
    }

    #[test]
    fn config_space_any_width_zero_past_end() {
        let t = MmioTransport::new(INFO);
        let mut b = [0xffu8; 4];
        assert!(t.read(CONFIG_OFFSET + 1, &mut b, &[1, 2, 3]));
        assert_eq!(b, [2, 3, 0, 0]);
        let mut b = [0xffu8; 8];
        assert!(t.read(u64::MAX, &mut b, &[1, 2, 3]));
        assert_eq!(b, [0; 8]);
        let mut b = [0xffu8; 3];
        assert!(!t.read(CONFIG_OFFSET, &mut b, &[1, 2, 3]));
    }

    #[test]
    fn status_rules() {
        let mut t = MmioTransport::new(INFO);
        assert_eq!(w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER), Written::Done);
        // Clearing a bit, or setting a device-only one, is refused.
        assert!(matches!(w(&mut t, REG_STATUS, STATUS_DRIVER), Written::BadStatus { .. }));
        assert!(matches!(w(&mut t, REG_STATUS, 3 | STATUS_DEVICE_NEEDS_RESET), Written::BadStatus { .. }));
        // Without VERSION_1 FEATURES_OK is refused (left clear)...
        w(&mut t, REG_DRIVER_FEATURES, 1 << 5);
        w(&mut t, REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(t.status(), 3);
        // ...so DRIVER_OK is a bad status.
        assert!(matches!(w(&mut t, REG_STATUS, 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK), Written::BadStatus { .. }));
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 3 | STATUS_FEATURES_OK);
        assert_eq!(t.status(), 0xb);
        // Features are frozen now.
        assert_eq!(w(&mut t, REG_DRIVER_FEATURES, 0), Written::Ignored);
        assert_eq!(t.regs().driver_features, VIRTIO_F_VERSION_1 | 1 << 5);
        t.set_needs_reset();
        assert_eq!(w(&mut t, REG_STATUS, 0xf), Written::Stopped);
        assert_eq!(w(&mut t, REG_QUEUE_SEL, 1), Written::Stopped);
        assert_eq!(w(&mut t, REG_QUEUE_READY, 1), Written::Stopped);
        assert_eq!(w(&mut t, REG_QUEUE_NOTIFY, 1), Written::Stopped);
        assert_eq!(w(&mut t, REG_INTERRUPT_ACK, INT_CONFIG), Written::Done);
        assert_eq!(r(&t, REG_INTERRUPT_STATUS), Some(0));
        assert_eq!(w(&mut t, REG_STATUS, 0), Written::Reset);
        assert_eq!(t.regs(), &MmioTransport::new(INFO).regs);
    }

    #[test]
    fn queue_registers_frozen_while_ready() {
        let mut t = MmioTransport::new(INFO);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&t, REG_QUEUE_NUM_MAX), Some(256));
        w(&mut t, REG_QUEUE_NUM, 16);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x2);
        assert_eq!(t.queue(1).unwrap().desc, 0x2_0000_1000);
        assert_eq!(w(&mut t, REG_QUEUE_READY, 1), Written::QueueReady(1));
        assert_eq!(r(&t, REG_QUEUE_READY), Some(0), "not ready until the device accepts");
        t.set_ready(1);
        assert_eq!(r(&t, REG_QUEUE_READY), Some(1));
        assert_eq!(w(&mut t, REG_QUEUE_NUM, 32), Written::Ignored);
        assert_eq!(w(&mut t, REG_QUEUE_READY, 0), Written::QueueStopped(1));
        assert_eq!(w(&mut t, REG_QUEUE_NUM, 32), Written::Done);
        // A queue that does not exist.
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&t, REG_QUEUE_NUM_MAX), Some(0));
        assert_eq!(r(&t, REG_QUEUE_READY), Some(0));
        assert_eq!(w(&mut t, REG_QUEUE_NUM, 8), Written::Ignored);
        assert_eq!(w(&mut t, REG_QUEUE_READY, 1), Written::Ignored);
        w(&mut t, REG_QUEUE_SEL, u32::MAX);
        assert_eq!(w(&mut t, REG_QUEUE_READY, 1), Written::Ignored);
    }

    #[test]
    fn check_refuses_impossible_registers() {
        let t = MmioTransport::new(INFO);
        let good = t.regs().clone();
        assert!(t.check(&good).is_ok());
        for bad in [
            MmioRegs { queues: vec![], ..good.clone() },
            MmioRegs { driver_features: 1 << 40, ..good.clone() },
            MmioRegs { status: 0x100, ..good.clone() },
            MmioRegs { status: STATUS_FEATURES_OK, ..good.clone() },
            MmioRegs { status: STATUS_DRIVER_OK, ..good.clone() },
            MmioRegs { interrupt_status: 4, ..good.clone() },
        ] {
            assert!(t.check(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
