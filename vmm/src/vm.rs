//! A KVM virtual machine ready to run: guest memory in one memslot, the
//! guest ELF loaded, boot structures written, one vCPU in long mode with the
//! fixed CPUID, and the devices on their buses.

use std::io::Cursor;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ftvm_abi::{BootParams, KERNEL_LOAD_ADDR, MAX_MEMORY_MIB, MIN_MEMORY_MIB, PARAMS_LEN};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot;
use crate::bus::{Bus, BusError};
use crate::checkpoint::{CheckpointError, CheckpointSlot, Checkpointer, GuestSettings, MachineState};
use crate::cpuid;
use crate::devices::{clock, entropy, halt, health, power, pvpanic, serial, testdev, timer};
use crate::digest::{DigestError, DirtyPages, VcpuState};
use crate::dirty::DirtyLog;
use crate::hook::{ExitIndex, InputSource, OutputSink};
use crate::memory::GuestMem;
use crate::vcpu::{Digester, Peripherals, RunOutcome, StopHandle, Vcpu, VcpuError};

/// What a VM is made of.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB, from guest-physical 0.
    pub memory_mib: u64,
    /// The guest: a static x86_64 ELF linked at `KERNEL_LOAD_ADDR`.
    pub elf: Vec<u8>,
    /// Network settings and `--param` values for the boot-parameter block.
    pub boot: BootSettings,
    /// The privilege level the guest starts at.
    pub privilege: boot::Privilege,
    /// Compute a state digest every this many exits (and log dirty pages
    /// for it); `None`: no digests.
    pub digest_every: Option<u64>,
    /// Put the test device ([`testdev`]) on both buses, at
    /// [`ftvm_abi::TESTDEV_PORT`] and [`ftvm_abi::TESTDEV_MMIO_ADDR`]: only
    /// for the benchmark and test guests that hammer it. `false` for every
    /// production VM, where those addresses are unmapped like any other.
    pub test_devices: bool,
}

