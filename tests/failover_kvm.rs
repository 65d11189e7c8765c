//! Failover experiments on real KVM in a lab of namespaces: the primary is
//! killed and the guest lives on on the secondary, its clients' TCP
//! connections intact, nothing acknowledged lost; the secondary is killed
//! and the primary carries on alone. (The thesis' experiments; the full set
//! and the 20-repetition figures are the failover issue's.)

mod common;

use common::{connect_kvstore as connect, failover_pair as pair, failover_pair_of as pair_of, reply, resp, Proc};

use std::io::Write;
use std::time::{Duration, Instant};

use ftvm_lab as lab;
use lab::Lab;

#[test]
fn kvm_netns_sigkill_primary_kvstore_lives_on_with_its_connection_and_every_write() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("fo");
    let (mut primary, secondary, dir) = pair(&lab);
    let mut s = connect(&lab);
    let mut acked = 0i64;
    let mut worst_stall = Duration::ZERO;
    let kill_at = 200;
    for i in 1..=400i64 {
        if i == kill_at {
            primary.0.kill().unwrap();
            let _ = primary.0.wait();
        }
        let start = Instant::now();
        s.get_mut().write_all(&resp(&["INCR", "counter"])).unwrap();
        let r = reply(&mut s);
        worst_stall = worst_stall.max(start.elapsed());
        assert_eq!(r, format!(":{}\r\n", acked + 1), "INCR #{i} after {acked} acknowledged");
        acked += 1;
        let key = format!("k{i}");
        s.get_mut().write_all(&resp(&["SET", &key, &i.to_string()])).unwrap();
        assert_eq!(reply(&mut s), "+OK\r\n");
    }
    // Same connection, every acknowledged write still there.
    s.get_mut().write_all(&resp(&["GET", "counter"])).unwrap();
    assert_eq!(reply(&mut s), format!("${}\r\n{acked}\r\n", acked.to_string().len()));
    for i in [1, kill_at - 1, kill_at, 400] {
        s.get_mut().write_all(&resp(&["GET", &format!("k{i}")])).unwrap();
        assert_eq!(reply(&mut s), format!("${}\r\n{i}\r\n", i.to_string().len()), "k{i}");
    }
    let st = common::status_json(dir.path().join("s.sock").to_str().unwrap());
    assert_eq!(st["role"], "standalone", "{st}");
    // Only what applies to a standalone: no acks, no replay lag, nothing
    // held (what was held went out at go-live).
    assert!(st["acked_position"].is_null() && st["replay_lag_records"].is_null(), "{st}");
    assert_eq!(st["outputs_held"], 0, "{st}");
    assert_eq!(st["name"], "kvstore", "{st}");
    assert!(st["uptime_s"].as_f64().is_some_and(|u| u > 0.0), "{st}");
    let f = &st["last_failure"];
    assert_eq!(f["kind"], "primary lost", "{st}");
    // Times in ms, rounded to the microsecond.
    for k in ["reaction_ms", "recovery_ms", "outage_ms"] {
        let v = f[k].as_f64().unwrap();
        assert!((v * 1000.0 - (v * 1000.0).round()).abs() < 1e-6, "{k} = {v}");
    }
    // The dead process's kernel closed the channel: no need to wait for
    // the heartbeats' silence.
    assert_eq!(f["detected_by"], "log channel closed", "{st}");
    eprintln!(
        "failover: reaction {} ms, recovery {} ms, client-seen worst stall {:?}",
        f["reaction_ms"], f["recovery_ms"], worst_stall
    );
    drop(secondary);
}

#[test]
fn kvm_netns_sigkill_secondary_the_primary_carries_on_alone() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("fs");
    let (primary, mut secondary, dir) = pair(&lab);
    let mut s = connect(&lab);
    s.get_mut().write_all(&resp(&["SET", "a", "1"])).unwrap();
    assert_eq!(reply(&mut s), "+OK\r\n");
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    // Replies held for acks that will never come are released once the
    // primary has won the arbiter.
    let start = Instant::now();
    for i in 0..50 {
        s.get_mut().write_all(&resp(&["INCR", "n"])).unwrap();
        assert_eq!(reply(&mut s), format!(":{}\r\n", i + 1));
    }
    let took = start.elapsed();
    let st = common::status_json(dir.path().join("p.sock").to_str().unwrap());
    assert_eq!(st["role"], "standalone", "{st}");
    assert_eq!(st["peer"], "down", "{st}");
    assert_eq!(st["last_failure"]["kind"], "secondary lost", "{st}");
    assert_eq!(st["last_failure"]["detected_by"], "log channel closed", "{st}");
    eprintln!("secondary lost: 50 requests in {took:?}; {}", st["last_failure"]);
    drop(primary);
}

