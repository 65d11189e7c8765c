//! The `ftvm` command line (README, "Command line"), as clap derive types.
//!
//! This module only describes what can be typed; [`crate::config`] turns the
//! GUEST-OPTS ([`GuestArgs`]) and the `--config` file into validated settings.
//!
//! Parsing: the binary calls [`clap::Parser::try_parse`] on [`Cli`] and, on
//! error, `err.exit()`. clap then prints its own message and exits with
//! [`crate::exit::EXIT_USAGE`] (2) for a command line it cannot parse (unknown flag, missing
//! subcommand, a number that is not a number, `--seconds 0`), or 0 after
//! printing `--help` / `--version`. `Cli::parse()` would do the same; calling
//! `try_parse` keeps the decision visible in `main`.
//!
//! Flags that have a default are `Option`s here, with the default stated in
//! their help line, because a flag that was not typed must not hide the value
//! from the `--config` file: the defaults are applied in [`crate::config`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{DEFAULT_GUEST, DEFAULT_MEMORY_MIB, DEFAULT_SERIAL_MAX_MIB, MAX_IMAGE_MIB, SERIAL_MAX_MIB_LIMIT};

/// `ftvm`: fault-tolerant virtual machines on KVM.
#[derive(Debug, Parser)]
#[command(
    name = "ftvm",
    version,
    about = "Fault-tolerant virtual machines on KVM: lockstep record/replay with fast failover",
    propagate_version = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
// One value per process, parsed once: boxing `RunArgs` would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the guest images embedded in this binary.
    Guests(GuestsArgs),
    /// Run one guest, unprotected (no secondary).
    Run(RunArgs),
    /// Run one guest as the primary of a protected pair: inputs are logged
    /// to the secondary at --peer, outputs wait for its acknowledgement.
    Primary(PrimaryArgs),
    /// Run one guest as the secondary of a protected pair: replay the
    /// primary's log (from --listen), outputs suppressed.
    Secondary(SecondaryArgs),
    /// Show a running pair process's role, exit index, log positions, peer.
    Status(StatusArgs),
    /// Planned switchover: swap the roles of a protected pair (run on the
    /// primary's host). The secondary takes the guest over at an exit
    /// boundary and goes live; this primary's stopped copy becomes its
    /// secondary with no state transfer (it waits on --switch-listen for the
    /// new primary's log). Exits 0 once the other copy is live, 1 with the
    /// reason otherwise
    Switchover(SwitchoverArgs),
    /// Print a new random shared key (64 hex digits) for --key-file.
    Keygen(KeygenArgs),
    /// Show the split-brain arbiter's generation and owner, or release an
    /// owner known to be gone (its host died) so that a new pair may start.
    Arbiter(ArbiterArgs),
    /// The whole story on one machine (root): a protected pair in a lab of
    /// namespaces, a client at work, the primary killed, the figures beside
    /// VMware FT's, every acknowledged write checked.
    Demo(DemoArgs),
    /// Print a shell completion script for ftvm (bash, zsh or fish) to
    /// stdout.
    Completions(CompletionsArgs),
}

/// `--metrics ADDR`, on every subcommand that runs a guest.
#[derive(Debug, Default, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (OpenMetrics to
    /// Prometheus, the classic text format to other clients), e.g.
    /// 127.0.0.1:9464; a pair process serves them once paired [default:
    /// none]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `ftvm completions SHELL`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// The shells `ftvm completions` writes for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// PAIR-OPTS shared by `primary` and `secondary`. Each may also come from
