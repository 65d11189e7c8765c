//! The OCF resource agent `cluster/pacemaker/ftvm`, run for real on one
//! host with KVM: `ocf-tester` (Debian's resource-agents) passes on it, and
//! its monitor reports what ftvm's status says (the cluster test,
//! tests/cluster_kvm.rs, drives it from a real Pacemaker).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ftvm_lab as lab;

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/pacemaker/ftvm")
}

/// ftvm flags of every copy here. A noisy host must not fail a live peer
/// over: these tests check what the agent does with ftvm's decisions, not
/// how fast ftvm sees a failure (a killed VMM closes its channel at once).
/// With the failover tests' 300 ms silence limit, a re-protected pair's new
/// heartbeats were seen to go silent for 301 ms under a load average of 8 on
/// a 2-core machine, a vCPU thread without CPU for over a second fired the
/// 1 s hang watchdog, and a secondary's replay fell 3 s behind (the default
/// --max-lag-ms); hence 1 s, 10 s and 30 s.
const QUIET_ARGS: &str = "--dead-after 100 --hang-ms 10000 --max-lag-ms 30000";

/// A single-node setting for the agent: a `spin` guest, a key, an arbiter,
/// two loopback addresses (no peer ever listens on the second), and the
/// agent's dirs, all in `dir`. As OCF_RESKEY_ variables.
fn params(dir: &Path, port: u16) -> Vec<(String, String)> {
    node_params(dir, dir, port, "n1", "guest = \"spin\"")
}

/// As [`params`] for node `node` of a pair sharing `shared` (key, config,
/// arbiter), with its own directories in `dir`.
fn node_params(shared: &Path, dir: &Path, port: u16, node: &str, guest: &str) -> Vec<(String, String)> {
    let config = shared.join("vm.toml");
    if !config.exists() {
        let key = common::key_file(shared, "k");
        let serial = shared.join("serial.log");
        let text = format!("{guest}\nmemory-mib = 16\nkey-file = \"{key}\"\nserial = \"{}\"\n", serial.display());
        std::fs::write(&config, text).unwrap();
    }
    std::fs::create_dir_all(dir.join("rsctmp")).unwrap();
    let d = |n: &str| dir.join(n).display().to_string();
    vec![
        ("name".into(), format!("ocf{port}")),
        ("config".into(), config.display().to_string()),
        ("arbiter".into(), format!("file:{}", shared.join("arbiter").display())),
        ("addresses".into(), format!("n1=127.0.0.1:{port} n2=127.0.0.1:{}", port + 1)),
        ("binary".into(), env!("CARGO_BIN_EXE_ftvm").into()),
        ("CRM_meta_on_node".into(), node.into()),
        ("pair_wait".into(), "1".into()),
        ("log_dir".into(), d("log")),
        ("control_dir".into(), d("run")),
        ("args".into(), QUIET_ARGS.into()),
    ]
}

/// The agent's `action` with `params` (as Pacemaker calls it); its exit status.
fn action(dir: &Path, params: &[(String, String)], action: &str, extra: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(agent());
    cmd.arg(action).env("OCF_ROOT", "/usr/lib/ocf").env("OCF_RESOURCE_INSTANCE", "ftvm-test");
    cmd.env("HA_RSCTMP", dir.join("rsctmp"));
    for (k, v) in params {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    for (k, v) in extra {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    let out: Output = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn kvm_ocf_tester_passes_on_the_agent() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    lab::require_tool("ocf-tester");
    lab::require_tool("xmllint");
    let dir = tempfile::tempdir().unwrap();
    let params = params(dir.path(), 17_101);
    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "ftvm-test"]).env("HA_RSCTMP", dir.path().join("rsctmp"));
    for (k, v) in params {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd.arg(agent());
    let out = lab::spawn(cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()))
        .wait_with_output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("passed all tests"), "ocf-tester:\n{text}");
    assert!(!text.contains("rc="), "ocf-tester reported a wrong exit code:\n{text}");
}

