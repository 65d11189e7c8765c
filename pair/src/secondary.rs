//! The secondary session: replays the primary's log with outputs
//! suppressed, acks each batch once stored, and goes live when the primary
//! is lost and the arbiter is won.
//!
//! Tasks it owns on its tokio runtime: the receiving task (channel →
//! record queue → replayer; acks; released reports), with failover the
//! heartbeats and the one failover decision, and with `--ack-delay-ms` the
//! ack delayer. The vCPU thread belongs to the caller, which plugs the
//! input and output that [`SecondarySession::hooks`] returns into its guest.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use replication::channel::{Acker, ChannelConfig, ChannelError, SecondaryChannel};
use replication::go_live::{Attach, Decision, LiveWorld, SwitchInput, SwitchOutput};
use replication::record::{FaultKind, LogPosition, Record};
use replication::replayer::{ReplayLimits, Replayer};
use replication::suppressed::HeldOutputs;
use tokio::sync::Notify;
use vmm::devices::DeviceError;
use vmm::hook::{ExitIndex, HookError, InputSource, OutputSink};
use vmm::vcpu::{RunOutcome, StopHandle, VcpuError};
use vmm::VmError;

use crate::control::ControlSocket;
use crate::failover::{Failover, FailoverConfig, Verdict};
use crate::health::{Health, OutputMode, Source};
use crate::observed::Observed;
use crate::queues::{self, DelayedAck, RECEIVE_BACKOFF};
use crate::status::{Board, Loss, Role};

/// Settings of a secondary session.
pub struct SecondaryConfig {
    pub name: String,
    /// `--listen`.
    pub listen: String,
    pub channel: ChannelConfig,
    /// `None`: no arbiter, so a lost primary ends replay.
    pub failover: Option<FailoverConfig>,
    pub control: Option<PathBuf>,
    /// `--ack-delay-ms` (a test knob): each ack leaves this long after its
    /// batch arrived.
    pub ack_delay: Duration,
    /// Application health and containment; `None`: none (as with
    /// `--containment off`).
    pub health: Option<Arc<Health>>,
}

impl SecondaryConfig {
    pub fn new(name: impl Into<String>, listen: impl Into<String>, channel: ChannelConfig) -> SecondaryConfig {
        SecondaryConfig {
            name: name.into(),
            listen: listen.into(),
            channel,
            failover: None,
            control: None,
            ack_delay: Duration::ZERO,
            health: None,
        }
    }
}

/// Builds the live world at go-live from the last logged clock reading
/// (ns) and the fd a live HLT sleep must also wait on.
pub type MakeLive = Box<dyn FnOnce(u64, RawFd) -> Result<LiveWorld, HookError> + Send>;

/// How a secondary session ended.
#[derive(Debug)]
pub enum SecondaryEnd {
    /// It went live; the guest then ended as the outcome says.
    WentLive(Result<RunOutcome, VmError>),
    /// The primary lives and holds the arbiter: this copy stopped (exit 4).
    LostArbiter,
    /// The primary could not be declared lost safely (arbiter unreachable):
    /// this copy stopped without going live.
    ArbiterUnreachable(heartbeat::ArbiterError),
    /// The primary ended cleanly and replay reached the same point.
    PrimaryStopped,
    /// The primary was lost and there is no arbiter: replay ended there.
    PrimaryLost(ChannelError),
    /// Replay diverged from the log.
    Diverged(VmError),
    /// Anything else the guest did.
    Guest(Result<RunOutcome, VmError>),
    /// This copy went live, a repair paired it again, and then its guest
    /// faulted: the fault was handed over to the new secondary, which goes
    /// live from the last barrier (exit status 4, as a primary's).
    HandedOver(crate::health::Detected),
    /// This copy went live and was later switched over (`ftvm switchover`
    /// on it as the primary): the other copy is live, this one's guest
    /// must not run again.
    SwitchedOver(crate::switchover::Switched),
}

/// The state the session's tasks share.
struct SecondaryShared {
    /// The primary's clean end arrived (its Shutdown record, or the
    /// channel's orderly close).
    clean_end: AtomicBool,
    /// The channel's failure.
    channel_error: Mutex<Option<ChannelError>>,
    /// The failover decision, once made.
    verdict: Mutex<Option<(Loss, SystemTime, Verdict)>>,
    /// The exit index at which the guest went live (0: not live).
    went_live_at: Arc<AtomicU64>,
    /// Where replay holds: the last barrier received, a reported fault.
    limits: Arc<ReplayLimits>,
    /// When the last barrier arrived.
    last_barrier_at: Mutex<Option<Instant>>,
    /// The primary's guest fault: its kind and exit, when it arrived, and
    /// when the last barrier before it had.
    fault: Mutex<Option<ReceivedFault>>,
    /// The go-live is a containment (decided on the primary's fault).
    contained: AtomicBool,
    /// The primary's switchover record: its exit, and when it arrived.
    switch: Mutex<Option<(ExitIndex, Instant)>>,
}

