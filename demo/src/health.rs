//! `ftvm demo --fault KIND` and the trials of `ftvm-bench health`: a
//! protected pair whose guest fails on purpose (its own fault injector,
//! `--param fault=...`), with or without containment, and what a client saw.
//!
//! The thesis' experiment (Nikzad 2013, section 3.10.6): a thread that
//! halted the guest OS 10–20 s after streaming started took both VMware FT
//! copies down, because the secondary replayed the halt. Here the halt
//! strikes after a random time of mean 1–3 s.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ftvm_lab::Lab;

use crate::{connect_kvstore, ms, reply, resp, start_pair, DemoGuest, Stop};

/// How long a trial waits for the injected fault and its handling.
const FAULT_WAIT: Duration = Duration::from_secs(40);
/// A service silent this long after it stopped is dead (a contained fault
/// resumes in milliseconds).
const DEAD_FOR: Duration = Duration::from_secs(3);
/// The streamer's rate: one datagram a millisecond.
const RATE: u64 = 1000;
/// Datagrams (streamer) or requests (kvstore) the client checks after the
/// service resumed. Few: the injected fault is memoryless, and the copy
/// that took over may draw another one (which `--on-fault stop` ends with
/// status 5); a stop after the service resumed ends the check early.
const AFTER: u64 = 50;

/// The guest fault a trial injects (`--param fault=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DemoFault {
    /// Halt with no wake-up deadline (the thesis' experiment).
    Halt,
    /// pvpanic.
    Panic,
    /// Triple fault.
    Crash,
    /// Spin without exits (seen by the hang watchdog).
    Hang,
    /// Stop reporting health (seen by the health deadline).
    Unhealthy,
}

impl DemoFault {
    pub fn param(self) -> &'static str {
        match self {
            DemoFault::Halt => "fault=halt",
            DemoFault::Panic => "fault=panic",
            DemoFault::Crash => "fault=crash",
            DemoFault::Hang => "fault=hang",
            DemoFault::Unhealthy => "fault=unhealthy",
        }
    }
}

/// What makes the primary faulty in a trial: a guest fault, or a host-side
/// health source failing while the guest is fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The guest's injector, transient with this mean time to fault.
    Guest { fault: DemoFault, mtbf_ms: u64 },
    /// The probe (`--probe exec:`) fails on the primary's host.
    Probe,
    /// The primary's uplink (`--uplink`) loses carrier.
    Uplink,
}

impl Cause {
    /// The health source expected to fire, as `ftvm status` names it.
    pub fn source(self) -> &'static str {
        match self {
            Cause::Guest { fault: DemoFault::Hang, .. } => "hang watchdog",
            Cause::Guest { fault: DemoFault::Unhealthy, .. } => "health deadline",
            Cause::Guest { .. } => "exit",
            Cause::Probe => "probe",
            Cause::Uplink => "lan",
        }
    }

    /// A short name for tables.
    pub fn name(self) -> String {
        match self {
            Cause::Guest { fault, .. } => format!("{fault:?}").to_lowercase(),
            Cause::Probe => "probe".into(),
            Cause::Uplink => "uplink".into(),
        }
    }
}

/// One trial's settings.
#[derive(Clone, Debug)]
pub struct FaultSetup {
    pub guest: DemoGuest,
    pub cause: Cause,
    pub containment: bool,
    /// `--output-mode`: "fast" or "strict".
    pub output_mode: &'static str,
    /// More pair flags (a source's settings, e.g. `--health-deadline-ms`).
    pub flags: Vec<String>,
}

