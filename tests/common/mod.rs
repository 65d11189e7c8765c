//! Helpers shared by the end-to-end tests: running the `ftvm` binary and
//! waiting on what it prints.
#![allow(dead_code)] // each test file uses part of it

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The ftvm binary cargo built for these tests.
pub fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

/// Whether KVM tests can run; panics instead when FTVM_REQUIRE_KVM=1.
pub fn kvm() -> bool {
    vmm::testing::kvm_available()
}

/// `kill -SIGNAL PID`, e.g. `signal("STOP", pid)`; panics if it fails, with one line naming the
/// Debian package if `kill` is not installed.
pub fn signal(name: &str, pid: u32) {
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{name}")).arg(pid.to_string());
    let status = ftvm_lab::spawn(&mut cmd).wait().expect("waiting for kill");
    assert!(status.success(), "`{cmd:?}` failed: {status}");
}

/// Run `ftvm args...` to completion (bounded: a hung VMM fails the test).
pub fn run(args: &[&str]) -> Output {
    let mut child = ftvm().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ftvm");
    let (tx, rx) = mpsc::channel();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        out.read_to_end(&mut v).unwrap();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        err.read_to_end(&mut v).unwrap();
        v
    });
    let pid = child.id();
    std::thread::spawn(move || tx.send(child.wait()));
    let status = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(s) => s.expect("wait ftvm"),
        Err(_) => {
            signal("KILL", pid);
            panic!("ftvm {args:?} did not finish within 60 s");
        }
    };
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// Assert stderr is exactly one line, starting `ftvm: `, with no panic or
/// backtrace text, and return it.
pub fn one_error_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr is not one line: {err:?}");
    assert!(lines[0].starts_with("ftvm: "), "stderr line does not start with `ftvm: `: {err:?}");
    // What a Rust panic prints (not "panicked" alone: a guest panic is reported as such).
    for bad in ["thread '", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!err.contains(bad), "stderr has panic text: {err:?}");
    }
    lines[0].to_string()
}

/// A running ftvm whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Running {
    pub fn spawn(args: &[&str]) -> Running {
        let mut child = ftvm().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn ftvm");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running { child, lines }
    }

    /// Wait for a stdout line equal to `want`; fail after `timeout`.
    pub fn expect_line(&self, want: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return,
                Ok(_) => continue,
                Err(e) => panic!("no line {want:?} on stdout: {e}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP request (array of bulk strings), as redis-cli sends it.
pub fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

/// One RESP reply (simple, error, integer or bulk string), as raw text.
pub fn reply(s: &mut BufReader<std::net::TcpStream>) -> String {
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    if let Some(len) = line.strip_prefix('$') {
        let len: i64 = len.trim().parse().unwrap();
        if len >= 0 {
            let mut body = vec![0u8; len as usize + 2];
            s.read_exact(&mut body).unwrap();
            line.push_str(&String::from_utf8_lossy(&body));
        }
    }
    line
}

/// A new key file `name` in `dir`, written by `ftvm keygen`; its path.
pub fn key_file(dir: &std::path::Path, name: &str) -> String {
    let path = dir.join(name);
    let out = ftvm().args(["keygen", "--out", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "ftvm keygen: {}", String::from_utf8_lossy(&out.stderr));
    path.to_str().unwrap().to_string()
}

/// `ftvm status --control PATH --json`.
pub fn status_json(control: &str) -> serde_json::Value {
    let out = ftvm().args(["status", "--control", control, "--json"]).output().unwrap();
    assert!(out.status.success(), "ftvm status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A connection from the lab's client to kvstore on the guest's address,
/// retried while the guest boots (nothing to block on but the attempt).
pub fn connect_kvstore(lab: &ftvm_lab::Lab) -> BufReader<std::net::TcpStream> {
    let ip = lab.guest_ip();
    let s = lab.client().run(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match std::net::TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(2)) {
                Ok(s) => return s,
                Err(e) => {
                    assert!(std::time::Instant::now() < deadline, "kvstore never accepted a connection: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    BufReader::new(s)
}

/// A child process killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A protected kvstore pair with an arbiter: (primary, secondary, dir).
pub fn failover_pair(lab: &ftvm_lab::Lab) -> (Proc, Proc, tempfile::TempDir) {
    let cidr = lab.guest_cidr();
    failover_pair_of(lab, &["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr])
}

/// `--dead-after` of the failover tests' pairs: 30 intervals (300 ms) rather
/// than the default 5. These tests check what happens on a failure, not how
/// fast it is seen (the benchmarks measure that); on a shared two-core
/// machine a VMM's heartbeat thread was seen to go without CPU for up to
/// 190 ms, which with the default declares a live peer dead.
pub const TEST_DEAD_AFTER: &str = "30";

/// A protected pair of any guest with an arbiter: (primary, secondary, dir).
pub fn failover_pair_of(lab: &ftvm_lab::Lab, guest: &[&str]) -> (Proc, Proc, tempfile::TempDir) {
    // FTVM_TEST_KEEP=1 keeps the directory (and the VMMs' logs) for a look.
    let dir = tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
    let key = key_file(dir.path(), "k");
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(guest).args(["--key-file", &key, "--tap", lab.host_b().tap()]);
    sec.args(["--listen", &listen, "--arbiter", &arbiter, "--control", &d("s.sock")]);
    // A caller that set its own --dead-after keeps it.
    let dead_after: &[&str] = if guest.contains(&"--dead-after") { &[] } else { &["--dead-after", TEST_DEAD_AFTER] };
    sec.args(dead_after);
    // Logs go to files: a pipe nobody reads would stall a VMM that logs much.
    let log = |n: &str| std::fs::File::create(dir.path().join(n)).unwrap();
    let sec = Proc(sec.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log("secondary.log")).spawn().unwrap());
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(["--key-file", &key, "--tap", lab.host_a().tap()]);
    pri.args(["--peer", &listen, "--arbiter", &arbiter, "--control", &d("p.sock")]);
    pri.args(dead_after);
    let pri = Proc(pri.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log("primary.log")).spawn().unwrap());
    (pri, sec, dir)
}

/// A pair process; killed on drop. Its stderr lines arrive on a channel.
pub struct Logged {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
}

impl Logged {
    pub fn spawn(mut cmd: Command) -> Logged {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("  | {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Logged { child, stderr }
    }

    /// Wait for exit (bounded) and return the status and the stderr lines
    /// not yet taken.
    pub fn finish(mut self, timeout: Duration) -> (Option<i32>, Vec<String>) {
        let exited = ftvm_lab::wait_for(timeout, || self.child.try_wait().unwrap().is_some());
        assert!(exited, "pair process did not exit within {timeout:?}");
        let status = self.child.try_wait().unwrap().unwrap();
        let mut lines = Vec::new();
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_millis(500)) {
            lines.push(l);
        }
        (status.code(), lines)
    }

    /// The first stderr line (from now on) containing `needle`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?}: {e}"),
            }
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
pub mod rig;