#[test]
fn kvm_agent_monitor_follows_ftvm_status() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = params(dir.path(), 17_111);
    let probe = [("CRM_meta_interval", "0")];
    let unpromoted = [("CRM_meta_interval", "11000"), ("CRM_meta_role", "Unpromoted")];
    assert_eq!(action(dir.path(), &p, "monitor", &probe).0, 7, "nothing started");
    let (rc, text) = action(dir.path(), &p, "validate-all", &[]);
    assert_eq!(rc, 0, "{text}");
    // A node that `addresses` does not name is a configuration error (6).
    let (rc, _) = action(dir.path(), &p, "validate-all", &[("CRM_meta_on_node", "n9")]);
    assert_eq!(rc, 6);
    let sock = dir.path().join("run").join("ocf17111.sock");
    let arbiter = dir.path().join("arbiter");
    let owned = |generation: u32| {
        let text = format!("ftvm-arbiter v1\ngeneration {generation}\nowner elsewhere-secondary-0123456789abcdef\n");
        std::fs::write(&arbiter, text).unwrap();
    };
    let release = || {
        let out = common::run(&["arbiter", "--arbiter", &format!("file:{}", arbiter.display()), "--release"]);
        assert!(out.status.success(), "{out:?}");
    };
    // A copy runs alone elsewhere (the arbiter names it): start gives a
    // standby, unpromoted and not protecting (190) while nothing sends it
    // the guest. Once the arbiter names nobody (an operator released a copy
    // that died alone) nothing ever will: a failure (1), which Pacemaker
    // recovers by stop and start, and the start is a secondary.
    owned(1);
    assert_eq!(action(dir.path(), &p, "start", &[]).0, 0);
    let st = common::status_json(sock.to_str().unwrap());
    assert!(st["state"].as_str().is_some_and(|s| s.starts_with("standby: waiting")), "{st}");
    assert_eq!(action(dir.path(), &p, "monitor", &unpromoted).0, 190);
    release();
    let (rc, text) = action(dir.path(), &p, "monitor", &unpromoted);
    assert_eq!(rc, 1, "{text}");
    assert_eq!(action(dir.path(), &p, "stop", &[]).0, 0);
    assert_eq!(action(dir.path(), &p, "start", &[]).0, 0);
    assert_eq!(common::status_json(sock.to_str().unwrap())["role"], "secondary");
    assert_eq!(action(dir.path(), &p, "monitor", &unpromoted).0, 0, "a waiting secondary is unpromoted");
    // A copy elsewhere went live (the arbiter names it) before a primary
    // came: this secondary will never pair, a failure (1) that Pacemaker's
    // restart turns into a standby; fine again once the arbiter names nobody.
    owned(3);
    let (rc, text) = action(dir.path(), &p, "monitor", &unpromoted);
    assert_eq!(rc, 1, "{text}");
    release();
    assert_eq!(action(dir.path(), &p, "monitor", &unpromoted).0, 0);
    // No peer pairs within pair_wait: promote runs the guest unprotected,
    // which the promoted monitor reports as degraded (191).
    let (rc, text) = action(dir.path(), &p, "promote", &[]);
    assert_eq!(rc, 0, "{text}");
    let st = common::status_json(sock.to_str().unwrap());
    assert_eq!(st["role"], "standalone", "{st}");
    assert_eq!(action(dir.path(), &p, "monitor", &[("CRM_meta_interval", "10000")]).0, 191);
    assert_eq!(action(dir.path(), &p, "monitor", &probe).0, 191, "a probe says promoted (degraded)");
    // The live copy holds the arbiter: a second start elsewhere would be a
    // standby (which this copy, started unprotected, does not re-protect
    // onto), and ftvm refuses a second primary.
    let arb = common::run(&["arbiter", "--arbiter", &format!("file:{}", dir.path().join("arbiter").display())]);
    assert!(String::from_utf8_lossy(&arb.stdout).contains("standalone"), "{arb:?}");
    // The live copy dies: a failed promoted instance (9).
    let pid: i32 =
        std::fs::read_to_string(dir.path().join("rsctmp").join("ftvm-ocf17111.pid")).unwrap().trim().parse().unwrap();
    common::signal("KILL", pid as u32);
    assert!(lab::wait_for(std::time::Duration::from_secs(10), || !Path::new(&format!("/proc/{pid}")).exists()));
    let (rc, text) = action(dir.path(), &p, "monitor", &[("CRM_meta_interval", "10000")]);
    assert_eq!(rc, 9, "{text}");
    // Pacemaker's recovery: demote and stop succeed, then all is stopped (7).
    assert_eq!(action(dir.path(), &p, "demote", &[]).0, 0);
    assert_eq!(action(dir.path(), &p, "stop", &[]).0, 0);
    assert_eq!(action(dir.path(), &p, "monitor", &probe).0, 7);
    assert_eq!(action(dir.path(), &p, "frobnicate", &[]).0, 3, "unknown action: unimplemented");
}

