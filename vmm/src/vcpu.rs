//! The vCPU: its thread, its exit loop, and the handle that stops it.
//!
//! The loop counts every guest exit (the *exit index*), reports it to the
//! input source, and dispatches it to the PIO or MMIO bus; it knows buses and
//! the hook, never device types. [`handle_exit`] is a free function over
//! [`Peripherals`] so tests feed it synthetic exits with no guest running.
//!
//! Stopping a vCPU from another thread ([`StopHandle::stop`]): set the stop
//! flag, set `immediate_exit` in the vCPU's `kvm_run` page through the
//! handle's own mapping of it, wake a HLT sleep through an eventfd, and send
//! the vCPU thread a signal whose handler does nothing. A guest in KVM_RUN is
//! thrown out by the signal; a vCPU about to enter KVM_RUN returns at once
//! because of `immediate_exit`; a vCPU asleep in HLT wakes on the eventfd.
//! No vCPU pointer in a thread-local, no global state. Returns the VMM
//! provokes this way are not guest exits and are not counted.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::checkpoint::{CheckpointError, CheckpointSlot};
use crate::devices::timer::TimerDeadline;
use crate::devices::DeviceError;
use crate::digest::{devices_hash, DigestError, DirtyPages, StateDigest, VcpuState};
use crate::hook::{Access, ExitCtx, ExitIndex, ExitKind, HookError, InputSource, OutputSink, StopRequest};

/// Why a vCPU stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest powered off through the power port.
    PoweredOff { status: u32, exit_index: ExitIndex },
    /// The host asked the vCPU to stop ([`StopHandle::stop`]).
    Stopped { exit_index: ExitIndex },
}

