//! `ftvm-bench failover`: SIGKILL of the primary VMM, and the loss of its
//! whole host, repeated under streamer and kvstore.

use anyhow::{bail, Result};
use ftvm_demo::{trial, DemoGuest, Failure, Stop, Trial};
use ftvm_lab::Lab;

/// `ftvm-bench failover`: `reps` trials per guest and failure, min /
/// median / p95.
pub fn bench(reps: u32, failures: &[Failure], json: bool) -> Result<()> {
    let stop = Stop::on_signals()?;
    let mut out = serde_json::Map::new();
    let mut table = Vec::new();
    // A failed trial (a lost write or datagram, no failover) is reported,
    // not hidden, and does not throw away the other trials' figures.
    let mut failed = Vec::new();
    for &how in failures {
        for guest in [DemoGuest::Streamer, DemoGuest::Kvstore] {
            let mut trials = Vec::new();
            for i in 1..=reps {
                stop.check()?;
                eprintln!("{how:?} failure, {guest:?}: trial {i}/{reps}");
                let lab = Lab::pair("bfo");
                match trial(&lab, guest, how, false, &stop) {
                    Ok(t) => trials.push(t),
                    Err(e) => {
                        stop.check()?;
                        eprintln!("  trial {i} FAILED: {e:#}");
                        failed.push(format!("{how:?} failure, {guest:?}, trial {i}: {e:#}"));
                    }
                }
            }
            if trials.is_empty() {
                continue;
            }
            let stat = |f: fn(&Trial) -> f64| {
                let mut v: Vec<f64> = trials.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
                (v[0], at(0.5), at(0.95))
            };
            let mut rows = vec![
                ("reaction", stat(|t| t.reaction_ms)),
                ("recovery", stat(|t| t.recovery_ms)),
                ("client-seen outage", stat(|t| t.client_outage_ms)),
            ];
            if trials.iter().all(|t| t.repair_ms.is_some()) {
                // Failure → the survivor re-protected onto a standby on the
                // failed host (the thesis' VMware FT: 10.63 s).
                rows.push(("repair (thesis 10630)", stat(|t| t.repair_ms.unwrap_or(f64::NAN))));
            }
            let mut detected: Vec<&str> = trials.iter().map(|t| t.detected_by.as_str()).collect();
            detected.sort_unstable();
            detected.dedup();
            let key = format!("{how:?}/{guest:?}").to_lowercase();
            out.insert(key, serde_json::to_value(&trials)?);
            table.push((how, guest, detected.join(", "), rows));
        }
    }
    if json {
        out.insert("failed".into(), serde_json::to_value(&failed)?);
        println!("{}", serde_json::to_string_pretty(&out)?);
        return check_trials(&failed);
    }
    println!(
        "{reps} repetitions per failure and guest, defaults (heartbeat 10 ms, silence limit adaptive: no --dead-after)"
    );
    for how in failures {
        println!("  {how:?}: {}", how.describe());
    }
    println!();
    println!(
        "{:<8} {:<9} {:<19} {:>8} {:>10} {:>8}  detected by",
        "failure", "guest", "figure", "min ms", "median ms", "p95 ms"
    );
    for (how, guest, detected, rows) in &table {
        for (name, (min, med, p95)) in rows {
            println!(
                "{:<8} {:<9} {:<19} {:>8.1} {:>10.1} {:>8.1}  {}",
                format!("{how:?}"),
                format!("{guest:?}"),
                name,
                min,
                med,
                p95,
                detected
            );
        }
    }
    println!();
    println!("thesis (Table 4): VMware FT 24 / 1290 / 1314 ms; OpenSAF with an SA-aware component 9 / 46 / 55 ms");
    // Issue 16's targets: a host failure seen in 20 ms.
    for (how, guest, _, rows) in &table {
        if (*how, *guest) != (Failure::Host, DemoGuest::Streamer) {
            continue;
        }
        let Some((_, (_, med, p95))) = rows.iter().find(|(name, _)| *name == "client-seen outage") else { continue };
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!();
        println!("issue 16 targets (host failure, streamer, client-seen gap):");
        println!(
            "  median {med:.1} ms, target ≤ {TARGET_GAP_MEDIAN_MS:.0} ms: {}",
            verdict(*med <= TARGET_GAP_MEDIAN_MS)
        );
        println!("  p95    {p95:.1} ms, target ≤ {TARGET_GAP_P95_MS:.0} ms: {}", verdict(*p95 <= TARGET_GAP_P95_MS));
        println!("  and no false failover in 10 minutes of a lossy link: `ftvm-bench lossy --minutes 10`");
    }
    check_trials(&failed)
}

/// Issue 16: the client-seen streamer gap of a host failure.
const TARGET_GAP_MEDIAN_MS: f64 = 20.0;
const TARGET_GAP_P95_MS: f64 = 30.0;

/// An error naming every failed trial, if any failed.
fn check_trials(failed: &[String]) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    bail!("{} trial(s) failed:\n  {}", failed.len(), failed.join("\n  "))
}
