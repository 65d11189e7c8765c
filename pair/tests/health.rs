//! Application health and fault containment, driven without KVM: the
//! scripted guest reports health (barriers on the primary), faults on an
//! input (transient: the secondary's live world does not send it) or at a
//! fixed exit (persistent), over a real logging channel, real heartbeats on
//! loopback and a real arbiter file.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pair::health::{FaultAction, HealthConfig, OnFault, OutputMode};
use pair::{FailoverConfig, Health, PrimaryConfig, PrimaryEnd, PrimarySession, Role, SecondaryConfig, SecondaryEnd};
use pair::{SecondarySession, Status};
use replication::go_live::LiveWorld;
use replication::record::FaultKind;
use vmm::hook::{ExitIndex, OutputSink};
use vmm::vcpu::{RunOutcome, StopHandle, VcpuError};
use vmm::VmError;

mod harness;
use harness::*;

/// Health without the timing sources (the scripted guest has no vCPU, and
/// stops reporting on purpose in some tests).
fn quiet(containment: bool) -> HealthConfig {
    HealthConfig { containment, deadline: None, hang: None, ..HealthConfig::default() }
}

fn secondary_h(
    listen: SocketAddr,
    fo: Option<FailoverConfig>,
    health: HealthConfig,
) -> std::thread::JoinHandle<SecondarySession> {
    std::thread::spawn(move || {
        let mut c = SecondaryConfig::new("t", listen.to_string(), channel());
        c.failover = fo;
        c.health = Some(Health::new(health));
        SecondarySession::accept(c).unwrap()
    })
}

fn primary_h(
    peer: SocketAddr,
    fo: Option<FailoverConfig>,
    world: &Arc<World>,
    health: &Arc<Health>,
) -> (PrimarySession, Box<dyn OutputSink>) {
    let mut c = PrimaryConfig::new("t", peer.to_string(), channel());
    c.failover = fo;
    c.drain_for = Duration::from_secs(2);
    c.health = Some(health.clone());
    PrimarySession::start(c, Box::new(WorldOutput(world.clone()))).unwrap()
}

/// A pair on `addr` (with failover on `arb` when given): the primary's
/// session with health `primary` and its output gate, the secondary's with
/// health `secondary`, and each side's world.
struct TestPair {
    ps: PrimarySession,
    gate: Box<dyn OutputSink>,
    pw: Arc<World>,
    ss: SecondarySession,
    sw: Arc<World>,
    health: Arc<Health>,
}

fn pair_of(addr: SocketAddr, arb: Option<&Arbiter>, primary: HealthConfig, secondary: HealthConfig) -> TestPair {
    let sec = secondary_h(addr, arb.map(failover), secondary);
    let pw = Arc::new(World::default());
    let health = Health::new(primary);
    let (ps, gate) = primary_h(addr, arb.map(failover), &pw, &health);
    let ss = sec.join().unwrap();
    TestPair { ps, gate, pw, ss, sw: Arc::new(World::default()), health }
}

type Guest = std::thread::JoinHandle<Result<RunOutcome, VmError>>;

fn start_primary(
    ps: &PrimarySession,
    gate: Box<dyn OutputSink>,
    world: &Arc<World>,
    exits: u64,
    pace: Duration,
    adjust: impl FnOnce(&mut ScriptedGuest),
) -> (StopHandle, Guest) {
    let stop = StopHandle::detached().unwrap();
    let mut g = guest(ps.input(WorldInput(world.clone())), gate, stop.clone(), exits, pace);
    adjust(&mut g);
    ps.running(stop.clone());
    (stop, std::thread::spawn(move || g.run()))
}

