//! `ftvm primary` and `ftvm secondary`: one guest run in lockstep by two
//! processes joined by the logging channel, and the control socket that
//! `ftvm status` reads.
//!
//! Threads of a primary: the vCPU (records inputs, gates outputs; never
//! waits on the network), the shipper (hands the log tail to the channel,
//! flushes when an output waits), the releaser (writes held outputs when
//! their acks arrive), a tokio runtime (the channel; acks update the log's
//! acked position), the control socket, and a once-a-second progress event.
//! A secondary: the vCPU (replays), a tokio task receiving and acking
//! batches (acks are sent as soon as a batch is stored), the control socket.

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use replication::channel::{ChannelConfig, ChannelError, PrimaryChannel, SecondaryChannel};
use replication::frame::GuestIdentity;
use replication::go_live::{Decision, LiveWorld, SwitchInput, SwitchOutput};
use replication::key::SharedKey;
use replication::log::LogShared;
use replication::output_rule;
use replication::record::{LogPosition, Record};
use replication::recorder::Recorder;
use replication::replayer::Replayer;
use replication::suppressed::HeldOutputs;
use sha2::{Digest, Sha256};
use vmm::digest::StateDigest;
use vmm::hook::{ExitIndex, ExitKind, HookError, InputSource, Wake};
use vmm::vcpu::{StopHandle, VcpuError};
use vmm::world::{LiveInput, LiveOutput};
use vmm::{Vm, VmConfig, VmError};

use crate::config::GuestSettings;

/// What `ftvm status` reports, updated by the threads of a pair process.
#[derive(Default)]
pub struct Status {
    role: Mutex<&'static str>,
    state: Mutex<String>,
    exit_index: AtomicU64,
    log_position: AtomicU64,
    acked_position: AtomicU64,
    released_position: AtomicU64,
    received: AtomicU64,
    divergences: AtomicU64,
    outputs_held: AtomicU64,
    peer_up: AtomicBool,
    /// Primary: encoded bytes of the records shipped.
    log_bytes: AtomicU64,
    /// The last failure's event, as `last_failure` reports it.
    last_failure: Mutex<Option<serde_json::Value>>,
    /// The heartbeat service's counters, when failover is on.
    heartbeats: std::sync::OnceLock<tokio::sync::watch::Receiver<heartbeat::ServiceStats>>,
}

impl Status {
    fn new(role: &'static str) -> Arc<Status> {
        let s = Status::default();
        *s.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
        Arc::new(s)
    }

    fn set_role(&self, role: &'static str) {
        *self.role.lock().unwrap_or_else(|e| e.into_inner()) = role;
    }

    /// Record a failure (DESIGN.md: kind, at, reaction, recovery, outage,
    /// repair) and log it as one structured event.
    fn failure(&self, kind: &str, loss: &Loss, at: std::time::SystemTime) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (reaction, recovery) = (loss.reaction(), loss.decided.elapsed());
        let detected_by = loss.by.as_str();
        tracing::warn!(
            kind,
            detected_by,
            reaction_ms = ms(reaction),
            recovery_ms = ms(recovery),
            outage_ms = ms(reaction + recovery),
            "failure handled"
        );
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(serde_json::json!({
            "kind": kind,
            "detected_by": detected_by,
            "at": rfc3339(at),
            "reaction_ms": ms(reaction),
            "recovery_ms": ms(recovery),
            "outage_ms": ms(reaction + recovery),
            "repair_ms": serde_json::Value::Null,
        }));
    }

    fn set_state(&self, state: impl Into<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state.into();
    }

    /// The status as one JSON object (DESIGN.md, `ftvm status --json`).
    pub fn json(&self) -> serde_json::Value {
        let role = *self.role.lock().unwrap_or_else(|e| e.into_inner());
        let log = self.log_position.load(Ordering::SeqCst);
        let acked = self.acked_position.load(Ordering::SeqCst);
        let received = self.received.load(Ordering::SeqCst);
        let lag = if role == "secondary" { received.saturating_sub(log) } else { log.saturating_sub(acked) };
        serde_json::json!({
            "role": role,
            "state": self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "exit_index": self.exit_index.load(Ordering::SeqCst),
            "log_position": log,
            "acked_position": if role == "secondary" { received } else { acked },
            "released_position": self.released_position.load(Ordering::SeqCst),
            "replay_lag_records": lag,
            "divergences": self.divergences.load(Ordering::SeqCst),
            "outputs_held": self.outputs_held.load(Ordering::SeqCst),
            "log_bytes": self.log_bytes.load(Ordering::SeqCst),
            "peer": if self.peer_up.load(Ordering::SeqCst) { "up" } else { "down" },
            "last_failure": self.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or(serde_json::Value::Null),
            "heartbeats": self.heartbeats.get().map_or(serde_json::Value::Null, |w| {
                let stats = *w.borrow();
                serde_json::json!({
                    "sent": stats.sent,
                    "accepted": stats.received.accepted,
                    "forged": stats.received.forged,
                    "replayed": stats.received.replayed,
                    "foreign": stats.received.foreign,
                    "malformed": stats.received.malformed,
                })
            }),
        })
    }
}

