//! `ftvm primary` and `ftvm secondary` end to end on real KVM: two
//! processes run one guest in lockstep; the secondary replays the primary's
//! log with every digest matching and ends in the very same state; outputs
//! wait for acks; a wrong key or a mismatched guest is refused on both ends.

mod common;

use common::{connect_kvstore as connect, key_file, reply, resp, status_json};

use std::io::Write;
use std::time::{Duration, Instant};

use ftvm_lab as lab;
use lab::Lab;

use common::Logged as Proc;

#[test]
fn kvm_pair_on_loopback_replays_to_an_identical_final_state() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "k");
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let port = 17400 + (std::process::id() % 1000) as u16;
    let listen = format!("127.0.0.1:{port}");
    let mut sec = common::ftvm();
    sec.args(["secondary", "--guest", "devices", "--key-file", &key, "--listen", &listen, "--digest-every", "3"])
        .args(["--control", &d("s.sock"), "--state-dump", &d("s.dump")]);
    let sec = Proc::spawn(sec);
    sec.wait_stderr("waiting for the primary", Duration::from_secs(20));
    let mut pri = common::ftvm();
    pri.args(["primary", "--guest", "devices", "--key-file", &key, "--peer", &listen, "--digest-every", "3"]).args([
        "--control",
        &d("p.sock"),
        "--state-dump",
        &d("p.dump"),
    ]);
    let pri = Proc::spawn(pri);
    let (pc, plines) = pri.finish(Duration::from_secs(60));
    let (sc, slines) = sec.finish(Duration::from_secs(60));
    assert_eq!(pc, Some(0), "primary: {plines:?}");
    assert_eq!(sc, Some(0), "secondary: {slines:?}");
    let (p, s) = (std::fs::read(d("p.dump")).unwrap(), std::fs::read(d("s.dump")).unwrap());
    assert!(p.len() > 4 << 20);
    assert!(p == s, "the secondary's final memory or vCPU state differs from the primary's");
}

#[test]
fn kvm_wrong_key_and_mismatched_guest_are_refused_on_both_ends() {
    if !common::kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (key_file(dir.path(), "k1"), key_file(dir.path(), "k2"));
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let port = 18400 + (std::process::id() % 1000) as u16;
    let listen = format!("127.0.0.1:{port}");

    // Wrong key: the primary gives up with a clear line; the secondary says
    // it refused the connection, replays nothing and keeps waiting.
    let mut sec = common::ftvm();
    sec.args(["secondary", "--guest", "devices", "--key-file", &k1, "--listen", &listen, "--control", &d("s.sock")]);
    let sec = Proc::spawn(sec);
    sec.wait_stderr("waiting for the primary", Duration::from_secs(20));
    let mut pri = common::ftvm();
    pri.args(["primary", "--guest", "devices", "--key-file", &k2, "--peer", &listen, "--control", &d("p.sock")]);
    let (pc, plines) = Proc::spawn(pri).finish(Duration::from_secs(30));
    assert_eq!(pc, Some(1), "{plines:?}");
    let last = plines.last().cloned().unwrap_or_default();
    assert!(last.starts_with("ftvm: ") && last.contains("refused the pair"), "{plines:?}");
    let refused = sec.wait_stderr("refused a connection", Duration::from_secs(10));
    assert!(refused.to_lowercase().contains("key") || refused.contains("authentic"), "{refused}");
    let st = status_json(&d("s.sock"));
    assert_eq!(st["exit_index"], 0, "the secondary ran something: {st}");
    assert_eq!(st["role"], "secondary");
    drop(sec);

    // Mismatched memory size: both ends refuse, naming it.
    let mut sec = common::ftvm();
    sec.args(["secondary", "--guest", "devices", "--memory-mib", "16", "--key-file", &k1, "--listen", &listen])
        .args(["--control", &d("s2.sock")]);
    let sec = Proc::spawn(sec);
    sec.wait_stderr("waiting for the primary", Duration::from_secs(20));
    let mut pri = common::ftvm();
    pri.args(["primary", "--guest", "devices", "--memory-mib", "8", "--key-file", &k1, "--peer", &listen])
        .args(["--control", &d("p2.sock")]);
    let (pc, plines) = Proc::spawn(pri).finish(Duration::from_secs(30));
    let (sc, slines) = sec.finish(Duration::from_secs(30));
    assert_eq!(pc, Some(1), "{plines:?}");
    assert_eq!(sc, Some(1), "{slines:?}");
    assert!(plines.last().unwrap().contains("memory"), "{plines:?}");
    assert!(slines.last().unwrap().contains("memory"), "{slines:?}");
}

