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

use crate::config::{GuestSettings, PairConfig, Probe};
use crate::exit::{EXIT_FAULT_ESCALATED, EXIT_LOST_ARBITER};
use pair::health::{FaultAction, LanConfig, ProbeConfig, ProbeTarget};
use pair::{Health, HealthConfig, OnFault, OutputMode};

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

    /// Application health from the health flags.
    fn health(&self, settings: &GuestSettings) -> Result<Arc<Health>> {
        let h = &self.health;
        let ms = |n: u64| (n > 0).then(|| Duration::from_millis(n));
        let probe = match &h.probe {
            None => None,
            Some(p) => Some(ProbeConfig {
                target: match p {
                    Probe::Tcp(port) => {
                        let (ip, _) =
                            settings.ip.ok_or_else(|| anyhow!("--probe tcp:{port} needs the guest's --ip"))?;
                        ProbeTarget::Tcp(std::net::SocketAddr::new(ip.into(), *port))
                    }
                    Probe::Exec(command) => ProbeTarget::Exec(command.clone()),
                },
                interval: Duration::from_millis(h.probe_interval_ms),
                timeout: Duration::from_millis(h.probe_timeout_ms),
                failures: h.probe_failures,
            }),
        };
        let lan = h.uplink.as_ref().map(|uplink| LanConfig {
            uplink: Some(uplink.clone()),
            gateway: settings.gateway,
            interval: Duration::from_millis(h.probe_interval_ms),
            failures: h.probe_failures,
        });
        Ok(Health::new(HealthConfig {
            containment: h.containment,
            deadline: ms(h.health_deadline_ms),
            hang: ms(h.hang_ms),
            on_fault: if h.on_fault_restart { OnFault::Restart } else { OnFault::Stop },
            fault_window: Duration::from_millis(h.fault_window_ms),
            output_mode: if h.strict { OutputMode::Strict } else { OutputMode::Fast },
            probe,
            lan,
        }))
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

/// `ftvm switchover`: ask the primary at `control` for a planned
/// switchover and wait for the answer: 0 once the other copy is live, an
/// error (status 1) with the reason otherwise.
pub fn switchover(control: &Path, json: bool) -> Result<i32> {
    let v = pair::control::request(control, "switchover", pair::control::SWITCHOVER_WAIT)?;
    let ok = v.get("ok").and_then(|b| b.as_bool()).unwrap_or(false);
    if json {
        println!("{v}");
    }
    if !ok {
        let why = v.get("error").and_then(|e| e.as_str()).unwrap_or("the primary refused");
        return Err(anyhow!("switchover refused: {why}"));
    }
    if !json {
        println!(
            "switched over at guest exit #{}: the other copy is live, {:.2} ms after this guest stopped; this copy becomes its standby",
            v.get("exit").and_then(|e| e.as_u64()).unwrap_or(0),
            v.get("pause_ms").and_then(|p| p.as_f64()).unwrap_or(0.0)
        );
    }
    Ok(0)
}

/// How long the old primary of a switchover waits for the new primary's
/// logging channel before it waits for a transfer instead.
const REJOIN_WAIT: Duration = Duration::from_secs(30);

/// After a planned switchover handed this copy's guest away: its stopped
/// VM, at the switch's exit, becomes the new primary's secondary with no
/// transfer: a replayer built from the same memory and the state at that
/// exit, waiting on `--switch-listen` (a primary) or `--listen` (a
/// secondary that had become the primary) for the log from the new
/// primary's go-live on. If that log does not come, it waits there as a
/// standby for a transfer.
fn after_switchover(
    settings: &GuestSettings,
    serial: SharedSerial,
    pair: &PairConfig,
    switched: pair::switchover::Switched,
    mut vm: Vm,
) -> Result<i32> {
    let pair::switchover::Switched { event, listener, identity, board } = switched;
    let listen = pair.switch_listen.clone().ok_or_else(|| anyhow!("switched over without a --switch-listen"))?;
    let mut own = pair.clone();
    own.address = listen.clone();
    // The state at the switch's exit, and its memory; the VM itself goes
    // (nothing of it runs again).
    let state = vm.checkpoint().context("cannot read the stopped guest's state")?;
    let memory = vm.memory().clone();
    drop(vm);
    // Its pages are the restored VM's starting point for the digests.
    vmm::checkpoint::reuse_memory(&memory);
    let Some(listener) = listener else {
        return standby_after(settings, Box::new(serial), &own, Duration::ZERO, None, Some(event), 0);
    };
    let signals = crate::catch_signals()?;
    let key = SharedKey::from_file(&pair.key_file)?;
    let mut session_config = SecondaryConfig::new(&settings.name, &listen, ChannelConfig::new(key, identity));
    session_config.failover = pair.failover();
    session_config.control = Some(pair.control_for(&settings.name));
    let health = pair.health(settings)?;
    session_config.health = Some(health.clone());
    let accepted = SecondarySession::accept_switched(session_config, board, listener, state.exit_index, REJOIN_WAIT);
    let session = match accepted {
        Ok(session) => session,
        Err(e) if e.is::<pair::NoPrimary>() => {
            eprintln!("ftvm: {}: {e}: waiting for a transfer instead", settings.name);
            return standby_after(settings, Box::new(serial), &own, Duration::ZERO, None, Some(event), 0);
        }
        Err(e) => return Err(e),
    };
    let guest = state.settings.clone();
    let tap = settings.tap.clone().map_or(pair::live::LiveTap::None, pair::live::LiveTap::Later);
    let mac = guest.mac.unwrap_or(settings.mac);
    let kept = pair::live::KeptTap::default();
    let (input, output) =
        session.hooks(pair::live::tap_world_kept(tap, mac, guest.ip, Box::new(serial.clone()), kept.clone()));
    let vm = Vm::restore(&state, memory, input, output)
        .with_context(|| format!("cannot rebuild guest {} at the switch's exit", settings.name))?;
    let config = guest.config();
    run_secondary(settings, &config, vm, session, serial, &health, &own, signals, kept)
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
    start: Start,
) -> Result<i32> {
    // Caught from here: a signal while the pair forms and the VM is made is
    // kept for the VM, not lost.
    let signals = crate::catch_signals()?;
    let serial = SharedSerial::new(serial);
    let health = pair.health(settings)?;
    let mut session_config = primary_config(settings, &config, pair, &health)?;
    session_config.control = Some(pair.control_for(&settings.name));
    let mut output = LiveOutput::new(Box::new(serial.clone()));
    if let Some(t) = &tap {
        output = output.with_tap(t.clone());
    }
    let (session, gate) = match start {
        Start::Paired => PrimarySession::start(session_config, Box::new(output))?,
        Start::Unprotected(ownership) => {
            PrimarySession::start_unprotected(session_config, Box::new(output), ownership)?
        }
    };
    if let Some(m) = metrics {
        m.serve(session.board())?;
    }
    match run_session(settings, &config, tap, serial.clone(), pair, session, gate, signals)? {
        Ended::Exit(code) => Ok(code),
        Ended::Faulted { outcome, board, tap, .. } => {
            on_fault(settings, &config, tap, serial, &health, &board, &outcome, pair)
        }
    }
}

/// A primary session's settings from the pair's: the channel, failover,
/// health, spares and switchover address.
fn primary_config(
    settings: &GuestSettings,
    config: &VmConfig,
    pair: &PairConfig,
    health: &Arc<Health>,
) -> Result<PrimaryConfig> {
    let mut pc = PrimaryConfig::new(&settings.name, &pair.address, pair.channel(&config.elf, settings)?);
    pc.failover = pair.failover();
    pc.health = Some(health.clone());
    pc.standby = pair.standby.clone();
    pc.switch_listen = pair.switch_listen.clone();
    Ok(pc)
}

/// How a primary session's guest ended.
enum Ended {
    /// With this exit status.
    Exit(i32),
    /// In a guest fault this copy keeps (it could not hand it over):
    /// `--on-fault` decides, with the session's board and the TAP.
    Faulted {
        outcome: Result<vmm::vcpu::RunOutcome, vmm::VmError>,
        board: Arc<pair::Board>,
        tap: Option<Arc<vmm::tap::Tap>>,
        /// The signal that stopped the guest meanwhile (0: none).
        signal: i32,
    },
}

/// Run a primary session's guest (`gate`: the session's output sink) and
/// map how the session ended to an exit status, or to a fault it keeps.
#[allow(clippy::too_many_arguments)]
fn run_session(
    settings: &GuestSettings,
    config: &VmConfig,
    tap: Option<Arc<vmm::tap::Tap>>,
    serial: SharedSerial,
    pair: &PairConfig,
    session: PrimarySession,
    gate: Box<dyn vmm::hook::OutputSink>,
    signals: crate::CaughtSignals,
) -> Result<Ended> {
    let input = |stop: &vmm::vcpu::StopHandle| {
        let live = LiveInput::new(0, vec![stop.wake_fd()]);
        session.input(match tap.clone() {
            Some(t) => live.with_tap(t),
            None => live,
        })
    };
    let mut vm = Vm::new(config, input, gate).with_context(|| format!("cannot start guest {}", settings.name))?;
    session.running(vm.stop_handle());
    session.repair_with(vm.checkpointer())?;
    let caught = signals.stop(&vm)?;
    let outcome = vm.run();
    let exit = vm.exit_index();
    let board = session.board();
    match session.finish_outcome(exit, &outcome)? {
        PrimaryEnd::HandedOver(fault) => {
            eprintln!(
                "ftvm: primary {}: guest fault ({}, seen by {}) at guest exit #{exit}: handed over to the secondary, which goes live from the last healthy point; released nothing more",
                settings.name,
                fault.kind,
                fault.source.as_str()
            );
            return Ok(Ended::Exit(EXIT_LOST_ARBITER));
        }
        PrimaryEnd::Faulted(_) => {
            let signal = caught.load(std::sync::atomic::Ordering::SeqCst);
            return Ok(Ended::Faulted { outcome, board, tap, signal });
        }
        PrimaryEnd::SwitchedOver(switched) => {
            // Never run again as the primary: the other copy is live. The
            // TAP goes (a later go-live opens it again).
            drop(tap);
            drop(caught);
            return after_switchover(settings, serial, pair, switched, vm).map(Ended::Exit);
        }
        PrimaryEnd::LostArbiter => {
            eprintln!(
                "ftvm: primary {}: lost the arbiter: the secondary went live; stopped at guest exit #{exit} without releasing anything",
                settings.name
            );
            return Ok(Ended::Exit(EXIT_LOST_ARBITER));
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
    crate::finish(settings, outcome, &caught).map(Ended::Exit)
}

/// How a primary starts.
pub enum Start {
    /// Paired: it waits for its secondary (`ftvm primary`).
    Paired,
    /// Alone (`--unprotected-start` with `--standby`), holding the
    /// arbiter's claim if there is an arbiter: it re-protects itself onto
    /// a spare as a primary that lost its secondary does.
    Unprotected(Option<pair::failover::Ownership>),
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
    let serial = SharedSerial::new(serial);
    let health = pair.health(settings)?;
    session_config.health = Some(health.clone());
    let session = SecondarySession::accept(session_config)?;
    if let Some(m) = metrics {
        m.serve(session.board())?;
    }
    // Opened now, so that the bridge forwards on it by go-live; written to
    // only after go-live.
    // Opened at go-live: until then a primary on the same host may hold it.
    let tap = settings.tap.clone().map_or(pair::live::LiveTap::None, pair::live::LiveTap::Later);
    let kept = pair::live::KeptTap::default();
    let (input, output) = session.hooks(pair::live::tap_world_kept(
        tap,
        settings.mac,
        settings.ip,
        Box::new(serial.clone()),
        kept.clone(),
    ));
    let vm = Vm::new(&config, input, output).with_context(|| format!("cannot start guest {}", settings.name))?;
    run_secondary(settings, &config, vm, session, serial, &health, pair, signals, kept)
}

/// `ftvm secondary` without guest settings: a standby. It waits for a
/// primary that runs alone to send the guest's state (a live transfer; the
/// guest's settings, identity and name arrive with it), builds the VM from
/// that state, and then replays the log from the transfer's checkpoint on,
/// as any secondary. `settings`: this host's own flags (`--tap`, `--name`
/// for the control socket, `--serial`); the guest's come from the primary.
pub fn standby(
    settings: &GuestSettings,
    serial: Box<dyn Write + Send>,
    pair: &PairConfig,
    ack_delay: Duration,
    metrics: Option<crate::metrics::Endpoint>,
) -> Result<i32> {
    standby_after(settings, serial, pair, ack_delay, metrics, None, 0)
}

/// [`standby`], with the switchover that made this process one, if any,
/// and the divergences it healed by becoming one (shown in its status).
fn standby_after(
    settings: &GuestSettings,
    serial: Box<dyn Write + Send>,
    pair: &PairConfig,
    ack_delay: Duration,
    metrics: Option<crate::metrics::Endpoint>,
    switched: Option<pair::status::SwitchoverEvent>,
    diverged: u64,
) -> Result<i32> {
    let signals = crate::catch_signals()?;
    let key = SharedKey::from_file(&pair.key_file)?;
    // Replaced by the identity the transfer carries.
    let unknown = GuestIdentity { image: [0; 32], memory_bytes: 0, config: [0; 32] };
    let mut session_config = SecondaryConfig::new(&settings.name, &pair.address, ChannelConfig::new(key, unknown));
    session_config.failover = pair.failover();
    session_config.control = Some(pair.control_for(&settings.name));
    session_config.ack_delay = ack_delay;
    let serial = SharedSerial::new(serial);
    let health = pair.health(settings)?;
    session_config.health = Some(health.clone());
    let (session, received) = SecondarySession::accept_transfer(session_config, None)?;
    if let Some(event) = switched {
        session.board().switched(event);
    }
    for _ in 0..diverged {
        session.board().count_divergence();
    }
    if let Some(m) = metrics {
        m.serve(session.board())?;
    }
    let guest = received.state.settings.clone();
    if guest.mac.is_some() && settings.tap.is_none() {
        eprintln!(
            "ftvm: secondary {}: the guest has a NIC but this standby has no --tap: after a go-live it is cut off",
            settings.name
        );
    }
    let tap = settings.tap.clone().map_or(pair::live::LiveTap::None, pair::live::LiveTap::Later);
    let mac = guest.mac.unwrap_or(settings.mac);
    let kept = pair::live::KeptTap::default();
    let (input, output) =
        session.hooks(pair::live::tap_world_kept(tap, mac, guest.ip, Box::new(serial.clone()), kept.clone()));
    let vm = Vm::restore(&received.state, received.memory, input, output)
        .with_context(|| format!("cannot build guest {} from the transferred state", settings.name))?;
    let config = guest.config();
    let mut own = settings.clone();
    own.memory_mib = guest.memory_mib;
    own.ip = guest.ip;
    own.gateway = guest.gateway;
    own.mac = mac;
    run_secondary(&own, &config, vm, session, serial, &health, pair, signals, kept)
}

/// Run a secondary's guest (replay, then live after a go-live) and map how
/// the session ended to an exit status.
#[allow(clippy::too_many_arguments)]
fn run_secondary(
    settings: &GuestSettings,
    config: &VmConfig,
    mut vm: Vm,
    session: SecondarySession,
    serial: SharedSerial,
    health: &Arc<Health>,
    pair: &PairConfig,
    signals: crate::CaughtSignals,
    kept: pair::live::KeptTap,
) -> Result<i32> {
    session.repair_with(vm.checkpointer(), pair.standby.clone());
    let caught = signals.stop(&vm)?;
    let outcome = vm.run();
    if let Some(path) = &pair.state_dump {
        dump_state(&mut vm, config.memory_mib, path)?;
    }
    let (name, exit) = (&settings.name, vm.exit_index());
    let board = session.board();
    let end = session.finish_at(exit, outcome);
    let signal = caught.load(std::sync::atomic::Ordering::SeqCst);
    if signal != 0 && !matches!(end, SecondaryEnd::WentLive(_)) {
        eprintln!("ftvm: secondary {name}: stopped by signal {signal} at guest exit #{exit}");
        return Ok(crate::exit::EXIT_SIGNAL_BASE + signal);
    }
    match end {
        SecondaryEnd::WentLive(outcome)
            if health.containment() && (pair::health::classify(&outcome).is_some() || health.fault().is_some()) =>
        {
            // The live copy faulted and has nobody to hand over to. Its VM
            // goes first; a restart goes on with the TAP opened at go-live.
            drop(vm);
            let tap = match (kept.get(), &settings.tap) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(name)) => Some(Arc::new(
                    vmm::tap::Tap::open(name).with_context(|| format!("cannot attach to TAP device {name}"))?,
                )),
                (None, None) => None,
            };
            on_fault(settings, config, tap, serial, health, &board, &outcome, pair)
        }
        SecondaryEnd::WentLive(outcome) | SecondaryEnd::Guest(outcome) => crate::finish(settings, outcome, &caught),
        SecondaryEnd::HandedOver(fault) => {
            eprintln!(
                "ftvm: {name}: guest fault ({}, seen by {}) at guest exit #{exit}: handed over to the secondary that re-protected this copy, which goes live from the last healthy point; released nothing more",
                fault.kind,
                fault.source.as_str()
            );
            Ok(EXIT_LOST_ARBITER)
        }
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
        SecondaryEnd::Diverged(e) if pair.failover().is_some() => {
            // Healed, not only reported: this copy's state is worthless,
            // the primary (which now runs alone, having won the arbiter)
            // re-protects itself by a fresh transfer onto whatever waits at
            // its --standby addresses. This process becomes one, on its own
            // --listen, so a primary that names it there (the cluster
            // agents do) heals the pair without an operator.
            eprintln!(
                "ftvm: secondary {name}: replay diverged at guest exit #{exit} ({:#}); healing: waiting on {} as a standby for a fresh transfer",
                anyhow!(e),
                pair.address
            );
            drop(kept);
            drop(caught);
            drop(vm);
            standby_after(settings, Box::new(serial), pair, Duration::ZERO, None, None, board.snapshot().divergences)
        }
        SecondaryEnd::Diverged(e) => Err(anyhow!(e).context(format!("secondary {name}: replay diverged"))),
        SecondaryEnd::SwitchedOver(switched) => {
            // Never run again as the primary: the other copy is live. The
            // TAP opened at go-live goes (a later go-live opens it again).
            drop(kept);
            drop(caught);
            after_switchover(settings, serial, pair, switched, vm)
        }
    }
}

/// The serial console, shared by a guest and the guest booted again after a
/// fault (`--on-fault restart`).
#[derive(Clone)]
struct SharedSerial(Arc<std::sync::Mutex<Box<dyn Write + Send>>>);

impl SharedSerial {
    fn new(w: Box<dyn Write + Send>) -> SharedSerial {
        SharedSerial(Arc::new(std::sync::Mutex::new(w)))
    }
}

impl Write for SharedSerial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).flush()
    }
}

