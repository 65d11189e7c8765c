//! `ftvm`: parses the command line, wires the VMM to the `pair` crate's
//! sessions, and maps every outcome to a documented exit status ([`exit`]):
//! 0 guest powered off cleanly, 1 error, 2 bad usage, 3 guest fault, 4 lost
//! the arbiter, 128+N stopped by signal N.
#![forbid(unsafe_code)]

mod cli;
mod config;
mod exit;
mod metrics;
mod protect;
mod serial;

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;
use vmm::boot::Privilege;
use vmm::vcpu::RunOutcome;
use vmm::world::{LiveInput, LiveOutput};
use vmm::{BootSettings, Vm, VmConfig, VmError};

use crate::cli::{Cli, Command};
use crate::config::{GuestSettings, GuestSource, SerialTarget};
use crate::exit::{EXIT_ERROR, EXIT_GUEST_FAULT, EXIT_SIGNAL_BASE, EXIT_USAGE};

/// An error with the exit status it maps to.
struct Failure {
    code: i32,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = if let Some(c) = error.downcast_ref::<config::ConfigError>() {
            c.exit_code()
        } else if let Some(v) = error.downcast_ref::<VmError>() {
            if v.is_guest_fault() {
                EXIT_GUEST_FAULT
            } else {
                EXIT_ERROR
            }
        } else if let Some(pair::Interrupted(signal)) = error.downcast_ref::<pair::Interrupted>() {
            exit::EXIT_SIGNAL_BASE + signal
        } else if error.downcast_ref::<pair::failover::LiveElsewhere>().is_some() {
            exit::EXIT_LOST_ARBITER
        } else if error.downcast_ref::<UsageError>().is_some() {
            EXIT_USAGE
        } else if let Some(i) = error.downcast_ref::<ftvm_demo::Interrupted>() {
            i.exit_code()
        } else {
            EXIT_ERROR
        };
        Failure { code, error }
    }
}

/// A flag value that is invalid in itself but only the binary can tell
/// (an embedded guest name that does not exist).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(Failure { code, error }) => {
            // The whole chain, once, on one line.
            let mut line = format!("ftvm: {error}");
            for cause in error.chain().skip(1) {
                line.push_str(&format!(": {cause}"));
            }
            let _ = writeln!(std::io::stderr(), "{line}");
            code
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// clap's error as one line on stderr and status 2; `--help` and
/// `--version` print as clap does and exit 0.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    // clap's message runs up to the blank line before "Usage:"; some spread
    // it over several lines (the arguments missing): one line here.
    let message: Vec<&str> =
        text.lines().take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:")).map(str::trim).collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    let message = if message.is_empty() { "invalid command line" } else { message };
    let help = match std::env::args().nth(1).filter(|a| Cli::command().find_subcommand(a).is_some()) {
        Some(sub) => format!("ftvm {sub} --help"),
        None => "ftvm --help".to_string(),
    };
    let _ = writeln!(std::io::stderr(), "ftvm: {message} (try `{help}`)");
    ExitCode::from(EXIT_USAGE as u8)
}

fn dispatch(cli: Cli) -> Result<i32, Failure> {
    match cli.command {
        Command::Guests(args) => {
            list_guests(args.all);
            Ok(0)
        }
        Command::Run(args) => run(&config::resolve(&args.guest)?, args.metrics.metrics, None),
        Command::Primary(args) => primary(&args),
        Command::Secondary(args) => secondary(&args),
        Command::Status(args) => {
            protect::status(&named_control(args.control.as_deref(), args.name.as_deref())?, args.json)?;
            Ok(0)
        }
        Command::Keygen(args) => keygen(args.out.as_deref()),
        Command::Switchover(args) => {
            Ok(protect::switchover(&named_control(args.control.as_deref(), args.name.as_deref())?, args.json)?)
        }
        Command::Arbiter(args) => arbiter(&args),
        Command::Demo(args) => {
            match args.fault {
                Some(fault) => ftvm_demo::fault_demo(args.guest, fault)?,
                None => ftvm_demo::demo(args.guest, args.failure)?,
            }
            Ok(0)
        }
        Command::Completions(args) => {
            use clap_complete::Shell;
            let shell = match args.shell {
                cli::CompletionShell::Bash => Shell::Bash,
                cli::CompletionShell::Zsh => Shell::Zsh,
                cli::CompletionShell::Fish => Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "ftvm", &mut std::io::stdout());
            Ok(0)
        }
    }
}

