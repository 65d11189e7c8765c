//! `ftvm-bench repair`: how long a live state transfer takes to give a
//! running guest a new copy (redundancy lost → copy restored on the
//! receiver), and how long the guest stood still for it, for guests of
//! several sizes, idle, with memory written, and while writing; beside
//! them QEMU's own live migration of a guest of the same size on loopback,
//! measured in the same run.
//!
//! ftvm's side runs in this process: the `dirty` guest on real KVM, the
//! sender ([`replication::transfer::send`]) and the receiver (which builds
//! the copy with [`vmm::Vm::restore`]) on their own threads, over TCP on
//! loopback, every frame authenticated as in production. QEMU's side:
//! Debian's `qemu-system-x86_64` with KVM, a SeaBIOS-only guest whose RAM
//! is filled by `-device loader` with random bytes (as much as ftvm's guest
//! wrote), migrated over QMP to a second QEMU started with `-incoming`,
//! `max-bandwidth` raised (ftvm's transfer is not capped either); QEMU has
//! no guest that writes while it migrates, so the writing rows have no
//! QEMU figure.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use replication::transfer::{self, TransferOptions};
use serde::Serialize;
use vmm::hook::{ExitIndex, HookError, OutputSink};
use vmm::world::LiveInput;
use vmm::{BootSettings, Vm, VmConfig};

const KEY: &[u8] = b"ftvm-bench repair key, 32 bytes or more";

/// What the guest does while it is transferred.
#[derive(Clone, Copy, Debug, Serialize)]
enum Load {
    /// Never wrote its memory (beyond its image, heap header and stack).
    Idle,
    /// Wrote `written_mib` MiB, then sleeps.
    Written,
    /// Wrote `written_mib` MiB and keeps dirtying 50 MB/s.
    Dirtying,
}

impl Load {
    fn label(self, written_mib: u64) -> String {
        match self {
            Load::Idle => "idle (never written)".into(),
            Load::Written => format!("{written_mib} MiB written"),
            Load::Dirtying => format!("{written_mib} MiB written, dirtying 50 MB/s"),
        }
    }
}

/// One measured transfer.
#[derive(Debug, Serialize)]
struct Row {
    memory_mib: u64,
    load: String,
    repair_ms: f64,
    pause_ms: f64,
    rounds: u32,
    final_pages: u64,
    bytes_over_memory: f64,
    qemu: Option<QemuFigures>,
}

/// QEMU's migration of the same size and written memory.
#[derive(Clone, Debug, Serialize)]
struct QemuFigures {
    total_ms: f64,
    downtime_ms: f64,
    bytes_over_memory: f64,
}

/// Tells when the guest has filled its memory.
struct Watch(mpsc::Sender<()>, Vec<u8>);

impl OutputSink for Watch {
    fn serial(&mut self, _: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.1.extend_from_slice(bytes);
        if self.1.windows(6).any(|w| w == b"filled") {
            self.1.clear();
            let _ = self.0.send(());
        }
        if self.1.len() > 4096 {
            self.1.clear();
        }
        Ok(())
    }
}

fn guest_config(memory_mib: u64, written_mib: u64, load: Load) -> Result<VmConfig> {
    let guest = guest_images::find("dirty").ok_or_else(|| anyhow!("the dirty guest is not built in"))?;
    // 50 MB/s: 12 pages of 4 KiB every millisecond.
    let pages = if matches!(load, Load::Dirtying) { 12 } else { 0 };
    let fill = if matches!(load, Load::Idle) { 0 } else { written_mib };
    Ok(VmConfig {
        memory_mib,
        elf: guest.elf.to_vec(),
        boot: BootSettings {
            params: vec![
                ("fill_mib".into(), fill.to_string()),
                ("pages".into(), pages.to_string()),
                ("period_us".into(), "1000".into()),
                ("rounds".into(), "0".into()),
            ],
            ..BootSettings::default()
        },
        privilege: vmm::boot::Privilege::User,
        digest_every: None,
        test_devices: false,
    })
}

