//! `ftvm-bench exits`: guest exits per second through ftvm's exit path,
//! beside a bare KVM_RUN loop running the same guest in the same run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_ioctls::VcpuExit;
use vmm::boot::Privilege;
use vmm::hook::{ExitIndex, HookError, OutputSink};
use vmm::vcpu::RunOutcome;
use vmm::world::LiveInput;
use vmm::{BootSettings, Vm, VmConfig};

/// Exit rate of this machine's KVM, used only to size a run to about the
/// requested duration.
const CALIBRATION_EXITS_PER_SEC: u64 = 140_000;

/// Discards serial output: the loop guests print nothing on the hot path.
struct Discard;
impl OutputSink for Discard {
    fn serial(&mut self, _: ExitIndex, _: &[u8]) -> Result<(), HookError> {
        Ok(())
    }
}

fn loop_vm(guest: &str, count: u64) -> Result<Vm> {
    let image = guest_images::find(guest).with_context(|| format!("benchmark guest {guest} is not embedded"))?;
    let config = VmConfig {
        memory_mib: 16,
        elf: image.elf.to_vec(),
        boot: BootSettings { params: vec![("count".into(), count.to_string())], ..Default::default() },
        privilege: if image.kernel_mode { Privilege::Kernel } else { Privilege::User },
        digest_every: None,
        test_devices: true,
    };
    let vm = Vm::new(&config, |_| Box::new(LiveInput::new(0, Vec::new())), Box::new(Discard))?;
    Ok(vm)
}

/// The full exit path: bus dispatch, exit counting, input-source hook.
fn vmm_path(guest: &str, count: u64) -> Result<(u64, Duration)> {
    let mut vm = loop_vm(guest, count)?;
    let start = Instant::now();
    let outcome = vm.run()?;
    let elapsed = start.elapsed();
    match outcome {
        RunOutcome::PoweredOff { status: 0, exit_index } => Ok((exit_index.0, elapsed)),
        other => bail!("benchmark guest {guest} ended with {other:?}"),
    }
}

/// A minimal KVM_RUN loop written for the benchmark: the same guest in the
/// same VM setup, but every exit is only counted.
fn bare_loop(guest: &str, count: u64) -> Result<(u64, Duration)> {
    let mut vm = loop_vm(guest, count)?;
    let fd = vm.vcpu_mut().fd_mut();
    let mut exits = 0u64;
    let start = Instant::now();
    loop {
        match fd.run().context("KVM_RUN in the bare loop")? {
            VcpuExit::IoOut(port, _) if port == ftvm_abi::POWER_PORT => break,
            VcpuExit::MmioWrite(addr, _) if addr == ftvm_abi::PIO_WINDOW_BASE + u64::from(ftvm_abi::POWER_PORT) => {
                break
            }
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) | VcpuExit::MmioWrite(..) | VcpuExit::MmioRead(..) => {}
            other => bail!("bare loop: unexpected exit {other:?}"),
        }
        exits += 1;
    }
    Ok((exits + 1, start.elapsed()))
}

/// One measured figure.
#[derive(Clone, Copy, serde::Serialize)]
pub struct Rate {
    exits: u64,
    seconds: f64,
    exits_per_sec: f64,
}

impl Rate {
    fn new((exits, elapsed): (u64, Duration)) -> Rate {
        let seconds = elapsed.as_secs_f64();
        Rate { exits, seconds, exits_per_sec: exits as f64 / seconds }
    }
}

/// Results of `ftvm-bench exits`.
#[derive(serde::Serialize)]
pub struct ExitsReport {
    rounds: u32,
    pio_vmm: Rate,
    pio_bare: Rate,
    mmio_vmm: Rate,
    mmio_bare: Rate,
    /// Cost per exit of the VMM path over the bare loop, minus one.
    pio_overhead: f64,
    mmio_overhead: f64,
}

fn best(rates: &[Rate]) -> Rate {
    // The least disturbed run is the fastest: the machine is shared.
    *rates.iter().max_by(|a, b| a.exits_per_sec.total_cmp(&b.exits_per_sec)).expect("at least one round")
}

/// `ftvm-bench exits`: guest exits per second through the VMM's full exit
/// path beside a bare KVM_RUN loop, for PIO and MMIO, alternating runs.
pub fn exits(seconds: u64, rounds: u32, json: bool) -> Result<()> {
    let count = CALIBRATION_EXITS_PER_SEC.saturating_mul(seconds.max(1)) / 2;
    let rounds = rounds.max(1);
    let (mut pv, mut pb, mut mv, mut mb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        if !json {
            eprintln!("round {round}/{rounds}: {count} exits per run, 4 runs");
        }
        pb.push(Rate::new(bare_loop("pio-loop", count)?));
        pv.push(Rate::new(vmm_path("pio-loop", count)?));
        mb.push(Rate::new(bare_loop("mmio-loop", count)?));
        mv.push(Rate::new(vmm_path("mmio-loop", count)?));
    }
    let (pio_vmm, pio_bare, mmio_vmm, mmio_bare) = (best(&pv), best(&pb), best(&mv), best(&mb));
    let report = ExitsReport {
        rounds,
        pio_vmm,
        pio_bare,
        mmio_vmm,
        mmio_bare,
        pio_overhead: pio_bare.exits_per_sec / pio_vmm.exits_per_sec - 1.0,
        mmio_overhead: mmio_bare.exits_per_sec / mmio_vmm.exits_per_sec - 1.0,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("guest exits per second (best of {rounds} rounds, same process, same machine)");
    println!();
    println!("{:<6} {:>16} {:>16} {:>12} {:>10}", "exit", "ftvm exit path", "bare KVM_RUN", "µs/exit ftvm", "overhead");
    for (name, v, b, o) in
        [("PIO", pio_vmm, pio_bare, report.pio_overhead), ("MMIO", mmio_vmm, mmio_bare, report.mmio_overhead)]
    {
        println!(
            "{:<6} {:>16.0} {:>16.0} {:>12.2} {:>9.1}%",
            name,
            v.exits_per_sec,
            b.exits_per_sec,
            1e6 / v.exits_per_sec,
            o * 100.0
        );
    }
    println!();
    println!("target: overhead at most 10% (cost per exit of the ftvm path over the bare loop)");
    Ok(())
}