/// An exit the VMM does not serve, a guest fault, or a host failure. Each
/// stops the guest.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The guest accessed a port no device serves.
    #[error("guest {access} of {size} bytes at port {port:#x}, which no device serves (exit {exit_index})")]
    UnknownPort { port: u16, size: usize, access: Access, exit_index: ExitIndex },
    /// The guest accessed an address outside RAM that no device serves.
    #[error("guest {access} of {size} bytes at MMIO address {addr:#x}, which no device serves (exit {exit_index})")]
    UnknownMmio { addr: u64, size: usize, access: Access, exit_index: ExitIndex },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault at rip {rip:#x} (exit {exit_index})")]
    TripleFault { rip: u64, exit_index: ExitIndex },
    /// The guest reported a panic through pvpanic.
    #[error("guest panicked (pvpanic event {event:#x}, exit {exit_index})")]
    GuestPanic { event: u8, exit_index: ExitIndex },
    /// KVM could not emulate what the guest did.
    #[error("KVM internal error, suberror {suberror} (exit {exit_index})")]
    InternalError { suberror: u32, exit_index: ExitIndex },
    /// The hardware refused to enter the guest.
    #[error("KVM failed to enter the guest, hardware reason {reason:#x} (exit {exit_index})")]
    FailEntry { reason: u64, exit_index: ExitIndex },
    /// A KVM exit this VMM never asks for.
    #[error("unexpected KVM exit {what} (exit {exit_index})")]
    UnexpectedExit { what: &'static str, exit_index: ExitIndex },
    /// A device failed while handling an exit.
    #[error("device error at exit {exit_index}")]
    Device {
        exit_index: ExitIndex,
        #[source]
        source: DeviceError,
    },
    /// The input source or output sink failed outside a device.
    #[error("replication hook failed at exit {exit_index}")]
    Hook {
        exit_index: ExitIndex,
        #[source]
        source: HookError,
    },
    /// KVM_RUN itself failed.
    #[error("KVM_RUN failed (exit {exit_index})")]
    Run {
        exit_index: ExitIndex,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Computing a state digest failed.
    #[error("cannot compute the state digest at exit {exit_index}")]
    Digest {
        exit_index: ExitIndex,
        #[source]
        source: DigestError,
    },
    /// Reading the registers of a faulted guest failed.
    #[error("cannot read vCPU registers")]
    Registers(#[source] kvm_ioctls::Error),
}

impl VcpuError {
    /// True when the guest caused the stop (its fault, not the host's):
    /// `ftvm run` exits with status 3 for these.
    pub fn is_guest_fault(&self) -> bool {
        match self {
            VcpuError::UnknownPort { .. }
            | VcpuError::UnknownMmio { .. }
            | VcpuError::TripleFault { .. }
            | VcpuError::GuestPanic { .. }
            | VcpuError::InternalError { .. }
            | VcpuError::FailEntry { .. } => true,
            VcpuError::Device { source, .. } => !matches!(source, DeviceError::Hook { .. }),
            VcpuError::UnexpectedExit { .. }
            | VcpuError::Hook { .. }
            | VcpuError::Run { .. }
            | VcpuError::Digest { .. }
            | VcpuError::Registers(_) => false,
        }
    }
}

/// What the exit loop works on besides the vCPU fd: buses, the timer's
/// deadline, the hook, and the exit index.
pub struct Peripherals {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// The wake-up deadline the guest armed, read on HLT.
    pub deadline: TimerDeadline,
    /// Where inputs come from.
    pub input: Box<dyn InputSource>,
    /// Where outputs go.
    pub output: Box<dyn OutputSink>,
    /// Guest exits so far.
    pub exit_index: ExitIndex,
}

/// What the loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Enter the guest again.
    Continue,
    /// The run is over.
    Done(RunOutcome),
    /// KVM_RUN returned because the VMM interrupted it (not a guest exit).
    Interrupted,
}

fn stop_flow(request: Option<StopRequest>, exit_index: ExitIndex) -> Result<Flow, VcpuError> {
    match request {
        None => Ok(Flow::Continue),
        Some(StopRequest::PowerOff { status }) => Ok(Flow::Done(RunOutcome::PoweredOff { status, exit_index })),
        Some(StopRequest::Panic { event }) => Err(VcpuError::GuestPanic { event, exit_index }),
    }
}

/// Which bus an access goes to, and where on it.
#[derive(Clone, Copy)]
enum Target {
    /// The PIO bus at this port (an `in`/`out`, or the MMIO port window).
    Port(u16),
    /// The MMIO bus at this address.
    Mmio(u64),
}

/// The port an MMIO access through the port window reaches, if it is one.
fn window_port(addr: u64, size: usize) -> Option<u16> {
    let offset = addr.checked_sub(ftvm_abi::PIO_WINDOW_BASE)?;
    let end = offset.checked_add(u64::try_from(size).ok()?)?;
    if end > ftvm_abi::PIO_WINDOW_SIZE {
        return None;
    }
    u16::try_from(offset).ok()
}

impl Peripherals {
    /// Count a guest exit and report it to the input source.
    fn begin_exit(&mut self, kind: ExitKind) -> Result<ExitIndex, VcpuError> {
        // 2^64 exits at the measured ~140 k exits/s take four million years:
        // saturating never happens, and is not a panic if it did.
        self.exit_index.0 = self.exit_index.0.saturating_add(1);
        let exit_index = self.exit_index;
        self.input.on_exit(exit_index, &kind).map_err(|source| VcpuError::Hook { exit_index, source })?;
        Ok(exit_index)
    }

    /// One PIO or MMIO access: count it, dispatch it, then act on what the
    /// device asked (halt, stop).
    fn access(&mut self, kind: ExitKind, target: Target, access: Access, data: PioData<'_>) -> Result<Flow, VcpuError> {
        let size = data.len();
        let exit_index = self.begin_exit(kind)?;
        let mut ctx = ExitCtx::new(exit_index, &mut *self.input, &mut *self.output);
        let (bus, addr) = match target {
            Target::Port(port) => (&mut self.pio, u64::from(port)),
            Target::Mmio(addr) => (&mut self.mmio, addr),
        };
        let mapped = match data {
            PioData::In(buf) => bus.read(addr, buf, &mut ctx),
            PioData::Out(buf) => bus.write(addr, buf, &mut ctx),
        }
        .map_err(|source| VcpuError::Device { exit_index, source })?;
        if !mapped {
            return Err(match target {
                Target::Port(port) => VcpuError::UnknownPort { port, size, access, exit_index },
                Target::Mmio(addr) => VcpuError::UnknownMmio { addr, size, access, exit_index },
            });
        }
        let (request, halt) = (ctx.stop_request(), ctx.halt_requested());
        if halt {
            self.wait_halted(exit_index)?;
        }
        stop_flow(request, exit_index)
    }

    fn pio(&mut self, port: u16, access: Access, data: PioData<'_>) -> Result<Flow, VcpuError> {
        // KVM delivers PIO accesses of 1, 2 or 4 bytes: never saturates.
        let kind = ExitKind::Pio { port, size: u8::try_from(data.len()).unwrap_or(u8::MAX), access };
        self.access(kind, Target::Port(port), access, data)
    }

    fn mmio(&mut self, addr: u64, access: Access, data: PioData<'_>) -> Result<Flow, VcpuError> {
        // KVM delivers MMIO accesses of at most 8 bytes: never saturates.
        let kind = ExitKind::Mmio { addr, size: u8::try_from(data.len()).unwrap_or(u8::MAX), access };
        let target = window_port(addr, data.len()).map_or(Target::Mmio(addr), Target::Port);
        self.access(kind, target, access, data)
    }

    /// The guest halted at exit `exit_index` (HLT, or the halt port): wait
    /// for its deadline or an event, then let devices deliver what arrived.
    /// Done after every halt, whatever woke the guest, so that a replaying
    /// secondary takes inputs at the same exits as the primary.
    fn wait_halted(&mut self, exit_index: ExitIndex) -> Result<(), VcpuError> {
        self.input.halt(exit_index, self.deadline.get()).map_err(|source| VcpuError::Hook { exit_index, source })?;
        let mut ctx = ExitCtx::new(exit_index, &mut *self.input, &mut *self.output);
        self.mmio.after_halt(&mut ctx).map_err(|source| VcpuError::Device { exit_index, source })?;
        self.pio.after_halt(&mut ctx).map_err(|source| VcpuError::Device { exit_index, source })
    }

    fn halt(&mut self) -> Result<Flow, VcpuError> {
        let exit_index = self.begin_exit(ExitKind::Hlt)?;
        self.wait_halted(exit_index)?;
        Ok(Flow::Continue)
    }
}

enum PioData<'a> {
    In(&'a mut [u8]),
    Out(&'a [u8]),
}

impl PioData<'_> {
    fn len(&self) -> usize {
        match self {
            PioData::In(b) => b.len(),
            PioData::Out(b) => b.len(),
        }
    }
}

/// Handle one return of KVM_RUN. A triple fault comes back as
/// `TripleFault` with `rip` 0: the loop fills in the real `rip`.
pub fn handle_exit(p: &mut Peripherals, exit: VcpuExit<'_>) -> Result<Flow, VcpuError> {
    match exit {
        VcpuExit::IoIn(port, data) => p.pio(port, Access::Read, PioData::In(data)),
        VcpuExit::IoOut(port, data) => p.pio(port, Access::Write, PioData::Out(data)),
        VcpuExit::MmioRead(addr, data) => p.mmio(addr, Access::Read, PioData::In(data)),
        VcpuExit::MmioWrite(addr, data) => p.mmio(addr, Access::Write, PioData::Out(data)),
        VcpuExit::Hlt => p.halt(),
        VcpuExit::Shutdown => {
            let exit_index = p.begin_exit(ExitKind::Shutdown)?;
            Err(VcpuError::TripleFault { rip: 0, exit_index })
        }
        VcpuExit::Intr => Ok(Flow::Interrupted),
        VcpuExit::InternalError => Err(VcpuError::InternalError { suberror: 0, exit_index: p.exit_index }),
        VcpuExit::FailEntry(reason, _cpu) => Err(VcpuError::FailEntry { reason, exit_index: p.exit_index }),
        other => Err(VcpuError::UnexpectedExit { what: exit_name(&other), exit_index: p.exit_index }),
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Unknown => "UNKNOWN",
        VcpuExit::Exception => "EXCEPTION",
        VcpuExit::Hypercall(_) => "HYPERCALL",
        VcpuExit::Debug(_) => "DEBUG",
        VcpuExit::IrqWindowOpen => "IRQ_WINDOW_OPEN",
        VcpuExit::Nmi => "NMI",
        VcpuExit::SystemEvent(..) => "SYSTEM_EVENT",
        _ => "other",
    }
}

/// The vCPU's `kvm_run` page, mapped a second time through a duplicate of the
/// vCPU fd, so another thread can set `immediate_exit` without touching the
/// `VcpuFd` the vCPU thread owns.
struct RunPage {
    ptr: *mut u8,
    len: usize,
    _fd: OwnedFd,
}

// SAFETY: the mapping is shared memory owned by this struct alone (unmapped
// only in Drop); the one access made through it is a volatile one-byte store
// of `immediate_exit`, which KVM is designed to have set from any thread.
unsafe impl Send for RunPage {}
// SAFETY: as above: concurrent one-byte volatile stores of the same value
// cannot tear or alias any Rust reference.
unsafe impl Sync for RunPage {}

impl RunPage {
    fn new(vcpu: &VcpuFd, len: usize) -> std::io::Result<RunPage> {
        // SAFETY: dup(2) on a valid open fd has no memory-safety requirement;
        // the result is checked before use.
        let raw = unsafe { libc::dup(vcpu.as_raw_fd()) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd from dup that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: mapping `len` bytes (KVM_GET_VCPU_MMAP_SIZE) of a vCPU fd at
        // offset 0 is how KVM exposes kvm_run; a null hint lets the kernel
        // pick an address that aliases nothing in this process.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RunPage { ptr: ptr.cast(), len, _fd: fd })
    }

    fn set_immediate_exit(&self) {
        let offset = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
        // SAFETY: `offset` is inside the kvm_run struct, which starts the
        // mapping of `len` >= size_of::<kvm_run>() bytes that lives as long as
        // `self`; a volatile store keeps the compiler from eliding it.
        unsafe { std::ptr::write_volatile(self.ptr.add(offset), 1u8) };
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no
        // reference into it escapes this struct.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The signal that throws a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Install the kick signal's no-op handler (idempotent).
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno())
        })
        .map_err(std::io::Error::from_raw_os_error)
}

struct StopInner {
    stop: AtomicBool,
    /// Nanoseconds since [`epoch`] at which the vCPU last entered KVM_RUN,
    /// or 0 while it is outside (handling an exit, asleep in HLT): what the
    /// hang watchdog reads.
    in_guest_since: AtomicU64,
    wake: EventFd,
    /// The vCPU's kvm_run page; `None` for a handle that drives no vCPU.
    run: Option<RunPage>,
    thread: OnceLock<libc::pthread_t>,
}

/// Stops a running vCPU from any thread. Cheap to clone.
#[derive(Clone)]
pub struct StopHandle(Arc<StopInner>);

impl StopHandle {
    pub(crate) fn new(vcpu: &VcpuFd, run_size: usize) -> std::io::Result<StopHandle> {
        Ok(StopHandle(Arc::new(StopInner {
            stop: AtomicBool::new(false),
            in_guest_since: AtomicU64::new(0),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            run: Some(RunPage::new(vcpu, run_size)?),
            thread: OnceLock::new(),
        })))
    }

    /// A handle tied to no vCPU: [`StopHandle::stop`] sets the flag and
    /// signals [`StopHandle::wake_fd`]. What drives a guest without KVM (the
    /// pair sessions' scripted guests) stops on it like a vCPU would.
    pub fn detached() -> std::io::Result<StopHandle> {
        Ok(StopHandle(Arc::new(StopInner {
            stop: AtomicBool::new(false),
            in_guest_since: AtomicU64::new(0),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            run: None,
            thread: OnceLock::new(),
        })))
    }

    /// Ask the vCPU to stop; it returns [`RunOutcome::Stopped`] at its next
    /// chance, which is at once whatever the guest is doing.
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::SeqCst);
        if let Some(run) = &self.0.run {
            run.set_immediate_exit();
        }
        // A full eventfd counter only means a wake-up is already pending.
        let _ = self.0.wake.write(1);
        if let Some(&thread) = self.0.thread.get() {
            // SAFETY: `thread` is the vCPU thread's id, recorded by the thread
            // itself; the vCPU thread is joined only after its StopHandle
            // users are done (Vm::run holds it), so the id is still live.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Throw the vCPU thread out of KVM_RUN or a HLT sleep once, without
    /// asking it to stop: KVM_RUN returns EINTR (not a guest exit), a HLT
    /// sleep ends early (a spurious wake-up the guest tolerates).
    pub fn kick(&self) {
        if let Some(&thread) = self.0.thread.get() {
            // SAFETY: as in `stop`: the vCPU thread's own id, still live
            // while anything holds the VM that owns this handle.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }

    /// Withdraw a stop, so that the VM can run again after its run returned
    /// [`RunOutcome::Stopped`] (a checkpoint of a stopped VM, then on).
    pub fn resume(&self) {
        self.0.stop.store(false, Ordering::SeqCst);
        // Drain a pending wake-up; an empty counter reads as EAGAIN.
        let _ = self.0.wake.read();
    }

    /// Whether a stop was asked.
    pub fn is_stopped(&self) -> bool {
        self.0.stop.load(Ordering::SeqCst)
    }

    /// An fd that becomes readable when a stop is asked: a HLT sleep polls it.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.0.wake.as_raw_fd()
    }

    /// The vCPU enters the guest now (KVM_RUN).
    pub fn entering_guest(&self) {
        // Never 0, which means "outside".
        self.0.in_guest_since.store(since_epoch_ns().max(1), Ordering::Release);
    }

    /// The vCPU left the guest (an exit, or a provoked return).
    pub fn left_guest(&self) {
        self.0.in_guest_since.store(0, Ordering::Release);
    }

    /// How long the vCPU has been inside the guest without an exit, or
    /// `None` while it is outside (handling an exit, asleep in HLT, not
    /// started). The hang watchdog's measure.
    pub fn in_guest_for(&self) -> Option<std::time::Duration> {
        match self.0.in_guest_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(std::time::Duration::from_nanos(since_epoch_ns().saturating_sub(since))),
        }
    }

    pub(crate) fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let _ = self.0.thread.set(me);
    }
}

