//! `ftvm-bench lockstep`: what protection costs, side by side in one run on
//! one machine: kvstore under the same redis-benchmark load (1) unprotected,
//! (2) protected with the secondary over loopback, (3) protected with the
//! secondary in another namespace across a veth link; a CPU-bound guest's
//! run time unprotected vs protected; log bandwidth; replay lag.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_demo::Proc;
use ftvm_lab::{Lab, Netns};

use crate::net::{redis_benchmark, RedisFigure};

/// An `ftvm` process of the benchmark (killed on drop, as its [`Proc`]);
/// its stdout lines on a channel.
struct Vmm {
    proc: Proc,
    lines: mpsc::Receiver<String>,
}

impl Vmm {
    fn spawn(ns: &Netns, args: &[String], trace: Option<&std::path::Path>) -> Result<Vmm> {
        let exe = ftvm_demo::ftvm_exe()?;
        let mut cmd = ns.command(exe);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        if let Some(trace) = trace {
            cmd.env("FTVM_COST_TRACE", trace);
        }
        let mut proc = Proc::spawn(&mut cmd).context("cannot start ftvm")?;
        let out = proc.0.stdout.take().context("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Vmm { proc, lines })
    }

    fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        crate::net::wait_line(&self.lines, prefix, timeout)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.proc.0.try_wait()? {
                return Ok(s.code());
            }
            if Instant::now() > deadline {
                bail!("an ftvm process did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    Unprotected,
    Loopback,
    Link,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Unprotected => "unprotected",
            Setup::Loopback => "protected, secondary over loopback",
            Setup::Link => "protected, secondary across a veth link",
        }
    }
}

/// Start `guest` in `setup`; returns (primary, secondary, primary control).
fn start(
    lab: &Lab,
    dir: &std::path::Path,
    setup: Setup,
    guest: &[String],
    tag: &str,
    trace: Option<&std::path::Path>,
) -> Result<(Vmm, Option<Vmm>, String)> {
    let key = dir.join("key").to_string_lossy().into_owned();
    let pctl = dir.join(format!("{tag}-p.sock")).to_string_lossy().into_owned();
    let sctl = dir.join(format!("{tag}-s.sock")).to_string_lossy().into_owned();
    let a = lab.host_a();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    if setup == Setup::Unprotected {
        let mut args = s(&["run", "--tap", a.tap()]);
        args.extend_from_slice(guest);
        return Ok((Vmm::spawn(a.netns(), &args, None)?, None, pctl));
    }
    let (ns, listen) = match setup {
        Setup::Loopback => (a.netns(), "127.0.0.1:7000".to_string()),
        _ => (lab.host_b().netns(), format!("{}:7000", lab.host_b().link_ip())),
    };
    let mut sargs = s(&["secondary", "--tap", a.tap(), "--key-file", &key, "--listen", &listen, "--control", &sctl]);
    sargs.extend_from_slice(guest);
    let secondary = Vmm::spawn(ns, &sargs, trace)?;
    let mut pargs = s(&["primary", "--tap", a.tap(), "--key-file", &key, "--peer", &listen, "--control", &pctl]);
    pargs.extend_from_slice(guest);
    let primary = Vmm::spawn(a.netns(), &pargs, trace)?;
    Ok((primary, Some(secondary), pctl))
}

/// A pair process's status, `None` while its control socket does not answer.
fn status(control: &str) -> Option<serde_json::Value> {
    pair::control::query(std::path::Path::new(control)).ok()
}

struct KvRow {
    setup: Setup,
    figures: Vec<RedisFigure>,
    log_bytes: u64,
    wire_bytes: u64,
    records: u64,
    seconds: f64,
    max_lag: u64,
}

fn kvstore_run(
    lab: &Lab,
    dir: &std::path::Path,
    setup: Setup,
    requests: u64,
    clients: u32,
    trace: Option<&std::path::Path>,
) -> Result<KvRow> {
    let cidr = lab.guest_cidr();
    let guest: Vec<String> =
        ["--guest", "kvstore", "--ip", &cidr, "--memory-mib", "64"].iter().map(|s| s.to_string()).collect();
    let tag = format!("kv{}{}", setup as u8, if trace.is_some() { "t" } else { "" });
    let (mut primary, secondary, pctl) = start(lab, dir, setup, &guest, &tag, trace)?;
    primary.wait_line("kvstore: listening", Duration::from_secs(60))?;
    let before = status(&pctl);
    // Sample the secondary's replay lag while the load runs.
    let sctl = pctl.replace("-p.sock", "-s.sock");
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (flag, sctl2) = (sampling.clone(), sctl.clone());
    let sampler = std::thread::spawn(move || {
        let mut max = 0u64;
        while flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(v) = status(&sctl2) {
                max = max.max(v["replay_lag_records"].as_u64().unwrap_or(0));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        max
    });
    let start = Instant::now();
    let (figures, _) = redis_benchmark(lab, lab.guest_ip(), requests, clients)?;
    let seconds = start.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let max_lag = sampler.join().unwrap_or(0);
    let after = status(&pctl);
    let get = |v: &Option<serde_json::Value>, k: &str| v.as_ref().and_then(|v| v[k].as_u64()).unwrap_or(0);
    let row = KvRow {
        setup,
        figures,
        log_bytes: get(&after, "log_bytes").saturating_sub(get(&before, "log_bytes")),
        wire_bytes: get(&after, "log_wire_bytes").saturating_sub(get(&before, "log_wire_bytes")),
        records: get(&after, "log_position").saturating_sub(get(&before, "log_position")),
        seconds,
        max_lag,
    };
    shutdown_guest(lab);
    primary.wait_exit(Duration::from_secs(30))?;
    if let Some(mut s) = secondary {
        s.wait_exit(Duration::from_secs(60))?;
    }
    Ok(row)
}

/// Send kvstore SHUTDOWN without waiting for an answer: the guest powers
/// off, and nobody will close the connection.
fn shutdown_guest(lab: &Lab) {
    let ip = lab.guest_ip();
    lab.client().run(move || {
        use std::io::Write;
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(5)) {
            let _ = s.write_all(b"*1\r\n$8\r\nSHUTDOWN\r\n");
        }
    });
}

/// The CPU-bound guest's run time as it measures it itself (guest clock,
/// first to last reading): process start-up and the pair's handshake are
/// not part of what protection costs a running guest.
fn crunch_run(lab: &Lab, dir: &std::path::Path, setup: Setup) -> Result<f64> {
    let guest: Vec<String> = ["--guest", "crunch", "--memory-mib", "16"].iter().map(|s| s.to_string()).collect();
    let (mut primary, secondary, _) = start(lab, dir, setup, &guest, &format!("cr{}", setup as u8), None)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let took = loop {
        let line = primary
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("the crunch guest printed no result")?;
        if let Some(ms) =
            line.strip_prefix("crunch: ").and_then(|l| l.rsplit(", ").next()).and_then(|t| t.strip_suffix(" ms"))
        {
            break ms.parse::<f64>()? / 1000.0;
        }
    };
    let code = primary.wait_exit(Duration::from_secs(60))?;
    if code != Some(0) {
        bail!("the crunch guest ended with status {code:?} ({})", setup.name());
    }
    if let Some(mut s) = secondary {
        s.wait_exit(Duration::from_secs(120))?;
    }
    Ok(took)
}

/// `ftvm-bench lockstep`.
pub fn lockstep(requests: u64, clients: u32, json: bool, with_breakdown: bool) -> Result<()> {
    let rps = |r: &KvRow, t: &str| r.figures.iter().find(|f| f.test == t).map_or(f64::NAN, |f| f.rps);
    let mut breakdown_rps = f64::NAN;
    let lab = Lab::pair("blk");
    let dir = tempfile_dir()?;
    ftvm_demo::write_key(&dir.join("key"))?;
    let mut rtts: Vec<f64> = (0..20)
        .filter_map(|_| lab.host_a().netns().ping(lab.host_b().link_ip(), Duration::from_secs(1)))
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    rtts.sort_by(f64::total_cmp);
    let rtt_us = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN);

