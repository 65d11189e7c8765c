//! Application health: the sources that tell a healthy guest from a faulty
//! one, the one place that classifies how a guest run ended, and the hooks
//! that turn health reports into barriers on a primary.
//!
//! Sources, each able to fire a [`FaultKind`]:
//! - how the run ended ([`classify`]): pvpanic, a crash (triple fault, an
//!   access no device serves, an emulation failure), a power-off with a
//!   non-zero status, a halt with no wake-up deadline ([`HealthInput`]);
//! - the health device: once the guest has reported at least once, a report
//!   missing for `--health-deadline-ms` is a fault;
//! - the hang watchdog: the vCPU inside KVM_RUN without an exit for
//!   `--hang-ms` (time asleep in HLT does not count);
//! - the host-side probe (`--probe tcp:PORT | exec:COMMAND`);
//! - the LAN side (`--uplink IFACE` carrier, `--gateway` answering).
//!
//! A fault fires once: the first source wins, the guest is stopped through
//! its [`StopHandle`], and the session decides (containment, or
//! `--on-fault`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use replication::log::LogShared;
use replication::record::{FaultKind, Record};
use serde::Serialize;
use vmm::devices::DeviceError;
use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, ExitKind, GuestSignal, HookError, InputSource, OutputSink, Wake};
use vmm::vcpu::{RunOutcome, StopHandle, VcpuError};
use vmm::VmError;

/// `--health-deadline-ms` when not given: a missed report is seen within
/// 30 ms (plus the watchdog's tick), under OpenSAF's 55 ms for an SA-aware
/// component.
pub const DEFAULT_HEALTH_DEADLINE: Duration = Duration::from_millis(30);
/// `--hang-ms` when not given: this VM backend can stall a vCPU for up to
/// ~200 ms on a busy host, so a hang is declared well above that.
pub const DEFAULT_HANG: Duration = Duration::from_millis(1000);
/// `--fault-window` when not given.
pub const DEFAULT_FAULT_WINDOW: Duration = Duration::from_millis(10_000);
/// `--probe-interval-ms` when not given.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// `--probe-timeout-ms` when not given.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// `--probe-failures` when not given.
pub const DEFAULT_PROBE_FAILURES: u32 = 3;

/// What a copy alone does with a fault (`--on-fault`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFault {
    /// Boot the guest again from its image (AMF's component restart).
    Restart,
    /// Stop with exit status 5 (for the cluster manager).
    #[default]
    Stop,
}

/// `--output-mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// The plain output rule: an output goes once the log up to it is
    /// acknowledged. A containment may roll back what a client saw between
    /// the last barrier and the fault.
    #[default]
    Fast,
    /// An output goes once a barrier logged after it is acknowledged:
    /// nothing a client saw is ever rolled back.
    Strict,
}

/// The host-side probe (`--probe`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeTarget {
    /// Connect to the guest's address on this TCP port.
    Tcp(SocketAddr),
    /// Run this command (`sh -c`); exit status 0 is a success.
    Exec(String),
}

/// `--probe` with its interval, timeout and failure threshold.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub target: ProbeTarget,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that make a fault.
    pub failures: u32,
}

/// `--uplink` and `--gateway`: the primary's LAN side.
#[derive(Clone, Debug, Default)]
pub struct LanConfig {
    /// The interface whose carrier the service's clients come through.
    pub uplink: Option<String>,
    /// The gateway that must keep answering (ARP).
    pub gateway: Option<Ipv4Addr>,
    /// How often to look.
    pub interval: Duration,
    /// Consecutive failed looks that make a fault.
    pub failures: u32,
}

