//! `ftvm-bench held`: what a stalled secondary costs the primary's memory.
//! A protected `streamer` (20 000 datagrams/s by default) whose secondary is
//! SIGSTOPped (no arbiter: nothing fails over), the primary's RSS sampled
//! every second, then the secondary continued and the RSS after draining.
//! `--baseline PATH` runs the same with another `ftvm` binary (an older
//! build) first, so both appear side by side from one run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ftvm_demo::Proc;
use ftvm_lab::Lab;

/// The primary's resident set, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

struct Run {
    label: String,
    samples: Vec<f64>,
    drained: Option<f64>,
}

fn one(exe: &Path, label: &str, seconds: u64, rate: u32) -> Result<Run> {
    let lab = Lab::pair("bheld");
    let dir = std::env::temp_dir().join(format!("ftvm-bench-held-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key");
    ftvm_demo::write_key(&key)?;
    let key = key.to_string_lossy().into_owned();
    let listen = format!("{}:7000", lab.host_b().link_ip());
    let dest = format!("dest={}:5004", lab.client_ip());
    let rate = format!("rate={rate}");
    let cidr = lab.guest_cidr();
    let guest = ["--guest", "streamer", "--ip", &cidr, "--param", &dest, "--param", &rate, "--key-file", &key];
    let ctl = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let mut sec = lab.host_b().netns().command(exe);
    sec.arg("secondary").args(guest).args([
        "--tap",
        lab.host_b().tap(),
        "--listen",
        &listen,
        "--control",
        &ctl("s.sock"),
    ]);
    // Killed on drop, whatever happens below.
    let sec = Proc::spawn(sec.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()))?;
    let mut pri = lab.host_a().netns().command(exe);
    pri.arg("primary").args(guest).args(["--tap", lab.host_a().tap(), "--peer", &listen, "--control", &ctl("p.sock")]);
    let pri = Proc::spawn(pri.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()))?;
    let result = (|| -> Result<Run> {
        std::thread::sleep(Duration::from_secs(2));
        let stop = |sig: &str, pid: u32| std::process::Command::new("kill").args([sig, &pid.to_string()]).status();
        stop("-STOP", sec.0.id()).context("kill -STOP")?;
        let mut samples = Vec::new();
        let start = Instant::now();
        for s in 1..=seconds {
            std::thread::sleep((start + Duration::from_secs(s)).saturating_duration_since(Instant::now()));
            samples.push(rss_mib(pri.0.id()).context("the primary is gone")?);
        }
        stop("-CONT", sec.0.id()).context("kill -CONT")?;
        std::thread::sleep(Duration::from_secs(5));
        Ok(Run { label: label.to_string(), samples, drained: rss_mib(pri.0.id()) })
    })();
    drop((pri, sec));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `ftvm-bench held`.
pub fn held(seconds: u64, rate: u32, baseline: Option<PathBuf>) -> Result<()> {
    let mut runs = Vec::new();
    if let Some(old) = &baseline {
        eprintln!("baseline {}: streamer at {rate}/s, secondary SIGSTOPped for {seconds} s", old.display());
        runs.push(one(old, "baseline", seconds, rate)?);
    }
    let exe = ftvm_demo::ftvm_exe()?;
    eprintln!("this build {}: streamer at {rate}/s, secondary SIGSTOPped for {seconds} s", exe.display());
    runs.push(one(&exe, "this build", seconds, rate)?);
    println!("primary RSS (MiB), streamer at {rate} datagrams/s, secondary SIGSTOPped, no arbiter");
    print!("{:<12}", "second");
    for r in &runs {
        print!(" {:>12}", r.label);
    }
    println!();
    for s in 0..seconds as usize {
        if s % 5 != 4 && s != 0 {
            continue;
        }
        print!("{:<12}", s + 1);
        for r in &runs {
            print!(" {:>12.1}", r.samples.get(s).copied().unwrap_or(f64::NAN));
        }
        println!();
    }
    print!("{:<12}", "drained");
    for r in &runs {
        print!(" {:>12.1}", r.drained.unwrap_or(f64::NAN));
    }
    println!();
    Ok(())
}