/// the `--config` file (same names without dashes); flags override it, and
/// [`crate::config::resolve_pair`] applies the defaults and validates.
#[derive(Debug, Default, Clone, Args)]
pub struct PairArgs {
    /// The pair's shared key: a file of at least 32 bytes (64 hex digits as
    /// `ftvm keygen` writes), readable by its owner only [required]
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Control socket for `ftvm status` [default: /run/ftvm/NAME.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Compare a digest of vCPU, device and dirtied-memory state every N
    /// guest exits; both hosts must use the same N [default: 1000]
    #[arg(long, value_name = "N")]
    pub digest_every: Option<u64>,
    /// Shared storage for the split-brain arbiter (`file:PATH`; the file is
    /// created if missing, its directory must exist). Enables failover:
    /// without it a pair process that loses its peer stops its guest
    #[arg(long, value_name = "file:PATH")]
    pub arbiter: Option<String>,
    /// Heartbeat interval on the dedicated link, in milliseconds, 1 to
    /// 10000; four heartbeats go out per interval (two with --dead-after)
    /// [default: 10]
    #[arg(long, value_name = "N")]
    pub heartbeat_ms: Option<u64>,
    /// The peer is dead after this many heartbeat intervals of silence, 2 to
    /// 1000, fixed. Without it the silence limit adapts to the link: from
    /// the heartbeats' measured loss and jitter (about 14 ms on a quiet
    /// link, 60-85 ms at 10 % loss and 5 ms ± 5 ms), 5 intervals until
    /// measured
    #[arg(long, value_name = "N")]
    pub dead_after: Option<u32>,
    /// With --arbiter: the secondary is treated as lost when its replay falls
    /// this many milliseconds of the primary's execution behind, 10 to
    /// 600000 [default: 3000]
    #[arg(long, value_name = "MS")]
    pub max_lag_ms: Option<u64>,
    /// Write the final vCPU state and guest memory to FILE when the guest
    /// stops (for comparing the two hosts).
    #[arg(long, value_name = "FILE", hide = true)]
    pub state_dump: Option<PathBuf>,
    /// Fault containment: on, a guest fault hands the guest over to the
    /// secondary, which goes live from the last healthy point (barrier);
    /// off, VMware FT's behaviour: the secondary replays into the fault
    /// [default: on]
    #[arg(long, value_name = "on|off")]
    pub containment: Option<String>,
    /// Once the guest has reported health at least once, a report missing
    /// for this many milliseconds is a fault; 0: off, 1 to 600000
    /// [default: 30]
    #[arg(long, value_name = "N")]
    pub health_deadline_ms: Option<u64>,
    /// The vCPU inside the guest without a single exit for this many
    /// milliseconds is a fault (time asleep in HLT does not count); 0: off,
    /// else 100 to 600000 [default: 1000]
    #[arg(long, value_name = "N")]
    pub hang_ms: Option<u64>,
    /// A host-side probe of the service where the guest is live:
    /// `tcp:PORT` connects to the guest's --ip, `exec:COMMAND` runs COMMAND
    /// with sh -c (exit status 0: healthy)
    #[arg(long, value_name = "tcp:PORT|exec:COMMAND")]
    pub probe: Option<String>,
    /// Milliseconds between probes, 1 to 600000 [default: 100]
    #[arg(long, value_name = "MS")]
    pub probe_interval_ms: Option<u64>,
    /// A probe not answered within this many milliseconds failed, 1 to
    /// 600000 [default: 100]
    #[arg(long, value_name = "MS")]
    pub probe_timeout_ms: Option<u64>,
    /// Consecutive probe failures that make a fault, 1 to 1000 [default: 3]
    #[arg(long, value_name = "N")]
    pub probe_failures: Option<u32>,
    /// The host interface the guest's clients come through: losing its
    /// carrier (or the guest's --gateway no longer answering ARP from this
    /// host) is a fault, handed over like a guest fault
    #[arg(long, value_name = "IFACE")]
    pub uplink: Option<String>,
    /// What a copy that cannot hand a fault over does (running alone, the
    /// channel down, or a fault within --fault-window of a containment):
    /// `restart` boots the guest again from its image, `stop` exits with
    /// status 5 [default: stop]
    #[arg(long, value_name = "restart|stop")]
    pub on_fault: Option<String>,
    /// A fault within this many milliseconds after a containment (or a
    /// restart) is not contained again (escalation), 0 to 86400000
    /// [default: 10000]
    #[arg(long, value_name = "MS")]
    pub fault_window: Option<u64>,
    /// `fast`: outputs go under the plain output rule (a containment may
    /// roll back what a client saw since the last barrier); `strict`: an
    /// output goes only once a barrier after it is acknowledged
    /// [default: fast]
    #[arg(long, value_name = "fast|strict")]
    pub output_mode: Option<String>,
}

/// `ftvm primary GUEST-OPTS PAIR-OPTS --peer HOST:PORT`.
#[derive(Debug, Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub pair: PairArgs,
    /// The secondary's logging-channel address on the dedicated link,
    /// HOST:PORT (an IPv6 address in brackets) [required]
    #[arg(long, value_name = "HOST:PORT")]
    pub peer: Option<String>,
    /// Start without a secondary and run unprotected (says so); outputs are
    /// released at once. With --arbiter, the arbiter is claimed first: a
    /// copy that loses exits 4 without emitting anything.
    #[arg(long)]
    pub unprotected_start: bool,
    /// A spare host's `ftvm secondary` (one started without guest
    /// settings), HOST:PORT; repeatable. Whenever this copy runs alone (its
    /// secondary lost), it re-protects itself onto the first spare that
    /// takes the guest's state (a live transfer while the guest runs), in
    /// turn, retrying with backoff
    #[arg(long, value_name = "HOST:PORT")]
    pub standby: Vec<String>,
    /// Where this copy waits as the new primary's secondary after a planned
    /// switchover (`ftvm switchover`) handed its guest over: the new primary
    /// (the secondary, started with `--standby` naming this address) sends
    /// its log here. Without it `ftvm switchover` is refused
    #[arg(long, value_name = "HOST:PORT")]
    pub switch_listen: Option<String>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// `ftvm secondary GUEST-OPTS PAIR-OPTS --listen HOST:PORT`.
#[derive(Debug, Args)]
pub struct SecondaryArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub pair: PairArgs,
    /// Where to accept the primary's logging channel, HOST:PORT [required]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// A spare's standby `ftvm secondary`, HOST:PORT; repeatable. Once this
    /// copy went live (its primary lost), it re-protects itself onto the
    /// first that takes the guest, as a primary's --standby does
    #[arg(long, value_name = "HOST:PORT")]
    pub standby: Vec<String>,
    /// Test knob: hold every ack this long (shows the output rule at work).
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pub ack_delay_ms: u64,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// `ftvm status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The pair process's control socket [default: /run/ftvm/NAME.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The VM name, for the default control socket.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm switchover`.
#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// The primary's control socket [default: /run/ftvm/NAME.sock].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// The VM name, for the default control socket.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Print the answer as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `ftvm demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The protected guest.
    #[arg(long, value_enum, default_value = "kvstore")]
    pub guest: ftvm_demo::DemoGuest,
    /// How the primary fails: `process` (SIGKILL of the VMM) or `host` (its
    /// host falls silent, then SIGKILL: detection by heartbeats alone).
    #[arg(long, value_enum, default_value = "process")]
    pub failure: ftvm_demo::Failure,
    /// Instead of failing the primary, make its guest fail (the thesis'
    /// halt experiment with `halt`): once with containment, once without
    /// (VMware FT's behaviour), side by side.
    #[arg(long, value_enum, value_name = "halt|panic|crash|hang|unhealthy", conflicts_with = "failure")]
    pub fault: Option<ftvm_demo::DemoFault>,
}