/// A fault the primary reported.
#[derive(Clone, Copy, Debug)]
struct ReceivedFault {
    kind: FaultKind,
    exit: ExitIndex,
    arrived: Instant,
    last_barrier_at: Option<Instant>,
}

/// The secondary's failover: started with the pair, or, on a standby that
/// took the guest from a live transfer, once the arbiter is free (the
/// primary frees it when the new copy acknowledged its whole log).
enum Slot {
    Waiting,
    /// The channel failed first: replay ends, this copy never goes live.
    Closed,
    Ready(Arc<Failover>),
}

pub(crate) struct FailoverSlot(Mutex<Slot>);

impl FailoverSlot {
    fn new(f: Option<Arc<Failover>>) -> Arc<FailoverSlot> {
        Arc::new(FailoverSlot(Mutex::new(f.map_or(Slot::Waiting, Slot::Ready))))
    }
    fn get(&self) -> Option<Arc<Failover>> {
        match &*lock(&self.0) {
            Slot::Ready(f) => Some(f.clone()),
            _ => None,
        }
    }
    /// The channel failed: the failover to tell, or `None` (no failover
    /// started, and none will: replay ends).
    fn on_failure(&self) -> Option<Arc<Failover>> {
        let mut slot = lock(&self.0);
        match &*slot {
            Slot::Ready(f) => Some(f.clone()),
            _ => {
                *slot = Slot::Closed;
                None
            }
        }
    }
    /// Install a failover started late; `false` when the channel failed
    /// first (it must not run).
    fn set(&self, f: Arc<Failover>) -> bool {
        let mut slot = lock(&self.0);
        if matches!(*slot, Slot::Waiting) {
            *slot = Slot::Ready(f);
            return true;
        }
        false
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a copy that goes live needs to re-protect itself (`--standby`):
/// at go-live its guest is handed to a primary session started alone,
/// which records its log and gates its outputs, so that a repair can pair
/// it with a standby as any lone primary.
struct Relive {
    name: String,
    /// `--listen`: where this process waits as the new primary's
    /// secondary after a switchover of its own.
    listen: String,
    channel: ChannelConfig,
    failover: Option<FailoverConfig>,
    repair: Mutex<Option<(Vec<String>, vmm::checkpoint::Checkpointer)>>,
    session: Mutex<Option<crate::primary::PrimarySession>>,
}

/// A running secondary session.
pub struct SecondarySession {
    relive: Arc<Relive>,
    board: Arc<Board>,
    _control: Option<ControlSocket>,
    _rt: tokio::runtime::Runtime,
    failover: Arc<FailoverSlot>,
    shared: Arc<SecondaryShared>,
    held: Arc<HeldOutputs>,
    consumed: Arc<AtomicU64>,
    records: Receiver<Record>,
    decisions: Receiver<Decision>,
    local: std::net::SocketAddr,
    health: Option<Arc<Health>>,
}

impl SecondarySession {
    /// Serve the control socket, wait for an authenticated primary, then
    /// start receiving, heartbeats and the failover decision.
    pub fn accept(config: SecondaryConfig) -> Result<SecondarySession> {
        if let Some(f) = &config.failover {
            crate::failover::check_free(&f.arbiter)?;
        }
        let (board, control, rt, listener) = Self::listen(&config, "waiting for the primary")?;
        Self::pair_within(config, board, control, rt, listener, false, None)
    }

    /// A standby (`ftvm secondary` without guest settings): wait for a
    /// primary's live transfer (authenticated with the pair's key; one that
    /// fails is dropped and the next awaited), take the guest's identity
    /// and name from it, then pair as [`SecondarySession::accept`] does,
    /// replaying from the transfer's checkpoint on. `expected`: settings this
    /// host was given, which the transfer's must match. Failover starts once
    /// the arbiter is free: the primary frees it when this copy acknowledged
    /// its whole log.
    pub fn accept_transfer(
        mut config: SecondaryConfig,
        expected: Option<&vmm::checkpoint::GuestSettings>,
    ) -> Result<(SecondarySession, replication::transfer::Received)> {
        let (board, control, rt, listener) = Self::listen(&config, "standby: waiting for a primary's transfer")?;
        let key = config.channel.key.as_bytes().to_vec();
        let received = loop {
            let accepted = rt.block_on(crate::unless_signalled(listener.accept()))?;
            let (stream, from) = accepted.with_context(|| format!("cannot accept on {}", config.listen))?;
            let stream = stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s));
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot take a transfer connection");
                    continue;
                }
            };
            board.set_state(format!("standby: receiving the guest's state from {from}"));
            let io_timeout = Duration::from_secs(10);
            let (key, expected) = (key.clone(), expected.cloned());
            match rt.block_on(crate::unless_signalled(async {
                tokio::task::spawn_blocking(move || {
                    replication::transfer::receive(stream, &key, expected.as_ref(), io_timeout)
                })
                .await
            }))? {
                Ok(Ok(r)) => break r,
                Ok(Err(e)) => {
                    eprintln!(
                        "ftvm: secondary {}: the transfer from {from} failed: {e}; waiting for another",
                        config.name
                    );
                    board.set_state("standby: waiting for a primary's transfer");
                }
                Err(e) => return Err(anyhow!(e).context("the transfer task failed")),
            }
        };
        let (identity, name) = crate::repair::decode_identity(&received.identity)?;
        config.channel.identity = identity;
        if !name.is_empty() {
            config.name = name;
        }
        eprintln!(
            "ftvm: secondary {}: took the guest's state ({} pages, {} rounds) at guest exit #{}; waiting for the log",
            config.name, received.pages, received.rounds, received.state.exit_index
        );
        board.set_name(&config.name);
        board.set_state("waiting for the primary");
        let session = Self::pair_within(config, board, control, rt, listener, true, None)?;
        session.board.exit_index.store(received.state.exit_index.0, Ordering::SeqCst);
        Ok((session, received))
    }

    /// The old primary of a planned switchover: its stopped guest is at
    /// `at`, the switch's exit, and the VM the caller builds from it (the
    /// same memory, no transfer) replays the new primary's log from its
    /// first record on. Waits on `listener` (bound before the switch) for
    /// the new primary's channel, at most `wait` ([`NoPrimary`]: the new
    /// primary re-protects by transfer instead). Failover starts once the
    /// arbiter is free, as on a standby.
    pub fn accept_switched(
        config: SecondaryConfig,
        board: Arc<Board>,
        listener: std::net::TcpListener,
        at: ExitIndex,
        wait: Duration,
    ) -> Result<SecondarySession> {
        board.start_over(Role::Secondary, "switched over: waiting for the new primary's log");
        board.exit_index.store(at.0, Ordering::SeqCst);
        let control = config.control.as_deref().map(|p| ControlSocket::serve(p, board.clone())).transpose()?;
        let rt = crate::runtime()?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = rt.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        eprintln!(
            "ftvm: secondary {}: switched over at guest exit #{at}: waiting for the new primary's log on {}",
            config.name,
            listener.local_addr()?
        );
        Self::pair_within(config, board, control, rt, listener, true, Some(wait))
    }

    fn listen(
        config: &SecondaryConfig,
        state: &str,
    ) -> Result<(Arc<Board>, Option<ControlSocket>, tokio::runtime::Runtime, tokio::net::TcpListener)> {
        let board = Arc::new(Board::new(config.name.clone(), Role::Secondary));
        board.set_state(state);
        let control = config.control.as_deref().map(|p| ControlSocket::serve(p, board.clone())).transpose()?;
        let rt = crate::runtime()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(config.listen.as_str()))
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local = listener.local_addr()?;
        eprintln!("ftvm: secondary {}: {state} on {local}", config.name);
        Ok((board, control, rt, listener))
    }

    /// Wait on `listener` for the primary and pair with it; with `wait`,
    /// give up ([`NoPrimary`]) when no primary pairs within it.
    fn pair_within(
        config: SecondaryConfig,
        board: Arc<Board>,
        control: Option<ControlSocket>,
        rt: tokio::runtime::Runtime,
        listener: tokio::net::TcpListener,
        late_failover: bool,
        wait: Option<Duration>,
    ) -> Result<SecondarySession> {
        let local = listener.local_addr()?;
        let chan = accept(&rt, &listener, &config, wait)?;
        board.set_peer(true);
        board.set_state("replaying");
        let key = config.channel.key.as_bytes().to_vec();
        let failover = match &config.failover {
            Some(f) if !late_failover => {
                let role = heartbeat::Role::Secondary;
                Some(Arc::new(rt.block_on(Failover::start(f, &board, &config.name, role, &key, local, None))?))
            }
            _ => None,
        };
        let containment = config.health.as_ref().is_some_and(|h| h.containment());
        match &config.health {
            Some(h) => board.set_health(h.containment(), h.config().output_mode),
            None => board.set_health(false, OutputMode::Fast),
        }
        let shared = Arc::new(SecondaryShared {
            clean_end: AtomicBool::new(false),
            channel_error: Mutex::new(None),
            verdict: Mutex::new(None),
            went_live_at: Arc::new(AtomicU64::new(0)),
            limits: Arc::new(ReplayLimits::new(containment)),
            last_barrier_at: Mutex::new(None),
            fault: Mutex::new(None),
            contained: AtomicBool::new(false),
            switch: Mutex::new(None),
        });
        let held = Arc::new(HeldOutputs::default());
        let slot = FailoverSlot::new(failover.clone());
        let (tx, records) = queues::received_records();
        let cancel = Arc::new(Notify::new());
        let contain = Arc::new(Notify::new());
        let switch = Arc::new(Notify::new());
        let (decide, decisions) = queues::decisions();
        let consumed = Arc::new(AtomicU64::new(0));
        let receiving = Receiving {
            board: board.clone(),
            shared: shared.clone(),
            held: held.clone(),
            failover: slot.clone(),
            tx,
            cancel: cancel.clone(),
            delayed: spawn_ack_delayer(&rt, &chan, config.ack_delay),
            ack_delay: config.ack_delay,
            contain: contain.clone(),
            switch: switch.clone(),
            // Without failover nothing may go live: a lost primary or a
            // fault ends replay.
            decide: decide.clone(),
            consumed: consumed.clone(),
        };
        rt.spawn(receiving.run(chan));
        if let Some(f) = failover.clone() {
            rt.spawn(decide_failover(f, board.clone(), shared.clone(), cancel, contain, switch, decide));
        } else if let (Some(fc), true) = (config.failover.clone(), late_failover) {
            let late = LateFailover {
                config: fc,
                name: config.name.clone(),
                key,
                local,
                board: board.clone(),
                shared: shared.clone(),
                slot: slot.clone(),
                consumed: consumed.clone(),
                cancel,
                contain,
                switch,
                decide,
            };
            rt.spawn(late.run());
        } else {
            drop(decide);
        }
        crate::progress::secondary(&board, &consumed)?;
        if let (Some(f), Some(fc)) = (&failover, &config.failover) {
            crate::lag::spawn_secondary_reporter(
                rt.handle(),
                board.clone(),
                f.clone(),
                consumed.clone(),
                fc.heartbeat / 2,
            );
        }
        eprintln!("ftvm: secondary {}: paired with the primary: replaying", config.name);
        let relive = Arc::new(Relive {
            name: config.name.clone(),
            listen: config.listen.clone(),
            channel: config.channel.clone(),
            failover: config.failover.clone(),
            repair: Mutex::new(None),
            session: Mutex::new(None),
        });
        Ok(SecondarySession {
            relive,
            board,
            _control: control,
            _rt: rt,
            failover: slot,
            shared,
            held,
            consumed,
            records,
            decisions,
            local,
            health: config.health,
        })
    }

    /// The status board.
    pub fn board(&self) -> Arc<Board> {
        self.board.clone()
    }

    /// The address the session listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }

    /// The guest's input source (replay, then live) as a factory taking the
    /// guest's stop handle, and its output sink (suppressed, then live).
    pub fn hooks(
        &self,
        make_live: MakeLive,
    ) -> (impl FnOnce(&StopHandle) -> Box<dyn InputSource>, Box<dyn OutputSink>) {
        let (output, slot) = SwitchOutput::new(self.held.clone(), self.consumed.clone());
        let (board, shared, held, consumed) =
            (self.board.clone(), self.shared.clone(), self.held.clone(), self.consumed.clone());
        let (records, decisions) = (self.records.clone(), self.decisions.clone());
        let health = self.health.clone();
        let (relive, slot_f) = (self.relive.clone(), self.failover.clone());
        let input = move |stop: &StopHandle| -> Box<dyn InputSource> {
            let wake = stop.wake_fd();
            let went = shared.went_live_at.clone();
            let live_board = board.clone();
            let live_shared = shared.clone();
            let live_stop = stop.clone();
            let health_live = health.clone();
            let held_live = held.clone();
            let attach: Attach = Box::new(move |clock: u64| {
                let mut world = make_live(clock, wake)?;
                let repair = lock(&relive.repair).take();
                if let Some(h) = &health {
                    // Live now: this copy's own health sources watch it.
                    world.input = Box::new(h.input(crate::health::BoxedInput(world.input)));
                    if repair.is_none() {
                        // Nobody to log barriers for: reports only. (With
                        // a repair, the primary session's barrier sink
                        // takes them, below.)
                        world.output = Box::new(h.sink(crate::primary::DynSink(world.output)));
                    }
                    h.arm();
                    if let Err(e) = h.watch(live_stop.clone()) {
                        tracing::error!(error = %e, "cannot start the health watchdog");
                    }
                }
                let switch = *lock(&live_shared.switch);
                if let Some((exit, _)) = switch {
                    // Every output up to the switch's exit was released by
                    // the primary: only what this copy made past it is new.
                    held_live.released_through_exit(exit);
                }
                if let Some((standby, checkpointer)) = repair {
                    // Live and alone: record and gate from here, so that a
                    // standby can be brought in.
                    let mut pc = crate::primary::PrimaryConfig::new(&relive.name, "", relive.channel.clone());
                    pc.failover = relive.failover.clone();
                    pc.standby = standby;
                    // Barriers and containment go on in the new pair.
                    pc.health = health_live.clone();
                    // Switched over, this process waits as the secondary on
                    // its own --listen again.
                    pc.switch_listen = Some(relive.listen.clone());
                    // Went live by a switchover: the old primary holds the
                    // state at the switch and waits for the log from here.
                    pc.rejoin = switch.is_some();
                    let (session, sink) =
                        crate::primary::PrimarySession::start_alone(pc, live_board.clone(), world.output, slot_f.get())
                            .map_err(|e| HookError::Output(std::io::Error::other(format!("{e:#}"))))?;
                    world.input = session.input(crate::health::BoxedInput(world.input));
                    world.output = sink;
                    session.running_alone(live_stop.clone());
                    if let Err(e) = session.repair_with(checkpointer) {
                        tracing::error!(error = %e, "cannot start re-protection");
                    }
                    *lock(&relive.session) = Some(session);
                }
                live_board.set_role(Role::Standalone);
                // What was held is re-emitted right after this: none is left.
                live_board.outputs_held.store(0, Ordering::SeqCst);
                live_board.set_state("running: live, unprotected");
                let fault = *lock(&live_shared.fault);
                if let (Some(h), Some(_)) = (&health_live, fault) {
                    h.recovered(crate::health::Recovery::Containment);
                }
                if let Some(f) = fault {
                    // Went live from the last barrier, not into the fault
                    // (also when the primary's host failed at the same time).
                    let reaction = f.last_barrier_at.map_or(Duration::ZERO, |b| f.arrived.saturating_duration_since(b));
                    let recovery = f.arrived.elapsed();
                    live_board.fault(crate::status::FaultEvent {
                        source: Source::of(f.kind),
                        fault: f.kind,
                        action: "contained",
                        escalated: false,
                        at: crate::status::rfc3339(SystemTime::now()),
                        exit: Some(f.exit.0),
                        barrier_exit: live_shared.limits.last_barrier().map(|b| b.0),
                        reaction_ms: crate::status::millis(reaction),
                        recovery_ms: crate::status::millis(recovery),
                        outage_ms: crate::status::millis(reaction + recovery),
                    });
                }
                if let Some((exit, arrived)) = switch {
                    let event =
                        crate::status::SwitchoverEvent::now("primary", exit.0, arrived.elapsed(), SystemTime::now());
                    eprintln!(
                        "ftvm: secondary {}: switchover: live from guest exit #{exit}, {:.2} ms after the primary's word",
                        live_board.snapshot().name,
                        event.pause_ms
                    );
                    live_board.switched(event);
                } else if !live_shared.contained.load(Ordering::SeqCst) {
                    if let Some((loss, at, _)) = lock(&live_shared.verdict).as_ref() {
                        live_board.failure("primary lost", loss, *at);
                    }
                }
                eprintln!("ftvm: secondary {}: went live; running UNPROTECTED", live_board.snapshot().name);
                Ok(world)
            });
            let mut replayer = Replayer::new(records, stop.clone(), consumed.clone());
            if let Some(at) = test_divergence_at() {
                replayer = replayer.skew_clock_at(at);
            }
            let switch = SwitchInput::new(replayer, decisions, attach, slot, held, stop.clone(), went)
                .with_limits(shared.limits.clone());
            Box::new(Observed { inner: switch, board, position: Arc::new(move || consumed.load(Ordering::Relaxed)) })
        };
        (input, Box::new(output))
    }

    /// Application health of this copy (live after go-live).
    pub fn health(&self) -> Option<Arc<Health>> {
        self.health.clone()
    }

    /// With `--standby`: once live, re-protect onto these spares
    /// (`checkpointer`: the VM's). Call before the guest runs.
    pub fn repair_with(&self, checkpointer: vmm::checkpoint::Checkpointer, standby: Vec<String>) {
        if !standby.is_empty() {
            *lock(&self.relive.repair) = Some((standby, checkpointer));
        }
    }

    /// The guest stopped: say how the session ended.
    pub fn finish(self, outcome: Result<RunOutcome, VmError>) -> SecondaryEnd {
        let exit = ExitIndex(self.board.exit_index.load(Ordering::SeqCst));
        self.finish_at(exit, outcome)
    }

    /// [`SecondarySession::finish`], the guest having stopped at `exit`.
    pub fn finish_at(self, exit: ExitIndex, outcome: Result<RunOutcome, VmError>) -> SecondaryEnd {
        if let Some(h) = &self.health {
            h.close();
        }
        let relived = lock(&self.relive.session).take();
        if let Some(session) = relived {
            // Live, and maybe re-protected: tell the new secondary where the
            // guest stopped (or learn that it took over); a guest fault is
            // contained onto it as a primary's is (`--on-fault` when this
            // copy runs alone).
            match session.finish_outcome(exit, &outcome) {
                Ok(crate::primary::PrimaryEnd::LostArbiter) => {
                    self.board.set_state("stopped: lost the arbiter");
                    return SecondaryEnd::LostArbiter;
                }
                Ok(crate::primary::PrimaryEnd::SwitchedOver(event)) => {
                    return SecondaryEnd::SwitchedOver(event);
                }
                Ok(crate::primary::PrimaryEnd::HandedOver(fault)) => {
                    if let Some(f) = self.failover.get() {
                        f.release();
                    }
                    return SecondaryEnd::HandedOver(fault);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "winding the re-protected copy down failed"),
            }
        }
        self.board.set_state("stopped");
        if let Some(f) = self.failover.get() {
            // The guest stopped, live or not (a win is followed by the rest
            // of the replay, where the guest may power off, diverge or be
            // stopped): this copy owns the guest no more.
            f.release();
        }
        if self.shared.went_live_at.load(Ordering::SeqCst) > 0 {
            return SecondaryEnd::WentLive(outcome);
        }
        match lock(&self.shared.verdict).take() {
            Some((_, _, Verdict::Won)) if crate::health::classify(&outcome).is_some() => {
                // Won the arbiter, but the log it replayed to go live led
                // into a guest fault (the primary's host died with the
                // fatal input logged and its fault not): this copy owns the
                // guest, so its fault is handled as a live copy's.
                return SecondaryEnd::WentLive(outcome);
            }
            Some((_, _, Verdict::Lost)) => return SecondaryEnd::LostArbiter,
            Some((_, _, Verdict::Unreachable(e))) => return SecondaryEnd::ArbiterUnreachable(e),
            _ => {}
        }
        match outcome.as_ref().err().and_then(hook_error) {
            Some(HookError::Ended { .. }) => match lock(&self.shared.channel_error).take() {
                Some(e) if !self.shared.clean_end.load(Ordering::SeqCst) => SecondaryEnd::PrimaryLost(e),
                _ => SecondaryEnd::PrimaryStopped,
            },
            Some(HookError::Diverged { .. }) => {
                self.board.count_divergence();
                match outcome {
                    Err(e) => SecondaryEnd::Diverged(e),
                    Ok(o) => SecondaryEnd::Guest(Ok(o)),
                }
            }
            _ => SecondaryEnd::Guest(outcome),
        }
    }
}

