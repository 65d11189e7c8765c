//! Networking for guests with a NIC: ftvm's virtio-net (virtio-mmio, version
//! 2, at [`VIRTIO_MMIO_BASE`]) driven by polling, and smoltcp on top.
//!
//! ```ignore
//! let mut net = rt::net::Net::new(boot)?;          // NIC, interface, IP, route
//! let socket = net.sockets.add(/* a smoltcp socket */);
//! loop {
//!     let now_ns = net.poll();                      // clock, receive, timers
//!     // ... read and write the sockets in `net.sockets` ...
//!     net.wait(Some(next_deadline_ns));             // transmit, then sleep
//! }
//! ```
//!
//! # Lockstep
//!
//! The device raises no interrupt and touches the rings only while the VMM
//! handles an exit of this guest: it transmits on a notify of the transmit
//! queue, and fills posted receive buffers after every HLT (and on a notify of
//! the receive queue, which this driver never needs). So every turn of the loop
//! ends in exactly one HLT, armed with the turn's deadline: the VMM sleeps
//! until then or until a frame arrives, delivers what it holds into the posted
//! buffers and resumes the guest. A turn with more work to do arms a deadline
//! in the past, and its HLT returns at once after taking in any frames. The
//! driver never spins on a register or on the rings.
//!
//! # Start-up announcements
//!
//! The first turns send [`BOOT_ANNOUNCEMENTS`] gratuitous ARPs,
//! [`ANNOUNCE_INTERVAL_NS`] apart (the timer wakes the guest for them), so
//! that a guest booted on a host other than the one its address lived on
//! before is found at once: clients' ARP caches and the bridges' forwarding
//! tables learn the new place without waiting for their entries to age out.
//! They are outputs like any other (the output rule holds them on a
//! primary).
//!
//! # Exits per turn
//!
//! Every register access and port access is an exit; reading and writing the
//! rings is plain memory and costs none. One turn of `poll` + `wait` costs:
//!
//! | what                                          | exits              |
//! | --------------------------------------------- | ------------------ |
//! | [`clock_ns`] in [`Net::poll`]                 | 2 (PIO)            |
//! | receiving any number of frames                | 0                  |
//! | re-posting the receive buffers consumed       | 0                  |
//! | transmitting 1..=256 frames (one notify)      | 1 (MMIO), else 0   |
//! | arming the timer, when the deadline moved     | 2 (PIO), else 0    |
//! | HLT                                           | 1                  |
//!
//! so 3 to 6 exits per turn whatever the number of frames it moves: 4 for a
//! busy turn that transmits (clock, notify, HLT), 5 for a timer wake-up with
//! nothing to send, 6 when both happen and the deadline moved. Initialisation
//! costs about 50 exits, once.
//!
//! The timer is armed only when needed: a deadline in the past is left armed
//! while turns keep asking not to sleep, and an armed deadline that is in the
//! future but earlier than the new one is kept (an early wake-up costs one
//! turn; re-arming on every turn would cost 2 exits each).
//!
//! virtio-drivers' `VirtIONet` is not used: it notifies the device once per
//! transmitted frame and once per re-posted receive buffer (2 exits per
//! frame). This driver uses the same crate's transport and [`VirtQueue`] and
//! batches: one notify per turn for every frame transmitted, none for
//! receive buffers.
//!
//! # Memory
//!
//! 256 receive and 256 transmit buffers of [`BUF_LEN`] bytes (768 KiB) and
//! the two rings (about 24 KiB), allocated once from the heap and never freed;
//! a [`UdpStream`] adds its own buffers. Sockets are the guest's own.
//!
//! # Guest CPU
//!
//! On this project's development machines KVM emulates the guest's
//! instructions (about 1.4 million a second, 0.5 to 1 µs per memory access),
//! so an instruction costs about a tenth of an exit and byte loops dominate:
//! buffers here are zeroed and copied 8 bytes per instruction step
//! ([`zeroed_vec`]), and a high-rate UDP flow can bypass smoltcp
//! ([`Net::open_stream`]).

// `rt`'s root does not link `alloc`; this module needs it.
extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;

pub use smoltcp;

use ftvm_abi::{BootParams, MMIO_SLOT_SIZE, VIRTIO_MMIO_BASE};
use smoltcp::iface::{Config, Interface, PollResult, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, HardwareAddress,
    IpCidr, Ipv4Address, Ipv4Cidr, ETHERNET_HEADER_LEN,
};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, MmioVersion, VirtIOHeader};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use crate::{clock_ns, halt, random_u64, set_timer};

/// The receive queue of a virtio-net device (virtio 1.2 §5.1.2).
const RX_QUEUE: u16 = 0;
/// The transmit queue.
const TX_QUEUE: u16 = 1;
/// Descriptors (and buffers) per queue: ftvm's device takes up to 256, and
/// fills at most a queue's worth of receive buffers per exit.
pub const QUEUE_SIZE: usize = 256;
/// `virtio_net_hdr` with VIRTIO_F_VERSION_1 (virtio 1.2 §5.1.6): 12 bytes,
/// all zero on transmit (no offloads), ignored on receive.
const HDR_LEN: usize = 12;
/// Largest Ethernet frame sent or expected, without FCS: 1500-byte MTU.
pub const FRAME_LEN: usize = 1514;
/// Bytes of each buffer: header, frame, and room for a VLAN tag. A received
/// frame that does not fit is dropped by the device.
pub const BUF_LEN: usize = 1536;
/// VIRTIO_F_VERSION_1 (virtio 1.2 §6).
const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_NET_F_MAC: the MAC is in config space (virtio 1.2 §5.1.3).
const F_MAC: u64 = 1 << 5;
/// Longest sleep of one turn: a guest with no deadline of its own still
/// turns its main loop (and reports health) this often when idle, so that an
/// idle guest always halts with a deadline armed and never misses a health
/// deadline of a few tens of milliseconds ([`crate::fault::MAX_IDLE_TURN_NS`]).
pub const MAX_SLEEP_NS: u64 = crate::fault::MAX_IDLE_TURN_NS;
/// A deadline that is always in the past (0 would disarm the timer).
const IMMEDIATE: u64 = 1;
/// Bound on `poll_egress` rounds in one turn (each sends at most one packet
/// per socket); past it the turn ends and the next one carries on.
const MAX_EGRESS_ROUNDS: usize = 4 * QUEUE_SIZE;
/// Gratuitous ARPs sent when the network comes up, so that a client's ARP
/// cache and the bridges between them learn at once where the guest's
/// address now lives (a guest started on another host than before keeps
/// its IP and MAC): the first goes out with the first turn, the others
/// [`ANNOUNCE_INTERVAL_NS`] apart, because one frame sent just after a TAP
/// opens can be lost (QEMU announces five times, a go-live over about half a
/// second).
pub const BOOT_ANNOUNCEMENTS: u8 = 3;
/// Time between two boot announcements.
pub const ANNOUNCE_INTERVAL_NS: u64 = 200_000_000;

