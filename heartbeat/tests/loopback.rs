//! Two heartbeat services over loopback UDP, and a third socket that forges
//! and replays. Waits are on the services' watch channels, each with a
//! timeout as the failure bound; the bounds are generous because the
//! machine running the tests is noisy, and the measured figures are
//! printed (`--nocapture`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use heartbeat::{
    Challenge, Heartbeat, HeartbeatKey, Incarnation, PairId, PeerState, Progress, Role, Sender, Service, ServiceConfig,
    ServiceStats,
};
use tokio::sync::watch;
use tokio::time::timeout;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// How long anything that should take a few intervals may take.
const FEW_INTERVALS: Duration = Duration::from_secs(2);
/// Slack on top of the silence limit before the test calls a detection late.
const SLACK: Duration = Duration::from_millis(250);

fn pair() -> PairId {
    PairId::for_vm_name("loopback")
}

/// A socket bound to a free loopback port, for a service to take over, so
/// both services' addresses are known before either starts.
fn bound() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").unwrap()
}

fn start(role: Role, socket: UdpSocket, peer: Option<SocketAddr>) -> Service {
    let local = socket.local_addr().unwrap();
    Service::from_std(socket, ServiceConfig::new(role, pair(), local, peer), KEY).unwrap()
}

/// Wait for the state to satisfy `pred`, failing after `within`.
async fn wait_state(
    watch: &mut watch::Receiver<PeerState>,
    within: Duration,
    what: &str,
    pred: impl FnMut(&PeerState) -> bool,
) -> PeerState {
    let waited = timeout(within, watch.wait_for(pred)).await.map(|state| state.map(|state| *state));
    match waited {
        Ok(Ok(state)) => state,
        Ok(Err(_)) => panic!("{what}: the service ended"),
        Err(_) => panic!("{what}: not within {within:?} (state {:?})", *watch.borrow()),
    }
}

async fn wait_stats(
    watch: &mut watch::Receiver<ServiceStats>,
    what: &str,
    pred: impl FnMut(&ServiceStats) -> bool,
) -> ServiceStats {
    let waited = timeout(FEW_INTERVALS, watch.wait_for(pred)).await.map(|stats| stats.map(|stats| *stats));
    match waited {
        Ok(Ok(stats)) => stats,
        Ok(Err(_)) => panic!("{what}: the service ended"),
        Err(_) => panic!("{what}: not within {FEW_INTERVALS:?} ({:?})", *watch.borrow()),
    }
}

/// Whether the state stays clear of `pred` for all of `window`.
async fn stays_clear_of(
    watch: &mut watch::Receiver<PeerState>,
    window: Duration,
    pred: impl FnMut(&PeerState) -> bool,
) -> Result<(), PeerState> {
    let waited = timeout(window, watch.wait_for(pred)).await.map(|state| state.map(|state| *state));
    match waited {
        Err(_) => Ok(()),
        Ok(Ok(state)) => Err(state),
        Ok(Err(_)) => panic!("the service ended"),
    }
}

async fn send_all(socket: &tokio::net::UdpSocket, datagrams: &[Vec<u8>], to: SocketAddr) {
    for datagram in datagrams {
        socket.send_to(datagram, to).await.unwrap();
    }
}

fn is_dead(state: &PeerState) -> bool {
    matches!(state, PeerState::Dead { .. })
}