/// What one trial saw.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultTrial {
    /// The service went on after the fault, for the client, on the same
    /// connection (kvstore).
    pub survived: bool,
    /// The live copy's event: the source that fired, and the thesis'
    /// metrics (from `ftvm status`); none without containment.
    pub source: Option<String>,
    pub reaction_ms: Option<f64>,
    pub recovery_ms: Option<f64>,
    pub outage_ms: Option<f64>,
    /// The longest the client waited between two datagrams (streamer) or
    /// for a reply (kvstore) across the fault: the client-seen outage.
    pub client_outage_ms: Option<f64>,
    /// When the service stopped, from the client's first datagram or reply.
    pub fault_after_ms: f64,
    /// Datagrams the client received twice (streamer: sent again by the
    /// copy that resumed from the last healthy point).
    pub duplicates: u64,
    /// Datagrams that never arrived (streamer; e.g. sent into a primary's
    /// dead uplink before the LAN source saw it).
    pub lost: u64,
    /// The secondary took the guest over (went live).
    pub taken_over: bool,
}

impl FaultTrial {
    /// The service died: nothing took over for the client (VMware FT's
    /// outcome, or a containment that failed).
    /// The service went on: the client's worst wait `worst`, `at` after
    /// its start, and the live copy's `event` (none without containment).
    fn survived(
        event: Option<&serde_json::Value>,
        worst: Duration,
        at: Duration,
        duplicates: u64,
        lost: u64,
        taken_over: bool,
    ) -> FaultTrial {
        FaultTrial {
            survived: true,
            source: event.and_then(|e| e["source"].as_str()).map(str::to_owned),
            reaction_ms: event.and_then(|e| e["reaction_ms"].as_f64()),
            recovery_ms: event.and_then(|e| e["recovery_ms"].as_f64()),
            outage_ms: event.and_then(|e| e["outage_ms"].as_f64()),
            client_outage_ms: Some(ms(worst)),
            fault_after_ms: ms(at),
            duplicates,
            lost,
            taken_over,
        }
    }

    fn died(fault_after_ms: f64, duplicates: u64, taken_over: bool) -> FaultTrial {
        FaultTrial {
            survived: false,
            source: None,
            reaction_ms: None,
            recovery_ms: None,
            outage_ms: None,
            client_outage_ms: None,
            fault_after_ms,
            duplicates,
            lost: 0,
            taken_over,
        }
    }
}

/// One trial on `lab`: start the pair, let the fault strike, watch.
pub fn fault_trial(lab: &Lab, setup: &FaultSetup, stop: &Stop) -> Result<FaultTrial> {
    let dir = std::env::temp_dir().join(format!("ftvm-fault-{}-{}", std::process::id(), lab.prefix()));
    std::fs::create_dir_all(&dir)?;
    match run_fault_trial(lab, &dir, setup, stop) {
        Ok(t) => {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(t)
        }
        Err(e) if stop.signal().is_some() => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(stop.interrupted_or(e))
        }
        Err(e) => Err(e.context(format!("the VMMs' logs are kept in {}", dir.display()))),
    }
}

/// The pair's arguments for `setup` (both sides get the same).
fn pair_args(lab: &Lab, dir: &Path, setup: &FaultSetup) -> Vec<String> {
    let cidr = lab.guest_cidr();
    let mut args: Vec<String> = match setup.guest {
        DemoGuest::Kvstore => vec!["--guest".into(), "kvstore".into(), "--memory-mib".into(), "32".into()],
        DemoGuest::Streamer => vec![
            "--guest".into(),
            "streamer".into(),
            "--param".into(),
            format!("dest={}:5004", lab.client_ip()),
            "--param".into(),
            format!("rate={RATE}"),
        ],
    };
    args.extend(["--ip".into(), cidr]);
    match setup.cause {
        Cause::Guest { fault, mtbf_ms } => {
            args.extend(["--param".into(), fault.param().into(), "--param".into(), format!("fault_mtbf_ms={mtbf_ms}")]);
        }
        Cause::Probe => {
            // Fails on the host whose namespace has a `fail-NAME` file.
            let probe = format!("exec:test ! -e {}/fail-$(ip netns identify)", dir.display());
            args.extend(["--probe".into(), probe]);
        }
        Cause::Uplink => args.extend(["--uplink".into(), lab.host_a().lan_dev().into()]),
    }
    let containment = if setup.containment { "on" } else { "off" };
    args.extend(["--containment".into(), containment.into(), "--on-fault".into(), "stop".into()]);
    args.extend(["--output-mode".into(), setup.output_mode.into()]);
    args.extend(setup.flags.iter().cloned());
    args
}