fn list_guests(all: bool) {
    let width = guest_images::GUESTS.iter().map(|g| g.name.len()).max().unwrap_or(0);
    for g in guest_images::GUESTS.iter().filter(|g| all || !g.test_only) {
        let tag = if g.test_only { " (test guest)" } else { "" };
        println!("{:<width$}  {}{tag}", g.name, g.description);
    }
}

/// The guest image's bytes and the privilege level it starts at (an ELF
/// file starts at CPL 3, as every ftvm guest does).
fn load_image(source: &GuestSource) -> Result<(Vec<u8>, Privilege), Failure> {
    match source {
        GuestSource::Embedded(name) => match guest_images::find(name) {
            Some(g) => Ok((g.elf.to_vec(), if g.kernel_mode { Privilege::Kernel } else { Privilege::User })),
            None => {
                Err(UsageError(format!("--guest {name:?}: no embedded guest has that name (`ftvm guests` lists them)"))
                    .into())
            }
        },
        GuestSource::File(path) => Ok((read_image(path)?, Privilege::User)),
    }
}

/// A guest image file, refused when it holds more than
/// [`config::MAX_IMAGE_MIB`]: a regular file by its size before reading,
/// anything else (a device, a FIFO) after at most the cap and one byte.
fn read_image(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let cap = config::MAX_IMAGE_MIB << 20;
    let too_big = || {
        anyhow::anyhow!(
            "guest image {} is larger than {} MiB, the most a guest image may hold",
            path.display(),
            config::MAX_IMAGE_MIB
        )
    };
    let cannot = || format!("cannot read guest image {}", path.display());
    let file = std::fs::File::open(path).with_context(cannot)?;
    let meta = file.metadata().with_context(cannot)?;
    if meta.is_file() && meta.len() > cap {
        return Err(too_big().into());
    }
    let mut elf = Vec::new();
    file.take(cap + 1).read_to_end(&mut elf).with_context(cannot)?;
    if elf.len() as u64 > cap {
        return Err(too_big().into());
    }
    Ok(elf)
}

/// Stop the VM on SIGINT/SIGTERM/SIGHUP; remember which signal it was.
pub(crate) fn stop_on_signals(vm: &Vm) -> Result<Arc<AtomicI32>> {
    catch_signals()?.stop(vm)
}

/// SIGINT/SIGTERM/SIGHUP caught from now on, to stop a VM made later: a
/// signal that arrives while the VM is being made is kept, not lost.
pub(crate) struct CaughtSignals(signal_hook::iterator::Signals);

pub(crate) fn catch_signals() -> Result<CaughtSignals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).context("cannot install signal handlers")?;
    Ok(CaughtSignals(signals))
}

impl CaughtSignals {
    /// Stop `vm` on the first signal (at once if one came already); which
    /// signal it was.
    pub(crate) fn stop(self, vm: &Vm) -> Result<Arc<AtomicI32>> {
        let caught = Arc::new(AtomicI32::new(0));
        let mut signals = self.0;
        let stop = vm.stop_handle();
        let seen = caught.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    seen.store(signal, Ordering::SeqCst);
                    stop.stop();
                }
            })
            .context("cannot start the signal thread")?;
        Ok(caught)
    }
}

