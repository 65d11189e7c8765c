//! virtio-net over virtio-mmio (virtio 1.2 §5.1), for lockstep guests.
//!
//! Two queues, receive (0) and transmit (1), split rings read and written
//! with `virtio-queue`. Offered features: VIRTIO_F_VERSION_1 and
//! VIRTIO_NET_F_MAC, nothing else, so every buffer starts with the 12-byte
//! `virtio_net_hdr` (with `num_buffers`), no offloads, no merged buffers, no
//! indirect descriptors, no event index. Config space: the MAC at 0x100, then
//! the link status (always up).
//!
//! # Lockstep
//!
//! The device touches the rings only while the vCPU loop handles an exit, so
//! both hosts see the same guest-memory writes at the same exit index:
//!
//! - transmit: on a QueueNotify of queue 1, every available chain is sent to
//!   [`OutputSink::transmit_frame`](crate::hook::OutputSink::transmit_frame)
//!   (header stripped) and returned to the used ring;
//! - receive: on a QueueNotify of queue 0, and when the loop calls
//!   [`VirtioNet::poll_rx`] (through [`BusDevice::after_halt`]) after a HLT
//!   exit, posted buffers are filled while
//!   [`InputSource::receive_frame`](crate::hook::InputSource::receive_frame)
//!   has frames. A frame is asked for only when a valid buffer is posted, so a
//!   frame leaves the world exactly when the guest can take it; otherwise it
//!   stays queued on the host side.
//!
//! No interrupt is raised (lockstep guests poll the used rings); InterruptStatus
//! bit 0 is still set when buffers are used, as virtio 1.2 §4.2.2 defines it,
//! so a driver that reads the register sees the truth.
//!
//! Threat note: the guest controls every register value, the rings, the
//! descriptors and the buffers they point at. Each ring and buffer is checked
//! to lie in guest memory before use and is accessed only through vm-memory's
//! checked accesses; a chain is followed for at most queue-size descriptors;
//! a transmitted chain holds at most [`MAX_CHAIN_BYTES`]; one exit handles at
//! most queue-size chains per queue. A protocol violation sets
//! DEVICE_NEEDS_RESET, stops the device and returns a [`NetError`], which
//! stops the guest. Frames from the world that do not fit the posted buffer
//! are dropped and counted.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::bus::BusDevice;
pub use crate::devices::error::{NetError, Ring};
use crate::devices::virtio_mmio::{DeviceInfo, MmioRegs, MmioTransport, QueueRegs, Written, VIRTIO_F_VERSION_1};
use crate::devices::DeviceError;
use crate::hook::ExitCtx;
use crate::memory::GuestMem;
use crate::state::{Persist, StateError, StateVersion};

/// Bytes of the device's MMIO slot.
pub const LEN: u64 = ftvm_abi::MMIO_SLOT_SIZE;
/// Virtio device ID of a network card.
pub const DEVICE_ID: u32 = 1;
/// VIRTIO_NET_F_MAC: the device has a MAC address in config space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The features offered.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;
/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Number of queues.
pub const NUM_QUEUES: u16 = 2;
/// Largest queue size (QueueNumMax), as Firecracker's.
pub const QUEUE_MAX: u16 = 256;
/// Size of `virtio_net_hdr` with VIRTIO_F_VERSION_1 (virtio 1.2 §5.1.6).
pub const HDR_LEN: usize = crate::devices::error::NET_HDR_LEN;
/// The largest chain a transmit may use: header plus a 65550-byte frame,
/// the largest receive buffer virtio 1.2 §5.1.6.3.1 asks drivers for. A
/// larger transmit chain is a guest error.
pub const MAX_CHAIN_BYTES: u64 = 65562;
/// The largest frame delivered to the guest; larger ones are dropped.
pub const MAX_FRAME_LEN: usize = 65550;
/// Link status in config space: VIRTIO_NET_S_LINK_UP.
const LINK_UP: u16 = 1;
/// Descriptor flags (virtio 1.2 §2.7.5).
const DESC_F_INDIRECT: u16 = 4;

const INFO: DeviceInfo =
    DeviceInfo { device_id: DEVICE_ID, features: FEATURES, num_queues: NUM_QUEUES, queue_max: QUEUE_MAX };

/// Counters, saved with the state (they are the same on both hosts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Frames given to the output sink.
    pub tx_frames: u64,
    /// Frames written into receive buffers.
    pub rx_frames: u64,
    /// Frames from the world that did not fit the posted buffer.
    pub rx_dropped: u64,
    /// Accesses not decoded, and accesses after DEVICE_NEEDS_RESET.
    pub ignored: u64,
}

/// Where the device is in one queue's rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPosition {
    /// Next available-ring entry to take.
    pub next_avail: u16,
    /// Next used-ring entry to fill.
    pub next_used: u16,
}

/// Saved state of [`VirtioNet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// The MAC the device was built with; restore refuses another.
    pub mac: [u8; 6],
    /// Transport registers: features, status, per-queue size, ready and addresses.
    pub transport: MmioRegs,
    /// Ring positions of each queue (meaningful for ready queues).
    pub rings: Vec<RingPosition>,
    /// Counters.
    pub counters: NetCounters,
}

/// One buffer of a descriptor chain that passed the checks.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// The virtio-net device.
pub struct VirtioNet {
    mem: GuestMem,
    mac: [u8; 6],
    transport: MmioTransport,
    /// A ring engine per queue, present while the queue is ready.
    queues: [Option<Queue>; NUM_QUEUES as usize],
    counters: NetCounters,
    /// Scratch: the checked buffers of the chain being handled.
    segments: Vec<Segment>,
    /// Scratch: header and frame of a receive.
    packet: Vec<u8>,
}