/// A pair in a lab: primary on host a (TAP), secondary on host b, the
/// logging channel over the dedicated link.
struct LabPair {
    primary: Proc,
    secondary: Proc,
    pcontrol: String,
    scontrol: String,
}

fn lab_pair(lab: &Lab, dir: &std::path::Path, extra_secondary: &[&str]) -> LabPair {
    let cidr = lab.guest_cidr();
    lab_pair_of(
        lab,
        dir,
        &["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr, "--digest-every", "500"],
        extra_secondary,
    )
}

fn lab_pair_of(lab: &Lab, dir: &std::path::Path, guest: &[&str], extra_secondary: &[&str]) -> LabPair {
    let key = key_file(dir, "k");
    let d = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let mut sec = lab.host_b().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    sec.arg("secondary").args(guest).args(["--tap", lab.host_b().tap(), "--key-file", &key, "--listen", &listen]);
    sec.args(["--control", &d("s.sock"), "--state-dump", &d("s.dump")]).args(extra_secondary);
    let secondary = Proc::spawn(sec);
    secondary.wait_stderr("waiting for the primary", Duration::from_secs(20));
    let mut pri = lab.host_a().netns().command(env!("CARGO_BIN_EXE_ftvm"));
    pri.arg("primary").args(guest).args(["--tap", lab.host_a().tap(), "--key-file", &key, "--peer", &listen]);
    pri.args(["--control", &d("p.sock"), "--state-dump", &d("p.dump")]);
    let primary = Proc::spawn(pri);
    LabPair { primary, secondary, pcontrol: d("p.sock"), scontrol: d("s.sock") }
}

#[test]
fn kvm_netns_kvstore_pair_replays_a_randomized_workload_exactly() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    // Guest time the workload runs for (the issue asks for at least 60 s).
    let secs: u64 = std::env::var("FTVM_REPLAY_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let lab = Lab::pair("rp");
    let dir = tempfile::tempdir().unwrap();
    let pair = lab_pair(&lab, dir.path(), &[]);
    let ip = lab.guest_ip();

    // Several connections; mixed commands, random sizes, random pauses; a
    // model of the keyspace checks every reply.
    let workers: Vec<_> = (0..4u64)
        .map(|w| {
            let mut s = connect(&lab);
            std::thread::spawn(move || {
                let mut rng = w.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut model = std::collections::HashMap::<String, String>::new();
                let mut counter = 0i64;
                let end = Instant::now() + Duration::from_secs(secs);
                let mut ops = 0u64;
                while Instant::now() < end {
                    let key = format!("w{w}-k{}", next() % 50);
                    match next() % 5 {
                        0 | 1 => {
                            let len = (next() % 4096) as usize;
                            let val: String =
                                (0..len).map(|i| (b'a' + ((i as u64 + next()) % 26) as u8) as char).collect();
                            s.get_mut().write_all(&resp(&["SET", &key, &val])).unwrap();
                            assert_eq!(reply(&mut s), "+OK\r\n");
                            model.insert(key, val);
                        }
                        2 => {
                            s.get_mut().write_all(&resp(&["GET", &key])).unwrap();
                            let want = match model.get(&key) {
                                Some(v) => format!("${}\r\n{v}\r\n", v.len()),
                                None => "$-1\r\n".into(),
                            };
                            assert_eq!(reply(&mut s), want, "GET {key}");
                        }
                        3 => {
                            let ck = format!("w{w}-counter");
                            s.get_mut().write_all(&resp(&["INCR", &ck])).unwrap();
                            counter += 1;
                            assert_eq!(reply(&mut s), format!(":{counter}\r\n"));
                        }
                        _ => {
                            s.get_mut().write_all(&resp(&["DEL", &key])).unwrap();
                            let want = if model.remove(&key).is_some() { ":1\r\n" } else { ":0\r\n" };
                            assert_eq!(reply(&mut s), want, "DEL {key}");
                        }
                    }
                    ops += 1;
                    if next() % 8 == 0 {
                        std::thread::sleep(Duration::from_millis(next() % 40));
                    }
                }
                ops
            })
        })
        .collect();

    // Mid-run, both processes report sensible status.
    std::thread::sleep(Duration::from_secs(secs.min(5)));
    let ps = status_json(&pair.pcontrol);
    let ss = status_json(&pair.scontrol);
    assert_eq!((ps["role"].as_str(), ps["peer"].as_str()), (Some("primary"), Some("up")), "{ps}");
    assert_eq!((ss["role"].as_str(), ss["peer"].as_str()), (Some("secondary"), Some("up")), "{ss}");
    assert!(ps["exit_index"].as_u64().unwrap() > 0 && ps["log_position"].as_u64().unwrap() > 0, "{ps}");
    assert_eq!(ss["divergences"], 0, "{ss}");
    for key in ["state", "acked_position", "released_position", "replay_lag_records", "outputs_held", "last_failure"] {
        assert!(ps.get(key).is_some() && ss.get(key).is_some(), "status lacks {key}: {ps} / {ss}");
    }

    let ops: u64 = workers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(ops > 100, "only {ops} operations in {secs} s");
    // SHUTDOWN: the guest powers off at the same exit on both hosts.
    let mut s = connect(&lab);
    s.get_mut().write_all(&resp(&["SHUTDOWN"])).unwrap();
    let (pc, plines) = pair.primary.finish(Duration::from_secs(60));
    let (sc, slines) = pair.secondary.finish(Duration::from_secs(120));
    assert_eq!(pc, Some(0), "primary: {plines:?}");
    assert_eq!(sc, Some(0), "secondary (a divergence ends it with status 1): {slines:?}");
    let p = std::fs::read(dir.path().join("p.dump")).unwrap();
    let sd = std::fs::read(dir.path().join("s.dump")).unwrap();
    assert!(p == sd, "after {ops} operations the secondary's memory or vCPU state differs from the primary's");
    let _ = ip;
}

#[test]
fn kvm_netns_outputs_wait_for_acks_while_the_vcpu_runs_on() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("or");
    let dir = tempfile::tempdir().unwrap();
    // Every ack held 400 ms.
    let pair = lab_pair(&lab, dir.path(), &["--ack-delay-ms", "400"]);
    let mut s = connect(&lab);
    // The reply to a request cannot leave before the request's frame is
    // acknowledged: every round trip takes at least the ack delay.
    for _ in 0..3 {
        let start = Instant::now();
        s.get_mut().write_all(&resp(&["PING"])).unwrap();
        assert_eq!(reply(&mut s), "+PONG\r\n");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(390), "a reply left after {took:?}, before its ack");
    }
    // While a reply is held, the guest keeps running: its exit index moves.
    s.get_mut().write_all(&resp(&["PING"])).unwrap();
    let sent = Instant::now();
    let first = status_json(&pair.pcontrol);
    let (mut held_seen, mut advanced) = (false, false);
    while sent.elapsed() < Duration::from_millis(300) {
        let now = status_json(&pair.pcontrol);
        held_seen |= now["outputs_held"].as_u64().unwrap_or(0) > 0;
        advanced |= now["exit_index"].as_u64() > first["exit_index"].as_u64();
    }
    assert!(held_seen, "no output was ever reported held while its ack was delayed");
    assert!(advanced, "the vCPU did not advance while an output waited for its ack");
    assert_eq!(reply(&mut s), "+PONG\r\n");
    drop(pair);
}