/// Whether every thread of process `pid` is in the stopped state (`T` in /proc/PID/task/*/stat):
/// a SIGSTOP has taken effect.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks {
        let Ok(task) = task else { return false };
        // "TID (comm) STATE ...": the command name may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { return false };
        match stat.rsplit_once(") ") {
            Some((_, rest)) if rest.starts_with('T') => any = true,
            _ => return false,
        }
    }
    any
}

fn exit_code(p: &mut Proc, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < deadline, "process did not exit within {timeout:?}");
        // An external process's exit: wait() has no timeout to block on.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kvm_netns_sigkill_primary_streamer_every_sequence_number_arrives() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("fst");
    let client_ip = lab.client_ip();
    let sock = lab.client().run(move || std::net::UdpSocket::bind((client_ip, 5004)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cidr = lab.guest_cidr();
    let dest = format!("dest={client_ip}:5004");
    let guest = ["--guest", "streamer", "--ip", &cidr, "--param", &dest, "--param", "rate=1000"];
    let (mut primary, secondary, _dir) = pair_of(&lab, &guest);
    let mut seen = std::collections::BTreeSet::new();
    let mut buf = [0u8; 2048];
    let mut last_arrival = Instant::now();
    let mut gap = Duration::ZERO;
    let mut killed = false;
    while seen.len() < 3000 {
        let n = sock.recv(&mut buf).expect("datagram");
        assert_eq!(n, 1316);
        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
        let now = Instant::now();
        if killed {
            gap = gap.max(now - last_arrival);
        }
        last_arrival = now;
        seen.insert(seq);
        if !killed && seen.len() == 1000 {
            primary.0.kill().unwrap();
            let _ = primary.0.wait();
            killed = true;
        }
    }
    let max = *seen.iter().next_back().unwrap();
    let missing: Vec<u64> = (0..max).filter(|s| !seen.contains(s)).collect();
    assert!(missing.is_empty(), "sequence numbers never received: {:?}", &missing[..missing.len().min(20)]);
    eprintln!("streamer failover: longest gap between datagrams {gap:?}");
    drop(secondary);
}

#[test]
fn kvm_netns_sigstop_primary_loses_the_arbiter_and_emits_nothing_when_continued() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("fsp");
    let (mut primary, secondary, dir) = pair(&lab);
    let mut s = connect(&lab);
    s.get_mut().write_all(&resp(&["SET", "x", "1"])).unwrap();
    assert_eq!(reply(&mut s), "+OK\r\n");
    let pid = primary.0.id();
    common::signal("STOP", pid);
    // kill returns once the signal is queued; each thread stops on its way back to user mode. A
    // request sent before the vCPU and releaser threads stopped can still be answered by the
    // primary (seen on a loaded machine), and the secondary then has nothing to take over yet.
    assert!(lab::wait_for(Duration::from_secs(10), || all_threads_stopped(pid)), "the primary did not stop");
    // The secondary takes over: the same connection goes on.
    s.get_mut().write_all(&resp(&["INCR", "x"])).unwrap();
    assert_eq!(reply(&mut s), ":2\r\n");
    let st = common::status_json(dir.path().join("s.sock").to_str().unwrap());
    assert_eq!(st["role"], "standalone", "{st}");
    // A stopped process closes nothing: only the heartbeats' silence tells.
    assert_eq!(st["last_failure"]["detected_by"], "heartbeat silence", "{st}");
    // Watch host a's TAP: the old primary must not emit a single frame. The capture is live
    // when it returns and records every frame the TAP's holder writes (lab selftest
    // netns_root_capture_sees_every_frame_a_tap_user_sends_both_ways).
    let capture = lab.host_a().netns().capture(lab.host_a().tap());
    common::signal("CONT", pid);
    assert_eq!(
        exit_code(&mut primary, Duration::from_secs(30)),
        Some(4),
        "the continued primary must lose the arbiter"
    );
    // The primary has exited: every write it made to its TAP is on the capture's socket.
    let frames = capture.stop();
    let emitted: Vec<String> = frames
        .iter()
        .filter(|f| f.direction == lab::Direction::Received)
        .map(|f| format!("{} bytes, type {:#06x}", f.len, f.ethertype()))
        .collect();
    assert!(emitted.is_empty(), "the old primary emitted frames on its TAP: {emitted:?}");
    // Frames towards the TAP (the LAN's broadcasts, flooded by host a's bridge while the stopped
    // primary still held the TAP open) are the world's, not the old primary's.
    eprintln!("old primary's TAP: nothing emitted; {} frames towards it", frames.len());
    s.get_mut().write_all(&resp(&["GET", "x"])).unwrap();
    assert_eq!(reply(&mut s), "$1\r\n2\r\n");
    drop(secondary);
}

