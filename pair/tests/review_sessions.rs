#![allow(dead_code)]
//! Adversarial review of the pair sessions: who owns the arbiter when a
//! copy stops. The harness is `sessions.rs`'s (copied): a scripted guest on
//! a primary and a secondary session joined by a real logging channel and
//! real heartbeats on loopback, with a real arbiter file.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pair::{
    Failover, FailoverConfig, PrimaryConfig, PrimaryEnd, PrimarySession, Role, SecondaryConfig, SecondaryEnd,
    SecondarySession,
};
use replication::channel::ChannelConfig;
use replication::frame::GuestIdentity;
use replication::go_live::LiveWorld;
use replication::key::SharedKey;
use vmm::hook::{Access, ExitIndex, ExitKind, HookError, InputSource, OutputSink, Wake};
use vmm::vcpu::{RunOutcome, StopHandle, VcpuError};
use vmm::VmError;

// ---------------------------------------------------------------- the guest

/// A guest without KVM: at each exit it may read the clock, poll for a
/// frame (echoing it back as an output), and print its state.
struct ScriptedGuest {
    input: Box<dyn InputSource>,
    output: Box<dyn OutputSink>,
    stop: StopHandle,
    /// Powers off after this many exits.
    exits: u64,
    /// Wall-clock pacing between exits, so failures land mid-run.
    pace: Duration,
    /// While set, the guest makes no progress (a frozen vCPU thread).
    frozen: Arc<AtomicBool>,
    state: u64,
}

