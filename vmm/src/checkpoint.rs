//! Checkpoints: the whole state of a guest at an exit boundary, as plain
//! versioned data, from which a fresh VM on another host carries on
//! exactly where this one stands.
//!
//! A checkpoint is three parts:
//!
//! - [`MachineState`]: the exit index it was taken at, the guest settings
//!   (memory size, NIC, `--param`s, digest interval: what decides which
//!   devices exist and what the guest reads at boot), the vCPU
//!   ([`VcpuCheckpoint`]: registers, special registers, XSAVE area (x87,
//!   SSE, AVX), XCRs, the MSRs that matter, pending events, debug
//!   registers) and every device's saved state (each device's own
//!   [`Persist`](crate::state::Persist) blob, in bus order). It is encoded
//!   with [`crate::state::encode`] (magic, kind `"machine"`, version,
//!   CRC32C, postcard): a blob of another version or a corrupted one is
//!   refused, never misread.
//! - guest memory: 4 KiB pages by guest-physical address. A page that was
//!   never written is zero and is not part of a checkpoint (a restored VM's
//!   memory starts zeroed).
//! - nothing else: the replication log continues from the exit index.
//!
//! The KVM structures are kept whole, as the kernel's ABI bytes (the
//! `serde` feature of `kvm-bindings`, as Firecracker does): the kernel
//! never changes these layouts, so the encoding is stable across builds
//! and hosts with the same CPUID (ftvm fixes it, `cpuid`).
//!
//! A checkpoint is taken on the vCPU thread, between two guest entries,
//! after the exit was handled: first one `KVM_RUN` with `immediate_exit`
//! set, which lets KVM finish what the last exit left pending (the value of
//! an `in` or an MMIO load goes into the register at the next entry) and
//! returns at once without running the guest; only then are the registers
//! read.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::bus::Bus;
use crate::dirty::{DirtyLog, PageBitmap, PAGE_SIZE};
use crate::hook::ExitIndex;
use crate::memory::GuestMem;
use crate::state::{decode, encode, StateError, StateVersion};
use crate::vcpu::StopHandle;
use crate::{BootSettings, VmConfig};