/// `ftvm arbiter`.
#[derive(Debug, Args)]
pub struct ArbiterArgs {
    /// The arbiter (`file:PATH`), as the pair uses it.
    #[arg(long, value_name = "file:PATH")]
    pub arbiter: String,
    /// Clear the owner: only when that copy is known to be gone (a live
    /// copy keeps running, and a new pair would make a second one).
    #[arg(long)]
    pub release: bool,
}

/// `ftvm keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write the key to FILE (created with mode 0600; its directory, if
    /// missing, with mode 0700) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `ftvm guests`.
#[derive(Debug, Args)]
pub struct GuestsArgs {
    /// Also list the test guests (used by tests and benchmarks).
    #[arg(long)]
    pub all: bool,
}

/// `ftvm run GUEST-OPTS`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest to run and its settings.
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// GUEST-OPTS, shared by every subcommand that runs a guest (`run`,
/// `primary`, `secondary`). Raw strings: [`crate::config::resolve`] (and
/// [`crate::config::resolve_pair`]) merges them with the `--config` file and validates the result, so a value
/// from either source passes the same checks and gives the same error.
#[derive(Debug, Default, Clone, Args)]
pub struct GuestArgs {
    /// `--guest NAME|PATH`; the help line is [`guest_help`]'s.
    #[arg(long, value_name = "NAME|PATH", help = guest_help())]
    pub guest: Option<String>,