#[tokio::test]
async fn two_services_see_each_other_up_and_a_stopped_one_dead() {
    let (a_socket, b_socket) = (bound(), bound());
    let (a_addr, b_addr) = (a_socket.local_addr().unwrap(), b_socket.local_addr().unwrap());
    let started = Instant::now();
    let primary = start(Role::Primary, a_socket, Some(b_addr));
    let secondary = start(Role::Secondary, b_socket, Some(a_addr));
    let (mut primary_sees, mut secondary_sees) = (primary.watch(), secondary.watch());
    wait_state(&mut primary_sees, FEW_INTERVALS, "primary sees the secondary up", |s| *s == PeerState::Up).await;
    wait_state(&mut secondary_sees, FEW_INTERVALS, "secondary sees the primary up", |s| *s == PeerState::Up).await;
    println!("both up {:?} after start", started.elapsed());

    // Progress travels with the heartbeats.
    primary.set_progress(12_345, 678);
    let mut secondary_stats = secondary.watch_stats();
    let stats = wait_stats(&mut secondary_stats, "the primary's progress arrives", |s| {
        s.peer_progress == Some(Progress { exit_index: 12_345, log_position: 678 })
    })
    .await;
    assert_eq!(stats.peer_incarnation, Some(primary.incarnation()));
    assert_eq!(stats.peer_addr, Some(a_addr));
    assert_eq!(stats.received.forged + stats.received.foreign + stats.received.malformed, 0, "{stats:?}");

    // Both keep each other up for a while (20 intervals): a false "dead" on
    // an idle loopback would show here.
    let quiet = stays_clear_of(&mut secondary_sees, Duration::from_millis(200), is_dead).await;
    assert_eq!(quiet, Ok(()), "the secondary saw the running primary dead");

    // Stop the primary: the secondary must see it dead.
    primary.stop();
    let stopped_at = Instant::now();
    primary.stopped().await;
    let limit = secondary.timeout();
    let state =
        wait_state(&mut secondary_sees, limit + SLACK, "secondary sees the stopped primary dead", is_dead).await;
    let seen_after_stop = stopped_at.elapsed();
    let PeerState::Dead { since_last: reaction } = state else { unreachable!() };
    println!(
        "dead after {:.1} ms of silence (limit {} ms); {:.1} ms after stop()",
        reaction.as_secs_f64() * 1e3,
        limit.as_millis(),
        seen_after_stop.as_secs_f64() * 1e3
    );
    // Decided when the silence passed the limit, not a tick later (the
    // task wakes at the deadline), within the slack a noisy machine needs.
    assert!(reaction > limit, "{reaction:?}");
    assert!(reaction <= limit + SLACK, "{reaction:?}");
    assert!(is_dead(&secondary.peer_state()));

    // A primary that comes back (a new process: a new incarnation, its
    // sequence numbers from 1 again) is accepted.
    let again = start(Role::Primary, UdpSocket::bind(a_addr).unwrap(), Some(b_addr));
    assert_ne!(again.incarnation(), primary.incarnation());
    wait_state(&mut secondary_sees, FEW_INTERVALS, "secondary sees the restarted primary up", |s| *s == PeerState::Up)
        .await;
    let stats = wait_stats(&mut secondary_stats, "the new incarnation is current", |s| {
        s.peer_incarnation == Some(again.incarnation())
    })
    .await;
    assert_eq!(stats.received.forged, 0);
}

#[tokio::test]
async fn a_peer_not_there_yet_stays_unknown_and_is_learnt_when_it_comes() {
    // The primary sends to an address where nobody listens yet.
    let reserved = bound();
    let secondary_addr = reserved.local_addr().unwrap();
    let primary = start(Role::Primary, bound(), Some(secondary_addr));
    let mut primary_sees = primary.watch();
    // Ten silence limits with no peer: Unknown throughout, never Dead.
    let window = primary.timeout() * 10;
    let changed = stays_clear_of(&mut primary_sees, window, |s| *s != PeerState::Unknown).await;
    assert_eq!(changed, Ok(()), "the state changed with no peer");
    assert_eq!(primary.peer_state(), PeerState::Unknown);
    assert_eq!(primary.last_heard(), None);
    assert!(primary.stats().sent >= 5, "{:?}", primary.stats());

    // The secondary comes, knowing only its own address: it learns the
    // primary's from the primary's heartbeats and answers there.
    let secondary = start(Role::Secondary, reserved, None);
    let mut secondary_sees = secondary.watch();
    wait_state(&mut secondary_sees, FEW_INTERVALS, "secondary sees the primary", |s| *s == PeerState::Up).await;
    wait_state(&mut primary_sees, FEW_INTERVALS, "primary sees the late secondary", |s| *s == PeerState::Up).await;
    assert_eq!(secondary.stats().peer_addr, Some(primary.local_addr()));
}

#[tokio::test]
async fn log_traffic_counts_as_life() {
    // A peer that never heartbeats (nobody at the address) but whose log
    // traffic the caller reports.
    let silent = bound();
    let primary = start(Role::Primary, bound(), Some(silent.local_addr().unwrap()));
    let mut sees = primary.watch();
    primary.note_life();
    assert_eq!(primary.peer_state(), PeerState::Up);
    wait_state(&mut sees, FEW_INTERVALS, "up on log traffic", |s| *s == PeerState::Up).await;
    let state = wait_state(&mut sees, primary.timeout() + SLACK, "dead when the traffic stops", is_dead).await;
    println!("dead {state:?} after the last log traffic");
    primary.note_life();
    wait_state(&mut sees, FEW_INTERVALS, "up again on new traffic", |s| *s == PeerState::Up).await;
}

