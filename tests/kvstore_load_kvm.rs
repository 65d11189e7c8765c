//! `kvstore` under real clients' load, on real KVM, TAP devices and network
//! namespaces (issue 11): redis-benchmark at the 64 connections kvstore
//! advertises, pipelined (`-P 16`) and with 4 KiB values, every command it
//! implements; `redis-cli --pipe` of 200 000 SETs within a generous bound;
//! unprotected and protected; a 65th connection refused with Redis's error;
//! SHUTDOWN closing every connection before the guest powers off; values at
//! the bulk-length limit; gratuitous ARPs when a guest boots.
//!
//! redis-benchmark finishes a test only once every request of it has been
//! answered, so a run that completes is a run where nothing was lost; a run
//! that stalls is killed at its bound and fails the test.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{resp, Running};
use ftvm_lab as lab;
use lab::Lab;

fn ready() -> bool {
    common::kvm() && lab::require_root()
}

/// Memory for the guests here: 200 000 keys need about 16 MiB of keyspace.
const MEMORY_MIB: &str = "128";
/// The connections kvstore serves by default.
const CLIENTS: usize = 64;
/// Keys SET by the `--pipe` tests.
const PIPE_KEYS: usize = 200_000;
/// Bound on one `--pipe` of [`PIPE_KEYS`] SETs. Generous: the debug VMM on a
/// shared 2-core machine, protected, takes a few seconds; before the guest
/// heap was fixed 100 000 took minutes and 200 000 would take far longer.
const PIPE_BOUND: Duration = Duration::from_secs(180);
/// Bound on one redis-benchmark run (a stalled one never ends).
const BENCH_BOUND: Duration = Duration::from_secs(240);

/// kvstore run unprotected on host a's TAP; killed on drop.
fn boot_unprotected(lab: &Lab, extra: &[&str]) -> Running {
    boot_on(lab, lab.host_a(), extra)
}

/// kvstore run unprotected on `host`'s TAP; killed on drop.
fn boot_on(lab: &Lab, host: &lab::LabHost, extra: &[&str]) -> Running {
    let cidr = lab.guest_cidr();
    let mut cmd = host.netns().command(env!("CARGO_BIN_EXE_ftvm"));
    cmd.args(["run", "--tap", host.tap(), "--guest", "kvstore", "--memory-mib", MEMORY_MIB, "--ip", &cidr]);
    cmd.args(extra);
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
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
    let vm = Running { child, lines };
    vm.expect_line(&format!("kvstore: listening on {}:6379", lab.guest_ip()), Duration::from_secs(60));
    vm
}

/// A protected kvstore pair (with an arbiter), ready: a connection was
/// answered (and closed again, so that it takes none of the 64 places).
fn boot_protected(lab: &Lab) -> (common::Proc, common::Proc, tempfile::TempDir) {
    let cidr = lab.guest_cidr();
    // One second of silence before a peer is dead, not the default 50 ms:
    // this is a test of kvstore under protection, and on a shared 2-core
    // machine under this load the default's margin was crossed (a false
    // "secondary lost" in two runs of six, the primary then going on alone).
    let guest = ["--guest", "kvstore", "--memory-mib", MEMORY_MIB, "--ip", &cidr, "--dead-after", "100"];
    let pair = common::failover_pair_of(lab, &guest);
    let mut s = common::connect_kvstore(lab);
    s.get_mut().write_all(&resp(&["PING"])).unwrap();
    assert_eq!(common::reply(&mut s), "+PONG\r\n");
    pair
}

/// Runs `cmd` to completion, feeding it `stdin`; kills it and fails past
/// `bound`.
fn run_bounded(mut cmd: Command, stdin: Vec<u8>, bound: Duration, what: &str) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    // A client that stalls stops reading its stdin: the writer then blocks
    // until the kill below closes the pipe.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait()));
    let status = match rx.recv_timeout(bound) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            // `ip netns exec` execs the program: the pid is the client's.
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            let stdout = t_out.join().unwrap();
            panic!(
                "{what} did not finish within {bound:?} (stalled); it printed: {}",
                String::from_utf8_lossy(&stdout)
            );
        }
    };
    writer.join().unwrap();
    Output { status, stdout: t_out.join().unwrap(), stderr: t_err.join().unwrap() }
}