/// `ftvm status --json` on `sock`, or null when nothing answers.
fn status(sock: &Path) -> serde_json::Value {
    let out = common::run(&["status", "--control", sock.to_str().unwrap(), "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Stops the agents' instances however the test ends.
struct Stopped(Vec<(PathBuf, Vec<(String, String)>)>);

impl Drop for Stopped {
    fn drop(&mut self) {
        for (dir, params) in &self.0 {
            let _ = action(dir, params, "stop", &[]);
        }
    }
}

/// Two agents on one host stand for two nodes (each its own state and
/// control directories): promote forms a pair, demote is a planned
/// switchover (`ftvm switchover`): the other copy goes live, the demoted one
/// becomes its secondary in place, the pair protected throughout; the other
/// side's promote confirms it. What `crm_resource --move` does.
#[test]
fn kvm_agent_promote_pairs_and_demote_switches_over() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    let (d1, d2) = (shared.path().join("n1"), shared.path().join("n2"));
    // crunch, endless: exits (clock readings) all the time, so the
    // secondary replays in step.
    let guest = "guest = \"crunch\"\nparam = [\"rounds=1000000000\"]";
    let p1 = node_params(shared.path(), &d1, 17_121, "n1", guest);
    let p2 = node_params(shared.path(), &d2, 17_121, "n2", guest);
    let _cleanup = Stopped(vec![(d1.clone(), p1.clone()), (d2.clone(), p2.clone())]);
    let promoted_mon = [("CRM_meta_interval", "10000"), ("CRM_meta_role", "Promoted")];
    let unpromoted_mon = [("CRM_meta_interval", "11000"), ("CRM_meta_role", "Unpromoted")];
    let probe = [("CRM_meta_interval", "0")];
    assert_eq!(action(&d1, &p1, "start", &[]).0, 0);
    assert_eq!(action(&d2, &p2, "start", &[]).0, 0);
    let (rc, text) = action(&d1, &p1, "promote", &[]);
    assert_eq!(rc, 0, "{text}");
    let s1 = common::status_json(d1.join("run/ocf17121.sock").to_str().unwrap());
    assert_eq!((s1["role"].as_str(), s1["peer"].as_str()), (Some("primary"), Some("up")), "{s1}");
    assert_eq!(action(&d1, &p1, "monitor", &promoted_mon).0, 8, "a protected primary");
    assert_eq!(action(&d2, &p2, "monitor", &unpromoted_mon).0, 0, "its secondary");
    // Promote where a live primary runs elsewhere and nothing failed: refused
    // after takeover_wait, and nothing changes.
    let (rc, text) = action(&d2, &p2, "promote", &[("takeover_wait", "1")]);
    assert_eq!(rc, 1, "{text}");
    assert_eq!(common::status_json(d2.join("run/ocf17121.sock").to_str().unwrap())["role"], "secondary");
    // Demote n1: a planned switchover; it returns once n2's copy is live
    // and n1's is its secondary, with no failure on either side.
    let (rc, text) = action(&d1, &p1, "demote", &[]);
    assert_eq!(rc, 0, "{text}");
    let sock1 = d1.join("run/ocf17121.sock");
    let sock2 = d2.join("run/ocf17121.sock");
    let log = |d: &Path| std::fs::read_to_string(d.join("log/ocf17121.log")).unwrap_or_default();
    // Demote returned once n2's claim won the arbiter; its go-live (at its
    // first input past the switch) follows at once.
    let mut st2 = serde_json::Value::Null;
    let live = lab::wait_for(Duration::from_secs(10), || {
        st2 = status(&sock2);
        st2["role"] == "primary"
    });
    assert!(live, "n2's copy is live: {st2}\n--- n1\n{}--- n2\n{}", log(&d1), log(&d2));
    assert!(st2["last_failure"].is_null(), "a switchover is no failure: {st2}");
    assert_eq!(st2["switchovers"], 1, "{st2}");
    let mut st1 = status(&sock1);
    assert_eq!(st1["role"], "secondary", "n1's copy is n2's secondary: {st1}\n--- n1\n{}", log(&d1));
    assert_eq!(st1["switchovers"], 1, "{st1}");
    assert!(log(&d1).contains("switched over at guest exit"), "{}", log(&d1));
    // Until Pacemaker promotes it, n2's unpromoted monitor says unpromoted,
    // degraded (190: a promoted answer would be a failure to recover from);
    // a probe tells the truth: promoted (8, protected, or 191 while the
    // pair is joining).
    assert_eq!(action(&d2, &p2, "monitor", &unpromoted_mon).0, 190);
    let (rc, _) = action(&d2, &p2, "monitor", &probe);
    assert!(rc == 191 || rc == 8, "probe of the live copy: {rc}");
    let (rc, text) = action(&d2, &p2, "promote", &[]);
    assert_eq!(rc, 0, "promote confirms: {text}");
    // n1 is never promoted while n2's copy is live: promote waits for a
    // failover that does not come.
    let (rc, text) = action(&d1, &p1, "promote", &[("takeover_wait", "1")]);
    assert_eq!(rc, 1, "{text}");
    // The pair is protected the other way round: n2 promoted and protected
    // (8), n1 an in-sync secondary (0), with no transfer and no failure.
    let mut rcs = (0, 0);
    let protected = lab::wait_for(Duration::from_secs(60), || {
        rcs = (action(&d2, &p2, "monitor", &promoted_mon).0, action(&d1, &p1, "monitor", &unpromoted_mon).0);
        rcs == (8, 0)
    });
    assert!(protected, "monitors {rcs:?}\n--- n1\n{}--- n2\n{}", log(&d1), log(&d2));
    st1 = status(&sock1);
    let st2 = status(&sock2);
    assert_eq!((st2["role"].as_str(), st2["peer"].as_str()), (Some("primary"), Some("up")), "{st2}");
    assert!(st2["last_failure"].is_null(), "{st2}");
    assert_eq!((st1["role"].as_str(), st1["peer"].as_str()), (Some("secondary"), Some("up")), "{st1}");
    assert_eq!(st1["divergences"], 0, "{st1}");
    assert_eq!(action(&d1, &p1, "monitor", &probe).0, 0, "a probe of n1: unpromoted");
    // And back: demote n2, promote n1.
    let (rc, text) = action(&d2, &p2, "demote", &[]);
    assert_eq!(rc, 0, "{text}");
    let (rc, text) = action(&d1, &p1, "promote", &[]);
    assert_eq!(rc, 0, "{text}\n--- n1\n{}--- n2\n{}", log(&d1), log(&d2));
    let back = lab::wait_for(Duration::from_secs(60), || {
        rcs = (action(&d1, &p1, "monitor", &promoted_mon).0, action(&d2, &p2, "monitor", &unpromoted_mon).0);
        rcs == (8, 0)
    });
    assert!(back, "after the switch back: monitors {rcs:?}\n--- n1\n{}--- n2\n{}", log(&d1), log(&d2));
    assert_eq!(status(&sock1)["switchovers"], 2);
    for (d, p) in [(&d1, &p1), (&d2, &p2)] {
        assert_eq!(action(d, p, "stop", &[]).0, 0);
        assert_eq!(action(d, p, "monitor", &probe).0, 7);
    }
}

/// The primary's VMM dies and ftvm fails over to the other node's copy;
/// after Pacemaker's recovery of the failed instance (demote, stop, start)
/// the start there is a standby (not a secondary waiting for a primary that
/// will never come): the live copy re-protects itself onto it by a live
/// transfer, and it is an in-sync secondary (monitor 0, score 100), the
/// live copy a protected primary (8).
#[test]
fn kvm_agent_start_beside_a_live_copy_gives_a_standby_that_becomes_an_in_sync_secondary() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let shared = tempfile::tempdir().unwrap();
    let (d1, d2) = (shared.path().join("n1"), shared.path().join("n2"));
    let guest = "guest = \"crunch\"\nparam = [\"rounds=1000000000\"]";
    let p1 = node_params(shared.path(), &d1, 17_131, "n1", guest);
    let p2 = node_params(shared.path(), &d2, 17_131, "n2", guest);
    let _cleanup = Stopped(vec![(d1.clone(), p1.clone()), (d2.clone(), p2.clone())]);
    let promoted_mon = [("CRM_meta_interval", "10000"), ("CRM_meta_role", "Promoted")];
    let unpromoted_mon = [("CRM_meta_interval", "11000"), ("CRM_meta_role", "Unpromoted")];
    let probe = [("CRM_meta_interval", "0")];
    let (sock1, sock2) = (d1.join("run/ocf17131.sock"), d2.join("run/ocf17131.sock"));
    let status = |sock: &Path| common::status_json(sock.to_str().unwrap());
    let logs = || {
        let log = |d: &Path| std::fs::read_to_string(d.join("log/ocf17131.log")).unwrap_or_default();
        format!("--- n1\n{}--- n2\n{}", log(&d1), log(&d2))
    };
    assert_eq!(action(&d1, &p1, "start", &[]).0, 0);
    assert_eq!(action(&d2, &p2, "start", &[]).0, 0);
    let (rc, text) = action(&d1, &p1, "promote", &[]);
    assert_eq!(rc, 0, "{text}");
    assert_eq!(action(&d2, &p2, "monitor", &unpromoted_mon).0, 0, "its secondary");
    // n1's VMM dies: n2's secondary wins the arbiter and goes live; it keeps
    // trying to re-protect itself onto n1's address (its --standby).
    let pid: u32 = std::fs::read_to_string(d1.join("rsctmp/ftvm-ocf17131.pid")).unwrap().trim().parse().unwrap();
    common::signal("KILL", pid);
    let live = lab::wait_for(Duration::from_secs(30), || status(&sock2)["role"] == "standalone");
    let s2 = status(&sock2);
    assert!(live, "{s2}");
    assert_eq!(s2["last_failure"]["kind"], "primary lost", "{s2}");
    assert_eq!(action(&d2, &p2, "promote", &[]).0, 0, "promote confirms");
    assert_eq!(action(&d2, &p2, "monitor", &promoted_mon).0, 191, "live, unprotected");
    // Pacemaker's recovery of n1: its promoted monitor failed (9), demote,
    // stop, start.
    let (rc, text) = action(&d1, &p1, "monitor", &promoted_mon);
    assert_eq!(rc, 9, "{text}");
    assert_eq!(action(&d1, &p1, "demote", &[]).0, 0);
    assert_eq!(action(&d1, &p1, "stop", &[]).0, 0);
    let (rc, text) = action(&d1, &p1, "start", &[]);
    assert_eq!(rc, 0, "{text}");
    let log = std::fs::read_to_string(d1.join("log/ocf17131.log")).unwrap();
    let launched = log.lines().rev().find(|l| l.starts_with("--- ")).unwrap_or_default().to_string();
    assert!(launched.contains("secondary --listen") && launched.contains("--standby 127.0.0.1:17132"), "{launched}");
    let standby_config = std::fs::read_to_string(d1.join("rsctmp/ftvm-ocf17131.standby.toml")).unwrap();
    assert!(standby_config.lines().all(|l| !l.starts_with("guest")), "{standby_config}");
    // 190 while it waits for or takes the state, then 0.
    let mut seen = Vec::new();
    let synced = lab::wait_for(Duration::from_secs(60), || {
        let rc = action(&d1, &p1, "monitor", &unpromoted_mon).0;
        if seen.last() != Some(&rc) {
            seen.push(rc);
        }
        rc == 0
    });
    assert!(synced, "n1's monitor answered {seen:?}\n{}", logs());
    assert!(seen.iter().all(|rc| *rc == 190 || *rc == 0), "n1's monitor answered {seen:?}");
    let s1 = status(&sock1);
    assert_eq!((s1["role"].as_str(), s1["peer"].as_str()), (Some("secondary"), Some("up")), "{s1}");
    assert!(s1["arbiter_generation"].is_u64(), "{s1}");
    assert_eq!(action(&d1, &p1, "monitor", &probe).0, 0, "a probe of n1: unpromoted");
    let s2 = status(&sock2);
    assert_eq!((s2["role"].as_str(), s2["peer"].as_str()), (Some("primary"), Some("up")), "{s2}");
    assert!(s2["last_failure"]["repair_ms"].is_f64(), "{s2}");
    assert_eq!(action(&d2, &p2, "monitor", &promoted_mon).0, 8, "protected again");
    // The arbiter is free again (the repair released it): a failure of
    // either copy goes through a new claim.
    let arb = common::run(&["arbiter", "--arbiter", &format!("file:{}", shared.path().join("arbiter").display())]);
    assert!(String::from_utf8_lossy(&arb.stdout).contains("owner (none)"), "{arb:?}");
    eprintln!(
        "agent: n1's standby -> in-sync secondary, monitor {seen:?}; repair_ms {}",
        s2["last_failure"]["repair_ms"]
    );
    for (d, p) in [(&d1, &p1), (&d2, &p2)] {
        assert_eq!(action(d, p, "stop", &[]).0, 0);
    }
}
