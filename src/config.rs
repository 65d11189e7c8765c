//! Guest settings: the GUEST-OPTS flags ([`GuestArgs`]) and the `--config`
//! TOML file, merged and validated into a [`GuestSettings`].
//!
//! # The TOML file
//!
//! Keys are the flag names without the leading dashes (README, "Command
//! line"). Every key is optional; `param` is an array of `"KEY=VALUE"`
//! strings, exactly what `--param` takes, so a setting reads the same in
//! both places:
//!
//! ```toml
//! guest = "streamer"            # NAME or PATH, as --guest
//! memory-mib = 64               # an integer
//! name = "web1"
//! tap = "tap0"
//! mac = "02:00:00:00:00:01"
//! ip = "10.0.0.2/24"
//! gateway = "10.0.0.1"
//! param = ["dest=10.0.0.9:5000", "rate=100"]
//! serial = "stdout"             # or a file path
//! serial-max-mib = 64           # an integer; 0: no cap
//! ```
//!
//! `primary` and `secondary` also take the PAIR-OPTS from the file
//! (`key-file`, `control`, `digest-every`, `arbiter`, `heartbeat-ms`,
//! `dead-after`, `max-lag-ms`) and their address (`peer` for a primary, `listen` for a
//! secondary; each ignores the other's, so one file can serve both hosts);
//! `ftvm run` refuses them.
//!
//! A key ftvm does not know is an error naming it (and its line), so a typo
//! is never silently ignored; `config` is not a key (no file includes another).
//! Paths in the file (`guest`, `serial`) are relative to the working
//! directory, as they are on the command line.
//!
//! # Merging
//!
//! A flag replaces the file's value for that key. `--param` merges per key:
//! a flag's `KEY=...` replaces the file's entry with the same key, other keys
//! from both are kept (the file's first, in order, then the flags'). A key
//! given twice within the flags, or twice within the file, is refused.
//! Defaults apply to what neither gives; then everything is validated, so a
//! value from the file fails exactly as the same value given as a flag would,
//! and the error names the flag.
//!
//! # Exit status
//!
//! [`ConfigError::exit_code`]: [`EXIT_ERROR`] (1) only when the `--config`
//! file cannot be read (missing, a directory, no permission): nothing is
//! wrong with what was typed. Everything else is [`EXIT_USAGE`] (2), bad
//! usage: a value invalid in itself (memory 0, bad MAC, bad prefix), flags
//! that contradict each other (`--ip` without `--tap`, a gateway outside the
//! subnet), and a config file whose content is malformed (not UTF-8, not
//! TOML, an unknown key, a value of the wrong type): it holds the same
//! settings as the command line, so bad content is bad usage.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::{GuestArgs, PairArgs};
use crate::exit::{EXIT_ERROR, EXIT_USAGE};

/// `--guest` when neither flag nor file gives one.
pub const DEFAULT_GUEST: &str = "hello";
/// `--memory-mib` when neither flag nor file gives one.
pub const DEFAULT_MEMORY_MIB: u64 = 64;
/// `--name` is at most this many characters: it names a control socket.
pub const MAX_NAME_LEN: usize = 64;
/// `--tap` is at most this many bytes: IFNAMSIZ (16) less the NUL.
pub const MAX_TAP_LEN: usize = 15;
/// The `--serial` value that means the VMM's standard output.
pub const SERIAL_STDOUT: &str = "stdout";
/// The largest guest image file `--guest PATH` may name, in MiB. An ftvm
/// guest is a freestanding ELF of some KiB; the cap keeps a mistyped path
/// (`/dev/zero`, a disk image, a FIFO that never ends) from being read
/// without bound: at most this much and one byte more is ever read.
pub const MAX_IMAGE_MIB: u64 = 64;
/// `--serial-max-mib` when neither flag nor file gives one.
pub const DEFAULT_SERIAL_MAX_MIB: u64 = 64;
/// The largest `--serial-max-mib`: 1 TiB (a larger cap is no cap).
pub const SERIAL_MAX_MIB_LIMIT: u64 = 1 << 20;

/// Everything needed to build and run one guest, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSettings {
    /// The image to load.
    pub guest: GuestSource,
    /// Guest RAM in MiB, within `ftvm_abi::MIN_MEMORY_MIB..=MAX_MEMORY_MIB`.
    pub memory_mib: u64,
    /// The VM's name: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Host TAP device for the NIC; `None`: the guest has no NIC.
    pub tap: Option<String>,
    /// The guest's MAC: unicast, not all zero.
    pub mac: [u8; 6],
    /// Guest address and prefix length (1..=32); only with `tap`.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// Default gateway; inside `ip`'s subnet when both are set.
    pub gateway: Option<Ipv4Addr>,
    /// `--param` pairs, unique keys, in the order described in the module
    /// doc; their `KEY=VALUE\0` encoding fits `ftvm_abi::PARAMS_LEN`.
    pub params: Vec<(String, String)>,
    /// Where the serial console goes.
    pub serial: SerialTarget,
    /// A serial FILE is rotated to `FILE.1` when it would pass this many
    /// MiB; 0: never. At most [`SERIAL_MAX_MIB_LIMIT`].
    pub serial_max_mib: u64,
}

/// Where the guest image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSource {
    /// An image embedded in the binary, by name. Whether it exists is checked
    /// by the binary, which knows the embedded images.
    Embedded(String),
    /// An ELF file.
    File(PathBuf),
}

/// Where the serial console's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// The VMM's standard output.
    Stdout,
    /// A file.
    File(PathBuf),
}

