//! Failover experiments on real KVM in a lab of namespaces: the primary is
//! killed and the guest lives on on the secondary, its clients' TCP
//! connections intact, nothing acknowledged lost; the secondary is killed
//! and the primary carries on alone. (The thesis' experiments; the full set
//! and the 20-repetition figures are the failover issue's.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ftvm_lab as lab;
use lab::Lab;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    v
}

fn reply(s: &mut BufReader<TcpStream>) -> String {
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

/// A protected kvstore pair with an arbiter: (primary, secondary, dir).
fn pair(lab: &Lab) -> (Proc, Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    assert!(common::ftvm().args(["keygen", "--out", key.to_str().unwrap()]).status().unwrap().success());
    let arbiter = format!("file:{}", dir.path().join("arbiter").display());
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let cidr = lab.guest_cidr();
    let common_args = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr, "--key-file", key.to_str().unwrap()];
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(common_args).args(["--tap", lab.host_b().tap(), "--listen", &listen]);
    sec.args(["--arbiter", &arbiter, "--control", &d("s.sock")]);
    let sec = Proc(sec.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap());
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(common_args).args(["--tap", lab.host_a().tap(), "--peer", &listen]);
    pri.args(["--arbiter", &arbiter, "--control", &d("p.sock")]);
    let pri = Proc(pri.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap());
    (pri, sec, dir)
}

fn connect(lab: &Lab) -> BufReader<TcpStream> {
    let ip = lab.guest_ip();
    let s = lab.client().run(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(2)) {
                Ok(s) => return s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "kvstore never accepted a connection: {e}");
                    // Waiting for the guest to boot: nothing to block on.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    BufReader::new(s)
}

fn status(path: &std::path::Path) -> serde_json::Value {
    let out = common::ftvm().args(["status", "--control", path.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

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
    let st = status(&dir.path().join("s.sock"));
    assert_eq!(st["role"], "standalone", "{st}");
    let f = &st["last_failure"];
    assert_eq!(f["kind"], "primary lost", "{st}");
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
    let st = status(&dir.path().join("p.sock"));
    assert_eq!(st["role"], "standalone", "{st}");
    assert_eq!(st["peer"], "down", "{st}");
    assert_eq!(st["last_failure"]["kind"], "secondary lost", "{st}");
    eprintln!("secondary lost: 50 requests in {took:?}; {}", st["last_failure"]);
    drop(primary);
}