/// Serve `status` on a unix socket at `path`: each connection gets one JSON
/// line. A stale socket file (nobody listening) is replaced; a live one is
/// an error: two VMs must not share a control socket.
fn serve_control(path: &Path, status: Arc<Status>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("control socket {} is in use by another ftvm", path.display());
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let line = status.json().to_string();
            let _ = writeln!(conn, "{line}");
        }
    })?;
    Ok(())
}

/// `ftvm status`: read a pair process's control socket.
pub fn status(control: &Path, json: bool) -> Result<()> {
    use std::io::Read;
    let mut conn = std::os::unix::net::UnixStream::connect(control)
        .with_context(|| format!("no ftvm is listening on control socket {}", control.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).context("the control socket answered something else than JSON")?;
    if json {
        println!("{v}");
        return Ok(());
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let shown = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("{k:<20} {shown}");
        }
    }
    Ok(())
}

/// The guest settings both hosts must agree on, as the handshake compares
/// them: image digest, memory size, and a digest of the guest-visible
/// settings (MAC, IP, gateway, params, privilege).
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

/// Wraps an input source to publish the exit index and the log position.
struct Observed<I> {
    inner: I,
    status: Arc<Status>,
    position: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl<I: InputSource> InputSource for Observed<I> {
    fn on_exit(&mut self, exit: ExitIndex, kind: &ExitKind) -> Result<(), HookError> {
        self.status.exit_index.store(exit.0, Ordering::Relaxed);
        self.inner.on_exit(exit, kind)
    }
    fn clock_ns(&mut self, exit: ExitIndex) -> Result<u64, HookError> {
        let r = self.inner.clock_ns(exit);
        self.status.log_position.store((self.position)(), Ordering::Relaxed);
        r
    }
    fn entropy(&mut self, exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        let r = self.inner.entropy(exit, buf);
        self.status.log_position.store((self.position)(), Ordering::Relaxed);
        r
    }
    fn halt(&mut self, exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        self.inner.halt(exit, deadline)
    }
    fn receive_frame(&mut self, exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        let r = self.inner.receive_frame(exit);
        self.status.log_position.store((self.position)(), Ordering::Relaxed);
        r
    }
    fn digest(&mut self, exit: ExitIndex, digest: &StateDigest) -> Result<(), HookError> {
        let r = self.inner.digest(exit, digest);
        self.status.log_position.store((self.position)(), Ordering::Relaxed);
        r
    }
}

/// Settings of a pair process beyond the guest's.
pub struct PairSettings {
    pub key_file: PathBuf,
    pub control: PathBuf,
    pub digest_every: u64,
    pub state_dump: Option<PathBuf>,
    /// `--arbiter file:PATH`: enables failover. Without it a pair process
    /// that loses its peer stops (no arbiter, no way to rule out two live
    /// copies).
    pub arbiter: Option<String>,
    pub heartbeat: Duration,
    pub dead_after: u32,
}

/// Exit status: lost the arbiter; this copy stopped so that the other lives.
pub const EXIT_LOST_ARBITER: i32 = 4;

/// `at` as RFC 3339 UTC, to the millisecond.
fn rfc3339(at: std::time::SystemTime) -> String {
    let d = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Heartbeats and the arbiter of one pair process, when failover is on.
struct Failover {
    service: heartbeat::Service,
    arbiter: heartbeat::Arbiter,
    generation: heartbeat::Generation,
    owner: heartbeat::Owner,
    /// Notified when the logging channel fails: see [`Failover::peer_lost`].
    channel_lost: tokio::sync::Notify,
}

/// How this side learnt that its peer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detection {
    /// `--dead-after` intervals without a heartbeat or log traffic.
    Silence,
    /// The logging channel closed or failed without the peer's `Shutdown`.
    ChannelClosed,
}

impl Detection {
    fn as_str(self) -> &'static str {
        match self {
            Detection::Silence => "heartbeat silence",
            Detection::ChannelClosed => "log channel closed",
        }
    }
}

