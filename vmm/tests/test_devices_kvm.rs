//! The test device is on a VM's buses only when its config asks for it: a
//! production VM answers the test device's port and MMIO slot like any other
//! unmapped address (the guest stops with an unknown-access fault), a
//! benchmark VM serves them.

use vmm::hook::{Access, ExitIndex, HookError, OutputSink};
use vmm::vcpu::{RunOutcome, VcpuError};
use vmm::world::LiveInput;
use vmm::{BootSettings, Vm, VmConfig, VmError};

struct Quiet;
impl OutputSink for Quiet {
    fn serial(&mut self, _: ExitIndex, _: &[u8]) -> Result<(), HookError> {
        Ok(())
    }
}

/// Run the loop guest `guest` for 3 iterations.
fn run(guest: &str, test_devices: bool) -> Result<RunOutcome, VmError> {
    let image = guest_images::find(guest).expect("loop guests are embedded");
    let config = VmConfig {
        memory_mib: 8,
        elf: image.elf.to_vec(),
        boot: BootSettings { params: vec![("count".into(), "3".into())], ..Default::default() },
        privilege: if image.kernel_mode { vmm::boot::Privilege::Kernel } else { vmm::boot::Privilege::User },
        digest_every: None,
        test_devices,
    };
    let mut vm = Vm::new(&config, |_| Box::new(LiveInput::new(0, Vec::new())), Box::new(Quiet))?;
    vm.run()
}

#[test]
fn kvm_a_production_vm_has_no_test_device_on_its_pio_bus() {
    if !vmm::testing::kvm_available() {
        return;
    }
    match run("pio-loop", false) {
        Err(VmError::Vcpu(e @ VcpuError::UnknownPort { port, access: Access::Write, .. })) => {
            assert_eq!(port, ftvm_abi::TESTDEV_PORT);
            assert!(e.is_guest_fault());
        }
        other => panic!("pio-loop without test devices: expected an unknown-port fault, got {other:?}"),
    }
    assert!(matches!(run("pio-loop", true), Ok(RunOutcome::PoweredOff { status: 0, .. })));
}

#[test]
fn kvm_a_production_vm_has_no_test_device_on_its_mmio_bus() {
    if !vmm::testing::kvm_available() {
        return;
    }
    match run("mmio-loop", false) {
        Err(VmError::Vcpu(VcpuError::UnknownMmio { addr, access: Access::Write, .. })) => {
            assert_eq!(addr, ftvm_abi::TESTDEV_MMIO_ADDR);
        }
        other => panic!("mmio-loop without test devices: expected an unknown-MMIO fault, got {other:?}"),
    }
    assert!(matches!(run("mmio-loop", true), Ok(RunOutcome::PoweredOff { status: 0, .. })));
}