/// A test hook: `FTVM_TEST_DIVERGE_AT_EXIT=N` makes the first replay of
/// this process serve the clock readings at or past exit N one nanosecond
/// off, so that replay diverges at the next digest (tests of divergence
/// handling; once per process, so a copy that heals by a fresh transfer
/// replays true).
fn test_divergence_at() -> Option<ExitIndex> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let at = std::env::var("FTVM_TEST_DIVERGE_AT_EXIT").ok()?.parse().ok()?;
    (!TAKEN.swap(true, Ordering::SeqCst)).then_some(ExitIndex(at))
}

/// The replication hook's error behind a guest's end, whether the vCPU loop
/// or a device (the NIC reading a frame) met it.
fn hook_error(e: &VmError) -> Option<&HookError> {
    match e {
        VmError::Vcpu(VcpuError::Hook { source, .. }) => Some(source),
        VmError::Vcpu(VcpuError::Device { source: DeviceError::Hook { source, .. }, .. }) => Some(source),
        _ => None,
    }
}

/// No primary paired within the time given.
#[derive(Debug, thiserror::Error)]
#[error("no primary paired within {} s", .0.as_secs())]
pub struct NoPrimary(pub Duration);

/// Wait for an authenticated primary of the same guest. The channel
/// refuses (and logs) a wrong key, a broken or idle connection, garbage or
/// another protocol version, and keeps waiting, handshaking with several
/// candidates at once; it returns an error only for an authenticated
/// primary of another guest, or a listener that waiting cannot cure.
fn accept(
    rt: &tokio::runtime::Runtime,
    listener: &tokio::net::TcpListener,
    config: &SecondaryConfig,
    wait: Option<Duration>,
) -> Result<SecondaryChannel> {
    let accepting = SecondaryChannel::accept(listener, config.channel.clone());
    let accepted = match wait {
        None => rt.block_on(crate::unless_signalled(accepting))?,
        Some(wait) => {
            match rt.block_on(crate::unless_signalled(async { tokio::time::timeout(wait, accepting).await }))? {
                Ok(accepted) => accepted,
                Err(_) => return Err(NoPrimary(wait).into()),
            }
        }
    };
    accepted.map_err(|e| match e {
        ChannelError::IdentityMismatch { .. } => anyhow!(e).context("the primary's guest does not match this one"),
        e => anyhow!(e).context(format!("cannot accept the primary on {}", config.listen)),
    })
}