/// Open an existing TAP device. Refuses a name that does not exist rather
/// than let the kernel create a transient TAP that nothing configured.
fn open_tap(name: &str) -> Result<Arc<vmm::tap::Tap>, Failure> {
    if !vmm::tap::Tap::exists(name) {
        return Err(anyhow::anyhow!(
            "TAP device {name} does not exist in this network namespace (create it with `ip tuntap add dev {name} mode tap`)"
        )
        .into());
    }
    Ok(Arc::new(vmm::tap::Tap::open(name).with_context(|| format!("cannot attach to TAP device {name}"))?))
}

/// What every command that runs a guest prepares from GUEST-OPTS: the VM
/// configuration, the TAP (opened), and the serial writer.
struct Prepared {
    config: VmConfig,
    tap: Option<Arc<vmm::tap::Tap>>,
    serial: Box<dyn Write + Send>,
}

/// The serial console's writer (`--serial`).
fn serial_writer(settings: &GuestSettings) -> Result<Box<dyn Write + Send>, Failure> {
    Ok(match &settings.serial {
        SerialTarget::Stdout => Box::new(std::io::stdout()),
        SerialTarget::File(path) => Box::new(
            serial::RotatingFile::create(path, Some(settings.serial_max_mib << 20))
                .with_context(|| format!("cannot create serial file {}", path.display()))?,
        ),
    })
}

fn prepare(settings: &GuestSettings, digest_every: Option<u64>) -> Result<Prepared, Failure> {
    let (elf, privilege) = load_image(&settings.guest)?;
    let serial = serial_writer(settings)?;
    let config = VmConfig {
        memory_mib: settings.memory_mib,
        elf,
        boot: BootSettings {
            mac: settings.tap.as_ref().map(|_| settings.mac),
            ip: settings.ip,
            gateway: settings.gateway,
            params: settings.params.clone(),
        },
        privilege,
        digest_every,
        test_devices: false,
    };
    let tap = settings.tap.as_deref().map(open_tap).transpose()?;
    Ok(Prepared { config, tap, serial })
}

/// Map how a guest's run ended to the exit status (and its one line).
fn finish(settings: &GuestSettings, outcome: Result<RunOutcome, VmError>, caught: &AtomicI32) -> anyhow::Result<i32> {
    match outcome {
        Ok(RunOutcome::PoweredOff { status: 0, exit_index }) => {
            tracing::info!(vm = %settings.name, %exit_index, "guest powered off");
            Ok(0)
        }
        Ok(RunOutcome::PoweredOff { status, exit_index }) => {
            let _ = writeln!(
                std::io::stderr(),
                "ftvm: guest {} powered off with status {status} (at guest exit #{exit_index})",
                settings.name
            );
            Ok(EXIT_ERROR)
        }
        Ok(RunOutcome::Stopped { exit_index }) => {
            let signal = caught.load(Ordering::SeqCst);
            let _ = writeln!(
                std::io::stderr(),
                "ftvm: guest {} stopped by signal {signal} at guest exit #{exit_index}",
                settings.name
            );
            Ok(EXIT_SIGNAL_BASE + signal)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("guest {} stopped", settings.name))),
    }
}

