//! Record a guest's run on one VM, replay the log on a second VM: the
//! replay takes every input at the same exit, every digest matches, the
//! suppressed outputs equal the released ones, and at the end both VMs'
//! memory and vCPU state are byte-for-byte equal.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use replication::log::LogShared;
use replication::output_rule;
use replication::record::{LogPosition, Record};
use replication::recorder::Recorder;
use replication::replayer::Replayer;
use replication::suppressed::{HeldOutputs, Output, Suppressor};
use vm_memory::{Bytes, GuestAddress};
use vmm::hook::{ExitIndex, HookError, InputSource, OutputSink};
use vmm::vcpu::RunOutcome;
use vmm::world::LiveInput;
use vmm::{BootSettings, Vm, VmConfig};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl OutputSink for Capture {
    fn serial(&mut self, _: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(())
    }
}

fn config(guest: &str) -> VmConfig {
    VmConfig {
        memory_mib: 8,
        elf: guest_images::find(guest).unwrap().elf.to_vec(),
        boot: BootSettings::default(),
        privilege: vmm::boot::Privilege::User,
        digest_every: Some(5),
        test_devices: false,
    }
}

fn memory_of(vm: &Vm) -> Vec<u8> {
    let mut m = vec![0u8; 8 << 20];
    vm.memory().read_slice(&mut m, GuestAddress(0)).unwrap();
    m
}

#[test]
fn kvm_replay_of_a_recorded_run_is_identical() {
    if !vmm::testing::kvm_available() {
        return;
    }
    // Primary: live inputs recorded; outputs gated; a "link" thread ships
    // records to the secondary's queue and acks them at once.
    let log = Arc::new(LogShared::default());
    let released = Capture::default();
    let (gate, releaser) = output_rule::gate(released.clone(), log.clone());
    let (tx, rx) = crossbeam_channel::unbounded::<Record>();
    let link_log = log.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let link_done = done.clone();
    let link = std::thread::spawn(move || loop {
        let (first, records, _) = link_log.take();
        let n = records.len() as u64;
        for r in records {
            tx.send(r).unwrap();
        }
        if n > 0 {
            link_log.set_acked(LogPosition(first.0 + n - 1));
        } else if link_log.acked().is_none() {
            link_log.set_acked(LogPosition(0));
        }
        if link_done.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        link_log.wait_flush(Duration::from_millis(1));
    });
    let releaser = Arc::new(releaser);
    let rel_thread = releaser.clone();
    let rel = std::thread::spawn(move || rel_thread.run());
    let rec_log = log.clone();
    let mut primary = Vm::new(
        &config("devices"),
        move |stop| Box::new(Recorder::new(LiveInput::new(0, vec![stop.wake_fd()]), rec_log)) as Box<dyn InputSource>,
        Box::new(gate),
    )
    .unwrap();
    let outcome = primary.run().unwrap();
    assert!(matches!(outcome, RunOutcome::PoweredOff { status: 0, .. }), "{outcome:?}");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    log.request_flush();
    link.join().unwrap();
    // Let the releaser drain, then stop it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while released.0.lock().unwrap().as_slice() != b"devices ok\n" && std::time::Instant::now() < deadline {
        log.wait_changed(Duration::from_millis(10));
    }
    assert_eq!(released.0.lock().unwrap().as_slice(), b"devices ok\n");

    // Secondary: the same guest from the log; outputs suppressed and held.
    let held = Arc::new(HeldOutputs::default());
    let position = Arc::new(AtomicU64::new(0));
    let replay_pos = position.clone();
    let mut secondary = Vm::new(
        &config("devices"),
        move |stop| Box::new(Replayer::new(rx, stop.clone(), replay_pos)) as Box<dyn InputSource>,
        Box::new(Suppressor::new(held.clone(), position.clone())),
    )
    .unwrap();
    let replayed = secondary.run().unwrap();
    assert_eq!(replayed, outcome, "the replay ended elsewhere");
    assert_eq!(position.load(std::sync::atomic::Ordering::SeqCst), log.appended().0, "not every record was consumed");
    let suppressed: Vec<u8> = held
        .drain()
        .into_iter()
        .flat_map(|(_, o)| match o {
            Output::Serial(b) => b,
            Output::Frame(_) => Vec::new(),
        })
        .collect();
    assert_eq!(suppressed, b"devices ok\n", "the secondary's guest produced other output");
    assert_eq!(primary.vcpu_state().unwrap(), secondary.vcpu_state().unwrap(), "vCPU state differs");
    assert!(memory_of(&primary) == memory_of(&secondary), "guest memory differs");
    releaser.stop();
    rel.join().unwrap().unwrap();
}