/// `redis-benchmark -c 64 --csv ARGS -t TESTS` from the client; every test
/// must complete (each of its requests answered) within [`BENCH_BOUND`].
/// Returns each test's requests per second.
fn benchmark(lab: &Lab, tests: &[&str], args: &[&str]) -> Vec<(String, f64)> {
    let ip = lab.guest_ip().to_string();
    let mut cmd = lab.client().command("redis-benchmark");
    cmd.args(["-h", &ip, "-p", "6379", "-c", &CLIENTS.to_string(), "--csv", "-t", &tests.join(",")]).args(args);
    let what = format!("redis-benchmark -c {CLIENTS} -t {} {}", tests.join(","), args.join(" "));
    let out = run_bounded(cmd, Vec::new(), BENCH_BOUND, &what);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{what}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    // "SET","41407.87","1.1",...: one row per test, written when it ended.
    let rows: Vec<(String, f64)> = stdout
        .lines()
        .filter_map(|line| {
            let mut cells = line.split(',').map(|c| c.trim_matches('"'));
            let name = cells.next()?.to_string();
            let rps = cells.next()?.parse().ok()?;
            Some((name, rps))
        })
        .collect();
    for test in tests {
        let want = if *test == "ping" { "PING_INLINE".to_string() } else { test.to_uppercase() };
        assert!(
            rows.iter().any(|(name, rps)| name.starts_with(&want) && *rps > 0.0),
            "{what}: no completed {want} test in\n{stdout}"
        );
    }
    eprintln!("{what}: {rows:?}");
    rows
}

/// The RESP of `count` SETs `pipe:<i>` = `v<i>`.
fn pipe_input(count: usize) -> Vec<u8> {
    let mut input = Vec::with_capacity(count * 48);
    for i in 0..count {
        input.extend_from_slice(&resp(&["SET", &format!("pipe:{i}"), &format!("v{i}")]));
    }
    input
}

/// `redis-cli --pipe` of [`PIPE_KEYS`] SETs within [`PIPE_BOUND`], every one
/// answered OK, into an emptied keyspace; then the keys are there. Returns
/// the time it took.
fn pipe_200k(lab: &Lab) -> Duration {
    assert_eq!(redis_cli(lab, &["FLUSHALL"]), "OK");
    let ip = lab.guest_ip().to_string();
    let mut cmd = lab.client().command("redis-cli");
    cmd.args(["-h", &ip, "-p", "6379", "--pipe"]);
    let start = Instant::now();
    let out = run_bounded(cmd, pipe_input(PIPE_KEYS), PIPE_BOUND, "redis-cli --pipe");
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "redis-cli --pipe: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("errors: 0, replies: {PIPE_KEYS}")), "redis-cli --pipe: {stdout}");
    eprintln!("redis-cli --pipe of {PIPE_KEYS} SETs: {took:?}");
    assert_eq!(redis_cli(lab, &["DBSIZE"]), PIPE_KEYS.to_string());
    let last = PIPE_KEYS - 1;
    assert_eq!(redis_cli(lab, &["GET", &format!("pipe:{last}")]), format!("v{last}"));
    took
}

fn redis_cli(lab: &Lab, args: &[&str]) -> String {
    let ip = lab.guest_ip().to_string();
    let out = lab.client().command("redis-cli").args(["-h", &ip, "-p", "6379"]).args(args).output().unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim_end_matches('\n').to_string()
}

/// A connection from the client to kvstore, with a read bound.
fn connect(lab: &Lab) -> std::net::TcpStream {
    let ip = lab.guest_ip();
    let s = lab.client().run(move || std::net::TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(10)));
    let s = s.expect("connect to kvstore");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until `want` bytes or EOF (bounded by the read timeout).
fn read_reply(s: &mut std::net::TcpStream, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        let n = s.read(&mut buf).expect("reply within the read timeout");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The five tests redis-benchmark has for what kvstore implements.
const ALL_TESTS: &[&str] = &["ping", "set", "get", "incr", "mset"];

#[test]
fn kvm_netns_kvstore_unprotected_serves_redis_benchmark_at_64_connections_pipelined_and_4k() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kvb");
    let _vm = boot_unprotected(&lab, &[]);
    // Two runs back to back: redis-benchmark closes its 64 connections and
    // opens 64 new ones between tests and between runs (the stall of the
    // issue: SYNs refused while the old sockets were closing).
    for _ in 0..2 {
        benchmark(&lab, ALL_TESTS, &["-n", "5000"]);
    }
    benchmark(&lab, &["set", "get"], &["-n", "50000", "-P", "16"]);
    benchmark(&lab, &["set", "get"], &["-n", "5000", "-d", "4096"]);
    assert_eq!(redis_cli(&lab, &["PING"]), "PONG", "kvstore still serves a new connection");
}

#[test]
fn kvm_netns_kvstore_unprotected_pipe_of_200k_sets_within_a_bound() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kvp");
    let _vm = boot_unprotected(&lab, &[]);
    pipe_200k(&lab);
}