/// Makes the primary's host-side source fail (probe, uplink); nothing for
/// a guest fault, which strikes by itself.
fn fail_host_side(lab: &Lab, dir: &Path, cause: Cause) -> Result<()> {
    match cause {
        Cause::Guest { .. } => {}
        Cause::Probe => {
            let file = dir.join(format!("fail-{}", lab.host_a().netns().name()));
            std::fs::write(&file, b"").with_context(|| format!("cannot create {}", file.display()))?;
        }
        Cause::Uplink => lab.host_a().netns().set_link_up(lab.host_a().lan_dev(), false),
    }
    Ok(())
}

/// The live copy's fault event, once there is one.
fn fault_event(dir: &Path) -> Option<serde_json::Value> {
    let v = pair::control::query(&dir.join("s.sock")).ok()?;
    let event = v.get("last_fault")?;
    (!event.is_null()).then(|| event.clone())
}

fn run_fault_trial(lab: &Lab, dir: &Path, setup: &FaultSetup, stop: &Stop) -> Result<FaultTrial> {
    let args = pair_args(lab, dir, setup);
    match setup.guest {
        DemoGuest::Streamer => streamer_trial(lab, dir, setup, &args, stop),
        DemoGuest::Kvstore => kvstore_trial(lab, dir, setup, &args, stop),
    }
}

/// Whether the secondary's log says it went live (took the guest over).
fn went_live(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("secondary.log")).is_ok_and(|log| log.contains("went live"))
}