/// Transfer a running `dirty` guest once; the figures.
fn ftvm_once(memory_mib: u64, written_mib: u64, load: Load) -> Result<(f64, transfer::TransferReport)> {
    let config = guest_config(memory_mib, written_mib, load)?;
    let (filled_tx, filled) = mpsc::channel();
    let mut vm = Vm::new(
        &config,
        |stop| Box::new(LiveInput::new(0, vec![stop.wake_fd()])),
        Box::new(Watch(filled_tx, Vec::new())),
    )?;
    let stop = vm.stop_handle();
    let checkpointer = vm.checkpointer();
    std::thread::scope(|s| {
        let runner = s.spawn(|| vm.run());
        let measured = (|| {
            filled.recv_timeout(Duration::from_secs(120)).context("the guest did not fill its memory")?;
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let start = Instant::now();
            let receiver = s.spawn(move || -> Result<Instant> {
                let (stream, _) = listener.accept()?;
                let received = transfer::receive(stream, KEY, None, Duration::from_secs(30))?;
                let copy = Vm::restore(
                    &received.state,
                    received.memory,
                    |_| Box::new(LiveInput::new(0, Vec::new())),
                    Box::new(Watch(mpsc::channel().0, Vec::new())),
                )?;
                let done = Instant::now();
                drop(copy);
                Ok(done)
            });
            let options = TransferOptions::default();
            let report = transfer::send(TcpStream::connect(addr)?, KEY, &checkpointer, &options);
            let restored = receiver.join().map_err(|_| anyhow!("the receiver panicked"))?;
            let report = report?;
            let repair = restored?.duration_since(start);
            Ok((repair.as_secs_f64() * 1e3, report))
        })();
        stop.stop();
        let outcome = runner.join().map_err(|_| anyhow!("the guest's thread panicked"))?;
        outcome.context("the transferred guest failed")?;
        measured
    })
}

