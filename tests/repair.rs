//! Repair on real KVM in a lab of namespaces: a primary that lost its
//! secondary re-protects itself onto a standby (`ftvm secondary` with no
//! guest settings) by a live transfer while a client keeps writing; the
//! standby then takes over when the primary is killed, the client's
//! connection and every acknowledged write intact.

mod common;

use common::{connect_kvstore as connect, reply, resp, Proc};

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ftvm_lab as lab;
use lab::Lab;

/// Writes on one kvstore connection: an INCR of `counter` (each reply must
/// be the count acknowledged so far plus one) and a SET of `k<i>`.
struct Writer {
    s: std::io::BufReader<std::net::TcpStream>,
    acked: i64,
}

impl Writer {
    fn write(&mut self) {
        let i = self.acked + 1;
        self.s.get_mut().write_all(&resp(&["INCR", "counter"])).unwrap();
        assert_eq!(reply(&mut self.s), format!(":{i}\r\n"), "INCR after {} acknowledged", self.acked);
        self.s.get_mut().write_all(&resp(&["SET", &format!("k{i}"), &i.to_string()])).unwrap();
        assert_eq!(reply(&mut self.s), "+OK\r\n");
        self.acked = i;
    }

    /// Every acknowledged write is there.
    fn check_all(&mut self) {
        self.s.get_mut().write_all(&resp(&["GET", "counter"])).unwrap();
        let n = self.acked.to_string();
        assert_eq!(reply(&mut self.s), format!("${}\r\n{n}\r\n", n.len()));
        for i in 1..=self.acked {
            self.s.get_mut().write_all(&resp(&["GET", &format!("k{i}")])).unwrap();
            assert_eq!(reply(&mut self.s), format!("${}\r\n{i}\r\n", i.to_string().len()), "k{i}");
        }
    }
}

fn log(dir: &std::path::Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).unwrap()
}

fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for n in ["primary.log", "secondary.log", "standby.log"] {
        out += &format!("--- {n}\n{}\n", std::fs::read_to_string(dir.join(n)).unwrap_or_default());
    }
    out
}

fn spawn(cmd: &mut Command, dir: &std::path::Path, name: &str) -> Proc {
    Proc(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log(dir, name)).spawn().unwrap())
}