/// The ack-delay test knob: acks leave in order, each `delay` after its
/// batch arrived, without slowing the receiving down.
fn spawn_ack_delayer(
    rt: &tokio::runtime::Runtime,
    chan: &SecondaryChannel,
    delay: Duration,
) -> Option<tokio::sync::mpsc::Sender<DelayedAck>> {
    if delay.is_zero() {
        return None;
    }
    let (tx, mut rx) = queues::delayed_acks();
    let acker: Acker = chan.acker();
    rt.spawn(async move {
        while let Some((at, upto)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if acker.ack(upto).is_err() {
                return;
            }
        }
    });
    Some(tx)
}

/// A standby's failover, started once the arbiter is free (the primary
/// frees the generation it won when this copy holds its whole log): until
/// then a lost primary ends replay here, and this copy never goes live.
struct LateFailover {
    config: FailoverConfig,
    name: String,
    key: Vec<u8>,
    local: std::net::SocketAddr,
    board: Arc<Board>,
    shared: Arc<SecondaryShared>,
    slot: Arc<FailoverSlot>,
    consumed: Arc<AtomicU64>,
    cancel: Arc<Notify>,
    contain: Arc<Notify>,
    switch: Arc<Notify>,
    decide: Sender<Decision>,
}

impl LateFailover {
    async fn run(self) {
        loop {
            if lock(&self.shared.channel_error).is_some() || self.shared.clean_end.load(Ordering::SeqCst) {
                return;
            }
            let role = heartbeat::Role::Secondary;
            match Failover::start(&self.config, &self.board, &self.name, role, &self.key, self.local, None).await {
                Ok(f) => {
                    let f = Arc::new(f);
                    if !self.slot.set(f.clone()) {
                        f.stop_heartbeats();
                        return;
                    }
                    let handle = tokio::runtime::Handle::current();
                    let every = self.config.heartbeat / 2;
                    crate::lag::spawn_secondary_reporter(&handle, self.board.clone(), f.clone(), self.consumed, every);
                    eprintln!("ftvm: secondary {}: in sync with the primary: protected", self.name);
                    decide_failover(f, self.board, self.shared, self.cancel, self.contain, self.switch, self.decide)
                        .await;
                    return;
                }
                Err(e) if e.is::<crate::failover::LiveElsewhere>() => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start failover with the primary");
                    eprintln!("ftvm: secondary {}: cannot start failover: {e:#}", self.name);
                    return;
                }
            }
        }
    }
}

