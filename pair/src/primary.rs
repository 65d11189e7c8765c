//! The primary session: the guest is live, every input is logged and
//! shipped to the secondary, every output waits for the secondary's ack.
//!
//! Threads and tasks it owns: the shipper (log tail → channel), the
//! releaser (held outputs → world as acks arrive), on its tokio runtime the
//! channel, the ack task, the channel-failure task and, with failover, the
//! heartbeats and the one failover decision. The vCPU thread belongs to the
//! caller, which plugs [`PrimarySession::input`] and the output sink that
//! [`PrimarySession::start`] returns into its guest.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use replication::channel::{ChannelConfig, ChannelError, PrimaryChannel};
use replication::log::LogShared;
use replication::output_rule::{self, Releaser};
use replication::record::{LogPosition, Record};
use replication::recorder::Recorder;
use vmm::hook::{ExitIndex, GuestSignal, HookError, InputSource, OutputSink};
use vmm::vcpu::{RunOutcome, StopHandle};
use vmm::VmError;

use crate::control::ControlSocket;
use crate::failover::{Failover, FailoverConfig, Verdict};
use crate::health::{Detected, Health, OutputMode};
use crate::observed::Observed;
use crate::shipper::Shipper;
use crate::status::{Board, Role};

/// Settings of a primary session.
pub struct PrimaryConfig {
    /// The VM's name (`--name`).
    pub name: String,
    /// The secondary's address (`--peer`).
    pub peer: String,
    pub channel: ChannelConfig,
    /// `None`: no arbiter, so a lost secondary stops the guest.
    pub failover: Option<FailoverConfig>,
    /// The control socket to serve, if any.
    pub control: Option<PathBuf>,
    /// How long to keep dialling a secondary that does not answer.
    pub connect_for: Duration,
    /// How long winding down waits for the last held outputs' acks.
    pub drain_for: Duration,
    /// Bytes of held outputs past which the guest's output side waits.
    pub max_held_bytes: usize,
    /// Application health and containment; `None`: none (as with
    /// `--containment off`).
    pub health: Option<Arc<Health>>,
    /// `--standby`: spare hosts a primary running alone re-protects itself
    /// onto (a live transfer, then the log), tried in turn.
    pub standby: Vec<String>,
    /// `--switch-listen`: where this process waits as the new primary's
    /// secondary after a planned switchover; `None`: `ftvm switchover` is
    /// refused.
    pub switch_listen: Option<String>,
    /// A copy that went live by a planned switchover
    /// ([`PrimarySession::start_alone`]): the old primary holds the state at
    /// the switch, so the log is kept from the start and the first repair
    /// joins it there, with no transfer.
    pub rejoin: bool,
}

impl PrimaryConfig {
    pub fn new(name: impl Into<String>, peer: impl Into<String>, channel: ChannelConfig) -> PrimaryConfig {
        PrimaryConfig {
            name: name.into(),
            peer: peer.into(),
            channel,
            failover: None,
            control: None,
            connect_for: Duration::from_secs(600),
            drain_for: Duration::from_secs(5),
            max_held_bytes: output_rule::DEFAULT_MAX_HELD_BYTES,
            health: None,
            standby: Vec::new(),
            switch_listen: None,
            rejoin: false,
        }
    }
}

/// How a primary session ended.
#[derive(Debug)]
pub enum PrimaryEnd {
    /// The guest ran to its end or was stopped; the secondary was told
    /// (or was already lost and this copy ran alone, having won).
    Finished,
    /// The secondary went live: this copy stopped without releasing
    /// anything more (exit status 4).
    LostArbiter,
    /// The secondary was lost and there is no arbiter: the guest was stopped
    /// rather than hold outputs forever.
    SecondaryLost(ChannelError),
    /// The guest faulted and the secondary acknowledged the fault: it goes
    /// live from the last barrier. This copy released nothing more and is
    /// not the live copy (exit status 4).
    HandedOver(Detected),
    /// The guest faulted and could not be handed over (this copy runs
    /// alone, the channel was down, or there is no arbiter): this copy
    /// holds the guest and `--on-fault` decides (clean restart, or exit
    /// status 5). Nothing more was released.
    Faulted(Detected),
    /// A planned switchover (`ftvm switchover`): the secondary took the
    /// guest over at this exit and is live; this copy's guest must never
    /// run again (it may become the new primary's standby).
    SwitchedOver(crate::switchover::Switched),
}

/// Where a primary stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Paired: outputs wait for acks.
    Protected,
    /// Won the arbiter after losing the secondary: runs unprotected.
    Alone,
    /// Lost the arbiter: nothing more may leave.
    Fenced,
}

/// How long a primary without an arbiter, whose whole log was acknowledged
/// when its secondary closed, waits for its own guest to end at the same
/// exit before it calls the secondary lost.
const SECONDARY_AHEAD_GRACE: Duration = Duration::from_millis(500);

