//! Planned switchover (`ftvm switchover`) on real KVM in a lab of
//! namespaces: the roles of a protected pair swap while a client writes on
//! one TCP connection; the client sees no error, nothing is lost, the pair
//! is protected again (the old primary is the new secondary), and the
//! switch back works the same way. Refusals change nothing.

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
    /// The longest single write (INCR + SET) seen: the client-seen gap.
    longest: Duration,
}

impl Writer {
    fn new(lab: &Lab) -> Writer {
        Writer { s: connect(lab), acked: 0, longest: Duration::ZERO }
    }

    fn write(&mut self) {
        let started = Instant::now();
        let i = self.acked + 1;
        self.s.get_mut().write_all(&resp(&["INCR", "counter"])).unwrap();
        assert_eq!(reply(&mut self.s), format!(":{i}\r\n"), "INCR after {} acknowledged", self.acked);
        self.s.get_mut().write_all(&resp(&["SET", &format!("k{i}"), &i.to_string()])).unwrap();
        assert_eq!(reply(&mut self.s), "+OK\r\n");
        self.acked = i;
        self.longest = self.longest.max(started.elapsed());
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

fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for n in ["a.log", "b.log"] {
        out += &format!("--- {n}\n{}\n", std::fs::read_to_string(dir.join(n)).unwrap_or_default());
    }
    out
}

fn spawn(cmd: &mut Command, dir: &std::path::Path, name: &str) -> Proc {
    let log = std::fs::File::create(dir.join(name)).unwrap();
    Proc(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// The status, or `None` while nobody serves the socket (a process between
/// two roles).
fn try_status(control: &str) -> Option<serde_json::Value> {
    let out = common::ftvm().args(["status", "--control", control, "--json"]).output().unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// The pair of the tests: host A runs the primary (`--switch-listen` on
/// A:7001, `--standby` B:7000), host B the secondary (`--listen` B:7000,
/// `--standby` A:7001): each side can re-protect onto the other.
struct Pair<'a> {
    lab: &'a Lab,
    dir: tempfile::TempDir,
    a: Proc,
    b: Proc,
}

impl Pair<'_> {
    fn start(lab: &Lab, switch_listen: bool) -> Pair<'_> {
        let dir =
            tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
        eprintln!("logs in {}", dir.path().display());
        let key = common::key_file(dir.path(), "k");
        let arbiter = format!("file:{}", dir.path().join("arbiter").display());
        let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let listen_b = format!("{}:7000", lab.host_b().link_ip());
        let listen_a = format!("{}:7001", lab.host_a().link_ip());
        let cidr = lab.guest_cidr();
        let guest = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr];
        // No health deadline: on a loaded two-core machine a 30 ms stall of
        // the vCPU thread is a fault, and this test is about switchover.
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
        sec.args(["--listen", &listen_b, "--standby", &listen_a, "--control", &d("b.sock")]);
        let b = spawn(&mut sec, dir.path(), "b.log");
        let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
        pri.arg("primary").args(guest).args(common_args).args(["--tap", lab.host_a().tap()]);
        pri.args(["--peer", &listen_b, "--standby", &listen_b, "--control", &d("a.sock")]);
        if switch_listen {
            pri.args(["--switch-listen", &listen_a]);
        }
        let a = spawn(&mut pri, dir.path(), "a.log");
        Pair { lab, dir, a, b }
    }

    fn sock(&self, n: &str) -> String {
        self.dir.path().join(format!("{n}.sock")).to_str().unwrap().to_string()
    }

    fn logs(&self) -> String {
        logs(self.dir.path())
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
    let lab = Lab::pair("sw");
    let mut pair = Pair::start(&lab, true);
    let mut w = Writer::new(pair.lab);
    for _ in 0..50 {
        w.write();
    }
    let st = common::status_json(&pair.sock("a"));
    assert_eq!(st["role"], "primary", "{st}");

    // A → B, under load.
    w.longest = Duration::ZERO;
    let answer = pair.switchover_under_load("a", &mut w);
    assert_eq!(answer["ok"], true, "{answer}");
    let gap_1 = w.longest;
    for _ in 0..50 {
        w.write();
    }
    let (b, a) = pair.wait_protected("b", "a", &mut w);
    assert_eq!(b["last_switchover"]["became"], "primary", "{b}");
    assert_eq!(a["last_switchover"]["became"], "secondary", "{a}");
    assert_eq!(b["divergences"], 0, "{b}");
    let pause_1 = pause_ms(&a, &b);
    wait_digest_past_switch(&pair, "a", &mut w);
    let b_log = std::fs::read_to_string(pair.dir.path().join("b.log")).unwrap();
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
    let a_log = std::fs::read_to_string(pair.dir.path().join("a.log")).unwrap();
    assert!(a_log.contains("(no transfer: it holds the state at the switchover): protected"), "{}", pair.logs());
    w.check_all();

    // The pair is really protected: a forced failover to the new secondary
    // (B) loses nothing.
    pair.a.0.kill().unwrap();
    let _ = pair.a.0.wait();
    for _ in 0..50 {
        w.write();
    }
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
    let lab = Lab::pair("sr");
    let mut pair = Pair::start(&lab, true);
    let mut w = Writer::new(pair.lab);
    for _ in 0..20 {
        w.write();
    }
    let refused = |sock: &str, want: &str| {
        let out = common::ftvm().args(["switchover", "--control", sock]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{err}");
        assert_eq!(err.lines().count(), 1, "one clear error: {err}");
    };
    // On the secondary.
    refused(&pair.sock("b"), "this copy is the secondary");
    for _ in 0..20 {
        w.write();
    }
    assert_eq!(common::status_json(&pair.sock("a"))["role"], "primary");
    assert_eq!(common::status_json(&pair.sock("b"))["role"], "secondary");

    // On a primary that runs unprotected (its secondary lost).
    pair.b.0.kill().unwrap();
    let _ = pair.b.0.wait();
    for _ in 0..20 {
        w.write();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while common::status_json(&pair.sock("a"))["role"] != "standalone" {
        w.write();
        assert!(Instant::now() < deadline, "the primary never ran alone\n{}", pair.logs());
    }
    refused(&pair.sock("a"), "unprotected");
    for _ in 0..20 {
        w.write();
    }
    let st = common::status_json(&pair.sock("a"));
    assert_eq!(st["role"], "standalone", "{st}");
    assert_eq!(st["switchovers"], 0, "{st}");
    w.check_all();
    drop(pair);

    // A primary without --switch-listen could not become the secondary.
    let lab = Lab::pair("sn");
    let pair = Pair::start(&lab, false);
    let mut w = Writer::new(pair.lab);
    for _ in 0..20 {
        w.write();
    }
    refused(&pair.sock("a"), "--switch-listen");
    for _ in 0..20 {
        w.write();
    }
    assert_eq!(common::status_json(&pair.sock("a"))["role"], "primary");
    w.check_all();
}