fn start_secondary(
    ss: &SecondarySession,
    world: &Arc<World>,
    exits: u64,
    pace: Duration,
    adjust: impl FnOnce(&mut ScriptedGuest),
) -> (StopHandle, Guest) {
    let live = world.clone();
    let make_live: pair::MakeLive = Box::new(move |_clock, _wake| {
        Ok(LiveWorld { input: Box::new(WorldInput(live.clone())), output: Box::new(WorldOutput(live)) })
    });
    let (input, output) = ss.hooks(make_live);
    let stop = StopHandle::detached().unwrap();
    let mut g = guest(input(&stop), output, stop.clone(), exits, pace);
    adjust(&mut g);
    (stop, std::thread::spawn(move || g.run()))
}

fn healthy_every(n: u64) -> impl FnOnce(&mut ScriptedGuest) {
    move |g| g.healthy_every = n
}

fn panic_exit(outcome: &Result<RunOutcome, VmError>) -> Option<u64> {
    match outcome {
        Err(VmError::Vcpu(VcpuError::GuestPanic { exit_index, .. })) => Some(exit_index.0),
        _ => None,
    }
}

fn arbiter_owner(a: &Arbiter) -> String {
    let path = a.spec.strip_prefix("file:").unwrap();
    std::fs::read_to_string(path).unwrap()
}

/// Fault the primary's guest through its input: the next frame poll gets
/// the fault frame.
fn fault_after(board: &Status, pw: &World) {
    let _ = board;
    pw.frames_in.lock().unwrap().push(FAULT_FRAME.to_vec());
}

#[test]
fn replay_holds_at_the_last_barrier_until_the_primary_ends() {
    let addr = free_port();
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, None, quiet(true), quiet(true));
    let (_s_stop, s_guest) = start_secondary(&ss, &sw, 3000, Duration::ZERO, |g| {
        g.healthy_every = 16;
        g.healthy_until = 1600;
    });
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 3000, Duration::ZERO, |g| {
        g.healthy_every = 16;
        g.healthy_until = 1600;
    });
    let outcome = p_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::PoweredOff { status: 0, .. })), "{outcome:?}");
    let (pb, sb) = (ps.board(), ss.board());
    let logged = pb.snapshot().log_position;
    wait_for("every record received", Duration::from_secs(20), || sb.snapshot().acked_position == Some(logged));
    wait_for("replay held", Duration::from_secs(20), || sb.snapshot().exit_index == 1601);
    let st = sb.snapshot();
    assert_eq!(st.last_barrier_exit, Some(1600));
    assert!(st.log_position < logged, "records past the last barrier were replayed: {st:?}");
    assert_eq!(pb.snapshot().last_barrier_exit, Some(1600));
    // The primary's clean end lifts the hold: replay reaches it.
    assert!(matches!(ps.finish_outcome(ExitIndex(3000), &outcome).unwrap(), PrimaryEnd::Finished));
    let s_outcome = s_guest.join().unwrap();
    assert!(matches!(s_outcome, Ok(RunOutcome::PoweredOff { status: 0, .. })), "{s_outcome:?}");
    assert_eq!(sb.snapshot().divergences, 0);
}