/// The state the session's threads share.
pub(crate) struct PrimaryShared {
    phase: Mutex<Phase>,
    /// Cleared to end the shipper thread.
    shipping: AtomicBool,
    /// Set once the guest stopped: a peer lost after that is no failure.
    guest_ended: AtomicBool,
    /// Told when `guest_ended` is set.
    ended: tokio::sync::Notify,
    /// The channel's failure while the guest ran.
    channel_error: Mutex<Option<ChannelError>>,
    /// The session stopped the guest (fenced, or the secondary lost
    /// without an arbiter).
    stopped_guest: AtomicBool,
    stop: OnceLock<StopHandle>,
    /// A repair transfer's checkpoint was taken at this log position: the
    /// log after it is kept (not dropped) while alone, for the new
    /// secondary.
    kept_after: Mutex<Option<u64>>,
    /// The VM's checkpointer: a switchover stops the guest at one of its
    /// checkpoints.
    checkpointer: OnceLock<vmm::checkpoint::Checkpointer>,
    /// Where this copy waits as the new primary's secondary, bound for a
    /// switchover under way.
    pub(crate) switch_listener: Mutex<Option<std::net::TcpListener>>,
    /// A switchover is under way: the failover decision waits for its
    /// outcome.
    pub(crate) switching: AtomicBool,
    /// The switchover is done: the other copy is live.
    pub(crate) switched: Mutex<Option<crate::status::SwitchoverEvent>>,
}

impl PrimaryShared {
    pub(crate) fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub(crate) fn kept_after(&self) -> Option<u64> {
        *self.kept_after.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub(crate) fn keep_after(&self, mark: Option<u64>) {
        *self.kept_after.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = mark;
    }
    pub(crate) fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = phase;
    }
    pub(crate) fn guest_has_ended(&self) -> bool {
        self.guest_ended.load(Ordering::SeqCst)
    }
    pub(crate) fn shipping(&self) -> bool {
        self.shipping.load(Ordering::SeqCst)
    }
    fn new(phase: Phase) -> PrimaryShared {
        PrimaryShared {
            phase: Mutex::new(phase),
            shipping: AtomicBool::new(true),
            guest_ended: AtomicBool::new(false),
            ended: tokio::sync::Notify::new(),
            channel_error: Mutex::new(None),
            stopped_guest: AtomicBool::new(false),
            stop: OnceLock::new(),
            kept_after: Mutex::new(None),
            checkpointer: OnceLock::new(),
            switch_listener: Mutex::new(None),
            switching: AtomicBool::new(false),
            switched: Mutex::new(None),
        }
    }
    pub(crate) fn checkpointer(&self) -> Option<vmm::checkpoint::Checkpointer> {
        self.checkpointer.get().cloned()
    }
    fn stop_guest(&self) {
        self.stopped_guest.store(true, Ordering::SeqCst);
        if let Some(stop) = self.stop.get() {
            stop.stop();
        }
    }
}

/// The live output sink behind the gate.
pub struct DynSink(pub Box<dyn OutputSink>);

impl OutputSink for DynSink {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.0.serial(exit, bytes)
    }
    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        self.0.transmit_frame(exit, frame)
    }
    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        self.0.signal(exit, signal)
    }
}

pub(crate) type SharedReleaser = Arc<Releaser<DynSink>>;

/// The live output sink, which a switchover takes away (with the TAP it
/// holds, which the process needs again if it goes live later): nothing
/// more may reach the world from this copy.
type LiveSlot = Arc<Mutex<Option<Box<dyn OutputSink>>>>;

struct Retirable(LiveSlot);

impl Retirable {
    fn with(&self, f: impl FnOnce(&mut dyn OutputSink) -> Result<(), HookError>) -> Result<(), HookError> {
        match self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut() {
            Some(sink) => f(sink.as_mut()),
            None => Ok(()),
        }
    }
}

impl OutputSink for Retirable {
    fn serial(&mut self, exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.with(|s| s.serial(exit, bytes))
    }
    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        self.with(|s| s.transmit_frame(exit, frame))
    }
    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        self.with(|s| s.signal(exit, signal))
    }
}

/// The current secondary's channel and the current pair's failover: both
/// replaced when a repair pairs this primary with a new secondary.
pub(crate) struct Links {
    chan: Mutex<Option<Arc<PrimaryChannel>>>,
    failover: Mutex<Option<Arc<Failover>>>,
    /// An `--unprotected-start`'s claim on the arbiter: released when a
    /// repair hands the guest's ownership to the new pair's failover, or
    /// when the session ends.
    ownership: Mutex<Option<crate::failover::Ownership>>,
}

