//! Checkpoints on real KVM: a guest stopped at an exit, checkpointed,
//! encoded, decoded and restored into a fresh VM (fresh memory, no image)
//! carries on exactly as the original would have: the same console output,
//! the same digests at the same exits, the same final registers and memory.
//! A live checkpoint asked for from another thread while the guest runs
//! gives the same result.

use std::sync::{Arc, Mutex};

use vm_memory::Bytes;
use vmm::checkpoint::{self, MachineState};
use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, HookError, InputSource, OutputSink, Wake};
use vmm::vcpu::{RunOutcome, StopHandle};
use vmm::{BootSettings, Vm, VmConfig};

type Digests = Arc<Mutex<Vec<(ExitIndex, StateDigest)>>>;

/// Inputs that depend only on the exit index (so a restored VM's source
/// needs no state): the clock is 3 ms per exit, entropy a hash of the exit.
/// Stops the VM at `stop_at` if set. Records digests.
struct Scripted {
    stop_at: Option<(u64, StopHandle)>,
    digests: Digests,
}

impl InputSource for Scripted {
    fn on_exit(&mut self, exit: ExitIndex, _: &vmm::hook::ExitKind) -> Result<(), HookError> {
        if let Some((at, stop)) = &self.stop_at {
            if exit.0 == *at {
                stop.stop();
            }
        }
        Ok(())
    }
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        Ok(exit.0 * 3_000_000)
    }
    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (exit.0.wrapping_mul(2654435761).wrapping_add(i as u64) >> 3) as u8;
        }
        Ok(())
    }
    fn halt(&mut self, _: ExitIndex, _: Option<u64>) -> Result<Wake, HookError> {
        Ok(Wake::Deadline)
    }
    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        self.digests.lock().unwrap().push((exit, *digest));
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);
impl OutputSink for Console {
    fn serial(&mut self, _: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(())
    }
}

fn config() -> VmConfig {
    VmConfig {
        memory_mib: 8,
        elf: guest_images::find("devices").unwrap().elf.to_vec(),
        boot: BootSettings { params: vec![("x".into(), "y".into())], ..BootSettings::default() },
        privilege: vmm::boot::Privilege::User,
        digest_every: Some(3),
        test_devices: false,
    }
}

/// XXH3 over all of guest memory.
fn memory_hash(vm: &Vm) -> u64 {
    let mem = vm.memory();
    let mut all = vec![0u8; 8 << 20];
    mem.read_slice(&mut all, vm_memory::GuestAddress(0)).unwrap();
    xxhash_rust::xxh3::xxh3_64(&all)
}

struct Outcome {
    console: Vec<u8>,
    digests: Vec<(ExitIndex, StateDigest)>,
    regs: vmm::digest::VcpuState,
    memory: u64,
    end: RunOutcome,
}

fn finish(mut vm: Vm, console: Console, digests: Digests) -> Outcome {
    let end = vm.run().unwrap();
    Outcome {
        console: console.0.lock().unwrap().clone(),
        digests: digests.lock().unwrap().clone(),
        regs: vm.vcpu_state().unwrap(),
        memory: memory_hash(&vm),
        end,
    }
}

fn reference() -> Outcome {
    let (console, digests) = (Console::default(), Digests::default());
    let d = digests.clone();
    let vm = Vm::new(&config(), move |_| Box::new(Scripted { stop_at: None, digests: d }), Box::new(console.clone()))
        .unwrap();
    finish(vm, console, digests)
}

/// The checkpoint's pages copied into fresh memory, as a receiver would.
fn copy_memory(state: &MachineState, from: &Vm) -> vmm::memory::GuestMem {
    let pages = (state.settings.memory_mib << 20) as usize / 4096;
    // Before anything reads all of memory (a read maps the zero page).
    let touched = checkpoint::touched_pages(from.memory(), pages).expect("pagemap is readable");
    let nonzero = checkpoint::nonzero_pages(from.memory(), pages).unwrap();
    assert!(nonzero.count() > 0 && nonzero.count() < pages, "{} of {pages} pages non-zero", nonzero.count());
    // The host-backed pages (pagemap) cover every non-zero page, and not
    // the whole of memory.
    assert!(nonzero.iter().all(|p| touched.is_set(p)), "a non-zero page was not host-backed");
    assert!(touched.count() < pages, "every page is host-backed");
    let mem = checkpoint::new_memory(&state.settings).unwrap();
    let mut buf = vec![0u8; 4096];
    for page in nonzero.iter() {
        let addr = page as u64 * 4096;
        checkpoint::read_page(from.memory(), addr, &mut buf).unwrap();
        checkpoint::write_page(&mem, state.settings.memory_mib, addr, &buf).unwrap();
    }
    mem
}