/// The guest-visible settings written into the boot-parameter block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootSettings {
    /// The NIC's MAC. `Some` gives the guest a virtio-net NIC at
    /// `VIRTIO_MMIO_BASE`; its frames come through the input source and
    /// leave through the output sink.
    pub mac: Option<[u8; 6]>,
    /// Address and prefix length.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// `--param` pairs, in order.
    pub params: Vec<(String, String)>,
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something ftvm needs.
    #[error("this host's KVM lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed while setting the VM up.
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Memory size outside the accepted range.
    #[error("guest memory of {mib} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB")]
    MemorySize { mib: u64 },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The guest image is not a loadable ELF.
    #[error("the guest image is not a loadable x86_64 ELF linked at {KERNEL_LOAD_ADDR:#x} within guest memory")]
    Load(#[source] linux_loader::loader::Error),
    /// The `--param` values do not fit the boot-parameter block.
    #[error("the --param values take {len} bytes, more than the {PARAMS_LEN} the boot-parameter block holds")]
    ParamsTooLong { len: usize },
    /// Writing the boot structures failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The CPUID template cannot be used on this host.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// Devices could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Setting up the vCPU's stop handle failed.
    #[error("cannot set up the vCPU stop handle")]
    StopHandle(#[source] std::io::Error),
    /// Installing the vCPU kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// The vCPU thread could not be started.
    #[error("cannot start the vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The vCPU thread panicked (a bug in ftvm, never the guest's doing).
    #[error("the vCPU thread panicked")]
    VcpuPanicked,
    /// The vCPU stopped with an error.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Taking or applying a checkpoint failed.
    #[error(transparent)]
    Checkpoint(CheckpointError),
}

impl VmError {
    /// True when the guest caused the error.
    pub fn is_guest_fault(&self) -> bool {
        matches!(self, VmError::Vcpu(e) if e.is_guest_fault())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Build the boot-parameter block for `mem_size` bytes and `settings`.
pub fn boot_params(mem_size: u64, settings: &BootSettings) -> Result<BootParams, VmError> {
    let mut bp = BootParams::new(mem_size);
    if let Some(mac) = settings.mac {
        bp.mac = mac;
        bp.has_net = 1;
    }
    if let Some((ip, prefix)) = settings.ip {
        bp.ip = ip.octets();
        bp.ip_prefix = prefix;
    }
    if let Some(gw) = settings.gateway {
        bp.gateway = gw.octets();
    }
    let mut encoded = Vec::new();
    for (k, v) in &settings.params {
        encoded.extend_from_slice(k.as_bytes());
        encoded.push(b'=');
        encoded.extend_from_slice(v.as_bytes());
        encoded.push(0);
    }
    let too_long = VmError::ParamsTooLong { len: encoded.len() };
    let dst = bp.params.get_mut(..encoded.len()).ok_or(too_long)?;
    dst.copy_from_slice(&encoded);
    // Bounded by PARAMS_LEN just above.
    bp.params_len = u32::try_from(encoded.len()).map_err(|_| VmError::ParamsTooLong { len: encoded.len() })?;
    Ok(bp)
}

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: the vCPU before the VM fd before /dev/kvm.
    vcpu: Vcpu,
    stop: StopHandle,
    slot: Arc<CheckpointSlot>,
    dirty: DirtyLog,
    mem: GuestMem,
    _vm: Arc<VmFd>,
    _kvm: Kvm,
}

impl Vm {
    /// Create the VM, load the guest, and attach the devices. Inputs come
    /// from the source `input` builds (it gets the VM's stop handle, whose
    /// [`StopHandle::wake_fd`] a live source's HLT sleep must wait on);
    /// outputs go to `output`.
    pub fn new(
        config: &VmConfig,
        input: impl FnOnce(&StopHandle) -> Box<dyn InputSource>,
        output: Box<dyn OutputSink>,
    ) -> Result<Vm, VmError> {
        let vm = Vm::build(config, None, input, output)?;
        let mem_size = config.memory_mib << 20;
        let loaded = Elf::load(&vm.mem, None, &mut Cursor::new(&config.elf), Some(GuestAddress(KERNEL_LOAD_ADDR)))
            .map_err(VmError::Load)?;
        let params = boot_params(mem_size, &config.boot)?;
        boot::write_boot_structures(&vm.mem, &params)?;
        let fd = vm.vcpu.fd();
        let sregs = fd.get_sregs().map_err(kvm_err("read the vCPU's special registers"))?;
        fd.set_sregs(&boot::long_mode_sregs(sregs, config.privilege)).map_err(kvm_err("enter long mode"))?;
        fd.set_fpu(&boot::entry_fpu()).map_err(kvm_err("set the FPU state"))?;
        fd.set_regs(&boot::entry_regs(loaded.kernel_load.0)).map_err(kvm_err("set the entry registers"))?;
        // Loading the image wrote through the VMM's bitmap: not guest
        // writes, and already in every copy (the image and boot block).
        let mut vm = vm;
        vm.vcpu
            .rebase_digests()
            .map_err(|e| VmError::Vcpu(VcpuError::Digest { exit_index: ExitIndex(0), source: e }))?;
        vm.dirty.clear().map_err(|e| VmError::Checkpoint(e.into()))?;
        Ok(vm)
    }

    /// Build a VM from a checkpoint: `state` (from
    /// [`Vm::checkpoint`] or a live [`Checkpointer`] request, possibly on
    /// another host) and `mem`, guest memory holding the checkpoint's pages
    /// ([`crate::checkpoint::new_memory`], [`crate::checkpoint::write_page`]). The VM
    /// carries on from the checkpoint's exit index.
    pub fn restore(
        state: &MachineState,
        mem: GuestMem,
        input: impl FnOnce(&StopHandle) -> Box<dyn InputSource>,
        output: Box<dyn OutputSink>,
    ) -> Result<Vm, VmError> {
        let config = state.settings.config();
        let mut vm = Vm::build(&config, Some(mem), input, output)?;
        vm.vcpu.restore(state).map_err(VmError::Checkpoint)?;
        let exit_index = state.exit_index;
        vm.vcpu.rebase_digests().map_err(|source| VmError::Vcpu(VcpuError::Digest { exit_index, source }))?;
        vm.dirty.clear().map_err(|e| VmError::Checkpoint(e.into()))?;
        Ok(vm)
    }

    /// The VM's state now, which must not be running (after [`Vm::run`]
    /// returned). Guest memory is [`Vm::memory`].
    pub fn checkpoint(&mut self) -> Result<MachineState, VmError> {
        self.vcpu.save_stopped().map_err(VmError::Checkpoint)
    }

    /// Asks this VM for live checkpoints while it runs (a state transfer).
    pub fn checkpointer(&self) -> Checkpointer {
        Checkpointer { slot: self.slot.clone() }
    }

    /// Everything but the boot: KVM, memory (`mem`, or fresh zeroed memory),
    /// the vCPU with ftvm's CPUID, devices, dirty log.
    fn build(
        config: &VmConfig,
        mem: Option<GuestMem>,
        input: impl FnOnce(&StopHandle) -> Box<dyn InputSource>,
        output: Box<dyn OutputSink>,
    ) -> Result<Vm, VmError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
            return Err(VmError::MemorySize { mib: config.memory_mib });
        }
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [(Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"), (Cap::UserMemory, "KVM_CAP_USER_MEMORY")] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        let mem_size = config.memory_mib << 20;
        let mem_len = usize::try_from(mem_size).map_err(|_| VmError::MemorySize { mib: config.memory_mib })?;
        let mem = match mem {
            Some(mem) => {
                let given: u64 = mem.iter().map(|r| r.len()).sum();
                if given != mem_size || mem.num_regions() != 1 {
                    return Err(VmError::MemorySize { mib: given >> 20 });
                }
                mem
            }
            None => GuestMem::from_ranges(&[(GuestAddress(0), mem_len)])
                .map_err(|source| VmError::Memory { mib: config.memory_mib, source })?,
        };
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_bindings::kvm_userspace_memory_region {
                // One region: slot 0 (KVM refuses a slot number it lacks).
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: if config.digest_every.is_some() { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the host range [userspace_addr, +memory_size) is the
            // region's own anonymous mapping, which `mem` keeps alive; `mem`
            // is stored in the returned Vm next to the VmFd and dropped only
            // after it (field order), so the mapping outlives the memslot.
            unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("register guest memory"))?;
        }

        let fd = vm.create_vcpu(0).map_err(kvm_err("create the vCPU"))?;
        fd.set_cpuid2(&cpuid::build(&kvm)?).map_err(kvm_err("set the vCPU's CPUID"))?;

        let run_size = kvm.get_vcpu_mmap_size().map_err(kvm_err("report the kvm_run size"))?;
        let stop = StopHandle::new(&fd, run_size).map_err(VmError::StopHandle)?;
        crate::vcpu::install_kick_handler().map_err(VmError::Signal)?;

        let (pio, mut mmio, deadline) = devices(config.test_devices)?;
        if let Some(mac) = config.boot.mac {
            let net = crate::devices::virtio_net::VirtioNet::new(mem.clone(), mac);
            mmio.insert(ftvm_abi::VIRTIO_MMIO_BASE, crate::devices::virtio_net::LEN, Box::new(net))?;
        }
        let input = input(&stop);
        let peripherals = Peripherals { pio, mmio, deadline, input, output, exit_index: ExitIndex(0) };
        let digests = config.digest_every.filter(|n| *n > 0);
        let dirty = DirtyLog::new(vm.clone(), mem.clone(), config.digest_every.is_some());
        let digester = digests.map(|every| Digester { every, dirty: DirtyPages::new(dirty.clone()) });
        let slot = CheckpointSlot::new(GuestSettings::of(config), dirty.clone(), stop.clone());
        Ok(Vm {
            vcpu: Vcpu::new(fd, peripherals, stop.clone(), digester, slot.clone()),
            stop,
            slot,
            dirty,
            mem,
            _vm: vm,
            _kvm: kvm,
        })
    }

    /// Stops this VM's vCPU from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// The vCPU, for the benchmark's bare loop. Only with the `bench`
    /// feature: nothing else may run the vCPU around the exit loop.
    #[cfg(feature = "bench")]
    pub fn vcpu_mut(&mut self) -> &mut Vcpu {
        &mut self.vcpu
    }

    /// The vCPU's registers now (after [`Vm::run`] returned: where it stopped).
    pub fn vcpu_state(&self) -> Result<VcpuState, DigestError> {
        VcpuState::read(self.vcpu.fd())
    }

    /// Guest exits so far.
    pub fn exit_index(&self) -> ExitIndex {
        self.vcpu.exit_index()
    }

    /// Run the guest on its own vCPU thread until it powers off, faults, or
    /// is stopped; the calling thread waits.
    pub fn run(&mut self) -> Result<RunOutcome, VmError> {
        let outcome = std::thread::scope(|s| {
            let vcpu = &mut self.vcpu;
            let thread = std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn_scoped(s, move || vcpu.run())
                .map_err(VmError::Thread)?;
            thread.join().map_err(|_| VmError::VcpuPanicked)
        })?;
        Ok(outcome?)
    }
}

/// The standard devices: PIO bus, MMIO bus, and the timer's deadline handle.
/// The test device goes on both buses only when `test_devices` is set.
fn devices(test_devices: bool) -> Result<(Bus, Bus, timer::TimerDeadline), BusError> {
    use ftvm_abi as abi;
    let mut pio = Bus::new();
    let timer_dev = timer::Timer::new();
    let deadline = timer_dev.deadline_handle();
    pio.insert(u64::from(abi::COM1_PORT), u64::from(abi::COM1_LEN), Box::new(serial::Serial::new()))?;
    pio.insert(u64::from(abi::PVPANIC_PORT), pvpanic::LEN, Box::new(pvpanic::PvPanic::new()))?;
    pio.insert(u64::from(abi::CLOCK_LO_PORT), clock::LEN, Box::new(clock::Clock::new()))?;
    pio.insert(u64::from(abi::ENTROPY_PORT), entropy::LEN, Box::new(entropy::Entropy::new()))?;
    pio.insert(u64::from(abi::TIMER_LO_PORT), timer::LEN, Box::new(timer_dev))?;
    pio.insert(u64::from(abi::HEALTH_PORT), health::LEN, Box::new(health::Health::new()))?;
    pio.insert(u64::from(abi::POWER_PORT), power::LEN, Box::new(power::Power::new()))?;
    pio.insert(u64::from(abi::HALT_PORT), halt::LEN, Box::new(halt::Halt::new()))?;
    let mut mmio = Bus::new();
    if test_devices {
        pio.insert(u64::from(abi::TESTDEV_PORT), testdev::PIO_LEN, Box::new(testdev::TestDev::new()))?;
        mmio.insert(abi::TESTDEV_MMIO_ADDR, testdev::MMIO_LEN, Box::new(testdev::TestDev::new()))?;
    }
    Ok((pio, mmio, deadline))
}