/// The receiving task's state.
struct Receiving {
    board: Arc<Board>,
    shared: Arc<SecondaryShared>,
    held: Arc<HeldOutputs>,
    failover: Arc<FailoverSlot>,
    tx: Sender<Record>,
    cancel: Arc<Notify>,
    delayed: Option<tokio::sync::mpsc::Sender<DelayedAck>>,
    ack_delay: Duration,
    /// Told when the primary's fault is stored and acknowledged.
    contain: Arc<Notify>,
    /// Told when the primary's switchover is stored and acknowledged.
    switch: Arc<Notify>,
    /// Without failover: ends replay when the primary is lost or faulted.
    decide: Sender<Decision>,
    /// Records replayed; a copy that took its state from a transfer starts
    /// at the position before the first record it receives.
    consumed: Arc<AtomicU64>,
}

impl Receiving {
    /// Receive batches, queue their records for the replayer, ack them;
    /// forget held outputs the primary released. Dropping `tx` at the end
    /// lets the replayer see the end of the log.
    async fn run(self, mut chan: SecondaryChannel) {
        let mut released = chan.released();
        // The channel's failure, told at once: the batches queued before it
        // are still stored for the replayer below, but the failover decision
        // need not wait for them (a killed primary is seen by its channel
        // closing, not by the heartbeats' later silence).
        let failed = chan.on_failure();
        tokio::pin!(failed);
        let mut told = false;
        let mut based = false;
        loop {
            tokio::select! {
                // In this order: a batch the channel already holds is stored
                // before its failure is acted on, so a primary's orderly end
                // (its Shutdown record, then the close) is never taken for a
                // loss that stops replay short of the log's end.
                biased;
                () = self.cancel.notified() => {
                    // The peer is lost: what the channel already received
                    // is still stored for the replayer (a primary whose
                    // channel failed is told early, above, before the
                    // batches queued ahead of its failure are taken).
                    while let Ok(Ok(Some(batch))) = tokio::time::timeout(Duration::ZERO, chan.recv()).await {
                        if !self.store(batch.records).await {
                            break;
                        }
                    }
                    break;
                }
                batch = chan.recv() => match batch {
                    Ok(Some(batch)) => {
                        if !based {
                            // Nothing is replayed before the first batch.
                            self.consumed.store(batch.first.0.saturating_sub(1), Ordering::SeqCst);
                            based = true;
                        }
                        let last = batch.last();
                        if !self.store(batch.records).await {
                            break;
                        }
                        if let Err(e) = self.ack(&chan, last).await {
                            if !told {
                                self.channel_failed(e);
                            }
                            break;
                        }
                        if lock(&self.shared.switch).is_some() {
                            // Stored and acknowledged: claim and go live at
                            // the end of the log (a failover started late
                            // finds the permit when it starts).
                            self.switch.notify_one();
                        }
                        if lock(&self.shared.fault).is_some() {
                            // Stored and acknowledged: the primary hands over.
                            // The channel stays open until the primary closes
                            // it, so that its ack is not lost in a reset.
                            match self.failover.get() {
                                None => {
                                    let _ = self.decide.send(Decision::Stop);
                                }
                                Some(_) => self.contain.notify_one(),
                            }
                        }
                    }
                    Ok(None) => {
                        self.shared.clean_end.store(true, Ordering::SeqCst);
                        self.shared.limits.primary_ended();
                        break;
                    }
                    Err(e) => {
                        if !told {
                            self.channel_failed(e);
                        }
                        break;
                    }
                },
                e = &mut failed, if !told => {
                    told = true;
                    self.channel_failed(e);
                }
                changed = released.changed() => {
                    if changed.is_err() { continue; }
                    let upto = *released.borrow_and_update();
                    self.held.released(upto.0);
                    self.board.released_position.store(upto.0, Ordering::SeqCst);
                    self.board.outputs_held.store(self.held.len() as u64, Ordering::SeqCst);
                }
            }
        }
        self.board.set_peer(false);
    }