/// Why the network could not be brought up.
#[derive(Debug)]
pub enum NetError {
    /// The boot parameters say this guest has no NIC.
    NoNic,
    /// The boot parameters give no IPv4 address.
    NoAddress,
    /// The boot parameters give a prefix longer than 32 bits.
    BadPrefix { prefix: u8 },
    /// The MMIO slot does not hold a usable virtio-mmio device.
    Transport(MmioError),
    /// The slot holds a legacy (version 1) virtio-mmio device.
    LegacyTransport,
    /// The slot holds a virtio device that is not a network card.
    NotANic(DeviceType),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1 { offered: u64 },
    /// The device did not accept the features (FEATURES_OK stayed clear).
    FeaturesRefused { accepted: u64, status: u32 },
    /// The device's MAC differs from the one in the boot parameters.
    MacMismatch { device: [u8; 6], boot: [u8; 6] },
    /// Reading the device's configuration space failed.
    Config(virtio_drivers::Error),
    /// Setting up a virtqueue failed.
    Queue { queue: u16, error: virtio_drivers::Error },
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::NoNic => f.write_str("no NIC: the VMM gave this guest no network device (run it with --tap)"),
            NetError::NoAddress => {
                f.write_str("no IPv4 address: the boot parameters have none (run it with --ip ADDR/PREFIX)")
            }
            NetError::BadPrefix { prefix } => {
                write!(f, "the boot parameters give prefix length {prefix}, more than 32")
            }
            NetError::Transport(MmioError::BadMagic(magic)) => {
                write!(f, "no NIC: no virtio-mmio device at {VIRTIO_MMIO_BASE:#x} (magic {magic:#010x})")
            }
            NetError::Transport(e) => {
                write!(f, "no NIC: the virtio-mmio device at {VIRTIO_MMIO_BASE:#x} is unusable: {e}")
            }
            NetError::LegacyTransport => write!(
                f,
                "no NIC: the virtio-mmio device at {VIRTIO_MMIO_BASE:#x} is legacy (version 1), not virtio 1.x"
            ),
            NetError::NotANic(kind) => {
                write!(f, "no NIC: the virtio device at {VIRTIO_MMIO_BASE:#x} is a {kind:?} device, not a network card")
            }
            NetError::NoVersion1 { offered } => {
                write!(f, "the NIC does not offer VIRTIO_F_VERSION_1 (features {offered:#x})")
            }
            NetError::FeaturesRefused { accepted, status } => {
                write!(f, "the NIC refused features {accepted:#x} (status {status:#x})")
            }
            NetError::MacMismatch { device, boot } => write!(
                f,
                "the NIC's MAC {} differs from the boot parameters' {}",
                EthernetAddress(*device),
                EthernetAddress(*boot)
            ),
            NetError::Config(error) => write!(f, "cannot read the NIC's configuration space: {error}"),
            NetError::Queue { queue, error } => write!(f, "cannot set up virtqueue {queue}: {error}"),
        }
    }
}

/// Counters of the network loop, for benchmarks and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Turns of the loop ([`Net::poll`] calls).
    pub turns: u64,
    /// HLTs executed by [`Net::wait`].
    pub halts: u64,
    /// Timer arms (2 exits each).
    pub timer_arms: u64,
    /// Transmit-queue notifies (1 exit each).
    pub notifies: u64,
    /// Frames handed to the device.
    pub tx_frames: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// Frames dropped on transmit: no buffer, or too long.
    pub tx_dropped: u64,
    /// Gratuitous ARPs sent at start-up ([`BOOT_ANNOUNCEMENTS`]).
    pub announcements: u64,
    /// Used-ring entries that made no sense (a device bug); they stop the
    /// ring they were found on.
    pub ring_errors: u64,
}

/// [`Hal`] for ftvm guests: guest memory is identity-mapped (virtual ==
/// physical) and there is no IOMMU, so DMA memory comes from the global
/// allocator and sharing a buffer is handing over its address.
#[derive(Debug)]
pub struct GuestHal;