/// A lost peer: when it was last heard, when it was declared lost, and how.
#[derive(Debug, Clone, Copy)]
struct Loss {
    last_heard: Instant,
    decided: Instant,
    by: Detection,
}

impl Loss {
    fn reaction(&self) -> Duration {
        self.decided.duration_since(self.last_heard)
    }
}

impl Failover {
    /// Start heartbeats (their counters reported in `status`) and open the
    /// arbiter, if failover is on.
    #[allow(clippy::too_many_arguments)]
    fn start(
        rt: &tokio::runtime::Runtime,
        status: &Status,
        pair: &PairSettings,
        name: &str,
        role: heartbeat::Role,
        key: &[u8],
        local: std::net::SocketAddr,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Option<Failover>> {
        let Some(spec) = &pair.arbiter else { return Ok(None) };
        let arbiter = heartbeat::Arbiter::open(spec)?;
        // The generation when the pair formed: a claim with it can win once.
        let (generation, _) = arbiter.current()?;
        let mut config = heartbeat::ServiceConfig::new(role, heartbeat::PairId::for_vm_name(name), local, peer);
        config.interval = pair.heartbeat;
        config.dead_after = pair.dead_after;
        let service = rt.block_on(heartbeat::Service::start(config, key))?;
        let owner = heartbeat::Owner::of(name, role, service.incarnation())?;
        let _ = status.heartbeats.set(service.watch_stats());
        Ok(Some(Failover { service, arbiter, generation, owner, channel_lost: tokio::sync::Notify::new() }))
    }

    /// The logging channel failed without a clean end: the peer is lost now.
    /// A peer process that dies has its kernel close the connection, so this
    /// is the fast sign of its death; a dead host closes nothing, and the
    /// heartbeats' silence decides. Either way the arbiter still decides who
    /// lives, so a channel that breaks between two live processes costs at
    /// most a needless failover, never two live copies: the other side's
    /// channel breaks too, and it claims the same generation.
    fn channel_failed(&self) {
        self.channel_lost.notify_one();
    }

    /// Wait until the peer is lost: silent for `--dead-after` intervals, or
    /// its channel failed.
    async fn peer_lost(&self) -> Loss {
        let mut w = self.service.watch();
        let silence = async {
            loop {
                if matches!(*w.borrow_and_update(), heartbeat::PeerState::Dead { .. }) {
                    break;
                }
                if w.changed().await.is_err() {
                    break;
                }
            }
        };
        let by = tokio::select! {
            () = silence => Detection::Silence,
            () = self.channel_lost.notified() => Detection::ChannelClosed,
        };
        let now = Instant::now();
        Loss { last_heard: self.service.last_heard().unwrap_or(now), decided: now, by }
    }
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

/// Announce the guest's MAC and IP: five gratuitous ARPs over half a second
/// (a single frame just after a TAP opens can be lost; QEMU sends five).
fn announce(tap: Arc<vmm::tap::Tap>, mac: [u8; 6], ip: Option<(std::net::Ipv4Addr, u8)>) {
    let Some((ip, _)) = ip else { return };
    let frame = replication::go_live::gratuitous_arp(mac, ip.octets());
    let _ = std::thread::Builder::new().name("announce".into()).spawn(move || {
        for i in 0..5 {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(120));
            }
            let _ = tap.write_frame(&frame);
        }
    });
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("net").enable_all().build()?)
}

fn is_retryable(e: &ChannelError) -> bool {
    matches!(e, ChannelError::Io(_) | ChannelError::Closed | ChannelError::HandshakeTimeout { .. })
}

#[derive(Default)]
struct ShipState {
    /// Records the channel refused (backpressure), sent again first.
    backlog: Option<(LogPosition, Vec<Record>)>,
    released: LogPosition,
}

/// Hands the log tail to the channel, in position order whoever calls it.
struct Shipper<S> {
    log: Arc<LogShared>,
    chan: Arc<PrimaryChannel>,
    status: Arc<Status>,
    releaser: Arc<output_rule::Releaser<S>>,
    state: Mutex<ShipState>,
    /// Alone since the secondary was lost: the log is dropped, not shipped.
    unprotected: Arc<AtomicBool>,
}