/// The MSRs a guest's execution depends on beyond what the special
/// registers hold (EFER, FS/GS base are there): the TSC, SYSENTER and
/// SYSCALL targets, the kernel GS base, PAT and TSC_AUX. Those the host's
/// KVM does not list are left out.
pub const MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Why a checkpoint could not be taken or applied.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A KVM ioctl reading or writing the vCPU failed.
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The `KVM_RUN` that completes the last exit ran the guest into
    /// another exit instead of returning at once.
    #[error("the vCPU did not come to rest for the checkpoint (KVM_RUN with immediate_exit returned an exit)")]
    NotAtRest,
    /// The encoded state is refused.
    #[error(transparent)]
    State(#[from] StateError),
    /// The checkpoint's devices are not this VM's devices.
    #[error("the checkpoint's devices do not match this VM's: {0}")]
    Devices(String),
    /// A page outside guest memory, or a page that is not 4 KiB.
    #[error("page at {addr:#x} ({len} bytes) does not fit guest memory of {mib} MiB")]
    Page { addr: u64, len: usize, mib: u64 },
    /// Reading or writing guest memory failed.
    #[error("guest memory access at {addr:#x} failed")]
    Memory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Reading the dirty log failed.
    #[error(transparent)]
    DirtyLog(#[from] crate::dirty::DirtyLogError),
    /// The settings a secondary was given differ from the checkpoint's.
    #[error("the guest settings differ from the primary's: {0}")]
    Settings(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CheckpointError {
    move |source| CheckpointError::Kvm { what, source }
}

/// The vCPU's architectural state, as KVM's own structures.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuCheckpoint {
    /// General registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area: x87, SSE, AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// The MSRs of [`MSRS`] this host's KVM serves, index and value.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending and injected exceptions, interrupts, NMIs; interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

impl VcpuCheckpoint {
    /// Read the state of `fd`, which must be at rest (no exit pending
    /// completion: see [`complete_pending`]).
    pub fn save(fd: &VcpuFd) -> Result<VcpuCheckpoint, CheckpointError> {
        let regs = fd.get_regs().map_err(kvm("read the registers"))?;
        let sregs = fd.get_sregs().map_err(kvm("read the special registers"))?;
        let xsave = fd.get_xsave().map_err(kvm("read the XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(kvm("read the XCRs"))?;
        let events = fd.get_vcpu_events().map_err(kvm("read the pending events"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm("read the debug registers"))?;
        // One at a time: KVM_GET_MSRS stops at the first MSR it does not
        // serve, and which ones a host serves varies.
        let mut msrs = Vec::new();
        for &index in MSRS {
            let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .map_err(|_| CheckpointError::Devices("cannot build an MSR request".into()))?;
            if fd.get_msrs(&mut one).map_err(kvm("read the MSRs"))? == 1 {
                msrs.extend(one.as_slice().first().copied());
            }
        }
        Ok(VcpuCheckpoint { regs, sregs, xsave, xcrs, msrs, events, debugregs })
    }

    /// Apply to `fd` (a fresh vCPU with ftvm's CPUID). KVM checks every
    /// value (a control register or segment it cannot take is refused).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), CheckpointError> {
        // The order KVM wants: special registers (mode) before MSRs and the
        // general registers, XSAVE after XCR0, events last.
        fd.set_sregs(&self.sregs).map_err(kvm("set the special registers"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set the XCRs"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy structure (no
        // trailing flexible array is read: its `extra` field is empty), so
        // KVM_SET_XSAVE reads exactly `size_of::<kvm_xsave>()` bytes of it;
        // KVM validates the area's contents itself.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set the XSAVE area"))?;
        if !self.msrs.is_empty() {
            let msrs = Msrs::from_entries(&self.msrs)
                .map_err(|_| CheckpointError::Devices(format!("{} MSRs is too many", self.msrs.len())))?;
            let set = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
            if set != self.msrs.len() {
                let refused = self.msrs.get(set).map_or(0, |m| m.index);
                return Err(CheckpointError::Devices(format!("KVM refused MSR {refused:#x}")));
            }
        }
        fd.set_regs(&self.regs).map_err(kvm("set the registers"))?;
        fd.set_debug_regs(&self.debugregs).map_err(kvm("set the debug registers"))?;
        fd.set_vcpu_events(&self.events).map_err(kvm("set the pending events"))?;
        Ok(())
    }
}

/// Let KVM finish what the last exit left pending (an `in`'s or MMIO
/// load's value goes into the register at the next entry) without running
/// the guest: one `KVM_RUN` with `immediate_exit` set, which returns EINTR.
pub fn complete_pending(fd: &mut VcpuFd) -> Result<(), CheckpointError> {
    fd.set_kvm_immediate_exit(1);
    let at_rest = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(CheckpointError::Kvm { what: "complete the last exit", source }),
        Ok(_) => Err(CheckpointError::NotAtRest),
    };
    fd.set_kvm_immediate_exit(0);
    at_rest
}

/// The guest settings that travel with a checkpoint: what decides the
/// devices and memory a VM is built with. A secondary builds its VM from
/// these; one given settings of its own checks they match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSettings {
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The NIC's MAC, if the guest has a NIC.
    pub mac: Option<[u8; 6]>,
    /// Address and prefix length.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// `--param` pairs, in order.
    pub params: Vec<(String, String)>,
    /// Digest interval in exits.
    pub digest_every: Option<u64>,
    /// Whether the test devices are on the buses.
    pub test_devices: bool,
}

impl GuestSettings {
    /// The settings of `config`.
    pub fn of(config: &VmConfig) -> GuestSettings {
        GuestSettings {
            memory_mib: config.memory_mib,
            mac: config.boot.mac,
            ip: config.boot.ip,
            gateway: config.boot.gateway,
            params: config.boot.params.clone(),
            digest_every: config.digest_every,
            test_devices: config.test_devices,
        }
    }

    /// A VM configuration with these settings and no image (a restored VM
    /// does not boot).
    pub fn config(&self) -> VmConfig {
        VmConfig {
            memory_mib: self.memory_mib,
            elf: Vec::new(),
            boot: BootSettings { mac: self.mac, ip: self.ip, gateway: self.gateway, params: self.params.clone() },
            privilege: crate::boot::Privilege::User,
            digest_every: self.digest_every,
            test_devices: self.test_devices,
        }
    }

    /// `Ok` when `other` (settings a secondary was given) equals these;
    /// otherwise which field differs.
    pub fn check_matches(&self, other: &GuestSettings) -> Result<(), CheckpointError> {
        let differ = |field: &str, mine: String, theirs: String| {
            Err(CheckpointError::Settings(format!("{field}: primary has {mine}, this host has {theirs}")))
        };
        if self.memory_mib != other.memory_mib {
            return differ("memory (MiB)", self.memory_mib.to_string(), other.memory_mib.to_string());
        }
        if self.mac != other.mac {
            return differ("mac", format!("{:?}", self.mac), format!("{:?}", other.mac));
        }
        if self.ip != other.ip || self.gateway != other.gateway {
            return differ(
                "ip/gateway",
                format!("{:?}", (self.ip, self.gateway)),
                format!("{:?}", (other.ip, other.gateway)),
            );
        }
        if self.params != other.params {
            return differ("params", format!("{:?}", self.params), format!("{:?}", other.params));
        }
        if self.digest_every != other.digest_every {
            return differ("digest interval", format!("{:?}", self.digest_every), format!("{:?}", other.digest_every));
        }
        if self.test_devices != other.test_devices {
            return differ("test devices", self.test_devices.to_string(), other.test_devices.to_string());
        }
        Ok(())
    }
}

/// Which bus a device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BusKind {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// One device's saved state, where it sits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Its bus.
    pub bus: BusKind,
    /// Its base address or port.
    pub base: u64,
    /// Its name ("serial").
    pub name: String,
    /// Its [`Persist`](crate::state::Persist) blob.
    pub blob: Vec<u8>,
}

/// Every device's state, PIO bus then MMIO bus, address order.
pub fn save_devices(pio: &Bus, mmio: &Bus) -> Vec<DeviceState> {
    let on = |bus: BusKind| {
        move |(base, device): (u64, &dyn crate::bus::BusDevice)| DeviceState {
            bus,
            base,
            name: device.name().to_string(),
            blob: device.snapshot(),
        }
    };
    pio.devices().map(on(BusKind::Pio)).chain(mmio.devices().map(on(BusKind::Mmio))).collect()
}

/// Restore every device from `saved`, which must list exactly this VM's
/// devices in order. Every blob is checked before the first is applied
/// only as far as each device's own `restore` checks; a mismatch in the
/// device list is found before anything is applied.
pub fn restore_devices(pio: &mut Bus, mmio: &mut Bus, saved: &[DeviceState]) -> Result<(), CheckpointError> {
    let mine: Vec<(BusKind, u64, &'static str)> = pio
        .devices()
        .map(|(b, d)| (BusKind::Pio, b, d.name()))
        .chain(mmio.devices().map(|(b, d)| (BusKind::Mmio, b, d.name())))
        .collect();
    let theirs: Vec<(BusKind, u64, &str)> = saved.iter().map(|d| (d.bus, d.base, d.name.as_str())).collect();
    if mine != theirs {
        return Err(CheckpointError::Devices(format!("this VM has {mine:?}, the checkpoint {theirs:?}")));
    }
    let devices = pio.devices_mut().chain(mmio.devices_mut());
    for ((_, device), state) in devices.zip(saved) {
        device.restore_snapshot(&state.blob)?;
    }
    Ok(())
}

/// Everything of a checkpoint but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// The exit the checkpoint follows: the replication log continues
    /// with the next one.
    pub exit_index: ExitIndex,
    /// The guest settings.
    pub settings: GuestSettings,
    /// The vCPU.
    pub vcpu: VcpuCheckpoint,
    /// Every device, PIO bus then MMIO bus, address order.
    pub devices: Vec<DeviceState>,
}

impl MachineState {
    /// Identity and version of the encoding.
    pub const VERSION: StateVersion = StateVersion { kind: "machine", major: 1, minor: 0 };

    /// The versioned, checksummed encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(Self::VERSION, self)
    }

    /// Decode and check a blob from [`MachineState::encode`].
    pub fn decode(blob: &[u8]) -> Result<MachineState, CheckpointError> {
        Ok(decode(Self::VERSION, blob)?)
    }
}

/// Fresh, zeroed guest memory for `settings` (a restored VM's).
pub fn new_memory(settings: &GuestSettings) -> Result<GuestMem, crate::VmError> {
    let mib = settings.memory_mib;
    if !(ftvm_abi::MIN_MEMORY_MIB..=ftvm_abi::MAX_MEMORY_MIB).contains(&mib) {
        return Err(crate::VmError::MemorySize { mib });
    }
    let len = usize::try_from(mib << 20).map_err(|_| crate::VmError::MemorySize { mib })?;
    GuestMem::from_ranges(&[(GuestAddress(0), len)]).map_err(|source| crate::VmError::Memory { mib, source })
}

/// Memory of a stopped VM, to build its successor from in place
/// ([`crate::Vm::restore`] with the same memory, no copy: a planned
/// switchover's old primary becoming the secondary): every page the host
/// backs is marked as written by the VMM, so that the new VM's digests take
/// their contents as the starting point, as they do for a transferred
/// checkpoint's pages. Without pagemap, every page is marked.
pub fn reuse_memory(mem: &GuestMem) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let pages: usize = mem.iter().map(|r| usize::try_from(r.len()).unwrap_or(0) / PAGE_SIZE).sum();
    let touched = touched_pages(mem, pages);
    for region in mem.iter() {
        let bitmap = std::ops::Deref::deref(region).bitmap();
        let first = usize::try_from(region.start_addr().0).unwrap_or(usize::MAX) / PAGE_SIZE;
        let len = usize::try_from(region.len()).unwrap_or(0);
        for (i, offset) in (0..len).step_by(PAGE_SIZE).enumerate() {
            if touched.as_ref().is_none_or(|t| t.is_set(first.saturating_add(i))) {
                bitmap.mark_dirty(offset, PAGE_SIZE);
            }
        }
    }
}

/// Write one page into `mem` (a restored VM's memory). Refuses a page that
/// is not 4 KiB or lies outside memory.
pub fn write_page(mem: &GuestMem, mib: u64, addr: u64, data: &[u8]) -> Result<(), CheckpointError> {
    let size = mib.saturating_mul(1 << 20);
    let fits = data.len() == PAGE_SIZE
        && addr.checked_rem(PAGE_SIZE as u64) == Some(0)
        && addr.checked_add(PAGE_SIZE as u64).is_some_and(|end| end <= size);
    if !fits {
        return Err(CheckpointError::Page { addr, len: data.len(), mib });
    }
    mem.write_slice(data, GuestAddress(addr)).map_err(|source| CheckpointError::Memory { addr, source })
}

/// Read one page of `mem` into `buf` (4 KiB).
pub fn read_page(mem: &GuestMem, addr: u64, buf: &mut [u8]) -> Result<(), CheckpointError> {
    mem.read_slice(buf, GuestAddress(addr)).map_err(|source| CheckpointError::Memory { addr, source })
}

/// Whether a page is all zero (never written, or written back to zero:
/// either way a fresh VM's page already holds it).
pub fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(8);
    let tail_zero = words.remainder().iter().all(|b| *b == 0);
    tail_zero && words.into_iter().all(|w| w.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// The pages of `mem` that are not zero, ascending guest-physical
/// addresses (a full pass: the first round of a transfer, or a checkpoint
/// of a stopped VM).
pub fn nonzero_pages(mem: &GuestMem, pages: usize) -> Result<PageBitmap, CheckpointError> {
    let mut map = PageBitmap::new(pages);
    let mut buf = vec![0u8; PAGE_SIZE];
    for page in 0..pages {
        let addr = (page as u64).saturating_mul(PAGE_SIZE as u64);
        read_page(mem, addr, &mut buf)?;
        if !is_zero(&buf) {
            map.set(page);
        }
    }
    Ok(map)
}

/// The pages of `mem` the host ever backed (present in RAM or swapped
/// out), from `/proc/self/pagemap`: a page of the anonymous mapping that
/// was never touched is neither, and reads as zero, so a full pass need
/// not read (and fault in) the untouched part of a large guest. `None`
/// when pagemap cannot be read (the caller scans everything).
pub fn touched_pages(mem: &GuestMem, pages: usize) -> Option<PageBitmap> {
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let file = std::fs::File::open("/proc/self/pagemap").ok()?;
    let mut map = PageBitmap::new(pages);
    let mut entries = vec![0u8; 8 * 4096];
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        let first = usize::try_from(region.start_addr().0).ok()? / PAGE_SIZE;
        let count = usize::try_from(region.len()).ok()? / PAGE_SIZE;
        let mut done = 0usize;
        while done < count {
            let n = count.saturating_sub(done).min(4096);
            let buf = entries.get_mut(..n.checked_mul(8)?)?;
            let vpage = host.checked_div(PAGE_SIZE as u64)?.checked_add(done as u64)?;
            file.read_exact_at(buf, vpage.checked_mul(8)?).ok()?;
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let bits = u64::from_le_bytes(entry.try_into().ok()?);
                // Bit 63: present in RAM; bit 62: swapped out.
                if bits >> 62 != 0 {
                    map.set(first.checked_add(done)?.checked_add(i)?);
                }
            }
            done = done.checked_add(n)?;
        }
    }
    Some(map)
}

/// What the vCPU thread hands over at a live checkpoint: the machine state,
/// the pages written since the transfer's previous round (copied while the
/// guest stood still), and how long the guest stood still.
pub struct LiveCheckpoint {
    /// vCPU, devices, settings, exit index.
    pub state: MachineState,
    /// Guest-physical addresses of the pages in `data`, ascending.
    pub pages: Vec<u64>,
    /// The pages' contents, 4 KiB each, in `pages` order.
    pub data: Vec<u8>,
    /// From the guest stopping to the guest running again.
    pub pause: Duration,
    /// What the mark given to [`Checkpointer::request_marked`] returned,
    /// called on the vCPU thread while the guest stood still (the primary's
    /// log position at the checkpoint: the log a new copy replays starts
    /// right after it). 0 without a mark.
    pub mark: u64,
}

/// Called on the vCPU thread at the checkpoint, while the guest stands
/// still.
pub type Mark = Box<dyn FnOnce() -> u64 + Send>;

/// Where a live checkpoint goes, and the mark to take with it.
struct Reply {
    tx: std::sync::mpsc::Sender<Result<LiveCheckpoint, String>>,
    mark: Option<Mark>,
}

/// A request for a live checkpoint, honoured by the vCPU thread at the next
/// exit boundary (at the next digest point when the VM computes digests, so
/// that the new copy's first digest covers the same pages as the
/// original's). Shared between the VM and whoever asks ([`Checkpointer`]).
pub struct CheckpointSlot {
    pending: AtomicBool,
    reply: Mutex<Option<Reply>>,
    pub(crate) settings: GuestSettings,
    pub(crate) dirty: DirtyLog,
    stop: StopHandle,
}

impl CheckpointSlot {
    pub(crate) fn new(settings: GuestSettings, dirty: DirtyLog, stop: StopHandle) -> Arc<CheckpointSlot> {
        Arc::new(CheckpointSlot { pending: AtomicBool::new(false), reply: Mutex::new(None), settings, dirty, stop })
    }

    /// Whether a checkpoint is asked for (one relaxed load per exit).
    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// The mark of the pending request, taken (at most once).
    pub(crate) fn take_mark(&self) -> Option<Mark> {
        self.reply.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut().and_then(|r| r.mark.take())
    }

    /// Hand the result to whoever asked, and clear the request.
    pub(crate) fn answer(&self, result: Result<LiveCheckpoint, String>) {
        self.pending.store(false, Ordering::SeqCst);
        let reply = self.reply.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(reply) = reply {
            // The asker may have given up: nothing to do then.
            let _ = reply.tx.send(result);
        }
    }
}

/// Asks a running VM for live checkpoints, and follows its dirty pages
/// between them. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Checkpointer {
    pub(crate) slot: Arc<CheckpointSlot>,
}