    /// `--memory-mib N`; the help line is [`memory_help`]'s.
    #[arg(long, value_name = "N", help = memory_help())]
    pub memory_mib: Option<u64>,

    /// Name of this VM in logs and for its control socket: 1 to 64 characters
    /// from A-Z a-z 0-9 _ . - [default: the guest's name; for a PATH, its
    /// file name without extension]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Host TAP device backing the guest's NIC (1 to 15 bytes) [default:
    /// none: the guest has no NIC]
    #[arg(long, value_name = "IFNAME")]
    pub tap: Option<String>,

    /// Guest MAC address, six hex pairs separated by `:`, unicast [default:
    /// 02:xx:xx:xx:xx:xx, locally administered, xx = the first five bytes of
    /// the 64-bit FNV-1a hash of --name]
    #[arg(long, value_name = "MAC")]
    pub mac: Option<String>,

    /// Guest IPv4 address and prefix length, ADDR/PREFIX with PREFIX in
    /// 1..=32 (e.g. 10.0.0.2/24); needs --tap [default: none]
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub ip: Option<String>,

    /// Guest default gateway, an IPv4 address inside the --ip subnet
    /// [default: none]
    #[arg(long, value_name = "IP")]
    pub gateway: Option<String>,

    /// A KEY=VALUE setting passed to the guest; repeatable (e.g. streamer:
    /// dest=IP:PORT, rate=PPS); keys must be unique [default: none]
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,

    /// Where the guest's serial console goes: `stdout` or a FILE path
    /// [default: stdout]
    #[arg(long, value_name = "stdout|FILE")]
    pub serial: Option<String>,

    /// `--serial-max-mib N`; the help line is [`serial_max_help`]'s.
    #[arg(long, value_name = "N", help = serial_max_help())]
    pub serial_max_mib: Option<u64>,