/// A running QEMU with a QMP socket.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn start(dir: &Path, name: &str, memory_mib: u64, extra: &[String]) -> Result<Qemu> {
        let socket = dir.join(format!("{name}.qmp"));
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-m"])
            .arg(format!("{memory_mib}M"))
            .args(["-nodefaults", "-display", "none", "-serial", "none", "-monitor", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start qemu-system-x86_64 (apt-get install --no-install-recommends qemu-system-x86)")?;
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) if started.elapsed() > Duration::from_secs(20) => {
                    return Err(e).context("QEMU's QMP socket never appeared")
                }
                // QEMU creates the socket once it has parsed its options:
                // nothing to wait on but the file itself.
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qemu = Qemu { child, qmp: BufReader::new(stream) };
        qemu.read_reply()?; // the greeting
        qemu.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(qemu)
    }

    /// The next line that is not an event.
    fn read_reply(&mut self) -> Result<serde_json::Value> {
        loop {
            let mut line = String::new();
            if self.qmp.read_line(&mut line)? == 0 {
                bail!("QEMU closed its QMP socket");
            }
            let value: serde_json::Value = serde_json::from_str(&line)?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    fn execute(&mut self, command: &str) -> Result<serde_json::Value> {
        self.qmp.get_mut().write_all(command.as_bytes())?;
        self.qmp.get_mut().write_all(b"\n")?;
        let reply = self.read_reply()?;
        if let Some(e) = reply.get("error") {
            bail!("QMP {command} failed: {e}");
        }
        Ok(reply)
    }
}

/// QEMU's migration of a `memory_mib` guest with `written_mib` MiB of random
/// bytes in RAM, uncapped, on loopback.
fn qemu_once(dir: &Path, memory_mib: u64, written_mib: u64) -> Result<QemuFigures> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut extra = Vec::new();
    if written_mib > 0 {
        let file = dir.join(format!("random-{written_mib}.bin"));
        if !file.exists() {
            let mut bytes = vec![0u8; usize::try_from(written_mib << 20)?];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for chunk in bytes.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            std::fs::write(&file, &bytes)?;
        }
        // Above SeaBIOS's low memory: 16 MiB.
        extra.extend(["-device".into(), format!("loader,file={},addr=0x1000000", file.display())]);
    }
    let _dst = Qemu::start(dir, "dst", memory_mib, &["-incoming".into(), format!("tcp:127.0.0.1:{port}")])?;
    let mut src = Qemu::start(dir, "src", memory_mib, &extra)?;
    src.execute(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":100000000000}}"#)?;
    src.execute(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#))?;
    let started = Instant::now();
    loop {
        let reply = src.execute(r#"{"execute":"query-migrate"}"#)?;
        let r = &reply["return"];
        match r["status"].as_str() {
            Some("completed") => {
                let bytes = r["ram"]["transferred"].as_f64().unwrap_or(0.0);
                return Ok(QemuFigures {
                    total_ms: r["total-time"].as_f64().unwrap_or(f64::NAN),
                    downtime_ms: r["downtime"].as_f64().unwrap_or(f64::NAN),
                    bytes_over_memory: bytes / (memory_mib << 20) as f64,
                });
            }
            Some("failed") | Some("cancelled") => bail!("QEMU's migration failed: {r}"),
            _ if started.elapsed() > Duration::from_secs(120) => bail!("QEMU's migration did not complete in 120 s"),
            // QMP has no blocking wait for completion (the MIGRATION event
            // would do, but polling query-migrate is what the figures need).
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// `ftvm-bench repair`.
pub fn repair(sizes: &[u64], qemu: bool, json: bool) -> Result<()> {
    let dir = tempdir()?;
    let mut rows = Vec::new();
    for &memory_mib in sizes {
        let written_mib = 200.min(memory_mib.saturating_sub(24));
        for load in [Load::Idle, Load::Written, Load::Dirtying] {
            eprintln!("{memory_mib} MiB, {}", load.label(written_mib));
            let (repair_ms, report) = ftvm_once(memory_mib, written_mib, load)?;
            let qemu_figures = match (qemu, load) {
                (true, Load::Idle) => Some(qemu_once(&dir, memory_mib, 0)?),
                (true, Load::Written) => Some(qemu_once(&dir, memory_mib, written_mib)?),
                _ => None,
            };
            rows.push(Row {
                memory_mib,
                load: load.label(written_mib),
                repair_ms,
                pause_ms: report.pause.as_secs_f64() * 1e3,
                rounds: report.rounds,
                final_pages: report.final_pages,
                bytes_over_memory: report.bytes_sent as f64 / report.memory_bytes.max(1) as f64,
                qemu: qemu_figures,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("repair: live state transfer to an empty host over loopback (ftvm) beside QEMU 7.2 live migration (KVM, uncapped)");
    println!(
        "{:>6}  {:<36} {:>10} {:>9} {:>6} {:>7} {:>7} | {:>10} {:>10} {:>7}",
        "MiB", "load", "repair ms", "pause ms", "rounds", "final p", "bytes/M", "qemu ms", "qemu down", "bytes/M"
    );
    for r in &rows {
        let (q_total, q_down, q_bytes) = match &r.qemu {
            Some(q) => {
                (format!("{:.1}", q.total_ms), format!("{:.1}", q.downtime_ms), format!("{:.2}", q.bytes_over_memory))
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>6}  {:<36} {:>10.1} {:>9.2} {:>6} {:>7} {:>7.2} | {:>10} {:>10} {:>7}",
            r.memory_mib,
            r.load,
            r.repair_ms,
            r.pause_ms,
            r.rounds,
            r.final_pages,
            r.bytes_over_memory,
            q_total,
            q_down,
            q_bytes
        );
    }
    println!("targets: faster than QEMU for every size and load; idle 256 MiB < 50 ms; 200 MiB written < 500 ms;");
    println!("         1 GiB dirtying 50 MB/s < 3000 ms; pause < 5 ms");
    println!("(QEMU has no guest writing during its migration: the dirtying rows have no QEMU figure)");
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ftvm-bench-repair-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