// SAFETY: dma_alloc returns zeroed, page-aligned memory from the global
// allocator, which nothing else aliases until dma_dealloc gives it back;
// its physical address is its virtual address (identity map). share returns
// the buffer's own address, which is also its physical address, and unshare
// has nothing to undo or copy.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size (pages >= 1, checked by
        // dma_layout).
        let ptr = unsafe { alloc(layout) };
        match NonNull::new(ptr) {
            // Identity map: the address is the physical address.
            Some(ptr) => {
                // SAFETY: the allocation is layout.size() bytes, writable and
                // the caller's alone.
                unsafe { zero(ptr.as_ptr(), layout.size()) };
                (ptr.as_ptr() as PhysAddr, ptr)
            }
            // virtio-drivers reports a physical address of 0 as DmaError.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back what dma_alloc returned for the same
        // number of pages, so `vaddr` was allocated with this very layout.
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity map. Only the PCI transport calls this; address 0 is RAM,
        // never MMIO.
        NonNull::new(paddr as *mut u8).expect("MMIO region at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

fn dma_layout(pages: usize) -> Option<Layout> {
    let size = pages.checked_mul(PAGE_SIZE).filter(|size| *size > 0)?;
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

/// One packet buffer of [`BUF_LEN`] bytes, allocated once and never freed.
///
/// Held as a raw pointer, not a `Box`: while the device owns the buffer it
/// writes it behind the compiler's back, which a `Box`'s uniqueness would
/// forbid. A `&`/`&mut` slice is made only while the driver owns it (before
/// posting, after the used ring gave it back).
struct Buf(NonNull<u8>);

impl Buf {
    const LAYOUT: Layout = match Layout::from_size_align(BUF_LEN, 64) {
        Ok(layout) => layout,
        Err(_) => panic!("BUF_LEN is not a valid allocation size"),
    };

    fn new() -> Buf {
        // SAFETY: LAYOUT has a non-zero size.
        let ptr = unsafe { alloc(Self::LAYOUT) };
        match NonNull::new(ptr) {
            Some(ptr) => {
                // SAFETY: the allocation is BUF_LEN bytes, writable and ours.
                unsafe { zero(ptr.as_ptr(), BUF_LEN) };
                Buf(ptr)
            }
            None => alloc::alloc::handle_alloc_error(Self::LAYOUT),
        }
    }

    /// The whole buffer.
    ///
    /// # Safety
    ///
    /// The driver owns the buffer (the device is not using it), and no other
    /// slice of it is live.
    unsafe fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the pointer came from an allocation of BUF_LEN bytes that
        // is never freed; the caller guarantees exclusive ownership.
        unsafe { core::slice::from_raw_parts_mut(self.0.as_ptr(), BUF_LEN) }
    }
}

/// Receive side: posted buffers by descriptor (token), and the buffers
/// smoltcp has consumed, waiting to be posted again.
struct RxRing {
    queue: VirtQueue<GuestHal, QUEUE_SIZE>,
    posted: [Option<Buf>; QUEUE_SIZE],
    done: Vec<Buf>,
}

impl RxRing {
    /// Takes the next filled buffer off the used ring: the buffer and the
    /// frame's length (0 for a length that makes no sense). Memory only.
    fn pop(&mut self, stats: &mut NetStats) -> Option<(Buf, usize)> {
        let token = self.queue.peek_used()?;
        let Some(mut buf) = self.posted.get_mut(usize::from(token)).and_then(Option::take) else {
            // A token never posted: the ring cannot be trusted any more.
            stats.ring_errors += 1;
            return None;
        };
        // SAFETY: the device has returned the buffer (it is on the used ring),
        // and it is the one posted with this token.
        let used = unsafe { self.queue.pop_used(token, &[], &mut [buf.bytes()]) };
        match used {
            Ok(len) => {
                let frame = usize::try_from(len)
                    .ok()
                    .and_then(|len| len.checked_sub(HDR_LEN))
                    .filter(|frame| *frame <= BUF_LEN - HDR_LEN)
                    .unwrap_or(0);
                Some((buf, frame))
            }
            Err(_) => {
                stats.ring_errors += 1;
                self.done.push(buf);
                None
            }
        }
    }

    /// Posts the consumed buffers again. Memory only: the device sees them
    /// at the next HLT.
    fn repost(&mut self) {
        while let Some(mut buf) = self.done.pop() {
            // SAFETY: the buffer is the driver's (it came off the used ring
            // and smoltcp is done with it); it stays valid forever and is not
            // touched again until the used ring returns it.
            match unsafe { self.queue.add(&[], &mut [buf.bytes()]) } {
                Ok(token) => match self.posted.get_mut(usize::from(token)) {
                    Some(slot) => *slot = Some(buf),
                    None => {
                        // VirtQueue hands out tokens below QUEUE_SIZE.
                        self.done.push(buf);
                        return;
                    }
                },
                Err(_) => {
                    self.done.push(buf);
                    return;
                }
            }
        }
    }
}

/// Which free list a transmit buffer goes back to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// smoltcp's frames.
    Stack,
    /// The [`UdpStream`]'s prebuilt frames.
    Stream,
}

/// The buffers of the UDP stream: each holds a complete frame whose headers
/// and filler were written once; a datagram only writes its head.
struct StreamBufs {
    free: Vec<Buf>,
    /// Bytes of each chain: virtio header and frame.
    chain_len: usize,
    /// Where the payload starts in a buffer.
    payload_at: usize,
}

/// Transmit side: free buffers, buffers on the ring by token, and the
/// transport (only transmit needs to notify).
struct TxRing {
    transport: MmioTransport<'static>,
    queue: VirtQueue<GuestHal, QUEUE_SIZE>,
    free: Vec<Buf>,
    stream: Option<StreamBufs>,
    /// Buffers on the ring, with the length of the chain given to the device
    /// and the pool they return to.
    inflight: [Option<(Buf, usize, Pool)>; QUEUE_SIZE],
    /// Frames added since the last notify.
    queued: usize,
    stats: NetStats,
}

impl TxRing {
    /// Queues one frame of `len` bytes that `fill` writes. Memory only; the
    /// device sees it at the next [`TxRing::flush`].
    fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let buf = self.free.pop();
        let (Some(mut buf), true) = (buf, len <= FRAME_LEN) else {
            // smoltcp never asks for more than the MTU, and Device::transmit
            // checked for a free buffer: neither happens. Build the frame
            // somewhere and drop it rather than panic.
            self.stats.tx_dropped += 1;
            return fill(&mut vec![0; len]);
        };
        let chain_len = HDR_LEN + len;
        // SAFETY: the buffer is free: not on the ring, no other slice of it.
        let bytes = unsafe { buf.bytes() };
        // Zero header: no checksum offload, no segmentation.
        bytes[..HDR_LEN].fill(0);
        let result = fill(&mut bytes[HDR_LEN..chain_len]);
        self.enqueue(buf, chain_len, Pool::Stack);
        result
    }

    /// Puts a filled buffer on the ring (memory only).
    fn enqueue(&mut self, mut buf: Buf, chain_len: usize, pool: Pool) {
        // SAFETY: the buffer stays valid forever and is not touched again
        // until reap() takes it off the used ring.
        match unsafe { self.queue.add(&[&buf.bytes()[..chain_len]], &mut []) } {
            Ok(token) => match self.inflight.get_mut(usize::from(token)) {
                Some(slot) => {
                    *slot = Some((buf, chain_len, pool));
                    self.queued += 1;
                    self.stats.tx_frames += 1;
                }
                None => {
                    self.stats.ring_errors += 1;
                    self.give_back(buf, pool);
                }
            },
            Err(_) => {
                self.stats.tx_dropped += 1;
                self.give_back(buf, pool);
            }
        }
    }

    fn give_back(&mut self, buf: Buf, pool: Pool) {
        match (pool, self.stream.as_mut()) {
            (Pool::Stream, Some(stream)) => stream.free.push(buf),
            _ => self.free.push(buf),
        }
    }

    /// Hands the queued frames to the device (one notify: 1 exit, and only
    /// when there is something queued) and takes back the buffers it used.
    fn flush(&mut self) {
        if self.queued > 0 {
            // The device sends every available chain while it handles this
            // write, so the used ring is complete when it returns. The notify
            // is written even if the device asked for no notifications (it
            // never does): without it nothing would be sent.
            self.transport.notify(TX_QUEUE);
            self.queued = 0;
            self.stats.notifies += 1;
        }
        self.reap();
    }

    /// Takes used buffers back. Memory only.
    fn reap(&mut self) {
        while let Some(token) = self.queue.peek_used() {
            let Some((mut buf, chain_len, pool)) = self.inflight.get_mut(usize::from(token)).and_then(Option::take)
            else {
                self.stats.ring_errors += 1;
                return;
            };
            // SAFETY: the device has returned the buffer, and it is the one
            // added with this token, with the same chain.
            let popped = unsafe { self.queue.pop_used(token, &[&buf.bytes()[..chain_len]], &mut []) };
            if popped.is_err() {
                self.stats.ring_errors += 1;
            }
            self.give_back(buf, pool);
        }
    }

    /// True when a frame can be queued, flushing a full ring first.
    fn ready(&mut self) -> bool {
        if self.free.is_empty() {
            self.flush();
        }
        !self.free.is_empty()
    }
}

