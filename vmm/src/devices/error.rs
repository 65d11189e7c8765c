//! The errors a device reports to the bus, in a module of their own so that
//! the bus, which returns them, and the devices, which build them, both
//! depend on it and not on each other: `bus` -> `devices::error` <-
//! `devices::*` -> `bus`, one way.

use vm_memory::GuestMemoryError;

use crate::hook::HookError;

/// Size of `virtio_net_hdr` with VIRTIO_F_VERSION_1 (virtio 1.2 §5.1.6);
/// [`virtio_net::HDR_LEN`](crate::devices::virtio_net::HDR_LEN) is this.
pub(crate) const NET_HDR_LEN: usize = 12;

/// A device could not complete an access. Stops the guest.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The input source or output sink failed.
    #[error("device {device} failed")]
    Hook {
        device: &'static str,
        #[source]
        source: HookError,
    },
    /// The guest broke the virtio-net protocol; the device set
    /// DEVICE_NEEDS_RESET.
    #[error("the guest misused its virtio-net device")]
    Net(#[from] NetError),
}

/// A part of a queue, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table.
    Descriptors,
    /// The driver area (available ring).
    Driver,
    /// The device area (used ring).
    Device,
}

impl std::fmt::Display for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ring::Descriptors => "descriptor table",
            Ring::Driver => "available ring",
            Ring::Device => "used ring",
        })
    }
}

/// The guest broke the virtio protocol. The device has set
/// DEVICE_NEEDS_RESET and stopped; the guest is stopped with this error.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// QueueReady with a size that is zero, not a power of two or above QueueNumMax.
    #[error("queue {queue} was made ready with size {size}, not a power of two up to {max}")]
    QueueSize { queue: u16, size: u32, max: u16 },
    /// A ring address breaks the ring's alignment (virtio 1.2 §2.7).
    #[error("queue {queue} {ring} at {addr:#x} is not {align}-byte aligned")]
    RingAlignment { queue: u16, ring: Ring, addr: u64, align: u64 },
    /// A ring does not lie in guest memory.
    #[error("queue {queue} {ring} at {addr:#x}+{len:#x} is outside guest memory")]
    RingOutsideMemory { queue: u16, ring: Ring, addr: u64, len: u64 },
    /// A status write that clears a bit, sets a device-only bit, or sets
    /// DRIVER_OK without FEATURES_OK.
    #[error("the driver wrote status {to:#x} over {from:#x}")]
    BadStatus { from: u32, to: u32 },
    /// A notify for a queue the device does not have.
    #[error("the driver notified queue {queue}, which does not exist")]
    NoSuchQueue { queue: u32 },
    /// A notify before the driver set DRIVER_OK.
    #[error("the driver notified queue {queue} before DRIVER_OK (status {status:#x})")]
    NotifyBeforeDriverOk { queue: u16, status: u32 },
    /// A notify for a queue that is not ready.
    #[error("the driver notified queue {queue}, which is not ready")]
    QueueNotReady { queue: u16 },
    /// The available index ran more than a queue's worth ahead.
    #[error("queue {queue} available index {avail_idx} is more than {size} ahead of the device's {next_avail}")]
    AvailIndex { queue: u16, avail_idx: u16, next_avail: u16, size: u16 },
    /// A head or `next` index beyond the descriptor table.
    #[error("queue {queue} refers to descriptor {index}, past its {size} descriptors")]
    DescriptorIndex { queue: u16, index: u16, size: u16 },
    /// A chain with more descriptors than the table has: it loops.
    #[error("queue {queue} chain from head {head} is longer than {max} descriptors: it loops")]
    ChainTooLong { queue: u16, head: u16, max: u16 },
    /// An indirect descriptor; VIRTIO_F_INDIRECT_DESC is not offered.
    #[error("queue {queue} descriptor {index} is indirect, which was not negotiated")]
    IndirectDescriptor { queue: u16, index: u16 },
    /// A descriptor of length zero.
    #[error("queue {queue} descriptor {index} has length zero")]
    ZeroLength { queue: u16, index: u16 },
    /// A device-writable buffer on the transmit queue or a device-readable
    /// one on the receive queue.
    #[error("queue {queue} descriptor {index} is device-{}, this queue takes only device-{} buffers",
        if *device_writable { "writable" } else { "readable" },
        if *device_writable { "readable" } else { "writable" })]
    Direction { queue: u16, index: u16, device_writable: bool },
    /// A buffer that does not lie in guest memory.
    #[error("queue {queue} descriptor {index} buffer at {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutsideMemory { queue: u16, index: u16, addr: u64, len: u32 },
    /// A transmit chain larger than
    /// [`MAX_CHAIN_BYTES`](crate::devices::virtio_net::MAX_CHAIN_BYTES).
    #[error("queue {queue} chain from head {head} holds more than {max} bytes")]
    ChainTooLarge { queue: u16, head: u16, max: u64 },
    /// A transmit chain shorter than the virtio-net header.
    #[error("queue {queue} chain from head {head} holds {len} bytes, less than the {NET_HDR_LEN}-byte header")]
    HeaderTooShort { queue: u16, head: u16, len: u64 },
    /// Guest memory refused an access the device had checked (a ring or a buffer).
    #[error("queue {queue} access at {addr:#x} failed")]
    Memory {
        queue: u16,
        addr: u64,
        #[source]
        source: GuestMemoryError,
    },
    /// The ring library refused an access.
    #[error("queue {queue} ring access failed")]
    RingAccess {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
}