/// Run `guest` to its end on live inputs, recording; every record.
fn record_whole_run(guest: &str) -> Vec<Record> {
    let log = Arc::new(LogShared::default());
    let (gate, _releaser) = output_rule::gate(Capture::default(), log.clone());
    let rec_log = log.clone();
    let mut primary = Vm::new(
        &config(guest),
        move |stop| Box::new(Recorder::new(LiveInput::new(0, vec![stop.wake_fd()]), rec_log)) as Box<dyn InputSource>,
        Box::new(gate),
    )
    .unwrap();
    primary.run().unwrap();
    log.take().1
}

#[test]
fn kvm_a_nondeterministic_guest_is_reported_as_diverged_within_one_digest_interval() {
    if !vmm::testing::kvm_available() {
        return;
    }
    let records = record_whole_run("rdtsc");
    assert!(records.iter().any(|r| matches!(r, Record::Digest { .. })), "no digests recorded");
    let (tx, rx) = crossbeam_channel::unbounded();
    for r in records {
        tx.send(r).unwrap();
    }
    drop(tx);

    let position = Arc::new(AtomicU64::new(0));
    let p = position.clone();
    let mut secondary = Vm::new(
        &config("rdtsc"),
        move |stop| Box::new(Replayer::new(rx, stop.clone(), p)) as Box<dyn InputSource>,
        Box::new(Suppressor::new(Arc::new(HeldOutputs::default()), position)),
    )
    .unwrap();
    let err = secondary.run().expect_err("a guest that executes RDTSC replayed without divergence");
    let text = format!("{err:?}");
    match err {
        vmm::VmError::Vcpu(vmm::vcpu::VcpuError::Hook {
            source: HookError::Diverged { exit_index, expected, found },
            ..
        }) => {
            // The first RDTSC value is stored right after the first clock
            // reading (exits 1-2): the digest at exit 5 must already see it.
            assert!(exit_index.0 <= 5, "divergence found only at exit {exit_index}");
            assert!(expected.starts_with("digest") && found.starts_with("digest"), "{expected} / {found}");
            assert_ne!(expected.replace("at exit", ""), found, "both sides' views should differ");
        }
        _ => panic!("not a divergence: {text}"),
    }
}

#[test]
fn kvm_go_live_mid_run_finishes_the_guest_on_live_inputs() {
    if !vmm::testing::kvm_available() {
        return;
    }
    use replication::go_live::{Decision, LiveWorld, SwitchInput, SwitchOutput};
    // Record a whole run, then give the secondary only its first half: the
    // primary "died" there.
    let records = record_whole_run("devices");
    let half = records.len() / 2;
    assert!(half > 3);
    let (tx, rx) = crossbeam_channel::unbounded();
    for r in records.into_iter().take(half) {
        tx.send(r).unwrap();
    }
    drop(tx);
    let (decide, decisions) = crossbeam_channel::bounded(1);
    decide.send(Decision::GoLive).unwrap();

    let held = Arc::new(HeldOutputs::default());
    let position = Arc::new(AtomicU64::new(0));
    let went_live = Arc::new(AtomicU64::new(0));
    let live_out = Capture::default();
    let (output, slot) = SwitchOutput::new(held.clone(), position.clone());
    let (p, h, w, lo) = (position.clone(), held.clone(), went_live.clone(), live_out.clone());
    let mut secondary = Vm::new(
        &config("devices"),
        move |stop| {
            let wake = stop.wake_fd();
            let attach = Box::new(move |clock: u64| {
                Ok(LiveWorld { input: Box::new(LiveInput::new(clock, vec![wake])), output: Box::new(lo) })
            });
            Box::new(SwitchInput::new(Replayer::new(rx, stop.clone(), p), decisions, attach, slot, h, stop.clone(), w))
                as Box<dyn InputSource>
        },
        Box::new(output),
    )
    .unwrap();
    let outcome = secondary.run().unwrap();
    assert!(matches!(outcome, RunOutcome::PoweredOff { status: 0, .. }), "{outcome:?}");
    let at = went_live.load(std::sync::atomic::Ordering::SeqCst);
    assert!(at > 0, "never went live");
    assert_eq!(position.load(std::sync::atomic::Ordering::SeqCst), half as u64, "went live before the log's end");
    // The guest checked its own clock across the switch and printed ok.
    assert_eq!(live_out.0.lock().unwrap().as_slice(), b"devices ok\n");
}