impl Links {
    pub(crate) fn chan(&self) -> Option<Arc<PrimaryChannel>> {
        self.chan.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
    /// Whether the current channel (if any) has failed.
    fn chan_failed(&self) -> bool {
        self.chan().is_some_and(|c| c.error().is_some())
    }
    pub(crate) fn set_chan(&self, chan: Arc<PrimaryChannel>) {
        *self.chan.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(chan);
    }
    pub(crate) fn failover(&self) -> Option<Arc<Failover>> {
        self.failover.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
    pub(crate) fn set_failover(&self, f: Option<Arc<Failover>>) {
        *self.failover.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = f;
    }
    /// Release an `--unprotected-start`'s claim on the arbiter, if held.
    pub(crate) fn release_ownership(&self) {
        if let Some(o) = self.ownership.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            o.release();
        }
    }
}

/// A running primary session.
pub struct PrimarySession {
    name: String,
    board: Arc<Board>,
    _control: Option<ControlSocket>,
    rt: tokio::runtime::Runtime,
    links: Arc<Links>,
    shipper: Arc<Shipper>,
    repair: Option<crate::repair::RepairConfig>,
    log: Arc<LogShared>,
    shared: Arc<PrimaryShared>,
    releaser: SharedReleaser,
    drain_for: Duration,
    shipper_thread: JoinHandle<Result<(), ChannelError>>,
    releaser_thread: JoinHandle<Result<(), HookError>>,
    health: Option<Arc<Health>>,
    switch_listen: Option<String>,
    identity: replication::frame::GuestIdentity,
    live: LiveSlot,
}

/// What [`PrimarySession::assemble`] builds a session from.
struct Parts<'a> {
    config: &'a PrimaryConfig,
    board: Arc<Board>,
    control: Option<ControlSocket>,
    rt: tokio::runtime::Runtime,
    log: Arc<LogShared>,
    shared: Arc<PrimaryShared>,
    live_output: Box<dyn OutputSink>,
    chan: Option<Arc<PrimaryChannel>>,
    failover: Option<Arc<Failover>>,
    rejoin: bool,
}

impl PrimarySession {
    /// Serve the control socket, wait for the secondary, start heartbeats
    /// and the shipping machinery. Returns the session and the output sink
    /// the guest must use (the gate over `live_output`).
    pub fn start(
        config: PrimaryConfig,
        live_output: Box<dyn OutputSink>,
    ) -> Result<(PrimarySession, Box<dyn OutputSink>)> {
        if let Some(f) = &config.failover {
            crate::failover::check_free(&f.arbiter)?;
        }
        let board = Arc::new(Board::new(config.name.clone(), Role::Primary));
        board.set_state("waiting for the secondary");
        board.set_peer_address(config.peer.clone());
        let control = config.control.as_deref().map(|p| ControlSocket::serve(p, board.clone())).transpose()?;
        let rt = crate::runtime()?;
        let chan = Arc::new(connect(&rt, &config)?);
        board.set_peer(true);
        board.set_state("running");
        let failover = match &config.failover {
            Some(f) => Some(Arc::new(rt.block_on(start_failover(f, &board, &config))?)),
            None => None,
        };
        let log = Arc::new(LogShared::default());
        log.set_acked(LogPosition(0));
        if let Some(h) = &config.health {
            log.set_strict(h.config().output_mode == OutputMode::Strict);
            board.set_health(h.containment(), h.config().output_mode);
        } else {
            board.set_health(false, OutputMode::Fast);
        }
        let shared = Arc::new(PrimaryShared::new(Phase::Protected));
        let (session, sink) = Self::assemble(Parts {
            config: &config,
            board,
            control,
            rt,
            log,
            shared,
            live_output,
            chan: Some(chan.clone()),
            failover: failover.clone(),
            rejoin: false,
        })?;
        let (handle, board, log, shared) = (session.rt.handle(), &session.board, &session.log, &session.shared);
        spawn_ack_task(handle, &chan, log, board, &session.releaser, failover.clone());
        spawn_channel_watch(handle, &chan, board, shared, log, failover.clone());
        if let (Some(f), Some(fc)) = (&failover, &config.failover) {
            crate::lag::spawn_primary_watch(handle, log.clone(), board.clone(), f.clone(), shared.clone(), fc.max_lag);
        }
        crate::progress::primary(board, log, &session.releaser)?;
        eprintln!("ftvm: primary {}: paired with the secondary at {}: protected", config.name, config.peer);
        Ok((session, sink))
    }