impl Checkpointer {
    /// Guest memory (read while the guest runs: a page read may be torn,
    /// which the dirty log then reports, so a later round resends it).
    pub fn memory(&self) -> &GuestMem {
        self.slot.dirty.memory()
    }

    /// The guest settings.
    pub fn settings(&self) -> &GuestSettings {
        &self.slot.settings
    }

    /// The dirty log the transfer follows.
    pub fn dirty(&self) -> &DirtyLog {
        &self.slot.dirty
    }

    /// Ask for a checkpoint at the next exit boundary; the receiver gets it
    /// (or why it failed). A request already pending is replaced.
    pub fn request(&self) -> std::sync::mpsc::Receiver<Result<LiveCheckpoint, String>> {
        self.request_with(None)
    }

    /// [`Checkpointer::request`], with `mark` called on the vCPU thread at
    /// the checkpoint (its value lands in [`LiveCheckpoint::mark`]).
    pub fn request_marked(&self, mark: Mark) -> std::sync::mpsc::Receiver<Result<LiveCheckpoint, String>> {
        self.request_with(Some(mark))
    }

    fn request_with(&self, mark: Option<Mark>) -> std::sync::mpsc::Receiver<Result<LiveCheckpoint, String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.slot.reply.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Reply { tx, mark });
        self.slot.pending.store(true, Ordering::SeqCst);
        rx
    }

    /// Wake the vCPU if it sleeps in a HLT (a guest halted with no
    /// deadline reaches no exit by itself). A guest sees a spurious wake-up,
    /// which every guest must tolerate; nothing of it is an input. Call
    /// while waiting for a requested checkpoint.
    pub fn nudge(&self) {
        self.slot.stop.kick();
    }

    /// Withdraw a pending request.
    pub fn cancel(&self) {
        self.slot.pending.store(false, Ordering::SeqCst);
        self.slot.reply.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    }
}

