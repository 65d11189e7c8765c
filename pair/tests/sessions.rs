//! Pair sessions driven without KVM: a scripted guest (a deterministic state
//! machine that takes its inputs at exits, as the lockstep contract says)
//! runs on a primary session and on a secondary session joined by a real
//! logging channel and real heartbeats on loopback, with a real arbiter
//! file. Covers the output rule across a lost ack, the failover policy's
//! races, and shutdown from each state.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pair::{Failover, PrimaryEnd, Role, SecondaryEnd, Verdict};
use vmm::hook::ExitIndex;
use vmm::vcpu::RunOutcome;

mod harness;
use harness::*;

// ---------------------------------------------------------------- tests

#[test]
fn replay_follows_the_primary_and_outputs_are_released_after_acks() {
    let addr = free_port();
    let sec = secondary(addr, None, Duration::ZERO);
    let pw = Arc::new(World::default());
    feed(&pw, 20);
    let (ps, gate) = primary(addr, None, &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s_stop, s_guest) = run_secondary(&ss, &sw, 4000, Duration::ZERO);
    let (_p_stop, p_guest) = run_primary(&ps, gate, &pw, 4000, Duration::ZERO);
    let outcome = p_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::PoweredOff { status: 0, .. })), "{outcome:?}");
    assert!(matches!(ps.finish(ExitIndex(4000)).unwrap(), PrimaryEnd::Finished));
    // Every output reached the world once the secondary acked it.
    assert_eq!(pw.serial.lock().unwrap().len(), 250);
    assert_eq!(pw.frames_out.lock().unwrap().len(), 20);
    // The secondary replayed the same run and suppressed every output.
    let s_outcome = s_guest.join().unwrap();
    assert!(matches!(s_outcome, Ok(RunOutcome::PoweredOff { .. })), "{s_outcome:?}");
    assert!(sw.serial.lock().unwrap().is_empty() && sw.frames_out.lock().unwrap().is_empty());
    let board = ss.board();
    assert!(matches!(ss.finish(s_outcome), SecondaryEnd::Guest(Ok(RunOutcome::PoweredOff { .. }))));
    assert_eq!(board.snapshot().divergences, 0);
}

#[test]
fn no_output_leaves_without_its_ack_even_when_the_ack_is_lost() {
    let addr = free_port();
    // Acks held back for a minute: as good as lost for this test.
    let sec = secondary(addr, None, Duration::from_secs(60));
    let pw = Arc::new(World::default());
    feed(&pw, 5);
    let (ps, gate) = primary(addr, None, &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (s_stop, s_guest) = run_secondary(&ss, &sw, 1_000_000, Duration::ZERO);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, 1_000_000, Duration::from_micros(50));
    let board = ps.board();
    wait_for("outputs held", Duration::from_secs(10), || board.snapshot().outputs_held >= 20);
    assert!(pw.serial.lock().unwrap().is_empty(), "an output left before its ack");
    assert!(pw.frames_out.lock().unwrap().is_empty(), "a frame left before its ack");
    // The secondary dies with the acks: without an arbiter the primary's
    // guest is stopped, and still nothing is released.
    s_stop.stop();
    let _ = s_guest.join();
    drop(ss);
    let outcome = p_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::Stopped { .. })), "{outcome:?}");
    assert!(p_stop.is_stopped());
    let end = ps.finish(ExitIndex(0)).unwrap();
    assert!(matches!(end, PrimaryEnd::SecondaryLost(_)), "{end:?}");
    assert!(pw.serial.lock().unwrap().is_empty() && pw.frames_out.lock().unwrap().is_empty());
}

#[test]
fn primary_process_lost_the_secondary_goes_live_and_carries_on() {
    let (addr, arb) = (free_port(), arbiter());
    let sec = secondary(addr, Some(failover(&arb)), Duration::ZERO);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary(addr, Some(failover(&arb)), &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    feed(&sw, 3);
    let (_s_stop, s_guest) = run_secondary(&ss, &sw, 3000, Duration::from_micros(200));
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, 3000, Duration::from_micros(200));
    wait_for("some replay", Duration::from_secs(10), || ss.board().snapshot().log_position > 100);
    // The primary's process dies: its guest stops, its session goes
    // without a word (the kernel closes its sockets).
    p_stop.stop();
    let _ = p_guest.join();
    drop(ps);
    let outcome = s_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::PoweredOff { .. })), "{outcome:?}");
    let board = ss.board();
    assert!(matches!(ss.finish(outcome), SecondaryEnd::WentLive(_)));
    let st = board.snapshot();
    assert_eq!(st.role, Role::Standalone);
    let f = st.last_failure.expect("a failure event");
    assert_eq!((f.kind, f.detected_by.as_str()), ("primary lost", "log channel closed"));
    // Live now: its outputs reach its world, the frames fed to it echo.
    assert!(!sw.serial.lock().unwrap().is_empty());
    assert_eq!(sw.frames_out.lock().unwrap().len(), 3);
}