/// Frames addressed to us that answer an ARP request of [`Net::send_arp_request`].
#[derive(Default)]
struct ArpWatch {
    our_ip: Option<Ipv4Address>,
    target: Option<Ipv4Address>,
    seen: bool,
    /// The target's MAC, from its ARP packet.
    mac: Option<EthernetAddress>,
}

impl ArpWatch {
    /// Notes an ARP packet from the watched address to us (a reply, or a
    /// request of its own: either fills smoltcp's neighbor cache).
    fn inspect(&mut self, frame: &[u8]) {
        let Some(target) = self.target else { return };
        if self.seen {
            return;
        }
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        if eth.ethertype() != EthernetProtocol::Arp {
            return;
        }
        let Ok(packet) = ArpPacket::new_checked(eth.payload()) else {
            return;
        };
        if let Ok(ArpRepr::EthernetIpv4 { source_hardware_addr, source_protocol_addr, target_protocol_addr, .. }) =
            ArpRepr::parse(&packet)
        {
            if source_protocol_addr == target
                && Some(target_protocol_addr) == self.our_ip
                && source_hardware_addr.is_unicast()
            {
                self.seen = true;
                self.mac = Some(source_hardware_addr);
            }
        }
    }
}

/// The NIC as a smoltcp [`phy::Device`].
pub struct Nic {
    rx: RxRing,
    tx: TxRing,
    arp: ArpWatch,
}

impl Nic {
    /// Finds, checks and initialises the virtio-net device, and posts every
    /// receive buffer. `mac` is the MAC the boot parameters give.
    fn new(mac: [u8; 6]) -> Result<Nic, NetError> {
        let header = NonNull::new(VIRTIO_MMIO_BASE as *mut VirtIOHeader).expect("VIRTIO_MMIO_BASE is not 0");
        // MMIO_SLOT_SIZE is 4 KiB.
        let size = MMIO_SLOT_SIZE as usize;
        // SAFETY: VIRTIO_MMIO_BASE is the ABI's first virtio-mmio slot, one
        // MMIO_SLOT_SIZE page in the MMIO window above all RAM, identity
        // mapped by the VMM's page tables and 4 KiB aligned; no Rust object
        // lives there, and only this transport accesses it (Net::new is the
        // only caller, and a guest brings its network up once).
        let mut transport = unsafe { MmioTransport::new(header, size) }.map_err(NetError::Transport)?;
        if transport.version() != MmioVersion::Modern {
            return Err(NetError::LegacyTransport);
        }
        if transport.device_type() != DeviceType::Network {
            return Err(NetError::NotANic(transport.device_type()));
        }

        // virtio 1.2 §3.1.1, with the FEATURES_OK check that
        // Transport::begin_init leaves out.
        transport.set_status(DeviceStatus::empty());
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = transport.read_device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(NetError::NoVersion1 { offered });
        }
        let accepted = offered & (F_VERSION_1 | F_MAC);
        transport.write_driver_features(accepted);
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        let status = transport.get_status();
        if !status.contains(DeviceStatus::FEATURES_OK) {
            return Err(NetError::FeaturesRefused { accepted, status: status.bits() });
        }
        if accepted & F_MAC != 0 {
            // Byte by byte: config space takes 1-, 2-, 4- and 8-byte reads,
            // and a 6-byte volatile read could become anything.
            let mut device = [0u8; 6];
            for (offset, byte) in device.iter_mut().enumerate() {
                *byte = transport.read_config_space::<u8>(offset).map_err(NetError::Config)?;
            }
            if device != mac {
                return Err(NetError::MacMismatch { device, boot: mac });
            }
        }