impl<S: vmm::hook::OutputSink> Shipper<S> {
    /// Ship what the log holds; `Ok(true)` when the channel refused it for
    /// backpressure (kept, retried on the next call).
    fn ship(&self, flush: bool) -> Result<bool, ChannelError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (first, records, asked) = self.log.take();
        if self.unprotected.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let (first, mut batch) = match st.backlog.take() {
            Some((f, mut old)) => {
                old.extend(records);
                (f, old)
            }
            None => (first, records),
        };
        if !batch.is_empty() {
            match self.chan.send_records(first, &batch) {
                Ok(()) => {
                    let bytes: usize = batch.iter().map(replication::frame::encoded_record_len).sum();
                    self.status.log_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                }
                // The secondary is too far behind: keep the records here
                // (the vCPU never waits) and try again when acks caught up.
                Err(ChannelError::Backpressure { .. }) => {
                    st.backlog = Some((first, std::mem::take(&mut batch)));
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
        if flush || asked {
            self.chan.flush();
        }
        self.status.outputs_held.store(self.releaser.held() as u64, Ordering::Relaxed);
        // Only positions whose outputs are all out: the secondary forgets
        // what it holds up to there.
        let now_released = self.releaser.released_through();
        if now_released > st.released {
            self.chan.send_released(now_released)?;
            st.released = now_released;
            self.status.released_position.store(now_released.0, Ordering::SeqCst);
        }
        Ok(false)
    }
}

/// `ftvm primary`.
pub fn primary(
    settings: &GuestSettings,
    config: VmConfig,
    tap: Option<Arc<vmm::tap::Tap>>,
    serial: Box<dyn Write + Send>,
    pair: &PairSettings,
    peer: &str,
) -> Result<i32> {
    let key = SharedKey::from_file(&pair.key_file)?;
    let key_bytes = key.as_bytes().to_vec();
    let status = Status::new("primary");
    status.set_state("waiting for the secondary");
    serve_control(&pair.control, status.clone())?;
    let rt = runtime()?;
    let chan_config = ChannelConfig::new(key, identity(&config.elf, settings));
    eprintln!("ftvm: primary {}: waiting for the secondary at {peer}", settings.name);
    let started = Instant::now();
    let chan = loop {
        match rt.block_on(PrimaryChannel::connect(peer, chan_config.clone())) {
            Ok(c) => break Arc::new(c),
            Err(e) if is_retryable(&e) => {
                if started.elapsed() > Duration::from_secs(600) {
                    return Err(anyhow!(e).context(format!("no secondary answered at {peer} for 10 minutes")));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(anyhow!(e).context(format!("the secondary at {peer} refused the pair"))),
        }
    };
    status.peer_up.store(true, Ordering::SeqCst);
    status.set_state("running");
    tracing::info!(vm = %settings.name, %peer, "secondary connected");
    let peer_addr = rt
        .block_on(tokio::net::lookup_host(peer))?
        .next()
        .with_context(|| format!("--peer {peer} resolves to no address"))?;
    let local = std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0);
    let failover = Failover::start(
        &rt,
        &status,
        pair,
        &settings.name,
        heartbeat::Role::Primary,
        &key_bytes,
        local,
        Some(peer_addr),
    )?
    .map(Arc::new);
    // Set once this primary carries on alone (won the arbiter).
    let unprotected = Arc::new(AtomicBool::new(false));
    // Set once the guest has stopped: a peer lost after that is no failure.
    let guest_ended = Arc::new(AtomicBool::new(false));
    let lost_arbiter = Arc::new(AtomicBool::new(false));

    let log = Arc::new(LogShared::default());
    log.set_acked(LogPosition(0));
    let mut output = LiveOutput::new(serial);
    if let Some(t) = &tap {
        output = output.with_tap(t.clone());
    }
    let (gate, releaser) = output_rule::gate(output, log.clone());
    let releaser = Arc::new(releaser);

    // Acks from the channel into the log; a failed channel stops the guest
    // (failover arrives with the heartbeat issue: without it, a primary
    // that lost its secondary must not carry on and hold outputs forever).
    let failure: Arc<Mutex<Option<ChannelError>>> = Arc::default();
    let stop_slot: Arc<Mutex<Option<StopHandle>>> = Arc::default();
    {
        let (ack_log, ack_chan, ack_status, ack_rel) = (log.clone(), chan.clone(), status.clone(), releaser.clone());
        let life = failover.clone();
        rt.spawn(async move {
            let mut acked = ack_chan.acked();
            loop {
                let upto = *acked.borrow_and_update();
                if let Some(f) = &life {
                    f.service.note_life();
                }
                ack_log.set_acked(upto);
                // Release what this ack allows right here, without waking
                // the releaser thread (it remains as the fallback).
                if let Err(e) = ack_rel.release_ready() {
                    tracing::warn!(error = %e, "releasing held outputs failed");
                }
                ack_status.acked_position.store(upto.0, Ordering::SeqCst);
                if acked.changed().await.is_err() {
                    return;
                }
            }
        });
        let (chan, failure, stop_slot, status) = (chan.clone(), failure.clone(), stop_slot.clone(), status.clone());
        let (life, ended) = (failover.clone(), guest_ended.clone());
        rt.spawn(async move {
            let e = chan.failed().await;
            status.peer_up.store(false, Ordering::SeqCst);
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            match &life {
                // With failover the arbiter decides, now rather than after
                // the heartbeats' silence; once the guest has stopped a
                // secondary that replayed to the end may well close first.
                Some(f) if !ended.load(Ordering::SeqCst) => f.channel_failed(),
                Some(_) => {}
                // Without it the guest must stop rather than hold outputs
                // forever.
                None => {
                    if let Some(stop) = stop_slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                        stop.stop();
                    }
                }
            }
        });
    }

    // The shipper: log tail → channel, from its own thread every couple of
    // milliseconds and from the vCPU thread at once when an output waits.
    let shipper = Arc::new(Shipper {
        log: log.clone(),
        chan: chan.clone(),
        status: status.clone(),
        releaser: releaser.clone(),
        state: Mutex::new(ShipState::default()),
        unprotected: unprotected.clone(),
    });
    {
        let s = shipper.clone();
        log.set_flusher(move || {
            if let Err(e) = s.ship(true) {
                tracing::debug!(error = %e, "shipping the log tail failed");
            }
        });
    }
    let shipping = Arc::new(AtomicBool::new(true));
    let shipper_thread = {
        let (shipper, shipping) = (shipper.clone(), shipping.clone());
        std::thread::Builder::new().name("shipper".into()).spawn(move || -> Result<(), ChannelError> {
            loop {
                let running = shipping.load(Ordering::SeqCst);
                shipper.log.wait_flush(Duration::from_millis(2));
                let backlogged = shipper.ship(false)?;
                if backlogged {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if !running {
                    shipper.chan.flush();
                    return Ok(());
                }
            }
        })?
    };
    let rel_thread = {
        let releaser = releaser.clone();
        std::thread::Builder::new().name("releaser".into()).spawn(move || releaser.run())?
    };
    // Once a second: progress as a tracing event.
    {
        let (status, log, releaser) = (status.clone(), log.clone(), releaser.clone());
        std::thread::Builder::new().name("progress".into()).spawn(move || {
            let mut last = (0u64, 0u64, Instant::now());
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let (pos, bytes) = (log.appended().0, status.log_bytes.load(Ordering::Relaxed));
                let secs = last.2.elapsed().as_secs_f64();
                let acked = log.acked().map_or(0, |a| a.0);
                tracing::info!(
                    role = "primary",
                    records_per_s = ((pos - last.0) as f64 / secs) as u64,
                    bytes_per_s = ((bytes - last.1) as f64 / secs) as u64,
                    log_position = pos,
                    acked,
                    replay_lag = pos.saturating_sub(acked),
                    outputs_held = releaser.held(),
                    ack_wait_us = releaser.last_wait_us(),
                    "replication progress"
                );
                last = (pos, bytes, Instant::now());
            }
        })?;
    }

    let tap_in = tap.clone();
    let rec_log = log.clone();
    let (obs_status, pos_log) = (status.clone(), log.clone());
    let input = move |stop: &StopHandle| -> Box<dyn InputSource> {
        let mut live = LiveInput::new(0, vec![stop.wake_fd()]);
        if let Some(t) = tap_in {
            live = live.with_tap(t);
        }
        Box::new(Observed {
            inner: Recorder::new(live, rec_log),
            status: obs_status,
            position: Arc::new(move || pos_log.appended().0),
        })
    };
    let memory_mib = config.memory_mib;
    let mut vm =
        Vm::new(&config, input, Box::new(gate)).with_context(|| format!("cannot start guest {}", settings.name))?;
    *stop_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm.stop_handle());
    if let Some(f) = failover.clone() {
        let (log, releaser, status, unprotected, lost_arbiter, stop, ended) = (
            log.clone(),
            releaser.clone(),
            status.clone(),
            unprotected.clone(),
            lost_arbiter.clone(),
            vm.stop_handle(),
            guest_ended.clone(),
        );
        rt.spawn(async move {
            let loss = f.peer_lost().await;
            status.peer_up.store(false, Ordering::SeqCst);
            if ended.load(Ordering::SeqCst) {
                return;
            }
            match f.arbiter.claim(f.generation, &f.owner) {
                Ok(heartbeat::Claim::Won { .. }) => {
                    // Carry on alone: every held output may go now.
                    unprotected.store(true, Ordering::SeqCst);
                    log.set_acked(LogPosition(u64::MAX / 2));
                    let _ = releaser.release_ready();
                    status.set_role("standalone");
                    status.failure("secondary lost", &loss, std::time::SystemTime::now());
                    eprintln!("ftvm: primary: the secondary is lost; won the arbiter, running UNPROTECTED");
                }
                Ok(heartbeat::Claim::Lost { .. }) | Err(_) => {
                    // The other copy lives (or nobody can tell): stop, emit nothing more.
                    lost_arbiter.store(true, Ordering::SeqCst);
                    stop.stop();
                }
            }
            f.service.stop();
        });
    }
    let caught = crate::stop_on_signals(&vm)?;
    let outcome = vm.run();
    guest_ended.store(true, Ordering::SeqCst);
    // Only a channel failure while the guest ran matters: once it stopped,
    // a secondary that replayed to the same end may well close first.
    let lost = failure.lock().unwrap_or_else(|p| p.into_inner()).take();

    let exit = vm.exit_index();
    if lost_arbiter.load(Ordering::SeqCst) {
        // Not a single held output goes out: the other copy is the live one.
        releaser.stop();
        eprintln!(
            "ftvm: primary {}: lost the arbiter: the secondary went live; stopped at exit {exit} without releasing anything",
            settings.name
        );
        return Ok(EXIT_LOST_ARBITER);
    }
    // Wind down: the secondary learns where the primary stopped, held
    // outputs go out as their acks arrive (bounded wait), then the channel
    // closes.
    log.append(Record::Shutdown { exit });
    log.request_flush();
    let deadline = Instant::now() + Duration::from_secs(5);
    while releaser.held() > 0 && Instant::now() < deadline && chan.error().is_none() {
        log.wait_changed(Duration::from_millis(10));
        let _ = releaser.release_ready();
    }
    status.outputs_held.store(releaser.held() as u64, Ordering::SeqCst);
    shipping.store(false, Ordering::SeqCst);
    log.request_flush();
    let shipped = shipper_thread.join().map_err(|_| anyhow!("the shipper thread panicked"))?;
    releaser.stop();
    let _ = rel_thread.join();
    if let Ok(chan) = Arc::try_unwrap(chan) {
        let _ = rt.block_on(chan.shutdown());
    }
    if let Some(path) = &pair.state_dump {
        dump_state(&mut vm, memory_mib, path)?;
    }
    status.set_state("stopped");
    if let Some(e) = lost.filter(|_| !unprotected.load(Ordering::SeqCst) && failover.is_none()) {
        return Err(anyhow!(e).context(format!(
            "primary {}: lost the secondary at exit {exit}; stopped the guest (failover arrives with the heartbeat issue)",
            settings.name
        )));
    }
    if let Err(e) = shipped {
        tracing::debug!(error = %e, "the channel closed while winding down");
    }
    crate::finish(settings, outcome, &caught)
}

/// `ftvm secondary`.
pub fn secondary(
    settings: &GuestSettings,
    config: VmConfig,
    serial: Box<dyn Write + Send>,
    pair: &PairSettings,
    listen: &str,
    ack_delay: Duration,
) -> Result<i32> {
    let key = SharedKey::from_file(&pair.key_file)?;
    let key_bytes = key.as_bytes().to_vec();
    let status = Status::new("secondary");
    status.set_state("waiting for the primary");
    serve_control(&pair.control, status.clone())?;
    let rt = runtime()?;
    let chan_config = ChannelConfig::new(key, identity(&config.elf, settings));
    let listener =
        rt.block_on(tokio::net::TcpListener::bind(listen)).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("ftvm: secondary {}: waiting for the primary on {listen}", settings.name);
    let mut chan = loop {
        match rt.block_on(SecondaryChannel::accept(&listener, chan_config.clone())) {
            Ok(c) => break c,
            Err(e @ (ChannelError::IdentityMismatch { .. } | ChannelError::Version { .. })) => {
                return Err(anyhow!(e).context("the primary's guest does not match this one"));
            }
            Err(e) => {
                // A wrong key or a broken connection: refuse it, keep waiting.
                eprintln!("ftvm: secondary {}: refused a connection: {e}", settings.name);
            }
        }
    };
    status.peer_up.store(true, Ordering::SeqCst);
    status.set_state("replaying");
    let local = listener.local_addr()?;
    let failover =
        Failover::start(&rt, &status, pair, &settings.name, heartbeat::Role::Secondary, &key_bytes, local, None)?
            .map(Arc::new);

    let (tx, rx) = crossbeam_channel::unbounded::<Record>();
    // Ends the receiving (and so the log) when failover decides.
    let cancel = Arc::new(tokio::sync::Notify::new());
    let clean_end = Arc::new(AtomicBool::new(false));
    let held = Arc::new(HeldOutputs::default());
    let lost: Arc<Mutex<Option<ChannelError>>> = Arc::default();
    // The ack-delay test knob: acks leave in order, each `ack_delay` after
    // its batch arrived, without slowing the receiving down.
    let delayed_acks = (!ack_delay.is_zero()).then(|| {
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, LogPosition)>();
        let acker = chan.acker();
        rt.spawn(async move {
            while let Some((at, upto)) = ack_rx.recv().await {
                tokio::time::sleep_until(at).await;
                if acker.ack(upto).is_err() {
                    return;
                }
            }
        });
        ack_tx
    });
    {
        let (status, held, lost) = (status.clone(), held.clone(), lost.clone());
        let (cancel, clean_end, life) = (cancel.clone(), clean_end.clone(), failover.clone());
        let mut released = chan.released();
        rt.spawn(async move {
            let channel_failed = |e: ChannelError| {
                *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                if let Some(f) = &life {
                    f.channel_failed();
                }
            };
            loop {
                tokio::select! {
                    _ = cancel.notified() => break,
                    batch = chan.recv() => match batch {
                        Ok(Some(batch)) => {
                            let last = batch.last();
                            let n = batch.records.len() as u64;
                            for r in batch.records {
                                let _ = tx.send(r);
                            }
                            status.received.fetch_add(n, Ordering::SeqCst);
                            if let Some(f) = &life {
                                // Log traffic is a sign of life too.
                                f.service.note_life();
                            }
                            if let Some(delayed) = &delayed_acks {
                                let _ = delayed.send((tokio::time::Instant::now() + ack_delay, last));
                                continue;
                            }
                            // Stored (in order, in memory): acknowledge now.
                            if let Err(e) = chan.ack(last) {
                                channel_failed(e);
                                break;
                            }
                        }
                        Ok(None) => {
                            clean_end.store(true, Ordering::SeqCst);
                            break;
                        }
                        Err(e) => {
                            channel_failed(e);
                            break;
                        }
                    },
                    changed = released.changed() => {
                        if changed.is_err() { continue; }
                        let upto = *released.borrow_and_update();
                        held.released(upto.0);
                        status.released_position.store(upto.0, Ordering::SeqCst);
                        status.outputs_held.store(held.len() as u64, Ordering::SeqCst);
                    }
                }
            }
            status.peer_up.store(false, Ordering::SeqCst);
            // Dropping `tx` lets the replayer see the end of the log.
        });
    }

