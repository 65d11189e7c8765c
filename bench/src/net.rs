//! `ftvm-bench kvstore` and `ftvm-bench streamer`: the network guests in a
//! lab of namespaces (crate `ftvm-lab`), measured with real clients, beside a
//! reference measured in the same run on the same lab.

use std::io::Write;
use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_lab::Lab;
use vmm::hook::InputSource;
use vmm::tap::Tap;
use vmm::vcpu::{RunOutcome, StopHandle};
use vmm::world::{LiveInput, LiveOutput};
use vmm::{BootSettings, Vm, VmConfig};

/// Serial output split into lines, each sent on a channel (and echoed to
/// stderr when `echo`).
struct LineSink {
    tx: Sender<String>,
    buf: Vec<u8>,
}

impl Write for LineSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.buf).into_owned();
                self.buf.clear();
                let _ = self.tx.send(line);
            } else {
                self.buf.push(b);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A guest running in this process on host a's TAP.
pub struct LabVm {
    stop: StopHandle,
    lines: Receiver<String>,
    thread: Option<std::thread::JoinHandle<Result<RunOutcome>>>,
}

impl LabVm {
    /// Boot `guest` with `params` on host a of `lab`, at the lab's guest IP.
    pub fn start(lab: &Lab, guest: &str, params: &[(&str, String)]) -> Result<LabVm> {
        let image = guest_images::find(guest).with_context(|| format!("guest {guest} is not embedded"))?;
        let host = lab.host_a();
        let tap_name = host.tap().to_string();
        // The TAP must be opened from inside the host's namespace; the fd
        // keeps that namespace afterwards.
        let tap = Arc::new(host.netns().run(move || Tap::open(&tap_name))?);
        let config = VmConfig {
            memory_mib: 64,
            elf: image.elf.to_vec(),
            boot: BootSettings {
                mac: Some([0x02, 0x66, 0x74, 0x76, 0x6d, 0x01]),
                ip: Some((lab.guest_ip(), ftvm_lab::LAN_PREFIX_LEN)),
                gateway: None,
                params: params.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            },
            privilege: vmm::boot::Privilege::User,
            digest_every: None,
            test_devices: false,
        };
        let (line_tx, lines) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(format!("vm {guest}")).spawn(move || -> Result<RunOutcome> {
            let output = LiveOutput::new(Box::new(LineSink { tx: line_tx, buf: Vec::new() })).with_tap(tap.clone());
            let input = |stop: &StopHandle| -> Box<dyn InputSource> {
                let _ = stop_tx.send(stop.clone());
                Box::new(LiveInput::new(0, vec![stop.wake_fd()]).with_tap(tap))
            };
            let mut vm = Vm::new(&config, input, Box::new(output))?;
            Ok(vm.run()?)
        })?;
        let stop = match stop_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(stop) => stop,
            Err(_) => {
                let result = thread.join();
                bail!("the {guest} VM did not start: {:?}", result.map(|r| r.map(|_| ())));
            }
        };
        Ok(LabVm { stop, lines, thread: Some(thread) })
    }

    /// Wait for a serial line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> Result<String> {
        wait_line(&self.lines, prefix, timeout)
    }

    /// Stop the guest; the number of guest exits it made.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.stop();
        let thread = self.thread.take().context("VM already stopped")?;
        match thread.join().map_err(|_| anyhow::anyhow!("the VM thread panicked"))?? {
            RunOutcome::Stopped { exit_index } | RunOutcome::PoweredOff { exit_index, .. } => Ok(exit_index.0),
        }
    }
}

impl Drop for LabVm {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first of `lines` (a guest's serial console) that starts with
/// `prefix`; an error after `timeout`, or when the console ends first.
pub(crate) fn wait_line(lines: &Receiver<String>, prefix: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return Ok(line),
            Ok(_) => {}
            Err(_) => bail!("the guest did not print a line starting {prefix:?} within {timeout:?}"),
        }
    }
}