/// Every health setting of one side.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// `--containment`: off is VMware FT's behaviour (no barriers, no
    /// health sources, the secondary replays into a fault).
    pub containment: bool,
    /// `--health-deadline-ms`; `None`: off.
    pub deadline: Option<Duration>,
    /// `--hang-ms`; `None`: off.
    pub hang: Option<Duration>,
    pub on_fault: OnFault,
    /// `--fault-window`.
    pub fault_window: Duration,
    pub output_mode: OutputMode,
    pub probe: Option<ProbeConfig>,
    pub lan: Option<LanConfig>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            containment: true,
            deadline: Some(DEFAULT_HEALTH_DEADLINE),
            hang: Some(DEFAULT_HANG),
            on_fault: OnFault::Stop,
            fault_window: DEFAULT_FAULT_WINDOW,
            output_mode: OutputMode::Fast,
            probe: None,
            lan: None,
        }
    }
}

/// Which health source saw a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Source {
    /// How the guest's run ended, at an exit (panic, crash, halt, power-off).
    #[serde(rename = "exit")]
    Exit,
    /// A health report missed its deadline.
    #[serde(rename = "health deadline")]
    HealthDeadline,
    /// The hang watchdog.
    #[serde(rename = "hang watchdog")]
    HangWatchdog,
    /// The host-side probe.
    #[serde(rename = "probe")]
    Probe,
    /// The LAN side (uplink carrier, gateway).
    #[serde(rename = "lan")]
    Lan,
}

impl Source {
    /// The source that fires `kind`: every kind has exactly one.
    pub fn of(kind: FaultKind) -> Source {
        match kind {
            FaultKind::Hang => Source::HangWatchdog,
            FaultKind::Unhealthy => Source::HealthDeadline,
            FaultKind::Probe => Source::Probe,
            FaultKind::Lan => Source::Lan,
            _ => Source::Exit,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Exit => "exit",
            Source::HealthDeadline => "health deadline",
            Source::HangWatchdog => "hang watchdog",
            Source::Probe => "probe",
            Source::Lan => "lan",
        }
    }
}

/// How a guest's run ended, as a fault, if it was one. The one place that
/// decides this: pvpanic → `Panic`; triple fault, an access no device
/// serves, KVM's internal error or failed entry, a guest that broke a
/// device's protocol → `Crash`; a power-off with a non-zero status →
/// `PowerOff`; a halt with no wake-up deadline → `Halt`. A clean power-off,
/// a stop the host asked for and host-side failures are no guest fault.
pub fn classify(outcome: &Result<RunOutcome, VmError>) -> Option<FaultKind> {
    match outcome {
        Ok(RunOutcome::PoweredOff { status, .. }) if *status != 0 => Some(FaultKind::PowerOff),
        Ok(_) => None,
        Err(VmError::Vcpu(e)) => classify_vcpu(e),
        Err(_) => None,
    }
}

fn classify_vcpu(e: &VcpuError) -> Option<FaultKind> {
    match e {
        VcpuError::GuestPanic { .. } => Some(FaultKind::Panic),
        VcpuError::TripleFault { .. }
        | VcpuError::UnknownPort { .. }
        | VcpuError::UnknownMmio { .. }
        | VcpuError::InternalError { .. }
        | VcpuError::FailEntry { .. } => Some(FaultKind::Crash),
        VcpuError::Hook { source: HookError::HaltedForever { .. }, .. } => Some(FaultKind::Halt),
        VcpuError::Device { source: DeviceError::Hook { source: HookError::HaltedForever { .. }, .. }, .. } => {
            Some(FaultKind::Halt)
        }
        VcpuError::Device { source, .. } if !matches!(source, DeviceError::Hook { .. }) => Some(FaultKind::Crash),
        _ => None,
    }
}

/// How a copy recovered from a fault (what `--fault-window` counts from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// This copy went live from the last barrier after the primary's fault.
    Containment,
    /// This copy booted its guest again (`--on-fault restart`).
    Restart,
}

/// What a copy that cannot hand a fault over does with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Boot the guest again from its image.
    Restart,
    /// Stop with exit status 5.
    Stop,
}

/// A fault on a copy that cannot hand it over, and the decision.
#[derive(Clone, Copy, Debug)]
pub struct FaultDecision {
    pub detected: Detected,
    /// Within `--fault-window` of the last containment or restart.
    pub escalated: bool,
    pub action: FaultAction,
}

