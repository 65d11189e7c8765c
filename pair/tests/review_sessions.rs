//! Adversarial review of the pair sessions: who owns the arbiter when a
//! copy stops, on the sessions' test harness (`harness/`): a scripted guest on
//! a primary and a secondary session joined by a real logging channel and
//! real heartbeats on loopback, with a real arbiter file.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pair::{Failover, PrimaryEnd, Role, SecondaryEnd};
use vmm::vcpu::RunOutcome;

mod harness;
use harness::*;

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
