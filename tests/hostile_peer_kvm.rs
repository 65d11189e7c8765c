//! Hostile peers against the `ftvm` binary on real KVM (issue 12, items 2,
//! 3 and 4): whatever an unauthenticated peer sends to a waiting
//! secondary's port, it keeps waiting and a real primary then pairs; idle
//! connections held open do not delay a real primary; a heartbeat of an
//! earlier run of the pair, replayed to the live pair, forces no failover.

mod common;

use common::{connect_kvstore, key_file, reply, resp, status_json};

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use ftvm_lab as lab;
use lab::Lab;

use common::Logged as Proc;

/// Read until the secondary closes the connection (bounded).
fn until_closed(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the secondary kept a bad connection open: {e}"),
        }
    }
}

fn secondary(key: &str, listen: &str, control: &str) -> Proc {
    let mut sec = common::ftvm();
    sec.args(["secondary", "--guest", "devices", "--key-file", key, "--listen", listen, "--control", control]);
    let sec = Proc::spawn(sec);
    sec.wait_stderr("waiting for the primary", Duration::from_secs(20));
    sec
}

fn primary(key: &str, peer: &str, control: &str) -> Command {
    let mut pri = common::ftvm();
    pri.args(["primary", "--guest", "devices", "--key-file", key, "--peer", peer, "--control", control]);
    pri
}

#[test]
fn kvm_unauthenticated_bytes_never_stop_a_waiting_secondary() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (key, other_key) = (key_file(dir.path(), "k"), key_file(dir.path(), "k2"));
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let port = 19400 + (std::process::id() % 1000) as u16;
    let listen = format!("127.0.0.1:{port}");
    let mut sec = secondary(&key, &listen, &d("s.sock"));

    // The four bytes (another version: 3 since this side speaks 2),
    // then variants: held open, a whole header of
    // another version, garbage, a truncated frame, nothing at all.
    let mut v3_header = b"fL\x03\x00\x04\x00".to_vec();
    v3_header.extend_from_slice(&0u64.to_le_bytes());
    v3_header.extend_from_slice(&106u32.to_le_bytes());
    v3_header.resize(18 + 106 + 20, 0xab);
    let variants: [(&str, &[u8], bool); 6] = [
        ("the issue's bytes", b"fL\x03\x00", true),
        ("the issue's bytes, held open", b"fL\x03\x00", false),
        ("a frame of version 3", &v3_header, false),
        ("garbage", b"GET / HTTP/1.0\r\n\r\n", false),
        ("a truncated frame", b"fL\x01\x00\x04\x00\x00\x00", true),
        ("a close", b"", true),
    ];
    for (what, bytes, close) in variants {
        let mut stream = TcpStream::connect(&listen).unwrap();
        let _ = stream.write_all(bytes);
        if close {
            let _ = stream.shutdown(std::net::Shutdown::Write);
        }
        until_closed(&mut stream);
        assert!(sec.running(), "{what}: the secondary exited");
    }
    let line = sec.wait_stderr("refused a connection", Duration::from_secs(10));
    assert!(line.contains("version"), "the issue's bytes were refused for another reason: {line}");
    // A real primary with another key: refused, the secondary keeps waiting.
    let wrong = Proc::spawn(primary(&other_key, &listen, &d("p0.sock")));
    sec.wait_stderr("failed authentication", Duration::from_secs(30));
    drop(wrong);
    assert!(sec.running(), "the secondary exited after a wrong-key primary");
    let st = status_json(&d("s.sock"));
    assert_eq!((st["role"].as_str(), st["exit_index"].as_u64()), (Some("secondary"), Some(0)), "{st}");
    assert_eq!(st["peer"], "down", "{st}");

    // The real primary pairs, and both run the guest to its end.
    let pri = Proc::spawn(primary(&key, &listen, &d("p.sock")));
    let (pc, plines) = pri.finish(Duration::from_secs(60));
    let (sc, slines) = sec.finish(Duration::from_secs(60));
    assert_eq!(pc, Some(0), "primary: {plines:?}");
    assert_eq!(sc, Some(0), "secondary: {slines:?}");
}