    /// Queue records for the replayer; while the queue is full, wait (the
    /// channel is not read, so acks stop and the primary sees the lag).
    /// `false` when the replayer is gone or the session is cancelled.
    async fn store(&self, records: Vec<Record>) -> bool {
        let n = records.len() as u64;
        if let Some(f) = self.failover.get() {
            // Log traffic is a sign of life too.
            f.note_life();
        }
        for r in records {
            if let Record::Switchover { exit } = &r {
                // A planned switchover: nothing before it can be rolled
                // back (every output was released), so replay all of it.
                self.shared.limits.primary_ended();
                *lock(&self.shared.switch) = Some((*exit, Instant::now()));
            }
            if matches!(r, Record::Shutdown { .. }) {
                // The primary's orderly end is in the log: whatever the
                // channel does from here (the last ack may meet a closed
                // socket) is no failure.
                self.shared.clean_end.store(true, Ordering::SeqCst);
                self.shared.limits.primary_ended();
            }
            let mark = match &r {
                Record::Barrier { exit } => Some((*exit, None)),
                Record::Fault { exit, fault } => Some((*exit, Some(*fault))),
                _ => None,
            };
            let mut r = r;
            loop {
                match self.tx.try_send(r) {
                    Ok(()) => break,
                    Err(TrySendError::Disconnected(_)) => return false,
                    Err(TrySendError::Full(back)) => {
                        r = back;
                        tokio::select! {
                            () = self.cancel.notified() => return false,
                            () = tokio::time::sleep(RECEIVE_BACKOFF) => {}
                        }
                    }
                }
            }
            match mark {
                // Queued: replay may go up to it.
                Some((exit, None)) => {
                    self.shared.limits.barrier_received(exit);
                    *lock(&self.shared.last_barrier_at) = Some(Instant::now());
                    self.board.set_last_barrier(exit.0);
                }
                Some((exit, Some(kind))) => self.fault_received(exit, kind),
                None => {}
            }
        }
        self.board.received.fetch_add(n, Ordering::SeqCst);
        true
    }