/// Restore `state` (through its encoding) with `mem` and run to the end.
fn resume(state: &MachineState, mem: vmm::memory::GuestMem) -> Outcome {
    let blob = state.encode();
    let state = MachineState::decode(&blob).unwrap();
    let (console, digests) = (Console::default(), Digests::default());
    let d = digests.clone();
    let vm =
        Vm::restore(&state, mem, move |_| Box::new(Scripted { stop_at: None, digests: d }), Box::new(console.clone()))
            .unwrap();
    assert_eq!(vm.exit_index(), state.exit_index);
    finish(vm, console, digests)
}

fn assert_carries_on(reference: &Outcome, at: ExitIndex, before: &[u8], after: &Outcome) {
    assert!(matches!(reference.end, RunOutcome::PoweredOff { status: 0, .. }), "{:?}", reference.end);
    assert_eq!(after.end, reference.end, "the restored guest ended differently");
    let mut console = before.to_vec();
    console.extend_from_slice(&after.console);
    assert_eq!(String::from_utf8_lossy(&console), String::from_utf8_lossy(&reference.console));
    let later: Vec<_> = reference.digests.iter().filter(|(e, _)| *e > at).cloned().collect();
    assert!(later.len() > 3, "too few digests after the checkpoint: {}", later.len());
    assert_eq!(after.digests, later, "digests after the checkpoint differ");
    assert_eq!(after.regs, reference.regs, "final registers differ");
    assert_eq!(after.memory, reference.memory, "final memory differs");
}

#[test]
fn kvm_checkpoint_of_a_stopped_guest_restores_into_a_fresh_vm_and_carries_on() {
    if !vmm::testing::kvm_available() {
        return;
    }
    let reference = reference();
    let total = reference.digests.last().unwrap().0 .0;
    // Several stop points, each a digest point (multiple of 3).
    for at in [3, total / 3 / 3 * 3, total / 2 / 3 * 3] {
        let (console, digests) = (Console::default(), Digests::default());
        let d = digests.clone();
        let mut vm = Vm::new(
            &config(),
            move |stop| Box::new(Scripted { stop_at: Some((at, stop.clone())), digests: d }),
            Box::new(console.clone()),
        )
        .unwrap();
        assert_eq!(vm.run().unwrap(), RunOutcome::Stopped { exit_index: ExitIndex(at) });
        let state = vm.checkpoint().unwrap();
        assert_eq!(state.exit_index, ExitIndex(at));
        assert!(!state.vcpu.msrs.is_empty(), "no MSR saved");
        let mem = copy_memory(&state, &vm);
        let before = console.0.lock().unwrap().clone();
        drop(vm);
        let after = resume(&state, mem);
        assert_carries_on(&reference, ExitIndex(at), &before, &after);
    }
}

#[test]
fn kvm_live_checkpoint_while_the_guest_runs_carries_on_identically() {
    if !vmm::testing::kvm_available() {
        return;
    }
    let reference = reference();
    let (console, digests) = (Console::default(), Digests::default());
    let d = digests.clone();
    let mut vm =
        Vm::new(&config(), move |_| Box::new(Scripted { stop_at: None, digests: d }), Box::new(console.clone()))
            .unwrap();
    let checkpointer = vm.checkpointer();
    // Follow writes from the start; the first round is a full pass.
    checkpointer.dirty().start_transfer().unwrap();
    let pages = checkpointer.dirty().pages();
    let first = checkpoint::nonzero_pages(checkpointer.memory(), pages).unwrap();
    let shadow = checkpoint::new_memory(checkpointer.settings()).unwrap();
    let mut buf = vec![0u8; 4096];
    for page in first.iter() {
        checkpoint::read_page(checkpointer.memory(), page as u64 * 4096, &mut buf).unwrap();
        checkpoint::write_page(&shadow, 8, page as u64 * 4096, &buf).unwrap();
    }
    let marked_at = Arc::new(Mutex::new(None));
    let reply = {
        let (marked_at, digests) = (marked_at.clone(), digests.clone());
        checkpointer.request_marked(Box::new(move || {
            // On the vCPU thread at the checkpoint: the digest just made is
            // the checkpoint's own.
            let last = digests.lock().unwrap().last().map(|(e, _)| e.0);
            *marked_at.lock().unwrap() = last;
            77
        }))
    };
    let live = std::thread::scope(|s| {
        let runner = s.spawn(|| vm.run().unwrap());
        let live = reply.recv().expect("the vCPU answers").expect("the live checkpoint succeeds");
        let end = runner.join().unwrap();
        assert_eq!(end, reference.end);
        live
    });
    assert_eq!(live.state.exit_index.0 % 3, 0, "a live checkpoint of a digesting VM falls on a digest point");
    assert_eq!(live.mark, 77);
    assert_eq!(
        *marked_at.lock().unwrap(),
        Some(live.state.exit_index.0),
        "the mark ran elsewhere than at the checkpoint"
    );
    for (addr, data) in live.pages.iter().zip(live.data.chunks_exact(4096)) {
        checkpoint::write_page(&shadow, 8, *addr, data).unwrap();
    }
    let after = resume(&live.state, shadow);
    let at = live.state.exit_index;
    let later: Vec<_> = reference.digests.iter().filter(|(e, _)| *e > at).cloned().collect();
    assert_eq!(after.digests, later, "digests after the live checkpoint differ");
    assert_eq!(after.regs, reference.regs);
    assert_eq!(after.memory, reference.memory);
    assert!(reference.console.ends_with(&after.console), "the restored copy printed what the original did not");
}