/// A fault one source saw.
#[derive(Clone, Copy, Debug)]
pub struct Detected {
    pub kind: FaultKind,
    pub source: Source,
    /// When it was detected.
    pub at: Instant,
    /// The last sign of health (a report, an exit) → detection.
    pub reaction: Duration,
}

/// The health of one side's guest: shared by the vCPU hooks, the watchdog
/// and probe threads, and the session.
pub struct Health {
    config: HealthConfig,
    /// Sources watch only while this side's guest is live (a secondary arms
    /// at go-live).
    armed: AtomicBool,
    /// Set once the watcher threads must end.
    closing: AtomicBool,
    /// The last health report; `None` until the first.
    last_report: Mutex<Option<Instant>>,
    reports: AtomicU64,
    /// `reports` at the last halt (a turn of the guest's main loop ends in
    /// a halt, after its health report; a missed report counts only if the
    /// guest finished a turn past its deadline without one): a halt that finds it unchanged ends a
    /// turn that did not report.
    reports_at_halt: AtomicU64,
    /// The last turn ended (halted) without a report; a report clears it.
    unreported_turn: AtomicBool,
    fault: Mutex<Option<Detected>>,
    /// The last containment or restart this copy recovered by, and which.
    recovered: Mutex<Option<(Instant, Recovery)>>,
    /// Sources failing now, below their threshold (probe, LAN): no barrier
    /// is logged while any is.
    failing: AtomicU32,
    stop: OnceLock<StopHandle>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Health {
    pub fn new(config: HealthConfig) -> Arc<Health> {
        Arc::new(Health {
            config,
            armed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            last_report: Mutex::new(None),
            reports: AtomicU64::new(0),
            reports_at_halt: AtomicU64::new(0),
            unreported_turn: AtomicBool::new(false),
            fault: Mutex::new(None),
            recovered: Mutex::new(None),
            failing: AtomicU32::new(0),
            stop: OnceLock::new(),
        })
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// Whether faults are contained (and sources watched) at all.
    pub fn containment(&self) -> bool {
        self.config.containment
    }

    /// This side's guest is live: the sources watch from now.
    pub fn arm(&self) {
        // A secondary's replayed reports do not count towards a deadline.
        *lock(&self.last_report) = None;
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    /// The application reported healthy.
    pub fn report(&self) {
        if self.is_armed() {
            *lock(&self.last_report) = Some(Instant::now());
        }
        self.reports.fetch_add(1, Ordering::SeqCst);
        self.unreported_turn.store(false, Ordering::SeqCst);
    }

    /// Health reports seen.
    pub fn reports(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    /// No fault, and no source failing below its threshold.
    pub fn all_healthy(&self) -> bool {
        self.failing.load(Ordering::SeqCst) == 0 && lock(&self.fault).is_none()
    }

    /// The fault seen, if any.
    pub fn fault(&self) -> Option<Detected> {
        *lock(&self.fault)
    }

    /// A source saw `kind`: the first fault is kept and stops the guest.
    /// Ignored unless armed with containment on (with it off, ftvm behaves
    /// as VMware FT does). Returns whether this call fired.
    pub fn fire(&self, kind: FaultKind, reaction: Duration) -> bool {
        if !self.config.containment || !self.is_armed() {
            return false;
        }
        {
            let mut fault = lock(&self.fault);
            if fault.is_some() {
                return false;
            }
            *fault = Some(Detected { kind, source: Source::of(kind), at: Instant::now(), reaction });
        }
        tracing::warn!(fault = %kind, source = Source::of(kind).as_str(), "guest fault detected");
        if let Some(stop) = self.stop.get() {
            stop.stop();
        }
        true
    }

    /// The guest's run ended: record the fault it ended in, if it was one
    /// (a fault another source fired first stays). The fault seen.
    pub fn ended(&self, outcome: &Result<RunOutcome, VmError>) -> Option<Detected> {
        if let Some(kind) = classify(outcome) {
            if self.config.containment {
                let mut fault = lock(&self.fault);
                if fault.is_none() {
                    *fault =
                        Some(Detected { kind, source: Source::Exit, at: Instant::now(), reaction: Duration::ZERO });
                }
            }
        }
        self.fault()
    }

    /// This copy recovered from a fault now (went live after a
    /// containment, or restarted its guest): a fault within
    /// `--fault-window` from here escalates.
    pub fn recovered(&self, how: Recovery) {
        *lock(&self.recovered) = Some((Instant::now(), how));
    }

    /// A live copy that cannot hand over (it runs alone) ended its run
    /// with `outcome`: if that was a fault, decide with `--on-fault` and
    /// `--fault-window`, and record the event on `board`. A fault within
    /// the window after a containment is not contained again: `--on-fault`
    /// decides; within the window after a restart, the restart did not
    /// cure it, so the copy stops (status 5) whatever `--on-fault` says.
    pub fn decide(&self, outcome: &Result<RunOutcome, VmError>, board: &crate::status::Board) -> Option<FaultDecision> {
        let detected = self.ended(outcome)?;
        let recovered = *lock(&self.recovered);
        let within = recovered.filter(|(at, _)| detected.at.saturating_duration_since(*at) < self.config.fault_window);
        let escalated = within.is_some();
        let action = match (self.config.on_fault, within.map(|(_, how)| how)) {
            (OnFault::Restart, Some(Recovery::Restart)) | (OnFault::Stop, _) => FaultAction::Stop,
            (OnFault::Restart, _) => FaultAction::Restart,
        };
        let at = detected.at.elapsed();
        board.fault(crate::status::FaultEvent {
            source: detected.source,
            fault: detected.kind,
            action: match action {
                FaultAction::Restart => "restart",
                FaultAction::Stop => "stop",
            },
            escalated,
            at: crate::status::rfc3339(std::time::SystemTime::now()),
            exit: None,
            barrier_exit: None,
            reaction_ms: crate::status::millis(detected.reaction),
            recovery_ms: crate::status::millis(at),
            outage_ms: crate::status::millis(detected.reaction + at),
        });
        Some(FaultDecision { detected, escalated, action })
    }

    /// Health for the same guest booted again (`--on-fault restart`): the
    /// same settings, no fault, and the fault window counting from now.
    pub fn restarted(&self) -> Arc<Health> {
        let h = Health::new(self.config.clone());
        h.recovered(Recovery::Restart);
        h
    }

    /// Forget the fault (a guest restarted from a clean boot).
    pub fn reset(&self) {
        *lock(&self.fault) = None;
        *lock(&self.last_report) = None;
        self.failing.store(0, Ordering::SeqCst);
    }

    /// Stop watching: the watcher threads end at their next tick.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Start the deadline and hang watchdog, the probe and the LAN watch for
    /// the guest stopped by `stop`. Sources fire only while armed.
    pub fn watch(self: &Arc<Self>, stop: StopHandle) -> std::io::Result<()> {
        if !self.config.containment {
            return Ok(());
        }
        if self.stop.set(stop.clone()).is_err() {
            // Watching already (a restarted guest has a new handle: take
            // it over).
            return Ok(());
        }
        let tick = [self.config.deadline, self.config.hang]
            .into_iter()
            .flatten()
            .map(|d| d / 4)
            .min()
            .map(|t| t.clamp(Duration::from_millis(1), Duration::from_millis(50)));
        if let Some(tick) = tick {
            let me = self.clone();
            std::thread::Builder::new().name("watchdog".into()).spawn(move || me.watchdog(&stop, tick))?;
        }
        if let Some(probe) = self.config.probe.clone() {
            let me = self.clone();
            std::thread::Builder::new().name("probe".into()).spawn(move || me.probe_loop(&probe))?;
        }
        if let Some(lan) = self.config.lan.clone() {
            let me = self.clone();
            std::thread::Builder::new().name("lan".into()).spawn(move || me.lan_loop(&lan))?;
        }
        Ok(())
    }

    /// The deadline and hang watchdog. A report is missed only when the
    /// guest finished a turn (halted) without reporting while its last
    /// report is past the deadline: a vCPU thread the host did not schedule
    /// for a while, or held between a turn's report and its halt (on a
    /// lock the releaser holds while it writes a burst of frames: 74 ms was
    /// seen under a 200 000-SET pipe), or a turn still under way, has
    /// missed nothing yet (a guest stuck inside a turn without exits is the
    /// hang watchdog's).
    fn watchdog(&self, stop: &StopHandle, tick: Duration) {
        while !self.closing.load(Ordering::SeqCst) && !stop.is_stopped() {
            std::thread::sleep(tick);
            if !self.is_armed() {
                continue;
            }
            // The turn first: a report clears it before it updates the
            // last report's time, so a report that comes between the two
            // reads leaves either no unreported turn or a fresh time.
            let unreported = self.unreported_turn.load(Ordering::SeqCst);
            if let (Some(deadline), Some(last)) = (self.config.deadline, *lock(&self.last_report)) {
                let missed = last.elapsed();
                if unreported && missed > deadline {
                    self.fire(FaultKind::Unhealthy, missed);
                }
            }
            if let (Some(hang), Some(inside)) = (self.config.hang, stop.in_guest_for()) {
                if inside > hang {
                    self.fire(FaultKind::Hang, inside);
                }
            }
        }
    }

    /// Count a source's consecutive failures against its threshold: fires
    /// at the threshold; a success clears the count. `was_failing` tracks
    /// whether this source counts in `failing` now.
    fn tally(&self, ok: bool, run: &mut u32, threshold: u32, kind: FaultKind, since: &mut Option<Instant>) {
        if ok {
            if *run > 0 {
                self.failing.fetch_sub(1, Ordering::SeqCst);
            }
            *run = 0;
            *since = None;
            return;
        }
        if *run == 0 {
            self.failing.fetch_add(1, Ordering::SeqCst);
            *since = Some(Instant::now());
        }
        *run = run.saturating_add(1);
        if *run >= threshold.max(1) {
            let reaction = since.map_or(Duration::ZERO, |s| s.elapsed());
            self.fire(kind, reaction);
        }
    }

    fn probe_loop(&self, probe: &ProbeConfig) {
        let (mut run, mut since) = (0u32, None);
        while !self.closing.load(Ordering::SeqCst) && self.stop.get().is_some_and(|s| !s.is_stopped()) {
            std::thread::sleep(probe.interval);
            if !self.is_armed() || self.fault().is_some() {
                continue;
            }
            let ok = probe_once(&probe.target, probe.timeout);
            if !ok {
                tracing::debug!(target = ?probe.target, failures = run + 1, "probe failed");
            }
            self.tally(ok, &mut run, probe.failures, FaultKind::Probe, &mut since);
        }
    }

    fn lan_loop(&self, lan: &LanConfig) {
        let (mut run, mut since) = (0u32, None);
        while !self.closing.load(Ordering::SeqCst) && self.stop.get().is_some_and(|s| !s.is_stopped()) {
            std::thread::sleep(lan.interval);
            if !self.is_armed() || self.fault().is_some() {
                continue;
            }
            let ok = lan_up(lan);
            self.tally(ok, &mut run, lan.failures, FaultKind::Lan, &mut since);
        }
    }

    /// The guest's input source with the halt check: a halt with no
    /// wake-up deadline is a fault (while armed, with containment on).
    pub fn input<I: InputSource>(self: &Arc<Self>, inner: I) -> HealthInput<I> {
        HealthInput { inner, health: self.clone() }
    }

    /// An output sink that takes the guest's health reports.
    pub fn sink<S: OutputSink>(self: &Arc<Self>, inner: S) -> HealthSink<S> {
        HealthSink { inner, health: self.clone(), barriers: None, board: None }
    }

    /// A primary's output sink: health reports become barriers in `log`
    /// while every source is healthy (with containment on, or `strict`).
    pub fn barrier_sink<S: OutputSink>(self: &Arc<Self>, inner: S, log: Arc<LogShared>) -> HealthSink<S> {
        let on = self.config.containment || self.config.output_mode == OutputMode::Strict;
        HealthSink {
            inner,
            health: self.clone(),
            barriers: on.then_some(Barriers { log, last: 0, outputs_since: false }),
            board: None,
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
    }
}

/// One try of the probe.
pub fn probe_once(target: &ProbeTarget, timeout: Duration) -> bool {
    match target {
        ProbeTarget::Tcp(addr) => std::net::TcpStream::connect_timeout(addr, timeout).is_ok(),
        ProbeTarget::Exec(command) => run_with_timeout(command, timeout),
    }
}

/// Run `sh -c command`; success is exit status 0 within `timeout` (a
/// command still running then is killed and counts as a failure).
fn run_with_timeout(command: &str, timeout: Duration) -> bool {
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot run the probe command");
            return false;
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                // Our own child, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Whether the LAN side is up: the uplink has carrier and is up, and the
/// gateway has a complete ARP entry after a datagram sent its way.
pub fn lan_up(lan: &LanConfig) -> bool {
    if let Some(iface) = &lan.uplink {
        if !uplink_up(iface) {
            return false;
        }
    }
    match lan.gateway {
        Some(gw) => gateway_answers(gw),
        None => true,
    }
}

/// `/sys/class/net/IFACE`: carrier 1 and operstate not down.
pub fn uplink_up(iface: &str) -> bool {
    let base = std::path::Path::new("/sys/class/net").join(iface);
    let carrier = std::fs::read_to_string(base.join("carrier")).map(|s| s.trim() == "1").unwrap_or(false);
    let oper = std::fs::read_to_string(base.join("operstate")).map(|s| s.trim().to_string()).unwrap_or_default();
    carrier && oper != "down" && oper != "lowerlayerdown"
}

/// Provoke an ARP exchange with `gw` (a datagram to the discard port) and
/// look in /proc/net/arp for a complete entry (flags 0x2).
fn gateway_answers(gw: Ipv4Addr) -> bool {
    if let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = s.send_to(b"ftvm", (gw, 9));
    }
    std::thread::sleep(Duration::from_millis(20));
    let Ok(table) = std::fs::read_to_string("/proc/net/arp") else { return false };
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace();
        let (ip, _hw, flags) = (f.next(), f.next(), f.next());
        ip == Some(&gw.to_string())
            && flags
                .and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok())
                .is_some_and(|x| x & 0x2 != 0)
    })
}

/// A boxed input source, as an input source.
pub struct BoxedInput(pub Box<dyn InputSource>);

impl InputSource for BoxedInput {
    fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
        self.0.on_exit(exit, kind)
    }
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        self.0.clock_ns(exit)
    }
    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        self.0.entropy(exit, buf)
    }
    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        self.0.halt(exit, deadline)
    }
    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        self.0.receive_frame(exit)
    }
    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        self.0.digest(exit, digest)
    }
}