#[test]
fn a_transient_fault_is_contained_from_the_last_barrier() {
    let (addr, arb) = (free_port(), arbiter());
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, Some(&arb), quiet(true), quiet(true));
    let pace = Duration::from_micros(100);
    let (_s_stop, s_guest) = start_secondary(&ss, &sw, 4000, pace, healthy_every(16));
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 4000, pace, healthy_every(16));
    let pb = ps.board();
    wait_for("the primary runs", Duration::from_secs(20), || pb.snapshot().exit_index > 1000);
    fault_after(&pb.snapshot(), &pw);
    let outcome = p_guest.join().unwrap();
    let fault_exit = panic_exit(&outcome).expect("the primary's guest panicked");
    let end = ps.finish_outcome(ExitIndex(fault_exit), &outcome).unwrap();
    assert!(matches!(end, PrimaryEnd::HandedOver(d) if d.kind == FaultKind::Panic), "{end:?}");
    let p_lines = pw.serial.lock().unwrap().len() as u64;
    assert!(p_lines <= fault_exit / 16, "the primary released outputs after its fault");
    // The secondary went live from the last barrier and never met the
    // fault: its world sends no fault frame.
    let s_outcome = s_guest.join().unwrap();
    assert!(matches!(s_outcome, Ok(RunOutcome::PoweredOff { status: 0, .. })), "{s_outcome:?}");
    let sb = ss.board();
    assert!(matches!(ss.finish(s_outcome), SecondaryEnd::WentLive(Ok(_))));
    let st = sb.snapshot();
    assert_eq!(st.role, Role::Standalone);
    assert!(st.last_failure.is_none(), "a containment is no host failure: {st:?}");
    let f = st.last_fault.clone().expect("a fault event");
    assert_eq!((f.action, f.fault, f.source.as_str()), ("contained", FaultKind::Panic, "exit"));
    assert_eq!(f.exit, Some(fault_exit));
    let barrier = f.barrier_exit.expect("went live from a barrier");
    assert!(barrier < fault_exit && barrier % 16 == 0, "barrier {barrier}, fault {fault_exit}");
    assert!(f.outage_ms >= f.recovery_ms);
    assert!(arbiter_owner(&arb).contains("(none)"), "the live copy released the arbiter when its guest stopped");
    // The live secondary's outputs reach its world.
    assert!(!sw.serial.lock().unwrap().is_empty());
    let v = serde_json::to_value(&st).unwrap();
    assert_eq!(v["last_fault"]["source"], "exit");
    assert_eq!(v["last_fault"]["fault"], "panic");
    assert_eq!(v["faults"], 1);
    assert_eq!(v["containment"], true);
    assert_eq!(v["output_mode"], "fast");
}

#[test]
fn with_containment_off_the_secondary_replays_into_the_fault() {
    let addr = free_port();
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, None, quiet(false), quiet(false));
    let (_s_stop, s_guest) = start_secondary(&ss, &sw, 4000, Duration::ZERO, healthy_every(16));
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 4000, Duration::from_micros(100), healthy_every(16));
    let pb = ps.board();
    wait_for("the primary runs", Duration::from_secs(20), || pb.snapshot().exit_index > 500);
    fault_after(&pb.snapshot(), &pw);
    let outcome = p_guest.join().unwrap();
    let fault_exit = panic_exit(&outcome).expect("the primary's guest panicked");
    assert!(matches!(ps.finish_outcome(ExitIndex(fault_exit), &outcome).unwrap(), PrimaryEnd::Finished));
    assert_eq!(pb.snapshot().last_barrier_exit, None, "no barriers without containment");
    // VMware FT's behaviour: the secondary replays the fatal input too.
    let s_outcome = s_guest.join().unwrap();
    assert_eq!(panic_exit(&s_outcome), Some(fault_exit), "{s_outcome:?}");
    drop(ss);
}

#[test]
fn a_fault_on_a_primary_running_alone_is_left_to_on_fault() {
    let (addr, arb) = (free_port(), arbiter());
    let TestPair { ps, gate, pw, ss, sw, health } =
        pair_of(addr, Some(&arb), HealthConfig { on_fault: OnFault::Restart, ..quiet(true) }, quiet(true));
    let pace = Duration::from_micros(200);
    let (s_stop, s_guest) = start_secondary(&ss, &sw, 1_000_000, pace, healthy_every(16));
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 1_000_000, pace, healthy_every(16));
    let pb = ps.board();
    wait_for("the pair runs", Duration::from_secs(20), || pb.snapshot().exit_index > 200);
    // The secondary's process dies: the primary wins and runs alone.
    s_stop.stop();
    let _ = s_guest.join();
    drop(ss);
    wait_for("the primary alone", Duration::from_secs(20), || pb.snapshot().role == Role::Standalone);
    fault_after(&pb.snapshot(), &pw);
    let outcome = p_guest.join().unwrap();
    let fault_exit = panic_exit(&outcome).expect("the primary's guest panicked");
    let end = ps.finish_outcome(ExitIndex(fault_exit), &outcome).unwrap();
    assert!(matches!(end, PrimaryEnd::Faulted(d) if d.kind == FaultKind::Panic), "{end:?}");
    // Nobody to hand over to: --on-fault decides (restart), not escalated.
    let d = health.decide(&outcome, &pb).expect("a fault");
    assert_eq!((d.action, d.escalated), (FaultAction::Restart, false));
    assert_eq!(pb.snapshot().last_fault.map(|f| f.action), Some("restart"));
}