/// `ftvm run`: one guest, unprotected; with `--metrics`, its exits and
/// role on a status board that the endpoint reads (and, for
/// `--unprotected-start`, the control socket: `ftvm status` and the
/// cluster agents see the standalone copy).
fn run(
    settings: &GuestSettings,
    metrics: Option<std::net::SocketAddr>,
    control: Option<std::path::PathBuf>,
) -> Result<i32, Failure> {
    let endpoint = metrics.map(metrics::Endpoint::bind).transpose()?;
    let Prepared { config, tap, serial } = prepare(settings, None)?;
    let board = (endpoint.is_some() || control.is_some()).then(|| {
        let board = Arc::new(pair::Board::new(settings.name.clone(), pair::Role::Standalone));
        board.set_state(if control.is_some() { "running unprotected (--unprotected-start)" } else { "running" });
        board
    });
    if let (Some(e), Some(b)) = (endpoint, &board) {
        e.serve(b.clone())?;
    }
    let _control = match (&control, &board) {
        (Some(path), Some(b)) => Some(pair::ControlSocket::serve(path, b.clone())?),
        _ => None,
    };
    let mut output = LiveOutput::new(serial);
    if let Some(tap) = &tap {
        output = output.with_tap(tap.clone());
    }
    let output = Box::new(output);
    let input = |stop: &vmm::vcpu::StopHandle| -> Box<dyn vmm::hook::InputSource> {
        let input = LiveInput::new(0, vec![stop.wake_fd()]);
        let input = match tap {
            Some(tap) => input.with_tap(tap),
            None => input,
        };
        match board {
            Some(board) => Box::new(metrics::CountExits { inner: input, board }),
            None => Box::new(input),
        }
    };
    let mut vm = Vm::new(&config, input, output).with_context(|| format!("cannot start guest {}", settings.name))?;
    let caught = stop_on_signals(&vm)?;
    tracing::info!(vm = %settings.name, memory_mib = settings.memory_mib, "guest starting");
    Ok(finish(settings, vm.run(), &caught)?)
}

/// The control socket a client command (`status`, `switchover`) talks to:
/// `--control`, or that of `--name` (the default guest's without it); a
/// name that is not one is bad usage.
fn named_control(control: Option<&std::path::Path>, name: Option<&str>) -> Result<std::path::PathBuf, Failure> {
    let name = name.unwrap_or(config::DEFAULT_GUEST);
    if !config::is_valid_name(name) {
        return Err(UsageError(format!(
            "--name {name:?} is not a valid name: use 1 to {} characters from A-Z a-z 0-9 _ . -",
            config::MAX_NAME_LEN
        ))
        .into());
    }
    Ok(control_path(control, name))
}

/// The control socket: the flag, or /run/ftvm/NAME.sock.
pub(crate) fn control_path(flag: Option<&std::path::Path>, name: &str) -> std::path::PathBuf {
    flag.map(std::path::Path::to_path_buf).unwrap_or_else(|| std::path::PathBuf::from(format!("/run/ftvm/{name}.sock")))
}

/// `ftvm primary`.
fn primary(args: &cli::PrimaryArgs) -> Result<i32, Failure> {
    let role = config::PairRole::Primary;
    let (settings, mut pair) = config::resolve_pair(&args.guest, &args.pair, args.peer.as_deref(), role)?;
    pair.standby = config::check_standby(&args.standby)?;
    pair.switch_listen = config::check_switch_listen(args.switch_listen.as_deref())?;
    if args.unprotected_start && pair.standby.is_empty() {
        return unprotected_start(&settings, &pair, args.metrics.metrics);
    }
    let start = if args.unprotected_start {
        // Alone, with spares: a primary session from the start, which
        // re-protects itself onto them. Claims the arbiter first, as below.
        let ownership =
            pair.arbiter.as_deref().map(|spec| pair::failover::claim_alone(spec, &settings.name)).transpose()?;
        let _ = writeln!(
            std::io::stderr(),
            "ftvm: primary {}: --unprotected-start: running without a secondary, UNPROTECTED until it re-protects onto --standby",
            settings.name
        );
        protect::Start::Unprotected(ownership)
    } else {
        protect::Start::Paired
    };
    let endpoint = args.metrics.metrics.map(metrics::Endpoint::bind).transpose()?;
    let Prepared { config, tap, serial } = prepare(&settings, Some(pair.digest_every))?;
    Ok(protect::primary(&settings, config, tap, serial, &pair, endpoint, start)?)
}