    let consumed = Arc::new(AtomicU64::new(0));
    {
        let (status, consumed) = (status.clone(), consumed.clone());
        std::thread::Builder::new().name("progress".into()).spawn(move || {
            let mut last = (0u64, Instant::now());
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let done = consumed.load(Ordering::Relaxed);
                let received = status.received.load(Ordering::Relaxed);
                tracing::info!(
                    role = "secondary",
                    records_per_s = ((done - last.0) as f64 / last.1.elapsed().as_secs_f64()) as u64,
                    received,
                    replayed = done,
                    replay_lag = received.saturating_sub(done),
                    outputs_held = status.outputs_held.load(Ordering::Relaxed),
                    "replication progress"
                );
                last = (done, Instant::now());
            }
        })?;
    }
    // Failover: when the primary is dead, claim the arbiter; the replayer
    // then finishes the received log and goes live (or stops, having lost).
    let (decide, decisions) = crossbeam_channel::bounded::<Decision>(1);
    let lost_arbiter = Arc::new(AtomicBool::new(false));
    let decided_at: Arc<Mutex<Option<(Loss, std::time::SystemTime)>>> = Arc::default();
    match failover.clone() {
        None => drop(decide),
        Some(f) => {
            let (cancel, clean_end, lost_arbiter, decided_at, status) =
                (cancel.clone(), clean_end.clone(), lost_arbiter.clone(), decided_at.clone(), status.clone());
            rt.spawn(async move {
                let loss = f.peer_lost().await;
                if clean_end.load(Ordering::SeqCst) {
                    return;
                }
                status.peer_up.store(false, Ordering::SeqCst);
                cancel.notify_one();
                let decision = match f.arbiter.claim(f.generation, &f.owner) {
                    Ok(heartbeat::Claim::Won { .. }) => Decision::GoLive,
                    Ok(heartbeat::Claim::Lost { .. }) => {
                        lost_arbiter.store(true, Ordering::SeqCst);
                        Decision::Stop
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reach the arbiter: not going live");
                        Decision::Stop
                    }
                };
                *decided_at.lock().unwrap_or_else(|p| p.into_inner()) = Some((loss, std::time::SystemTime::now()));
                // A live copy sends no heartbeats as a secondary any more; a
                // stopping one neither.
                f.service.stop();
                let _ = decide.send(decision);
            });
        }
    }
    let went_live_at = Arc::new(AtomicU64::new(0));
    let (output, slot) = SwitchOutput::new(held.clone(), consumed.clone());
    let (obs_status, pos) = (status.clone(), consumed.clone());
    let rep_pos = consumed.clone();
    let (tap_name, mac, ip) = (settings.tap.clone(), settings.mac, settings.ip);
    let (live_status, live_decided, went) = (status.clone(), decided_at.clone(), went_live_at.clone());
    let input = move |stop: &StopHandle| -> Box<dyn InputSource> {
        let wake = stop.wake_fd();
        let attach: replication::go_live::Attach = Box::new(move |clock: u64| {
            let tap = match &tap_name {
                Some(name) => Some(Arc::new(
                    vmm::tap::Tap::open(name).map_err(|e| HookError::Network(std::io::Error::other(e.to_string())))?,
                )),
                None => None,
            };
            let mut input = LiveInput::new(clock, vec![wake]);
            let mut output = LiveOutput::new(serial);
            if let Some(t) = &tap {
                input = input.with_tap(t.clone());
                output = output.with_tap(t.clone());
                announce(t.clone(), mac, ip);
            }
            live_status.set_role("standalone");
            live_status.set_state("running");
            if let Some((loss, at)) = *live_decided.lock().unwrap_or_else(|p| p.into_inner()) {
                live_status.failure("primary lost", &loss, at);
            }
            Ok(LiveWorld { input: Box::new(input), output: Box::new(output) })
        });
        Box::new(Observed {
            inner: SwitchInput::new(
                Replayer::new(rx, stop.clone(), rep_pos),
                decisions,
                attach,
                slot,
                held,
                stop.clone(),
                went,
            ),
            status: obs_status,
            position: Arc::new(move || pos.load(Ordering::Relaxed)),
        })
    };
    let memory_mib = config.memory_mib;
    let mut vm =
        Vm::new(&config, input, Box::new(output)).with_context(|| format!("cannot start guest {}", settings.name))?;
    let caught = crate::stop_on_signals(&vm)?;
    let outcome = vm.run();
    status.set_state("stopped");
    if let Some(path) = &pair.state_dump {
        dump_state(&mut vm, memory_mib, path)?;
    }
    let exit = vm.exit_index();
    if lost_arbiter.load(Ordering::SeqCst) {
        eprintln!(
            "ftvm: secondary {}: the primary is unreachable but holds the arbiter; stopped at exit {exit}",
            settings.name
        );
        return Ok(EXIT_LOST_ARBITER);
    }
    if went_live_at.load(Ordering::SeqCst) > 0 {
        return crate::finish(settings, outcome, &caught);
    }
    match outcome {
        Err(VmError::Vcpu(VcpuError::Hook { source: HookError::Ended { .. }, .. })) => {
            if let Some(e) = lost.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(anyhow!(e).context(format!(
                    "secondary {}: lost the primary; replayed to exit {exit} (failover arrives with the heartbeat issue)",
                    settings.name
                )));
            }
            eprintln!("ftvm: secondary {}: the primary stopped; replayed to exit {exit}", settings.name);
            Ok(0)
        }
        Err(VmError::Vcpu(VcpuError::Hook { source: e @ HookError::Diverged { .. }, .. })) => {
            status.divergences.fetch_add(1, Ordering::SeqCst);
            Err(anyhow!(e).context(format!("secondary {}: replay diverged", settings.name)))
        }
        other => crate::finish(settings, other, &caught),
    }
}