        let queue = |transport: &mut MmioTransport<'static>, index: u16| {
            // No indirect descriptors, no event index: not offered.
            VirtQueue::<GuestHal, QUEUE_SIZE>::new(transport, index, false, false)
                .map_err(|error| NetError::Queue { queue: index, error })
        };
        let rx_queue = queue(&mut transport, RX_QUEUE)?;
        let tx_queue = queue(&mut transport, TX_QUEUE)?;
        transport.finish_init();

        let mut rx = RxRing {
            queue: rx_queue,
            posted: [const { None }; QUEUE_SIZE],
            done: (0..QUEUE_SIZE).map(|_| Buf::new()).collect(),
        };
        // Posted without a notify: the device takes them in at the first HLT.
        rx.repost();
        let tx = TxRing {
            transport,
            queue: tx_queue,
            free: (0..QUEUE_SIZE).map(|_| Buf::new()).collect(),
            stream: None,
            inflight: [const { None }; QUEUE_SIZE],
            queued: 0,
            stats: NetStats::default(),
        };
        Ok(Nic { rx, tx, arp: ArpWatch::default() })
    }
}

/// A received frame (smoltcp's receive token). Its buffer goes back to the
/// receive ring when the token is dropped, consumed or not.
pub struct RxToken<'a> {
    buf: Option<Buf>,
    len: usize,
    done: &'a mut Vec<Buf>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(mut self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        match self.buf.as_mut() {
            Some(buf) => {
                // SAFETY: the buffer came off the used ring: the driver owns it
                // until Drop hands it back to be posted.
                let bytes = unsafe { buf.bytes() };
                f(&bytes[HDR_LEN..HDR_LEN + self.len])
            }
            None => f(&[]),
        }
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.done.push(buf);
        }
    }
}

/// A frame to transmit (smoltcp's transmit token).
pub struct TxToken<'a> {
    tx: &'a mut TxRing,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        self.tx.send(len, f)
    }
}