/// One line of `redis-benchmark --csv`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RedisFigure {
    pub test: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub(crate) fn redis_benchmark(
    lab: &Lab,
    host: Ipv4Addr,
    requests: u64,
    clients: u32,
) -> Result<(Vec<RedisFigure>, String)> {
    let args = [
        "-h".to_string(),
        host.to_string(),
        "-p".into(),
        "6379".into(),
        "-t".into(),
        "set,get".into(),
        "-n".into(),
        requests.to_string(),
        "-c".into(),
        clients.to_string(),
        "--csv".into(),
    ];
    let shown = format!("ip netns exec {} redis-benchmark {}", lab.client().name(), args.join(" "));
    let out = lab
        .client()
        .command("redis-benchmark")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run redis-benchmark (install redis-tools)")?;
    if !out.status.success() {
        bail!("redis-benchmark failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut figures = Vec::new();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').map(|s| s.trim_matches('"')).collect();
        if f.len() < 8 {
            continue;
        }
        figures.push(RedisFigure {
            test: f[0].into(),
            rps: f[1].parse()?,
            p50_ms: f[4].parse()?,
            p99_ms: f[6].parse()?,
        });
    }
    if figures.is_empty() {
        bail!("redis-benchmark printed no figures: {text}");
    }
    Ok((figures, shown))
}

/// `ftvm-bench kvstore`.
pub fn kvstore(requests: u64, clients: u32, json: bool) -> Result<()> {
    let lab = Lab::single("bkv");
    eprintln!("lab up; booting kvstore");
    let vm = LabVm::start(&lab, "kvstore", &[])?;
    vm.wait_line("kvstore: listening", Duration::from_secs(20))?;
    eprintln!("kvstore listening; running redis-benchmark ({requests} requests per test, {clients} clients)");
    let (ftvm, command) = redis_benchmark(&lab, lab.guest_ip(), requests, clients)?;
    let exits = vm.stop()?;
    let total_requests = requests * ftvm.len() as u64;

    let reference = if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_ok() {
        eprintln!("reference: redis-server in host a's namespace at {}", ftvm_lab::HOST_LAN_IPS[0]);
        let ip = ftvm_lab::HOST_LAN_IPS[0].to_string();
        let mut server = lab.host_a().netns().spawn(
            "redis-server",
            &[
                "--bind",
                &ip,
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ],
        );
        let up = ftvm_lab::wait_for(Duration::from_secs(10), || {
            lab.client()
                .command("redis-cli")
                .args(["-h", &ip, "PING"])
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        });
        let r = if up { Some(redis_benchmark(&lab, ftvm_lab::HOST_LAN_IPS[0], requests, clients)?.0) } else { None };
        let _ = server.kill();
        r
    } else {
        eprintln!("redis-server not installed: no reference (apt-get install redis-server)");
        None
    };

    if json {
        let v = serde_json::json!({ "command": command, "ftvm": ftvm, "redis_server": reference,
            "exits": exits, "requests": total_requests, "exits_per_request": exits as f64 / total_requests as f64 });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("kvstore under redis-benchmark, client namespace → guest on a TAP behind a bridge");
    println!("command: {command}");
    println!();
    println!(
        "{:<5} {:>14} {:>9} {:>9}   {:>14} {:>9} {:>9}",
        "test", "ftvm req/s", "p50 ms", "p99 ms", "redis req/s", "p50 ms", "p99 ms"
    );
    for f in &ftvm {
        let r = reference.as_ref().and_then(|r| r.iter().find(|x| x.test == f.test));
        let (rr, r50, r99) = r.map_or(("-".into(), "-".into(), "-".into()), |r| {
            (format!("{:.0}", r.rps), format!("{:.3}", r.p50_ms), format!("{:.3}", r.p99_ms))
        });
        println!(
            "{:<5} {:>14.0} {:>9.3} {:>9.3}   {:>14} {:>9} {:>9}",
            f.test, f.rps, f.p50_ms, f.p99_ms, rr, r50, r99
        );
    }
    println!();
    println!(
        "guest exits: {exits} for {total_requests} requests ({:.1} exits per request, boot and idle included)",
        exits as f64 / total_requests as f64
    );
    Ok(())
}

/// Receive the streamer's datagrams for `duration`: (received, gaps,
/// out-of-order, first/last sequence).
fn receive(sock: &UdpSocket, duration: Duration) -> Result<(u64, u64, u64, u64)> {
    let mut buf = [0u8; 2048];
    let (mut received, mut gaps, mut disorder) = (0u64, 0u64, 0u64);
    let mut next: Option<u64> = None;
    let end = Instant::now() + duration;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    while Instant::now() < end {
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        };
        if n != 1316 {
            bail!("streamer datagram of {n} bytes, not 1316");
        }
        let seq = u64::from_le_bytes(buf[..8].try_into()?);
        received += 1;
        match next {
            Some(want) if seq > want => gaps += seq - want,
            Some(want) if seq < want => disorder += 1,
            _ => {}
        }
        next = Some(next.map_or(seq + 1, |w| w.max(seq + 1)));
    }
    Ok((received, gaps, disorder, next.unwrap_or(0)))
}

/// `ftvm-bench streamer`: the highest rate the streamer sustains with no
/// gap, trying increasing rates.
pub fn streamer(seconds: u64, json: bool) -> Result<()> {
    let lab = Lab::single("bst");
    let port = 5004u16;
    let client_ip = lab.client_ip();
    let sock = lab.client().run(move || UdpSocket::bind((client_ip, port)))?;
    let mut rows = Vec::new();
    let mut best = 0u64;
    for rate in [1000u64, 2000, 5000, 10000, 20000, 50000, 100000] {
        eprintln!("streamer at {rate}/s for {seconds} s");
        let vm =
            LabVm::start(&lab, "streamer", &[("dest", format!("{client_ip}:{port}")), ("rate", rate.to_string())])?;
        vm.wait_line("streamer: sending", Duration::from_secs(20))?;
        // Skip the start (ARP, first burst), then measure.
        receive(&sock, Duration::from_millis(300))?;
        let start = Instant::now();
        let (received, gaps, disorder, _) = receive(&sock, Duration::from_secs(seconds))?;
        let elapsed = start.elapsed().as_secs_f64();
        let exits = vm.stop()?;
        // Drain what is still in flight before the next rate.
        receive(&sock, Duration::from_millis(200))?;
        let got = received as f64 / elapsed;
        let stable = gaps == 0 && disorder == 0 && got >= 0.95 * rate as f64;
        if stable {
            best = rate;
        }
        rows.push(serde_json::json!({"rate": rate, "received_per_s": got, "gaps": gaps, "out_of_order": disorder,
            "stable": stable, "exits": exits}));
        if !stable {
            break;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"rates": rows, "highest_stable_rate": best}))?);
        return Ok(());
    }
    println!("streamer: 1316-byte UDP datagrams, guest → TAP → bridge → client namespace");
    println!();
    println!("{:>8} {:>14} {:>6} {:>12} {:>7}", "rate/s", "received/s", "gaps", "out of order", "stable");
    for r in &rows {
        println!(
            "{:>8} {:>14.0} {:>6} {:>12} {:>7}",
            r["rate"].as_u64().unwrap_or(0),
            r["received_per_s"].as_f64().unwrap_or(0.0),
            r["gaps"].as_u64().unwrap_or(0),
            r["out_of_order"].as_u64().unwrap_or(0),
            if r["stable"].as_bool().unwrap_or(false) { "yes" } else { "no" }
        );
    }
    println!();
    println!("highest stable rate: {best} datagrams/s (no gap, no reordering, ≥ 95 % of the rate delivered)");
    Ok(())
}
