//! Planned switchover (`ftvm switchover`) on real KVM in a lab of
//! namespaces: the roles of a protected pair swap while a client writes on
//! one TCP connection; the client sees no error, nothing is lost, the pair
//! is protected again (the old primary is the new secondary), and the
//! switch back works the same way. Refusals change nothing.

mod common;

use common::rig::{args, try_status, Rig, Writer};

use std::process::Stdio;
use std::time::{Duration, Instant};

use ftvm_lab as lab;

/// The pair of the tests: host A runs the primary (`--switch-listen` on
/// A:7001, `--standby` B:7000), host B the secondary (`--listen` B:7000,
/// `--standby` A:7001): each side can re-protect onto the other. Logs
/// `a.log` and `b.log`, control sockets `a.sock` and `b.sock`.
struct Pair {
    rig: Rig,
    a: common::Proc,
    b: common::Proc,
}

impl Pair {
    fn start(name: &str, switch_listen: bool) -> Pair {
        let rig = Rig::new(name);
        let (ha, hb) = (rig.lab.host_a(), rig.lab.host_b());
        let listen_b = rig.link(hb, 7000);
        let listen_a = rig.link(ha, 7001);
        let mut sec = args(&["secondary"]);
        sec.extend(rig.kvstore(32).into_iter().chain(rig.common()));
        sec.extend(args(&["--tap", hb.tap(), "--listen", &listen_b, "--standby", &listen_a]));
        sec.extend(args(&["--control", &rig.path("b.sock")]));
        let b = rig.spawn(hb, "b.log", &sec);
        let mut pri = args(&["primary"]);
        pri.extend(rig.kvstore(32).into_iter().chain(rig.common()));
        pri.extend(args(&["--tap", ha.tap(), "--peer", &listen_b, "--standby", &listen_b]));
        pri.extend(args(&["--control", &rig.path("a.sock")]));
        if switch_listen {
            pri.extend(args(&["--switch-listen", &listen_a]));
        }
        let a = rig.spawn(ha, "a.log", &pri);
        Pair { rig, a, b }
    }

    fn sock(&self, n: &str) -> String {
        self.rig.path(&format!("{n}.sock"))
    }

    fn logs(&self) -> String {
        self.rig.logs()
    }

    /// `ftvm switchover` on `from`'s control socket while `w` writes on:
    /// its JSON answer (it must succeed).
    fn switchover_under_load(&self, from: &str, w: &mut Writer) -> serde_json::Value {
        let mut child = common::ftvm()
            .args(["switchover", "--control", &self.sock(from), "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        while child.try_wait().unwrap().is_none() {
            w.write();
            assert!(Instant::now() < deadline, "ftvm switchover did not answer in 90 s\n{}", self.logs());
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ftvm switchover failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Write on until `primary` is the protected primary again (its new
    /// secondary, `secondary`, acknowledged the whole log and runs its
    /// failover): the statuses of both.
    fn wait_protected(&self, primary: &str, secondary: &str, w: &mut Writer) -> (serde_json::Value, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            w.write();
            if let (Some(p), Some(s)) = (try_status(&self.sock(primary)), try_status(&self.sock(secondary))) {
                let in_sync = p["role"] == "primary"
                    && p["peer"] == "up"
                    && s["role"] == "secondary"
                    && s["state"] == "replaying"
                    && s["heartbeats"].is_object();
                if in_sync {
                    return (p, s);
                }
                assert!(Instant::now() < deadline, "not protected again within 120 s: {p}\n{s}\n{}", self.logs());
            }
            assert!(Instant::now() < deadline, "not protected again within 120 s\n{}", self.logs());
        }
    }
}

/// Write on until the new secondary's replay passed a digest point past the
/// switch's exit (every 1000 exits): its memory, rebuilt in place from the
/// stopped guest's, matched the new primary's there (a mismatch stops
/// replay), so no transfer was needed.
fn wait_digest_past_switch(pair: &Pair, secondary: &str, w: &mut Writer) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        w.write();
        let st = common::status_json(&pair.sock(secondary));
        let switched_at = st["last_switchover"]["exit"].as_u64().unwrap();
        assert_eq!(st["divergences"], 0, "{st}\n{}", pair.logs());
        assert_eq!(st["role"], "secondary", "{st}\n{}", pair.logs());
        if st["exit_index"].as_u64().unwrap() > (switched_at / 1000 + 2) * 1000 {
            return;
        }
        assert!(Instant::now() < deadline, "the new secondary did not replay on: {st}\n{}", pair.logs());
    }
}

/// The pause the guest saw: from its stop on the old primary to its
/// go-live on the new one (both hosts share this machine's clock).
fn pause_ms(old: &serde_json::Value, new: &serde_json::Value) -> f64 {
    let stopped = old["last_switchover"]["at_unix_ms"].as_f64().unwrap();
    let live = new["last_switchover"]["at_unix_ms"].as_f64().unwrap();
    live - stopped
}

#[test]
fn kvm_netns_switchover_under_load_swaps_roles_loses_nothing_and_switches_back() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let mut pair = Pair::start("sw", true);
    let mut w = Writer::new(&pair.rig.lab);
    w.writes(50);
    let st = common::status_json(&pair.sock("a"));
    assert_eq!(st["role"], "primary", "{st}");