    /// The output gate over `live_output`, the shipper and the releaser
    /// with their threads, and the session over them; with application
    /// health, the barrier sink over the gate (the copy logs barriers as a
    /// primary does, dropped while alone: a secondary that a repair brings
    /// in replays no further than the last one, and a guest fault is
    /// contained onto it).
    fn assemble(parts: Parts<'_>) -> Result<(PrimarySession, Box<dyn OutputSink>)> {
        let Parts { config, board, control, rt, log, shared, live_output, chan, failover, rejoin } = parts;
        let live = Arc::new(Mutex::new(Some(live_output)));
        let (gate, releaser) = output_rule::gate(DynSink(Box::new(Retirable(live.clone()))), log.clone());
        let releaser = Arc::new(releaser);
        releaser.set_max_held_bytes(config.max_held_bytes);
        let shipper = Shipper::new(log.clone(), chan.clone(), board.clone(), releaser.clone(), shared.clone());
        {
            let s = shipper.clone();
            log.set_flusher(move || {
                if let Err(e) = s.ship(true) {
                    tracing::debug!(error = %e, "shipping the log tail failed");
                }
            });
        }
        let shipper_thread = shipper.spawn()?;
        let releaser_thread = {
            let releaser = releaser.clone();
            std::thread::Builder::new().name("releaser".into()).spawn(move || releaser.run())?
        };
        let repair = (!config.standby.is_empty()).then(|| crate::repair::RepairConfig {
            name: config.name.clone(),
            standby: config.standby.clone(),
            channel: config.channel.clone(),
            failover: config.failover.clone(),
            rejoin,
        });
        let session = PrimarySession {
            name: config.name.clone(),
            board,
            _control: control,
            rt,
            links: Arc::new(Links {
                chan: Mutex::new(chan),
                failover: Mutex::new(failover),
                ownership: Mutex::new(None),
            }),
            shipper,
            repair,
            log,
            shared,
            releaser,
            drain_for: config.drain_for,
            shipper_thread,
            releaser_thread,
            health: config.health.clone(),
            switch_listen: config.switch_listen.clone(),
            identity: config.channel.identity,
            live,
        };
        let sink: Box<dyn OutputSink> = match &config.health {
            Some(h) => Box::new(h.barrier_sink(gate, session.log.clone()).with_board(session.board.clone())),
            None => Box::new(gate),
        };
        Ok((session, sink))
    }

    /// A copy that runs alone already (a secondary that went live) and may
    /// be re-protected (`config.standby`): the log is recorded and dropped,
    /// outputs go at once, until a repair pairs it with a standby; from then
    /// on it is a primary like any other. `board`: the copy's board (its
    /// control socket); `failover`: the failover whose arbiter generation
    /// this copy won (released when the repair completes). `config.peer`
    /// and `config.control` are not used.
    pub fn start_alone(
        config: PrimaryConfig,
        board: Arc<Board>,
        live_output: Box<dyn OutputSink>,
        failover: Option<Arc<Failover>>,
    ) -> Result<(PrimarySession, Box<dyn OutputSink>)> {
        let rt = crate::runtime()?;
        let log = Arc::new(LogShared::default());
        log.set_unprotected();
        if let Some(h) = &config.health {
            // Outputs go at once while alone; once a repair pairs this copy
            // again, strict holds them for an acknowledged barrier.
            log.set_strict(h.config().output_mode == OutputMode::Strict);
        }
        let shared = Arc::new(PrimaryShared::new(Phase::Alone));
        if config.rejoin {
            // The old primary holds the state at the switch: the log from
            // the first record on is kept for it.
            shared.keep_after(Some(0));
        }
        Self::assemble(Parts {
            config: &config,
            board,
            control: None,
            rt,
            log,
            shared,
            live_output,
            chan: None,
            failover,
            rejoin: config.rejoin,
        })
    }

    /// `--unprotected-start`: a primary that runs alone from the start
    /// (it holds the arbiter's claim `ownership`, if there is an arbiter)
    /// and, with `config.standby`, re-protects itself onto a spare as a
    /// primary that lost its secondary does: the claim goes when the new
    /// pair's failover takes over, or when the session ends. Serves
    /// `config.control`. Call [`PrimarySession::running`] before the guest
    /// runs.
    pub fn start_unprotected(
        config: PrimaryConfig,
        live_output: Box<dyn OutputSink>,
        ownership: Option<crate::failover::Ownership>,
    ) -> Result<(PrimarySession, Box<dyn OutputSink>)> {
        let board = Arc::new(Board::new(config.name.clone(), Role::Standalone));
        board.set_state("running unprotected (--unprotected-start)");
        if let Some(h) = &config.health {
            board.set_health(h.containment(), h.config().output_mode);
        }
        let control = config.control.as_deref().map(|p| ControlSocket::serve(p, board.clone())).transpose()?;
        let (mut session, sink) = Self::start_alone(config, board, live_output, None)?;
        session._control = control;
        session.hold_arbiter(ownership);
        Ok((session, sink))
    }