/// The input hook of health: a halt with no deadline is a fault.
pub struct HealthInput<I> {
    inner: I,
    health: Arc<Health>,
}

impl<I: InputSource> InputSource for HealthInput<I> {
    fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
        self.inner.on_exit(exit, kind)
    }
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        self.inner.clock_ns(exit)
    }
    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        self.inner.entropy(exit, buf)
    }
    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        let reports = self.health.reports.load(Ordering::SeqCst);
        let before = self.health.reports_at_halt.swap(reports, Ordering::SeqCst);
        self.health.unreported_turn.store(reports == before, Ordering::SeqCst);
        if deadline.is_none() && self.health.containment() && self.health.is_armed() {
            return Err(HookError::HaltedForever { exit_index: exit });
        }
        self.inner.halt(exit, deadline)
    }
    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        self.inner.receive_frame(exit)
    }
    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        self.inner.digest(exit, digest)
    }
}

struct Barriers {
    log: Arc<LogShared>,
    /// Position of the last barrier logged.
    last: u64,
    /// An output left since it (strict: it needs a barrier after it).
    outputs_since: bool,
}

/// The output hook of health: takes health reports; on a primary, logs a
/// barrier at each while every source is healthy, coalescing reports with
/// nothing logged or output since the last barrier.
pub struct HealthSink<S> {
    inner: S,
    health: Arc<Health>,
    barriers: Option<Barriers>,
    board: Option<Arc<crate::status::Board>>,
}