/// A process-wide monotonic epoch for [`StopHandle::in_guest_for`].
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn since_epoch_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Computes a state digest every `every` exits.
pub struct Digester {
    /// Digest after every exit whose index is a multiple of this.
    pub every: u64,
    /// The guest pages written since the last digest.
    pub dirty: DirtyPages,
}

/// One vCPU and everything its loop needs.
pub struct Vcpu {
    fd: VcpuFd,
    peripherals: Peripherals,
    stop: StopHandle,
    digester: Option<Digester>,
    checkpoint: Arc<CheckpointSlot>,
}

impl Vcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        peripherals: Peripherals,
        stop: StopHandle,
        digester: Option<Digester>,
        checkpoint: Arc<CheckpointSlot>,
    ) -> Self {
        Vcpu { fd, peripherals, stop, digester, checkpoint }
    }

    /// After an exit: a live checkpoint, if one is asked for and this exit
    /// may carry it (any exit, or a digest point when the VM computes
    /// digests). A failed checkpoint is reported to the asker; the guest
    /// runs on.
    fn checkpoint_point(&mut self) {
        if !self.checkpoint.pending() {
            return;
        }
        let exit_index = self.peripherals.exit_index;
        if let Some(d) = &self.digester {
            if exit_index.0.checked_rem(d.every) != Some(0) {
                return;
            }
        }
        let result = crate::checkpoint::take_live(
            &mut self.fd,
            &self.peripherals.pio,
            &self.peripherals.mmio,
            exit_index,
            &self.checkpoint,
        );
        self.checkpoint.answer(result.map_err(|e| e.to_string()));
    }

    /// The machine state of a vCPU that is not running (its run returned).
    pub(crate) fn save_stopped(&mut self) -> Result<crate::checkpoint::MachineState, CheckpointError> {
        crate::checkpoint::complete_pending(&mut self.fd)?;
        Ok(crate::checkpoint::MachineState {
            exit_index: self.peripherals.exit_index,
            settings: self.checkpoint.settings.clone(),
            vcpu: crate::checkpoint::VcpuCheckpoint::save(&self.fd)?,
            devices: crate::checkpoint::save_devices(&self.peripherals.pio, &self.peripherals.mmio),
        })
    }

    /// Apply a checkpoint's vCPU and device state and exit index to a vCPU
    /// that never ran.
    pub(crate) fn restore(&mut self, state: &crate::checkpoint::MachineState) -> Result<(), CheckpointError> {
        crate::checkpoint::restore_devices(&mut self.peripherals.pio, &mut self.peripherals.mmio, &state.devices)?;
        state.vcpu.restore(&self.fd)?;
        self.peripherals.exit_index = state.exit_index;
        Ok(())
    }

    /// Take guest memory as it is now as the digests' starting point (after
    /// the image was loaded or a checkpoint's pages were written).
    pub(crate) fn rebase_digests(&mut self) -> Result<(), DigestError> {
        match &mut self.digester {
            Some(d) => d.dirty.rebase(),
            None => Ok(()),
        }
    }

    /// After an exit: the state digest, if this exit index is a digest point.
    /// Both hosts compute it at the same exit, after the exit was handled and
    /// before the guest runs again.
    fn digest_point(&mut self) -> Result<(), VcpuError> {
        let Some(d) = &mut self.digester else { return Ok(()) };
        let exit_index = self.peripherals.exit_index;
        // `every` is never 0 (Vm::new filters it); were it 0, no exit would
        // be a digest point.
        if exit_index.0.checked_rem(d.every) != Some(0) {
            return Ok(());
        }
        let digest_err = |source| VcpuError::Digest { exit_index, source };
        let vcpu = VcpuState::read(&self.fd).map_err(digest_err)?.hash();
        let devices = devices_hash(&self.peripherals.pio, &self.peripherals.mmio);
        let (memory, pages) = d.dirty.hash_and_reset().map_err(digest_err)?;
        let digest = StateDigest { vcpu, devices, memory };
        tracing::trace!(%exit_index, pages, ?digest, "state digest");
        self.peripherals.input.digest(exit_index, &digest).map_err(|source| VcpuError::Hook { exit_index, source })
    }

    /// Guest exits so far.
    pub fn exit_index(&self) -> ExitIndex {
        self.peripherals.exit_index
    }

    /// Run the guest on the calling thread until it stops.
    pub fn run(&mut self) -> Result<RunOutcome, VcpuError> {
        self.stop.register_current_thread();
        self.run_loop()
    }

    fn run_loop(&mut self) -> Result<RunOutcome, VcpuError> {
        loop {
            if self.stop.is_stopped() {
                return Ok(RunOutcome::Stopped { exit_index: self.peripherals.exit_index });
            }
            self.stop.entering_guest();
            let ran = self.fd.run();
            self.stop.left_guest();
            let flow = match ran {
                Ok(exit) => handle_exit(&mut self.peripherals, exit),
                Err(e) if e.errno() == libc::EINTR => Ok(Flow::Interrupted),
                Err(e) if e.errno() == libc::EAGAIN => Ok(Flow::Continue),
                Err(source) => Err(VcpuError::Run { exit_index: self.peripherals.exit_index, source }),
            };
            match flow {
                Ok(Flow::Continue) => {
                    self.digest_point()?;
                    self.checkpoint_point();
                }
                Ok(Flow::Interrupted) => {
                    // Provoked by the VMM: clear immediate_exit unless a stop
                    // is pending (the top of the loop handles that).
                    if !self.stop.is_stopped() {
                        self.fd.set_kvm_immediate_exit(0);
                    }
                }
                Ok(Flow::Done(outcome)) => return Ok(outcome),
                Err(VcpuError::TripleFault { exit_index, .. }) => {
                    let rip = self.fd.get_regs().map_err(VcpuError::Registers)?.rip;
                    return Err(VcpuError::TripleFault { rip, exit_index });
                }
                Err(VcpuError::InternalError { exit_index, .. }) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the exit union is the one KVM wrote.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Err(VcpuError::InternalError { suberror, exit_index });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The vCPU fd, to read registers.
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The raw vCPU fd, for the benchmark's bare KVM_RUN loop. Only with the
    /// `bench` feature: a KVM_RUN outside [`Vcpu::run`] skips exit counting,
    /// the hook and the devices.
    #[cfg(feature = "bench")]
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testdev::TestDev;
    use crate::hook::{GuestSignal, Wake};

    #[derive(Default)]
    struct Rec {
        exits: Vec<(ExitIndex, ExitKind)>,
        halts: Vec<(ExitIndex, Option<u64>)>,
    }
    struct In(Arc<std::sync::Mutex<Rec>>);
    impl InputSource for In {
        fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
            self.0.lock().unwrap().exits.push((exit, *kind));
            Ok(())
        }
        fn clock_ns(&mut self, _: ExitIndex) -> Result<u64, HookError> {
            Ok(5)
        }
        fn entropy(&mut self, _: ExitIndex, _: &mut [u8]) -> Result<(), HookError> {
            Ok(())
        }
        fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
            self.0.lock().unwrap().halts.push((exit, deadline));
            Ok(Wake::Deadline)
        }
    }
    struct Out;
    impl OutputSink for Out {
        fn serial(&mut self, _: ExitIndex, _: &[u8]) -> Result<(), HookError> {
            Ok(())
        }
        fn signal(&mut self, _: ExitIndex, _: GuestSignal) -> Result<(), HookError> {
            Ok(())
        }
    }

    fn peripherals() -> (Peripherals, Arc<std::sync::Mutex<Rec>>) {
        let rec = Arc::new(std::sync::Mutex::new(Rec::default()));
        let mut pio = Bus::new();
        pio.insert(u64::from(ftvm_abi::TESTDEV_PORT), 4, Box::new(TestDev::new())).unwrap();
        let p = Peripherals {
            pio,
            mmio: Bus::new(),
            deadline: TimerDeadline::default(),
            input: Box::new(In(rec.clone())),
            output: Box::new(Out),
            exit_index: ExitIndex(0),
        };
        (p, rec)
    }

    #[test]
    fn exits_are_counted_and_reported_in_order() {
        let (mut p, rec) = peripherals();
        let v = [1u8, 0, 0, 0];
        assert_eq!(handle_exit(&mut p, VcpuExit::IoOut(ftvm_abi::TESTDEV_PORT, &v)).unwrap(), Flow::Continue);
        assert_eq!(handle_exit(&mut p, VcpuExit::Hlt).unwrap(), Flow::Continue);
        // Provoked returns are not exits.
        assert_eq!(handle_exit(&mut p, VcpuExit::Intr).unwrap(), Flow::Interrupted);
        let mut b = [0u8; 4];
        handle_exit(&mut p, VcpuExit::IoIn(ftvm_abi::TESTDEV_PORT, &mut b)).unwrap();
        assert_eq!(p.exit_index, ExitIndex(3));
        let rec = rec.lock().unwrap();
        let idx: Vec<u64> = rec.exits.iter().map(|(i, _)| i.0).collect();
        assert_eq!(idx, vec![1, 2, 3]);
        assert_eq!(rec.exits[1].1, ExitKind::Hlt);
        assert_eq!(rec.halts, vec![(ExitIndex(2), None)]);
    }

    #[test]
    fn the_port_window_reaches_the_pio_bus_and_the_halt_port_halts() {
        let (mut p, rec) = peripherals();
        p.pio.insert(u64::from(ftvm_abi::HALT_PORT), 4, Box::new(crate::devices::halt::Halt::new())).unwrap();
        let testdev = ftvm_abi::PIO_WINDOW_BASE + u64::from(ftvm_abi::TESTDEV_PORT);
        assert_eq!(handle_exit(&mut p, VcpuExit::MmioWrite(testdev, &[1, 0, 0, 0])).unwrap(), Flow::Continue);
        let halt = ftvm_abi::PIO_WINDOW_BASE + u64::from(ftvm_abi::HALT_PORT);
        assert_eq!(handle_exit(&mut p, VcpuExit::MmioWrite(halt, &[0, 0, 0, 0])).unwrap(), Flow::Continue);
        let rec_now = rec.lock().unwrap();
        assert_eq!(rec_now.halts, vec![(ExitIndex(2), None)], "the halt port halts like HLT, at its own exit");
        assert!(matches!(rec_now.exits[1].1, ExitKind::Mmio { addr, size: 4, access: Access::Write } if addr == halt));
        drop(rec_now);
        // An unserved port through the window is an unknown port, not MMIO.
        let e = handle_exit(&mut p, VcpuExit::MmioWrite(ftvm_abi::PIO_WINDOW_BASE + 0x1234, &[0])).unwrap_err();
        assert!(matches!(e, VcpuError::UnknownPort { port: 0x1234, .. }), "{e}");
        assert_eq!(window_port(ftvm_abi::PIO_WINDOW_BASE + 0xffff, 1), Some(0xffff));
        assert_eq!(window_port(ftvm_abi::PIO_WINDOW_BASE + 0xfffe, 4), None);
        assert_eq!(window_port(ftvm_abi::PIO_WINDOW_BASE - 1, 1), None);
    }

    #[test]
    fn unserved_exits_are_typed_errors() {
        let (mut p, _) = peripherals();
        let e = handle_exit(&mut p, VcpuExit::IoOut(0x1234, &[0])).unwrap_err();
        assert!(matches!(
            e,
            VcpuError::UnknownPort { port: 0x1234, size: 1, access: Access::Write, exit_index: ExitIndex(1) }
        ));
        assert!(e.is_guest_fault());
        let mut b = [0u8; 8];
        let e = handle_exit(&mut p, VcpuExit::MmioRead(0xdead_0000, &mut b)).unwrap_err();
        assert!(matches!(e, VcpuError::UnknownMmio { addr: 0xdead_0000, size: 8, .. }));
        assert!(matches!(handle_exit(&mut p, VcpuExit::Shutdown), Err(VcpuError::TripleFault { .. })));
        assert!(matches!(handle_exit(&mut p, VcpuExit::FailEntry(7, 0)), Err(VcpuError::FailEntry { reason: 7, .. })));
        assert!(matches!(handle_exit(&mut p, VcpuExit::Unknown), Err(VcpuError::UnexpectedExit { .. })));
    }
}
