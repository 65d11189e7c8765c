//! The harness of the pair sessions' tests: a scripted guest (a
//! deterministic state machine taking its inputs at exits, as the lockstep
//! contract says) run by a primary and a secondary session joined by a real
//! logging channel and real heartbeats on loopback, with a real arbiter file.
#![allow(dead_code)] // each test file uses part of it

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pair::{FailoverConfig, PrimaryConfig, PrimarySession, SecondaryConfig, SecondarySession};
use replication::channel::ChannelConfig;
use replication::frame::GuestIdentity;
use replication::go_live::LiveWorld;
use replication::key::SharedKey;
use vmm::hook::{Access, ExitIndex, ExitKind, GuestSignal, HookError, InputSource, OutputSink, Wake};
use vmm::vcpu::{RunOutcome, StopHandle, VcpuError};
use vmm::VmError;

// ---------------------------------------------------------------- the guest

/// How one step of the scripted guest failed.
pub enum Fault {
    Hook(HookError),
    /// The guest wrote pvpanic.
    Panic,
}

impl From<HookError> for Fault {
    fn from(e: HookError) -> Self {
        Fault::Hook(e)
    }
}

/// A guest without KVM: at each exit it may read the clock, poll for a
/// frame (echoing it back as an output), and print its state.
pub struct ScriptedGuest {
    pub input: Box<dyn InputSource>,
    pub output: Box<dyn OutputSink>,
    pub stop: StopHandle,
    /// Powers off after this many exits.
    pub exits: u64,
    /// Wall-clock pacing between exits, so failures land mid-run.
    pub pace: Duration,
    /// While set, the guest makes no progress (a frozen vCPU thread).
    pub frozen: Arc<AtomicBool>,
    pub state: u64,
    /// Report health (the health device) at every exit that is a multiple
    /// of this, up to `healthy_until`; 0: never.
    pub healthy_every: u64,
    pub healthy_until: u64,
    /// A persistent fault: pvpanic at this exit, whatever the inputs.
    pub panic_at: Option<u64>,
}

/// A received frame with this content makes the guest panic: a fault that
/// depends on an input (a transient one: the secondary's live world does
/// not send it).
pub const FAULT_FRAME: &[u8] = b"FAULT-FAULT-FAULT";

impl ScriptedGuest {
    fn step(&mut self, exit: ExitIndex) -> Result<(), Fault> {
        let kind = ExitKind::Pio { port: 0x80, size: 1, access: Access::Write };
        self.input.on_exit(exit, &kind)?;
        if exit.0 % 4 == 0 {
            let t = self.input.clock_ns(exit)?;
            self.state = self.state.rotate_left(7) ^ t;
        }
        if exit.0 % 8 == 0 {
            if let Some(frame) = self.input.receive_frame(exit)? {
                if frame == FAULT_FRAME {
                    return Err(Fault::Panic);
                }
                self.state = self.state.wrapping_add(frame.len() as u64);
                self.output.transmit_frame(exit, &frame)?;
            }
        }
        if self.panic_at == Some(exit.0) {
            return Err(Fault::Panic);
        }
        if exit.0 % 16 == 0 {
            self.output.serial(exit, format!("{:016x}\n", self.state).as_bytes())?;
        }
        if self.healthy_every > 0 && exit.0 % self.healthy_every == 0 && exit.0 <= self.healthy_until {
            self.output.signal(exit, GuestSignal::Healthy { value: 1 })?;
        }
        Ok(())
    }

    pub fn run(&mut self) -> Result<RunOutcome, VmError> {
        for i in 1..=self.exits {
            let exit = ExitIndex(i);
            while self.frozen.load(Ordering::SeqCst) && !self.stop.is_stopped() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if self.stop.is_stopped() {
                return Ok(RunOutcome::Stopped { exit_index: ExitIndex(i - 1) });
            }
            match self.step(exit) {
                Ok(()) => {}
                Err(Fault::Hook(source)) => return Err(VmError::Vcpu(VcpuError::Hook { exit_index: exit, source })),
                Err(Fault::Panic) => return Err(VmError::Vcpu(VcpuError::GuestPanic { event: 1, exit_index: exit })),
            }
            if !self.pace.is_zero() {
                std::thread::sleep(self.pace);
            }
        }
        Ok(RunOutcome::PoweredOff { status: 0, exit_index: ExitIndex(self.exits) })
    }
}

/// What reached the world from a live side.
#[derive(Default)]
pub struct World {
    pub frames_in: Mutex<Vec<Vec<u8>>>,
    pub serial: Mutex<Vec<Vec<u8>>>,
    pub frames_out: Mutex<Vec<Vec<u8>>>,
    pub clock: Mutex<u64>,
}

pub struct WorldInput(pub Arc<World>);

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

pub struct WorldOutput(pub Arc<World>);

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

pub fn channel() -> ChannelConfig {
    let key = SharedKey::from_bytes(b"0123456789abcdef0123456789abcdef0123456789abcdef").unwrap();
    ChannelConfig::new(key, GuestIdentity { image: [1; 32], memory_bytes: 64 << 20, config: [2; 32] })
}

pub fn free_port() -> SocketAddr {
    // A port free for both TCP (the channel) and UDP (heartbeats).
    loop {
        let t = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = t.local_addr().unwrap();
        if UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}

pub struct Arbiter {
    pub _dir: tempfile::TempDir,
    pub spec: String,
}

pub fn arbiter() -> Arbiter {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("file:{}", dir.path().join("arbiter").display());
    Arbiter { _dir: dir, spec }
}

pub fn failover(a: &Arbiter) -> FailoverConfig {
    FailoverConfig::new(a.spec.clone(), Duration::from_millis(10), 5)
}

/// A secondary session accepting at `listen`, on its own thread.
pub fn secondary(
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

pub fn primary(
    peer: SocketAddr,
    fo: Option<FailoverConfig>,
    world: &Arc<World>,
) -> (PrimarySession, Box<dyn OutputSink>) {
    primary_with(peer, fo, world, |_| {})
}

pub fn primary_with(
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

pub fn guest(
    input: Box<dyn InputSource>,
    output: Box<dyn OutputSink>,
    stop: StopHandle,
    exits: u64,
    pace: Duration,
) -> ScriptedGuest {
    ScriptedGuest {
        input,
        output,
        stop,
        exits,
        pace,
        frozen: Arc::default(),
        state: 0,
        healthy_every: 0,
        healthy_until: u64::MAX,
        panic_at: None,
    }
}

/// Run the primary's guest on its own thread; the session stays here.
pub fn run_primary(
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
pub fn run_secondary(
    session: &SecondarySession,
    world: &Arc<World>,
    exits: u64,
    pace: Duration,
) -> (StopHandle, std::thread::JoinHandle<Result<RunOutcome, VmError>>) {
    let (stop, guest, _) = run_secondary_frozen(session, world, exits, pace);
    (stop, guest)
}

/// As [`run_secondary`], with the flag that freezes its guest.
pub fn run_secondary_frozen(
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

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn feed(world: &World, n: usize) {
    let mut q = world.frames_in.lock().unwrap();
    for i in 0..n {
        q.push(vec![i as u8; 60 + i]);
    }
}
