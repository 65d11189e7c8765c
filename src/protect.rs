//! `ftvm primary` and `ftvm secondary`: the wiring of the `pair` crate's
//! sessions to a KVM guest built from the command line's settings, and the
//! mapping of how a session ended to an exit status.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use pair::{
    FailoverConfig, PrimaryConfig, PrimaryEnd, PrimarySession, SecondaryConfig, SecondaryEnd, SecondarySession,
};
use replication::channel::ChannelConfig;
use replication::frame::GuestIdentity;
use replication::key::SharedKey;
use sha2::{Digest, Sha256};
use vmm::world::{LiveInput, LiveOutput};
use vmm::{Vm, VmConfig};

use crate::config::{GuestSettings, PairConfig};
use crate::exit::EXIT_LOST_ARBITER;

/// What the sessions need from PAIR-OPTS.
impl PairConfig {
    /// Failover, when there is an arbiter; without one a pair process that
    /// loses its peer stops (nothing can rule out two live copies).
    fn failover(&self) -> Option<FailoverConfig> {
        self.arbiter.as_ref().map(|a| {
            let mut f = FailoverConfig::new(a.clone(), Duration::from_millis(self.heartbeat_ms), self.dead_after);
            f.max_lag = Duration::from_millis(self.max_lag_ms);
            f.adaptive = self.adaptive;
            f
        })
    }

    fn channel(&self, elf: &[u8], settings: &GuestSettings) -> Result<ChannelConfig> {
        let key = SharedKey::from_file(&self.key_file)?;
        Ok(ChannelConfig::new(key, identity(elf, settings)))
    }

    /// `--control`, or /run/ftvm/NAME.sock.
    fn control_for(&self, name: &str) -> PathBuf {
        crate::control_path(self.control.as_deref(), name)
    }
}

/// The guest settings both hosts must agree on, as the handshake compares
/// them: image digest, memory size, and a digest of the guest-visible
/// settings (MAC, IP, gateway, params, whether it has a NIC).
pub fn identity(elf: &[u8], settings: &GuestSettings) -> GuestIdentity {
    let image: [u8; 32] = Sha256::digest(elf).into();
    let canonical = format!(
        "mac={:02x?};ip={:?};gateway={:?};params={:?};nic={}",
        settings.mac,
        settings.ip,
        settings.gateway,
        settings.params,
        settings.tap.is_some()
    );
    let config: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
    GuestIdentity { image, memory_bytes: settings.memory_mib << 20, config }
}

/// `ftvm status`: read a pair process's control socket.
pub fn status(control: &Path, json: bool) -> Result<()> {
    let v = pair::control::query(control)?;
    if json {
        println!("{v}");
    } else {
        print!("{}", pair::control::human(&v));
    }
    Ok(())
}

/// Write the final vCPU state and all guest memory to `path` (tests compare
/// the primary's and the secondary's byte for byte).
fn dump_state(vm: &mut Vm, memory_mib: u64, path: &Path) -> Result<()> {
    use vm_memory::Bytes;
    let vcpu = vm.vcpu_state().context("cannot read the final vCPU state")?;
    let mut mem = vec![0u8; usize::try_from(memory_mib << 20)?];
    vm.memory().read_slice(&mut mem, vm_memory::GuestAddress(0)).context("cannot read guest memory")?;
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&vmm::state::encode(vmm::digest::VcpuState::VERSION, &vcpu))?;
    f.write_all(&mem)?;
    Ok(())
}