/// Why GUEST-OPTS or the `--config` file were refused. Each message is one
/// sentence naming the flag and the value; string values are quoted with
/// `{:?}` so control characters in them cannot garble a terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {path}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The `--config` file is not UTF-8, not TOML, or holds an unknown key or
    /// a value of the wrong type. `message` is the parser's description.
    #[error("config file {path} is invalid{}: {message}", at_line(.line))]
    ConfigParse {
        path: PathBuf,
        /// 1-based line of the offending text, when the parser knows it.
        line: Option<usize>,
        message: String,
    },
    #[error("--guest is empty: give an embedded guest's name or an ELF file's path")]
    GuestEmpty,
    #[error(
        "--memory-mib {value} is out of range: a guest has {min} to {max} MiB",
        min = ftvm_abi::MIN_MEMORY_MIB,
        max = ftvm_abi::MAX_MEMORY_MIB
    )]
    MemoryOutOfRange { value: u64 },
    #[error("--name {value:?} is not a valid name: use 1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -")]
    NameInvalid { value: String },
    #[error(
        "the name {name:?} taken from --guest {guest:?} is not a valid name: give --name (1 to {MAX_NAME_LEN} characters from A-Z a-z 0-9 _ . -)"
    )]
    DerivedNameInvalid { guest: String, name: String },
    #[error(
        "--tap {value:?} is not a valid interface name: use 1 to {MAX_TAP_LEN} bytes without `/`, `:` or whitespace, other than `.` and `..`"
    )]
    TapInvalid { value: String },
    #[error("--mac {value:?} is not a MAC address of the form xx:xx:xx:xx:xx:xx")]
    MacSyntax { value: String },
    #[error(
        "--mac {value} is a multicast address: a guest's MAC must be unicast (lowest bit of the first byte clear)"
    )]
    MacMulticast { value: String },
    #[error("--mac {value} is all zeros, which no NIC may use")]
    MacZero { value: String },
    #[error("--ip {value:?} is not of the form ADDR/PREFIX (e.g. 10.0.0.2/24)")]
    IpSyntax { value: String },
    #[error("--ip {value:?} has a prefix length outside 1..=32")]
    IpPrefix { value: String },
    #[error("--ip {value} cannot be a guest's address: it is {reason}")]
    IpUnusable { value: String, reason: &'static str },
    #[error("--ip {value} needs --tap: without a TAP device the guest has no NIC to carry it")]
    IpWithoutTap { value: String },
    #[error("--gateway {value:?} is not an IPv4 address")]
    GatewaySyntax { value: String },
    #[error("--gateway {value} cannot be a gateway: it is {reason}")]
    GatewayUnusable { value: Ipv4Addr, reason: &'static str },
    #[error("--gateway {gateway} is outside the subnet of --ip {ip}/{prefix}")]
    GatewayOutsideSubnet { gateway: Ipv4Addr, ip: Ipv4Addr, prefix: u8 },
    #[error("--gateway {gateway} is the guest's own address (--ip)")]
    GatewayIsIp { gateway: Ipv4Addr },
    #[error("--param {value:?} is not of the form KEY=VALUE")]
    ParamSyntax { value: String },
    #[error("--param {value:?} has an empty key")]
    ParamEmptyKey { value: String },
    #[error("--param {value:?} contains a NUL byte, which separates parameters in the boot-parameter block")]
    ParamNul { value: String },
    #[error("--param key {key:?} is given more than once")]
    ParamDuplicate { key: String },
    #[error(
        "--param values take {len} bytes encoded as KEY=VALUE\\0..., more than the {max} bytes the boot-parameter block holds",
        max = ftvm_abi::PARAMS_LEN
    )]
    ParamsTooLong { len: usize },
    #[error("--serial is empty: give `stdout` or a file path")]
    SerialEmpty,
    #[error("`{key}` in the config file is a pair setting: it applies to `ftvm primary` and `ftvm secondary`, not `ftvm run`")]
    PairKeyInRun { key: &'static str },
    #[error("{flag} is missing: give it on the command line or in the --config file (see `ftvm {command} --help`)")]
    Missing { flag: &'static str, command: &'static str },
    #[error("{flag} {value} is out of range: it takes {min} to {max}")]
    OutOfRange { flag: &'static str, value: u64, min: u64, max: u64 },
    #[error("--arbiter {value:?} is not understood: the accepted form is file:PATH (PATH naming a file)")]
    ArbiterSpec { value: String },
    #[error("{flag} {value:?} is not a usable address: {reason}")]
    Address { flag: &'static str, value: String, reason: &'static str },
    #[error("{flag} {value:?} is not understood: it takes {allowed}")]
    Choice { flag: &'static str, value: String, allowed: String },
    #[error("--probe {value:?} is not understood: the accepted forms are tcp:PORT (1 to 65535) and exec:COMMAND")]
    ProbeSpec { value: String },
    #[error("--uplink {value:?} is not an interface name (1 to 15 bytes, no '/' or white space)")]
    UplinkInvalid { value: String },
}

impl ConfigError {
    /// The process exit status for this error (module doc, "Exit status").
    /// No wildcard arm: a new variant must decide.
    pub fn exit_code(&self) -> i32 {
        use ConfigError::*;
        match self {
            ConfigRead { .. } => EXIT_ERROR,
            ConfigParse { .. }
            | GuestEmpty
            | MemoryOutOfRange { .. }
            | NameInvalid { .. }
            | DerivedNameInvalid { .. }
            | TapInvalid { .. }
            | MacSyntax { .. }
            | MacMulticast { .. }
            | MacZero { .. }
            | IpSyntax { .. }
            | IpPrefix { .. }
            | IpUnusable { .. }
            | IpWithoutTap { .. }
            | GatewaySyntax { .. }
            | GatewayUnusable { .. }
            | GatewayOutsideSubnet { .. }
            | GatewayIsIp { .. }
            | ParamSyntax { .. }
            | ParamEmptyKey { .. }
            | ParamNul { .. }
            | ParamDuplicate { .. }
            | ParamsTooLong { .. }
            | SerialEmpty
            | PairKeyInRun { .. }
            | Missing { .. }
            | OutOfRange { .. }
            | ArbiterSpec { .. }
            | Address { .. }
            | Choice { .. }
            | ProbeSpec { .. }
            | UplinkInvalid { .. } => EXIT_USAGE,
        }
    }
}

fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// The `--config` file's content; see the module doc for the format.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConfigFile {
    guest: Option<String>,
    memory_mib: Option<u64>,
    name: Option<String>,
    tap: Option<String>,
    mac: Option<String>,
    ip: Option<String>,
    gateway: Option<String>,
    #[serde(default)]
    param: Vec<String>,
    serial: Option<String>,
    serial_max_mib: Option<u64>,
    // PAIR-OPTS: `primary` and `secondary` only.
    key_file: Option<PathBuf>,
    control: Option<PathBuf>,
    digest_every: Option<u64>,
    arbiter: Option<String>,
    heartbeat_ms: Option<u64>,
    dead_after: Option<u32>,
    max_lag_ms: Option<u64>,
    peer: Option<String>,
    listen: Option<String>,
    containment: Option<String>,
    health_deadline_ms: Option<u64>,
    hang_ms: Option<u64>,
    probe: Option<String>,
    probe_interval_ms: Option<u64>,
    probe_timeout_ms: Option<u64>,
    probe_failures: Option<u32>,
    uplink: Option<String>,
    on_fault: Option<String>,
    fault_window: Option<u64>,
    output_mode: Option<String>,
}

impl ConfigFile {
    /// The pair settings this file gives, by key, for `ftvm run` to refuse.
    fn pair_keys(&self) -> Vec<&'static str> {
        let given = [
            ("key-file", self.key_file.is_some()),
            ("control", self.control.is_some()),
            ("digest-every", self.digest_every.is_some()),
            ("arbiter", self.arbiter.is_some()),
            ("heartbeat-ms", self.heartbeat_ms.is_some()),
            ("dead-after", self.dead_after.is_some()),
            ("max-lag-ms", self.max_lag_ms.is_some()),
            ("containment", self.containment.is_some()),
            ("health-deadline-ms", self.health_deadline_ms.is_some()),
            ("hang-ms", self.hang_ms.is_some()),
            ("probe", self.probe.is_some()),
            ("probe-interval-ms", self.probe_interval_ms.is_some()),
            ("probe-timeout-ms", self.probe_timeout_ms.is_some()),
            ("probe-failures", self.probe_failures.is_some()),
            ("uplink", self.uplink.is_some()),
            ("on-fault", self.on_fault.is_some()),
            ("fault-window", self.fault_window.is_some()),
            ("output-mode", self.output_mode.is_some()),
            ("peer", self.peer.is_some()),
            ("listen", self.listen.is_some()),
        ];
        given.into_iter().filter(|(_, g)| *g).map(|(k, _)| k).collect()
    }
}

impl ConfigFile {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::ConfigRead { path: path.to_owned(), source })?;
        Self::parse(path, &bytes)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigError::ConfigParse {
            path: path.to_owned(),
            line: Some(line_of(bytes, e.valid_up_to())),
            message: "it is not UTF-8".to_owned(),
        })?;
        toml::from_str(text).map_err(|e| ConfigError::ConfigParse {
            path: path.to_owned(),
            line: e.span().map(|span| line_of(bytes, span.start)),
            // `message()`, not Display: Display spans several lines with a
            // snippet of the file, and the error must stay one line.
            message: e.message().to_owned(),
        })
    }
}