/// A relay in front of the secondary: TCP (the channel) and UDP
/// (heartbeats) on one port, each cut on its own.
struct Relay {
    addr: SocketAddr,
    cut_tcp: Arc<AtomicBool>,
}

fn relay(to: SocketAddr) -> Relay {
    let addr = free_port();
    let cut_tcp = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind(addr).unwrap();
    let cut = cut_tcp.clone();
    std::thread::spawn(move || {
        let (a, _) = listener.accept().unwrap();
        // The secondary may not listen yet (its session starts on a thread of
        // its own): retry, bounded.
        let started = Instant::now();
        let b = loop {
            match TcpStream::connect(to) {
                Ok(b) => break b,
                Err(e) if started.elapsed() < Duration::from_secs(20) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("the relay cannot reach the secondary: {e}"),
            }
        };
        for (mut from, mut into) in
            [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b.try_clone().unwrap(), a.try_clone().unwrap())]
        {
            std::thread::spawn(move || std::io::copy(&mut from, &mut into));
        }
        while !cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = a.shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    });
    let udp = UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut primary: Option<SocketAddr> = None;
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let dest = if from == to {
                primary
            } else {
                primary = Some(from);
                Some(to)
            };
            if let Some(d) = dest {
                let _ = udp.send_to(&buf[..n], d);
            }
        }
    });
    Relay { addr, cut_tcp }
}

#[test]
fn channel_cut_while_heartbeats_flow_the_primary_keeps_the_guest() {
    let (addr, arb) = (free_port(), arbiter());
    let sec = secondary(addr, Some(failover(&arb)), Duration::ZERO);
    let r = relay(addr);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary(r.addr, Some(failover(&arb)), &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s_stop, s_guest) = run_secondary(&ss, &sw, 1_000_000, Duration::ZERO);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, 1_000_000, Duration::from_micros(100));
    let pb = ps.board();
    wait_for("heartbeats both ways", Duration::from_secs(10), || {
        pb.snapshot().heartbeats.is_some_and(|h| h.accepted > 3)
            && ss.board().snapshot().heartbeats.is_some_and(|h| h.accepted > 3)
    });
    r.cut_tcp.store(true, Ordering::SeqCst);
    // The secondary gives the primary its head start and loses.
    let s_outcome = s_guest.join().unwrap();
    assert!(matches!(ss.finish(s_outcome), SecondaryEnd::LostArbiter));
    wait_for("the primary carrying on alone", Duration::from_secs(10), || pb.snapshot().role == Role::Standalone);
    let f = pb.snapshot().last_failure.expect("a failure event");
    assert_eq!((f.kind, f.detected_by.as_str()), ("secondary lost", "log channel closed"));
    // Alone, its outputs reach the world without acks.
    wait_for("the lone primary's outputs", Duration::from_secs(10), || !pw.serial.lock().unwrap().is_empty());
    p_stop.stop();
    let _ = p_guest.join();
    assert!(matches!(ps.finish(ExitIndex(0)).unwrap(), PrimaryEnd::Finished));
}

#[test]
fn the_secondary_stops_cleanly_where_the_primary_stopped() {
    let (addr, arb) = (free_port(), arbiter());
    let sec = secondary(addr, Some(failover(&arb)), Duration::ZERO);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary(addr, Some(failover(&arb)), &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s, s_guest) = run_secondary(&ss, &sw, 1_000_000, Duration::ZERO);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, 1_000_000, Duration::from_micros(100));
    wait_for("some replay", Duration::from_secs(10), || ss.board().snapshot().log_position > 50);
    // An operator stops the primary (SIGTERM): a clean end, not a failure.
    p_stop.stop();
    let Ok(RunOutcome::Stopped { exit_index }) = p_guest.join().unwrap() else { panic!("not stopped") };
    assert!(matches!(ps.finish(exit_index).unwrap(), PrimaryEnd::Finished));
    let s_outcome = s_guest.join().unwrap();
    let end = ss.finish(s_outcome);
    assert!(matches!(end, SecondaryEnd::PrimaryStopped), "{end:?}");
    assert!(sw.serial.lock().unwrap().is_empty(), "a secondary that did not go live emitted");
}

#[test]
fn both_sides_claim_at_once_exactly_one_wins() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for _ in 0..5 {
        let arb = arbiter();
        let board = pair::Board::new("t", Role::Primary);
        let key = [9u8; 32];
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (a, b) = rt.block_on(async {
            let cfg = failover(&arb);
            let a = Failover::start(&cfg, &board, "t", heartbeat::Role::Primary, &key, local, None).await.unwrap();
            let b = Failover::start(&cfg, &board, "t", heartbeat::Role::Secondary, &key, local, None).await.unwrap();
            (a, b)
        });
        let now = Instant::now();
        let loss = pair::status::Loss { last_heard: now, decided: now, by: pair::status::Detection::Silence };
        let (va, vb) = rt.block_on(async { tokio::join!(a.claim(&loss), b.claim(&loss)) });
        assert_eq!(u8::from(va.won()) + u8::from(vb.won()), 1, "{va:?} {vb:?}");
    }
}

