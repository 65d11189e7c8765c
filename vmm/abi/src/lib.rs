//! The guest ABI of ftvm: every port, guest address and boot-parameter field
//! that the VMM and the guests' runtime agree on, in one place.
//!
//! `no_std` and dependency-free so the freestanding guests use the very same
//! constants as the VMM. A change here changes the ABI: bump
//! [`BOOT_PARAMS_VERSION`] when the boot-parameter block changes layout.
//!
//! # Privilege: guests run at CPL 3
//!
//! The VMM starts a guest in 64-bit mode at CPL 3 (user mode, IOPL 0) unless
//! it is started in kernel mode (CPL 0: only the PIO benchmark guest). At
//! CPL 3 `in`/`out` and `hlt` fault, so a guest reaches the ports through
//! the [`PIO_WINDOW_BASE`] MMIO window (an access of N bytes at
//! `PIO_WINDOW_BASE + port` is delivered as an N-byte access to `port`) and
//! halts by writing [`HALT_PORT`]. Why: on software-assisted KVM backends
//! (kvm_pvm, measured) supervisor-mode guest code is emulated instruction by
//! instruction (about 1 µs each) while user-mode code runs natively; both
//! kinds of exit are points the guest chose, so lockstep is unaffected. A
//! guest reads its CPL from CS to know which way to go.
//!
//! # Lockstep rules the ports follow
//!
//! Every input a guest can observe enters at a guest exit: time and
//! randomness at a PIO access to one of the ports below, received frames at
//! a notify of the virtio-net receive queue (an MMIO write to the device at
//! [`VIRTIO_MMIO_BASE`]) or right after a halt (HLT, or a write of
//! [`HALT_PORT`]). Nothing raises an interrupt.
//! A guest sleeps by writing a wake-up deadline to the timer and executing
//! HLT.
#![no_std]

// ---------------------------------------------------------------------------
// Memory map (guest-physical addresses). The VMM sets up long mode with these
// tables before the first instruction; the guest never relocates them.
// ---------------------------------------------------------------------------

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// The boot-parameter block ([`BootParams`]), one page. `rdi` points here at entry.
pub const BOOT_PARAMS_ADDR: u64 = 0x1000;
/// The GDT (null, code64, data, TSS descriptors).
pub const GDT_ADDR: u64 = 0x2000;
/// A zeroed 104-byte TSS that TR points at (VM entry wants a usable TR).
pub const TSS_ADDR: u64 = 0x2800;
/// PML4 (one page).
pub const PML4_ADDR: u64 = 0x3000;
/// PDPT (one page).
pub const PDPT_ADDR: u64 = 0x4000;
/// Four page directories of 2 MiB pages: an identity map of the low 4 GiB,
/// which covers guest RAM and the MMIO window.
pub const PD_ADDR: u64 = 0x5000;
/// Number of page directories at [`PD_ADDR`].
pub const PD_COUNT: u64 = 4;
/// Lowest address of the initial stack (grows down from [`STACK_TOP`]).
pub const STACK_BOTTOM: u64 = 0x1_0000;
/// Initial `rsp`, 16-byte aligned: about 576 KiB of stack below 1 MiB.
pub const STACK_TOP: u64 = 0x9_f000;
/// Guests are linked to load here (1 MiB); their heap runs from the end of the
/// image to the end of RAM.
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// Start of the MMIO window: nothing here is RAM.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each MMIO device slot in the window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// MMIO slot of the test device ([`TESTDEV_MMIO_ADDR`]).
pub const TESTDEV_MMIO_ADDR: u64 = MMIO_BASE;
/// First MMIO slot for virtio-mmio devices (one slot each).
pub const VIRTIO_MMIO_BASE: u64 = MMIO_BASE + MMIO_SLOT_SIZE;
/// The port window: an access at `PIO_WINDOW_BASE + port` is delivered to
/// the PIO bus at `port`: the whole 64 Ki port space.
pub const PIO_WINDOW_BASE: u64 = MMIO_BASE + 0x10_0000;
/// Bytes of the window: one per port.
pub const PIO_WINDOW_SIZE: u64 = 0x1_0000;
/// RAM ends below this address (3 GiB): the MMIO window must stay free.
pub const RAM_LIMIT: u64 = 0xc000_0000;
/// Smallest guest memory the VMM accepts, in MiB.
pub const MIN_MEMORY_MIB: u64 = 4;
/// Largest guest memory the VMM accepts, in MiB ([`RAM_LIMIT`]).
pub const MAX_MEMORY_MIB: u64 = RAM_LIMIT >> 20;