    /// Stored (in order, in memory): acknowledge now, or after the delay.
    async fn ack(&self, chan: &SecondaryChannel, last: LogPosition) -> Result<(), ChannelError> {
        match &self.delayed {
            Some(d) => {
                let _ = d.send((tokio::time::Instant::now() + self.ack_delay, last)).await;
                Ok(())
            }
            None => chan.ack(last),
        }
    }

    /// The primary's guest faulted at `exit`: replay stops before it (at
    /// the last barrier), and, once the record is acknowledged, the
    /// containment decision is made.
    fn fault_received(&self, exit: ExitIndex, kind: FaultKind) {
        self.shared.limits.fault_received(exit);
        let last_barrier_at = *lock(&self.shared.last_barrier_at);
        *lock(&self.shared.fault) = Some(ReceivedFault { kind, exit, arrived: Instant::now(), last_barrier_at });
        tracing::warn!(fault = %kind, exit = %exit, "the primary's guest faulted");
    }

    fn channel_failed(&self, e: ChannelError) {
        if self.shared.clean_end.load(Ordering::SeqCst) {
            // The primary's Shutdown record is stored: the replayer ends
            // there by itself, however far behind it still is. Stopping it
            // now would end replay short of the primary's end.
            return;
        }
        let failover = self.failover.on_failure();
        if failover.is_none() {
            let _ = self.decide.send(Decision::Stop);
        }
        *lock(&self.shared.channel_error) = Some(e);
        if let Some(f) = failover {
            f.channel_failed();
        }
    }
}