/// `ftvm primary --unprotected-start`: no secondary. A copy that will emit
/// to the world claims the arbiter first (when there is one): if it names a
/// live copy of this guest, this one exits 4 without emitting anything.
fn unprotected_start(
    settings: &GuestSettings,
    pair: &config::PairConfig,
    metrics: Option<std::net::SocketAddr>,
) -> Result<i32, Failure> {
    let ownership = match &pair.arbiter {
        Some(spec) => Some(pair::failover::claim_alone(spec, &settings.name)?),
        None => None,
    };
    let _ = writeln!(
        std::io::stderr(),
        "ftvm: primary {}: --unprotected-start: running without a secondary, UNPROTECTED",
        settings.name
    );
    let code = run(settings, metrics, Some(control_path(pair.control.as_deref(), &settings.name)));
    if let Some(o) = ownership {
        o.release();
    }
    code
}

/// `ftvm secondary`: the guest's NIC is attached (the device state must
/// match the primary's) but its TAP is not opened: nothing reaches the world.
fn secondary(args: &cli::SecondaryArgs) -> Result<i32, Failure> {
    let role = config::PairRole::Secondary;
    let (settings, mut pair) = config::resolve_pair(&args.guest, &args.pair, args.listen.as_deref(), role)?;
    pair.standby = config::check_standby(&args.standby)?;
    // Switched over, a secondary that became the primary waits as a standby
    // where it listened before.
    pair.switch_listen = Some(pair.address.clone());
    if config::is_standby(&args.guest)? {
        if let Some(tap) = &settings.tap {
            if !vmm::tap::Tap::exists(tap) {
                return Err(anyhow::anyhow!("TAP device {tap} does not exist in this network namespace").into());
            }
        }
        let endpoint = args.metrics.metrics.map(metrics::Endpoint::bind).transpose()?;
        let serial = serial_writer(&settings)?;
        let delay = std::time::Duration::from_millis(args.ack_delay_ms);
        return Ok(protect::standby(&settings, serial, &pair, delay, endpoint)?);
    }
    let mut no_tap = settings.clone();
    no_tap.tap = None;
    let endpoint = args.metrics.metrics.map(metrics::Endpoint::bind).transpose()?;
    let Prepared { mut config, serial, .. } = prepare(&no_tap, Some(pair.digest_every))?;
    config.boot.mac = settings.tap.as_ref().map(|_| settings.mac);
    if let Some(tap) = &settings.tap {
        // Opened only at go-live, but it must exist now.
        if !vmm::tap::Tap::exists(tap) {
            return Err(anyhow::anyhow!("TAP device {tap} does not exist in this network namespace").into());
        }
    }
    let delay = std::time::Duration::from_millis(args.ack_delay_ms);
    Ok(protect::secondary(&settings, config, serial, &pair, delay, endpoint)?)
}

/// `ftvm arbiter show|release`.
fn arbiter(args: &cli::ArbiterArgs) -> Result<i32, Failure> {
    let arbiter = heartbeat::Arbiter::open(&args.arbiter).map_err(|e| UsageError(format!("--arbiter: {e}")))?;
    let (generation, owner) = arbiter.current().context("cannot read the arbiter")?;
    let owner = owner.map_or_else(|| "(none)".to_string(), |o| o.to_string());
    if args.release {
        if arbiter.release(generation, None).context("cannot release the arbiter")? {
            println!("released: generation {} now has no owner (was {owner})", generation.0 + 1);
        } else {
            return Err(anyhow::anyhow!("the arbiter changed while releasing it: nothing done").into());
        }
    } else {
        println!("generation {}\nowner {owner}", generation.0);
    }
    Ok(0)
}

fn keygen(out: Option<&std::path::Path>) -> Result<i32, Failure> {
    let key = replication::key::generate();
    match out {
        None => println!("{key}"),
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("cannot create the key's directory {}", dir.display()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create key file {}", path.display()))?;
            writeln!(f, "{key}").with_context(|| format!("cannot write key file {}", path.display()))?;
        }
    }
    Ok(0)
}