#[test]
fn a_persistent_fault_escalates_after_one_containment() {
    let (addr, arb) = (free_port(), arbiter());
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, Some(&arb), quiet(true), quiet(true));
    let persistent = |g: &mut ScriptedGuest| {
        g.healthy_every = 16;
        g.panic_at = Some(2000);
    };
    let pace = Duration::from_micros(100);
    let (_s_stop, s_guest) = start_secondary(&ss, &sw, 4000, pace, persistent);
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 4000, pace, persistent);
    let outcome = p_guest.join().unwrap();
    assert_eq!(panic_exit(&outcome), Some(2000));
    assert!(matches!(ps.finish_outcome(ExitIndex(2000), &outcome).unwrap(), PrimaryEnd::HandedOver(_)));
    // Contained from the barrier at 1984; the bug is in guest memory, so it
    // recurs at 2000 on the live secondary.
    let s_outcome = s_guest.join().unwrap();
    assert_eq!(panic_exit(&s_outcome), Some(2000), "{s_outcome:?}");
    let (sb, sh) = (ss.board(), ss.health().unwrap());
    assert_eq!(sb.snapshot().last_fault.and_then(|f| f.barrier_exit), Some(1984));
    let d = sh.decide(&s_outcome, &sb).expect("the recurring fault");
    assert!(d.escalated, "a fault within the window after a containment escalates");
    assert_eq!(d.action, FaultAction::Stop, "--on-fault stop: exit status 5");
    let f = sb.snapshot().last_fault.unwrap();
    assert_eq!((f.action, f.escalated), ("stop", true));
    assert_eq!(sb.snapshot().faults, 2);
    assert!(matches!(ss.finish(s_outcome), SecondaryEnd::WentLive(Err(_))));
}

/// Lines of serial output released after a run of `exits` exits that
/// reports health every 64 exits up to exit 1024 (one line per 16 exits),
/// once every record is acknowledged, before the primary ends.
fn released_lines(mode: OutputMode) -> (usize, usize) {
    let addr = free_port();
    let cfg = HealthConfig { output_mode: mode, ..quiet(true) };
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, None, cfg.clone(), cfg);
    let reports = |g: &mut ScriptedGuest| {
        g.healthy_every = 64;
        g.healthy_until = 1024;
    };
    let (_s_stop, s_guest) = start_secondary(&ss, &sw, 2000, Duration::ZERO, reports);
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 2000, Duration::ZERO, reports);
    let outcome = p_guest.join().unwrap();
    let pb = ps.board();
    wait_for("every record acknowledged", Duration::from_secs(20), || {
        let s = pb.snapshot();
        s.acked_position == Some(s.log_position)
    });
    // Releases happen in the ack task: wait for the outputs acks allow.
    let fast_all = 2000 / 16;
    if mode == OutputMode::Fast {
        wait_for("fast releases", Duration::from_secs(20), || pw.serial.lock().unwrap().len() == fast_all);
    } else {
        wait_for("strict releases", Duration::from_secs(20), || pw.serial.lock().unwrap().len() >= 1024 / 16);
        // Give a wrongly released output its chance to show.
        std::thread::sleep(Duration::from_millis(100));
    }
    let before_end = pw.serial.lock().unwrap().len();
    assert!(matches!(ps.finish_outcome(ExitIndex(2000), &outcome).unwrap(), PrimaryEnd::Finished));
    let after_end = pw.serial.lock().unwrap().len();
    let _ = s_guest.join();
    drop(ss);
    (before_end, after_end)
}