    /// A copy started alone holds the arbiter's claim `ownership` (if any):
    /// released when a repair hands the guest's ownership to the new pair's
    /// failover, or when the session ends.
    pub fn hold_arbiter(&self, ownership: Option<crate::failover::Ownership>) {
        *self.links.ownership.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ownership;
    }

    /// A copy started by [`PrimarySession::start_alone`] is about to run
    /// on: a repair's failover may stop it through `stop`.
    pub fn running_alone(&self, stop: StopHandle) {
        let _ = self.shared.stop.set(stop.clone());
        self.serve_switchover(&stop);
        self.releaser.set_abort(Box::new(move || stop.is_stopped()));
    }

    /// Answer `ftvm switchover` from now on.
    fn serve_switchover(&self, stop: &StopHandle) {
        let switcher = crate::switchover::Switcher {
            name: self.name.clone(),
            log: self.log.clone(),
            links: self.links.clone(),
            releaser: self.releaser.clone(),
            board: self.board.clone(),
            shared: self.shared.clone(),
            stop: stop.clone(),
        };
        let handler = crate::switchover::handler(Arc::new(switcher), self.switch_listen.clone());
        self.board.set_switch_handler(Some(handler));
    }

    /// The status board.
    pub fn board(&self) -> Arc<Board> {
        self.board.clone()
    }