impl phy::Device for Nic {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        // Room for a reply first, or the frame would wait for the next turn.
        if !self.tx.ready() {
            return None;
        }
        let (mut buf, len) = self.rx.pop(&mut self.tx.stats)?;
        self.tx.stats.rx_frames += 1;
        // SAFETY: the buffer came off the used ring; no other slice of it.
        let bytes = unsafe { buf.bytes() };
        self.arp.inspect(&bytes[HDR_LEN..HDR_LEN + len]);
        Some((RxToken { buf: Some(buf), len, done: &mut self.rx.done }, TxToken { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        self.tx.ready().then_some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = FRAME_LEN;
        caps
    }
}

/// The guest's network: NIC, smoltcp interface and sockets, and the loop's
/// clock and timer. See the module documentation for the loop.
pub struct Net {
    /// The smoltcp interface (addresses, routes, neighbor cache).
    pub iface: Interface,
    /// The guest's sockets.
    pub sockets: SocketSet<'static>,
    nic: Nic,
    mac: EthernetAddress,
    cidr: Ipv4Cidr,
    gateway: Option<Ipv4Address>,
    /// The clock reading of this turn.
    now_ns: u64,
    /// The deadline last written to the timer (0: none written yet).
    armed_ns: u64,
    /// The last [`Net::send`] left packets for the next turn.
    egress_more: bool,
    turns: u64,
    halts: u64,
    timer_arms: u64,
    /// Boot announcements still to send, and when the next one is due.
    announce_left: u8,
    next_announce_ns: u64,
    announcements: u64,
}

impl Net {
    /// [`Net::new`] for guest `name`, saying on serial what happened:
    /// `NAME: network up: ...`, or `NAME: cannot start: ...` and `None`.
    pub fn start(boot: &BootParams, name: &str) -> Option<Net> {
        match Net::new(boot) {
            Ok(net) => {
                crate::println!("{name}: network up: {net}");
                Some(net)
            }
            Err(e) => {
                crate::println!("{name}: cannot start: {e}");
                None
            }
        }
    }

    /// Brings the network up as the boot parameters describe it: the NIC at
    /// [`VIRTIO_MMIO_BASE`] (magic, version 2 and device type checked), the
    /// interface with the MAC, the IPv4 address and prefix, and the default
    /// route through the gateway if there is one. smoltcp's random seed
    /// comes from the entropy device.
    pub fn new(boot: &BootParams) -> Result<Net, NetError> {
        // Without a NIC the slot is unmapped: do not touch it at all.
        if boot.has_net == 0 {
            return Err(NetError::NoNic);
        }
        if boot.ip == [0; 4] {
            return Err(NetError::NoAddress);
        }
        if boot.ip_prefix > 32 {
            return Err(NetError::BadPrefix { prefix: boot.ip_prefix });
        }
        let mut nic = Nic::new(boot.mac)?;
        let ip = Ipv4Address::from(boot.ip);
        let cidr = Ipv4Cidr::new(ip, boot.ip_prefix);
        nic.arp.our_ip = Some(ip);
        let mac = EthernetAddress(boot.mac);

        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        // Ephemeral ports and TCP initial sequence numbers: an input, logged
        // like every other.
        config.random_seed = random_u64();
        let now_ns = clock_ns();
        let mut iface = Interface::new(config, &mut nic, instant(now_ns));
        iface.update_ip_addrs(|addrs| {
            // One address into an empty list of IFACE_MAX_ADDR_COUNT (2).
            let _ = addrs.push(IpCidr::Ipv4(cidr));
        });
        let gateway = (boot.gateway != [0; 4]).then(|| Ipv4Address::from(boot.gateway));
        if let Some(gateway) = gateway {
            // The first route of an empty table: cannot be full.
            let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        }
        Ok(Net {
            iface,
            sockets: SocketSet::new(Vec::new()),
            nic,
            mac,
            cidr,
            gateway,
            now_ns,
            armed_ns: 0,
            egress_more: false,
            turns: 0,
            halts: 0,
            timer_arms: 0,
            announce_left: BOOT_ANNOUNCEMENTS,
            // Due at the first turn's end.
            next_announce_ns: now_ns,
            announcements: 0,
        })
    }

    /// The guest's IPv4 address.
    pub fn ip(&self) -> Ipv4Address {
        self.cidr.address()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> EthernetAddress {
        self.mac
    }

    /// The default gateway, if the boot parameters give one.
    pub fn gateway(&self) -> Option<Ipv4Address> {
        self.gateway
    }

    /// The clock reading of the current turn (taken by [`Net::poll`]).
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// The current turn's time as smoltcp's [`Instant`].
    pub fn instant(&self) -> Instant {
        instant(self.now_ns)
    }

    /// Counters since the network came up.
    pub fn stats(&self) -> NetStats {
        NetStats {
            turns: self.turns,
            halts: self.halts,
            timer_arms: self.timer_arms,
            announcements: self.announcements,
            ..self.nic.tx.stats
        }
    }

    /// Starts a turn: reads the clock (2 exits, the turn's only clock read:
    /// use the value returned), then lets smoltcp take in every frame
    /// received (answering ARP and ping by itself), run its timers and
    /// transmit what is due. Returns the clock reading.
    pub fn poll(&mut self) -> u64 {
        self.turns += 1;
        self.now_ns = clock_ns();
        let now = self.instant();
        self.iface.poll(now, &mut self.nic, &mut self.sockets);
        self.now_ns
    }

    /// Ends a turn: transmits what the sockets hold (one notify for all of
    /// it), re-posts the receive buffers, then sleeps with one HLT until the
    /// earliest of `wake_at_ns` (guest clock; at or before now: do not
    /// sleep), smoltcp's next timer and [`MAX_SLEEP_NS`] from now, or until
    /// a frame arrives. Arms the timer only when needed. The same as
    /// [`Net::send`] then [`Net::sleep`], for a guest with nothing to do in
    /// between.
    ///
    /// While a `Net` is in use the guest must not arm the timer itself
    /// (`rt::set_timer`, `rt::sleep_until`): this remembers what it armed.
    pub fn wait(&mut self, wake_at_ns: Option<u64>) {
        self.send();
        self.sleep(wake_at_ns);
    }

    /// The first half of [`Net::wait`]: transmits what the sockets hold
    /// (one notify for all of it) and re-posts the receive buffers. A guest
    /// that reports health does it after this, so that the healthy point
    /// follows the turn's outputs.
    pub fn send(&mut self) {
        let now = self.instant();
        let mut rounds = 0;
        self.egress_more = false;
        // Each round sends at most one packet per socket.
        while self.iface.poll_egress(now, &mut self.nic, &mut self.sockets) == PollResult::SocketStateChanged {
            rounds += 1;
            if rounds >= MAX_EGRESS_ROUNDS {
                self.egress_more = true;
                break;
            }
        }
        self.announce_if_due();
        self.nic.tx.flush();
        self.nic.rx.repost();
    }

    /// The second half of [`Net::wait`]: one HLT with a deadline armed,
    /// never later than [`MAX_SLEEP_NS`] from the turn's clock reading.
    pub fn sleep(&mut self, wake_at_ns: Option<u64>) {
        let now = self.instant();
        let mut deadline = self.now_ns.saturating_add(MAX_SLEEP_NS);
        if self.announce_left > 0 {
            deadline = deadline.min(self.next_announce_ns);
        }
        if let Some(delay) = self.iface.poll_delay(now, &self.sockets) {
            let delay_ns = delay.total_micros().saturating_mul(1000);
            deadline = deadline.min(self.now_ns.saturating_add(delay_ns));
        }
        if let Some(wake_at) = wake_at_ns {
            deadline = deadline.min(wake_at);
        }
        if self.egress_more {
            deadline = IMMEDIATE;
        }
        self.halt_until(deadline);
    }

    /// Queues the next boot announcement if it is due: a gratuitous ARP
    /// request (RFC 5227 §3: sender and target protocol address both the
    /// guest's), broadcast, as the go-live announces. Memory only. Decided
    /// from the turn's clock reading alone, so primary and secondary send the
    /// same frames at the same exits.
    fn announce_if_due(&mut self) {
        if self.announce_left == 0 || self.now_ns < self.next_announce_ns || !self.nic.tx.ready() {
            return;
        }
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: self.mac,
            source_protocol_addr: self.ip(),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: self.ip(),
        };
        let eth =
            EthernetRepr { src_addr: self.mac, dst_addr: EthernetAddress::BROADCAST, ethertype: EthernetProtocol::Arp };
        self.nic.tx.send(ETHERNET_HEADER_LEN + repr.buffer_len(), |bytes| {
            let mut frame = EthernetFrame::new_unchecked(bytes);
            eth.emit(&mut frame);
            repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
        self.announce_left -= 1;
        self.announcements += 1;
        self.next_announce_ns = self.now_ns.saturating_add(ANNOUNCE_INTERVAL_NS);
    }

    /// One HLT that returns by `deadline` (at once if it is not after the
    /// turn's clock reading), arming the timer only if the armed deadline
    /// would not do.
    fn halt_until(&mut self, deadline: u64) {
        let now = self.now_ns;
        let armed = self.armed_ns;
        let arm = if deadline <= now {
            // Any past deadline makes the HLT return at once; 0 would disarm.
            (armed == 0 || armed > now).then_some(IMMEDIATE)
        } else {
            // A past one would not let the guest sleep, a later one would
            // oversleep; an earlier future one only wakes it early.
            (armed <= now || armed > deadline).then_some(deadline)
        };
        if let Some(deadline) = arm {
            set_timer(deadline);
            self.armed_ns = deadline;
            self.timer_arms += 1;
        }
        self.halts += 1;
        halt();
    }

    /// The address whose MAC frames to `dest` go to: `dest` itself when it
    /// is on the guest's subnet, else the gateway (`None` without one).
    pub fn next_hop(&self, dest: Ipv4Address) -> Option<Ipv4Address> {
        if self.cidr.contains_addr(&dest) {
            Some(dest)
        } else {
            self.gateway
        }
    }

    /// Queues an ARP request for `target` (sent at the end of the turn) and
    /// watches for its answer: [`Net::arp_seen`] becomes true once an ARP
    /// packet from `target` to the guest arrives, which also puts `target`
    /// in smoltcp's neighbor cache. Repeating it for the same target keeps
    /// what was seen.
    pub fn send_arp_request(&mut self, target: Ipv4Address) {
        if self.nic.arp.target != Some(target) {
            self.nic.arp.target = Some(target);
            self.nic.arp.seen = false;
            self.nic.arp.mac = None;
        }
        if !self.nic.tx.ready() {
            return;
        }
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: self.mac,
            source_protocol_addr: self.ip(),
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target,
        };
        let eth =
            EthernetRepr { src_addr: self.mac, dst_addr: EthernetAddress::BROADCAST, ethertype: EthernetProtocol::Arp };
        self.nic.tx.send(ETHERNET_HEADER_LEN + repr.buffer_len(), |bytes| {
            let mut frame = EthernetFrame::new_unchecked(bytes);
            eth.emit(&mut frame);
            repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        });
    }

    /// True once the target of the last [`Net::send_arp_request`] answered.
    pub fn arp_seen(&self) -> bool {
        self.nic.arp.seen
    }

    /// The MAC of the target of the last [`Net::send_arp_request`], once it
    /// answered.
    pub fn arp_mac(&self) -> Option<EthernetAddress> {
        self.nic.arp.mac
    }

    /// Sets up the guest's [`UdpStream`]: `buffers` transmit buffers (1 to
    /// [`QUEUE_SIZE`]), each holding a complete Ethernet + IPv4 + UDP frame
    /// from `stream.src_port` to `stream.dest_ip:dest_port`, sent to
    /// `next_hop_mac`, with `stream.payload_len` bytes of payload whose byte
    /// `i` is `filler(i)`. Written once here (copied 8 bytes at a time): a
    /// datagram then only writes its head ([`Net::send_stream`]) and never
    /// goes through smoltcp. One stream per guest: a second call replaces
    /// the first.
    pub fn open_stream(
        &mut self,
        stream: &UdpStream,
        next_hop_mac: EthernetAddress,
        buffers: usize,
        filler: impl Fn(usize) -> u8,
    ) -> Result<(), StreamError> {
        let frame_len = UDP_FRAME_OVERHEAD
            .checked_add(stream.payload_len)
            .filter(|len| *len <= FRAME_LEN)
            .ok_or(StreamError::TooLong { payload_len: stream.payload_len })?;
        let chain_len = HDR_LEN + frame_len;
        let payload_at = HDR_LEN + UDP_FRAME_OVERHEAD;
        let mut template = Buf::new();
        {
            // SAFETY: the buffer was just allocated: ours alone.
            let bytes = unsafe { template.bytes() };
            let (headers, payload) = bytes[HDR_LEN..chain_len].split_at_mut(UDP_FRAME_OVERHEAD);
            write_udp_headers(headers, self.mac, next_hop_mac, self.ip(), stream);
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte = filler(i);
            }
        }
        let count = buffers.clamp(1, QUEUE_SIZE);
        let mut free = Vec::with_capacity(count);
        for _ in 1..count {
            let buf = Buf::new();
            // SAFETY: two distinct allocations of BUF_LEN bytes, and
            // chain_len <= BUF_LEN (frame_len <= FRAME_LEN).
            unsafe { copy(buf.0.as_ptr(), template.0.as_ptr(), chain_len) };
            free.push(buf);
        }
        free.push(template);
        self.nic.tx.stream = Some(StreamBufs { free, chain_len, payload_at });
        Ok(())
    }

    /// Queues one datagram of the stream opened by [`Net::open_stream`]:
    /// `head` replaces the start of its payload, the rest is the filler.
    /// Memory only: the notify at the end of the turn sends it. Returns
    /// false, queueing nothing, when no stream is open, `head` is longer
    /// than the payload, or every stream buffer is still on the ring after
    /// a flush (the device takes no frames).
    pub fn send_stream(&mut self, head: &[u8]) -> bool {
        let tx = &mut self.nic.tx;
        if tx.stream.as_ref().is_some_and(|s| s.free.is_empty()) {
            tx.flush();
        }
        let Some(stream) = tx.stream.as_mut() else {
            return false;
        };
        let (chain_len, payload_at) = (stream.chain_len, stream.payload_at);
        if payload_at + head.len() > chain_len {
            return false;
        }
        let Some(mut buf) = stream.free.pop() else {
            return false;
        };
        // SAFETY: the buffer came off the stream's free list: not on the
        // ring, no other slice of it.
        let bytes = unsafe { buf.bytes() };
        bytes[payload_at..payload_at + head.len()].copy_from_slice(head);
        tx.enqueue(buf, chain_len, Pool::Stream);
        true
    }
}

impl fmt::Display for Net {
    /// `MAC 52:54:00:12:34:56, IP 10.0.0.2/24, gateway 10.0.0.1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mac.0;
        write!(
            f,
            "MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, IP {}",
            m[0], m[1], m[2], m[3], m[4], m[5], self.cidr
        )?;
        match self.gateway {
            Some(gateway) => write!(f, ", gateway {gateway}"),
            None => f.write_str(", no gateway"),
        }
    }
}

/// smoltcp's time for a guest-clock reading (microseconds).
fn instant(now_ns: u64) -> Instant {
    Instant::from_micros(i64::try_from(now_ns / 1000).unwrap_or(i64::MAX))
}

/// Parses `a.b.c.d:port`.
pub fn parse_endpoint(text: &str) -> Option<(Ipv4Address, u16)> {
    let (ip, port) = text.split_once(':')?;
    Some((ip.parse().ok()?, port.parse().ok()?))
}

/// Ethernet (14) + IPv4 (20) + UDP (8) header bytes of a stream frame.
const UDP_FRAME_OVERHEAD: usize = 14 + 20 + 8;

/// A fixed-size UDP flow sent around smoltcp ([`Net::open_stream`]), for
/// datagram rates that smoltcp's per-packet copies and checksums could not
/// sustain where every guest instruction is emulated. Its datagrams carry
/// IPv4 identification 0 with Don't Fragment (RFC 6864: an atomic datagram
/// needs no unique id) and UDP checksum 0 ("none", RFC 768, allowed over
/// IPv4), so every datagram has the same headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpStream {
    /// UDP source port.
    pub src_port: u16,
    /// Destination address.
    pub dest_ip: Ipv4Address,
    /// Destination port.
    pub dest_port: u16,
    /// Bytes of each datagram's payload.
    pub payload_len: usize,
}