    let mut rows = Vec::new();
    for setup in [Setup::Unprotected, Setup::Loopback, Setup::Link] {
        eprintln!("kvstore, {}: redis-benchmark -t set,get -n {requests} -c {clients}", setup.name());
        rows.push(kvstore_run(&lab, &dir, setup, requests, clients, None)?);
    }
    // The breakdown comes from a run of its own: timing costs a little.
    let mut breakdown = Vec::new();
    if with_breakdown {
        eprintln!("kvstore, protected across the link, timed per stage (FTVM_COST_TRACE)");
        let trace = dir.join("cost-trace");
        let row = kvstore_run(&lab, &dir, Setup::Link, requests, clients, Some(&trace))?;
        breakdown = read_breakdown(&trace)?;
        breakdown_rps = (rps(&row, "SET") + rps(&row, "GET")) / 2.0;
    }
    eprintln!("CPU-bound guest (crunch): unprotected, then protected across the link");
    let cpu_plain = crunch_run(&lab, &dir, Setup::Unprotected)?;
    let cpu_prot = crunch_run(&lab, &dir, Setup::Link)?;
    let _ = std::fs::remove_dir_all(&dir);

    let p50 = |r: &KvRow, t: &str| r.figures.iter().find(|f| f.test == t).map_or(f64::NAN, |f| f.p50_ms);
    let p99 = |r: &KvRow, t: &str| r.figures.iter().find(|f| f.test == t).map_or(f64::NAN, |f| f.p99_ms);
    let mean_rps = |r: &KvRow| (rps(r, "SET") + rps(r, "GET")) / 2.0;
    let ops = 2.0 * requests as f64;
    let link = &rows[2];
    let ratio = mean_rps(link) / mean_rps(&rows[0]);
    let added_us = (p50(link, "SET") - p50(&rows[0], "SET")) * 1000.0;
    let bytes_per_op = link.log_bytes as f64 / ops;
    let cpu_ratio = cpu_plain / cpu_prot;
    if json {
        let v = serde_json::json!({
            "link_rtt_us": rtt_us,
            "kvstore": rows.iter().map(|r| serde_json::json!({
                "setup": r.setup.name(), "figures": r.figures, "log_bytes": r.log_bytes, "log_wire_bytes": r.wire_bytes, "records": r.records,
                "seconds": r.seconds, "max_replay_lag_records": r.max_lag })).collect::<Vec<_>>(),
            "cpu_bound_seconds": {"unprotected": cpu_plain, "protected": cpu_prot},
            "targets": {
                "throughput_ratio": {"measured": ratio, "target_2_core": TARGET_RATIO_2_CORE, "target_16_core": TARGET_RATIO_16_CORE},
                "added_p50_us": {"measured": added_us, "target": rtt_us + 50.0},
                "crunch_ratio": {"measured": cpu_ratio, "target": TARGET_CRUNCH_RATIO},
                "log_bytes_per_op": {"measured": bytes_per_op, "target": TARGET_BYTES_PER_OP},
            },
            "breakdown": breakdown.iter().map(|b| serde_json::json!({
                "role": b.role, "stage": b.stage, "count": b.count, "p50_us": b.p50_us, "mean_us": b.mean_us,
                "max_us": b.max_us })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("lockstep cost: kvstore under redis-benchmark -t set,get -n {requests} -c {clients} (client namespace)");
    println!("dedicated link round trip (ICMP, median of 20): {rtt_us:.0} µs");
    println!();
    println!(
        "{:<42} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>9}",
        "setup", "SET/s", "p50 ms", "p99 ms", "GET/s", "p50 ms", "p99 ms", "vs unprot"
    );
    for r in &rows {
        println!(
            "{:<42} {:>9.0} {:>8.3} {:>8.3} {:>9.0} {:>8.3} {:>8.3} {:>8.0}%",
            r.setup.name(),
            rps(r, "SET"),
            p50(r, "SET"),
            p99(r, "SET"),
            rps(r, "GET"),
            p50(r, "GET"),
            p99(r, "GET"),
            100.0 * mean_rps(r) / mean_rps(&rows[0])
        );
    }
    println!();
    for r in rows.iter().skip(1) {
        let bits = r.log_bytes as f64 * 8.0 / r.seconds;
        println!(
            "{}: log {:.2} Mbit/s at {:.0} ops/s, {:.1} bytes per record, {:.2} records per op, {:.1} bytes per op \
             ({:.1} with the frames' headers, CRCs and MACs), replay lag max {} records",
            r.setup.name(),
            bits / 1e6,
            ops / r.seconds,
            r.log_bytes as f64 / r.records.max(1) as f64,
            r.records as f64 / ops,
            r.log_bytes as f64 / ops,
            r.wire_bytes as f64 / ops,
            r.max_lag
        );
    }
    println!("CPU-bound guest (crunch): {cpu_plain:.2} s unprotected, {cpu_prot:.2} s protected across the link");
    println!();
    println!("issue 16 targets (protected across the link vs unprotected, this run):");
    println!("{:<44} {:>12} {:>26}", "figure", "measured", "target");
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "{:<44} {:>12.2} {:>26}  {}",
        "throughput, protected / unprotected",
        ratio,
        format!("≥ {TARGET_RATIO_2_CORE:.2} (2-core), ≥ {TARGET_RATIO_16_CORE:.2} (16-core)"),
        verdict(ratio >= TARGET_RATIO_2_CORE)
    );
    println!(
        "{:<44} {:>12.0} {:>26}  {}",
        "added p50 latency, SET (µs)",
        added_us,
        format!("≤ RTT + 50 = {:.0}", rtt_us + 50.0),
        verdict(added_us <= rtt_us + 50.0)
    );
    println!(
        "{:<44} {:>12.3} {:>26}  {}",
        "CPU-bound guest, protected / unprotected",
        cpu_ratio,
        format!("≥ {TARGET_CRUNCH_RATIO:.2}"),
        verdict(cpu_ratio >= TARGET_CRUNCH_RATIO)
    );
    println!(
        "{:<44} {:>12.1} {:>26}  {}",
        "log bytes per kvstore operation",
        bytes_per_op,
        format!("≤ {TARGET_BYTES_PER_OP:.0}"),
        verdict(bytes_per_op <= TARGET_BYTES_PER_OP)
    );
    println!(
        "{:<44} {:>12.2} {:>26}",
        "log records per kvstore operation",
        link.records as f64 / ops,
        "(1.2 before issue 16)"
    );
    if !breakdown.is_empty() {
        println!();
        println!(
            "where the time goes (a timed run of its own, protected across the link, {breakdown_rps:.0} ops/s; \
             FTVM_COST_TRACE):"
        );
        println!("{:<10} {:<16} {:>9} {:>9} {:>9} {:>9}", "role", "stage", "count", "p50 µs", "mean µs", "max µs");
        for b in &breakdown {
            println!(
                "{:<10} {:<16} {:>9} {:>9.1} {:>9.1} {:>9.0}",
                b.role, b.stage, b.count, b.p50_us, b.mean_us, b.max_us
            );
        }
    }
    println!();
    println!("VMware FT for reference: 0.94–0.99 of unprotected throughput, 18 Mbit/s of log at its operation rate");
    Ok(())
}

/// Issue 16's targets.
const TARGET_RATIO_2_CORE: f64 = 0.60;
const TARGET_RATIO_16_CORE: f64 = 0.90;
const TARGET_CRUNCH_RATIO: f64 = 0.98;
const TARGET_BYTES_PER_OP: f64 = 60.0;

/// One stage's line of an `FTVM_COST_TRACE` file.
struct Breakdown {
    role: String,
    stage: String,
    count: u64,
    p50_us: f64,
    mean_us: f64,
    max_us: f64,
}

/// The lines both VMMs appended to `path` (see `replication::cost`).
fn read_breakdown(path: &std::path::Path) -> Result<Vec<Breakdown>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("no timing from the VMMs in {}", path.display()))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [role, stage, count, p50, mean, max] = f[..] else { bail!("a timing line of another form: {line:?}") };
        out.push(Breakdown {
            role: role.to_string(),
            stage: stage.to_string(),
            count: count.parse()?,
            p50_us: p50.parse()?,
            mean_us: mean.parse()?,
            max_us: max.parse()?,
        });
    }
    Ok(out)
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("ftvm-bench-lockstep-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