/// When the primary is lost, claim the arbiter; the replayer then finishes
/// the received log and goes live (or stops, having lost).
async fn decide_failover(
    f: Arc<Failover>,
    board: Arc<Board>,
    shared: Arc<SecondaryShared>,
    cancel: Arc<Notify>,
    contain: Arc<Notify>,
    switch: Arc<Notify>,
    decide: Sender<Decision>,
) {
    let (loss, contained, switched) = tokio::select! {
        loss = f.peer_lost() => (loss, false, false),
        () = contain.notified() => {
            // A coordinated handover: no timeout, no head start.
            let now = Instant::now();
            (Loss { last_heard: now, decided: now, by: crate::status::Detection::GuestFault }, true, false)
        }
        () = switch.notified() => {
            // A planned switchover: the primary yielded its claim.
            let now = Instant::now();
            (Loss { last_heard: now, decided: now, by: crate::status::Detection::Switchover }, false, true)
        }
    };
    if shared.clean_end.load(Ordering::SeqCst) && !contained && !switched {
        return;
    }
    shared.contained.store(contained, Ordering::SeqCst);
    board.set_peer(false);
    if !contained && !switched {
        cancel.notify_one();
    }
    let verdict = f.claim(&loss).await;
    let decision = match (verdict.won(), contained) {
        (true, true) => Decision::Contain,
        (true, false) => Decision::GoLive,
        (false, _) => Decision::Stop,
    };
    if let Verdict::Unreachable(e) = &verdict {
        tracing::error!(error = %e, "cannot reach the arbiter: not going live");
    }
    *lock(&shared.verdict) = Some((loss, SystemTime::now(), verdict));
    // A live copy sends no heartbeats as a secondary any more; a stopping
    // one neither.
    f.stop_heartbeats();
    let _ = decide.send(decision);
}