#[test]
fn kvm_netns_cut_link_exactly_one_side_goes_on() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("fcl");
    let (mut primary, mut secondary, _dir) = pair(&lab);
    let mut s = connect(&lab);
    s.get_mut().write_all(&resp(&["SET", "y", "1"])).unwrap();
    assert_eq!(reply(&mut s), "+OK\r\n");
    // Cut the dedicated link (heartbeats and log) with both hosts alive.
    lab.host_a().netns().set_link_up(lab.host_a().link_dev(), false);
    let (p, q) = loop {
        let p = primary.0.try_wait().unwrap().map(|s| s.code());
        let q = secondary.0.try_wait().unwrap().map(|s| s.code());
        if p.is_some() || q.is_some() {
            break (p, q);
        }
        // Waiting for one of two external processes to exit.
        std::thread::sleep(Duration::from_millis(20));
    };
    let loser = p.or(q).flatten();
    assert_eq!(loser, Some(4), "the side that lost the arbiter exits 4");
    // The other is still running, and serves the client.
    std::thread::sleep(Duration::from_millis(300));
    let alive = [primary.0.try_wait().unwrap().is_none(), secondary.0.try_wait().unwrap().is_none()];
    assert_eq!(alive.iter().filter(|a| **a).count(), 1, "exactly one side must go on: {alive:?}");
    let mut s2 = connect(&lab);
    s2.get_mut().write_all(&resp(&["GET", "y"])).unwrap();
    assert_eq!(reply(&mut s2), "$1\r\n1\r\n");
}

#[test]
fn kvm_netns_demo_runs_the_whole_story_for_both_guests() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    // The process failure is seen by the channel closing; the host failure
    // (nothing closes) by the heartbeats' silence alone.
    for (guest, failure, want, detected) in [
        ("kvstore", "process", "no acknowledged write lost", "detected by log channel closed"),
        ("streamer", "host", "every sequence number arrived", "detected by heartbeat silence"),
    ] {
        let out = common::ftvm().args(["demo", "--guest", guest, "--failure", failure]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "demo {guest}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(want) && stdout.contains("VMware FT"), "{stdout}");
        assert!(stdout.contains(detected), "{stdout}");
    }
    assert!(!lab::netns_list().iter().any(|n| n.contains("-demo-")), "the demo left namespaces behind");
}

#[test]
fn kvm_netns_sigterm_of_the_primary_is_a_clean_end_for_both() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("fte");
    let (mut primary, mut secondary, dir) = pair(&lab);
    let mut s = connect(&lab);
    for i in 1..=20 {
        s.get_mut().write_all(&resp(&["INCR", "n"])).unwrap();
        assert_eq!(reply(&mut s), format!(":{i}\r\n"));
    }
    // An operator stops the primary: its orderly end reaches the secondary,
    // which stops where it stopped, with the documented statuses.
    common::signal("TERM", primary.0.id());
    let log = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap_or_default();
    assert_eq!(exit_code(&mut primary, Duration::from_secs(30)), Some(143), "{}", log("primary.log"));
    assert_eq!(exit_code(&mut secondary, Duration::from_secs(30)), Some(0), "{}", log("secondary.log"));
    let slog = log("secondary.log");
    assert!(slog.contains("the primary stopped"), "{slog}");
    assert!(!slog.contains("went live"), "a clean stop was taken for a failure: {slog}");
    // Neither side owns the arbiter: a new pair may start.
    let arb = std::fs::read_to_string(dir.path().join("arbiter")).unwrap();
    assert!(arb.ends_with("owner (none)\n"), "{arb}");
}