#[test]
fn kvm_netns_kvstore_protected_serves_64_connections_pipelined_and_a_200k_pipe() {
    if !ready() {
        return;
    }
    let lab = Lab::pair("kvq");
    let (_primary, _secondary, dir) = boot_protected(&lab);
    benchmark(&lab, ALL_TESTS, &["-n", "3000"]);
    benchmark(&lab, &["set", "get"], &["-n", "20000", "-P", "16"]);
    pipe_200k(&lab);
    let logs = || {
        let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        format!("primary:\n{}\nsecondary:\n{}", log("primary.log"), log("secondary.log"))
    };
    let out = common::ftvm().args(["status", "--json", "--control"]).arg(dir.path().join("p.sock")).output().unwrap();
    assert!(out.status.success(), "the primary is gone: {}\n{}", String::from_utf8_lossy(&out.stderr), logs());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["role"], "primary", "still protected after the load: {status}\n{}", logs());
    assert_eq!(status["divergences"], 0, "{status}");
}

#[test]
fn kvm_netns_kvstore_refuses_a_65th_connection_with_redis_error() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kvc");
    let _vm = boot_unprotected(&lab, &[]);
    let mut conns: Vec<std::net::TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut s = connect(&lab);
            s.write_all(&resp(&["PING"])).unwrap();
            assert_eq!(read_reply(&mut s, 7), b"+PONG\r\n", "connection {i}");
            s
        })
        .collect();
    let mut extra = connect(&lab);
    // Read before writing: the error comes unasked, then the FIN.
    let got = read_reply(&mut extra, usize::MAX);
    assert_eq!(String::from_utf8_lossy(&got), "-ERR max number of clients reached\r\n");
    // The 64 are still served, and a place freed is taken again.
    for s in &mut conns {
        s.write_all(&resp(&["PING"])).unwrap();
        assert_eq!(read_reply(s, 7), b"+PONG\r\n");
    }
    // The FIN of the connection closed reaches kvstore before the SYN of
    // the next one, so its place is free by the time that one is open.
    drop(conns.pop());
    let mut again = connect(&lab);
    again.write_all(&resp(&["PING"])).unwrap();
    assert_eq!(read_reply(&mut again, 7), b"+PONG\r\n", "the freed place was not given to a new connection");
}

#[test]
fn kvm_netns_kvstore_shutdown_closes_every_connection_before_powering_off() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kvs");
    let mut vm = boot_unprotected(&lab, &[]);
    let mut idle = connect(&lab);
    idle.write_all(&resp(&["PING"])).unwrap();
    assert_eq!(read_reply(&mut idle, 7), b"+PONG\r\n");
    let mut asker = connect(&lab);
    asker.write_all(&resp(&["SHUTDOWN", "NOSAVE"])).unwrap();
    // Both see the connection end (EOF, not a read timeout): the asker gets
    // no reply, as with Redis, and the idle client is not left waiting.
    assert_eq!(read_reply(&mut asker, usize::MAX), b"", "the SHUTDOWN connection was not closed");
    assert_eq!(read_reply(&mut idle, usize::MAX), b"", "an idle connection was not closed");
    vm.expect_line("kvstore: SHUTDOWN, powering off (0 connections not closed)", Duration::from_secs(20));
    // ftvm's stdout closes when it exits.
    loop {
        match vm.lines.recv_timeout(Duration::from_secs(30)) {
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("ftvm did not exit after SHUTDOWN: {e}"),
        }
    }
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the guest powers off with status 0");
}

#[test]
fn kvm_netns_kvstore_values_up_to_the_bulk_limit_and_a_clear_error_past_it() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kvl");
    let _vm = boot_unprotected(&lab, &[]);
    // kvstore_resp::limits::MAX_BULK_LEN: 65 KiB.
    const LIMIT: usize = 64 * 1024 + 1024;
    let value = "x".repeat(LIMIT);
    let mut s = connect(&lab);
    s.write_all(&resp(&["SET", "big", &value])).unwrap();
    assert_eq!(read_reply(&mut s, 5), b"+OK\r\n");
    s.write_all(&resp(&["GET", "big"])).unwrap();
    let want = format!("${LIMIT}\r\n{value}\r\n");
    assert_eq!(read_reply(&mut s, want.len()), want.as_bytes(), "the value comes back whole");
    let mut s = connect(&lab);
    s.write_all(&resp(&["SET", "bigger", &"y".repeat(70 * 1000)])).unwrap();
    let got = read_reply(&mut s, usize::MAX);
    assert_eq!(String::from_utf8_lossy(&got), "-ERR Protocol error: invalid bulk length\r\n");
    assert_eq!(redis_cli(&lab, &["EXISTS", "bigger"]), "0", "nothing of the refused request was applied");
}

