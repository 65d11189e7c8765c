//! `--metrics ADDR`: the Prometheus endpoint of a running protected pair,
//! scraped over HTTP and checked with real parsers of both formats it
//! serves: `promtool check metrics` (Debian's `prometheus`) for the classic
//! text, the `prometheus_client` Python package's OpenMetrics parser
//! (Debian's `python3-prometheus-client`) for OpenMetrics. The values must
//! follow the pair: roles, guest exits, ack round trips, heartbeats, and
//! the failover once the primary is killed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{connect_kvstore, failover_pair_of, reply, resp};
use ftvm_lab as lab;
use lab::Lab;

const METRICS: &str = "127.0.0.1:9464";

/// GET /metrics from inside `netns`; `openmetrics` sets the Accept header
/// Prometheus sends. Returns (status line, content type, body).
fn scrape(netns: &lab::Netns, openmetrics: bool) -> (String, String, String) {
    netns.run(move || {
        let mut s = TcpStream::connect(METRICS).expect("connect to the metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let accept = if openmetrics { "application/openmetrics-text; version=1.0.0,text/plain;q=0.5" } else { "*/*" };
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {METRICS}\r\nAccept: {accept}\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.lines().next().unwrap_or("").to_string();
        let ctype = head.lines().find_map(|l| l.strip_prefix("Content-Type: ")).unwrap_or("").to_string();
        (status, ctype, body.to_string())
    })
}

/// `program args` with `input` on stdin: (success, stdout + stderr).
fn check_with(program: &str, args: &[&str], input: &str) -> (bool, String) {
    lab::require_tool(program);
    let mut child = lab::spawn(
        Command::new(program).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()),
    );
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Both formats pass their parsers; the classic text is returned.
fn scrape_and_check(netns: &lab::Netns) -> String {
    let (status, ctype, classic) = scrape(netns, false);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let (ok, out) = check_with("promtool", &["check", "metrics"], &classic);
    assert!(ok, "promtool check metrics refused the endpoint's text:\n{out}\n{classic}");
    let (status, ctype, om) = scrape(netns, true);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    let parse = "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
                 print(len(list(p(sys.stdin.read()))))";
    // Debian's python3 (its package), not whatever python3 comes first on PATH.
    let (ok, out) = check_with("/usr/bin/python3", &["-c", parse], &om);
    assert!(ok, "the OpenMetrics parser refused the endpoint's text (python3-prometheus-client):\n{out}\n{om}");
    classic
}

/// The value of the sample `name` (with its labels, as written).
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[test]
fn kvm_netns_metrics_of_a_pair_pass_promtool_and_follow_a_failover() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let lab = Lab::pair("mx");
    let cidr = lab.guest_cidr();
    let guest = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr, "--metrics", METRICS];
    let (mut primary, secondary, dir) = failover_pair_of(&lab, &guest);
    let mut s = connect_kvstore(&lab);
    for i in 0..50 {
        s.get_mut().write_all(&resp(&["SET", &format!("k{i}"), "v"])).unwrap();
        assert_eq!(reply(&mut s), "+OK\r\n");
    }
    let p = scrape_and_check(lab.host_a().netns());
    assert_eq!(value(&p, "ftvm_role{role=\"primary\"}"), 1.0);
    assert_eq!(value(&p, "ftvm_peer_up"), 1.0);
    assert!(value(&p, "ftvm_guest_exits_total") > 0.0, "{p}");
    assert!(value(&p, "ftvm_log_records_total") > 0.0, "{p}");
    assert!(value(&p, "ftvm_log_bytes_total") > 0.0, "{p}");
    // Every SET's reply waited for an ack: round trips were timed.
    assert!(value(&p, "ftvm_ack_round_trip_seconds_count") >= 1.0, "{p}");
    assert!(value(&p, "ftvm_ack_round_trip_seconds_bucket{le=\"+Inf\"}") >= 1.0, "{p}");
    let (sum, count) = (value(&p, "ftvm_ack_round_trip_seconds_sum"), value(&p, "ftvm_ack_round_trip_seconds_count"));
    assert!(sum > 0.0 && sum / count < 5.0, "a mean round trip of {} s", sum / count);
    eprintln!("metrics: {count} ack round trips, mean {:.3} ms", sum / count * 1e3);
    assert!(value(&p, "ftvm_heartbeats_total{kind=\"sent\"}") > 0.0, "{p}");
    assert_eq!(value(&p, "ftvm_failures_total{kind=\"secondary lost\"}"), 0.0);
    let sec = scrape_and_check(lab.host_b().netns());
    assert_eq!(value(&sec, "ftvm_role{role=\"secondary\"}"), 1.0);
    assert!(value(&sec, "ftvm_log_records_total") > 0.0, "replayed: {sec}");
    assert!(value(&sec, "ftvm_heartbeats_total{kind=\"accepted\"}") > 0.0, "{sec}");

    // The primary dies; the secondary goes live and says so in its metrics.
    primary.0.kill().unwrap();
    let _ = primary.0.wait();
    s.get_mut().write_all(&resp(&["SET", "after", "v"])).unwrap();
    assert_eq!(reply(&mut s), "+OK\r\n", "the client's write after the failover");
    let sock = dir.path().join("s.sock");
    let st = common::status_json(sock.to_str().unwrap());
    assert_eq!(st["role"], "standalone", "{st}");
    let sec = scrape_and_check(lab.host_b().netns());
    assert_eq!(value(&sec, "ftvm_role{role=\"standalone\"}"), 1.0, "{sec}");
    assert_eq!(value(&sec, "ftvm_role{role=\"secondary\"}"), 0.0, "{sec}");
    assert_eq!(value(&sec, "ftvm_failures_total{kind=\"primary lost\"}"), 1.0, "{sec}");
    let outage = value(&sec, "ftvm_last_failure_outage_seconds");
    let from_status = st["last_failure"]["outage_ms"].as_f64().unwrap() / 1e3;
    assert!((outage - from_status).abs() < 1e-9, "metrics {outage} s, status {from_status} s");
    drop(secondary);
}

#[test]
fn kvm_run_with_metrics_refuses_a_taken_port_before_the_guest_runs() {
    if !common::kvm() {
        return;
    }
    // A port already taken: one error line at start, status 1, no guest run.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = common::run(&["run", "--guest", "hello", "--metrics", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let line = common::one_error_line(&out);
    assert!(line.contains(&format!("--metrics {addr}: cannot listen")), "{line}");
    assert!(out.stdout.is_empty(), "the guest ran: {}", String::from_utf8_lossy(&out.stdout));
}