#[test]
fn kvm_a_corrupted_or_mismatched_checkpoint_is_refused() {
    if !vmm::testing::kvm_available() {
        return;
    }
    let (console, digests) = (Console::default(), Digests::default());
    let d = digests.clone();
    let mut vm = Vm::new(
        &config(),
        move |stop| Box::new(Scripted { stop_at: Some((6, stop.clone())), digests: d }),
        Box::new(console.clone()),
    )
    .unwrap();
    vm.run().unwrap();
    let state = vm.checkpoint().unwrap();
    let mut blob = state.encode();
    let last = blob.len() - 1;
    blob[last] ^= 1;
    assert!(MachineState::decode(&blob).is_err(), "a flipped byte was accepted");
    assert!(MachineState::decode(&blob[..blob.len() / 2]).is_err(), "a truncated blob was accepted");
    // Another device set (the test devices on the buses): refused.
    let mut other = MachineState::decode(&state.encode()).unwrap();
    other.settings.test_devices = true;
    let mem = checkpoint::new_memory(&other.settings).unwrap();
    let e = Vm::restore(
        &other,
        mem,
        |_| Box::new(Scripted { stop_at: None, digests: Digests::default() }),
        Box::new(Console::default()),
    );
    assert!(e.is_err(), "a checkpoint of other devices was applied");
    // Pages that do not fit are refused.
    let mem = checkpoint::new_memory(&state.settings).unwrap();
    assert!(checkpoint::write_page(&mem, 8, 8 << 20, &[0; 4096]).is_err());
    assert!(checkpoint::write_page(&mem, 8, 4095, &[0; 4096]).is_err());
    assert!(checkpoint::write_page(&mem, 8, 0, &[0; 100]).is_err());
    assert!(state.settings.check_matches(&other.settings).is_err());
}

#[test]
fn kvm_a_guest_with_a_nic_restores_with_its_device_state() {
    if !vmm::testing::kvm_available() {
        return;
    }
    // kvstore drives its virtio-net NIC (queues in guest memory, the
    // device's own state): a copy restored mid-run must agree with the
    // original at every digest up to where both are stopped.
    let config = VmConfig {
        memory_mib: 32,
        elf: guest_images::find("kvstore").unwrap().elf.to_vec(),
        boot: BootSettings {
            mac: Some([0x52, 0x54, 0, 0, 0, 9]),
            ip: Some(("10.9.0.2".parse().unwrap(), 24)),
            ..BootSettings::default()
        },
        privilege: vmm::boot::Privilege::User,
        digest_every: Some(3),
        test_devices: false,
    };
    let (end_at, at) = (3000, 1500);
    let run_to = |stop_at: u64| {
        let digests = Digests::default();
        let d = digests.clone();
        let mut vm = Vm::new(
            &config,
            move |stop| Box::new(Scripted { stop_at: Some((stop_at, stop.clone())), digests: d }),
            Box::new(Console::default()),
        )
        .unwrap();
        assert_eq!(vm.run().unwrap(), RunOutcome::Stopped { exit_index: ExitIndex(stop_at) });
        (vm, digests)
    };
    let (_, reference) = run_to(end_at);
    let (mut vm, _) = run_to(at);
    let state = vm.checkpoint().unwrap();
    assert!(state.devices.iter().any(|d| d.name == "virtio-net"), "{:?}", state.devices);
    let mem = copy_memory(&state, &vm);
    drop(vm);
    let digests = Digests::default();
    let d = digests.clone();
    let mut copy = Vm::restore(
        &state,
        mem,
        move |stop| Box::new(Scripted { stop_at: Some((end_at, stop.clone())), digests: d }),
        Box::new(Console::default()),
    )
    .unwrap();
    assert_eq!(copy.run().unwrap(), RunOutcome::Stopped { exit_index: ExitIndex(end_at) });
    let later: Vec<_> = reference.lock().unwrap().iter().filter(|(e, _)| e.0 > at).cloned().collect();
    assert_eq!(later.len(), ((end_at - at) / 3) as usize);
    assert_eq!(*digests.lock().unwrap(), later, "the restored NIC guest diverged");
}