#[test]
fn kvm_netns_streamer_pair_replays_exactly_and_the_client_sees_every_datagram() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("sp");
    let dir = tempfile::tempdir().unwrap();
    let client_ip = lab.client_ip();
    let sock = lab.client().run(move || std::net::UdpSocket::bind((client_ip, 5004)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cidr = lab.guest_cidr();
    let dest = format!("dest={client_ip}:5004");
    // 3000 datagrams at 1000/s, then the guest powers off by itself: the
    // same exit on both hosts.
    let guest =
        ["--guest", "streamer", "--ip", &cidr, "--param", &dest, "--param", "rate=1000", "--param", "count=3000"];
    let guest: Vec<&str> = guest.iter().copied().chain(["--digest-every", "200"]).collect();
    let pair = lab_pair_of(&lab, dir.path(), &guest, &[]);
    let mut buf = [0u8; 2048];
    for want in 0..3000u64 {
        let n = sock.recv(&mut buf).expect("datagram");
        assert_eq!(n, 1316);
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), want, "gap or reordering");
    }
    let (pc, plines) = pair.primary.finish(Duration::from_secs(60));
    let (sc, slines) = pair.secondary.finish(Duration::from_secs(60));
    assert_eq!(pc, Some(0), "primary: {plines:?}");
    assert_eq!(sc, Some(0), "secondary: {slines:?}");
    let p = std::fs::read(dir.path().join("p.dump")).unwrap();
    let sd = std::fs::read(dir.path().join("s.dump")).unwrap();
    assert!(p == sd, "the secondary's final memory or vCPU state differs from the primary's");
}
