//! Repair on real KVM in a lab of namespaces: a primary that lost its
//! secondary re-protects itself onto a standby (`ftvm secondary` with no
//! guest settings) by a live transfer while a client keeps writing; the
//! standby then takes over when the primary is killed, the client's
//! connection and every acknowledged write intact. Also: a transfer cut
//! midway and retried, a double failure, a lagging secondary's loss, a
//! guest fault after a repair (contained onto the new secondary), and a
//! diverged secondary healed by a fresh transfer.

mod common;

use common::rig::{args, Rig, Writer};

use std::time::Duration;

use ftvm_lab as lab;

/// Re-protected: a primary again, with `repair_ms` on its failure.
fn repaired(st: &serde_json::Value) -> bool {
    st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64()
}

/// Write on until the standby's log says it runs its failover (the primary
/// freed the arbiter for the new pair).
fn until_standby_protected(rig: &Rig, w: &mut Writer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !rig.log("standby.log").contains("protected") {
        w.write();
        assert!(std::time::Instant::now() < deadline, "the standby never started failover\n{}", rig.logs());
    }
}

#[test]
fn kvm_netns_a_lone_primary_reprotects_onto_a_standby_under_load_and_a_failover_to_it_loses_nothing() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("rp");
    let spare = rig.link(rig.lab.host_b(), 7001);
    let (mut secondary, mut primary) = rig.pair(&rig.kvstore(32), &[], &[], &["--standby", &spare]);
    let mut w = Writer::new(&rig.lab);
    w.writes(50);
    // The secondary's VMM dies: the primary carries on alone.
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    w.writes(50);
    let st = common::status_json(&rig.path("p.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());

    // A standby comes up on the failed secondary's host, with no guest
    // settings: the primary re-protects itself onto it while the client
    // writes on.
    let standby = rig.standby(rig.lab.host_b(), &spare, &[]);
    let st = rig.write_until(&mut w, &rig.path("p.sock"), Duration::from_secs(120), "repair", repaired);
    assert_eq!(st["peer"], "up", "{st}");
    let repair_ms = st["last_failure"]["repair_ms"].as_f64().unwrap();
    until_standby_protected(&rig, &mut w);
    let st = common::status_json(&rig.path("sb.sock"));
    assert_eq!(st["role"], "secondary", "{st}");
    assert_eq!(st["name"], "kvstore", "the name travels with the state: {st}");
    w.writes(50);
    let before = w.acked;

    // Now the primary dies: the standby, which never had the image, goes live.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    w.writes(50);
    w.check_all();
    let st = common::status_json(&rig.path("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    assert_eq!(st["last_failure"]["kind"], "primary lost", "{st}");
    eprintln!("repair: {repair_ms} ms (failure → new secondary in sync); {before} writes before the second failover, {} in all", w.acked);
    drop(standby);
}

#[test]
fn kvm_netns_a_standby_killed_mid_transfer_leaves_the_primary_serving_and_a_retry_succeeds() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("rk");
    let spare = rig.link(rig.lab.host_b(), 7001);
    // A guest with more memory written makes a longer transfer to cut.
    let (mut secondary, primary) = rig.pair(&rig.kvstore(64), &[], &[], &["--standby", &spare]);
    let mut w = Writer::new(&rig.lab);
    w.writes(20);
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    w.writes(20);

    // A standby that dies while the state streams to it.
    let mut standby = rig.standby(rig.lab.host_b(), &spare, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        // The control socket answers once the standby listens.
        if let Some(st) = common::rig::try_status(&rig.path("sb.sock")) {
            if st["state"].as_str().is_some_and(|s| s.contains("receiving the guest's state")) {
                break;
            }
            assert!(
                st["state"].as_str().is_some_and(|s| s.starts_with("standby")),
                "the transfer ended before it could be cut: {st}\n{}",
                rig.logs()
            );
        }
        assert!(std::time::Instant::now() < deadline, "no transfer began\n{}", rig.logs());
    }
    standby.0.kill().unwrap();
    let _ = standby.0.wait();
    // The primary runs on, alone, and serves.
    w.writes(20);
    let st = common::status_json(&rig.path("p.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    assert!(st["last_failure"]["repair_ms"].is_null(), "{st}");
    assert!(rig.log("primary.log").contains("re-protection onto"), "{}", rig.log("primary.log"));

    // The standby comes back (as systemd would restart it): the retry succeeds.
    std::fs::rename(rig.dir.path().join("standby.log"), rig.dir.path().join("standby-killed.log")).unwrap();
    let standby = rig.standby(rig.lab.host_b(), &spare, &[]);
    rig.write_until(&mut w, &rig.path("p.sock"), Duration::from_secs(120), "repair after the retry", repaired);
    w.writes(20);
    w.check_all();
    drop((primary, standby));
}

#[test]
fn kvm_netns_double_failure_the_survivor_reprotects_onto_a_spare_and_the_client_survives_both() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("rd");
    // Each host's spare port: the other side's --standby.
    let spare_a = rig.link(rig.lab.host_a(), 7001);
    let spare_b = rig.link(rig.lab.host_b(), 7001);
    let (mut secondary, mut primary) =
        rig.pair(&rig.kvstore(32), &[], &["--standby", &spare_a], &["--standby", &spare_b]);
    let mut w = Writer::new(&rig.lab);
    w.writes(30);

    // First failure: the primary's VMM dies; the secondary goes live.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    w.writes(30);
    let st = common::status_json(&rig.path("s.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());

    // The failed primary's host comes back as a spare; the survivor
    // re-protects itself onto it while the client writes on.
    let standby = rig.standby(rig.lab.host_a(), &spare_a, &[]);
    let st = rig.write_until(&mut w, &rig.path("s.sock"), Duration::from_secs(120), "repair", repaired);
    assert_eq!(st["last_failure"]["kind"], "primary lost", "{st}");
    let repair_ms = st["last_failure"]["repair_ms"].as_f64().unwrap();
    until_standby_protected(&rig, &mut w);
    w.writes(30);

    // Second failure: the survivor dies too; the spare goes live.
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    w.writes(30);
    w.check_all();
    let st = common::status_json(&rig.path("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    eprintln!("double failure: repair after the first in {repair_ms} ms; {} writes, none lost", w.acked);
    drop(standby);
}

/// A primary whose secondary is lost while the log is backed up (a
/// CPU-bound guest the debug secondary replays more slowly than it runs)
/// re-protects onto a standby that then replays in step: the records the
/// old channel refused before the loss lie before the transfer's mark and
/// must not reach the new secondary (they did: it diverged at its first
/// record), and the shipper must go on after the old channel's failure.
#[test]
fn kvm_netns_a_primary_that_lost_a_lagging_secondary_reprotects_and_the_standby_replays_in_step() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("rl");
    let spare = rig.link(rig.lab.host_b(), 7001);
    let guest =
        args(&["--guest", "crunch", "--memory-mib", "16", "--param", "rounds=1000000000", "--digest-every", "100"]);
    let (a, b) = (rig.lab.host_a(), rig.lab.host_b());
    let listen = rig.link(b, 7000);
    let base = || guest.iter().cloned().chain(rig.common()).chain(args(&["--max-lag-ms", "60000"]));
    let mut s = args(&["secondary"]);
    s.extend(base().chain(args(&["--listen", &listen, "--control", &rig.path("s.sock")])));
    let mut secondary = rig.spawn(b, "secondary.log", &s);
    let mut p = args(&["primary"]);
    p.extend(base().chain(args(&["--peer", &listen, "--standby", &spare, "--control", &rig.path("p.sock")])));
    let _primary = rig.spawn(a, "primary.log", &p);
    let paired = lab::wait_for(Duration::from_secs(60), || rig.log("primary.log").contains("protected"));
    assert!(paired, "never paired\n{}", rig.logs());
    // Let the guest run ahead a while, then the secondary's VMM dies.
    let mut st = serde_json::Value::Null;
    let ahead = lab::wait_for(Duration::from_secs(60), || {
        st = common::status_json(&rig.path("p.sock"));
        st["log_position"].as_u64().unwrap_or(0) > 300
    });
    assert!(ahead, "the guest made no progress: {st}");
    eprintln!("secondary killed at log position {}", st["log_position"]);
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    let mut sb = args(&["secondary"]);
    sb.extend(rig.common().into_iter().chain(args(&["--max-lag-ms", "60000"])));
    sb.extend(args(&["--listen", &spare, "--control", &rig.path("sb.sock")]));
    let _standby = rig.spawn(b, "standby.log", &sb);
    let done = lab::wait_for(Duration::from_secs(120), || {
        st = common::status_json(&rig.path("p.sock"));
        repaired(&st)
    });
    assert!(done, "no repair within 120 s: {st}\n{}", rig.logs());
    // In step: the standby replays on past several digest points.
    let start = common::status_json(&rig.path("sb.sock"))["log_position"].as_u64().unwrap_or(0);
    let on = lab::wait_for(Duration::from_secs(60), || {
        st = common::status_json(&rig.path("sb.sock"));
        assert_eq!(st["role"], "secondary", "{st}\n{}", rig.logs());
        assert_eq!(st["divergences"], 0, "{st}\n{}", rig.logs());
        st["log_position"].as_u64().unwrap_or(0) > start + 300
    });
    assert!(on, "the standby does not replay on: {st}\n{}", rig.logs());
}

/// Containment goes on after a failover and a repair: the copy that went
/// live and re-protected itself logs barriers as a primary does, so a guest
/// fault there is handed over to the new secondary, which goes live from
/// the last barrier (before, the re-protected pair logged none, and the
/// fault was left to `--on-fault` while the new secondary replayed into
/// it). The fault is a host-side probe of B's copy that the test makes
/// fail; `strict` outputs, so the client's connection and every
/// acknowledged write survive both events.
#[test]
fn kvm_netns_a_guest_fault_after_a_failover_and_a_repair_is_contained_onto_the_new_secondary() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("rc");
    let spare_a = rig.link(rig.lab.host_a(), 7001);
    let spare_b = rig.link(rig.lab.host_b(), 7001);
    // Each host's probe fails once the test creates its file.
    let probe = |host: &str| format!("exec:test ! -e {}/fail-{host}", rig.dir.path().display());
    let (probe_a, probe_b) = (probe("a"), probe("b"));
    let extra = args(&["--output-mode", "strict", "--probe-timeout-ms", "2000"]);
    let (mut secondary, mut primary) = rig.pair(
        &rig.kvstore(32),
        &extra,
        &["--standby", &spare_a, "--probe", &probe_b],
        &["--standby", &spare_b, "--probe", &probe_a],
    );
    let mut w = Writer::new(&rig.lab);
    w.writes(30);
    // The primary's VMM dies: B goes live; a standby on A takes the state.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    let mut sb_extra = extra.clone();
    sb_extra.extend(args(&["--probe", &probe_a]));
    let standby = rig.standby(rig.lab.host_a(), &spare_a, &sb_extra);
    rig.write_until(&mut w, &rig.path("s.sock"), Duration::from_secs(120), "repair", repaired);
    // Barriers reach the new secondary: it holds replay at them.
    rig.write_until(&mut w, &rig.path("sb.sock"), Duration::from_secs(60), "a barrier at the new secondary", |st| {
        st["role"] == "secondary" && st["last_barrier_exit"].is_u64()
    });
    w.writes(30);
    // B's service fails its probe: contained onto A.
    std::fs::write(rig.dir.path().join("fail-b"), b"").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let handed = loop {
        w.write();
        if let Some(status) = secondary.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "B's copy did not hand its fault over\n{}", rig.logs());
    };
    assert_eq!(handed.code(), Some(4), "B handed the guest over (status 4)\n{}", rig.logs());
    w.writes(30);
    let st = common::status_json(&rig.path("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    assert_eq!(st["last_fault"]["action"], "contained", "{st}");
    assert_eq!(st["last_fault"]["source"], "probe", "{st}");
    w.check_all();
    let mut standby = standby;
    assert!(standby.0.try_wait().unwrap().is_none(), "the live copy runs on");
    eprintln!("contained after a repair: {} in all; the event: {}", w.acked, st["last_fault"]);
}

/// A divergence is healed, not only reported: the secondary whose replay
/// departs from the log (a clock reading served one nanosecond off, the
/// test hook `FTVM_TEST_DIVERGE_AT_EXIT`) drops its state and waits on its
/// own --listen as a standby; the primary, alone, re-protects itself onto
/// it by a fresh transfer while the client writes; then a failover to the
/// healed copy loses nothing.
#[test]
fn kvm_netns_a_diverged_secondary_is_healed_by_a_fresh_transfer() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("rv");
    let (a, b) = (rig.lab.host_a(), rig.lab.host_b());
    let listen = rig.link(b, 7000);
    let mut s = args(&["secondary"]);
    s.extend(rig.kvstore(32).into_iter().chain(rig.common()));
    s.extend(args(&["--tap", b.tap(), "--listen", &listen, "--control", &rig.path("s.sock")]));
    let secondary = rig.spawn_env(b, "secondary.log", &s, &[("FTVM_TEST_DIVERGE_AT_EXIT", "3000")]);
    let mut p = args(&["primary"]);
    p.extend(rig.kvstore(32).into_iter().chain(rig.common()));
    p.extend(args(&["--tap", a.tap(), "--peer", &listen, "--standby", &listen, "--control", &rig.path("p.sock")]));
    let mut primary = rig.spawn(a, "primary.log", &p);
    let mut w = Writer::new(&rig.lab);
    let st = rig.write_until(&mut w, &rig.path("p.sock"), Duration::from_secs(120), "healed", repaired);
    let repair_ms = st["last_failure"]["repair_ms"].as_f64().unwrap();
    let healed = rig.log("secondary.log");
    assert!(healed.contains("replay diverged") && healed.contains("healing"), "{healed}");
    // The healed copy runs its failover once the primary freed the arbiter.
    let st = rig.write_until(&mut w, &rig.path("s.sock"), Duration::from_secs(60), "the healed copy in sync", |st| {
        st["role"] == "secondary" && st["peer"] == "up" && st["arbiter_generation"].is_u64()
    });
    assert_eq!(st["divergences"], 1, "the healed divergence is counted: {st}");
    w.writes(30);
    // In step now: a failover to it loses nothing.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    w.writes(30);
    w.check_all();
    let st = common::status_json(&rig.path("s.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    eprintln!("divergence healed: repair_ms {repair_ms}; {} writes in all", w.acked);
    drop(secondary);
}

/// A primary started alone (`--unprotected-start`, no secondary yet) with
/// `--standby` protects itself as soon as a standby is there, as a primary
/// that lost its secondary does; it holds the arbiter until the new pair's
/// failover takes over, and then a failover to the standby loses nothing.
#[test]
fn kvm_netns_an_unprotected_start_protects_itself_onto_a_standby() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("ru");
    let (a, b) = (rig.lab.host_a(), rig.lab.host_b());
    let spare = rig.link(b, 7001);
    let mut p = args(&["primary"]);
    p.extend(rig.kvstore(32).into_iter().chain(rig.common()));
    p.extend(args(&["--tap", a.tap(), "--peer", &rig.link(b, 7000), "--unprotected-start", "--standby", &spare]));
    p.extend(args(&["--control", &rig.path("p.sock")]));
    let mut primary = rig.spawn(a, "primary.log", &p);
    let mut w = Writer::new(&rig.lab);
    w.writes(30);
    let st = common::status_json(&rig.path("p.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    // The arbiter names the lone copy: nothing else may go live.
    let arbiter = std::fs::read_to_string(rig.dir.path().join("arbiter")).unwrap_or_default();
    assert!(arbiter.contains("standalone"), "the arbiter: {arbiter:?}");
    let standby = rig.standby(b, &spare, &[]);
    rig.write_until(&mut w, &rig.path("p.sock"), Duration::from_secs(120), "protected", |st| {
        st["role"] == "primary" && st["peer"] == "up"
    });
    assert!(rig.log("primary.log").contains("re-protected onto"), "{}", rig.logs());
    // The standby runs the new pair's failover (the lone claim is gone).
    rig.write_until(&mut w, &rig.path("sb.sock"), Duration::from_secs(60), "the standby's failover", |st| {
        st["role"] == "secondary" && st["arbiter_generation"].is_u64()
    });
    w.writes(30);
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    w.writes(30);
    w.check_all();
    let st = common::status_json(&rig.path("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", rig.logs());
    drop(standby);
}

/// A copy that cannot hand a fault over (it runs alone) and restarts its
/// guest (`--on-fault restart`) protects the restarted guest onto a spare
/// as soon as one answers: the restart is a primary session alone, not a
/// bare VM. Then a failover to the spare loses nothing written since.
#[test]
fn kvm_netns_a_guest_restarted_by_on_fault_protects_itself_onto_a_standby() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let rig = Rig::new("ro");
    let (a, b) = (rig.lab.host_a(), rig.lab.host_b());
    let spare = rig.link(b, 7001);
    let fail = rig.dir.path().join("fail");
    let probe = format!("exec:test ! -e {}", fail.display());
    let mut p = args(&["primary"]);
    p.extend(rig.kvstore(32).into_iter().chain(rig.common()));
    p.extend(args(&["--tap", a.tap(), "--peer", &rig.link(b, 7000), "--unprotected-start", "--standby", &spare]));
    p.extend(args(&["--on-fault", "restart", "--probe", &probe, "--probe-timeout-ms", "2000"]));
    p.extend(args(&["--control", &rig.path("p.sock")]));
    let mut primary = rig.spawn(a, "primary.log", &p);
    let mut w = Writer::new(&rig.lab);
    w.writes(20);
    // The service fails its probe while the copy runs alone: restarted.
    std::fs::write(&fail, b"").unwrap();
    let restarted = lab::wait_for(Duration::from_secs(60), || rig.log("primary.log").contains("--on-fault restart"));
    assert!(restarted, "no restart\n{}", rig.logs());
    std::fs::remove_file(&fail).unwrap();
    drop(w);
    // The restarted guest serves (a fresh boot: a new connection), and
    // protects itself onto the standby that comes up.
    let mut w = Writer::new(&rig.lab);
    w.writes(20);
    let standby = rig.standby(b, &spare, &[]);
    let st =
        rig.write_until(&mut w, &rig.path("p.sock"), Duration::from_secs(120), "protected after the restart", |st| {
            st["role"] == "primary" && st["peer"] == "up"
        });
    // The fault's events: the session's (left to --on-fault) and the restart.
    assert!(st["faults"].as_u64().is_some_and(|n| n >= 1), "{st}");
    assert_eq!(st["last_fault"]["action"], "restart", "{st}");
    rig.write_until(&mut w, &rig.path("sb.sock"), Duration::from_secs(60), "the standby's failover", |st| {
        st["role"] == "secondary" && st["arbiter_generation"].is_u64()
    });
    w.writes(20);
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    w.writes(20);
    w.check_all();
    assert_eq!(common::status_json(&rig.path("sb.sock"))["role"], "standalone");
    drop(standby);
}