    /// TOML file carrying any of these settings, and for primary/secondary
    /// the PAIR-OPTS, under the same names without dashes (memory-mib = 64,
    /// param = ["rate=100"], key-file = "/etc/ftvm/pair.key"); flags
    /// override it [default: none]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The help lines that quote a constant, so the text cannot drift from it.
fn guest_help() -> String {
    format!(
        "Guest image: an embedded image's NAME (see `ftvm guests`) or an ELF file's PATH; \
         a value containing `/`, ending in `.elf` or naming an existing file is a path; \
         a file may hold at most {MAX_IMAGE_MIB} MiB [default: {DEFAULT_GUEST}]"
    )
}

fn serial_max_help() -> String {
    format!(
        "Cap on a --serial FILE, in MiB, 0 to {SERIAL_MAX_MIB_LIMIT}: when the console would pass it, a regular FILE \
         is renamed to FILE.1 (replacing the one before) and a new FILE begins; 0: no cap \
         [default: {DEFAULT_SERIAL_MAX_MIB}]"
    )
}

fn memory_help() -> String {
    format!(
        "Guest RAM in MiB, {}..={} [default: {DEFAULT_MEMORY_MIB}]",
        ftvm_abi::MIN_MEMORY_MIB,
        ftvm_abi::MAX_MEMORY_MIB
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::EXIT_USAGE;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ftvm").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        // Catches conflicting names, bad defaults and the like, which clap
        // otherwise reports only when the faulty path is parsed.
        Cli::command().debug_assert();
    }

    #[test]
    fn guests_with_and_without_all() {
        let Command::Guests(g) = parse(&["guests"]).unwrap().command else {
            panic!("`ftvm guests` parsed as another subcommand");
        };
        assert!(!g.all);
        let Command::Guests(g) = parse(&["guests", "--all"]).unwrap().command else {
            panic!("`ftvm guests --all` parsed as another subcommand");
        };
        assert!(g.all);
    }

    #[test]
    fn run_without_flags_leaves_everything_to_config() {
        let Command::Run(r) = parse(&["run"]).unwrap().command else {
            panic!("`ftvm run` parsed as another subcommand");
        };
        let g = r.guest;
        assert_eq!(g.guest, None);
        assert_eq!(g.memory_mib, None);
        assert_eq!(g.name, None);
        assert_eq!(g.tap, None);
        assert_eq!(g.mac, None);
        assert_eq!(g.ip, None);
        assert_eq!(g.gateway, None);
        assert!(g.params.is_empty());
        assert_eq!(g.serial, None);
        assert_eq!(g.serial_max_mib, None);
        assert_eq!(g.config, None);
    }

    #[test]
    fn run_takes_every_guest_flag() {
        let Command::Run(r) = parse(&[
            "run",
            "--guest",
            "streamer",
            "--memory-mib",
            "32",
            "--name",
            "web1",
            "--tap",
            "tap0",
            "--mac",
            "02:00:00:00:00:01",
            "--ip",
            "10.0.0.2/24",
            "--gateway",
            "10.0.0.1",
            "--param",
            "rate=100",
            "--param",
            "dest=10.0.0.9:5000",
            "--serial",
            "out.log",
            "--serial-max-mib",
            "16",
            "--config",
            "vm.toml",
        ])
        .unwrap()
        .command
        else {
            panic!("`ftvm run` parsed as another subcommand");
        };
        let g = r.guest;
        assert_eq!(g.guest.as_deref(), Some("streamer"));
        assert_eq!(g.memory_mib, Some(32));
        assert_eq!(g.name.as_deref(), Some("web1"));
        assert_eq!(g.tap.as_deref(), Some("tap0"));
        assert_eq!(g.mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!(g.ip.as_deref(), Some("10.0.0.2/24"));
        assert_eq!(g.gateway.as_deref(), Some("10.0.0.1"));
        assert_eq!(g.params, ["rate=100", "dest=10.0.0.9:5000"]);
        assert_eq!(g.serial.as_deref(), Some("out.log"));
        assert_eq!(g.serial_max_mib, Some(16));
        assert_eq!(g.config, Some(PathBuf::from("vm.toml")));
    }

    #[test]
    fn unparsable_command_lines_exit_2() {
        for args in [
            &[][..],
            &["frobnicate"],
            &["run", "--memory-mib", "lots"],
            &["run", "--memory-mib", "-1"],
            &["run", "--no-such-flag"],
            &["run", "--guest"],
            &["primary", "--heartbeat-ms", "often"],
            &["demo", "--guest", "nosuch"],
            &["run", "--metrics", "nowhere"],
            &["primary", "--metrics", "127.0.0.1"],
            &["completions", "tcsh"],
            &["demo", "--fault", "explode"],
            &["demo", "--fault", "halt", "--failure", "host"],
        ] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), EXIT_USAGE, "ftvm {args:?}");
        }
    }

    #[test]
    fn help_lines_state_defaults_and_forms() {
        let mut cmd = Cli::command();
        let run = cmd.find_subcommand_mut("run").expect("run is a subcommand");
        let help = run.render_help().to_string();
        for needle in [
            "[default: hello]",
            &format!("at most {} MiB", crate::config::MAX_IMAGE_MIB),
            "[default: 64]",
            &format!("{}..={}", ftvm_abi::MIN_MEMORY_MIB, ftvm_abi::MAX_MEMORY_MIB),
            &format!("1 to {} characters", crate::config::MAX_NAME_LEN),
            &format!("1 to {} bytes", crate::config::MAX_TAP_LEN),
            "[default: the guest's name",
            "[default: none: the guest has no NIC]",
            "02:xx:xx:xx:xx:xx",
            "ADDR/PREFIX",
            "KEY=VALUE",
            "stdout|FILE",
            "[default: stdout]",
            "--serial-max-mib <N>",
            "FILE.1",
            "0: no cap [default: 64]",
            "--config <FILE>",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
        }
    }
}