#[test]
fn kvm_netns_a_lone_primary_reprotects_onto_a_standby_under_load_and_a_failover_to_it_loses_nothing() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("rp");
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    let key = common::key_file(dir.path(), "k");
    eprintln!("logs in {}", dir.path().display());
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let spare = format!("{}:7001", lab.host_b().link_ip());
    let cidr = lab.guest_cidr();
    let guest = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr];
    // No health deadline: this test is about repair, and on a loaded
    // two-core machine a 30 ms stall of the vCPU thread is a fault.
    let common_args = [
        "--key-file",
        &key,
        "--arbiter",
        &arbiter,
        "--dead-after",
        common::TEST_DEAD_AFTER,
        "--health-deadline-ms",
        "0",
    ];

    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(guest).args(common_args).args(["--tap", lab.host_b().tap()]);
    sec.args(["--listen", &listen, "--control", &d("s.sock")]);
    let mut secondary = spawn(&mut sec, dir.path(), "secondary.log");
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(common_args).args(["--tap", lab.host_a().tap()]);
    pri.args(["--peer", &listen, "--standby", &spare, "--control", &d("p.sock")]);
    let mut primary = spawn(&mut pri, dir.path(), "primary.log");

    let mut w = Writer { s: connect(&lab), acked: 0 };
    for _ in 0..50 {
        w.write();
    }
    // The secondary's VMM dies: the primary carries on alone.
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    for _ in 0..50 {
        w.write();
    }
    let st = common::status_json(&d("p.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));

    // A standby comes up on the failed secondary's host, with no guest
    // settings: the primary re-protects itself onto it while the client
    // writes on.
    let mut sb = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sb.arg("secondary").args(common_args).args(["--tap", lab.host_b().tap()]);
    sb.args(["--listen", &spare, "--control", &d("sb.sock")]);
    let standby = spawn(&mut sb, dir.path(), "standby.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    let repair_ms = loop {
        w.write();
        let st = common::status_json(&d("p.sock"));
        if st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64() {
            assert_eq!(st["peer"], "up", "{st}");
            break st["last_failure"]["repair_ms"].as_f64().unwrap();
        }
        assert!(Instant::now() < deadline, "no repair within 120 s: {st}\n{}", logs(dir.path()));
    };
    // The standby holds the whole log once its failover runs (the primary
    // freed the arbiter for the new pair).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.path().join("standby.log")).unwrap_or_default().contains("protected") {
        w.write();
        assert!(Instant::now() < deadline, "the standby never started failover\n{}", logs(dir.path()));
    }
    let st = common::status_json(&d("sb.sock"));
    assert_eq!(st["role"], "secondary", "{st}");
    assert_eq!(st["name"], "kvstore", "the name travels with the state: {st}");
    for _ in 0..50 {
        w.write();
    }
    let before = w.acked;

    // Now the primary dies: the standby, which never had the image, goes live.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    for _ in 0..50 {
        w.write();
    }
    w.check_all();
    let st = common::status_json(&d("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));
    assert_eq!(st["last_failure"]["kind"], "primary lost", "{st}");
    eprintln!("repair: {repair_ms} ms (failure → new secondary in sync); {before} writes before the second failover, {} in all", w.acked);
    drop(standby);
}

#[test]
fn kvm_netns_a_standby_killed_mid_transfer_leaves_the_primary_serving_and_a_retry_succeeds() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("rk");
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    eprintln!("logs in {}", dir.path().display());
    let key = common::key_file(dir.path(), "k");
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let spare = format!("{}:7001", lab.host_b().link_ip());
    let cidr = lab.guest_cidr();
    // A guest with more memory written makes a longer transfer to cut.
    let guest = ["--guest", "kvstore", "--memory-mib", "64", "--ip", &cidr];
    let common_args = [
        "--key-file",
        &key,
        "--arbiter",
        &arbiter,
        "--dead-after",
        common::TEST_DEAD_AFTER,
        "--health-deadline-ms",
        "0",
    ];
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    let listen = format!("{}:7000", lab.host_b().link_ip());
    sec.arg("secondary").args(guest).args(common_args).args(["--tap", lab.host_b().tap()]);
    sec.args(["--listen", &listen, "--control", &d("s.sock")]);
    let mut secondary = spawn(&mut sec, dir.path(), "secondary.log");
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(common_args).args(["--tap", lab.host_a().tap()]);
    pri.args(["--peer", &listen, "--standby", &spare, "--control", &d("p.sock")]);
    let primary = spawn(&mut pri, dir.path(), "primary.log");
    let mut w = Writer { s: connect(&lab), acked: 0 };
    for _ in 0..20 {
        w.write();
    }
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    for _ in 0..20 {
        w.write();
    }

    // A standby that dies while the state streams to it.
    let standby_cmd = || {
        let mut sb = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
        sb.arg("secondary").args(common_args).args(["--tap", lab.host_b().tap()]);
        sb.args(["--listen", &spare, "--control", &d("sb.sock")]);
        sb
    };
    let mut standby = spawn(&mut standby_cmd(), dir.path(), "standby.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The control socket answers once the standby listens.
        let out = common::ftvm().args(["status", "--control", &d("sb.sock"), "--json"]).output().unwrap();
        if out.status.success() {
            let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if st["state"].as_str().is_some_and(|s| s.contains("receiving the guest's state")) {
                break;
            }
            assert!(
                st["state"].as_str().is_some_and(|s| s.starts_with("standby")),
                "the transfer ended before it could be cut: {st}\n{}",
                logs(dir.path())
            );
        }
        assert!(Instant::now() < deadline, "no transfer began\n{}", logs(dir.path()));
    }
    standby.0.kill().unwrap();
    let _ = standby.0.wait();
    // The primary runs on, alone, and serves.
    for _ in 0..20 {
        w.write();
    }
    let st = common::status_json(&d("p.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));
    assert!(st["last_failure"]["repair_ms"].is_null(), "{st}");
    let primary_log = std::fs::read_to_string(dir.path().join("primary.log")).unwrap();
    assert!(primary_log.contains("re-protection onto"), "{primary_log}");

    // The standby comes back (as systemd would restart it): the retry succeeds.
    std::fs::rename(dir.path().join("standby.log"), dir.path().join("standby-killed.log")).unwrap();
    let standby = spawn(&mut standby_cmd(), dir.path(), "standby.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        w.write();
        let st = common::status_json(&d("p.sock"));
        if st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64() {
            break;
        }
        assert!(Instant::now() < deadline, "no repair within 120 s: {st}\n{}", logs(dir.path()));
    }
    for _ in 0..20 {
        w.write();
    }
    w.check_all();
    drop((primary, standby));
}

#[test]
fn kvm_netns_double_failure_the_survivor_reprotects_onto_a_spare_and_the_client_survives_both() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("rd");
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    eprintln!("logs in {}", dir.path().display());
    let key = common::key_file(dir.path(), "k");
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    // Each host's spare port: the other side's --standby.
    let spare_a = format!("{}:7001", lab.host_a().link_ip());
    let spare_b = format!("{}:7001", lab.host_b().link_ip());
    let cidr = lab.guest_cidr();
    let guest = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr];
    let common_args = [
        "--key-file",
        &key,
        "--arbiter",
        &arbiter,
        "--dead-after",
        common::TEST_DEAD_AFTER,
        "--health-deadline-ms",
        "0",
    ];
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(guest).args(common_args).args(["--tap", lab.host_b().tap()]);
    sec.args(["--listen", &listen, "--standby", &spare_a, "--control", &d("s.sock")]);
    let mut secondary = spawn(&mut sec, dir.path(), "secondary.log");
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(common_args).args(["--tap", lab.host_a().tap()]);
    pri.args(["--peer", &listen, "--standby", &spare_b, "--control", &d("p.sock")]);
    let mut primary = spawn(&mut pri, dir.path(), "primary.log");
    let mut w = Writer { s: connect(&lab), acked: 0 };
    for _ in 0..30 {
        w.write();
    }

    // First failure: the primary's VMM dies; the secondary goes live.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    for _ in 0..30 {
        w.write();
    }
    let st = common::status_json(&d("s.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));

    // The failed primary's host comes back as a spare; the survivor
    // re-protects itself onto it while the client writes on.
    let mut sb = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sb.arg("secondary").args(common_args).args(["--tap", lab.host_a().tap()]);
    sb.args(["--listen", &spare_a, "--control", &d("sb.sock")]);
    let standby = spawn(&mut sb, dir.path(), "standby.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    let repair_ms = loop {
        w.write();
        let st = common::status_json(&d("s.sock"));
        if st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64() {
            assert_eq!(st["last_failure"]["kind"], "primary lost", "{st}");
            break st["last_failure"]["repair_ms"].as_f64().unwrap();
        }
        assert!(Instant::now() < deadline, "no repair within 120 s: {st}\n{}", logs(dir.path()));
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.path().join("standby.log")).unwrap_or_default().contains("protected") {
        w.write();
        assert!(Instant::now() < deadline, "the standby never started failover\n{}", logs(dir.path()));
    }
    for _ in 0..30 {
        w.write();
    }

    // Second failure: the survivor dies too; the spare goes live.
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    for _ in 0..30 {
        w.write();
    }
    w.check_all();
    let st = common::status_json(&d("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));
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
    let lab = Lab::pair("rl");
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    let key = common::key_file(dir.path(), "k");
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let spare = format!("{}:7001", lab.host_b().link_ip());
    let guest = ["--guest", "crunch", "--memory-mib", "16", "--param", "rounds=1000000000", "--digest-every", "100"];
    let common_args = [
        "--key-file",
        &key,
        "--arbiter",
        &arbiter,
        "--dead-after",
        common::TEST_DEAD_AFTER,
        "--health-deadline-ms",
        "0",
        "--max-lag-ms",
        "60000",
    ];
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(guest).args(common_args);
    sec.args(["--listen", &listen, "--control", &d("s.sock")]);
    let mut secondary = spawn(&mut sec, dir.path(), "secondary.log");
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(common_args);
    pri.args(["--peer", &listen, "--standby", &spare, "--control", &d("p.sock")]);
    let _primary = spawn(&mut pri, dir.path(), "primary.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.path().join("primary.log")).unwrap_or_default().contains("protected") {
        assert!(Instant::now() < deadline, "never paired\n{}", logs(dir.path()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the guest run ahead a while, then the secondary's VMM dies.
    let st = loop {
        let st = common::status_json(&d("p.sock"));
        if st["log_position"].as_u64().unwrap_or(0) > 300 {
            break st;
        }
        assert!(Instant::now() < deadline, "the guest made no progress: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("secondary killed at log position {}", st["log_position"]);
    secondary.0.kill().unwrap();
    let _ = secondary.0.wait();
    let mut sb = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sb.arg("secondary").args(common_args);
    sb.args(["--listen", &spare, "--control", &d("sb.sock")]);
    let _standby = spawn(&mut sb, dir.path(), "standby.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = common::status_json(&d("p.sock"));
        if st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64() {
            break;
        }
        assert!(Instant::now() < deadline, "no repair within 120 s: {st}\n{}", logs(dir.path()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // In step: the standby replays on past several digest points.
    let start = common::status_json(&d("sb.sock"))["log_position"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = common::status_json(&d("sb.sock"));
        assert_eq!(st["role"], "secondary", "{st}\n{}", logs(dir.path()));
        assert_eq!(st["divergences"], 0, "{st}\n{}", logs(dir.path()));
        if st["log_position"].as_u64().unwrap_or(0) > start + 300 {
            break;
        }
        assert!(Instant::now() < deadline, "the standby does not replay on: {st}\n{}", logs(dir.path()));
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let lab = Lab::pair("rc");
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    eprintln!("logs in {}", dir.path().display());
    let key = common::key_file(dir.path(), "k");
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let spare_a = format!("{}:7001", lab.host_a().link_ip());
    let spare_b = format!("{}:7001", lab.host_b().link_ip());
    let cidr = lab.guest_cidr();
    let guest = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr];
    // Each host's probe fails once the test creates its file.
    let probe = |host: &str| format!("exec:test ! -e {}/fail-{host}", dir.path().display());
    let (probe_a, probe_b) = (probe("a"), probe("b"));
    let common_args = [
        "--key-file",
        &key,
        "--arbiter",
        &arbiter,
        "--dead-after",
        common::TEST_DEAD_AFTER,
        "--health-deadline-ms",
        "0",
        "--output-mode",
        "strict",
        "--probe-timeout-ms",
        "2000",
    ];
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(guest).args(common_args).args(["--tap", lab.host_b().tap(), "--probe", &probe_b]);
    sec.args(["--listen", &listen, "--standby", &spare_a, "--control", &d("s.sock")]);
    let mut secondary = spawn(&mut sec, dir.path(), "secondary.log");
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(common_args).args(["--tap", lab.host_a().tap(), "--probe", &probe_a]);
    pri.args(["--peer", &listen, "--standby", &spare_b, "--control", &d("p.sock")]);
    let mut primary = spawn(&mut pri, dir.path(), "primary.log");
    let mut w = Writer { s: connect(&lab), acked: 0 };
    for _ in 0..30 {
        w.write();
    }
    // The primary's VMM dies: B goes live; a standby on A takes the state.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    let mut sb = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sb.arg("secondary").args(common_args).args(["--tap", lab.host_a().tap(), "--probe", &probe_a]);
    sb.args(["--listen", &spare_a, "--control", &d("sb.sock")]);
    let mut standby = spawn(&mut sb, dir.path(), "standby.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        w.write();
        let st = common::status_json(&d("s.sock"));
        if st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64() {
            break;
        }
        assert!(Instant::now() < deadline, "no repair within 120 s: {st}\n{}", logs(dir.path()));
    }
    // Barriers reach the new secondary: it holds replay at them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        w.write();
        let st = common::status_json(&d("sb.sock"));
        if st["role"] == "secondary" && st["last_barrier_exit"].is_u64() {
            break;
        }
        assert!(Instant::now() < deadline, "no barrier at the new secondary: {st}\n{}", logs(dir.path()));
    }
    for _ in 0..30 {
        w.write();
    }
    // B's service fails its probe: contained onto A.
    std::fs::write(dir.path().join("fail-b"), b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let handed = loop {
        w.write();
        if let Some(status) = secondary.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "B's copy did not hand its fault over\n{}", logs(dir.path()));
    };
    assert_eq!(handed.code(), Some(4), "B handed the guest over (status 4)\n{}", logs(dir.path()));
    for _ in 0..30 {
        w.write();
    }
    let st = common::status_json(&d("sb.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));
    assert_eq!(st["last_fault"]["action"], "contained", "{st}");
    assert_eq!(st["last_fault"]["source"], "probe", "{st}");
    w.check_all();
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
    let lab = Lab::pair("rv");
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    eprintln!("logs in {}", dir.path().display());
    let key = common::key_file(dir.path(), "k");
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let cidr = lab.guest_cidr();
    let guest = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr];
    let common_args = [
        "--key-file",
        &key,
        "--arbiter",
        &arbiter,
        "--dead-after",
        common::TEST_DEAD_AFTER,
        "--health-deadline-ms",
        "0",
    ];
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.env("FTVM_TEST_DIVERGE_AT_EXIT", "3000");
    sec.arg("secondary").args(guest).args(common_args).args(["--tap", lab.host_b().tap()]);
    sec.args(["--listen", &listen, "--control", &d("s.sock")]);
    // The log is "standby.log" so that `logs` shows it.
    let secondary = spawn(&mut sec, dir.path(), "standby.log");
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(common_args).args(["--tap", lab.host_a().tap()]);
    pri.args(["--peer", &listen, "--standby", &listen, "--control", &d("p.sock")]);
    let mut primary = spawn(&mut pri, dir.path(), "primary.log");
    let mut w = Writer { s: connect(&lab), acked: 0 };
    let deadline = Instant::now() + Duration::from_secs(120);
    let repair_ms = loop {
        w.write();
        let st = common::status_json(&d("p.sock"));
        if st["role"] == "primary" && st["last_failure"]["repair_ms"].is_f64() {
            break st["last_failure"]["repair_ms"].as_f64().unwrap();
        }
        assert!(Instant::now() < deadline, "not healed within 120 s: {st}\n{}", logs(dir.path()));
    };
    let healed = std::fs::read_to_string(dir.path().join("standby.log")).unwrap_or_default();
    assert!(healed.contains("replay diverged") && healed.contains("healing"), "{healed}");
    // The healed copy runs its failover once the primary freed the arbiter.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        w.write();
        let st = common::status_json(&d("s.sock"));
        if st["role"] == "secondary" && st["peer"] == "up" && st["arbiter_generation"].is_u64() {
            assert_eq!(st["divergences"], 1, "the healed divergence is counted: {st}");
            break;
        }
        assert!(Instant::now() < deadline, "the healed copy is not in sync: {st}\n{}", logs(dir.path()));
    }
    for _ in 0..30 {
        w.write();
    }
    // In step now: a failover to it loses nothing.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    for _ in 0..30 {
        w.write();
    }
    w.check_all();
    let st = common::status_json(&d("s.sock"));
    assert_eq!(st["role"], "standalone", "{st}\n{}", logs(dir.path()));
    eprintln!("divergence healed: repair_ms {repair_ms}; {} writes in all", w.acked);
    drop(secondary);
}