fn streamer_trial(lab: &Lab, dir: &Path, setup: &FaultSetup, args: &[String], stop: &Stop) -> Result<FaultTrial> {
    let client_ip = lab.client_ip();
    let sock = lab.client().run(move || UdpSocket::bind((client_ip, 5004)))?;
    // The copy that takes over catches up in bursts of up to 128 datagrams:
    // more than a default receive buffer holds.
    ftvm_lab::force_receive_buffer(&sock, 8 << 20).context("cannot enlarge the client's receive buffer")?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let (_primary, _secondary) = start_pair(lab, dir, args)?;
    let mut buf = [0u8; 2048];
    let mut recv = |timeout: Duration| -> Result<Option<u64>> {
        sock.set_read_timeout(Some(timeout))?;
        match sock.recv(&mut buf) {
            Ok(1316) => Ok(Some(u64::from_le_bytes(buf[..8].try_into()?))),
            Ok(n) => bail!("a datagram of {n} bytes"),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    recv(Duration::from_secs(30))?.context("the stream never started")?;
    let start = Instant::now();
    fail_host_side(lab, dir, setup.cause)?;
    let mut seen = BTreeSet::new();
    let (mut last, mut worst, mut worst_at, mut duplicates) = (Instant::now(), Duration::ZERO, start, 0u64);
    let mut event = None;
    let mut after = 0;
    let mut next_look = Instant::now();
    while after < AFTER {
        stop.check()?;
        if start.elapsed() > FAULT_WAIT {
            bail!("the fault was not handled within {FAULT_WAIT:?}");
        }
        let Some(seq) = recv(DEAD_FOR)? else {
            // Dead for DEAD_FOR: VMware FT's outcome (or a containment
            // that failed).
            if event.is_some() && after > 0 {
                // The copy that took over faulted again: the service had
                // resumed.
                break;
            }
            if setup.containment {
                bail!("the stream stopped for {DEAD_FOR:?} with containment on");
            }
            return Ok(FaultTrial::died(ms(last - start), duplicates, went_live(dir)));
        };
        let now = Instant::now();
        if now - last > worst {
            (worst, worst_at) = (now - last, last);
        }
        last = now;
        if !seen.insert(seq) {
            duplicates += 1;
        }
        if event.is_some() {
            after += 1;
        } else if now >= next_look {
            // The live copy's status, every 50 ms.
            event = fault_event(dir);
            next_look = now + Duration::from_millis(50);
        }
    }
    let max = seen.iter().next_back().copied().unwrap_or(0);
    let min = seen.iter().next().copied().unwrap_or(0);
    let lost = (min..max).filter(|s| !seen.contains(s)).count() as u64;
    Ok(FaultTrial::survived(event.as_ref(), worst, worst_at - start, duplicates, lost, went_live(dir)))
}

fn kvstore_trial(lab: &Lab, dir: &Path, setup: &FaultSetup, args: &[String], stop: &Stop) -> Result<FaultTrial> {
    let (_primary, _secondary) = start_pair(lab, dir, args)?;
    let stream = connect_kvstore(lab, stop)?;
    // A reply that does not come within DEAD_FOR: the service is dead.
    stream.set_read_timeout(Some(DEAD_FOR))?;
    let mut s = BufReader::new(stream);
    let start = Instant::now();
    fail_host_side(lab, dir, setup.cause)?;
    let (mut acked, mut worst, mut worst_at) = (0u64, Duration::ZERO, start);
    let mut event = None;
    let mut after = 0;
    let mut next_look = Instant::now();
    while after < AFTER {
        stop.check()?;
        if start.elapsed() > FAULT_WAIT {
            bail!("the fault was not handled within {FAULT_WAIT:?}");
        }
        let t = Instant::now();
        s.get_mut().write_all(&resp(&["INCR", "counter"]))?;
        let mut line = String::new();
        let answered = matches!(s.read_line(&mut line), Ok(n) if n > 0);
        if !answered && event.is_some() && after > 0 {
            // The copy that took over faulted again: the service had
            // resumed.
            break;
        }
        if !answered {
            if setup.containment {
                bail!("no reply for {DEAD_FOR:?} with containment on");
            }
            return Ok(FaultTrial::died(ms(t - start), 0, went_live(dir)));
        }
        if line != format!(":{}\r\n", acked + 1) {
            bail!("INCR answered {line:?} after {acked} acknowledged: a write was lost");
        }
        acked += 1;
        if t.elapsed() > worst {
            (worst, worst_at) = (t.elapsed(), t);
        }
        if event.is_some() {
            after += 1;
        } else if Instant::now() >= next_look {
            event = fault_event(dir);
            next_look = Instant::now() + Duration::from_millis(50);
        }
        // A client at a modest pace: a request every 5 ms.
        std::thread::sleep(Duration::from_millis(5));
    }
    if after >= AFTER {
        s.get_mut().write_all(&resp(&["GET", "counter"]))?;
        if reply(&mut s)? != format!("${}\r\n{acked}\r\n", acked.to_string().len()) {
            bail!("the counter lost acknowledged increments");
        }
    }
    Ok(FaultTrial::survived(event.as_ref(), worst, worst_at - start, 0, 0, went_live(dir)))
}

/// A mean time to fault drawn from 1000..=3000 ms (the thesis' 10–20 s,
/// scaled down).
pub fn random_mtbf_ms() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    1000 + h.finish() % 2001
}

/// The side-by-side report of `ftvm demo --fault`.
pub fn fault_report(guest: DemoGuest, fault: DemoFault, with: &FaultTrial, without: &FaultTrial) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_fault_report(&mut out, guest, fault, with, without);
    out
}