#[test]
fn kvm_five_hundred_idle_connections_do_not_delay_a_real_primary() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k");
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let port = 20400 + (std::process::id() % 1000) as u16;
    let listen = format!("127.0.0.1:{port}");
    let sec = secondary(&key, &listen, &d("s.sock"));
    let idle: Vec<TcpStream> = (0..500).map(|_| TcpStream::connect(&listen).unwrap()).collect();

    let mut pri = primary(&key, &listen, &d("p.sock"));
    // The channel's own line says when the session is up.
    pri.env("RUST_LOG", "warn,replication::channel=info");
    let started = Instant::now();
    let pri = Proc::spawn(pri);
    pri.wait_stderr("logging channel established", Duration::from_secs(30));
    let took = started.elapsed();
    eprintln!("paired {took:?} after the primary started, with 500 idle connections open");
    // Aimed at well under a second (the issue measured 31 s); generous for
    // a process start on a loaded machine.
    assert!(took < Duration::from_secs(5), "the real primary waited {took:?}");
    drop(idle);
    let (pc, plines) = pri.finish(Duration::from_secs(60));
    let (sc, slines) = sec.finish(Duration::from_secs(60));
    assert_eq!(pc, Some(0), "primary: {plines:?}");
    assert_eq!(sc, Some(0), "secondary: {slines:?}");
}

/// A heartbeat as a primary of the pair `name` sent it in an earlier run:
/// a heartbeat service of that role, keyed with the pair's key file, whose
/// first datagram is caught on a local socket.
fn heartbeat_of_an_earlier_run(key_path: &str, name: &str) -> Vec<u8> {
    let key = replication::key::SharedKey::from_file(std::path::Path::new(key_path)).unwrap();
    let catcher = UdpSocket::bind("127.0.0.1:0").unwrap();
    catcher.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let config = heartbeat::ServiceConfig::new(
        heartbeat::Role::Primary,
        heartbeat::PairId::for_vm_name(name),
        "127.0.0.1:0".parse().unwrap(),
        Some(catcher.local_addr().unwrap()),
    );
    let service = rt.block_on(heartbeat::Service::start(config, key.as_bytes())).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = catcher.recv_from(&mut buf).unwrap();
    drop(service);
    buf[..n].to_vec()
}

#[test]
fn kvm_netns_a_replayed_heartbeat_of_an_earlier_run_forces_no_failover() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    const NAME: &str = "hostile";
    let lab = Lab::pair("hb");
    let cidr = lab.guest_cidr();
    let (mut primary, mut secondary, dir) =
        common::failover_pair_of(&lab, &["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr, "--name", NAME]);
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let mut client = connect_kvstore(&lab);
    client.get_mut().write_all(&resp(&["SET", "a", "1"])).unwrap();
    assert_eq!(reply(&mut client), "+OK\r\n");
    let accepted = |control: &str| status_json(control)["heartbeats"]["accepted"].as_u64().unwrap_or(0);
    assert!(
        lab::wait_for(Duration::from_secs(20), || accepted(&d("s.sock")) > 10),
        "the secondary never heard the primary's heartbeats: {}",
        status_json(&d("s.sock"))
    );
    let before = status_json(&d("s.sock"));

    // One heartbeat of an earlier run, replayed from the dedicated link to
    // the secondary's heartbeat port; then again and again for a while.
    let old = heartbeat_of_an_earlier_run(&d("k"), NAME);
    let to = (lab.host_b().link_ip(), 7000);
    lab.host_a().netns().run(move || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.send_to(&old, to).unwrap();
        // Paces the replays over 40 silence limits; nothing waits on it.
        for _ in 0..1000 {
            socket.send_to(&old, to).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    // The guest is idle (no client traffic): a receiver that lost the live
    // primary's heartbeats would fail over at the first 50 ms gap.
    let exited = lab::wait_for(Duration::from_secs(2), || {
        secondary.0.try_wait().unwrap().is_some() || primary.0.try_wait().unwrap().is_some()
    });
    let log = |n: &str| std::fs::read_to_string(d(n)).unwrap_or_default();
    assert!(!exited, "a pair process exited; primary:\n{}\nsecondary:\n{}", log("primary.log"), log("secondary.log"));
    let (s, p) = (status_json(&d("s.sock")), status_json(&d("p.sock")));
    assert_eq!((s["role"].as_str(), s["peer"].as_str()), (Some("secondary"), Some("up")), "{s}");
    assert_eq!(s["last_failure"], serde_json::Value::Null, "{s}");
    assert_eq!((p["role"].as_str(), p["last_failure"].is_null()), (Some("primary"), true), "{p}");
    // The live primary's heartbeats still count as life, not as replays.
    let live = s["heartbeats"]["accepted"].as_u64().unwrap() - before["heartbeats"]["accepted"].as_u64().unwrap();
    let replayed = s["heartbeats"]["replayed"].as_u64().unwrap() - before["heartbeats"]["replayed"].as_u64().unwrap();
    assert!(live > 100, "the secondary stopped accepting the live primary's heartbeats: {before} → {s}");
    assert!(replayed < live / 10, "live heartbeats counted as replays: {before} → {s}");
    // And the pair still serves.
    client.get_mut().write_all(&resp(&["GET", "a"])).unwrap();
    assert_eq!(reply(&mut client), "$1\r\n1\r\n");
    drop(primary);
}