impl VirtioNet {
    /// A device in reset state with MAC `mac` that reads and writes the
    /// guest's rings and buffers in `mem`. Map it at
    /// [`ftvm_abi::VIRTIO_MMIO_BASE`] with length [`LEN`].
    pub fn new(mem: GuestMem, mac: [u8; 6]) -> Self {
        VirtioNet {
            mem,
            mac,
            transport: MmioTransport::new(INFO),
            queues: [None, None],
            counters: NetCounters::default(),
            segments: Vec::new(),
            packet: Vec::new(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Counters since boot.
    pub fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// Device status (virtio 1.2 §2.1).
    pub fn status(&self) -> u32 {
        self.transport.status()
    }

    /// Fill posted receive buffers with frames from `ctx.input`; called by
    /// the vCPU loop after every HLT exit (through
    /// [`BusDevice::after_halt`]), whatever woke the guest, so the secondary
    /// asks at the same exits as the primary. Does nothing (and takes no
    /// frame) before DRIVER_OK, after an error or while no buffer is posted.
    pub fn poll_rx(&mut self, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        if !self.transport.driver_ok() || self.queues.get(usize::from(RX_QUEUE)).is_none_or(Option::is_none) {
            return Ok(());
        }
        let r = self.fill_rx(ctx);
        self.on_error(r)
    }

    /// Config space: MAC, then link status.
    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        let (mac, status) = c.split_at_mut(6);
        mac.copy_from_slice(&self.mac);
        status.copy_from_slice(&LINK_UP.to_le_bytes());
        c
    }

    /// A guest error stops the device: DEVICE_NEEDS_RESET is set, and until
    /// the driver resets it the device takes no notify, frame or queue change
    /// (the rings are left as they are, for the saved state).
    fn on_error(&mut self, r: Result<(), DeviceError>) -> Result<(), DeviceError> {
        if let Err(DeviceError::Net(e)) = &r {
            // The error itself reaches the vCPU loop, which reports it once.
            tracing::debug!(error = %e, "virtio-net: guest error, device needs reset");
            self.transport.set_needs_reset();
        }
        r
    }

    fn handle_write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        match self.transport.write(offset, data) {
            Written::Done => Ok(()),
            Written::Ignored | Written::Stopped => {
                self.counters.ignored = self.counters.ignored.wrapping_add(1);
                Ok(())
            }
            Written::Reset => {
                self.queues = [None, None];
                Ok(())
            }
            Written::BadStatus { from, to } => Err(NetError::BadStatus { from, to }.into()),
            Written::QueueReady(queue) => {
                let regs = self.transport.queue(queue).copied().unwrap_or_default();
                let q = build_queue(&self.mem, queue, &regs, RingPosition::default())?;
                if let Some(slot) = self.queues.get_mut(usize::from(queue)) {
                    *slot = Some(q);
                    self.transport.set_ready(queue);
                }
                Ok(())
            }
            Written::QueueStopped(queue) => {
                if let Some(slot) = self.queues.get_mut(usize::from(queue)) {
                    *slot = None;
                }
                Ok(())
            }
            Written::Notify(queue) => self.notify(queue, ctx),
        }
    }

    fn notify(&mut self, queue: u32, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        if self.transport.needs_reset() {
            self.counters.ignored = self.counters.ignored.wrapping_add(1);
            return Ok(());
        }
        let q = u16::try_from(queue).ok().filter(|q| *q < NUM_QUEUES).ok_or(NetError::NoSuchQueue { queue })?;
        if !self.transport.driver_ok() {
            return Err(NetError::NotifyBeforeDriverOk { queue: q, status: self.transport.status() }.into());
        }
        if self.queues.get(usize::from(q)).is_none_or(Option::is_none) {
            return Err(NetError::QueueNotReady { queue: q }.into());
        }
        match q {
            TX_QUEUE => self.process_tx(ctx),
            _ => self.fill_rx(ctx),
        }
    }

    /// Send every available transmit chain (at most a queue's worth).
    fn process_tx(&mut self, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let Some(queue) = self.queues.get_mut(usize::from(TX_QUEUE)).and_then(Option::as_mut) else {
            return Ok(());
        };
        for _ in 0..queue.size() {
            let Some(head) = next_head(&self.mem, queue, TX_QUEUE)? else {
                break;
            };
            let total = walk_chain(&self.mem, queue, TX_QUEUE, head, false, &mut self.segments)?;
            let frame = read_frame(&self.mem, &self.segments, total, head)?;
            // A header with no frame is used but sends nothing.
            if !frame.is_empty() {
                ctx.output
                    .transmit_frame(ctx.exit, &frame)
                    .map_err(|source| DeviceError::Hook { device: "virtio-net", source })?;
                self.counters.tx_frames = self.counters.tx_frames.wrapping_add(1);
            }
            queue.add_used(&self.mem, head, 0).map_err(|source| NetError::RingAccess { queue: TX_QUEUE, source })?;
            self.transport.note_used();
        }
        Ok(())
    }

    /// Fill posted receive buffers while the world has frames (at most a
    /// queue's worth of frames taken per exit).
    fn fill_rx(&mut self, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let Some(queue) = self.queues.get_mut(usize::from(RX_QUEUE)).and_then(Option::as_mut) else {
            return Ok(());
        };
        for _ in 0..queue.size() {
            let Some(head) = next_head(&self.mem, queue, RX_QUEUE)? else {
                break;
            };
            // Check the buffer before taking a frame: a bad chain stops the
            // guest without consuming an input.
            let capacity = walk_chain(&self.mem, queue, RX_QUEUE, head, true, &mut self.segments)?;
            let frame = ctx
                .input
                .receive_frame(ctx.exit)
                .map_err(|source| DeviceError::Hook { device: "virtio-net", source })?;
            let Some(frame) = frame else {
                // Nothing arrived: the buffer stays posted.
                queue.go_to_previous_position();
                break;
            };
            // Saturates only for a frame far above MAX_FRAME_LEN, dropped below.
            let len = HDR_LEN.saturating_add(frame.len());
            if frame.len() > MAX_FRAME_LEN || u64::try_from(len).map_or(true, |l| l > capacity) {
                tracing::debug!(len = frame.len(), capacity, "virtio-net: frame does not fit, dropped");
                self.counters.rx_dropped = self.counters.rx_dropped.wrapping_add(1);
                queue.go_to_previous_position();
                continue;
            }
            self.packet.clear();
            // virtio_net_hdr: no offloads, num_buffers = 1 (virtio 1.2 §5.1.6.4).
            self.packet.extend_from_slice(&[0; HDR_LEN - 2]);
            self.packet.extend_from_slice(&1u16.to_le_bytes());
            self.packet.extend_from_slice(&frame);
            write_packet(&self.mem, &self.segments, &self.packet)?;
            // len <= HDR_LEN + MAX_FRAME_LEN: fits.
            let used_len = u32::try_from(len).unwrap_or(u32::MAX);
            queue
                .add_used(&self.mem, head, used_len)
                .map_err(|source| NetError::RingAccess { queue: RX_QUEUE, source })?;
            self.counters.rx_frames = self.counters.rx_frames.wrapping_add(1);
            self.transport.note_used();
        }
        Ok(())
    }
}

/// Check a ready queue's configuration against guest memory and build its
/// ring engine at `pos`.
fn build_queue(mem: &GuestMem, queue: u16, regs: &QueueRegs, pos: RingPosition) -> Result<Queue, NetError> {
    let size = u16::try_from(regs.size)
        .ok()
        .filter(|s| s.is_power_of_two() && *s <= QUEUE_MAX)
        .ok_or(NetError::QueueSize { queue, size: regs.size, max: QUEUE_MAX })?;
    // Sizes and alignments of virtio 1.2 §2.7 (no event index): a header of
    // `fixed` bytes and `size` entries of `entry` bytes. size <= QUEUE_MAX,
    // so nothing saturates.
    let len = |fixed: u64, entry: u64| u64::from(size).saturating_mul(entry).saturating_add(fixed);
    check_ring(mem, queue, Ring::Descriptors, regs.desc, 16, len(0, 16))?;
    check_ring(mem, queue, Ring::Driver, regs.driver, 2, len(4, 2))?;
    check_ring(mem, queue, Ring::Device, regs.device, 4, len(4, 8))?;
    let ring = |source| NetError::RingAccess { queue, source };
    let mut q = Queue::new(QUEUE_MAX).map_err(ring)?;
    q.try_set_size(size).map_err(ring)?;
    q.try_set_desc_table_address(GuestAddress(regs.desc)).map_err(ring)?;
    q.try_set_avail_ring_address(GuestAddress(regs.driver)).map_err(ring)?;
    q.try_set_used_ring_address(GuestAddress(regs.device)).map_err(ring)?;
    q.set_next_avail(pos.next_avail);
    q.set_next_used(pos.next_used);
    q.set_ready(true);
    Ok(q)
}

fn check_ring(mem: &GuestMem, queue: u16, ring: Ring, addr: u64, align: u64, len: u64) -> Result<(), NetError> {
    if addr.checked_rem(align) != Some(0) {
        return Err(NetError::RingAlignment { queue, ring, addr, align });
    }
    let fits = usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(addr), l, Permissions::ReadWrite));
    if !fits {
        return Err(NetError::RingOutsideMemory { queue, ring, addr, len });
    }
    Ok(())
}