impl<S> HealthSink<S> {
    /// Show the last barrier on `board`.
    pub fn with_board(mut self, board: Arc<crate::status::Board>) -> Self {
        self.board = Some(board);
        self
    }
}

impl<S: OutputSink> OutputSink for HealthSink<S> {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        if let Some(b) = &mut self.barriers {
            b.outputs_since = true;
        }
        self.inner.serial(exit, bytes)
    }
    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        if let Some(b) = &mut self.barriers {
            b.outputs_since = true;
        }
        self.inner.transmit_frame(exit, frame)
    }
    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        if let GuestSignal::Healthy { .. } = signal {
            self.health.report();
            if let Some(b) = &mut self.barriers {
                if self.health.all_healthy() && (b.log.appended().0 > b.last || b.outputs_since) {
                    b.last = b.log.append(Record::Barrier { exit }).0;
                    b.outputs_since = false;
                    if let Some(board) = &self.board {
                        board.set_last_barrier(exit.0);
                    }
                    if b.log.is_strict() {
                        // Outputs wait for this barrier's ack: ship it now.
                        b.log.request_flush();
                    }
                }
            }
        }
        self.inner.signal(exit, signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoInput;
    impl InputSource for NoInput {
        fn clock_ns(&mut self, _: ExitIndex) -> Result<u64, HookError> {
            Ok(0)
        }
        fn entropy(&mut self, _: ExitIndex, _: &mut [u8]) -> Result<(), HookError> {
            Ok(())
        }
        fn halt(&mut self, _: ExitIndex, _: Option<u64>) -> Result<Wake, HookError> {
            Ok(Wake::Deadline)
        }
    }

    fn vcpu(e: VcpuError) -> Result<RunOutcome, VmError> {
        Err(VmError::Vcpu(e))
    }

    #[test]
    fn classification_of_every_way_a_run_ends() {
        let x = ExitIndex(9);
        assert_eq!(classify(&Ok(RunOutcome::PoweredOff { status: 0, exit_index: x })), None);
        assert_eq!(classify(&Ok(RunOutcome::PoweredOff { status: 3, exit_index: x })), Some(FaultKind::PowerOff));
        assert_eq!(classify(&Ok(RunOutcome::Stopped { exit_index: x })), None);
        assert_eq!(classify(&vcpu(VcpuError::GuestPanic { event: 1, exit_index: x })), Some(FaultKind::Panic));
        assert_eq!(classify(&vcpu(VcpuError::TripleFault { rip: 0, exit_index: x })), Some(FaultKind::Crash));
        let port = VcpuError::UnknownPort { port: 1, size: 1, access: vmm::hook::Access::Read, exit_index: x };
        assert_eq!(classify(&vcpu(port)), Some(FaultKind::Crash));
        let mmio = VcpuError::UnknownMmio { addr: 1, size: 1, access: vmm::hook::Access::Write, exit_index: x };
        assert_eq!(classify(&vcpu(mmio)), Some(FaultKind::Crash));
        assert_eq!(classify(&vcpu(VcpuError::InternalError { suberror: 1, exit_index: x })), Some(FaultKind::Crash));
        let halt = VcpuError::Hook { exit_index: x, source: HookError::HaltedForever { exit_index: x } };
        assert_eq!(classify(&vcpu(halt)), Some(FaultKind::Halt));
        // Host-side trouble is no guest fault.
        let ended = VcpuError::Hook { exit_index: x, source: HookError::Ended { exit_index: x } };
        assert_eq!(classify(&vcpu(ended)), None);
        let wait = VcpuError::Hook { exit_index: x, source: HookError::Wait(std::io::Error::other("x")) };
        assert_eq!(classify(&vcpu(wait)), None);
    }

    #[test]
    fn sources_fire_once_only_while_armed_and_only_with_containment() {
        let h = Health::new(HealthConfig::default());
        assert!(!h.fire(FaultKind::Hang, Duration::ZERO), "a secondary that replays sees no fault");
        h.arm();
        assert!(h.fire(FaultKind::Hang, Duration::from_millis(5)));
        assert!(!h.fire(FaultKind::Probe, Duration::ZERO), "the first fault stays");
        let f = h.fault().unwrap();
        assert_eq!((f.kind, f.source), (FaultKind::Hang, Source::HangWatchdog));
        let off = Health::new(HealthConfig { containment: false, ..HealthConfig::default() });
        off.arm();
        assert!(!off.fire(FaultKind::Halt, Duration::ZERO));
        assert!(off.ended(&vcpu(VcpuError::GuestPanic { event: 1, exit_index: ExitIndex(1) })).is_none());
    }

    #[test]
    fn a_probe_failing_fewer_times_than_its_threshold_does_not_fire() {
        let h = Health::new(HealthConfig::default());
        h.arm();
        let (mut run, mut since) = (0, None);
        for _ in 0..2 {
            h.tally(false, &mut run, 3, FaultKind::Probe, &mut since);
        }
        assert!(h.fault().is_none());
        assert!(!h.all_healthy(), "a failing probe holds barriers back");
        h.tally(true, &mut run, 3, FaultKind::Probe, &mut since);
        assert!(h.all_healthy());
        for _ in 0..2 {
            h.tally(false, &mut run, 3, FaultKind::Probe, &mut since);
        }
        assert!(h.fault().is_none(), "a success in between resets the count");
        h.tally(false, &mut run, 3, FaultKind::Probe, &mut since);
        assert_eq!(h.fault().map(|f| f.kind), Some(FaultKind::Probe));
    }

    #[test]
    fn real_probes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(probe_once(&ProbeTarget::Tcp(addr), Duration::from_secs(5)));
        drop(l);
        assert!(!probe_once(&ProbeTarget::Tcp(addr), Duration::from_secs(5)));
        assert!(probe_once(&ProbeTarget::Exec("exit 0".into()), Duration::from_secs(5)));
        assert!(!probe_once(&ProbeTarget::Exec("exit 1".into()), Duration::from_secs(5)));
        assert!(!probe_once(&ProbeTarget::Exec("sleep 5".into()), Duration::from_millis(50)), "a timeout fails");
        assert!(uplink_up("lo") || !std::path::Path::new("/sys/class/net/lo/carrier").exists());
        assert!(!uplink_up("no-such-if0"));
    }

    #[test]
    fn a_missed_report_fires_only_after_the_first_report() {
        let h = Health::new(HealthConfig {
            deadline: Some(Duration::from_millis(20)),
            hang: None,
            ..HealthConfig::default()
        });
        let stop = StopHandle::detached().unwrap();
        h.arm();
        h.watch(stop.clone()).unwrap();
        // No report yet: a guest that never reports is never unhealthy.
        std::thread::sleep(Duration::from_millis(100));
        assert!(h.fault().is_none());
        h.report();
        // A guest that finishes no turn (not scheduled, asleep) misses
        // nothing.
        std::thread::sleep(Duration::from_millis(100));
        assert!(h.fault().is_none(), "a guest that did not run past its deadline missed no report");
        // The turn that reported ends (halts) late, its vCPU held by the
        // host between the report and the halt: nothing was missed.
        let mut input = h.input(NoInput);
        input.halt(ExitIndex(1), Some(1)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(h.fault().is_none(), "a turn that reported missed nothing, however late it halted");
        // It turns on (halts) without reporting: a missed report.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut exit = 1;
        while h.fault().is_none() && Instant::now() < deadline {
            exit += 1;
            input.halt(ExitIndex(exit), Some(1)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let f = h.fault().expect("the missed report fired");
        assert_eq!((f.kind, f.source), (FaultKind::Unhealthy, Source::HealthDeadline));
        assert!(f.reaction >= Duration::from_millis(20));
        assert!(stop.is_stopped(), "the fault stops the guest");
    }
}