/// Why [`Net::open_stream`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The frame would be longer than [`FRAME_LEN`].
    TooLong { payload_len: usize },
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::TooLong { payload_len } => {
                write!(f, "a {payload_len}-byte UDP payload does not fit a {FRAME_LEN}-byte frame")
            }
        }
    }
}

/// Writes the Ethernet, IPv4 and UDP headers of a stream frame into
/// `headers` ([`UDP_FRAME_OVERHEAD`] bytes).
fn write_udp_headers(
    headers: &mut [u8],
    src_mac: EthernetAddress,
    dest_mac: EthernetAddress,
    src_ip: Ipv4Address,
    stream: &UdpStream,
) {
    let (eth, rest) = headers.split_at_mut(14);
    let (ip, udp) = rest.split_at_mut(20);
    eth[..6].copy_from_slice(&dest_mac.0);
    eth[6..12].copy_from_slice(&src_mac.0);
    eth[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    // Both fit in u16: payload_len <= FRAME_LEN - UDP_FRAME_OVERHEAD.
    let udp_len = (8 + stream.payload_len) as u16;
    let ip_len = 20 + udp_len;
    // Version 4, 20-byte header; DF; TTL 64; protocol UDP.
    ip.copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[12..16].copy_from_slice(&src_ip.octets());
    ip[16..20].copy_from_slice(&stream.dest_ip.octets());
    let sum = ip.chunks_exact(2).fold(0u32, |sum, word| {
        let sum = sum + u32::from(u16::from_be_bytes([word[0], word[1]]));
        (sum & 0xffff) + (sum >> 16)
    });
    // The folded sum fits in 16 bits.
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    udp[0..2].copy_from_slice(&stream.src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&stream.dest_port.to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
}

/// `len` zero bytes on the heap, for socket buffers.
///
/// `vec![0; len]` zeroes a byte at a time (the guests' `memset`); this zeroes
/// 8 bytes per step with `rep stosq`, which matters where every guest
/// instruction is emulated: 9 MiB of kvstore socket buffers take a few
/// seconds less to boot.
pub fn zeroed_vec(len: usize) -> Vec<u8> {
    let mut bytes = Vec::<u8>::with_capacity(len);
    // SAFETY: the vector's allocation holds at least `len` writable bytes,
    // and once `zero` wrote all of them they are initialised.
    unsafe {
        zero(bytes.as_mut_ptr(), len);
        bytes.set_len(len);
    }
    bytes
}

/// Zeroes `len` bytes at `dest`, 8 at a time.
///
/// # Safety
///
/// `dest` is valid for writes of `len` bytes.
unsafe fn zero(dest: *mut u8, len: usize) {
    let words = len / 8;
    let tail = len % 8;
    // SAFETY: the caller guarantees [dest, dest + len) is writable; rep stosq
    // writes words * 8 bytes from dest upwards (the direction flag is clear,
    // as the ABI guarantees), then rep stosb the remaining tail bytes.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            "mov rcx, {tail}",
            "rep stosb",
            tail = in(reg) tail,
            inout("rdi") dest => _,
            inout("rcx") words => _,
            in("rax") 0u64,
            options(nostack, preserves_flags)
        );
    }
}

/// Copies `len` bytes from `src` to `dest`, 8 at a time.
///
/// # Safety
///
/// `src` is valid for reads and `dest` for writes of `len` bytes, and the two
/// ranges do not overlap.
unsafe fn copy(dest: *mut u8, src: *const u8, len: usize) {
    let words = len / 8;
    let tail = len % 8;
    // SAFETY: the caller guarantees both ranges are valid and disjoint; rep
    // movsq copies words * 8 bytes upwards (direction flag clear), rep movsb
    // the tail.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) tail,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            inout("rcx") words => _,
            options(nostack, preserves_flags)
        );
    }
}