fn write_fault_report(
    out: &mut String,
    guest: DemoGuest,
    fault: DemoFault,
    with: &FaultTrial,
    without: &FaultTrial,
) -> std::fmt::Result {
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1} ms"));
    writeln!(out)?;
    writeln!(
        out,
        "guest {guest:?}, injected fault: {fault:?} (transient, mean 1-3 s after boot; --health-deadline-ms 1000, --dead-after 30)"
    )?;
    writeln!(out)?;
    writeln!(out, "{:<28} {:>14} {:>22}", "", "ftvm containment", "containment off (VMware FT)")?;
    let row = |out: &mut String, name: &str, a: String, b: String| writeln!(out, "{name:<28} {a:>14} {b:>22}");
    let fate = |t: &FaultTrial| {
        if t.survived {
            "survived".to_string()
        } else if t.taken_over {
            "dead (taken over, then lost)".to_string()
        } else {
            "dead, nothing took over".to_string()
        }
    };
    row(out, "service", fate(with), fate(without))?;
    row(
        out,
        "fault after (client)",
        format!("{:.0} ms", with.fault_after_ms),
        format!("{:.0} ms", without.fault_after_ms),
    )?;
    row(out, "detected by", with.source.clone().unwrap_or("-".into()), "not detected".into())?;
    row(out, "reaction", f(with.reaction_ms), "-".into())?;
    row(out, "recovery", f(with.recovery_ms), "-".into())?;
    row(out, "outage (client-seen)", f(with.client_outage_ms), "forever".into())?;
    writeln!(out)?;
    writeln!(out, "thesis (section 3.10.6): VMware FT replayed the halt on the secondary; both copies died")?;
    writeln!(out, "thesis (OpenSAF AMF, component failure): SA-aware 55 ms, non-SA-aware 499 ms; keeps no VM alive")?;
    if guest == DemoGuest::Kvstore && with.survived {
        writeln!(out, "the client's TCP connection survived the containment; no acknowledged write lost")?;
    }
    Ok(())
}

/// `ftvm demo --fault KIND`: the experiment with containment, then without,
/// side by side.
pub fn fault_demo(guest: DemoGuest, fault: DemoFault) -> Result<()> {
    let stop = Stop::on_signals()?;
    let mut trials = Vec::new();
    for containment in [true, false] {
        eprintln!(
            "ftvm demo: a protected {guest:?} pair, {fault:?} injected, containment {}",
            if containment { "on" } else { "off (VMware FT's behaviour)" }
        );
        let lab = Lab::pair("demof");
        stop.check()?;
        let setup = FaultSetup {
            guest,
            cause: Cause::Guest { fault, mtbf_ms: random_mtbf_ms() },
            containment,
            output_mode: "strict",
            // So that the injected fault, not a health report missed on a
            // busy host, is what the pair sees.
            flags: ["--health-deadline-ms", "1000", "--dead-after", "30"].map(String::from).to_vec(),
        };
        let t = fault_trial(&lab, &setup, &stop).map_err(|e| stop.interrupted_or(e))?;
        drop(lab);
        trials.push(t);
    }
    print!("{}", fault_report(guest, fault, &trials[0], &trials[1]));
    stop.check()
}

/// Round trips (ms) of `n` INCRs, one at a time over one connection, to a
/// protected kvstore pair with `--output-mode mode` and no fault: what the
/// output mode costs a request.
pub fn incr_latencies(lab: &Lab, mode: &str, n: u32, stop: &Stop) -> Result<Vec<f64>> {
    let dir = std::env::temp_dir().join(format!("ftvm-lat-{}-{}", std::process::id(), lab.prefix()));
    std::fs::create_dir_all(&dir)?;
    let cidr = lab.guest_cidr();
    let args: Vec<String> = ["--guest", "kvstore", "--memory-mib", "32", "--ip", &cidr, "--output-mode", mode]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let result = (|| {
        let (_primary, _secondary) = start_pair(lab, &dir, &args)?;
        let ip = lab.guest_ip();
        let stream = lab.client().run(move || -> Result<TcpStream> {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match TcpStream::connect_timeout(&(ip, 6379).into(), Duration::from_secs(2)) {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() > deadline => return Err(e.into()),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        let mut s = BufReader::new(stream);
        let mut v = Vec::with_capacity(n as usize);
        // The first 100 warm the path up (ARP, the guest's sockets).
        for i in 0..n + 100 {
            stop.check()?;
            let t = Instant::now();
            s.get_mut().write_all(&resp(&["INCR", "n"]))?;
            let r = reply(&mut s)?;
            if r != format!(":{}\r\n", i + 1) {
                bail!("INCR #{} answered {r:?}", i + 1);
            }
            if i >= 100 {
                v.push(ms(t.elapsed()));
            }
        }
        Ok(v)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| stop.interrupted_or(e))
}
