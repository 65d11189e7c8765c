//! The guests' network on real KVM, real TAP devices and network
//! namespaces (tests/lab): a hostile NIC driver ends in a typed device
//! error; `kvstore` serves real `redis-cli` and a concurrent client;
//! `streamer` delivers numbered datagrams in order.

mod common;

use common::resp;
use ftvm_lab as lab;

use std::process::{Command, Stdio};
use std::time::Duration;

use lab::Lab;

/// `ftvm run ...` inside host a's namespace, on its TAP.
fn ftvm_in(lab: &Lab, args: &[&str]) -> Command {
    let host = lab.host_a();
    let mut cmd = host.netns().command(env!("CARGO_BIN_EXE_ftvm"));
    cmd.arg("run").args(["--tap", host.tap()]).args(args);
    cmd
}

fn ready() -> bool {
    common::kvm() && lab::require_root()
}

#[test]
fn kvm_netns_hostile_nic_driver_ends_in_a_typed_device_error() {
    if !ready() {
        return;
    }
    let lab = Lab::single("hostile");
    for (case, want) in [("outside", "is outside guest memory"), ("loop", "it loops"), ("size", "not a power of two")] {
        let param = format!("case={case}");
        let out = ftvm_in(&lab, &["--guest", "bad-virtio", "--param", &param])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A bad queue size is refused when the queue is made ready, before
        // the guest gets to post anything.
        if case != "size" {
            assert!(stdout.contains("posting a hostile TX chain"), "{case}: {stdout}");
        }
        assert!(!stdout.contains("still running"), "{case}: the guest went on after a device error: {stdout}");
        let line = common::one_error_line(&out);
        assert!(line.contains("the guest misused its virtio-net device") && line.contains(want), "{case}: {line}");
        assert_eq!(out.status.code(), Some(3), "{case}");
    }
}

/// A guest booted in the lab, stdout lines on a channel; killed on drop.
struct LabGuest {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl LabGuest {
    fn boot(lab: &Lab, args: &[&str], ready_prefix: &str) -> LabGuest {
        let mut child = ftvm_in(lab, args).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let guest = LabGuest { child, lines };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match guest.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(ready_prefix) => return guest,
                Ok(_) => {}
                Err(e) => panic!("guest never printed {ready_prefix:?}: {e}"),
            }
        }
    }
}

impl Drop for LabGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_cli(lab: &Lab, args: &[&str]) -> String {
    let ip = lab.guest_ip().to_string();
    let out = lab.client().command("redis-cli").args(["-h", &ip, "-p", "6379"]).args(args).output().unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string()
}