/// Take a live checkpoint on the vCPU thread (the guest stands still from
/// here to the return): complete the last exit, read the vCPU and devices,
/// and copy the pages written since the transfer's last round.
pub(crate) fn take_live(
    fd: &mut VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    exit_index: ExitIndex,
    slot: &CheckpointSlot,
) -> Result<LiveCheckpoint, CheckpointError> {
    let start = Instant::now();
    complete_pending(fd)?;
    let vcpu = VcpuCheckpoint::save(fd)?;
    let devices = save_devices(pio, mmio);
    let dirty = slot.dirty.take_for_transfer()?;
    let mut pages = Vec::with_capacity(dirty.count());
    let mut data = vec![0u8; dirty.count().saturating_mul(PAGE_SIZE)];
    for (page, buf) in dirty.iter().zip(data.chunks_exact_mut(PAGE_SIZE)) {
        let addr = (page as u64).saturating_mul(PAGE_SIZE as u64);
        read_page(slot.dirty.memory(), addr, buf)?;
        pages.push(addr);
    }
    let mark = slot.take_mark().map_or(0, |mark| mark());
    let state = MachineState { exit_index, settings: slot.settings.clone(), vcpu, devices };
    Ok(LiveCheckpoint { state, pages, data, pause: start.elapsed(), mark })
}