impl ScriptedGuest {
    fn step(&mut self, exit: ExitIndex) -> Result<(), HookError> {
        let kind = ExitKind::Pio { port: 0x80, size: 1, access: Access::Write };
        self.input.on_exit(exit, &kind)?;
        if exit.0 % 4 == 0 {
            let t = self.input.clock_ns(exit)?;
            self.state = self.state.rotate_left(7) ^ t;
        }
        if exit.0 % 8 == 0 {
            if let Some(frame) = self.input.receive_frame(exit)? {
                self.state = self.state.wrapping_add(frame.len() as u64);
                self.output.transmit_frame(exit, &frame)?;
            }
        }
        if exit.0 % 16 == 0 {
            self.output.serial(exit, format!("{:016x}\n", self.state).as_bytes())?;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<RunOutcome, VmError> {
        for i in 1..=self.exits {
            let exit = ExitIndex(i);
            while self.frozen.load(Ordering::SeqCst) && !self.stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.stop.is_stopped() {
                return Ok(RunOutcome::Stopped { exit_index: ExitIndex(i - 1) });
            }
            self.step(exit).map_err(|source| VmError::Vcpu(VcpuError::Hook { exit_index: exit, source }))?;
            if !self.pace.is_zero() {
                std::thread::sleep(self.pace);
            }
        }
        Ok(RunOutcome::PoweredOff { status: 0, exit_index: ExitIndex(self.exits) })
    }
}

/// What reached the world from a live side.
#[derive(Default)]
struct World {
    frames_in: Mutex<Vec<Vec<u8>>>,
    serial: Mutex<Vec<Vec<u8>>>,
    frames_out: Mutex<Vec<Vec<u8>>>,
    clock: Mutex<u64>,
}

struct WorldInput(Arc<World>);

impl InputSource for WorldInput {
    fn clock_ns(&mut self, _exit: ExitIndex) -> Result<u64, HookError> {
        let mut c = self.0.clock.lock().unwrap();
        *c += 1_000;
        Ok(*c)
    }
    fn entropy(&mut self, _exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        buf.fill(7);
        Ok(())
    }
    fn halt(&mut self, _exit: ExitIndex, _deadline: Option<u64>) -> Result<Wake, HookError> {
        Ok(Wake::Deadline)
    }
    fn receive_frame(&mut self, _exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        Ok(self.0.frames_in.lock().unwrap().pop())
    }
}

struct WorldOutput(Arc<World>);

impl OutputSink for WorldOutput {
    fn serial(&mut self, _exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.0.serial.lock().unwrap().push(bytes.to_vec());
        Ok(())
    }
    fn transmit_frame(&mut self, _exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        self.0.frames_out.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

// ---------------------------------------------------------------- set-up

fn channel() -> ChannelConfig {
    let key = SharedKey::from_bytes(b"0123456789abcdef0123456789abcdef0123456789abcdef").unwrap();
    ChannelConfig::new(key, GuestIdentity { image: [1; 32], memory_bytes: 64 << 20, config: [2; 32] })
}

fn free_port() -> SocketAddr {
    // A port free for both TCP (the channel) and UDP (heartbeats).
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = t.local_addr().unwrap();
        if UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}

struct Arbiter {
    _dir: tempfile::TempDir,
    spec: String,
}

fn arbiter() -> Arbiter {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("file:{}", dir.path().join("arbiter").display());
    Arbiter { _dir: dir, spec }
}

fn failover(a: &Arbiter) -> FailoverConfig {
    FailoverConfig::new(a.spec.clone(), Duration::from_millis(10), 5)
}

/// A secondary session accepting at `listen`, on its own thread.
fn secondary(
    listen: SocketAddr,
    fo: Option<FailoverConfig>,
    ack_delay: Duration,
) -> std::thread::JoinHandle<SecondarySession> {
    std::thread::spawn(move || {
        let mut c = SecondaryConfig::new("t", listen.to_string(), channel());
        c.failover = fo;
        c.ack_delay = ack_delay;
        SecondarySession::accept(c).unwrap()
    })
}

fn primary(peer: SocketAddr, fo: Option<FailoverConfig>, world: &Arc<World>) -> (PrimarySession, Box<dyn OutputSink>) {
    primary_with(peer, fo, world, |_| {})
}

fn primary_with(
    peer: SocketAddr,
    fo: Option<FailoverConfig>,
    world: &Arc<World>,
    adjust: impl FnOnce(&mut PrimaryConfig),
) -> (PrimarySession, Box<dyn OutputSink>) {
    let mut c = PrimaryConfig::new("t", peer.to_string(), channel());
    c.failover = fo;
    c.drain_for = Duration::from_secs(2);
    adjust(&mut c);
    PrimarySession::start(c, Box::new(WorldOutput(world.clone()))).unwrap()
}

fn guest(
    input: Box<dyn InputSource>,
    output: Box<dyn OutputSink>,
    stop: StopHandle,
    exits: u64,
    pace: Duration,
) -> ScriptedGuest {
    ScriptedGuest { input, output, stop, exits, pace, frozen: Arc::default(), state: 0 }
}

/// Run the primary's guest on its own thread; the session stays here.
fn run_primary(
    session: &PrimarySession,
    gate: Box<dyn OutputSink>,
    world: &Arc<World>,
    exits: u64,
    pace: Duration,
) -> (StopHandle, std::thread::JoinHandle<Result<RunOutcome, VmError>>) {
    let stop = StopHandle::detached().unwrap();
    let mut g = guest(session.input(WorldInput(world.clone())), gate, stop.clone(), exits, pace);
    session.running(stop.clone());
    (stop, std::thread::spawn(move || g.run()))
}

/// Run the secondary's guest (replay, then live into `world`).
fn run_secondary(
    session: &SecondarySession,
    world: &Arc<World>,
    exits: u64,
    pace: Duration,
) -> (StopHandle, std::thread::JoinHandle<Result<RunOutcome, VmError>>) {
    let (stop, guest, _) = run_secondary_frozen(session, world, exits, pace);
    (stop, guest)
}

/// As [`run_secondary`], with the flag that freezes its guest.
fn run_secondary_frozen(
    session: &SecondarySession,
    world: &Arc<World>,
    exits: u64,
    pace: Duration,
) -> (StopHandle, std::thread::JoinHandle<Result<RunOutcome, VmError>>, Arc<AtomicBool>) {
    let live = world.clone();
    let make_live: pair::MakeLive = Box::new(move |_clock, _wake| {
        Ok(LiveWorld { input: Box::new(WorldInput(live.clone())), output: Box::new(WorldOutput(live)) })
    });
    let (input, output) = session.hooks(make_live);
    let stop = StopHandle::detached().unwrap();
    let mut g = guest(input(&stop), output, stop.clone(), exits, pace);
    let frozen = g.frozen.clone();
    (stop, std::thread::spawn(move || g.run()), frozen)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn feed(world: &World, n: usize) {
    let mut q = world.frames_in.lock().unwrap();
    for i in 0..n {
        q.push(vec![i as u8; 60 + i]);
    }
}

// ---------------------------------------------------------------- tests

/// Who the arbiter names as the live copy now.
fn holder(a: &Arbiter) -> Option<String> {
    let (_, owner) = heartbeat::Arbiter::open(&a.spec).unwrap().current().unwrap();
    owner.map(|o| o.to_string())
}

/// The primary's process dies right after its guest powered off, before it
/// could log the guest's end. The secondary wins the arbiter, replays, and
/// its guest powers off where the primary's did: it never goes live, and
/// its guest has stopped. No copy of the guest is live, so the arbiter must
/// name none, or no pair of this guest can ever start again.
#[test]
fn a_secondary_that_won_but_stopped_before_going_live_frees_the_arbiter() {
    let (addr, arb) = (free_port(), arbiter());
    let sec = secondary(addr, Some(failover(&arb)), Duration::ZERO);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary(addr, Some(failover(&arb)), &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s_stop, s_guest) = run_secondary(&ss, &sw, 600, Duration::ZERO);
    let (_p_stop, p_guest) = run_primary(&ps, gate, &pw, 600, Duration::from_micros(100));
    let outcome = p_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::PoweredOff { .. })), "{outcome:?}");
    // Everything the guest did is with the secondary...
    let pb = ps.board();
    wait_for("every record acked", Duration::from_secs(10), || {
        let st = pb.snapshot();
        st.acked_position == Some(st.log_position)
    });
    // ...and the process dies without a word.
    drop(ps);
    wait_for("the secondary to win", Duration::from_secs(10), || holder(&arb).is_some());
    let s_outcome = s_guest.join().unwrap();
    assert!(matches!(s_outcome, Ok(RunOutcome::PoweredOff { .. })), "{s_outcome:?}");
    let end = ss.finish(s_outcome);
    assert!(matches!(end, SecondaryEnd::Guest(Ok(RunOutcome::PoweredOff { .. }))), "{end:?}");
    assert_eq!(holder(&arb), None, "a copy whose guest stopped still owns the arbiter");
    pair::failover::check_free(&arb.spec).expect("a new pair of this guest may start");
}

/// The failover decision's claim may still be under way when the guest
/// stops and `finish` gives the arbiter up (a secondary dying while the
/// primary winds down): a claim that lands after the release must not win,
/// or the arbiter names a copy that has stopped, for ever.
#[test]
fn a_claim_that_lands_after_the_release_never_wins() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for role in [heartbeat::Role::Primary, heartbeat::Role::Secondary] {
        let arb = arbiter();
        let board = pair::Board::new("t", Role::Primary);
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let f = rt.block_on(Failover::start(&failover(&arb), &board, "t", role, &[9; 32], local, None)).unwrap();
        // The guest stopped: finish releases (nothing won yet)...
        f.release();
        // ...and the decision's claim lands afterwards.
        let now = Instant::now();
        let loss = pair::status::Loss { last_heard: now, decided: now, by: pair::status::Detection::Silence };
        let v = rt.block_on(f.claim(&loss));
        assert!(!v.won(), "{role:?}: a claim after the guest stopped won: {v:?}");
        assert_eq!(holder(&arb), None, "{role:?}: the arbiter names a stopped copy");
    }
}

/// An operator stops the primary (SIGTERM) while the secondary's replay is
/// far behind (frozen vCPU: its record queue and the link's buffers full),
/// so the primary's end cannot reach it before the primary is gone. A clean
/// stop must stay a stop: the secondary, once thawed, must not take the
/// guest over and run it on (nor emit what the primary never released).
#[test]
fn a_clean_stop_the_secondary_never_heard_of_does_not_move_the_guest() {
    let (addr, arb) = (free_port(), arbiter());
    let mut fo = failover(&arb);
    // Only this test's freeze, not the lag watch, is under test here.
    fo.max_lag = Duration::from_secs(600);
    let sec = secondary(addr, Some(fo.clone()), Duration::ZERO);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary_with(addr, Some(fo), &pw, |c| c.drain_for = Duration::from_millis(300));
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (s_stop, s_guest, frozen) = run_secondary_frozen(&ss, &sw, u64::MAX, Duration::ZERO);
    frozen.store(true, Ordering::SeqCst);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, u64::MAX, Duration::ZERO);
    let pb = ps.board();
    // Far more log than the link carries before the primary stops.
    wait_for("the link to back up", Duration::from_secs(60), || {
        let st = pb.snapshot();
        st.acked_position.is_some_and(|a| a + 1_000_000 < st.log_position)
    });
    p_stop.stop();
    let Ok(RunOutcome::Stopped { exit_index }) = p_guest.join().unwrap() else { panic!("not stopped") };
    let end = ps.finish(exit_index).unwrap();
    assert!(matches!(end, PrimaryEnd::Finished), "{end:?}");
    frozen.store(false, Ordering::SeqCst);
    // Either its guest ends (replay reached the primary's end, or it lost
    // the arbiter) or it goes live and would run for ever.
    let sb = ss.board();
    wait_for("the secondary to stop or go live", Duration::from_secs(120), || {
        s_guest.is_finished() || sb.snapshot().role == Role::Standalone
    });
    s_stop.stop();
    let s_outcome = s_guest.join().unwrap();
    let end = ss.finish(s_outcome);
    // Fenced off by the primary on its way out: it lost the arbiter.
    assert!(matches!(end, SecondaryEnd::LostArbiter), "the guest an operator stopped went live: {end:?}");
    assert!(sw.serial.lock().unwrap().is_empty(), "a secondary that did not go live emitted");
    assert_eq!(holder(&arb), None, "a stopped copy owns the arbiter");
}