/// The 1-based line holding byte `offset` of `bytes`.
fn line_of(bytes: &[u8], offset: usize) -> usize {
    let before = bytes.get(..offset).unwrap_or(bytes);
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

/// GUEST-OPTS into settings: loads the `--config` file if one is given,
/// merges it under the flags, applies defaults and validates the result.
pub fn resolve(args: &GuestArgs) -> Result<GuestSettings, ConfigError> {
    let file = load(args)?;
    if let Some(key) = file.pair_keys().first() {
        return Err(ConfigError::PairKeyInRun { key });
    }
    merge(args, file)
}

fn load(args: &GuestArgs) -> Result<ConfigFile, ConfigError> {
    match &args.config {
        Some(path) => ConfigFile::load(path),
        None => Ok(ConfigFile::default()),
    }
}

/// Which side of a pair is being configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairRole {
    Primary,
    Secondary,
}

/// PAIR-OPTS, merged with the `--config` file, defaults applied, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairConfig {
    pub key_file: PathBuf,
    pub control: Option<PathBuf>,
    pub digest_every: u64,
    pub arbiter: Option<String>,
    pub heartbeat_ms: u64,
    pub dead_after: u32,
    /// No `--dead-after` (flag or file): the silence limit adapts to the
    /// link (issue 16); with one it is `dead_after` intervals, fixed.
    pub adaptive: bool,
    pub max_lag_ms: u64,
    pub state_dump: Option<PathBuf>,
    /// `--peer` (primary) or `--listen` (secondary): a checked HOST:PORT.
    pub address: String,
    /// Application health and containment.
    pub health: HealthSettings,
    /// `--standby` (primary): spare hosts to re-protect onto, checked.
    pub standby: Vec<String>,
    /// Where this process waits as the new primary's standby after a
    /// planned switchover handed its guest away: a primary's
    /// `--switch-listen`, a secondary's `--listen`; `None`: a switchover
    /// is refused.
    pub switch_listen: Option<String>,
}

/// The health flags, validated (README, "Application health").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub containment: bool,
    /// 0: off.
    pub health_deadline_ms: u64,
    /// 0: off.
    pub hang_ms: u64,
    pub probe: Option<Probe>,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub probe_failures: u32,
    pub uplink: Option<String>,
    pub on_fault_restart: bool,
    pub fault_window_ms: u64,
    pub strict: bool,
}

/// `--probe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp(u16),
    Exec(String),
}

/// `--health-deadline-ms` when neither flag nor file gives one.
pub const DEFAULT_HEALTH_DEADLINE_MS: u64 = 30;
/// `--hang-ms` when neither flag nor file gives one.
pub const DEFAULT_HANG_MS: u64 = 1000;
/// `--fault-window` when neither flag nor file gives one.
pub const DEFAULT_FAULT_WINDOW_MS: u64 = 10_000;

fn choice(
    flag: &'static str,
    value: Option<String>,
    default: &str,
    allowed: [&'static str; 2],
) -> Result<bool, ConfigError> {
    let v = value.unwrap_or_else(|| default.to_string());
    match allowed.iter().position(|a| *a == v) {
        Some(i) => Ok(i == 0),
        None => Err(ConfigError::Choice { flag, value: v, allowed: allowed.join(" or ") }),
    }
}

fn resolve_health(pair: &PairArgs, file: &ConfigFile) -> Result<HealthSettings, ConfigError> {
    let probe = match pair.probe.clone().or(file.probe.clone()) {
        None => None,
        Some(p) => Some(if let Some(port) = p.strip_prefix("tcp:") {
            match port.parse::<u16>() {
                Ok(port) if port > 0 => Probe::Tcp(port),
                _ => return Err(ConfigError::ProbeSpec { value: p }),
            }
        } else if let Some(cmd) = p.strip_prefix("exec:").filter(|c| !c.trim().is_empty()) {
            Probe::Exec(cmd.to_string())
        } else {
            return Err(ConfigError::ProbeSpec { value: p });
        }),
    };
    let hang_ms = pair.hang_ms.or(file.hang_ms).unwrap_or(DEFAULT_HANG_MS);
    if hang_ms != 0 && !(100..=600_000).contains(&hang_ms) {
        return Err(ConfigError::OutOfRange { flag: "--hang-ms", value: hang_ms, min: 100, max: 600_000 });
    }
    let uplink = pair.uplink.clone().or(file.uplink.clone());
    if let Some(u) = &uplink {
        if u.is_empty() || u.len() > MAX_TAP_LEN || u.contains('/') || u.chars().any(char::is_whitespace) {
            return Err(ConfigError::UplinkInvalid { value: u.clone() });
        }
    }
    Ok(HealthSettings {
        containment: choice(
            "--containment",
            pair.containment.clone().or(file.containment.clone()),
            "on",
            ["on", "off"],
        )?,
        health_deadline_ms: in_range(
            "--health-deadline-ms",
            pair.health_deadline_ms.or(file.health_deadline_ms),
            DEFAULT_HEALTH_DEADLINE_MS,
            0,
            600_000,
        )?,
        hang_ms,
        probe,
        probe_interval_ms: in_range(
            "--probe-interval-ms",
            pair.probe_interval_ms.or(file.probe_interval_ms),
            100,
            1,
            600_000,
        )?,
        probe_timeout_ms: in_range(
            "--probe-timeout-ms",
            pair.probe_timeout_ms.or(file.probe_timeout_ms),
            100,
            1,
            600_000,
        )?,
        probe_failures: in_range(
            "--probe-failures",
            pair.probe_failures.or(file.probe_failures).map(u64::from),
            3,
            1,
            1000,
        )?
        .try_into()
        .unwrap_or(3),
        uplink,
        on_fault_restart: choice(
            "--on-fault",
            pair.on_fault.clone().or(file.on_fault.clone()),
            "stop",
            ["restart", "stop"],
        )?,
        fault_window_ms: in_range(
            "--fault-window",
            pair.fault_window.or(file.fault_window),
            DEFAULT_FAULT_WINDOW_MS,
            0,
            86_400_000,
        )?,
        strict: choice(
            "--output-mode",
            pair.output_mode.clone().or(file.output_mode.clone()),
            "fast",
            ["strict", "fast"],
        )?,
    })
}

/// `--digest-every` when neither flag nor file gives one.
pub const DEFAULT_DIGEST_EVERY: u64 = 1000;
/// `--heartbeat-ms` when neither flag nor file gives one.
pub const DEFAULT_HEARTBEAT_MS: u64 = 10;
/// `--dead-after` when neither flag nor file gives one.
pub const DEFAULT_DEAD_AFTER: u32 = 5;
/// `--max-lag-ms` when neither flag nor file gives one.
pub const DEFAULT_MAX_LAG_MS: u64 = 3000;

/// GUEST-OPTS and PAIR-OPTS (with `--peer` or `--listen` as `address`) of
/// `ftvm primary` / `ftvm secondary`, merged with the `--config` file.
pub fn resolve_pair(
    guest: &GuestArgs,
    pair: &PairArgs,
    address: Option<&str>,
    role: PairRole,
) -> Result<(GuestSettings, PairConfig), ConfigError> {
    let file = load(guest)?;
    let (command, addr_flag, file_addr) = match role {
        PairRole::Primary => ("primary", "--peer", file.peer.clone()),
        PairRole::Secondary => ("secondary", "--listen", file.listen.clone()),
    };
    let key_file = pair.key_file.clone().or(file.key_file.clone());
    let key_file = key_file.ok_or(ConfigError::Missing { flag: "--key-file", command })?;
    let address = address.map(str::to_owned).or(file_addr).ok_or(ConfigError::Missing { flag: addr_flag, command })?;
    check_address(addr_flag, &address, role == PairRole::Secondary)?;
    let arbiter = pair.arbiter.clone().or(file.arbiter.clone());
    if let Some(a) = &arbiter {
        check_arbiter(a)?;
    }
    let config = PairConfig {
        key_file,
        control: pair.control.clone().or(file.control.clone()),
        digest_every: in_range(
            "--digest-every",
            pair.digest_every.or(file.digest_every),
            DEFAULT_DIGEST_EVERY,
            1,
            u64::MAX,
        )?,
        arbiter,
        heartbeat_ms: in_range(
            "--heartbeat-ms",
            pair.heartbeat_ms.or(file.heartbeat_ms),
            DEFAULT_HEARTBEAT_MS,
            1,
            10_000,
        )?,
        dead_after: in_range(
            "--dead-after",
            pair.dead_after.or(file.dead_after).map(u64::from),
            u64::from(DEFAULT_DEAD_AFTER),
            2,
            1000,
        )?
        .try_into()
        .unwrap_or(DEFAULT_DEAD_AFTER),
        adaptive: pair.dead_after.or(file.dead_after).is_none(),
        max_lag_ms: in_range("--max-lag-ms", pair.max_lag_ms.or(file.max_lag_ms), DEFAULT_MAX_LAG_MS, 10, 600_000)?,
        state_dump: pair.state_dump.clone(),
        address,
        health: resolve_health(pair, &file)?,
        standby: Vec::new(),
        switch_listen: None,
    };
    Ok((merge(guest, file)?, config))
}

fn in_range(flag: &'static str, value: Option<u64>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let v = value.unwrap_or(default);
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ConfigError::OutOfRange { flag, value: v, min, max })
    }
}

