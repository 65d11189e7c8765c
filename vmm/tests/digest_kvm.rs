//! State digests on real KVM: the same guest fed the same inputs gives the
//! same digests at the same exits (what lets a secondary check it replays
//! the primary exactly), and different inputs give different digests.

use std::sync::{Arc, Mutex};

use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, HookError, InputSource, OutputSink, Wake};
use vmm::vcpu::RunOutcome;
use vmm::{BootSettings, Vm, VmConfig};

type Digests = Arc<Mutex<Vec<(ExitIndex, StateDigest)>>>;

/// Inputs from a script: the clock advances `step` ns per reading, entropy
/// is a counter from `seed`; halts return at once. Records every digest.
struct Scripted {
    now: u64,
    step: u64,
    seed: u8,
    digests: Digests,
}

impl InputSource for Scripted {
    fn clock_ns(&mut self, _: ExitIndex) -> Result<u64, HookError> {
        self.now += self.step;
        Ok(self.now)
    }
    fn entropy(&mut self, _: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        for b in buf {
            self.seed = self.seed.wrapping_mul(31).wrapping_add(7);
            *b = self.seed;
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

struct Quiet;
impl OutputSink for Quiet {
    fn serial(&mut self, _: ExitIndex, _: &[u8]) -> Result<(), HookError> {
        Ok(())
    }
}

fn run(seed: u8, step: u64) -> (Vec<(ExitIndex, StateDigest)>, vmm::digest::VcpuState) {
    let config = VmConfig {
        memory_mib: 8,
        elf: guest_images::find("devices").unwrap().elf.to_vec(),
        boot: BootSettings::default(),
        privilege: vmm::boot::Privilege::User,
        digest_every: Some(3),
        test_devices: false,
    };
    let digests: Digests = Arc::default();
    let d = digests.clone();
    let mut vm =
        Vm::new(&config, move |_| Box::new(Scripted { now: 0, step, seed, digests: d }), Box::new(Quiet)).unwrap();
    assert!(matches!(vm.run().unwrap(), RunOutcome::PoweredOff { status: 0, .. }));
    let state = vm.vcpu_state().unwrap();
    let v = digests.lock().unwrap().clone();
    (v, state)
}

#[test]
fn kvm_same_inputs_same_digests_different_inputs_different_digests() {
    if !vmm::testing::kvm_available() {
        return;
    }
    let (a, state_a) = run(1, 7_000_000);
    let (b, state_b) = run(1, 7_000_000);
    assert!(a.len() > 5, "too few digest points: {}", a.len());
    assert!(a.iter().all(|(e, _)| e.0 % 3 == 0), "digests off their points");
    assert_eq!(a, b, "the same execution gave different digests");
    assert_eq!(state_a, state_b);
    // Memory digests see guest writes: not all equal to the empty hash.
    let distinct: std::collections::HashSet<u64> = a.iter().map(|(_, d)| d.memory).collect();
    assert!(distinct.len() > 1, "memory digests never changed");

    // A slower clock makes the guest's 20 ms sleep loop go round more often.
    let (c, _) = run(1, 3_000_000);
    assert_ne!(a, c, "different clock readings left every digest unchanged");
}