    /// The guest's input source: `live` recorded into the log.
    pub fn input<L: InputSource + 'static>(&self, live: L) -> Box<dyn InputSource> {
        match &self.health {
            Some(h) => self.observed(h.input(live)),
            None => self.observed(live),
        }
    }

    fn observed<L: InputSource + 'static>(&self, live: L) -> Box<dyn InputSource> {
        let log = self.log.clone();
        Box::new(Observed {
            inner: Recorder::new(live, self.log.clone()),
            board: self.board.clone(),
            position: Arc::new(move || log.appended().0),
        })
    }

    /// The guest is about to run: failover may stop it through `stop`.
    pub fn running(&self, stop: StopHandle) {
        let _ = self.shared.stop.set(stop.clone());
        self.serve_switchover(&stop);
        if let Some(h) = &self.health {
            h.arm();
            if let Err(e) = h.watch(stop.clone()) {
                tracing::error!(error = %e, "cannot start the health watchdog");
            }
        }
        // A guest waiting for room among held outputs stops when asked.
        self.releaser.set_abort(Box::new(move || stop.is_stopped()));
        if let Some(f) = self.links.failover() {
            spawn_decide(self.rt.handle(), f, &self.shared, &self.board, &self.log, &self.releaser);
        }
    }

    /// With `--standby`: whenever this copy runs alone, re-protect it onto
    /// a spare (a live transfer through `checkpointer`, then the log from
    /// the transfer's checkpoint on). Call once the guest is about to run.
    pub fn repair_with(&self, checkpointer: vmm::checkpoint::Checkpointer) -> Result<()> {
        let _ = self.shared.checkpointer.set(checkpointer.clone());
        let Some(config) = self.repair.clone() else { return Ok(()) };
        crate::repair::spawn(crate::repair::Repairer {
            config,
            checkpointer,
            handle: self.rt.handle().clone(),
            links: self.links.clone(),
            shipper: self.shipper.clone(),
            log: self.log.clone(),
            shared: self.shared.clone(),
            board: self.board.clone(),
            releaser: self.releaser.clone(),
        })
    }

    /// The session ends: no more switchover requests. The switchover
    /// that ended it, if one did (the health sources closed then).
    fn switched_end(&self) -> Option<crate::status::SwitchoverEvent> {
        self.board.set_switch_handler(None);
        let switched = self.shared.switched.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if switched.is_some() {
            if let Some(h) = &self.health {
                h.close();
            }
        }
        switched
    }

    /// The guest's run ended at `exit` with `outcome`: a guest fault (how
    /// the run ended, or a health source that stopped it) is contained
    /// (handed over to the secondary) when containment is on; anything else
    /// ends as [`PrimarySession::finish`] says.
    pub fn finish_outcome(self, exit: ExitIndex, outcome: &Result<RunOutcome, VmError>) -> Result<PrimaryEnd> {
        if let Some(event) = self.switched_end() {
            return Ok(self.switched_over(event));
        }
        let fault = self.health.as_ref().and_then(|h| {
            h.close();
            h.ended(outcome)
        });
        let links = self.links.clone();
        let end = match fault {
            Some(fault) => self.contain(exit, fault),
            None => self.finish(exit),
        };
        // An `--unprotected-start`'s claim, if no repair took it over: the
        // guest stopped here (or a restart claims afresh).
        links.release_ownership();
        end
    }

    /// The guest faulted at `exit`: release nothing more, log the fault,
    /// and hand over to the secondary; or, when that cannot be done, keep
    /// the guest for `--on-fault`.
    fn contain(self, exit: ExitIndex, fault: Detected) -> Result<PrimaryEnd> {
        self.shared.guest_ended.store(true, Ordering::SeqCst);
        // Not one more output: whatever the guest produced after the last
        // barrier is rolled back on the secondary.
        self.releaser.stop();
        if self.shared.phase() == Phase::Fenced {
            self.board.set_state("stopped: lost the arbiter");
            return Ok(PrimaryEnd::LostArbiter);
        }
        let alone = self.shared.phase() == Phase::Alone || self.links.failover().is_some_and(|f| f.yield_claim());
        let at = self.log.append(Record::Fault { exit, fault: fault.kind });
        self.log.request_flush();
        eprintln!("ftvm: primary {}: guest fault ({}) at guest exit #{exit}", self.name, fault.kind);
        let mut handed_over = false;
        if !alone {
            let deadline = Instant::now() + self.drain_for;
            while !self.log.is_acked(at) && Instant::now() < deadline && !self.links.chan_failed() {
                self.log.wait_changed(Duration::from_millis(5));
            }
            handed_over = self.log.is_acked(at) && self.links.failover().is_some();
        }
        let mut end = if handed_over { PrimaryEnd::HandedOver(fault) } else { PrimaryEnd::Faulted(fault) };
        if !handed_over && !alone {
            if let Some(f) = &self.links.failover() {
                // The secondary may have the fault, or may be claiming for a
                // lost primary: the arbiter decides who keeps the guest.
                match f.claim_after_handover() {
                    Verdict::Won => {}
                    Verdict::Lost => end = PrimaryEnd::LostArbiter,
                    Verdict::Unreachable(e) => {
                        tracing::error!(error = %e, "cannot reach the arbiter after a guest fault: stopping");
                        end = PrimaryEnd::LostArbiter;
                    }
                }
            }
        }
        let action = match &end {
            PrimaryEnd::HandedOver(_) => "handed over",
            PrimaryEnd::LostArbiter => "lost the arbiter",
            _ => "on-fault",
        };
        self.board.fault(crate::status::FaultEvent {
            source: fault.source,
            fault: fault.kind,
            action,
            escalated: false,
            at: crate::status::rfc3339(std::time::SystemTime::now()),
            exit: Some(exit.0),
            barrier_exit: None,
            reaction_ms: crate::status::millis(fault.reaction),
            recovery_ms: crate::status::millis(fault.at.elapsed()),
            outage_ms: crate::status::millis(fault.reaction + fault.at.elapsed()),
        });
        self.shared.shipping.store(false, Ordering::SeqCst);
        self.log.request_flush();
        let _ = self.shipper_thread.join();
        let _ = self.releaser_thread.join();
        if let Some(f) = &self.links.failover() {
            f.stop_heartbeats();
            if matches!(end, PrimaryEnd::Faulted(_)) {
                // This copy keeps the guest: `--on-fault` claims it again
                // (restart) or stops (status 5); either way this session's
                // hold ends here.
                f.release();
            }
        }
        // No orderly Shutdown: the secondary must not take the end of the
        // channel for the end of the guest.
        drop(self.links);
        drop(self.shipper);
        self.board.set_state(match end {
            PrimaryEnd::HandedOver(_) => "stopped: guest fault handed over to the secondary",
            PrimaryEnd::LostArbiter => "stopped: lost the arbiter",
            _ => "stopped: guest fault",
        });
        Ok(end)
    }

    /// The switchover is done (the other copy is live): wind down without
    /// a `Shutdown` record, releasing nothing more, claiming nothing.
    fn switched_over(self, event: crate::status::SwitchoverEvent) -> PrimaryEnd {
        let listener = self.shared.switch_listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let switched =
            crate::switchover::Switched { event, listener, identity: self.identity, board: self.board.clone() };
        self.shared.guest_ended.store(true, Ordering::SeqCst);
        self.shared.ended.notify_waiters();
        self.releaser.stop();
        // Nothing more reaches the world from here; the TAP is let go.
        drop(self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        self.shared.shipping.store(false, Ordering::SeqCst);
        self.log.request_flush();
        let _ = self.shipper_thread.join();
        let _ = self.releaser_thread.join();
        if let Some(f) = &self.links.failover() {
            f.stop_heartbeats();
        }
        drop(self.links);
        drop(self.shipper);
        self.board.set_role(Role::Secondary);
        self.board.set_state("switched over: the other copy is live");
        PrimaryEnd::SwitchedOver(switched)
    }

    /// The guest stopped at `exit`: tell the secondary where, release what
    /// its acks allow (bounded wait), close the channel, join the threads.
    pub fn finish(self, exit: ExitIndex) -> Result<PrimaryEnd> {
        if let Some(event) = self.switched_end() {
            return Ok(self.switched_over(event));
        }
        if let Some(h) = &self.health {
            h.close();
        }
        self.shared.guest_ended.store(true, Ordering::SeqCst);
        self.shared.ended.notify_waiters();
        let mut lost = self.shared.channel_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if lost.is_some()
            && !self.shared.stopped_guest.load(Ordering::SeqCst)
            && self.log.acked().is_some_and(|a| a >= self.log.appended())
        {
            // The guest ended by itself (or by a signal) and the secondary
            // had acknowledged all of its log: a secondary that replayed to
            // the same end may well close first. Nothing was unprotected.
            tracing::debug!("the secondary closed the channel after acknowledging the whole log");
            lost = None;
        }
        if self.shared.phase() == Phase::Fenced {
            // Not a single held output goes out: the other copy is the live one.
            self.releaser.stop();
            self.board.set_state("stopped: lost the arbiter");
            return Ok(PrimaryEnd::LostArbiter);
        }
        let end_at = self.log.append(Record::Shutdown { exit });
        // The secondary stops where this guest stopped: nothing can be
        // rolled back any more, so strict outputs go on plain acks.
        self.log.set_strict(false);
        self.log.request_flush();
        let deadline = Instant::now() + self.drain_for;
        // Wait for the held outputs' acks and for the end's: a secondary
        // that has the end stops there; one that has not would take over.
        while (self.releaser.held() > 0 || !self.log.is_acked(end_at))
            && Instant::now() < deadline
            && !self.links.chan_failed()
        {
            self.log.wait_changed(Duration::from_millis(10));
            let _ = self.releaser.release_ready();
        }
        let told = self.log.is_acked(end_at);
        self.board.outputs_held.store(self.releaser.held() as u64, Ordering::SeqCst);
        self.shared.shipping.store(false, Ordering::SeqCst);
        self.log.request_flush();
        let shipped = self.shipper_thread.join().map_err(|_| anyhow!("the shipper thread panicked"))?;
        self.releaser.stop();
        let _ = self.releaser_thread.join();
        let mut peer_live = false;
        let failover = self.links.failover();
        if let Some(f) = &failover {
            if told {
                // Alone, this copy owned the guest: no longer.
                f.release();
            } else {
                // The secondary may never learn that the guest stopped: keep
                // it from going live with it (heartbeats still flowing, so
                // that it does not claim first).
                peer_live = !f.retire_fencing();
            }
            f.stop_heartbeats();
        }
        let chan = self.links.chan();
        drop(self.links);
        drop(self.shipper);
        if let Some(Ok(chan)) = chan.map(Arc::try_unwrap) {
            let _ = self.rt.block_on(chan.shutdown());
        }
        self.board.set_state("stopped");
        if let Err(e) = shipped {
            tracing::debug!(vm = %self.name, error = %e, "the channel closed while winding down");
        }
        match lost {
            _ if peer_live => {
                self.board.set_state("stopped: lost the arbiter");
                Ok(PrimaryEnd::LostArbiter)
            }
            Some(e) if failover.is_none() => Ok(PrimaryEnd::SecondaryLost(e)),
            _ => Ok(PrimaryEnd::Finished),
        }
    }
}