/// `--switch-listen`: a HOST:PORT as `--listen` is.
pub fn check_switch_listen(value: Option<&str>) -> Result<Option<String>, ConfigError> {
    value.map(|v| check_address("--switch-listen", v, false).map(|()| v.to_string())).transpose()
}

/// `--standby`: each a HOST:PORT as `--peer` is.
pub fn check_standby(values: &[String]) -> Result<Vec<String>, ConfigError> {
    for v in values {
        check_address("--standby", v, false)?;
    }
    Ok(values.to_vec())
}

/// `ftvm secondary` is a standby (its guest arrives by a live transfer)
/// when it is given no guest: no `--guest`, and no `guest` in `--config`.
pub fn is_standby(args: &GuestArgs) -> Result<bool, ConfigError> {
    Ok(args.guest.is_none() && load(args)?.guest.is_none())
}

/// `--arbiter`: the only form there is, `file:PATH`.
fn check_arbiter(value: &str) -> Result<(), ConfigError> {
    match value.strip_prefix("file:") {
        Some(path) if !path.is_empty() && !path.ends_with('/') => Ok(()),
        _ => Err(ConfigError::ArbiterSpec { value: value.to_owned() }),
    }
}

/// `--peer` / `--listen`: HOST:PORT, an IPv6 host in brackets, a port in
/// 1..=65535 (0 too for --listen: any free port), and a host that resolves.
fn check_address(flag: &'static str, value: &str, port_zero_ok: bool) -> Result<(), ConfigError> {
    let bad = |reason: &'static str| ConfigError::Address { flag, value: value.to_owned(), reason };
    let (host, port) = value.rsplit_once(':').ok_or(bad("it is not of the form HOST:PORT"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number from 1 to 65535"))?;
    if port == 0 && !port_zero_ok {
        return Err(bad("the port is not a number from 1 to 65535"));
    }
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_err() => {
            return Err(bad("the bracketed host is not an IPv6 address"))
        }
        None if host.contains(':') || host.contains('[') || host.contains(']') => {
            return Err(bad("an IPv6 address goes in brackets, e.g. [fd00::2]:7000"))
        }
        _ => {}
    }
    match std::net::ToSocketAddrs::to_socket_addrs(value).map(|mut a| a.next()) {
        Ok(Some(_)) => Ok(()),
        _ => Err(bad("the host does not resolve to an address")),
    }
}

fn merge(args: &GuestArgs, file: ConfigFile) -> Result<GuestSettings, ConfigError> {
    // Checked in flag order, so the first error reported is the first bad
    // flag in `--help`.
    let guest_value = args.guest.clone().or(file.guest).unwrap_or_else(|| DEFAULT_GUEST.to_owned());
    let guest = GuestSource::parse(&guest_value)?;

    let memory_mib = args.memory_mib.or(file.memory_mib).unwrap_or(DEFAULT_MEMORY_MIB);
    if !(ftvm_abi::MIN_MEMORY_MIB..=ftvm_abi::MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(ConfigError::MemoryOutOfRange { value: memory_mib });
    }

    let name = match args.name.clone().or(file.name) {
        Some(name) if is_valid_name(&name) => name,
        Some(name) => return Err(ConfigError::NameInvalid { value: name }),
        None => {
            let name = guest.default_name();
            if !is_valid_name(&name) {
                return Err(ConfigError::DerivedNameInvalid { guest: guest_value, name });
            }
            name
        }
    };

    let tap = args.tap.clone().or(file.tap);
    if let Some(tap) = &tap {
        if !is_valid_ifname(tap) {
            return Err(ConfigError::TapInvalid { value: tap.clone() });
        }
    }

    let mac = match args.mac.clone().or(file.mac) {
        Some(mac) => parse_mac(&mac)?,
        None => default_mac(&name),
    };

    let ip = args
        .ip
        .clone()
        .or(file.ip)
        .map(|ip| {
            let parsed = parse_ip(&ip)?;
            if tap.is_none() {
                return Err(ConfigError::IpWithoutTap { value: ip });
            }
            Ok(parsed)
        })
        .transpose()?;

    let gateway = args.gateway.clone().or(file.gateway).map(|gw| parse_gateway(&gw, ip)).transpose()?;

    let params = merge_params(&file.param, &args.params)?;

    let serial = match args.serial.clone().or(file.serial) {
        None => SerialTarget::Stdout,
        Some(s) if s.is_empty() => return Err(ConfigError::SerialEmpty),
        Some(s) if s == SERIAL_STDOUT => SerialTarget::Stdout,
        Some(s) => SerialTarget::File(PathBuf::from(s)),
    };

    let serial_max_mib = in_range(
        "--serial-max-mib",
        args.serial_max_mib.or(file.serial_max_mib),
        DEFAULT_SERIAL_MAX_MIB,
        0,
        SERIAL_MAX_MIB_LIMIT,
    )?;

    Ok(GuestSettings { guest, memory_mib, name, tap, mac, ip, gateway, params, serial, serial_max_mib })
}

impl GuestSource {
    /// A `--guest` value: a path if it contains `/`, ends in `.elf` or names
    /// an existing file; otherwise an embedded image's name.
    fn parse(value: &str) -> Result<Self, ConfigError> {
        if value.is_empty() {
            return Err(ConfigError::GuestEmpty);
        }
        Ok(Self::classify(value, Path::new(value).is_file()))
    }

    /// [`GuestSource::parse`] with the file-system lookup done by the caller,
    /// so the rule is testable without creating files in the working
    /// directory.
    fn classify(value: &str, is_existing_file: bool) -> Self {
        if value.contains('/') || value.ends_with(".elf") || is_existing_file {
            GuestSource::File(PathBuf::from(value))
        } else {
            GuestSource::Embedded(value.to_owned())
        }
    }

    /// The name a VM gets without `--name`: the embedded image's name, or
    /// the file's name without its extension (`guests/streamer.elf` gives
    /// `streamer`). Empty when the path has no usable file name.
    fn default_name(&self) -> String {
        match self {
            GuestSource::Embedded(name) => name.clone(),
            GuestSource::File(path) => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }
}

/// 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_.-]`: safe in a socket
/// path, a log field and a shell word.
pub fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What Linux's `dev_valid_name()` accepts: 1 to IFNAMSIZ-1 bytes, not `.`
/// or `..`, no `/`, `:` or whitespace (nor NUL, which cannot cross the ioctl).
fn is_valid_ifname(name: &str) -> bool {
    (1..=MAX_TAP_LEN).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// `xx:xx:xx:xx:xx:xx`, hex digits in either case; unicast and not all zero.
fn parse_mac(value: &str) -> Result<[u8; 6], ConfigError> {
    let syntax = || ConfigError::MacSyntax { value: value.to_owned() };
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(syntax)?;
        // Two hex digits exactly: from_str_radix alone would take "+f".
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(syntax());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
    }
    if parts.next().is_some() {
        return Err(syntax());
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::MacMulticast { value: value.to_owned() });
    }
    if mac == [0; 6] {
        return Err(ConfigError::MacZero { value: value.to_owned() });
    }
    Ok(mac)
}

/// The MAC a guest gets without `--mac`: `02` (locally administered bit set,
/// multicast bit clear) followed by the first five bytes, big-endian, of the
/// 64-bit FNV-1a hash of the name. Stable across builds and hosts, so a
/// primary and a secondary given the same name derive the same MAC.
pub fn default_mac(name: &str) -> [u8; 6] {
    let h = fnv1a64(name.as_bytes()).to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], h[4]]
}

