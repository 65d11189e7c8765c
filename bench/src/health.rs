//! `ftvm-bench health`: application failures, each health source alone,
//! `fast` and `strict`: the outage a client sees (fault → service resumed),
//! median and p95; the thesis' halt experiment with and without
//! containment (how many runs the service survived); and what `strict`
//! adds to a kvstore request's p50.

use anyhow::{bail, Result};
use ftvm_demo::{fault_trial, incr_latencies, random_mtbf_ms, Cause, DemoFault, DemoGuest, FaultSetup, Stop};
use ftvm_lab::Lab;

/// The health sources measured, one cause each (guest faults transient,
/// mean 1–3 s).
fn causes() -> Vec<Cause> {
    let guest = |fault| Cause::Guest { fault, mtbf_ms: 0 };
    vec![
        guest(DemoFault::Halt),
        guest(DemoFault::Panic),
        guest(DemoFault::Crash),
        guest(DemoFault::Unhealthy),
        guest(DemoFault::Hang),
        Cause::Probe,
        Cause::Uplink,
    ]
}

/// The target for a cause's median outage, in words.
fn target(cause: Cause) -> &'static str {
    match cause {
        Cause::Guest { fault: DemoFault::Halt | DemoFault::Panic | DemoFault::Crash, .. } => "<= 10 ms",
        Cause::Guest { fault: DemoFault::Unhealthy, .. } => "<= deadline + 10 = 40 ms",
        Cause::Guest { fault: DemoFault::Hang, .. } => "~ --hang-ms (1000)",
        Cause::Probe => "~ 3 x 100 ms probe",
        Cause::Uplink => "-",
    }
}

/// (median, p95) of `v`, or `None` when empty.
fn median_p95(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.95)))
}

/// `ftvm-bench health`: `runs` trials per row.
pub fn bench(runs: u32, json: bool) -> Result<()> {
    let stop = Stop::on_signals()?;
    let mut out = serde_json::Map::new();
    let mut failed = Vec::new();

    // 1. Outage per health source and output mode (streamer: the client
    //    sees a datagram a millisecond, so the gap is the outage).
    let mut rows = Vec::new();
    for cause in causes() {
        for mode in ["fast", "strict"] {
            let mut client = Vec::new();
            let mut event = Vec::new();
            let mut sources = Vec::new();
            for i in 1..=runs {
                stop.check()?;
                eprintln!("{} / {mode}: trial {i}/{runs}", cause.name());
                let cause = match cause {
                    Cause::Guest { fault, .. } => Cause::Guest { fault, mtbf_ms: random_mtbf_ms() },
                    other => other,
                };
                let setup = FaultSetup { guest: DemoGuest::Streamer, cause, containment: true, output_mode: mode };
                let lab = Lab::pair("bhl");
                match fault_trial(&lab, &setup, &stop) {
                    Ok(t) => {
                        client.extend(t.client_outage_ms);
                        event.extend(t.outage_ms);
                        sources.extend(t.source.clone());
                        out.insert(format!("{}/{mode}/{i}", cause.name()), serde_json::to_value(&t)?);
                    }
                    Err(e) => {
                        stop.check()?;
                        eprintln!("  trial {i} FAILED: {e:#}");
                        failed.push(format!("{} / {mode}, trial {i}: {e:#}", cause.name()));
                    }
                }
            }
            sources.sort();
            sources.dedup();
            rows.push((cause, mode, median_p95(&client), median_p95(&event), client.len(), sources.join(", ")));
        }
    }

    // 2. The halt experiment, with and without containment, both guests.
    let mut survival = Vec::new();
    for guest in [DemoGuest::Streamer, DemoGuest::Kvstore] {
        for containment in [true, false] {
            let (mut survived, mut both_dead, mut done) = (0, 0, 0);
            for i in 1..=runs {
                stop.check()?;
                eprintln!("halt experiment, {guest:?}, containment {containment}: trial {i}/{runs}");
                let setup = FaultSetup {
                    guest,
                    cause: Cause::Guest { fault: DemoFault::Halt, mtbf_ms: random_mtbf_ms() },
                    containment,
                    output_mode: "strict",
                };
                let lab = Lab::pair("bhx");
                match fault_trial(&lab, &setup, &stop) {
                    Ok(t) => {
                        done += 1;
                        survived += u32::from(t.survived);
                        both_dead += u32::from(!t.survived && t.both_vmms_running);
                    }
                    Err(e) => {
                        stop.check()?;
                        eprintln!("  trial {i} FAILED: {e:#}");
                        failed.push(format!("halt experiment {guest:?} containment {containment}, trial {i}: {e:#}"));
                    }
                }
            }
            survival.push((guest, containment, survived, both_dead, done));
        }
    }

    // 3. What strict adds to a request: kvstore INCR round trips, fast and
    //    strict, no fault, measured in the same run.
    let mut p50 = Vec::new();
    for mode in ["fast", "strict"] {
        stop.check()?;
        eprintln!("kvstore INCR latency, {mode}");
        let lab = Lab::pair("bhlat");
        let v = incr_latencies(&lab, mode, 2000, &stop)?;
        p50.push((mode, median_p95(&v).map_or(f64::NAN, |(m, _)| m)));
    }

    if json {
        out.insert("failed".into(), serde_json::to_value(&failed)?);
        out.insert("p50_ms".into(), serde_json::json!({ "fast": p50[0].1, "strict": p50[1].1 }));
        println!("{}", serde_json::to_string_pretty(&out)?);
        return check(&failed);
    }
    let f = |v: Option<(f64, f64)>, i: usize| {
        v.map_or_else(|| "-".to_string(), |p| format!("{:.1}", if i == 0 { p.0 } else { p.1 }))
    };
    println!("{runs} runs per row; streamer at 1000 datagrams/s; guest faults transient (mean 1-3 s after boot);");
    println!("defaults: --health-deadline-ms 30, --hang-ms 1000, probe every 100 ms, 3 failures");
    println!();
    println!(
        "{:<10} {:<7} {:>13} {:>11} {:>13} {:>11}  {:<26} source",
        "fault", "mode", "client med ms", "client p95", "event med ms", "event p95", "target (median)"
    );
    for (cause, mode, client, event, n, sources) in &rows {
        println!(
            "{:<10} {:<7} {:>13} {:>11} {:>13} {:>11}  {:<26} {} ({n} runs)",
            cause.name(),
            mode,
            f(*client, 0),
            f(*client, 1),
            f(*event, 0),
            f(*event, 1),
            target(*cause),
            sources
        );
    }
    println!();
    println!("thesis, component failure: OpenSAF SA-aware 55 ms, non-SA-aware 499 ms; VMware FT and HA: not detected");
    println!();
    println!("halt experiment (thesis 3.10.6: VMware FT, both copies died):");
    for (guest, containment, survived, both_dead, done) in &survival {
        println!(
            "  {:<9} containment {:<4} service survived {survived}/{done}, both copies dead {both_dead}/{done}",
            format!("{guest:?}"),
            if *containment { "on" } else { "off" }
        );
    }
    println!();
    let (fast, strict) = (p50[0].1, p50[1].1);
    println!(
        "kvstore INCR p50: fast {fast:.3} ms, strict {strict:.3} ms: strict adds {:.3} ms (target <= 1 ms)",
        strict - fast
    );
    check(&failed)
}

fn check(failed: &[String]) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    bail!("{} trial(s) failed:\n  {}", failed.len(), failed.join("\n  "))
}