#[test]
fn strict_never_releases_an_output_past_the_last_acknowledged_barrier() {
    // Strict: the outputs after the last barrier (exit 1024) stay held
    // although every record is acknowledged; the clean end releases them.
    assert_eq!(released_lines(OutputMode::Strict), (1024 / 16, 2000 / 16));
    // Fast: every acknowledged output goes.
    assert_eq!(released_lines(OutputMode::Fast), (2000 / 16, 2000 / 16));
}

#[test]
fn a_missed_health_report_is_contained() {
    let (addr, arb) = (free_port(), arbiter());
    let cfg = HealthConfig { deadline: Some(Duration::from_millis(50)), hang: None, ..HealthConfig::default() };
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, Some(&arb), cfg.clone(), cfg);
    let pace = Duration::from_micros(200);
    // The application stops reporting at exit 800 (the guest runs on).
    let reports = |g: &mut ScriptedGuest| {
        g.healthy_every = 16;
        g.healthy_until = 800;
    };
    let (s_stop, s_guest) = start_secondary(&ss, &sw, 1_000_000, pace, reports);
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 1_000_000, pace, reports);
    let outcome = p_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::Stopped { .. })), "the watchdog stops the guest: {outcome:?}");
    let end = ps.finish_outcome(ExitIndex(0), &outcome).unwrap();
    assert!(matches!(end, PrimaryEnd::HandedOver(d) if d.kind == FaultKind::Unhealthy), "{end:?}");
    let sb = ss.board();
    wait_for("the secondary live", Duration::from_secs(20), || sb.snapshot().role == Role::Standalone);
    let f = sb.snapshot().last_fault.expect("a fault event");
    assert_eq!((f.fault, f.source.as_str(), f.barrier_exit), (FaultKind::Unhealthy, "health deadline", Some(800)));
    s_stop.stop();
    let _ = s_guest.join();
}

#[test]
fn a_fault_and_the_primarys_death_at_once_leave_exactly_one_live_copy() {
    let (addr, arb) = (free_port(), arbiter());
    let TestPair { ps, gate, pw, ss, sw, .. } = pair_of(addr, Some(&arb), quiet(true), quiet(true));
    let pace = Duration::from_micros(100);
    let (s_stop, s_guest) = start_secondary(&ss, &sw, 1_000_000, pace, healthy_every(16));
    let (_p_stop, p_guest) = start_primary(&ps, gate, &pw, 1_000_000, pace, healthy_every(16));
    let pb = ps.board();
    wait_for("the pair runs", Duration::from_secs(20), || pb.snapshot().exit_index > 500);
    fault_after(&pb.snapshot(), &pw);
    let outcome = p_guest.join().unwrap();
    let fault_exit = panic_exit(&outcome).expect("the primary's guest panicked");
    // The primary's host dies as its guest faults: no fault record, no
    // handover, its sockets close.
    drop(ps);
    // The secondary wins the arbiter: it goes live, or (when the fatal
    // input reached it and the fault record did not) its replay meets the
    // fault, which is then its own to handle (`--on-fault`).
    let sb = ss.board();
    wait_for("the secondary decides", Duration::from_secs(20), || {
        sb.snapshot().role == Role::Standalone || s_guest.is_finished()
    });
    let owner = arbiter_owner(&arb);
    assert!(owner.contains("secondary"), "the secondary owns the guest: {owner}");
    // The primary released nothing after its fault.
    assert!(pw.serial.lock().unwrap().len() as u64 <= fault_exit / 16);
    s_stop.stop();
    let s_outcome = s_guest.join().unwrap();
    assert!(matches!(ss.finish(s_outcome), SecondaryEnd::WentLive(_)));
}