/// One request/reply over an open connection: send `req`, read until `n`
/// CRLF-terminated lines (enough for the simple replies used here).
fn roundtrip(s: &mut std::net::TcpStream, req: &[u8], lines: usize) -> String {
    use std::io::{Read, Write};
    s.write_all(req).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.windows(2).filter(|w| w == b"\r\n").count() < lines {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

#[test]
fn kvm_netns_kvstore_answers_redis_cli_and_concurrent_clients() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kv");
    let cidr = lab.guest_cidr();
    let _vm = LabGuest::boot(&lab, &["--guest", "kvstore", "--ip", &cidr], "kvstore: listening");
    assert!(lab.client().ping(lab.guest_ip(), Duration::from_secs(5)).is_some(), "the guest does not answer ping");

    // Real redis-cli, every command the issue names, exact replies.
    for (args, want) in [
        (&["PING"][..], "PONG"),
        (&["ECHO", "hello world"], "hello world"),
        (&["SET", "k1", "v1"], "OK"),
        (&["GET", "k1"], "v1"),
        (&["SET", "k2", "v2", "EX", "100"], "OK"),
        (&["SET", "k3", "v3", "PX", "100000"], "OK"),
        (&["EXISTS", "k1", "k2", "nope"], "2"),
        (&["DBSIZE"], "3"),
        (&["INCR", "n"], "1"),
        (&["INCRBY", "n", "41"], "42"),
        (&["MSET", "a", "1", "b", "2"], "OK"),
        (&["MGET", "a", "b", "nope"], "1\n2"),
        (&["DEL", "a", "b", "nope"], "2"),
        (&["GET", "nope"], ""),
        (&["CONFIG", "GET", "appendonly"], "appendonly\nno"),
        (&["FLUSHALL"], "OK"),
        (&["DBSIZE"], "0"),
    ] {
        assert_eq!(redis_cli(&lab, args), want, "redis-cli {args:?}");
    }
    let err = redis_cli(&lab, &["NOSUCHCMD", "x"]);
    assert!(err.starts_with("ERR unknown command 'NOSUCHCMD'"), "{err}");

    // 32 concurrent connections, interleaved SET/GET/INCR on a shared counter.
    let ip = lab.guest_ip();
    const CONNS: usize = 32;
    const ROUNDS: usize = 20;
    lab.client().run(move || {
        let threads: Vec<_> = (0..CONNS)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut s =
                        std::net::TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(5)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    for r in 0..ROUNDS {
                        let key = format!("c{c}");
                        let val = format!("v{c}-{r}");
                        assert_eq!(roundtrip(&mut s, &resp(&["SET", &key, &val]), 1), "+OK\r\n");
                        assert_eq!(roundtrip(&mut s, &resp(&["GET", &key]), 2), format!("${}\r\n{val}\r\n", val.len()));
                        let n = roundtrip(&mut s, &resp(&["INCR", "shared"]), 1);
                        assert!(n.starts_with(':'), "{n}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
    assert_eq!(redis_cli(&lab, &["GET", "shared"]), (CONNS * ROUNDS).to_string(), "lost or doubled INCRs");

    // A bad request gets an error reply and the connection keeps working; a
    // request that breaks the protocol gets an error and (as Redis does) that
    // connection is closed, while the server goes on serving others.
    lab.client().run(move || {
        let mut s = std::net::TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = roundtrip(&mut s, &resp(&["GET"]), 1);
        assert!(r.starts_with("-ERR wrong number of arguments"), "{r}");
        assert_eq!(roundtrip(&mut s, &resp(&["PING"]), 1), "+PONG\r\n");
        let r = roundtrip(&mut s, b"*1\r\n$abc\r\n", 1);
        assert!(r.starts_with("-ERR Protocol error"), "{r}");
    });
    assert_eq!(redis_cli(&lab, &["PING"]), "PONG");
}

#[test]
fn kvm_netns_streamer_delivers_numbered_datagrams_in_order() {
    if !ready() {
        return;
    }
    let lab = Lab::single("st");
    let client_ip = lab.client_ip();
    let sock = lab.client().run(move || std::net::UdpSocket::bind((client_ip, 5004)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cidr = lab.guest_cidr();
    let dest = format!("dest={client_ip}:5004");
    let _vm = LabGuest::boot(
        &lab,
        &["--guest", "streamer", "--ip", &cidr, "--param", &dest, "--param", "rate=200"],
        "streamer: sending",
    );
    let mut buf = [0u8; 2048];
    let (mut expected, mut last_clock) = (0u64, 0u64);
    let start = std::time::Instant::now();
    const COUNT: u64 = 300;
    while expected < COUNT {
        let n = sock.recv(&mut buf).expect("datagram within 10 s");
        assert_eq!(n, 1316, "datagram size");
        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
        let clock = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        assert_eq!(seq, expected, "gap or reordering");
        assert!(clock >= last_clock, "guest clock went backwards");
        last_clock = clock;
        expected += 1;
    }
    // Loose rate check (the precise rate is the benchmark's job): 300
    // datagrams at 200/s take 1.5 s; allow 0.75 s .. 6 s.
    let took = start.elapsed();
    assert!(took > Duration::from_millis(750) && took < Duration::from_secs(6), "300 datagrams at 200/s took {took:?}");
}