#[test]
fn a_claim_that_fails_on_io_is_never_a_win() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let arb = arbiter();
    let board = pair::Board::new("t", Role::Secondary);
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let f = rt
        .block_on(Failover::start(&failover(&arb), &board, "t", heartbeat::Role::Secondary, &[9; 32], local, None))
        .unwrap();
    // The shared storage goes bad under it.
    let path = arb.spec.strip_prefix("file:").unwrap();
    std::fs::write(path, "not an arbiter\n").unwrap();
    let now = Instant::now();
    let loss = pair::status::Loss { last_heard: now, decided: now, by: pair::status::Detection::Silence };
    let v = rt.block_on(f.claim(&loss));
    assert!(matches!(v, Verdict::Unreachable(_)), "{v:?}");
}

#[test]
fn held_outputs_are_bounded_in_bytes_and_the_guest_waits_at_the_bound() {
    let addr = free_port();
    let sec = secondary(addr, None, Duration::from_secs(60));
    let pw = Arc::new(World::default());
    feed(&pw, 50);
    let (ps, gate) = primary_with(addr, None, &pw, |c| c.max_held_bytes = 2000);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s_stop, _s_guest) = run_secondary(&ss, &sw, 1_000_000, Duration::ZERO);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, 1_000_000, Duration::ZERO);
    let board = ps.board();
    wait_for("the output side to fill", Duration::from_secs(10), || board.snapshot().outputs_held_bytes > 2000);
    let at = board.snapshot().exit_index;
    std::thread::sleep(Duration::from_millis(100));
    let st = board.snapshot();
    // One output may cross the bound, then the guest waits: no progress.
    assert!(st.outputs_held_bytes <= 2000 + 200, "{st:?}");
    assert_eq!(st.exit_index, at, "the guest ran on past the bound");
    assert!(pw.serial.lock().unwrap().is_empty());
    // A stop still ends it.
    p_stop.stop();
    let outcome = p_guest.join().unwrap();
    assert!(matches!(outcome, Ok(RunOutcome::Stopped { .. })), "{outcome:?}");
}

#[test]
fn a_frozen_replayer_is_noticed_and_the_primary_carries_on() {
    let (addr, arb) = (free_port(), arbiter());
    let mut fo = failover(&arb);
    fo.max_lag = Duration::from_millis(300);
    let sec = secondary(addr, Some(fo.clone()), Duration::ZERO);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary(addr, Some(fo), &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s_stop, s_guest, frozen) = run_secondary_frozen(&ss, &sw, 1_000_000, Duration::ZERO);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, 1_000_000, Duration::from_micros(100));
    let pb = ps.board();
    wait_for("replay under way", Duration::from_secs(10), || ss.board().snapshot().log_position > 50);
    // The secondary's vCPU freezes; its network side (acks, heartbeats) lives on.
    frozen.store(true, Ordering::SeqCst);
    wait_for("the primary carrying on alone", Duration::from_secs(10), || pb.snapshot().role == Role::Standalone);
    let f = pb.snapshot().last_failure.expect("a failure event");
    assert_eq!((f.kind, f.detected_by.as_str()), ("secondary lost", "replay lag"));
    assert!(f.reaction_ms >= 300.0, "{f:?}");
    // Thawed, the secondary finds the primary holds the arbiter: it stops.
    frozen.store(false, Ordering::SeqCst);
    let s_outcome = s_guest.join().unwrap();
    let end = ss.finish(s_outcome);
    assert!(matches!(end, SecondaryEnd::LostArbiter), "{end:?}");
    assert!(sw.serial.lock().unwrap().is_empty() && sw.frames_out.lock().unwrap().is_empty());
    p_stop.stop();
    let _ = p_guest.join();
    assert!(matches!(ps.finish(ExitIndex(0)).unwrap(), PrimaryEnd::Finished));
}

#[test]
fn a_guest_that_keeps_the_channel_busy_still_has_its_log_shipped() {
    // A guest with no pacing outputs at every 16th exit: each output queues
    // records and a flush faster than the channel's writer encodes them. The
    // writer must still write as it goes (it once drained the queue first and
    // never got to write: the secondary stopped at ~900 records).
    let addr = free_port();
    let sec = secondary(addr, None, Duration::ZERO);
    let pw = Arc::new(World::default());
    let (ps, gate) = primary(addr, None, &pw);
    let ss = sec.join().unwrap();
    let sw = Arc::new(World::default());
    let (_s_stop, _s_guest) = run_secondary(&ss, &sw, u64::MAX, Duration::ZERO);
    let (p_stop, p_guest) = run_primary(&ps, gate, &pw, u64::MAX, Duration::ZERO);
    let board = ss.board();
    // 0.5 s here with the fix, 18 s without it.
    wait_for("the secondary receiving the busy guest's log", Duration::from_secs(5), || {
        board.snapshot().acked_position.unwrap_or(0) > 50_000
    });
    assert!(!pw.serial.lock().unwrap().is_empty(), "no output was released");
    p_stop.stop();
    let _ = p_guest.join();
}