#[tokio::test]
async fn forged_replayed_and_junk_datagrams_are_ignored_counted_and_never_life() {
    let (a_socket, b_socket) = (bound(), bound());
    let (a_addr, b_addr) = (a_socket.local_addr().unwrap(), b_socket.local_addr().unwrap());
    let primary = start(Role::Primary, a_socket, Some(b_addr));
    let secondary = start(Role::Secondary, b_socket, Some(a_addr));
    let mut secondary_sees = secondary.watch();
    let mut secondary_stats = secondary.watch_stats();
    wait_state(&mut secondary_sees, FEW_INTERVALS, "secondary sees the primary up", |s| *s == PeerState::Up).await;
    // Let the primary get well past the heartbeats that will be replayed.
    const REPLAYED: u64 = 20;
    wait_stats(&mut secondary_stats, "the primary sent enough", |s| s.received.accepted > REPLAYED + 5).await;

    // The attacker: copies of the primary's first heartbeats (byte for
    // byte what it sent: same key, incarnation, sequence numbers, progress),
    // heartbeats forged without the key, the secondary's own heartbeats
    // reflected, and junk.
    let key = HeartbeatKey::derive(KEY).unwrap();
    let mut copy = Sender::new(key.clone(), Role::Primary, pair(), primary.incarnation());
    let replays: Vec<_> =
        (0..REPLAYED).map(|_| copy.next(Progress::default(), Challenge::NONE, Challenge::NONE)).collect();
    let wrong_key = HeartbeatKey::derive(&[0x55; 32]).unwrap();
    let forged: Vec<_> = (1..=10u64)
        .map(|seq| {
            let heartbeat = Heartbeat {
                role: Role::Primary,
                pair: pair(),
                incarnation: Incarnation(7),
                seq: 1_000_000 + seq,
                progress: Progress::default(),
                challenge: Challenge::NONE,
                echo: Challenge::NONE,
            };
            heartbeat.encode(&wrong_key)
        })
        .collect();
    let mut mirror = Sender::new(key, Role::Secondary, pair(), secondary.incarnation());
    let reflected = mirror.next(Progress::default(), Challenge::NONE, Challenge::NONE);
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let attack: Vec<Vec<u8>> = replays
        .iter()
        .map(|d| d.to_vec())
        .chain(forged.iter().map(|d| d.to_vec()))
        .chain([reflected.to_vec(), b"junk".to_vec(), vec![0u8; 2000]])
        .collect();
    send_all(&attacker, &attack, b_addr).await;
    let stats = wait_stats(&mut secondary_stats, "the attack is counted", |s| {
        s.received.replayed >= REPLAYED
            && s.received.forged >= 10
            && s.received.foreign >= 1
            && s.received.malformed >= 2
    })
    .await;
    println!("after one attack: {:?}", stats.received);
    assert_eq!(secondary.peer_state(), PeerState::Up);

    // Now the primary dies, and the attacker keeps replaying its old
    // heartbeats and forging new ones: none of it is life.
    primary.stop();
    primary.stopped().await;
    let limit = secondary.timeout();
    let dead = async {
        let mut sees = secondary.watch();
        sees.wait_for(is_dead).await.map(|state| *state)
    };
    let keep_attacking = async {
        // Paces the attack traffic (every 2 ms); nothing waits on it.
        let mut pace = tokio::time::interval(Duration::from_millis(2));
        loop {
            pace.tick().await;
            send_all(&attacker, &attack, b_addr).await;
        }
    };
    let state = tokio::select! {
        state = timeout(limit + SLACK, dead) => state.expect("dead despite replays").unwrap(),
        () = keep_attacking => unreachable!(),
    };
    let PeerState::Dead { since_last } = state else { unreachable!() };
    let after = secondary.stats().received;
    println!("dead after {since_last:?} of silence under attack; counters {after:?}");
    assert!(since_last <= limit + SLACK);
    assert!(after.replayed > stats.received.replayed, "the replays went on: {after:?}");
    assert!(after.forged > stats.received.forged, "the forgeries went on: {after:?}");
}

/// What each side of an earlier run of the pair sent: every datagram, in
/// order, captured by a relay between the two (same key, same pair).
struct EarlierRun {
    from_primary: Vec<Vec<u8>>,
    from_secondary: Vec<Vec<u8>>,
}