    // A → B, under load.
    w.longest = Duration::ZERO;
    let answer = pair.switchover_under_load("a", &mut w);
    assert_eq!(answer["ok"], true, "{answer}");
    let gap_1 = w.longest;
    w.writes(50);
    let (b, a) = pair.wait_protected("b", "a", &mut w);
    assert_eq!(b["last_switchover"]["became"], "primary", "{b}");
    assert_eq!(a["last_switchover"]["became"], "secondary", "{a}");
    assert_eq!(b["divergences"], 0, "{b}");
    let pause_1 = pause_ms(&a, &b);
    wait_digest_past_switch(&pair, "a", &mut w);
    let b_log = pair.rig.log("b.log");
    assert!(b_log.contains("(no transfer: it holds the state at the switchover): protected"), "{}", pair.logs());
    w.check_all();

    // B → A: the switch back.
    w.longest = Duration::ZERO;
    let answer = pair.switchover_under_load("b", &mut w);
    assert_eq!(answer["ok"], true, "{answer}");
    let gap_2 = w.longest;
    let (a, b) = pair.wait_protected("a", "b", &mut w);
    assert_eq!(a["last_switchover"]["became"], "primary", "{a}");
    assert_eq!(b["last_switchover"]["became"], "secondary", "{b}");
    // Each process went on with its own status board through both roles.
    assert_eq!((a["switchovers"].as_u64(), b["switchovers"].as_u64()), (Some(2), Some(2)), "{a}\n{b}");
    assert_eq!(a["name"], "kvstore", "{a}");
    let pause_2 = pause_ms(&b, &a);
    wait_digest_past_switch(&pair, "b", &mut w);
    let a_log = pair.rig.log("a.log");
    assert!(a_log.contains("(no transfer: it holds the state at the switchover): protected"), "{}", pair.logs());
    w.check_all();

    // The pair is really protected: a forced failover to the new secondary
    // (B) loses nothing.
    pair.a.0.kill().unwrap();
    let _ = pair.a.0.wait();
    w.writes(50);
    w.check_all();
    let st = common::status_json(&pair.sock("b"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", pair.logs());
    assert_eq!(st["last_failure"]["kind"], "primary lost", "{st}");
    eprintln!(
        "switchover A→B: pause {pause_1:.2} ms (guest stopped → live), client gap {:.2} ms; B→A: pause {pause_2:.2} ms, gap {:.2} ms; {} writes, none lost",
        gap_1.as_secs_f64() * 1e3,
        gap_2.as_secs_f64() * 1e3,
        w.acked
    );
}

#[test]
fn kvm_netns_switchover_refusals_change_nothing() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let mut pair = Pair::start("sr", true);
    let mut w = Writer::new(&pair.rig.lab);
    w.writes(20);
    let refused = |sock: &str, want: &str| {
        let out = common::ftvm().args(["switchover", "--control", sock]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(err.lines().count(), 1, "one clear error: {err}");
    };
    // On the secondary.
    refused(&pair.sock("b"), "this copy is the secondary");
    w.writes(20);
    assert_eq!(common::status_json(&pair.sock("a"))["role"], "primary");
    assert_eq!(common::status_json(&pair.sock("b"))["role"], "secondary");

    // On a primary that runs unprotected (its secondary lost).
    pair.b.0.kill().unwrap();
    let _ = pair.b.0.wait();
    w.writes(20);
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::status_json(&pair.sock("a"))["role"] != "standalone" {
        w.write();
        assert!(Instant::now() < deadline, "the primary never ran alone\n{}", pair.logs());
    }
    refused(&pair.sock("a"), "unprotected");
    w.writes(20);
    let st = common::status_json(&pair.sock("a"));
    assert_eq!(st["role"], "standalone", "{st}");
    assert_eq!(st["switchovers"], 0, "{st}");
    w.check_all();
    drop(pair);

    // A primary without --switch-listen could not become the secondary.
    let pair = Pair::start("sn", false);
    let mut w = Writer::new(&pair.rig.lab);
    w.writes(20);
    refused(&pair.sock("a"), "--switch-listen");
    w.writes(20);
    assert_eq!(common::status_json(&pair.sock("a"))["role"], "primary");
    w.check_all();
}