/// `ftvm primary`.
pub fn primary(
    settings: &GuestSettings,
    config: VmConfig,
    tap: Option<Arc<vmm::tap::Tap>>,
    serial: Box<dyn Write + Send>,
    pair: &PairConfig,
    metrics: Option<crate::metrics::Endpoint>,
) -> Result<i32> {
    // Caught from here: a signal while the pair forms and the VM is made is
    // kept for the VM, not lost.
    let signals = crate::catch_signals()?;
    let mut session_config = PrimaryConfig::new(&settings.name, &pair.address, pair.channel(&config.elf, settings)?);
    session_config.failover = pair.failover();
    session_config.control = Some(pair.control_for(&settings.name));
    let mut output = LiveOutput::new(serial);
    if let Some(t) = &tap {
        output = output.with_tap(t.clone());
    }
    let (session, gate) = PrimarySession::start(session_config, Box::new(output))?;
    if let Some(m) = metrics {
        m.serve(session.board())?;
    }
    let input = |stop: &vmm::vcpu::StopHandle| {
        let live = LiveInput::new(0, vec![stop.wake_fd()]);
        session.input(match tap {
            Some(t) => live.with_tap(t),
            None => live,
        })
    };
    let mut vm = Vm::new(&config, input, gate).with_context(|| format!("cannot start guest {}", settings.name))?;
    session.running(vm.stop_handle());
    let caught = signals.stop(&vm)?;
    let outcome = vm.run();
    let exit = vm.exit_index();
    match session.finish(exit)? {
        PrimaryEnd::LostArbiter => {
            eprintln!(
                "ftvm: primary {}: lost the arbiter: the secondary went live; stopped at guest exit #{exit} without releasing anything",
                settings.name
            );
            return Ok(EXIT_LOST_ARBITER);
        }
        PrimaryEnd::SecondaryLost(e) => {
            if let Some(path) = &pair.state_dump {
                dump_state(&mut vm, config.memory_mib, path)?;
            }
            return Err(anyhow!(e).context(format!(
                "primary {}: the secondary is lost and there is no --arbiter, so the guest stopped at guest exit #{exit}",
                settings.name
            )));
        }
        PrimaryEnd::Finished => {}
    }
    if let Some(path) = &pair.state_dump {
        dump_state(&mut vm, config.memory_mib, path)?;
    }
    crate::finish(settings, outcome, &caught)
}

/// `ftvm secondary`: the guest's NIC is attached (the device state must
/// match the primary's) but its TAP is opened only at go-live.
pub fn secondary(
    settings: &GuestSettings,
    config: VmConfig,
    serial: Box<dyn Write + Send>,
    pair: &PairConfig,
    ack_delay: Duration,
    metrics: Option<crate::metrics::Endpoint>,
) -> Result<i32> {
    let signals = crate::catch_signals()?;
    let mut session_config = SecondaryConfig::new(&settings.name, &pair.address, pair.channel(&config.elf, settings)?);
    session_config.failover = pair.failover();
    session_config.control = Some(pair.control_for(&settings.name));
    session_config.ack_delay = ack_delay;
    let session = SecondarySession::accept(session_config)?;
    if let Some(m) = metrics {
        m.serve(session.board())?;
    }
    // Opened now, so that the bridge forwards on it by go-live; written to
    // only after go-live.
    // Opened at go-live: until then a primary on the same host may hold it.
    let tap = settings.tap.clone().map_or(pair::live::LiveTap::None, pair::live::LiveTap::Later);
    let (input, output) = session.hooks(pair::live::tap_world(tap, settings.mac, settings.ip, serial));
    let mut vm = Vm::new(&config, input, output).with_context(|| format!("cannot start guest {}", settings.name))?;
    let caught = signals.stop(&vm)?;
    let outcome = vm.run();
    if let Some(path) = &pair.state_dump {
        dump_state(&mut vm, config.memory_mib, path)?;
    }
    let (name, exit) = (&settings.name, vm.exit_index());
    let end = session.finish(outcome);
    let signal = caught.load(std::sync::atomic::Ordering::SeqCst);
    if signal != 0 && !matches!(end, SecondaryEnd::WentLive(_)) {
        eprintln!("ftvm: secondary {name}: stopped by signal {signal} at guest exit #{exit}");
        return Ok(crate::exit::EXIT_SIGNAL_BASE + signal);
    }
    match end {
        SecondaryEnd::WentLive(outcome) | SecondaryEnd::Guest(outcome) => crate::finish(settings, outcome, &caught),
        SecondaryEnd::LostArbiter => {
            eprintln!("ftvm: secondary {name}: the primary is unreachable but holds the arbiter; stopped at guest exit #{exit}");
            Ok(EXIT_LOST_ARBITER)
        }
        SecondaryEnd::ArbiterUnreachable(e) => {
            // A claim that fails is never a win: as for a lost claim, status 4.
            eprintln!(
                "ftvm: secondary {name}: the primary is lost but the arbiter cannot be reached ({e}), so this copy stopped at guest exit #{exit} without going live"
            );
            Ok(EXIT_LOST_ARBITER)
        }
        SecondaryEnd::PrimaryStopped => {
            eprintln!("ftvm: secondary {name}: the primary stopped; replayed to guest exit #{exit}");
            Ok(0)
        }
        SecondaryEnd::PrimaryLost(e) => Err(anyhow!(e).context(format!(
            "secondary {name}: primary lost; no --arbiter, so this copy stops (replayed to guest exit #{exit})"
        ))),
        SecondaryEnd::Diverged(e) => Err(anyhow!(e).context(format!("secondary {name}: replay diverged"))),
    }
}