// ---------------------------------------------------------------------------
// Ports.
// ---------------------------------------------------------------------------

/// COM1, a 16550 UART (8 ports). Output only in lockstep guests.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_LEN: u16 = 8;

/// pvpanic, as QEMU and Linux define it: a read returns the supported event
/// bits; a write of [`PVPANIC_PANICKED`] reports a guest panic.
/// (QEMU docs/specs/pvpanic.rst, Linux drivers/misc/pvpanic.)
pub const PVPANIC_PORT: u16 = 0x505;
/// pvpanic event: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// pvpanic event: a crash kernel was loaded (accepted, reported as a panic too).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// First port of ftvm's paravirtual block. All registers are 32 bits wide
/// (`in eax, dx` / `out dx, eax`) unless said otherwise.
pub const PV_BASE: u16 = 0x510;
/// Clock, low half. A 32-bit read takes a fresh reading of the guest's
/// monotonic clock (nanoseconds since the guest booted: an input), latches
/// it and returns its low 32 bits.
pub const CLOCK_LO_PORT: u16 = PV_BASE;
/// Clock, high half: the high 32 bits of the reading latched by the last
/// read of [`CLOCK_LO_PORT`]. Takes no new input.
pub const CLOCK_HI_PORT: u16 = PV_BASE + 4;
/// Entropy: a read of 1, 2 or 4 bytes returns that many random bytes (an input).
pub const ENTROPY_PORT: u16 = PV_BASE + 8;
/// Timer, low half of the wake-up deadline (guest-clock nanoseconds). Staged
/// until [`TIMER_HI_PORT`] is written.
pub const TIMER_LO_PORT: u16 = PV_BASE + 0xc;
/// Timer, high half: writing it arms the deadline (low half from the last
/// write to [`TIMER_LO_PORT`]). A deadline of 0 disarms: HLT then sleeps
/// until an event. Reading returns 1 if the deadline has been armed.
pub const TIMER_HI_PORT: u16 = PV_BASE + 0x10;
/// Health: a write (any 32-bit value, e.g. a counter) says the application is
/// healthy. Takes no input.
pub const HEALTH_PORT: u16 = PV_BASE + 0x14;
/// Power: a 32-bit write powers the guest off with that status (0 = success).
pub const POWER_PORT: u16 = PV_BASE + 0x18;
/// Test device port: writes are counted and discarded, reads return 0. Used
/// by benchmarks and test guests; never carries an input.
pub const TESTDEV_PORT: u16 = PV_BASE + 0x1c;
/// Halt: a 32-bit write halts the guest exactly as HLT does (the VMM
/// sleeps until the armed deadline or an event). For guests at CPL 3, where
/// HLT faults.
pub const HALT_PORT: u16 = PV_BASE + 0x20;
/// One past the last port of the paravirtual block.
pub const PV_END: u16 = PV_BASE + 0x24;

// ---------------------------------------------------------------------------
// Boot-parameter block.
// ---------------------------------------------------------------------------

/// "FTVMBOOT", little-endian.
pub const BOOT_PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"FTVMBOOT");
/// Layout version of [`BootParams`].
pub const BOOT_PARAMS_VERSION: u32 = 1;
/// Bytes reserved for `--param KEY=VALUE` pairs: `KEY=VALUE\0KEY=VALUE\0...`.
pub const PARAMS_LEN: usize = 3072;