/// FNV-1a, 64-bit (offset basis and prime from the FNV specification).
/// Spelled out because `std`'s hashers do not promise stable output.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The network mask of a prefix length in 1..=32.
fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

/// Why `addr` cannot be a host's address on the wire, if it cannot.
fn unusable_reason(addr: Ipv4Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("the unspecified address")
    } else if addr.is_loopback() {
        Some("a loopback address")
    } else if addr.is_multicast() {
        Some("a multicast address")
    } else if addr.is_broadcast() {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Why `addr` cannot be a host in `subnet/prefix`, beyond
/// [`unusable_reason`]: below /31 (RFC 3021) the all-zeros and all-ones host
/// parts are the subnet's own address and its broadcast.
fn subnet_reason(addr: Ipv4Addr, prefix: u8) -> Option<&'static str> {
    if prefix > 30 {
        return None;
    }
    let host = u32::from(addr) & !mask(prefix);
    if host == 0 {
        Some("its subnet's network address")
    } else if host == !mask(prefix) {
        Some("its subnet's broadcast address")
    } else {
        None
    }
}

/// `ADDR/PREFIX`, PREFIX in 1..=32. Prefix 0 is refused: it would put the
/// whole Internet on the guest's link, which is never what is meant.
fn parse_ip(value: &str) -> Result<(Ipv4Addr, u8), ConfigError> {
    let syntax = || ConfigError::IpSyntax { value: value.to_owned() };
    let (addr, prefix) = value.split_once('/').ok_or_else(syntax)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
    // Digits only: u8's parser would also take "+24".
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let prefix = prefix
        .parse::<u8>()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| ConfigError::IpPrefix { value: value.to_owned() })?;
    if let Some(reason) = unusable_reason(addr).or_else(|| subnet_reason(addr, prefix)) {
        return Err(ConfigError::IpUnusable { value: value.to_owned(), reason });
    }
    Ok((addr, prefix))
}

/// A gateway address; with `ip`, a host of its subnet other than `ip`.
/// Without `ip` there is nothing to check it against (the guest may get its
/// address otherwise later), so it is kept as given.
fn parse_gateway(value: &str, ip: Option<(Ipv4Addr, u8)>) -> Result<Ipv4Addr, ConfigError> {
    let gateway: Ipv4Addr = value.parse().map_err(|_| ConfigError::GatewaySyntax { value: value.to_owned() })?;
    if let Some(reason) = unusable_reason(gateway) {
        return Err(ConfigError::GatewayUnusable { value: gateway, reason });
    }
    if let Some((addr, prefix)) = ip {
        if u32::from(gateway) & mask(prefix) != u32::from(addr) & mask(prefix) {
            return Err(ConfigError::GatewayOutsideSubnet { gateway, ip: addr, prefix });
        }
        if gateway == addr {
            return Err(ConfigError::GatewayIsIp { gateway });
        }
        if let Some(reason) = subnet_reason(gateway, prefix) {
            return Err(ConfigError::GatewayUnusable { value: gateway, reason });
        }
    }
    Ok(gateway)
}

/// One `KEY=VALUE`, split at the first `=`: the key cannot contain `=`, the
/// value may.
fn parse_param(value: &str) -> Result<(String, String), ConfigError> {
    let (key, val) = value.split_once('=').ok_or_else(|| ConfigError::ParamSyntax { value: value.to_owned() })?;
    if key.is_empty() {
        return Err(ConfigError::ParamEmptyKey { value: value.to_owned() });
    }
    if value.contains('\0') {
        return Err(ConfigError::ParamNul { value: value.to_owned() });
    }
    Ok((key.to_owned(), val.to_owned()))
}

/// Parses one source's `KEY=VALUE` list, refusing a key given twice.
fn parse_params(values: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(values.len());
    for value in values {
        let (key, val) = parse_param(value)?;
        if out.iter().any(|(k, _)| *k == key) {
            return Err(ConfigError::ParamDuplicate { key });
        }
        out.push((key, val));
    }
    Ok(out)
}