/// Dial the secondary until it answers (retryable failures) or refuses;
/// a signal ends the wait.
fn connect(rt: &tokio::runtime::Runtime, config: &PrimaryConfig) -> Result<PrimaryChannel> {
    eprintln!("ftvm: primary {}: waiting for the secondary at {}", config.name, config.peer);
    let started = Instant::now();
    let dial = async {
        loop {
            match PrimaryChannel::connect(config.peer.as_str(), config.channel.clone()).await {
                Ok(c) => return Ok(c),
                Err(e) if crate::is_retryable(&e) => {
                    if started.elapsed() > config.connect_for {
                        return Err(anyhow!(e).context(format!(
                            "no secondary answered at {} for {} s",
                            config.peer,
                            config.connect_for.as_secs()
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow!(e).context(format!("the secondary at {} refused the pair", config.peer))),
            }
        }
    };
    rt.block_on(crate::unless_signalled(dial))?
}

async fn start_failover(f: &FailoverConfig, board: &Board, config: &PrimaryConfig) -> Result<Failover> {
    let peer = tokio::net::lookup_host(config.peer.as_str())
        .await?
        .next()
        .with_context(|| format!("--peer {} resolves to no address", config.peer))?;
    let local = std::net::SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0);
    let key = config.channel.key.as_bytes();
    Failover::start(f, board, &config.name, heartbeat::Role::Primary, key, local, Some(peer)).await
}

/// The failover decision for the current pair: a won verdict carries on
/// alone (and, with `--standby`, a repair follows); a lost one fences.
pub(crate) fn spawn_decide(
    rt: &tokio::runtime::Handle,
    f: Arc<Failover>,
    shared: &Arc<PrimaryShared>,
    board: &Arc<Board>,
    log: &Arc<LogShared>,
    releaser: &SharedReleaser,
) {
    let (shared, board, log, releaser) = (shared.clone(), board.clone(), log.clone(), releaser.clone());
    rt.spawn(async move {
        let (loss, verdict) = f.clone().decide().await;
        // A switchover under way yielded this side's claim: its own outcome
        // (switched, alone, fenced) stands, not this verdict.
        while shared.switching.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let switched = shared.switched.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
        if switched || shared.phase() != Phase::Protected {
            return;
        }
        board.set_peer(false);
        if shared.guest_ended.load(Ordering::SeqCst) {
            return;
        }
        if verdict.won() {
            // Carry on alone: every held output may go now.
            shared.set_phase(Phase::Alone);
            log.set_unprotected();
            let _ = releaser.release_ready();
            board.set_role(Role::Standalone);
            board.failure("secondary lost", &loss, std::time::SystemTime::now());
            eprintln!("ftvm: primary: the secondary is lost; won the arbiter, running UNPROTECTED");
        } else {
            if let Verdict::Unreachable(e) = &verdict {
                tracing::error!(error = %e, "cannot reach the arbiter: stopping the guest");
            }
            // The other copy lives (or nobody can tell): stop, emit nothing more.
            shared.set_phase(Phase::Fenced);
            shared.stop_guest();
        }
        f.stop_heartbeats();
    });
}

/// Acks from the channel into the log; release what they allow at once.
pub(crate) fn spawn_ack_task(
    rt: &tokio::runtime::Handle,
    chan: &Arc<PrimaryChannel>,
    log: &Arc<LogShared>,
    board: &Arc<Board>,
    releaser: &SharedReleaser,
    failover: Option<Arc<Failover>>,
) {
    let mut acked = chan.acked();
    let (log, board, releaser) = (log.clone(), board.clone(), releaser.clone());
    {
        // Release what an ack allows on the task that read it: no wake-up
        // of another task before the outputs go out (issue 16). The task
        // below does the same, as the fallback.
        let (log, board, releaser) = (log.clone(), board.clone(), releaser.clone());
        chan.on_ack(move |upto| {
            log.set_acked(upto);
            if let Err(e) = releaser.release_ready() {
                tracing::warn!(error = %e, "releasing held outputs failed");
            }
            replication::cost::released();
            board.acked_position.fetch_max(upto.0, Ordering::SeqCst);
            board.ack_rtt.acked(upto.0, std::time::Instant::now());
        });
    }
    rt.spawn(async move {
        loop {
            let upto = *acked.borrow_and_update();
            log.set_acked(upto);
            // Release what this ack allows right here, without waking the
            // releaser thread (it remains as the fallback).
            if let Err(e) = releaser.release_ready() {
                tracing::warn!(error = %e, "releasing held outputs failed");
            }
            board.acked_position.fetch_max(upto.0, Ordering::SeqCst);
            board.ack_rtt.acked(upto.0, std::time::Instant::now());
            if acked.changed().await.is_err() {
                return;
            }
            // An ack that arrived is a sign of life (the value the watch
            // started with is not: a peer never heard from must not count
            // as up).
            if let Some(f) = &failover {
                f.note_life();
            }
        }
    });
}

/// A failed channel: with failover the arbiter decides now; without it the
/// guest stops rather than hold outputs forever.
pub(crate) fn spawn_channel_watch(
    rt: &tokio::runtime::Handle,
    chan: &Arc<PrimaryChannel>,
    board: &Arc<Board>,
    shared: &Arc<PrimaryShared>,
    log: &Arc<LogShared>,
    failover: Option<Arc<Failover>>,
) {
    let (chan, board, shared, log) = (chan.clone(), board.clone(), shared.clone(), log.clone());
    rt.spawn(async move {
        let e = chan.failed().await;
        board.set_peer(false);
        *shared.channel_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
        let ended = shared.ended.notified();
        if shared.guest_ended.load(Ordering::SeqCst) {
            // Once the guest has stopped, a secondary that replayed to the
            // end may well close first.
            return;
        }
        if failover.is_none() && log.acked().is_some_and(|a| a >= log.appended()) {
            // Everything logged is acknowledged: a secondary whose replayed
            // guest powered off at its last exit closes at once, and may do
            // so before this side's vCPU thread is back from that same exit.
            // Give it a moment to say the guest ended (without an arbiter,
            // stopping the guest a little later costs nothing: no ack comes
            // for its outputs meanwhile).
            if tokio::time::timeout(SECONDARY_AHEAD_GRACE, ended).await.is_ok() {
                return;
            }
        }
        match &failover {
            Some(f) => f.channel_failed(),
            None => shared.stop_guest(),
        }
    });
}