#[test]
fn kvm_netns_guest_sends_gratuitous_arps_when_it_boots() {
    if !ready() {
        return;
    }
    let lab = Lab::single("kva");
    // Listen on the client's side of the LAN before the guest exists.
    let ip = lab.guest_ip().octets();
    let capture = lab.client().capture(lab.client_dev());
    // A gratuitous ARP request for the guest's address: EtherType ARP, opcode 1 (request),
    // sender and target protocol address both the guest's (RFC 5227).
    let announces = |f: &lab::Frame| {
        f.ethertype() == 0x0806
            && f.bytes.get(20..22) == Some(&[0, 1][..])
            && f.bytes.get(28..32) == Some(&ip[..])
            && f.bytes.get(38..42) == Some(&ip[..])
    };
    // No client sends anything: whatever ARP arrives, the guest sent unasked.
    let _vm = boot_unprotected(&lab, &[]);
    let three = capture.wait_for(Duration::from_secs(30), |frames| frames.iter().filter(|f| announces(f)).count() >= 3);
    let frames = capture.stop();
    let seen = frames.iter().filter(|f| announces(f)).count();
    assert!(three && seen >= 3, "3 gratuitous ARPs expected after boot, saw {seen} among {} frames", frames.len());
}

#[test]
fn kvm_netns_guest_moved_to_another_host_is_reached_at_once() {
    if !ready() {
        return;
    }
    // The move: the guest ran on host a, the client talked to it (its
    // ARP cache and the LAN bridge learned the way to host a), then the same
    // guest (same name, so the same MAC and IP) starts on host b. Before
    // the boot announcements the client's first request waited 37 s to
    // 2 min 14 s for those entries to age out.
    let lab = Lab::pair("kvm");
    let on_a = boot_on(&lab, lab.host_a(), &[]);
    assert_eq!(redis_cli(&lab, &["PING"]), "PONG");
    drop(on_a);
    let _on_b = boot_on(&lab, lab.host_b(), &[]);
    let ip = lab.guest_ip();
    // One connection attempt: Linux retransmits the SYN after 1 s and 3 s,
    // so a bound of 15 s leaves room for a lost frame, not for aging.
    let connected =
        lab.client().run(move || std::net::TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(15)));
    let mut s = connected.expect("the moved guest was not reached within 15 s");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&resp(&["PING"])).unwrap();
    assert_eq!(read_reply(&mut s, 7), b"+PONG\r\n");
}

#[test]
fn kvm_netns_kvstore_protected_shutdown_closes_every_connection_and_both_copies_stop() {
    if !ready() {
        return;
    }
    let lab = Lab::pair("kvz");
    let (primary, secondary, _dir) = boot_protected(&lab);
    let mut idle = connect(&lab);
    idle.write_all(&resp(&["PING"])).unwrap();
    assert_eq!(read_reply(&mut idle, 7), b"+PONG\r\n");
    let mut asker = connect(&lab);
    asker.write_all(&resp(&["SHUTDOWN", "NOSAVE"])).unwrap();
    // The FINs are outputs: the primary releases them once the secondary
    // has the log up to them, before the guest's power-off ends both.
    assert_eq!(read_reply(&mut asker, usize::MAX), b"", "the SHUTDOWN connection was not closed");
    assert_eq!(read_reply(&mut idle, usize::MAX), b"", "an idle connection was not closed");
    for (name, mut copy) in [("primary", primary), ("secondary", secondary)] {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(copy.0.wait()));
        let status = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("the {name} did not stop"));
        assert_eq!(status.unwrap().code(), Some(0), "the {name}'s guest powered off with status 0");
    }
}

#[test]
fn kvm_netns_kvstore_a_connection_per_request_never_stalls() {
    if !ready() {
        return;
    }
    // `redis-benchmark -k 0` opens a connection per request, and opens the
    // next before it closes the last: 64 old, 64 new and 64 closing sockets
    // at once. With too few sockets in LISTEN its SYNs were answered with
    // resets and it waited forever. Now it either completes or, when it
    // holds more than the 64 connections kvstore serves, stops at once
    // with Redis's error for the extra ones (`--param clients=128` lets it
    // complete).
    let lab = Lab::single("kvk");
    let _vm = boot_unprotected(&lab, &[]);
    let ip = lab.guest_ip().to_string();
    for _ in 0..2 {
        let mut cmd = lab.client().command("redis-benchmark");
        cmd.args(["-h", &ip, "-p", "6379", "-c", "64", "-k", "0", "-n", "2000", "-t", "set", "--csv"]);
        let out = run_bounded(cmd, Vec::new(), BENCH_BOUND, "redis-benchmark -c 64 -k 0");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let completed = out.status.success() && text.lines().any(|l| l.starts_with("\"SET\""));
        let refused = text.contains("ERR max number of clients reached");
        assert!(completed || refused, "redis-benchmark -k 0 neither completed nor was refused:\n{text}");
    }
    assert_eq!(redis_cli(&lab, &["PING"]), "PONG");
}