/// The file's params overridden per key by the flags' (module doc,
/// "Merging"), then checked against the boot-parameter block's size.
fn merge_params(file: &[String], flags: &[String]) -> Result<Vec<(String, String)>, ConfigError> {
    let mut merged = parse_params(file)?;
    for (key, val) in parse_params(flags)? {
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = val,
            None => merged.push((key, val)),
        }
    }
    // `KEY=VALUE\0` per pair, as ftvm_abi::BootParams::params holds them.
    let len: usize = merged.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if len > ftvm_abi::PARAMS_LEN {
        return Err(ConfigError::ParamsTooLong { len });
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use std::io::Write;

    /// `ftvm run ARGS...` through clap and [`resolve`].
    fn run(args: &[&str]) -> Result<GuestSettings, ConfigError> {
        let cli = Cli::try_parse_from(["ftvm", "run"].iter().chain(args))
            .unwrap_or_else(|e| panic!("clap refused {args:?}: {e}"));
        let Command::Run(run) = cli.command else {
            panic!("`ftvm run` parsed as another subcommand");
        };
        resolve(&run.guest)
    }

    /// Asserts that `args` are refused with exit status `code` and a message
    /// containing each of `needles` (the flag and the value).
    fn refused(args: &[&str], code: i32, needles: &[&str]) -> ConfigError {
        let err = run(args).expect_err(&format!("{args:?} was accepted"));
        let msg = err.to_string();
        assert_eq!(err.exit_code(), code, "{args:?}: {msg}");
        for needle in needles {
            assert!(msg.contains(needle), "{args:?}: {needle:?} not in {msg:?}");
        }
        assert!(!msg.contains('\n'), "{args:?}: not one line: {msg:?}");
        err
    }

    fn config_file(content: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(content).expect("write temp file");
        f
    }

    #[test]
    fn defaults() {
        let s = run(&[]).unwrap();
        assert_eq!(
            s,
            GuestSettings {
                guest: GuestSource::Embedded("hello".into()),
                memory_mib: 64,
                name: "hello".into(),
                tap: None,
                mac: default_mac("hello"),
                ip: None,
                gateway: None,
                params: vec![],
                serial: SerialTarget::Stdout,
                serial_max_mib: DEFAULT_SERIAL_MAX_MIB,
            }
        );
    }

    #[test]
    fn every_flag_taken() {
        let s = run(&[
            "--guest",
            "streamer",
            "--memory-mib",
            "32",
            "--name",
            "web-1.a_b",
            "--tap",
            "tap0",
            "--mac",
            "02:AB:cd:00:00:01",
            "--ip",
            "10.0.0.2/24",
            "--gateway",
            "10.0.0.1",
            "--param",
            "rate=100",
            "--param",
            "dest=10.0.0.9:5000",
            "--param",
            "expr=a=b",
            "--serial",
            "out.log",
        ])
        .unwrap();
        assert_eq!(s.guest, GuestSource::Embedded("streamer".into()));
        assert_eq!(s.memory_mib, 32);
        assert_eq!(s.name, "web-1.a_b");
        assert_eq!(s.tap.as_deref(), Some("tap0"));
        assert_eq!(s.mac, [0x02, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(s.ip, Some((Ipv4Addr::new(10, 0, 0, 2), 24)));
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            s.params,
            [
                ("rate".to_owned(), "100".to_owned()),
                ("dest".to_owned(), "10.0.0.9:5000".to_owned()),
                ("expr".to_owned(), "a=b".to_owned()),
            ]
        );
        assert_eq!(s.serial, SerialTarget::File("out.log".into()));
    }

    #[test]
    fn serial_max_mib_flag_and_key_are_checked_alike() {
        assert_eq!(run(&[]).unwrap().serial_max_mib, 64);
        assert_eq!(run(&["--serial-max-mib", "0"]).unwrap().serial_max_mib, 0);
        let limit = SERIAL_MAX_MIB_LIMIT.to_string();
        assert_eq!(run(&["--serial-max-mib", &limit]).unwrap().serial_max_mib, SERIAL_MAX_MIB_LIMIT);
        let over = (SERIAL_MAX_MIB_LIMIT + 1).to_string();
        refused(&["--serial-max-mib", &over], 2, &["--serial-max-mib", &over, &limit]);
        let f = config_file(format!("serial-max-mib = {over}\n").as_bytes());
        let path = f.path().to_str().expect("temp path is UTF-8");
        refused(&["--config", path], 2, &["--serial-max-mib", &over, &limit]);
        // A flag replaces the file's value.
        assert_eq!(run(&["--config", path, "--serial-max-mib", "3"]).unwrap().serial_max_mib, 3);
        let f = config_file(b"serial-max-mib = 5\n");
        assert_eq!(run(&["--config", f.path().to_str().unwrap()]).unwrap().serial_max_mib, 5);
        let f = config_file(b"serial-max-mib = -1\n");
        refused(&["--config", f.path().to_str().unwrap()], 2, &["line 1"]);
    }

    #[test]
    fn serial_stdout_spelled_out() {
        assert_eq!(run(&["--serial", "stdout"]).unwrap().serial, SerialTarget::Stdout);
        refused(&["--serial", ""], 2, &["--serial"]);
    }

    #[test]
    fn guest_source_rule() {
        use GuestSource::*;
        assert_eq!(GuestSource::classify("hello", false), Embedded("hello".into()));
        assert_eq!(GuestSource::classify("hello", true), File("hello".into()));
        assert_eq!(GuestSource::classify("x.elf", false), File("x.elf".into()));
        assert_eq!(GuestSource::classify("./x", false), File("./x".into()));
        assert_eq!(GuestSource::classify("/abs/path", false), File("/abs/path".into()));
        // An existing file found by its path.
        let f = config_file(b"\x7fELF");
        let path = f.path().to_str().expect("temp path is UTF-8");
        assert_eq!(run(&["--guest", path]).unwrap().guest, File(path.into()));
        refused(&["--guest", ""], 2, &["--guest"]);
    }

    #[test]
    fn name_defaults_to_the_guest_and_file_stem() {
        assert_eq!(run(&["--guest", "streamer"]).unwrap().name, "streamer");
        let s = run(&["--guest", "/x/guests/echo.elf"]).unwrap();
        assert_eq!(s.guest, GuestSource::File("/x/guests/echo.elf".into()));
        assert_eq!(s.name, "echo");
        assert_eq!(s.mac, default_mac("echo"));
        // --name wins over the derived one, and drives the default MAC.
        let s = run(&["--guest", "streamer", "--name", "web1"]).unwrap();
        assert_eq!(s.name, "web1");
        assert_eq!(s.mac, default_mac("web1"));
        let err = refused(&["--guest", "bad name"], 2, &["--guest", "\"bad name\"", "--name"]);
        assert!(matches!(err, ConfigError::DerivedNameInvalid { .. }), "{err:?}");
    }

    #[test]
    fn default_mac_is_pinned_locally_administered_unicast() {
        // FNV-1a-64("hello") = 0xa430d84680aabd0b. Pinned: the primary and
        // the secondary may run different builds and must agree.
        assert_eq!(default_mac("hello"), [0x02, 0xa4, 0x30, 0xd8, 0x46, 0x80]);
        assert_eq!(default_mac("streamer"), [0x02, 0x52, 0x86, 0x62, 0x16, 0x4e]);
        assert_ne!(default_mac("a"), default_mac("b"));
        for name in ["", "x", "web1", "a-very-long-name.with_all.the-chars"] {
            let mac = default_mac(name);
            assert_eq!(mac[0] & 0b11, 0b10, "{name}: {mac:02x?}");
        }
    }

    #[test]
    fn memory_range() {
        let min = ftvm_abi::MIN_MEMORY_MIB;
        let max = ftvm_abi::MAX_MEMORY_MIB;
        assert_eq!(run(&["--memory-mib", &min.to_string()]).unwrap().memory_mib, min);
        assert_eq!(run(&["--memory-mib", &max.to_string()]).unwrap().memory_mib, max);
        for bad in [0, min - 1, max + 1, u64::MAX] {
            let v = bad.to_string();
            refused(&["--memory-mib", &v], 2, &["--memory-mib", &v]);
        }
    }

    #[test]
    fn name_syntax() {
        let long = "n".repeat(MAX_NAME_LEN);
        assert_eq!(run(&["--name", &long]).unwrap().name, long);
        let too_long = "n".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "a b", "a/b", "é", "a:b", &too_long] {
            refused(&["--name", bad], 2, &["--name", &format!("{bad:?}")]);
        }
    }

    #[test]
    fn tap_syntax() {
        let ok = "t".repeat(MAX_TAP_LEN);
        assert_eq!(run(&["--tap", &ok]).unwrap().tap, Some(ok));
        let too_long = "t".repeat(MAX_TAP_LEN + 1);
        // 8 characters but 16 bytes: the limit is in bytes.
        let wide = "éééééééé";
        for bad in ["", ".", "..", "a/b", "a:b", "a b", &too_long, wide] {
            refused(&["--tap", bad], 2, &["--tap", &format!("{bad:?}")]);
        }
    }

    #[test]
    fn mac_syntax() {
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02-00-00-00-00-01",
            "02:00:00:00:00:1",
            "02:00:00:00:00:001",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:gg",
        ] {
            let err = refused(&["--mac", bad], 2, &["--mac", &format!("{bad:?}")]);
            assert!(matches!(err, ConfigError::MacSyntax { .. }), "{err:?}");
        }
    }

    #[test]
    fn mac_multicast_and_zero_refused() {
        for bad in ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "03:00:00:00:00:01"] {
            let err = refused(&["--mac", bad], 2, &["--mac", bad, "multicast"]);
            assert!(matches!(err, ConfigError::MacMulticast { .. }), "{err:?}");
        }
        refused(&["--mac", "00:00:00:00:00:00"], 2, &["--mac", "00:00:00:00:00:00"]);
        // A universally administered unicast MAC is fine.
        assert_eq!(run(&["--mac", "52:54:00:12:34:56"]).unwrap().mac, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    }

    #[test]
    fn ip_syntax_and_prefix() {
        let ok = run(&["--tap", "tap0", "--ip", "192.168.1.7/32"]).unwrap();
        assert_eq!(ok.ip, Some((Ipv4Addr::new(192, 168, 1, 7), 32)));
        let ok = run(&["--tap", "tap0", "--ip", "10.0.0.0/31"]).unwrap();
        assert_eq!(ok.ip, Some((Ipv4Addr::new(10, 0, 0, 0), 31)));
        for bad in ["10.0.0.2", "10.0.0.2/", "10.0.0/24", "10.0.0.2/+24", "x/24", "10.0.0.2/24/1"] {
            let err = refused(&["--tap", "tap0", "--ip", bad], 2, &["--ip", &format!("{bad:?}")]);
            assert!(matches!(err, ConfigError::IpSyntax { .. }), "{bad}: {err:?}");
        }
        for bad in ["10.0.0.2/0", "10.0.0.2/33", "10.0.0.2/999"] {
            let err = refused(&["--tap", "tap0", "--ip", bad], 2, &["--ip", bad, "1..=32"]);
            assert!(matches!(err, ConfigError::IpPrefix { .. }), "{bad}: {err:?}");
        }
        for bad in ["0.0.0.0/8", "127.0.0.1/8", "224.0.0.1/4", "255.255.255.255/32", "10.0.0.0/24", "10.0.0.255/24"] {
            let err = refused(&["--tap", "tap0", "--ip", bad], 2, &["--ip", bad]);
            assert!(matches!(err, ConfigError::IpUnusable { .. }), "{bad}: {err:?}");
        }
    }

    #[test]
    fn ip_needs_tap_but_mac_and_gateway_do_not() {
        refused(&["--ip", "10.0.0.2/24"], 2, &["--ip", "10.0.0.2/24", "--tap"]);
        let s = run(&["--mac", "02:00:00:00:00:01", "--gateway", "10.0.0.1"]).unwrap();
        assert_eq!(s.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(s.tap, None);
    }

    #[test]
    fn gateway_checks() {
        let net = ["--tap", "tap0", "--ip", "10.0.0.2/24", "--gateway"];
        let with = |gw: &'static str| [&net[..], &[gw]].concat();
        assert_eq!(run(&with("10.0.0.254")).unwrap().gateway, Some(Ipv4Addr::new(10, 0, 0, 254)));
        let err = refused(&with("10.0.1.1"), 2, &["--gateway", "10.0.1.1", "10.0.0.2/24"]);
        assert!(matches!(err, ConfigError::GatewayOutsideSubnet { .. }), "{err:?}");
        let err = refused(&with("10.0.0.2"), 2, &["--gateway", "10.0.0.2"]);
        assert!(matches!(err, ConfigError::GatewayIsIp { .. }), "{err:?}");
        for bad in ["10.0.0.0", "10.0.0.255"] {
            let err = refused(&with(bad), 2, &["--gateway", bad]);
            assert!(matches!(err, ConfigError::GatewayUnusable { .. }), "{err:?}");
        }
        for bad in ["10.0.0", "gw", "10.0.0.1/24", ""] {
            let err = refused(&with(bad), 2, &["--gateway", &format!("{bad:?}")]);
            assert!(matches!(err, ConfigError::GatewaySyntax { .. }), "{err:?}");
        }
        // /32: no other host shares the subnet.
        refused(&["--tap", "tap0", "--ip", "10.0.0.2/32", "--gateway", "10.0.0.1"], 2, &["--gateway", "10.0.0.1"]);
        // Unusable addresses are refused even without --ip.
        refused(&["--gateway", "224.0.0.1"], 2, &["--gateway", "224.0.0.1"]);
    }

    #[test]
    fn param_checks() {
        refused(&["--param", "novalue"], 2, &["--param", "\"novalue\""]);
        refused(&["--param", "=v"], 2, &["--param", "\"=v\"", "empty key"]);
        refused(&["--param", "k\0ey=v"], 2, &["--param", "NUL"]);
        refused(&["--param", "key=v\0"], 2, &["--param", "NUL"]);
        let err = refused(&["--param", "a=1", "--param", "b=2", "--param", "a=3"], 2, &["--param", "\"a\""]);
        assert!(matches!(err, ConfigError::ParamDuplicate { .. }), "{err:?}");
        // An empty value is a value.
        assert_eq!(run(&["--param", "flag="]).unwrap().params, [("flag".to_owned(), String::new())]);
    }

    #[test]
    fn params_fill_the_block_exactly() {
        // One pair of exactly PARAMS_LEN encoded bytes: "k=" + v + "\0".
        let fits = format!("k={}", "v".repeat(ftvm_abi::PARAMS_LEN - 3));
        assert_eq!(run(&["--param", &fits]).unwrap().params.len(), 1);
        let over = format!("k={}", "v".repeat(ftvm_abi::PARAMS_LEN - 2));
        let len = (ftvm_abi::PARAMS_LEN + 1).to_string();
        let err = refused(&["--param", &over], 2, &["--param", &len]);
        assert!(matches!(err, ConfigError::ParamsTooLong { .. }), "{err:?}");
        // Many small pairs count their separators too: 600 * "kNNN=\0" (6
        // bytes each) is 3600 bytes.
        let many: Vec<String> = (0..600).map(|i| format!("k{i:03}=")).collect();
        let mut args = vec![];
        for p in &many {
            args.extend(["--param", p.as_str()]);
        }
        refused(&args, 2, &["--param", "bytes"]);
    }

    #[test]
    fn toml_merge_with_flag_override() {
        let f = config_file(
            br#"
guest = "streamer"
memory-mib = 32
name = "fromfile"
tap = "tap9"
mac = "02:00:00:00:00:09"
ip = "10.0.0.9/24"
gateway = "10.0.0.1"
param = ["rate=100", "dest=10.0.0.5:5000"]
serial = "file.log"
serial-max-mib = 8
"#,
        );
        let path = f.path().to_str().expect("temp path is UTF-8");

        // The file alone.
        let s = run(&["--config", path]).unwrap();
        assert_eq!(
            s,
            GuestSettings {
                guest: GuestSource::Embedded("streamer".into()),
                memory_mib: 32,
                name: "fromfile".into(),
                tap: Some("tap9".into()),
                mac: [2, 0, 0, 0, 0, 9],
                ip: Some((Ipv4Addr::new(10, 0, 0, 9), 24)),
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                params: vec![("rate".into(), "100".into()), ("dest".into(), "10.0.0.5:5000".into())],
                serial: SerialTarget::File("file.log".into()),
                serial_max_mib: 8,
            }
        );

        // Flags win, key by key; params merge per key.
        let s = run(&[
            "--config",
            path,
            "--memory-mib",
            "128",
            "--ip",
            "10.0.0.3/24",
            "--param",
            "rate=5",
            "--param",
            "extra=1",
            "--serial",
            "stdout",
        ])
        .unwrap();
        assert_eq!(s.guest, GuestSource::Embedded("streamer".into()));
        assert_eq!(s.memory_mib, 128);
        assert_eq!(s.name, "fromfile");
        assert_eq!(s.ip, Some((Ipv4Addr::new(10, 0, 0, 3), 24)));
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            s.params,
            [
                ("rate".to_owned(), "5".to_owned()),
                ("dest".to_owned(), "10.0.0.5:5000".to_owned()),
                ("extra".to_owned(), "1".to_owned()),
            ]
        );
        assert_eq!(s.serial, SerialTarget::Stdout);
    }

    #[test]
    fn toml_values_are_validated_like_flags() {
        let f = config_file(b"memory-mib = 0\n");
        let path = f.path().to_str().expect("temp path is UTF-8");
        refused(&["--config", path], 2, &["--memory-mib", "0"]);
        // ... unless a flag replaces the bad value.
        assert_eq!(run(&["--config", path, "--memory-mib", "8"]).unwrap().memory_mib, 8);

        // Within the file, a key given twice is refused too.
        let f = config_file(br#"param = ["a=1", "a=2"]"#);
        let path = f.path().to_str().expect("temp path is UTF-8");
        refused(&["--config", path], 2, &["--param", "\"a\""]);

        // The file's ip needs a tap from somewhere.
        let f = config_file(br#"ip = "10.0.0.2/24""#);
        let path = f.path().to_str().expect("temp path is UTF-8");
        refused(&["--config", path], 2, &["--ip", "--tap"]);
        assert!(run(&["--config", path, "--tap", "tap0"]).is_ok());
    }

    #[test]
    fn toml_unknown_key_refused_with_its_name_and_line() {
        let f = config_file(b"memory-mib = 64\n\ncolour = \"blue\"\n");
        let path = f.path().to_str().expect("temp path is UTF-8");
        let err = refused(&["--config", path], 2, &[path, "colour", "line 3"]);
        assert!(matches!(err, ConfigError::ConfigParse { line: Some(3), .. }), "{err:?}");
        // The flag-only key is not a file key either.
        let f = config_file(b"config = \"other.toml\"\n");
        let path = f.path().to_str().expect("temp path is UTF-8");
        refused(&["--config", path], 2, &[path, "config", "line 1"]);
    }

    #[test]
    fn toml_malformed_refused_with_its_line() {
        for (content, line) in [
            (&b"guest = \"hello\"\nmemory-mib = = 3\n"[..], 2),
            (b"guest = \"hello\"\n\n\nname = \"unterminated\n", 4),
            (b"# comment\nmemory-mib = \"64\"\n", 2),
            (b"param = \"rate=1\"\n", 1),
            (b"name = \"ok\"\nmac = \"\xff\"\n", 2),
        ] {
            let f = config_file(content);
            let path = f.path().to_str().expect("temp path is UTF-8");
            let err = refused(&["--config", path], 2, &[path, &format!("line {line}")]);
            assert!(matches!(err, ConfigError::ConfigParse { line: Some(l), .. } if l == line), "{content:?}: {err:?}");
        }
    }

    #[test]
    fn config_file_unreadable_exits_1() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("missing.toml");
        let missing = missing.to_str().expect("temp path is UTF-8");
        let err = refused(&["--config", missing], 1, &[missing]);
        assert!(matches!(err, ConfigError::ConfigRead { .. }), "{err:?}");
        // A directory: readable by nobody as a file, root included.
        let dir_path = dir.path().to_str().expect("temp path is UTF-8");
        refused(&["--config", dir_path], 1, &[dir_path]);
    }

    #[test]
    fn empty_toml_file_is_all_defaults() {
        let f = config_file(b"");
        let path = f.path().to_str().expect("temp path is UTF-8");
        assert_eq!(run(&["--config", path]).unwrap(), run(&[]).unwrap());
    }

    /// `ftvm primary ARGS...` through clap and [`resolve_pair`].
    fn primary(args: &[&str]) -> Result<(GuestSettings, PairConfig), ConfigError> {
        let cli = Cli::try_parse_from(["ftvm", "primary"].iter().chain(args))
            .unwrap_or_else(|e| panic!("clap refused {args:?}: {e}"));
        let Command::Primary(p) = cli.command else {
            panic!("`ftvm primary` parsed as another subcommand");
        };
        resolve_pair(&p.guest, &p.pair, p.peer.as_deref(), PairRole::Primary)
    }

    #[test]
    fn pair_settings_come_from_the_config_file_and_flags_override_them() {
        let f = config_file(
            b"guest = \"kvstore\"\nkey-file = \"/etc/ftvm/pair.key\"\npeer = \"127.0.0.1:7000\"\n\
              listen = \"0.0.0.0:7000\"\narbiter = \"file:/srv/arb\"\nheartbeat-ms = 5\ndead-after = 4\n\
              digest-every = 500\ncontrol = \"/run/kv.sock\"\nmax-lag-ms = 250\n",
        );
        let path = f.path().to_str().unwrap();
        let (g, p) = primary(&["--config", path]).unwrap();
        assert_eq!(g.guest, GuestSource::Embedded("kvstore".into()));
        assert_eq!(p.key_file, PathBuf::from("/etc/ftvm/pair.key"));
        assert_eq!(p.address, "127.0.0.1:7000");
        assert_eq!(p.arbiter.as_deref(), Some("file:/srv/arb"));
        assert_eq!((p.heartbeat_ms, p.dead_after, p.digest_every, p.max_lag_ms), (5, 4, 500, 250));
        assert!(!p.adaptive, "dead-after in the file fixes the limit");
        assert_eq!(p.control, Some(PathBuf::from("/run/kv.sock")));
        let (_, p) = primary(&["--config", path, "--peer", "127.0.0.2:7001", "--heartbeat-ms", "20"]).unwrap();
        assert_eq!((p.address.as_str(), p.heartbeat_ms), ("127.0.0.2:7001", 20));
    }

    #[test]
    fn pair_defaults_and_missing_required_settings() {
        let (_, p) = primary(&["--key-file", "k", "--peer", "127.0.0.1:7000"]).unwrap();
        assert_eq!((p.heartbeat_ms, p.dead_after, p.digest_every, p.max_lag_ms), (10, 5, 1000, 3000));
        // No --dead-after: the silence limit adapts; with one it is fixed.
        assert!(p.adaptive);
        let (_, p) = primary(&["--key-file", "k", "--peer", "127.0.0.1:7000", "--dead-after", "5"]).unwrap();
        assert!(!p.adaptive);
        assert_eq!(p.arbiter, None);
        let e = primary(&["--peer", "127.0.0.1:7000"]).unwrap_err();
        assert!(e.to_string().contains("--key-file") && e.to_string().contains("ftvm primary --help"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = primary(&["--key-file", "k"]).unwrap_err();
        assert!(e.to_string().contains("--peer"), "{e}");
    }

    #[test]
    fn bad_addresses_arbiters_and_ranges_are_usage_errors() {
        for bad in ["foo", "10.0.1.2:70000", "::::", "10.0.1.2:0", ":7000", "fd00::1:7000", "[nothex]:7000"] {
            let e = primary(&["--key-file", "k", "--peer", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "--peer {bad}: {e}");
            assert!(e.to_string().contains("--peer"), "{e}");
        }
        assert!(primary(&["--key-file", "k", "--peer", "[::1]:7000"]).is_ok());
        for bad in ["nfs:/x", "file:", "/tmp/arb", "file:/srv/"] {
            let e = primary(&["--key-file", "k", "--peer", "127.0.0.1:1", "--arbiter", bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "--arbiter {bad}: {e}");
        }
        for (flag, bad) in [
            ("--heartbeat-ms", "0"),
            ("--heartbeat-ms", "10001"),
            ("--dead-after", "1"),
            ("--digest-every", "0"),
            ("--max-lag-ms", "5"),
        ] {
            let e = primary(&["--key-file", "k", "--peer", "127.0.0.1:1", flag, bad]).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{flag} {bad}: {e}");
            assert!(e.to_string().contains(flag), "{e}");
        }
    }

    #[test]
    fn run_refuses_pair_settings_in_its_config_file() {
        let f = config_file(b"guest = \"hello\"\nkey-file = \"/k\"\n");
        refused(&["--config", f.path().to_str().unwrap()], 2, &["key-file", "ftvm run"]);
    }
}
