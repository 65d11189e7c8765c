//! The rig of the multi-host pair tests (repair, switchover): a lab of
//! namespaces, a key and an arbiter in a directory that also keeps each
//! process's log, `ftvm` processes spawned on the lab's hosts, and a client
//! that writes over one kvstore connection and checks every reply.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ftvm_lab::{Lab, LabHost};

use super::{connect_kvstore, reply, resp, Proc};

pub struct Rig {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub key: String,
    pub arbiter: String,
}

impl Rig {
    /// A lab named `name` with two hosts; `FTVM_TEST_KEEP` keeps the
    /// directory (logs, sockets) after the test.
    pub fn new(name: &str) -> Rig {
        let lab = Lab::pair(name);
        let dir =
            tempfile::Builder::new().disable_cleanup(std::env::var_os("FTVM_TEST_KEEP").is_some()).tempdir().unwrap();
        eprintln!("logs in {}", dir.path().display());
        let key = super::key_file(dir.path(), "k");
        let arbiter = format!("file:{}", dir.path().join("arbiter").display());
        Rig { lab, dir, key, arbiter }
    }

    /// A path in the directory, as a string.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_string()
    }

    /// `HOST:PORT` on `host`'s dedicated link.
    pub fn link(&self, host: &LabHost, port: u16) -> String {
        format!("{}:{port}", host.link_ip())
    }

    /// The kvstore guest of these tests, with `mib` MiB.
    pub fn kvstore(&self, mib: u32) -> Vec<String> {
        ["--guest", "kvstore", "--memory-mib", &mib.to_string(), "--ip", &self.lab.guest_cidr()]
            .map(String::from)
            .to_vec()
    }

    /// A pair of `guest` (with `extra` for both): host B's secondary
    /// listening on B:7000 (`s.sock`, `secondary.log`, `sec` besides), host
    /// A's primary (`p.sock`, `primary.log`, `pri` besides), each on its
    /// host's TAP.
    pub fn pair(&self, guest: &[String], extra: &[String], sec: &[&str], pri: &[&str]) -> (Proc, Proc) {
        let (a, b) = (self.lab.host_a(), self.lab.host_b());
        let listen = self.link(b, 7000);
        let mut s = args(&["secondary"]);
        s.extend(guest.iter().cloned().chain(self.common()).chain(extra.iter().cloned()));
        s.extend(args(&["--tap", b.tap(), "--listen", &listen, "--control", &self.path("s.sock")]));
        s.extend(args(sec));
        let secondary = self.spawn(b, "secondary.log", &s);
        let mut p = args(&["primary"]);
        p.extend(guest.iter().cloned().chain(self.common()).chain(extra.iter().cloned()));
        p.extend(args(&["--tap", a.tap(), "--peer", &listen, "--control", &self.path("p.sock")]));
        p.extend(args(pri));
        let primary = self.spawn(a, "primary.log", &p);
        (secondary, primary)
    }

    /// A standby (`ftvm secondary` with no guest settings) on `host`,
    /// listening on `listen`, `sb.sock`, `standby.log`, with `extra`.
    pub fn standby(&self, host: &LabHost, listen: &str, extra: &[String]) -> Proc {
        let mut s = args(&["secondary"]);
        s.extend(self.common().into_iter().chain(extra.iter().cloned()));
        s.extend(args(&["--tap", host.tap(), "--listen", listen, "--control", &self.path("sb.sock")]));
        self.spawn(host, "standby.log", &s)
    }

    /// What every pair process gets: the key, the arbiter, the tests'
    /// silence limit, and no health deadline (on a loaded two-core machine a
    /// 30 ms stall of a debug build's vCPU thread is a fault; these tests
    /// are about other things).
    pub fn common(&self) -> Vec<String> {
        [
            "--key-file",
            &self.key,
            "--arbiter",
            &self.arbiter,
            "--dead-after",
            super::TEST_DEAD_AFTER,
            "--health-deadline-ms",
            "0",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `ftvm ARGS` on `host`, its stderr in `log` (in the directory), with
    /// `env` set.
    pub fn spawn_env(&self, host: &LabHost, log: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
        let mut cmd = host.netns().command(env!("CARGO_BIN_EXE_ftvm"));
        cmd.args(args).envs(env.iter().copied());
        let file = std::fs::File::create(self.dir.path().join(log)).unwrap();
        Proc(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file).spawn().unwrap())
    }

    /// `ftvm ARGS` on `host`, its stderr in `log`.
    pub fn spawn(&self, host: &LabHost, log: &str, args: &[String]) -> Proc {
        self.spawn_env(host, log, args, &[])
    }

    /// Every `*.log` in the directory, for a failure's message.
    pub fn logs(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| format!("--- {n}\n{}\n", std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default()))
            .collect()
    }

    /// The log `name` so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Write through `w` until `done` holds of the status at control socket
    /// `sock` (`None` while nobody serves it); fails after `within`.
    pub fn write_until(
        &self,
        w: &mut Writer,
        sock: &str,
        within: Duration,
        what: &str,
        mut done: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            w.write();
            if let Some(st) = try_status(sock) {
                if done(&st) {
                    return st;
                }
                assert!(Instant::now() < deadline, "{what}: not within {within:?}: {st}\n{}", self.logs());
            } else {
                assert!(Instant::now() < deadline, "{what}: not within {within:?}, {sock} unanswered\n{}", self.logs());
            }
        }
    }
}

/// Args from string slices.
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The status at `control`, or `None` while nobody serves the socket (a
/// process between two roles).
pub fn try_status(control: &str) -> Option<serde_json::Value> {
    let out = super::ftvm().args(["status", "--control", control, "--json"]).output().unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Writes on one kvstore connection: an INCR of `counter` (each reply must
/// be the count acknowledged so far plus one) and a SET of `k<i>`.
pub struct Writer {
    s: std::io::BufReader<std::net::TcpStream>,
    pub acked: i64,
    /// The longest single write (INCR + SET) seen: the client-seen gap.
    pub longest: Duration,
}

impl Writer {
    pub fn new(lab: &Lab) -> Writer {
        Writer { s: connect_kvstore(lab), acked: 0, longest: Duration::ZERO }
    }

    pub fn write(&mut self) {
        let started = Instant::now();
        let i = self.acked + 1;
        self.s.get_mut().write_all(&resp(&["INCR", "counter"])).unwrap();
        assert_eq!(reply(&mut self.s), format!(":{i}\r\n"), "INCR after {} acknowledged", self.acked);
        self.s.get_mut().write_all(&resp(&["SET", &format!("k{i}"), &i.to_string()])).unwrap();
        assert_eq!(reply(&mut self.s), "+OK\r\n");
        self.acked = i;
        self.longest = self.longest.max(started.elapsed());
    }

    /// `n` writes.
    pub fn writes(&mut self, n: usize) {
        for _ in 0..n {
            self.write();
        }
    }

    /// Every acknowledged write is there.
    pub fn check_all(&mut self) {
        self.s.get_mut().write_all(&resp(&["GET", "counter"])).unwrap();
        let n = self.acked.to_string();
        assert_eq!(reply(&mut self.s), format!("${}\r\n{n}\r\n", n.len()));
        for i in 1..=self.acked {
            self.s.get_mut().write_all(&resp(&["GET", &format!("k{i}")])).unwrap();
            assert_eq!(reply(&mut self.s), format!("${}\r\n{i}\r\n", i.to_string().len()), "k{i}");
        }
    }
}
