//! The hang watchdog on a real KVM guest: `spin` prints, then loops
//! forever without a single exit; the watchdog sees the vCPU inside
//! KVM_RUN past `--hang-ms` and stops it with a `hang` fault.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pair::health::{HealthConfig, Source};
use pair::Health;
use replication::record::FaultKind;
use vmm::hook::{ExitIndex, HookError, OutputSink};
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

#[test]
fn kvm_a_guest_spinning_without_exits_is_a_hang() {
    if !vmm::testing::kvm_available() {
        return;
    }
    let config = VmConfig {
        memory_mib: 8,
        elf: guest_images::find("spin").unwrap().elf.to_vec(),
        boot: BootSettings::default(),
        privilege: vmm::boot::Privilege::User,
        digest_every: None,
        test_devices: false,
    };
    let health =
        Health::new(HealthConfig { deadline: None, hang: Some(Duration::from_millis(300)), ..HealthConfig::default() });
    let serial = Capture::default();
    let h = health.clone();
    let input = move |stop: &vmm::vcpu::StopHandle| -> Box<dyn vmm::hook::InputSource> {
        Box::new(h.input(LiveInput::new(0, vec![stop.wake_fd()])))
    };
    let mut vm = Vm::new(&config, input, Box::new(health.sink(serial.clone()))).unwrap();
    health.arm();
    health.watch(vm.stop_handle()).unwrap();
    let outcome = vm.run();
    assert!(matches!(outcome, Ok(RunOutcome::Stopped { .. })), "the watchdog stops the guest: {outcome:?}");
    let f = health.fault().expect("a hang");
    assert_eq!((f.kind, f.source), (FaultKind::Hang, Source::HangWatchdog));
    assert!(f.reaction >= Duration::from_millis(300), "{:?}", f.reaction);
    assert!(String::from_utf8_lossy(&serial.0.lock().unwrap()).contains("spinning"));
}