/// The head of the next available chain, taken off the available ring (the
/// caller puts it back with `go_to_previous_position` if it does not use it).
fn next_head(mem: &GuestMem, queue: &mut Queue, index: u16) -> Result<Option<u16>, NetError> {
    let next_avail = queue.next_avail();
    let size = queue.size();
    match queue.iter(mem) {
        Ok(mut it) => Ok(it.next().map(|chain| chain.head_index())),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => {
            let avail_idx = queue.avail_idx(mem, Ordering::Acquire).map_or(0, |i| i.0);
            Err(NetError::AvailIndex { queue: index, avail_idx, next_avail, size })
        }
        Err(source) => Err(NetError::RingAccess { queue: index, source }),
    }
}

/// Follow the chain from `head`, checking every descriptor, into `segments`.
/// Returns its total length in bytes. `writable`: the queue takes
/// device-writable buffers (receive) rather than device-readable ones.
fn walk_chain(
    mem: &GuestMem,
    queue: &Queue,
    index: u16,
    head: u16,
    writable: bool,
    segments: &mut Vec<Segment>,
) -> Result<u64, NetError> {
    segments.clear();
    let size = queue.size();
    let table = GuestAddress(queue.desc_table());
    let mut total: u64 = 0;
    let mut at = head;
    loop {
        if at >= size {
            return Err(NetError::DescriptorIndex { queue: index, index: at, size });
        }
        // A chain visits each of the `size` descriptors at most once.
        if segments.len() >= usize::from(size) {
            return Err(NetError::ChainTooLong { queue: index, head, max: size });
        }
        // at < size <= QUEUE_MAX and the table was checked to fit in guest
        // memory: nothing saturates.
        let addr = table.0.saturating_add(u64::from(at).saturating_mul(16));
        let desc: Descriptor =
            mem.read_obj(GuestAddress(addr)).map_err(|source| NetError::Memory { queue: index, addr, source })?;
        if desc.flags() & DESC_F_INDIRECT != 0 {
            return Err(NetError::IndirectDescriptor { queue: index, index: at });
        }
        if desc.len() == 0 {
            return Err(NetError::ZeroLength { queue: index, index: at });
        }
        if desc.is_write_only() != writable {
            return Err(NetError::Direction { queue: index, index: at, device_writable: desc.is_write_only() });
        }
        let fits = usize::try_from(desc.len()).is_ok_and(|l| mem.check_range(desc.addr(), l, Permissions::ReadWrite));
        if !fits {
            return Err(NetError::BufferOutsideMemory {
                queue: index,
                index: at,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        // At most QUEUE_MAX lengths of u32: never saturates.
        total = total.saturating_add(u64::from(desc.len()));
        if !writable && total > MAX_CHAIN_BYTES {
            return Err(NetError::ChainTooLarge { queue: index, head, max: MAX_CHAIN_BYTES });
        }
        segments.push(Segment { addr: desc.addr(), len: desc.len() });
        if !desc.has_next() {
            return Ok(total);
        }
        at = desc.next();
    }
}

/// The frame of a checked transmit chain of `total` bytes: its bytes after
/// the header.
fn read_frame(mem: &GuestMem, segments: &[Segment], total: u64, head: u16) -> Result<Vec<u8>, NetError> {
    let header = HDR_LEN as u64;
    let Some(frame_len) = total.checked_sub(header) else {
        return Err(NetError::HeaderTooShort { queue: TX_QUEUE, head, len: total });
    };
    // total <= MAX_CHAIN_BYTES, checked while walking.
    let mut frame = Vec::with_capacity(usize::try_from(frame_len).unwrap_or(0));
    let mut skip = header;
    for seg in segments {
        let len = u64::from(seg.len);
        if let Some(left) = skip.checked_sub(len) {
            // The whole segment is header.
            skip = left;
            continue;
        }
        // skip < len and the segment lies in guest memory: nothing saturates.
        let addr = seg.addr.0.saturating_add(skip);
        let n = usize::try_from(len.saturating_sub(skip)).unwrap_or(0);
        skip = 0;
        let start = frame.len();
        // Bounded by MAX_CHAIN_BYTES: never saturates.
        frame.resize(start.saturating_add(n), 0);
        // Just resized: `start..` is the n new bytes (an empty slice otherwise).
        let dst = frame.get_mut(start..).unwrap_or_default();
        mem.read_slice(dst, GuestAddress(addr)).map_err(|source| NetError::Memory { queue: TX_QUEUE, addr, source })?;
    }
    Ok(frame)
}

/// Scatter `packet` over the checked receive buffers (which hold it all).
fn write_packet(mem: &GuestMem, segments: &[Segment], packet: &[u8]) -> Result<(), NetError> {
    let mut rest = packet;
    for seg in segments {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(usize::try_from(seg.len).unwrap_or(usize::MAX));
        let (now, later) = rest.split_at(n);
        mem.write_slice(now, seg.addr).map_err(|source| NetError::Memory {
            queue: RX_QUEUE,
            addr: seg.addr.0,
            source,
        })?;
        rest = later;
    }
    Ok(())
}

impl BusDevice for VirtioNet {
    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let config = self.config();
        if !self.transport.read(offset, data, &config) {
            self.counters.ignored = self.counters.ignored.wrapping_add(1);
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        let r = self.handle_write(offset, data, ctx);
        self.on_error(r)
    }

    fn after_halt(&mut self, ctx: &mut ExitCtx<'_>) -> Result<(), DeviceError> {
        self.poll_rx(ctx)
    }
}

impl Persist for VirtioNet {
    type State = NetState;
    const VERSION: StateVersion = StateVersion { kind: "virtio-net", major: 1, minor: 0 };

    fn save(&self) -> NetState {
        let rings = self
            .queues
            .iter()
            .map(|q| {
                q.as_ref().map_or_else(RingPosition::default, |q| RingPosition {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
            })
            .collect();
        NetState { mac: self.mac, transport: self.transport.regs().clone(), rings, counters: self.counters.clone() }
    }

    /// Checks as Firecracker's `build_queues_checked`: same MAC, features
    /// within those offered, a consistent status, and every ready queue's
    /// size and rings valid in this guest memory.
    fn restore(&mut self, state: &NetState) -> Result<(), StateError> {
        let invalid = |reason: String| StateError::Invalid { kind: Self::VERSION.kind, reason };
        if state.mac != self.mac {
            return Err(invalid(format!("MAC {:02x?} differs from this device's {:02x?}", state.mac, self.mac)));
        }
        self.transport.check(&state.transport).map_err(invalid)?;
        if state.rings.len() != usize::from(NUM_QUEUES) {
            return Err(invalid(format!("{} ring positions for {NUM_QUEUES} queues", state.rings.len())));
        }
        let mut queues: [Option<Queue>; NUM_QUEUES as usize] = [None, None];
        for (i, ((slot, regs), pos)) in queues.iter_mut().zip(&state.transport.queues).zip(&state.rings).enumerate() {
            if regs.ready {
                let index = u16::try_from(i).unwrap_or(u16::MAX);
                *slot = Some(build_queue(&self.mem, index, regs, *pos).map_err(|e| invalid(e.to_string()))?);
            }
        }
        self.transport.set_regs(state.transport.clone());
        self.queues = queues;
        self.counters = state.counters.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Scripted;
    use crate::devices::virtio_mmio::*;
    use crate::hook::ExitIndex;
    use crate::state::check_persist;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const MEM_SIZE: usize = 0x10_0000;
    const QSIZE: u16 = 16;
    /// Where the test's receive and transmit buffers live.
    const BUF: u64 = 0x8_0000;
    /// virtio-drivers 0.13's `SUPPORTED_FEATURES` for VirtIONet: MAC, STATUS,
    /// RING_EVENT_IDX, RING_INDIRECT_DESC, VERSION_1.
    const DRIVER_SUPPORTED: u64 = 1 << 5 | 1 << 16 | 1 << 29 | 1 << 28 | 1 << 32;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn test_mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc_table(q: u16) -> u64 {
        0x1_0000 * (1 + u64::from(q))
    }
    fn avail_ring(q: u16) -> u64 {
        desc_table(q) + 0x1000
    }
    fn used_ring(q: u16) -> u64 {
        desc_table(q) + 0x2000
    }

    /// A guest driver and the world around one device, as virtio-drivers'
    /// `MmioTransport` + `VirtIONetRaw` drive it.
    struct Harness {
        net: VirtioNet,
        mem: GuestMem,
        world: Scripted,
        exit: u64,
        avail_idx: [u16; 2],
    }

    impl Harness {
        fn new() -> Self {
            let mem = test_mem();
            Harness::around(VirtioNet::new(mem.clone(), MAC), mem)
        }

        fn around(net: VirtioNet, mem: GuestMem) -> Self {
            Harness { net, mem, world: Scripted::default(), exit: 0, avail_idx: [0; 2] }
        }

        /// Run `f` as the handling of the next exit.
        fn at_exit<R>(&mut self, f: impl FnOnce(&mut VirtioNet, &mut ExitCtx<'_>) -> R) -> R {
            self.exit += 1;
            let net = &mut self.net;
            self.world.with_ctx(ExitIndex(self.exit), |ctx| f(net, ctx))
        }

        fn read(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.at_exit(|net, ctx| net.read(offset, &mut b, ctx)).unwrap();
            u32::from_le_bytes(b)
        }

        fn write(&mut self, offset: u64, value: u32) -> Result<(), DeviceError> {
            self.at_exit(|net, ctx| net.write(offset, &value.to_le_bytes(), ctx))
        }

        fn notify(&mut self, queue: u32) -> Result<(), DeviceError> {
            self.write(REG_QUEUE_NOTIFY, queue)
        }

        fn after_halt(&mut self) -> Result<(), DeviceError> {
            self.at_exit(|net, ctx| net.after_halt(ctx))
        }

        /// `MmioTransport::new` and `begin_init`: returns the negotiated features.
        fn begin_init(&mut self) -> u64 {
            assert_eq!(self.read(REG_MAGIC), MAGIC_VALUE);
            assert_eq!(self.read(REG_DEVICE_ID), DEVICE_ID);
            assert_eq!(self.read(REG_VERSION), 2);
            self.write(REG_STATUS, 0).unwrap();
            self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER).unwrap();
            self.write(REG_DEVICE_FEATURES_SEL, 0).unwrap();
            let low = u64::from(self.read(REG_DEVICE_FEATURES));
            self.write(REG_DEVICE_FEATURES_SEL, 1).unwrap();
            let features = low | u64::from(self.read(REG_DEVICE_FEATURES)) << 32;
            let negotiated = features & DRIVER_SUPPORTED;
            self.write_driver_features(negotiated);
            self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK).unwrap();
            negotiated
        }

        fn write_driver_features(&mut self, features: u64) {
            self.write(REG_DRIVER_FEATURES_SEL, 0).unwrap();
            self.write(REG_DRIVER_FEATURES, crate::devices::low_half(features)).unwrap();
            self.write(REG_DRIVER_FEATURES_SEL, 1).unwrap();
            self.write(REG_DRIVER_FEATURES, (features >> 32) as u32).unwrap();
        }

        /// `VirtQueue::new` through `queue_set`, with the test's ring layout.
        fn setup_queue(&mut self, q: u16, size: u32) -> Result<(), DeviceError> {
            self.setup_queue_at(q, size, desc_table(q), avail_ring(q), used_ring(q))
        }

        fn setup_queue_at(
            &mut self,
            q: u16,
            size: u32,
            desc: u64,
            driver: u64,
            device: u64,
        ) -> Result<(), DeviceError> {
            self.write(REG_QUEUE_SEL, q.into())?;
            assert_eq!(self.read(REG_QUEUE_READY), 0);
            assert_eq!(self.read(REG_QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
            self.write(REG_QUEUE_NUM, size)?;
            for (low, addr) in
                [(REG_QUEUE_DESC_LOW, desc), (REG_QUEUE_DRIVER_LOW, driver), (REG_QUEUE_DEVICE_LOW, device)]
            {
                self.write(low, crate::devices::low_half(addr))?;
                self.write(low + 4, (addr >> 32) as u32)?;
            }
            self.write(REG_QUEUE_READY, 1)
        }

        /// The whole of `VirtIONetRaw::new`.
        fn init(&mut self) {
            assert_eq!(self.begin_init(), FEATURES);
            self.setup_queue(TX_QUEUE, QSIZE.into()).unwrap();
            self.setup_queue(RX_QUEUE, QSIZE.into()).unwrap();
            self.write(REG_STATUS, 0xf).unwrap();
            assert_eq!(self.read(REG_STATUS), 0xf);
        }

        fn put_desc(&self, q: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(desc_table(q) + 16 * u64::from(index));
            self.mem.write_obj(Descriptor::new(addr, len, flags, next), at).unwrap();
        }

        /// Put `head` on the available ring.
        fn make_avail(&mut self, q: u16, head: u16) {
            let idx = &mut self.avail_idx[usize::from(q)];
            let slot = avail_ring(q) + 4 + 2 * u64::from(*idx % QSIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            *idx = idx.wrapping_add(1);
            self.mem.write_obj(*idx, GuestAddress(avail_ring(q) + 2)).unwrap();
        }

        /// The used ring: its index and the (id, len) elements so far.
        fn used(&self, q: u16) -> (u16, Vec<(u32, u32)>) {
            let idx: u16 = self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap();
            let elems = (0..idx.min(QSIZE))
                .map(|i| {
                    let at = used_ring(q) + 4 + 8 * u64::from(i);
                    (self.mem.read_obj(GuestAddress(at)).unwrap(), self.mem.read_obj(GuestAddress(at + 4)).unwrap())
                })
                .collect();
            (idx, elems)
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        }

        fn needs_reset(&self) -> bool {
            self.net.status() & STATUS_DEVICE_NEEDS_RESET != 0
        }
    }

    /// A buffer length as a descriptor's u32.
    fn len32(len: usize) -> u32 {
        u32::try_from(len).unwrap()
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| i.to_le_bytes()[0].wrapping_mul(31) ^ seed).collect()
    }

    /// The receive header the device writes: no offloads, num_buffers 1.
    const RX_HDR: [u8; HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    /// Assert that `r` is the guest error `p` and the device needs a reset.
    macro_rules! assert_guest_error {
        ($h:expr, $r:expr, $p:pat) => {{
            let r = $r;
            assert!(matches!(r, Err(DeviceError::Net($p))), "expected {}, got {r:?}", stringify!($p));
            assert!($h.needs_reset(), "status {:#x} lacks DEVICE_NEEDS_RESET", $h.net.status());
            assert_ne!($h.read(REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
        }};
    }

    #[test]
    fn handshake_as_virtio_drivers_does() {
        let mut h = Harness::new();
        assert_eq!(h.read(REG_VENDOR_ID), VENDOR_ID);
        let negotiated = h.begin_init();
        assert_eq!(negotiated, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC, "no EVENT_IDX, INDIRECT or STATUS");
        assert_eq!(h.read(REG_STATUS), 0xb, "FEATURES_OK accepted");
        // read_consistent(mac) then the status field, as read_config! does it.
        assert_eq!(h.read(REG_CONFIG_GENERATION), 0);
        let mac: Vec<u8> = (0..6)
            .map(|i| {
                let mut b = [0u8];
                h.at_exit(|net, ctx| net.read(CONFIG_OFFSET + i, &mut b, ctx)).unwrap();
                b[0]
            })
            .collect();
        assert_eq!(mac, MAC);
        let mut status = [0u8; 2];
        h.at_exit(|net, ctx| net.read(CONFIG_OFFSET + 6, &mut status, ctx)).unwrap();
        assert_eq!(u16::from_le_bytes(status), LINK_UP);
        h.setup_queue(TX_QUEUE, QSIZE.into()).unwrap();
        h.setup_queue(RX_QUEUE, QSIZE.into()).unwrap();
        assert_eq!(h.read(REG_QUEUE_READY), 1);
        h.write(REG_STATUS, 0xf).unwrap();
        assert_eq!(h.read(REG_STATUS), 0xf);
        assert!(h.world.frame_reads.is_empty() && h.world.transmitted.is_empty());
        assert_eq!(h.net.counters().ignored, 0);

        // Dropping the driver: queue_unset then reset, all accepted.
        h.write(REG_QUEUE_SEL, 0).unwrap();
        h.write(REG_QUEUE_READY, 0).unwrap();
        assert_eq!(h.read(REG_QUEUE_READY), 0);
        h.write(REG_QUEUE_NUM, 0).unwrap();
        h.write(REG_STATUS, 0).unwrap();
        assert_eq!(h.read(REG_STATUS), 0);
        h.write(REG_QUEUE_SEL, 1).unwrap();
        assert_eq!(h.read(REG_QUEUE_READY), 0, "reset stops every queue");
    }

    #[test]
    fn features_beyond_offer_refuse_features_ok() {
        let mut h = Harness::new();
        h.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER).unwrap();
        h.write_driver_features(FEATURES | 1 << 29);
        h.write(REG_STATUS, 0xb).unwrap();
        assert_eq!(h.read(REG_STATUS), 0x3, "FEATURES_OK refused");
        assert_guest_error!(h, h.write(REG_STATUS, 0xf), NetError::BadStatus { from: 3, to: 0xf });
    }

    #[test]
    fn transmit_reaches_the_sink_at_the_exit() {
        let mut h = Harness::new();
        h.init();
        let (a, b) = (frame(60, 1), frame(1514, 2));
        // Chain 0 -> 1: header and frame apart, as VirtIONetRaw::send does.
        h.mem.write_slice(&[0; HDR_LEN], GuestAddress(BUF)).unwrap();
        h.mem.write_slice(&a, GuestAddress(BUF + 0x100)).unwrap();
        h.put_desc(TX_QUEUE, 0, BUF, len32(HDR_LEN), F_NEXT, 1);
        h.put_desc(TX_QUEUE, 1, BUF + 0x100, len32(a.len()), 0, 0);
        // Chain 5: header and frame in one buffer.
        h.mem.write_slice(&[0; HDR_LEN], GuestAddress(BUF + 0x1000)).unwrap();
        h.mem.write_slice(&b, GuestAddress(BUF + 0x1000 + HDR_LEN as u64)).unwrap();
        h.put_desc(TX_QUEUE, 5, BUF + 0x1000, len32(HDR_LEN + b.len()), 0, 0);
        h.make_avail(TX_QUEUE, 0);
        h.make_avail(TX_QUEUE, 5);
        h.notify(TX_QUEUE.into()).unwrap();
        let exit = ExitIndex(h.exit);
        assert_eq!(h.world.transmitted, vec![(exit, a), (exit, b)]);
        assert_eq!(h.used(TX_QUEUE), (2, vec![(0, 0), (5, 0)]));
        assert_eq!(h.net.counters().tx_frames, 2);
        assert_eq!(h.read(REG_INTERRUPT_STATUS), INT_USED_RING, "noted, never raised");
        h.write(REG_INTERRUPT_ACK, INT_USED_RING).unwrap();
        assert_eq!(h.read(REG_INTERRUPT_STATUS), 0);
        // A second notify with nothing new sends nothing.
        h.notify(TX_QUEUE.into()).unwrap();
        assert_eq!(h.world.transmitted.len(), 2);
        assert!(h.world.frame_reads.is_empty());
    }

    #[test]
    fn receive_fills_a_posted_buffer_after_halt() {
        let mut h = Harness::new();
        let f = frame(98, 3);
        h.world = Scripted::with_frames(vec![f.clone()]);
        h.init();
        h.put_desc(RX_QUEUE, 0, BUF, 1526, F_WRITE, 0);
        h.make_avail(RX_QUEUE, 0);
        h.after_halt().unwrap();
        assert_eq!(h.world.frame_reads, vec![ExitIndex(h.exit)]);
        let len = HDR_LEN + f.len();
        assert_eq!(h.used(RX_QUEUE), (1, vec![(0, len32(len))]));
        let got = h.bytes(BUF, len);
        assert_eq!(got[..HDR_LEN], RX_HDR);
        assert_eq!(got[HDR_LEN..], f[..]);
        assert_eq!(h.net.counters().rx_frames, 1);
        assert!(h.mem.check_range(GuestAddress(BUF), len, Permissions::Read));
    }

    #[test]
    fn receive_scatters_over_header_and_data_buffers() {
        let mut h = Harness::new();
        h.init();
        let f = frame(1514, 4);
        h.world.frames.push_back(f.clone());
        h.put_desc(RX_QUEUE, 3, BUF, len32(HDR_LEN), F_WRITE | F_NEXT, 7);
        h.put_desc(RX_QUEUE, 7, BUF + 0x1000, 1514, F_WRITE, 0);
        h.make_avail(RX_QUEUE, 3);
        h.notify(RX_QUEUE.into()).unwrap();
        assert_eq!(h.used(RX_QUEUE), (1, vec![(3, len32(HDR_LEN + f.len()))]));
        assert_eq!(h.bytes(BUF, HDR_LEN), RX_HDR);
        assert_eq!(h.bytes(BUF + 0x1000, f.len()), f);
    }

    #[test]
    fn no_posted_buffer_no_frame_taken() {
        let mut h = Harness::new();
        h.world.frames.push_back(frame(60, 5));
        // Before the driver is up: nothing asked.
        h.after_halt().unwrap();
        h.init();
        // Up, but no buffer posted: nothing asked, the frame stays queued.
        h.after_halt().unwrap();
        h.notify(RX_QUEUE.into()).unwrap();
        assert!(h.world.frame_reads.is_empty());
        assert_eq!(h.world.frames.len(), 1);
        // Two buffers, three frames: exactly two taken, at this exit.
        h.world.frames.push_back(frame(61, 6));
        h.world.frames.push_back(frame(62, 7));
        for i in 0..2u16 {
            h.put_desc(RX_QUEUE, i, BUF + 0x1000 * u64::from(i), 1526, F_WRITE, 0);
            h.make_avail(RX_QUEUE, i);
        }
        h.notify(RX_QUEUE.into()).unwrap();
        assert_eq!(h.world.frame_reads, vec![ExitIndex(h.exit); 2]);
        assert_eq!(h.world.frames, vec![frame(62, 7)]);
        assert_eq!(h.used(RX_QUEUE).0, 2);
        // A posted buffer and nothing arrived: asked once, buffer kept.
        h.world.frames.clear();
        h.put_desc(RX_QUEUE, 2, BUF, 1526, F_WRITE, 0);
        h.make_avail(RX_QUEUE, 2);
        h.after_halt().unwrap();
        assert_eq!(h.world.frame_reads.len(), 3);
        h.world.frames.push_back(frame(63, 8));
        h.after_halt().unwrap();
        assert_eq!(h.used(RX_QUEUE), (3, vec![(0, 72), (1, 73), (2, 75)]));
    }

    #[test]
    fn frame_too_big_for_the_buffer_is_dropped_buffer_kept() {
        let mut h = Harness::new();
        h.init();
        h.world.frames.extend([frame(200, 1), frame(88, 2)]);
        h.put_desc(RX_QUEUE, 0, BUF, 100, F_WRITE, 0);
        h.make_avail(RX_QUEUE, 0);
        h.after_halt().unwrap();
        assert_eq!(h.net.counters().rx_dropped, 1);
        assert_eq!(h.used(RX_QUEUE), (1, vec![(0, 100)]));
        assert_eq!(h.bytes(BUF + HDR_LEN as u64, 88), frame(88, 2));
        assert!(!h.needs_reset(), "the world's frame is not the guest's fault");
    }

    /// A device with both queues up, a frame queued for it, and the TX (or
    /// RX) chain at descriptor 0 made available by `set`, then notified.
    fn hostile_chain(q: u16, set: impl FnOnce(&Harness)) -> (Harness, Result<(), DeviceError>) {
        let mut h = Harness::new();
        h.init();
        h.world.frames.push_back(frame(60, 9));
        set(&h);
        h.make_avail(q, 0);
        let r = h.notify(q.into());
        (h, r)
    }

    #[test]
    fn hostile_chains_need_reset_with_typed_errors() {
        let tx = TX_QUEUE;
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, BUF, 64, F_NEXT, 0));
        assert_guest_error!(h, r, NetError::ChainTooLong { queue: 1, head: 0, max: QSIZE });
        let (mut h, r) = hostile_chain(tx, |h| {
            h.put_desc(tx, 0, BUF, 64, F_NEXT, 1);
            h.put_desc(tx, 1, BUF, 64, F_NEXT, 0);
        });
        assert_guest_error!(h, r, NetError::ChainTooLong { .. });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, BUF, 64, F_NEXT, QSIZE));
        assert_guest_error!(h, r, NetError::DescriptorIndex { index: QSIZE, size: QSIZE, .. });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, BUF, 0, 0, 0));
        assert_guest_error!(h, r, NetError::ZeroLength { queue: 1, index: 0 });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, BUF, 64, F_WRITE, 0));
        assert_guest_error!(h, r, NetError::Direction { queue: 1, index: 0, device_writable: true });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, BUF, 64, DESC_F_INDIRECT, 0));
        assert_guest_error!(h, r, NetError::IndirectDescriptor { .. });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, MEM_SIZE as u64 - 8, 64, 0, 0));
        assert_guest_error!(h, r, NetError::BufferOutsideMemory { len: 64, .. });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, u64::MAX - 2, 64, 0, 0));
        assert_guest_error!(h, r, NetError::BufferOutsideMemory { addr: 0xffff_ffff_ffff_fffd, .. });
        let (mut h, r) = hostile_chain(tx, |h| h.put_desc(tx, 0, BUF, 11, 0, 0));
        assert_guest_error!(h, r, NetError::HeaderTooShort { len: 11, .. });
        // 3 x 30000 bytes: over the 65562-byte bound.
        let (mut h, r) = hostile_chain(tx, |h| {
            h.put_desc(tx, 0, BUF, 30000, F_NEXT, 1);
            h.put_desc(tx, 1, BUF, 30000, F_NEXT, 2);
            h.put_desc(tx, 2, BUF, 30000, 0, 0);
        });
        assert_guest_error!(h, r, NetError::ChainTooLarge { max: MAX_CHAIN_BYTES, .. });
        assert!(h.world.transmitted.is_empty());

        // Receive: checked before any frame is taken.
        let rx = RX_QUEUE;
        let (mut h, r) = hostile_chain(rx, |h| h.put_desc(rx, 0, BUF, 1526, 0, 0));
        assert_guest_error!(h, r, NetError::Direction { queue: 0, device_writable: false, .. });
        assert!(h.world.frame_reads.is_empty());
        let (mut h, r) = hostile_chain(rx, |h| h.put_desc(rx, 0, BUF, 1526, F_WRITE | F_NEXT, 0));
        assert_guest_error!(h, r, NetError::ChainTooLong { queue: 0, .. });
        assert!(h.world.frame_reads.is_empty());

        // Head index out of range on the available ring.
        let mut h = Harness::new();
        h.init();
        h.make_avail(TX_QUEUE, 40);
        assert_guest_error!(h, h.notify(1), NetError::DescriptorIndex { index: 40, .. });
    }

    #[test]
    fn runaway_available_index_is_a_guest_error() {
        let mut h = Harness::new();
        h.init();
        h.mem.write_obj(QSIZE + 1, GuestAddress(avail_ring(TX_QUEUE) + 2)).unwrap();
        assert_guest_error!(
            h,
            h.notify(1),
            NetError::AvailIndex { queue: 1, avail_idx: 17, next_avail: 0, size: QSIZE }
        );
    }

    #[test]
    fn bad_queue_configurations_are_refused_at_queue_ready() {
        for size in [0, 3, 24, 512, 0x1_0010] {
            let mut h = Harness::new();
            h.begin_init();
            assert_guest_error!(h, h.setup_queue(TX_QUEUE, size), NetError::QueueSize { queue: 1, .. });
            h.write(REG_QUEUE_SEL, 1).unwrap();
            assert_eq!(h.read(REG_QUEUE_READY), 0, "refused queue is not ready");
        }
        let cases: [(u64, u64, u64); 6] = [
            (desc_table(1) + 8, avail_ring(1), used_ring(1)),
            (desc_table(1), avail_ring(1) + 1, used_ring(1)),
            (desc_table(1), avail_ring(1), used_ring(1) + 2),
            (MEM_SIZE as u64 - 0x80, avail_ring(1), used_ring(1)),
            (desc_table(1), 1 << 40, used_ring(1)),
            (desc_table(1), avail_ring(1), u64::MAX - 3),
        ];
        for (i, (desc, driver, device)) in cases.into_iter().enumerate() {
            let mut h = Harness::new();
            h.begin_init();
            let r = h.setup_queue_at(TX_QUEUE, QSIZE.into(), desc, driver, device);
            match i {
                0..=2 => assert_guest_error!(h, r, NetError::RingAlignment { queue: 1, .. }),
                _ => assert_guest_error!(h, r, NetError::RingOutsideMemory { queue: 1, .. }),
            }
        }
    }

    #[test]
    fn bad_notifies_are_guest_errors() {
        let mut h = Harness::new();
        h.begin_init();
        h.setup_queue(TX_QUEUE, QSIZE.into()).unwrap();
        assert_guest_error!(h, h.notify(1), NetError::NotifyBeforeDriverOk { queue: 1, status: 0xb });

        let mut h = Harness::new();
        h.begin_init();
        h.setup_queue(TX_QUEUE, QSIZE.into()).unwrap();
        h.write(REG_STATUS, 0xf).unwrap();
        assert_guest_error!(h, h.notify(0), NetError::QueueNotReady { queue: 0 });

        let mut h = Harness::new();
        h.init();
        assert_guest_error!(h, h.notify(2), NetError::NoSuchQueue { queue: 2 });
        let mut h = Harness::new();
        h.init();
        assert_guest_error!(h, h.notify(u32::MAX), NetError::NoSuchQueue { .. });
    }

    #[test]
    fn stopped_device_ignores_everything_until_reset() {
        let mut h = Harness::new();
        h.init();
        h.world.frames.push_back(frame(60, 1));
        h.put_desc(TX_QUEUE, 0, BUF, 0, 0, 0);
        h.make_avail(TX_QUEUE, 0);
        assert!(h.notify(1).is_err());
        // Posted RX buffer, frame queued: stopped device takes nothing.
        h.put_desc(RX_QUEUE, 0, BUF, 1526, F_WRITE, 0);
        h.make_avail(RX_QUEUE, 0);
        h.notify(0).unwrap();
        h.notify(1).unwrap();
        h.after_halt().unwrap();
        h.write(REG_STATUS, 0xff).unwrap();
        assert!(h.world.frame_reads.is_empty() && h.world.transmitted.is_empty());
        assert_eq!(h.net.counters().ignored, 3);
        // The driver resets and starts over: all works again.
        h.write(REG_STATUS, 0).unwrap();
        assert!(!h.needs_reset());
        h.avail_idx = [0; 2];
        for q in [RX_QUEUE, TX_QUEUE] {
            h.mem.write_obj(0u16, GuestAddress(avail_ring(q) + 2)).unwrap();
            h.mem.write_obj(0u16, GuestAddress(used_ring(q) + 2)).unwrap();
        }
        h.init();
        h.make_avail(RX_QUEUE, 0);
        h.after_halt().unwrap();
        assert_eq!(h.used(RX_QUEUE), (1, vec![(0, 72)]));
    }

    #[test]
    fn undecoded_accesses_are_counted_not_served() {
        let mut h = Harness::new();
        let mut b = [0xffu8; 2];
        h.at_exit(|net, ctx| net.read(REG_STATUS, &mut b, ctx)).unwrap();
        assert_eq!(b, [0xff; 2]);
        h.at_exit(|net, ctx| net.write(REG_STATUS, &[1], ctx)).unwrap();
        h.write(CONFIG_OFFSET, 0).unwrap();
        h.write(0x0c0, 1).unwrap();
        assert_eq!(h.read(REG_STATUS), 0);
        assert_eq!(h.net.counters().ignored, 4);
        assert_eq!(h.net.mac(), MAC);
    }

    /// Deterministic xorshift, for the no-panic test below.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Random rings, descriptors and register writes: errors, never a panic,
    /// and never an error other than a guest error.
    #[test]
    fn random_guests_cannot_panic_the_device() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let offsets = [
            REG_DEVICE_FEATURES_SEL,
            REG_DRIVER_FEATURES,
            REG_DRIVER_FEATURES_SEL,
            REG_QUEUE_SEL,
            REG_QUEUE_NUM,
            REG_QUEUE_READY,
            REG_QUEUE_NOTIFY,
            REG_INTERRUPT_ACK,
            REG_STATUS,
            REG_QUEUE_DESC_LOW,
            REG_QUEUE_DESC_HIGH,
            REG_QUEUE_DRIVER_LOW,
            REG_QUEUE_DEVICE_LOW,
        ];
        for round in 0..300u32 {
            let mut h = Harness::new();
            h.init();
            for _ in 0..8 {
                h.world.frames.push_back(frame(usize::try_from(rng.next() % 2000).unwrap(), round.to_le_bytes()[0]));
            }
            for q in [RX_QUEUE, TX_QUEUE] {
                for i in 0..QSIZE {
                    let r = rng.next();
                    let addr = if r & 1 == 0 { (r >> 8) % MEM_SIZE as u64 } else { r };
                    let len = (rng.next() % 3000) as u32;
                    let flags = (rng.next() % 8) as u16;
                    let next = u16::try_from(rng.next() % u64::from(QSIZE + 2)).unwrap();
                    h.put_desc(q, i, addr, len, flags, next);
                }
                for _ in 0..rng.next() % 20 {
                    let head = u16::try_from(rng.next() % u64::from(QSIZE + 1)).unwrap();
                    h.make_avail(q, head);
                }
            }
            for _ in 0..20 {
                let r = match rng.next() % 4 {
                    0 => h.notify((rng.next() % 3) as u32),
                    1 => h.after_halt(),
                    2 => {
                        let off = offsets[usize::try_from(rng.next() % offsets.len() as u64).unwrap()];
                        let value = if rng.next() % 2 == 0 {
                            u32::try_from(rng.next() % 20).unwrap()
                        } else {
                            crate::devices::low_half(rng.next())
                        };
                        h.write(off, value)
                    }
                    _ => {
                        let mut b = vec![0u8; (rng.next() % 9) as usize];
                        let off = rng.next() % LEN;
                        h.at_exit(|net, ctx| net.read(off, &mut b, ctx))
                    }
                };
                match r {
                    Ok(()) => {}
                    Err(DeviceError::Net(e)) => {
                        assert!(h.needs_reset(), "{e} without DEVICE_NEEDS_RESET");
                        let _ = e.to_string();
                    }
                    Err(e) => panic!("not a guest error: {e:?}"),
                }
            }
            // Whatever happened, the state saves and restores.
            let blob = h.net.save_blob();
            let mut other = VirtioNet::new(h.mem.clone(), MAC);
            other.restore_blob(&blob).unwrap();
            assert_eq!(other.save_blob(), blob);
        }
    }

    #[test]
    fn persist() {
        let mem = test_mem();
        check_persist(VirtioNet::new(mem.clone(), MAC), VirtioNet::new(mem.clone(), MAC), |net| {
            let mut h = Harness::around(std::mem::replace(net, VirtioNet::new(mem.clone(), MAC)), mem.clone());
            h.init();
            h.put_desc(TX_QUEUE, 0, BUF, 100, 0, 0);
            h.make_avail(TX_QUEUE, 0);
            h.notify(1).unwrap();
            *net = h.net;
        });
    }

    #[test]
    fn restored_device_carries_on_where_the_saved_one_was() {
        let mut h = Harness::new();
        h.init();
        h.put_desc(TX_QUEUE, 0, BUF, 100, 0, 0);
        h.make_avail(TX_QUEUE, 0);
        h.notify(1).unwrap();
        let blob = h.net.save_blob();
        let mut copy = VirtioNet::new(h.mem.clone(), MAC);
        copy.restore_blob(&blob).unwrap();
        h.net = copy;
        h.put_desc(TX_QUEUE, 1, BUF, 50, 0, 0);
        h.make_avail(TX_QUEUE, 1);
        h.notify(1).unwrap();
        assert_eq!(h.used(TX_QUEUE), (2, vec![(0, 0), (1, 0)]));
        assert_eq!(h.world.transmitted.len(), 2);
        assert_eq!(h.net.counters().tx_frames, 2);
    }

    #[test]
    fn restore_refuses_what_this_device_cannot_be() {
        let mut h = Harness::new();
        h.init();
        let good = h.net.save();
        let mut net = VirtioNet::new(h.mem.clone(), MAC);
        let before = net.save_blob();
        let mut bad_queue = good.clone();
        bad_queue.transport.queues[1].size = 3;
        let mut bad_ring = good.clone();
        bad_ring.transport.queues[0].device = MEM_SIZE as u64;
        let mut bad_features = good.clone();
        bad_features.transport.driver_features |= 1 << 29;
        let mut bad_rings = good.clone();
        bad_rings.rings.pop();
        let mut other_mac = good.clone();
        other_mac.mac = [2, 0, 0, 0, 0, 1];
        for bad in [bad_queue, bad_ring, bad_features, bad_rings, other_mac] {
            assert!(matches!(net.restore(&bad), Err(StateError::Invalid { kind: "virtio-net", .. })), "{bad:?}");
            assert_eq!(net.save_blob(), before, "a refused state changed the device");
        }
        net.restore(&good).unwrap();
        assert_eq!(net.save(), good);
    }
}