/// The boot-parameter block at [`BOOT_PARAMS_ADDR`], written by the VMM before
/// the first instruction. `repr(C)`, little-endian, no padding surprises:
/// every field is naturally aligned.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BootParams {
    /// [`BOOT_PARAMS_MAGIC`].
    pub magic: u64,
    /// [`BOOT_PARAMS_VERSION`].
    pub version: u32,
    /// Size of this struct in bytes, for forward compatibility.
    pub size: u32,
    /// Guest RAM in bytes, starting at address 0.
    pub mem_size: u64,
    /// The guest's MAC address; all zero when the guest has no NIC.
    pub mac: [u8; 6],
    /// Non-zero when the guest has a NIC at [`VIRTIO_MMIO_BASE`].
    pub has_net: u8,
    /// IPv4 prefix length of `ip`.
    pub ip_prefix: u8,
    /// The guest's IPv4 address (network order bytes).
    pub ip: [u8; 4],
    /// Default gateway (network order bytes); all zero for none.
    pub gateway: [u8; 4],
    /// Bytes of `params` in use.
    pub params_len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// `--param` values: `KEY=VALUE` strings, each followed by a NUL.
    pub params: [u8; PARAMS_LEN],
}

impl BootParams {
    /// An empty block for a guest of `mem_size` bytes.
    pub const fn new(mem_size: u64) -> Self {
        BootParams {
            magic: BOOT_PARAMS_MAGIC,
            version: BOOT_PARAMS_VERSION,
            // The struct is a few KiB: the cast cannot truncate.
            size: core::mem::size_of::<BootParams>() as u32,
            mem_size,
            mac: [0; 6],
            has_net: 0,
            ip_prefix: 0,
            ip: [0; 4],
            gateway: [0; 4],
            params_len: 0,
            reserved: 0,
            params: [0; PARAMS_LEN],
        }
    }

    /// True when magic, version and size are what this build expects.
    pub fn is_valid(&self) -> bool {
        self.magic == BOOT_PARAMS_MAGIC
            && self.version == BOOT_PARAMS_VERSION
            && self.size as usize == core::mem::size_of::<BootParams>()
            && self.params_len as usize <= PARAMS_LEN
    }

    /// The value of `--param key=...`, if given.
    pub fn param(&self, key: &str) -> Option<&str> {
        let used = self.params.get(..self.params_len as usize)?;
        for entry in used.split(|b| *b == 0) {
            let Ok(text) = core::str::from_utf8(entry) else {
                continue;
            };
            if let Some((k, v)) = text.split_once('=') {
                if k == key {
                    return Some(v);
                }
            }
        }
        None
    }

    /// The block as bytes, as the VMM writes it into guest memory.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: BootParams is repr(C), Copy, made only of integers and byte
        // arrays whose sizes add up with no padding (checked by the
        // `no_padding` test), so every byte of it is initialised; the slice
        // borrows `self` and has exactly its size.
        unsafe {
            core::slice::from_raw_parts((self as *const BootParams).cast::<u8>(), core::mem::size_of::<BootParams>())
        }
    }
}

// The memory map does not overlap itself: checked at compile time.
const _: () = {
    assert!(BOOT_PARAMS_ADDR + PAGE_SIZE <= GDT_ADDR);
    assert!(TSS_ADDR + 104 <= PML4_ADDR);
    assert!(PD_ADDR + PD_COUNT * PAGE_SIZE <= STACK_BOTTOM);
    assert!(STACK_TOP <= KERNEL_LOAD_ADDR);
    assert!(RAM_LIMIT <= MMIO_BASE);
    assert!(PV_END as u64 <= PIO_WINDOW_SIZE);
    assert!(VIRTIO_MMIO_BASE + 8 * MMIO_SLOT_SIZE <= PIO_WINDOW_BASE);
    assert!(MIN_MEMORY_MIB << 20 > KERNEL_LOAD_ADDR);
    assert!(core::mem::size_of::<BootParams>() as u64 <= PAGE_SIZE);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_padding() {
        let fields = 8 + 4 + 4 + 8 + 6 + 1 + 1 + 4 + 4 + 4 + 4 + PARAMS_LEN;
        assert_eq!(core::mem::size_of::<BootParams>(), fields);
        assert!(core::mem::size_of::<BootParams>() as u64 <= PAGE_SIZE);
    }

    #[test]
    fn params_lookup() {
        let mut bp = BootParams::new(1 << 20);
        let text = b"dest=10.0.0.1:5000\0rate=100\0";
        bp.params[..text.len()].copy_from_slice(text);
        bp.params_len = text.len() as u32;
        assert!(bp.is_valid());
        assert_eq!(bp.param("rate"), Some("100"));
        assert_eq!(bp.param("dest"), Some("10.0.0.1:5000"));
        assert_eq!(bp.param("nope"), None);
    }
}