/// `--on-fault restart` with `--standby`: the guest booted afresh in a
/// primary session that runs alone (holding the arbiter's claim
/// `ownership`) and re-protects itself onto a spare; its faults are then
/// contained onto that spare as a primary's are.
#[allow(clippy::too_many_arguments)]
fn restart_protectable(
    settings: &GuestSettings,
    config: &VmConfig,
    tap: &Option<Arc<vmm::tap::Tap>>,
    serial: &SharedSerial,
    health: &Arc<Health>,
    board: &Arc<pair::Board>,
    pair: &PairConfig,
    ownership: Option<pair::failover::Ownership>,
) -> Result<Ended> {
    let signals = crate::catch_signals()?;
    let pc = primary_config(settings, config, pair, health)?;
    let mut output = LiveOutput::new(Box::new(serial.clone()));
    if let Some(t) = tap {
        output = output.with_tap(t.clone());
    }
    let (session, gate) = PrimarySession::start_alone(pc, board.clone(), Box::new(output), None)?;
    session.hold_arbiter(ownership);
    run_session(settings, config, tap.clone(), serial.clone(), pair, session, gate, signals)
}

/// A copy that holds the guest and cannot hand its fault over (it runs
/// alone, the channel is down, or the fault came within `--fault-window` of
/// a containment): `--on-fault` decides. `stop`: exit status 5. `restart`:
/// boot the guest again from its image, alone (claiming the arbiter, if
/// any, as `--unprotected-start` does), with its own health sources; a fault
/// within `--fault-window` of a restart stops with status 5.
#[allow(clippy::too_many_arguments)]
fn on_fault(
    settings: &GuestSettings,
    config: &VmConfig,
    tap: Option<Arc<vmm::tap::Tap>>,
    serial: SharedSerial,
    health: &Arc<Health>,
    board: &Arc<pair::Board>,
    outcome: &Result<vmm::vcpu::RunOutcome, vmm::VmError>,
    pair: &PairConfig,
) -> Result<i32> {
    let name = &settings.name;
    let arbiter = pair.arbiter.as_deref();
    let mut health = health.clone();
    let mut outcome_now = None;
    // The session's control socket went with it: a restarted guest is
    // served on the same path, so that `ftvm status` and the cluster agents
    // still see this copy (its faults, its state).
    let mut control = None;
    loop {
        let outcome = outcome_now.as_ref().unwrap_or(outcome);
        let Some(decision) = health.decide(outcome, board) else {
            // Not a guest fault after all (a host-side failure).
            eprintln!("ftvm: {name}: the guest stopped without a fault to act on");
            return Ok(crate::exit::EXIT_ERROR);
        };
        let what = format!(
            "guest fault ({}, seen by {}){}",
            decision.detected.kind,
            decision.detected.source.as_str(),
            if decision.escalated { " within --fault-window of the last recovery: escalated" } else { "" }
        );
        if decision.action == FaultAction::Stop {
            eprintln!("ftvm: {name}: {what}; --on-fault stop: stopping (status 5)");
            return Ok(EXIT_FAULT_ESCALATED);
        }
        eprintln!("ftvm: {name}: {what}; --on-fault restart: booting the guest again from its image, UNPROTECTED");
        health = health.restarted();
        board.set_state("running alone: guest restarted after a fault (--on-fault restart)");
        if control.is_none() {
            let path = pair.control_for(name);
            match pair::ControlSocket::serve(&path, board.clone()) {
                Ok(c) => control = Some(c),
                Err(e) => tracing::warn!(error = %e, "cannot serve the control socket for the restarted guest"),
            }
        }
        let ownership = arbiter.map(|a| pair::failover::claim_alone(a, name)).transpose()?;
        if !pair.standby.is_empty() {
            // With spares, the restarted guest runs in a primary session
            // alone, which re-protects itself onto one.
            match restart_protectable(settings, config, &tap, &serial, &health, board, pair, ownership)? {
                Ended::Faulted { outcome, signal: 0, .. } => {
                    outcome_now = Some(outcome);
                    continue;
                }
                // Stopped by a signal as it faulted: the signal wins.
                Ended::Faulted { outcome, signal, .. } => {
                    return crate::finish(settings, outcome, &std::sync::atomic::AtomicI32::new(signal))
                }
                Ended::Exit(code) => return Ok(code),
            }
        }
        let mut output = LiveOutput::new(Box::new(serial.clone()));
        if let Some(t) = &tap {
            output = output.with_tap(t.clone());
        }
        let output = health.sink(pair::primary::DynSink(Box::new(output)));
        let h = health.clone();
        let input = |stop: &vmm::vcpu::StopHandle| -> Box<dyn vmm::hook::InputSource> {
            let live = LiveInput::new(0, vec![stop.wake_fd()]);
            match tap.clone() {
                Some(t) => Box::new(h.input(live.with_tap(t))),
                None => Box::new(h.input(live)),
            }
        };
        let mut vm =
            Vm::new(config, input, Box::new(output)).with_context(|| format!("cannot restart guest {name}"))?;
        health.arm();
        health.watch(vm.stop_handle())?;
        let caught = crate::stop_on_signals(&vm)?;
        let ran = vm.run();
        health.close();
        if let Some(o) = ownership {
            o.release();
        }
        let signalled = caught.load(std::sync::atomic::Ordering::SeqCst) != 0;
        if signalled || (pair::health::classify(&ran).is_none() && health.fault().is_none()) {
            return crate::finish(settings, ran, &caught);
        }
        outcome_now = Some(ran);
    }
}