async fn an_earlier_run() -> EarlierRun {
    let (p_socket, s_socket) = (bound(), bound());
    let (p_addr, s_addr) = (p_socket.local_addr().unwrap(), s_socket.local_addr().unwrap());
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (captured_tx, mut captured) = tokio::sync::mpsc::unbounded_channel::<(bool, Vec<u8>)>();
    let relay_task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = relay.recv_from(&mut buf).await {
            let datagram = buf[..n].to_vec();
            let to = if from == p_addr { s_addr } else { p_addr };
            let _ = captured_tx.send((from == p_addr, datagram.clone()));
            let _ = relay.send_to(&datagram, to).await;
        }
    });
    let primary = start(Role::Primary, p_socket, Some(relay_addr));
    let secondary = start(Role::Secondary, s_socket, None);
    let (mut p_stats, mut s_stats) = (primary.watch_stats(), secondary.watch_stats());
    wait_stats(&mut p_stats, "the earlier primary hears its secondary", |s| s.received.accepted >= 10).await;
    wait_stats(&mut s_stats, "the earlier secondary hears its primary", |s| s.received.accepted >= 10).await;
    primary.stop();
    secondary.stop();
    primary.stopped().await;
    secondary.stopped().await;
    relay_task.abort();
    let mut run = EarlierRun { from_primary: Vec::new(), from_secondary: Vec::new() };
    while let Ok((from_primary, datagram)) = captured.try_recv() {
        if from_primary {
            run.from_primary.push(datagram)
        } else {
            run.from_secondary.push(datagram)
        }
    }
    run
}

#[tokio::test]
async fn heartbeats_replayed_from_an_earlier_run_never_displace_the_live_peer() {
    // Issue 12, item 4: one heartbeat captured from an earlier run of the
    // pair, replayed to the new one, made the receiver retire the live
    // peer's incarnation; every real heartbeat then counted as replayed and
    // the pair failed over at the first idle gap.
    let earlier = an_earlier_run().await;
    assert!(earlier.from_primary.len() >= 10 && earlier.from_secondary.len() >= 10);

    let (p_socket, s_socket) = (bound(), bound());
    let (p_addr, s_addr) = (p_socket.local_addr().unwrap(), s_socket.local_addr().unwrap());
    // As the binary runs them: the primary knows where the secondary is,
    // the secondary learns it.
    let primary = start(Role::Primary, p_socket, Some(s_addr));
    let secondary = start(Role::Secondary, s_socket, None);
    let (mut primary_sees, mut secondary_sees) = (primary.watch(), secondary.watch());
    wait_state(&mut primary_sees, FEW_INTERVALS, "primary sees the secondary up", |s| *s == PeerState::Up).await;
    wait_state(&mut secondary_sees, FEW_INTERVALS, "secondary sees the primary up", |s| *s == PeerState::Up).await;

    // One datagram of each side, the newest, replayed once to the other.
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (old_p, old_s) = (earlier.from_primary.last().unwrap(), earlier.from_secondary.last().unwrap());
    attacker.send_to(old_p, s_addr).await.unwrap();
    attacker.send_to(old_s, p_addr).await.unwrap();
    let mut s_stats = secondary.watch_stats();
    wait_stats(&mut s_stats, "the replay reached the secondary", |s| s.received.unproven >= 1).await;
    let window = secondary.timeout() * 6;
    let quiet = stays_clear_of(&mut secondary_sees, window, is_dead).await;
    assert_eq!(quiet, Ok(()), "the secondary lost the live primary after one replayed heartbeat");

    // Then every old heartbeat, again and again, interleaved with the
    // live ones, both ways.
    let keep_replaying = async {
        // Paces the attack traffic (every 2 ms); nothing waits on it.
        let mut pace = tokio::time::interval(Duration::from_millis(2));
        loop {
            pace.tick().await;
            send_all(&attacker, &earlier.from_primary, s_addr).await;
            send_all(&attacker, &earlier.from_secondary, p_addr).await;
        }
    };
    let both_quiet = async {
        let secondary_quiet = stays_clear_of(&mut secondary_sees, window, is_dead).await;
        let primary_quiet = stays_clear_of(&mut primary_sees, window, is_dead).await;
        (secondary_quiet, primary_quiet)
    };
    let (secondary_quiet, primary_quiet) = tokio::select! {
        quiet = both_quiet => quiet,
        () = keep_replaying => unreachable!(),
    };
    assert_eq!(secondary_quiet, Ok(()), "the secondary lost the live primary under replays");
    assert_eq!(primary_quiet, Ok(()), "the primary lost the live secondary under replays");
    let (p, s) = (primary.stats(), secondary.stats());
    println!("under replays: primary {:?}; secondary {:?}", p.received, s.received);
    assert_eq!(s.peer_incarnation, Some(primary.incarnation()));
    assert_eq!(p.peer_incarnation, Some(secondary.incarnation()));
    assert_eq!(s.peer_addr, Some(p_addr), "the secondary's heartbeats must still go to the live primary");
    assert!(s.received.unproven > 10 && p.received.unproven > 10, "{s:?} {p:?}");
    // The replays are answered one for one at most, never amplified.
    assert!(s.answered <= s.received.unproven, "{s:?}");
}
