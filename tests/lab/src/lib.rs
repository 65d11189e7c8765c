//! A lab of network namespaces for end-to-end tests and benchmarks (DESIGN.md, "Testing").
//!
//! The end-to-end tests, `ftvm bench` and `ftvm demo` use it (crate `ftvm-lab`). A lab is a handful of namespaces wired together
//! with the `ip` command; everything lives inside those namespaces, so no frame ever reaches an
//! interface of the root namespace, and everything goes away when the [`Lab`] is dropped, also
//! when the test panics.
//!
//! ```text
//!   client ns "…cl"            switch ns "…sw"                 host ns "…a"  (and "…b")
//!   cl-TAG 10.0.0.100 ──veth── pc-TAG ┐                      ┌─ lan-TAG ┐
//!                                     ├─ br-TAG (LAN bridge) ─┤          ├─ br-TAG 10.0.0.1 (.2 on b)
//!                                     └─ pa-TAG (pb-TAG) ─veth┘  tap-TAG ┘   └ the VM's TAP
//!
//!   dedicated link (pair labs only):  a: ln-TAG 10.0.1.1/24 ──veth── b: ln-TAG 10.0.1.2/24
//!   impaired link ([`Lab::pair_impaired`], kernel without netem):
//!                                     a: ln-TAG (TAP) ══ relay in this process ══ b: ln-TAG (TAP)
//! ```
//!
//! Each host namespace has its own bridge joining its TAP and its LAN veth, so a VM on the TAP sits
//! on the LAN with the client. The guest's address is [`GUEST_IP`] whichever host runs it.
//!
//! The dedicated link can be impaired ([`Lab::pair_impaired`], [`Impairment`]): frames lost and
//! delayed with jitter, independently in each direction, as `tc netem loss L% delay D J` does. Where
//! the kernel has the netem qdisc ([`netem_available`]) that is what is used, on both veth ends. The
//! kernel of the development machines and of CI is built without it (CONFIG_NET_SCH_NETEM off), so
//! there the link is instead two TAP devices, one in each host namespace, under the same names and
//! addresses, and a relay in the lab's own process moves frames between them, dropping and delaying
//! each as netem would ([`Lab::link_stats`] counts what it did). The hosts see an ordinary Ethernet
//! link either way.
//!
//! Names: a lab's namespaces are `ftlab<pid>-<n>-[<label>-]<role>` (see [`Lab::prefix`]); the
//! pid lets [`sweep_stale`] remove namespaces whose test process died without tearing down.
//! Interface names are scoped by their namespace, but still carry the lab's short tag
//! (`<pid base36>-<n base36>`, [`Lab::ifname_tag`]) so that any of them showing up where it does
//! not belong (the root namespace) can be recognised; they stay within IFNAMSIZ.
//!
//! Addresses are fixed: labs are separate namespaces, so parallel labs cannot collide.
//!
//! Needs root, `/dev/net/tun`, and the `ip` and `tc` programs of iproute2; nothing else (pings are
//! sent from this process, see [`Netns::ping`], because Debian's minimal images have no `ping`;
//! frames are captured in this process too, see [`Netns::capture`], so there is no `tcpdump`). A
//! program that is not installed ends a test with one line naming its Debian package
//! ([`tool_missing`]).

mod capture;
mod tools;

pub use capture::{force_receive_buffer, Capture, Direction, Frame};
pub use tools::{check_tool, find_in_path, require_tool, spawn, spawn_error, tool_missing, TOOL_PACKAGES};

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// First characters of every lab namespace; [`sweep_stale`] only looks at names with it.
pub const NETNS_PREFIX: &str = "ftlab";
/// Where `ip netns` keeps its namespace files.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Longest interface name the kernel accepts (IFNAMSIZ less the terminating NUL).
pub const IFNAME_MAX: usize = 15;

/// The LAN shared by the client, the hosts and the guest: 10.0.0.0/24.
pub const LAN_PREFIX_LEN: u8 = 24;
/// Host a's and host b's own LAN addresses, on the bridge in each host namespace. They stand in
/// for the guest while no VM runs and let a test check the LAN before it boots one.
pub const HOST_LAN_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];
/// The address to give the VM, whichever host it runs on.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The client's LAN address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// The dedicated point-to-point link between host a and host b: 10.0.1.0/24.
pub const LINK_PREFIX_LEN: u8 = 24;
/// Host a's and host b's ends of the dedicated link.
pub const LINK_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 1, 1), Ipv4Addr::new(10, 0, 1, 2)];

/// Bound on how long a process killed during teardown may take to exit.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Returns whether the caller may go on with a test that needs root.
///
/// Without root it prints a skip note and returns false, unless `FTVM_REQUIRE_KVM=1` (as CI sets
/// it), where a test must fail rather than skip: then it panics.
pub fn require_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("this test").to_owned();
    if std::env::var("FTVM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "{test} needs root (network namespaces, TAP devices) and FTVM_REQUIRE_KVM=1 forbids \
             skipping it: run the tests as root"
        );
    }
    eprintln!("skipping {test}: needs root for network namespaces (FTVM_REQUIRE_KVM=1 makes this a failure)");
    false
}

/// Polls `condition` with a short backoff (1 ms doubling up to 50 ms) until it holds or `timeout`
/// has passed; returns whether it held.
///
/// Only for external conditions that offer nothing to wait on: an address becoming pingable, a
/// carrier coming up. Whatever gives an event (a channel, a line of a child's output, a process
/// exit) must be awaited directly, with its timeout as the failure bound: sleeping for
/// synchronisation is not done anywhere else (docs/DESIGN.md, "Testing").
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(1);
    loop {
        if condition() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

/// Runs `cmd` to completion with stdin closed; on a failure to start or a non-zero exit returns a
/// message with the command line, the status and its stderr ([`tool_missing`]'s line for a
/// program that is not installed).
pub fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let output = cmd.stdin(Stdio::null()).output().map_err(|e| spawn_error(cmd, &e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!("`{cmd:?}` failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// Runs `cmd` to completion and returns its stdout; panics with its stderr if it fails.
pub fn run(cmd: &mut Command) -> String {
    match try_run(cmd) {
        Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
        Err(message) => panic!("{message}"),
    }
}

/// `ip ARGS` in the root namespace (only `ip netns` and read-only queries are ever run there).
fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// Names of all namespaces `ip netns` knows, lab or not.
pub fn netns_list() -> Vec<String> {
    // Lines read "NAME" or "NAME (id: N)".
    ip(&["netns", "list"]).lines().filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect()
}

/// Names of the root namespace's interfaces.
pub fn root_ifnames() -> Vec<String> {
    // Lines read "4: eth0: <...", or "5: veth0@if4: <..." for a device with a peer.
    ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// Serialises `ip netns add`: the first one mounts NETNS_RUN_DIR onto itself, and two racing
/// first adds stack two such mounts, hiding the namespace mounted under the lower one.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// A named network namespace (`ip netns add`), deleted on drop together with every process in it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` and brings its loopback up.
    pub fn create(name: impl Into<String>) -> Netns {
        let name = name.into();
        {
            let _serialised = NETNS_ADD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            ip(&["netns", "add", &name]);
        }
        // From here on the namespace is deleted on drop, also if a later step panics.
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, for `setns` or `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// `ip -n NAME ARGS`; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// `tc -n NAME ARGS`; returns stdout.
    pub fn tc(&self, args: &[&str]) -> String {
        run(Command::new("tc").args(["-n", &self.name]).args(args))
    }

    /// `ip netns exec NAME PROGRAM`, ready for arguments, pipes and spawning. The program runs with
    /// this namespace as its network namespace; a program that opens a TAP must run in the
    /// namespace that holds the TAP. Panics with [`tool_missing`]'s line if `program` is not
    /// installed (`ip netns exec` would only fail later, with status 255).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.try_command(program).unwrap_or_else(|message| panic!("{message}"))
    }

    /// As [`Netns::command`], but a program that is not installed is an `Err` with
    /// [`tool_missing`]'s line instead of a panic: for callers that report errors, such as
    /// `ftvm bench`.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command, String> {
        check_tool(&program.as_ref().to_string_lossy())?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        Ok(cmd)
    }

    /// Runs `argv` (program first) in this namespace to completion; returns its stdout, panics
    /// with its stderr if it fails.
    pub fn exec(&self, argv: &[&str]) -> String {
        let (program, args) = argv.split_first().expect("exec needs a program");
        run(self.command(program).args(args))
    }

    /// Starts `program args` in this namespace with stdin closed and stdout and stderr inherited;
    /// the returned child is killed on drop. For pipes, build it with [`Netns::command`] and
    /// [`LabChild::spawn`].
    pub fn spawn(&self, program: &str, args: &[&str]) -> LabChild {
        LabChild::spawn(self.command(program).args(args).stdin(Stdio::null()))
    }

    /// Runs `f` on a new thread of this process that has entered this namespace, and returns its
    /// result (a panic in `f` is passed on). Sockets `f` creates belong to this namespace for
    /// their whole life, also when used from other threads afterwards; while one is open the
    /// namespace, with its interfaces, outlives its deletion.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(self.path()).unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()));
        let name = &self.name;
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns {name}"))
                .spawn_scoped(scope, move || {
                    // SAFETY: `file` is an open namespace file for the duration of the call;
                    // setns(CLONE_NEWNET) changes only the calling thread's network namespace,
                    // and this thread ends when `f` returns.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        panic!("setns into {name}: {}", io::Error::last_os_error());
                    }
                    drop(file);
                    f()
                })
                .unwrap_or_else(|e| panic!("spawning a thread for {name}: {e}"));
            thread.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }

    /// Sends one ICMP echo request from this namespace to `dst` and returns the round-trip time,
    /// or `None` if no reply came within `timeout` or `dst` is unreachable.
    pub fn ping(&self, dst: Ipv4Addr, timeout: Duration) -> Option<Duration> {
        match self.run(move || icmp_echo(dst, timeout)) {
            Ok(rtt) => rtt,
            Err(e)
                if [libc::ENETUNREACH, libc::EHOSTUNREACH, libc::EHOSTDOWN, libc::ENETDOWN]
                    .contains(&e.raw_os_error().unwrap_or(0)) =>
            {
                None
            }
            Err(e) => panic!("pinging {dst} from {}: {e}", self.name),
        }
    }

    /// Pings `dst` until it answers or `timeout` passes; returns whether it answered.
    pub fn wait_pingable(&self, dst: Ipv4Addr, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        // An address becoming reachable is an external condition with no event to wait on;
        // each ping waits for its reply, the backoff only matters when a ping fails at once.
        wait_for(timeout, || {
            let left = deadline.saturating_duration_since(Instant::now());
            self.ping(dst, left.min(Duration::from_millis(200))).is_some()
        })
    }

    /// Sets interface `dev` up or down, e.g. to cut the dedicated link.
    pub fn set_link_up(&self, dev: &str, up: bool) {
        self.ip(&["link", "set", dev, if up { "up" } else { "down" }]);
    }

    /// Pids of the processes whose network namespace this is (`ip netns pids`), this process
    /// excluded.
    pub fn pids(&self) -> Vec<u32> {
        netns_pids(&self.name).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(message) = teardown_netns(&self.name) {
            // A panic while unwinding would abort the whole test binary.
            if std::thread::panicking() {
                eprintln!("lab teardown: {message}");
            } else {
                panic!("lab teardown: {message}");
            }
        }
    }
}

fn netns_pids(name: &str) -> Result<Vec<u32>, String> {
    let output = try_run(Command::new("ip").args(["netns", "pids", name]))?;
    let own = std::process::id();
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .filter(|&pid| pid != own)
        .collect())
}

/// Kills every process in the namespace and deletes it. Deleting the last reference to a network
/// namespace destroys its interfaces, and a veth pair dies with either end, so the peers in the
/// other lab namespaces go too; a process left in it would keep it (and its veths) alive.
fn teardown_netns(name: &str) -> Result<(), String> {
    for pid in netns_pids(name)? {
        kill_and_await(pid).map_err(|e| format!("killing pid {pid} in {name}: {e}"))?;
    }
    try_run(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

/// SIGKILLs `pid` through a pidfd (so a recycled pid is never hit) and waits for it to exit.
fn kill_and_await(pid: u32) -> Result<(), String> {
    let raw_pid = libc::pid_t::try_from(pid).map_err(|e| e.to_string())?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // ESRCH: it has already exited.
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(e.to_string()) };
    }
    let fd = i32::try_from(fd).map_err(|e| e.to_string())?;
    // SAFETY: fd is the fresh descriptor pidfd_open just returned; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: pidfd is a valid pidfd; a null siginfo is allowed and means a plain kill(2).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(e.to_string()) };
    }
    // A pidfd becomes readable when its process exits: an event, not a poll loop.
    if poll_readable(&pidfd, KILL_TIMEOUT)? {
        Ok(())
    } else {
        Err(format!("still running {KILL_TIMEOUT:?} after SIGKILL"))
    }
}

/// Waits up to `timeout` for `fd` to become readable; returns whether it did.
fn poll_readable(fd: &OwnedFd, timeout: Duration) -> Result<bool, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so a sub-millisecond remainder still waits instead of spinning.
        let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.to_string());
            }
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// A child process killed (and reaped) on drop. Derefs to [`Child`].
pub struct LabChild {
    child: Child,
}

impl LabChild {
    /// Spawns `cmd`, typically built with [`Netns::command`]; panics if it cannot start
    /// ([`spawn_error`]).
    pub fn spawn(cmd: &mut Command) -> LabChild {
        LabChild { child: spawn(cmd) }
    }
}

impl std::ops::Deref for LabChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for LabChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        // Fails only if it has already been reaped; either way it is gone afterwards.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies a netem qdisc to `dev` in `netns`, e.g. `netem(ns, dev, "loss 10% delay 5ms 5ms")`;
/// replaces any netem set before. Panics if the kernel has no netem: see [`netem_available`].
pub fn netem(netns: &Netns, dev: &str, spec: &str) {
    let mut cmd = Command::new("tc");
    cmd.args(["-n", netns.name(), "qdisc", "replace", "dev", dev, "root", "netem"]).args(spec.split_whitespace());
    if let Err(message) = try_run(&mut cmd) {
        let hint = if message.contains("unknown") {
            " (this kernel has no sch_netem, CONFIG_NET_SCH_NETEM: check lab::netem_available())"
        } else {
            ""
        };
        panic!("{message}{hint}");
    }
}

/// Removes the qdisc [`netem`] put on `dev`.
pub fn netem_clear(netns: &Netns, dev: &str) {
    netns.tc(&["qdisc", "del", "dev", dev, "root"]);
}

/// Whether the running kernel has the netem qdisc (tried once per process, on the loopback of a
/// throwaway namespace). Not every kernel does: a test that needs it must say so when it is
/// missing.
pub fn netem_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let probe = Netns::create(format!("{}probe", next_prefix("").0));
        let mut cmd = Command::new("tc");
        cmd.args(["-n", probe.name(), "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]);
        match try_run(&mut cmd) {
            Ok(_) => true,
            // tc: "Error: Specified qdisc kind is unknown."
            Err(message) if message.contains("unknown") => false,
            Err(message) => panic!("probing for netem: {message}"),
        }
    })
}

/// Loss and delay of an impaired dedicated link ([`Lab::pair_impaired`]): what
/// `tc netem loss L% delay D J` does.
///
/// Each frame, in each direction independently, is dropped with probability
/// `loss_percent / 100`; otherwise it is delivered `delay ± jitter` after it was sent, the offset
/// drawn uniformly from `[delay - jitter, delay + jitter]` (cut at zero) for each frame on its
/// own. Frames whose draws cross are delivered out of order, as with netem. [`fmt::Display`]
/// gives the netem spec, "loss 10% delay 5ms 5ms".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Impairment {
    /// Chance, in percent (0 to 100), that a frame is lost.
    pub loss_percent: f64,
    /// Mean one-way delay added to each frame that is not lost.
    pub delay: Duration,
    /// Largest deviation from `delay`, either way.
    pub jitter: Duration,
}

impl Impairment {
    /// Whether a frame should be lost, given a uniform draw `u` in [0, 1).
    fn loses(&self, u: f64) -> bool {
        u * 100.0 < self.loss_percent
    }

    /// The delay of a frame, given a uniform draw `u` in [0, 1): `delay - jitter + 2 jitter u`,
    /// at least zero.
    fn delay_for(&self, u: f64) -> Duration {
        let secs = self.delay.as_secs_f64() + self.jitter.as_secs_f64() * (2.0 * u - 1.0);
        Duration::from_secs_f64(secs.max(0.0))
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// A duration in tc's syntax, in the largest unit that holds it exactly.
        fn tc_time(d: Duration) -> String {
            let nanos = d.as_nanos();
            if nanos % 1_000_000 == 0 {
                format!("{}ms", nanos / 1_000_000)
            } else if nanos % 1_000 == 0 {
                format!("{}us", nanos / 1_000)
            } else {
                format!("{nanos}ns")
            }
        }
        write!(f, "loss {}% delay {} {}", self.loss_percent, tc_time(self.delay), tc_time(self.jitter))
    }
}

/// What the relay of an impaired link did with the frames of one direction since the lab was
/// built. Frames read but not yet dropped, forwarded or refused are in flight, waiting for their
/// delivery time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Frames read from the sending host's TAP: everything that host sent on the link.
    pub read: u64,
    /// Frames lost on purpose ([`Impairment::loss_percent`]).
    pub dropped: u64,
    /// Frames written to the receiving host's TAP.
    pub forwarded: u64,
    /// Frames the receiving host's TAP refused, e.g. because that end was set down.
    pub undeliverable: u64,
}

/// The counters of an impaired link's relay ([`Lab::link_stats`]), per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Frames host a sent to host b.
    pub a_to_b: DirectionStats,
    /// Frames host b sent to host a.
    pub b_to_a: DirectionStats,
}

/// Opens the TAP `name` in `netns` as a VMM would (IFF_TAP | IFF_NO_PI, single queue) and returns
/// it: each read returns one Ethernet frame the namespace sent, each write injects one. The TAP
/// must exist (`ip tuntap add`); it has carrier while the file is open. An open TAP keeps its
/// namespace alive after the namespace is deleted: close it before dropping the lab.
pub fn open_tap(netns: &Netns, name: &str) -> File {
    let name = name.to_owned();
    // /dev/net/tun binds the TAP of the name given in the namespace of the thread opening it.
    netns.run(move || {
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("opening /dev/net/tun: {e}"));
        assert!(name.len() <= IFNAME_MAX, "TAP name {name} is longer than IFNAMSIZ allows");
        // SAFETY: ifreq is plain old data for which all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // At most IFNAME_MAX bytes (checked above), so the name keeps a terminating NUL.
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call, on a descriptor
        // of /dev/net/tun that `file` owns.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name} in {}: {}",
            std::thread::current().name().unwrap_or("?"),
            io::Error::last_os_error()
        );
        file
    })
}

/// A small pseudo-random generator (splitmix64): enough for loss and jitter draws, and no
/// dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeded from the clock, the pid and `stream`, so each direction and each lab draws its own.
    fn seeded(stream: u64) -> SplitMix64 {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        // Truncating the nanoseconds is fine: only their low bits vary.
        let seed = (now.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32)
            ^ stream.wrapping_mul(0xA24B_AED4_963E_E407);
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits as a fraction.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The relay's counters for one direction; see [`DirectionStats`].
#[derive(Default)]
struct Counters {
    read: AtomicU64,
    dropped: AtomicU64,
    forwarded: AtomicU64,
    undeliverable: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            read: self.read.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            forwarded: self.forwarded.load(Ordering::Relaxed),
            undeliverable: self.undeliverable.load(Ordering::Relaxed),
        }
    }
}

/// A frame waiting in the relay for its delivery time. Ordered by due time, then by arrival, so
/// frames due at the same instant keep their order.
struct Pending {
    due: Instant,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Largest frame read from a TAP: TAPs without offloads send at most MTU + header, but a bigger
/// buffer costs nothing and never truncates a frame.
const MAX_FRAME: usize = 65536;

/// The userspace impaired link between two TAPs (kernels without netem; see the module
/// documentation). Per direction, a reader thread waits on the sending TAP and on `stop`, reads
/// each frame, drops it or stamps it with its due time and hands it over a channel to a delivery
/// thread, which keeps the frames in a min-heap by due time and writes each to the other TAP when
/// it is due. Dropping it stops and joins all four threads, then closes the TAPs.
struct LinkRelay {
    /// An eventfd; written once on drop, which makes it readable for good and wakes the readers.
    stop: Arc<File>,
    counters: [Arc<Counters>; 2],
    threads: Vec<JoinHandle<Result<(), String>>>,
}

impl LinkRelay {
    /// Starts relaying between `taps` (host a's end, host b's end). `tag` names the threads
    /// ("TAG ab rx"...), so they can be recognised in /proc.
    fn start(tag: &str, impairment: Impairment, taps: [File; 2]) -> LinkRelay {
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: fd is the fresh descriptor eventfd just returned; nothing else owns it.
        let stop = Arc::new(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        let taps = taps.map(Arc::new);
        // Built before any thread starts, so that a failure to spawn one still stops the others
        // (through Drop) while unwinding.
        let mut relay = LinkRelay { stop, counters: Default::default(), threads: Vec::new() };
        for (direction, (from, to), name) in [(0, (0, 1), "ab"), (1, (1, 0), "ba")] {
            let (sender, receiver) = mpsc::channel();
            let spawn = |role: &str, body: Box<dyn FnOnce() -> Result<(), String> + Send>| {
                let thread = format!("{tag} {name} {role}");
                std::thread::Builder::new()
                    .name(thread.clone())
                    .spawn(move || {
                        realtime_priority();
                        let result = body();
                        // Said now, when the link stops working, and again by Drop.
                        if let Err(message) = &result {
                            eprintln!("lab link relay thread {thread}: {message}");
                        }
                        result
                    })
                    .unwrap_or_else(|e| panic!("spawning the link relay's thread: {e}"))
            };
            let (to_tap, counters) = (Arc::clone(&taps[to]), Arc::clone(&relay.counters[direction]));
            relay.threads.push(spawn("tx", Box::new(move || deliver_frames(&to_tap, &receiver, &counters))));
            let (from_tap, stop, counters) =
                (Arc::clone(&taps[from]), Arc::clone(&relay.stop), Arc::clone(&relay.counters[direction]));
            let rng = SplitMix64::seeded(direction as u64);
            relay.threads.push(spawn(
                "rx",
                Box::new(move || read_frames(&from_tap, &stop, impairment, rng, &counters, &sender)),
            ));
        }
        relay
    }

    fn stats(&self) -> LinkStats {
        LinkStats { a_to_b: self.counters[0].snapshot(), b_to_a: self.counters[1].snapshot() }
    }
}

impl Drop for LinkRelay {
    fn drop(&mut self) {
        let mut failures = Vec::new();
        // Adds 1 to the eventfd's counter: readable from now on, since nobody reads it.
        if let Err(e) = (&*self.stop).write_all(&1u64.to_ne_bytes()) {
            failures.push(format!("signalling the link relay to stop: {e}"));
        }
        // The readers see `stop` and return, dropping their senders; each delivery thread then
        // finds its channel disconnected and returns, discarding frames still in flight.
        for thread in self.threads.drain(..) {
            let name = thread.thread().name().unwrap_or("?").to_owned();
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(message)) => failures.push(format!("thread {name}: {message}")),
                Err(_) => failures.push(format!("thread {name} panicked")),
            }
        }
        if !failures.is_empty() {
            let message = format!("lab link relay: {}", failures.join("; "));
            // A panic while unwinding would abort the whole test binary.
            if std::thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

/// Wait until `data` or `stop` has something to read (retrying after a
/// signal); their pollfds, `revents` filled in.
pub(crate) fn poll_data_or_stop(data: RawFd, stop: RawFd) -> Result<[libc::pollfd; 2], String> {
    loop {
        let mut fds = [
            libc::pollfd { fd: data, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: fds is an array of 2 valid pollfds for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready >= 0 {
            return Ok(fds);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("poll: {e}"));
        }
    }
}

/// Gives the calling thread a low real-time priority (SCHED_FIFO 10), as netem's kernel timers
/// effectively have: a relay at normal priority lags by tens of milliseconds when the VMMs and
/// clients it carries keep both cores busy, and a link slower than its impairment would fail the
/// experiments for the wrong reason. The relay's threads sleep unless a frame is due and do little
/// per frame; the kernel's real-time throttling (sched_rt_runtime_us) bounds them anyway. Without
/// the privilege the thread stays as it is, and says so once.
fn realtime_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler(0, ...) changes only the calling thread's policy and reads one
    // sched_param, which lives for the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        static SAID: Once = Once::new();
        let e = io::Error::last_os_error();
        SAID.call_once(|| eprintln!("lab link relay: normal priority ({e}): delays may exceed the impairment"));
    }
}

/// A relay reader: reads frames from `from` until `stop` becomes readable, drops each with the
/// loss probability and sends the others to the delivery thread with their due time.
fn read_frames(
    from: &File,
    stop: &File,
    impairment: Impairment,
    mut rng: SplitMix64,
    counters: &Counters,
    delivery: &mpsc::Sender<Pending>,
) -> Result<(), String> {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut seq = 0u64;
    loop {
        let fds = poll_data_or_stop(from.as_raw_fd(), stop.as_raw_fd())?;
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[0].revents & libc::POLLIN == 0 {
            // POLLERR: the TAP was unregistered under the relay, which only happens if its
            // namespace was deleted while the relay ran.
            return Err(format!("the TAP reported poll events {:#x}", fds[0].revents));
        }
        // Only this thread reads this TAP, so after POLLIN a frame is queued and read cannot
        // block.
        let len = match (&*from).read(&mut buf) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading the TAP: {e}")),
        };
        let now = Instant::now();
        counters.read.fetch_add(1, Ordering::Relaxed);
        if impairment.loses(rng.next_f64()) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let pending = Pending { due: now + impairment.delay_for(rng.next_f64()), seq, frame: buf[..len].to_vec() };
        seq += 1;
        if delivery.send(pending).is_err() {
            return Err("the delivery thread has ended".to_owned());
        }
    }
}

/// A relay delivery thread: keeps the frames `from_reader` hands over in a min-heap by due time
/// and writes each to `to` when it is due; returns when the reader is gone.
fn deliver_frames(to: &File, from_reader: &mpsc::Receiver<Pending>, counters: &Counters) -> Result<(), String> {
    let mut queue: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse(next)| next.due <= now) {
            let Some(Reverse(pending)) = queue.pop() else { break };
            // A TAP takes one whole frame per write, or refuses it: EIO while the interface is
            // down, EINVAL for a runt. Those are frames the link loses; anything else is a bug.
            match (&*to).write(&pending.frame) {
                Ok(_) => counters.forwarded.fetch_add(1, Ordering::Relaxed),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                    counters.undeliverable.fetch_add(1, Ordering::Relaxed)
                }
                Err(e) => return Err(format!("writing the TAP: {e}")),
            };
        }
        let received = match queue.peek() {
            Some(Reverse(next)) => from_reader.recv_timeout(next.due.saturating_duration_since(Instant::now())),
            None => from_reader.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(pending) => queue.push(Reverse(pending)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Deletes lab namespaces whose owning process (the pid in their name) is gone, with any process
/// still in them; returns their names. Runs once per process before its first lab; another test
/// process sweeping at the same time may win the race for a namespace, which is fine.
///
/// The owner is judged by pid in this pid namespace: a container sharing /var/run/netns with other
/// pid namespaces must not run it.
pub fn sweep_stale() -> Vec<String> {
    let own = std::process::id();
    let mut removed = Vec::new();
    for name in netns_list() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == own || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match teardown_netns(&name) {
            Ok(()) => removed.push(name),
            Err(message) => eprintln!("lab sweep: {message}"),
        }
    }
    removed
}

/// The pid in a lab namespace's name (`ftlab<pid>-...`), or `None` for other names.
fn owner_pid(name: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix(NETNS_PREFIX)?.split_once('-')?;
    pid.parse().ok()
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh namespace-name prefix `ftlab<pid>-<n>-[<label>-]` and its `n`; `label` is cut to at
/// most 10 lowercase letters and digits.
fn next_prefix(label: &str) -> (String, u32) {
    let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
    let label: String =
        label.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).take(10).collect();
    let pid = std::process::id();
    let prefix = if label.is_empty() {
        format!("{NETNS_PREFIX}{pid}-{n}-")
    } else {
        format!("{NETNS_PREFIX}{pid}-{n}-{label}-")
    };
    (prefix, n)
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ASCII")
}

/// A host namespace of a lab: a TAP and the LAN veth on a bridge, and in a pair lab one end of the
/// dedicated link.
pub struct LabHost {
    netns: Netns,
    bridge: String,
    tap: String,
    lan_dev: String,
    lan_ip: Ipv4Addr,
    link: Option<(String, Ipv4Addr)>,
}

impl LabHost {
    /// The host's namespace: run its VMM there (`netns().command(...)`).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The TAP the VM on this host uses; it exists only in [`LabHost::netns`].
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// The bridge in the host namespace joining the TAP and the LAN veth.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The host's veth to the LAN switch (a port of [`LabHost::bridge`]).
    pub fn lan_dev(&self) -> &str {
        &self.lan_dev
    }

    /// The host's own LAN address (on its bridge); one of [`HOST_LAN_IPS`].
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.lan_ip
    }

    /// This host's end of the dedicated link. Panics in a single-host lab.
    pub fn link_dev(&self) -> &str {
        &self.link.as_ref().expect("a single-host lab has no dedicated link").0
    }

    /// This host's address on the dedicated link; one of [`LINK_IPS`]. Panics in a single-host
    /// lab.
    pub fn link_ip(&self) -> Ipv4Addr {
        self.link.as_ref().expect("a single-host lab has no dedicated link").1
    }
}

/// A LAN of one or two hosts and a client, plus a dedicated link between two hosts; see the module
/// documentation for the picture and [`HOST_LAN_IPS`] and the other consts for the address plan.
/// Dropping it stops the relay of an impaired link, kills every process in its namespaces and
/// deletes them.
pub struct Lab {
    prefix: String,
    tag: String,
    impairment: Option<Impairment>,
    // Fields drop in this order. The relay goes first: its threads hold the link's TAPs open, and
    // an open TAP keeps its namespace, with all its interfaces, alive after `ip netns delete`. The
    // order of the rest does not matter, since a veth pair dies with either end.
    relay: Option<LinkRelay>,
    hosts: Vec<LabHost>,
    client: Netns,
    client_dev: String,
    switch: Netns,
    switch_bridge: String,
}

impl Lab {
    /// Host a with a TAP on the LAN, and the client. `name` (a short test name, may be empty)
    /// only makes the namespace names easier to recognise.
    pub fn single(name: &str) -> Lab {
        Lab::build(name, 1, None)
    }

    /// Hosts a and b, each with a TAP on the LAN, the client, and the dedicated link a-b.
    pub fn pair(name: &str) -> Lab {
        Lab::build(name, 2, None)
    }

    /// As [`Lab::pair`], same names and addresses, but the dedicated link loses and delays frames
    /// as `impairment` says, in both directions, for the lab's whole life.
    ///
    /// With netem in the kernel the link is the usual veth pair with netem on both ends. Without
    /// it (this project's machines and CI), each host's `ln-TAG` is a TAP and a relay in this
    /// process carries frames between them: see the module documentation and [`Lab::link_stats`].
    /// Panics if the loss is not a percentage.
    pub fn pair_impaired(name: &str, impairment: Impairment) -> Lab {
        assert!(
            (0.0..=100.0).contains(&impairment.loss_percent),
            "loss must be a percentage from 0 to 100, not {}",
            impairment.loss_percent
        );
        Lab::build(name, 2, Some(impairment))
    }

    fn build(name: &str, hosts: usize, impairment: Option<Impairment>) -> Lab {
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            sweep_stale();
        });

        let (prefix, n) = next_prefix(name);
        let tag = format!("{}-{}", base36(std::process::id()), base36(n));
        let ifname = |role: &str| {
            let name = format!("{role}-{tag}");
            assert!(name.len() <= IFNAME_MAX, "interface name {name} is longer than IFNAMSIZ allows");
            name
        };
        let lan_cidr = |ip: Ipv4Addr| format!("{ip}/{LAN_PREFIX_LEN}");

        // Every namespace is owned by a local as soon as it exists, so a failing step below
        // unwinds through their drops and leaves nothing behind.
        let switch = Netns::create(format!("{prefix}sw"));
        quiet(&switch);
        let switch_bridge = ifname("br");
        switch.ip(&["link", "add", &switch_bridge, "type", "bridge"]);
        switch.set_link_up(&switch_bridge, true);

        let client = Netns::create(format!("{prefix}cl"));
        quiet(&client);
        let client_dev = ifname("cl");
        plug(&switch, &switch_bridge, &ifname("pc"), &client, &client_dev);
        client.ip(&["addr", "add", &lan_cidr(CLIENT_IP), "dev", &client_dev]);
        client.set_link_up(&client_dev, true);

        let mut lab_hosts: Vec<LabHost> = Vec::new();
        for (index, letter) in ["a", "b"].into_iter().enumerate().take(hosts) {
            let netns = Netns::create(format!("{prefix}{letter}"));
            quiet(&netns);
            let bridge = ifname("br");
            let tap = ifname("tap");
            let lan_dev = ifname("lan");
            let lan_ip = HOST_LAN_IPS[index];
            netns.ip(&["link", "add", &bridge, "type", "bridge"]);
            plug(&switch, &switch_bridge, &ifname(&format!("p{letter}")), &netns, &lan_dev);
            // Persistent and single-queue: the VMM opens it with IFF_TAP | IFF_NO_PI and no
            // IFF_MULTI_QUEUE. It has no carrier until opened, so the bridge forwards nothing to
            // it before then.
            netns.ip(&["tuntap", "add", &tap, "mode", "tap"]);
            for port in [&lan_dev, &tap] {
                netns.ip(&["link", "set", port, "master", &bridge]);
                netns.set_link_up(port, true);
            }
            netns.ip(&["addr", "add", &lan_cidr(lan_ip), "dev", &bridge]);
            netns.set_link_up(&bridge, true);
            lab_hosts.push(LabHost { netns, bridge, tap, lan_dev, lan_ip, link: None });
        }

        // Declared after the hosts, so that if a step below panics it drops first, closing the
        // TAPs before the namespaces are deleted (see the field order of Lab).
        let mut relay = None;
        if let [a, b] = lab_hosts.as_mut_slice() {
            let dev = ifname("ln");
            let use_relay = impairment.is_some() && !netem_available();
            if use_relay {
                // Persistent TAPs, each created in its own namespace; they have no carrier until
                // the relay opens them below.
                for host in [&*a, &*b] {
                    host.netns.ip(&["tuntap", "add", &dev, "mode", "tap"]);
                }
            } else {
                // Both ends are created in their own namespace, never in the root one.
                a.netns.ip(&["link", "add", &dev, "type", "veth", "peer", "name", &dev, "netns", b.netns.name()]);
            }
            for (host, ip) in [(&mut *a, LINK_IPS[0]), (&mut *b, LINK_IPS[1])] {
                host.netns.ip(&["addr", "add", &format!("{ip}/{LINK_PREFIX_LEN}"), "dev", &dev]);
                host.netns.set_link_up(&dev, true);
                host.link = Some((dev.clone(), ip));
            }
            match impairment {
                Some(impairment) if use_relay => {
                    let taps = [open_tap(&a.netns, &dev), open_tap(&b.netns, &dev)];
                    relay = Some(LinkRelay::start(&tag, impairment, taps));
                }
                Some(impairment) => {
                    // netem acts on what a device sends: one qdisc per direction.
                    let spec = impairment.to_string();
                    for host in [&*a, &*b] {
                        netem(&host.netns, &dev, &spec);
                    }
                }
                None => {}
            }
        }

        Lab { prefix, tag, impairment, relay, hosts: lab_hosts, client, client_dev, switch, switch_bridge }
    }

    /// The impairment of the dedicated link, if the lab was built by [`Lab::pair_impaired`].
    pub fn impairment(&self) -> Option<Impairment> {
        self.impairment
    }

    /// What the relay of an impaired link has done so far, per direction; `None` when there is no
    /// relay: a lab not built by [`Lab::pair_impaired`], or one whose kernel has netem (then
    /// `tc -s qdisc` on [`LabHost::link_dev`] has netem's own counters).
    pub fn link_stats(&self) -> Option<LinkStats> {
        self.relay.as_ref().map(LinkRelay::stats)
    }

    /// The start of every namespace name of this lab (ends in '-').
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The tag every interface name of this lab ends with (after a '-').
    pub fn ifname_tag(&self) -> &str {
        &self.tag
    }

    /// The namespace holding the LAN bridge.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The LAN bridge in [`Lab::switch`]; netem on its ports impairs the LAN.
    pub fn switch_bridge(&self) -> &str {
        &self.switch_bridge
    }

    /// The client's namespace, on the LAN with the hosts and the guest.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The client's LAN interface.
    pub fn client_dev(&self) -> &str {
        &self.client_dev
    }

    /// [`CLIENT_IP`].
    pub fn client_ip(&self) -> Ipv4Addr {
        CLIENT_IP
    }

    /// [`GUEST_IP`]: the address to give the VM.
    pub fn guest_ip(&self) -> Ipv4Addr {
        GUEST_IP
    }

    /// The guest's address with its prefix length, "10.0.0.10/24".
    pub fn guest_cidr(&self) -> String {
        format!("{GUEST_IP}/{LAN_PREFIX_LEN}")
    }

    /// All hosts: one, or a and b.
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }

    /// Host a.
    pub fn host_a(&self) -> &LabHost {
        &self.hosts[0]
    }

    /// Host b. Panics in a single-host lab.
    pub fn host_b(&self) -> &LabHost {
        self.hosts.get(1).expect("a single-host lab has no host b")
    }
}

/// Connects `other` to the LAN: a veth pair with `port` in the switch namespace, enslaved to the
/// bridge, and `dev` in `other`. Both ends are created directly in their namespaces.
fn plug(switch: &Netns, bridge: &str, port: &str, other: &Netns, dev: &str) {
    switch.ip(&["link", "add", port, "type", "veth", "peer", "name", dev, "netns", other.name()]);
    switch.ip(&["link", "set", port, "master", bridge]);
    switch.set_link_up(port, true);
}

/// Turns IPv6 off in a lab namespace before its interfaces exist, so the LAN carries only what
/// tests send (and ARP): no router solicitations, MLD or DAD that a guest would receive as input.
fn quiet(netns: &Netns) {
    netns.run(|| {
        for knob in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
            // Absent when the kernel runs without IPv6, which is just as quiet.
            if Path::new(&path).exists() {
                std::fs::write(&path, "1").unwrap_or_else(|e| panic!("writing {path}: {e}"));
            }
        }
    });
}

/// Sends one ICMP echo request to `dst` from the calling thread's namespace (a raw socket: root)
/// and waits up to `timeout` for the matching reply.
fn icmp_echo(dst: Ipv4Addr, timeout: Duration) -> io::Result<Option<Duration>> {
    static SEQUENCE: AtomicU16 = AtomicU16::new(0);
    // Raw ICMP sockets see every ICMP packet of the namespace; identifier and sequence number
    // pick out the reply to this request among concurrent pings.
    let ident = (std::process::id() & 0xffff) as u16;
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);

    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is the fresh descriptor socket just returned; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    let mut request = [0u8; 64];
    request[0] = 8; // echo request, code 0
    request[4..6].copy_from_slice(&ident.to_be_bytes());
    request[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, byte) in request[8..].iter_mut().enumerate() {
        *byte = i as u8;
    }
    let checksum = internet_checksum(&request);
    request[2..4].copy_from_slice(&checksum.to_be_bytes());

    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    // SAFETY: request and addr are valid for the lengths passed and outlive the call.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let deadline = start + timeout;
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !poll_readable(&socket, left).map_err(io::Error::other)? {
            return Ok(None);
        }
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let len = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if len < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                continue;
            }
            return Err(e);
        }
        let packet = &buf[..len as usize];
        if is_echo_reply(packet, dst, ident, seq) {
            return Ok(Some(start.elapsed()));
        }
    }
}

/// Whether `packet` (IPv4 header included, as raw sockets deliver it) is the echo reply from `src`
/// with `ident` and `seq`.
fn is_echo_reply(packet: &[u8], src: Ipv4Addr, ident: u16, seq: u16) -> bool {
    let Some(&first) = packet.first() else {
        return false;
    };
    let header_len = usize::from(first & 0x0f) * 4;
    if packet.len() < header_len + 8 || header_len < 20 {
        return false;
    }
    let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[header_len..];
    from == src
        && icmp[0] == 0 // echo reply
        && icmp[1] == 0
        && icmp[4..6] == ident.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// RFC 1071 checksum.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impairment_displays_as_a_netem_spec() {
        let ms = Duration::from_millis;
        let spec = |loss_percent, delay, jitter| Impairment { loss_percent, delay, jitter }.to_string();
        assert_eq!(spec(10.0, ms(5), ms(5)), "loss 10% delay 5ms 5ms");
        assert_eq!(spec(0.5, Duration::from_micros(1500), Duration::ZERO), "loss 0.5% delay 1500us 0ms");
        assert_eq!(spec(0.0, Duration::from_nanos(10), ms(1)), "loss 0% delay 10ns 1ms");
    }

    #[test]
    fn draws_map_to_loss_and_delay_as_netem_does() {
        let ms = Duration::from_millis;
        let impairment = Impairment { loss_percent: 10.0, delay: ms(5), jitter: ms(5) };
        assert!(impairment.loses(0.0) && impairment.loses(0.0999));
        assert!(!impairment.loses(0.1) && !impairment.loses(0.9999));
        assert!(!Impairment { loss_percent: 0.0, ..impairment }.loses(0.0));
        assert!(Impairment { loss_percent: 100.0, ..impairment }.loses(0.9999));
        assert_eq!(impairment.delay_for(0.0), Duration::ZERO);
        assert_eq!(impairment.delay_for(0.5), ms(5));
        assert!(impairment.delay_for(0.9999) <= ms(10));
        // More jitter than delay: the early side is cut at zero.
        let wide = Impairment { loss_percent: 0.0, delay: ms(2), jitter: ms(5) };
        assert_eq!(wide.delay_for(0.1), Duration::ZERO);
        assert_eq!(wide.delay_for(0.8), ms(5));
    }

    #[test]
    fn splitmix_draws_are_uniform_enough() {
        let mut rng = SplitMix64(42);
        let draws: Vec<f64> = (0..100_000).map(|_| rng.next_f64()).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let impairment = Impairment { loss_percent: 10.0, delay: Duration::ZERO, jitter: Duration::ZERO };
        let lost = draws.iter().filter(|&&u| impairment.loses(u)).count();
        assert!((9_500..=10_500).contains(&lost), "{lost} of 100000 lost at 10 %");
        // Different streams, different draws.
        assert_ne!(SplitMix64::seeded(0).next_u64(), SplitMix64::seeded(1).next_u64());
    }

    #[test]
    fn pending_frames_leave_by_due_time_then_arrival() {
        let now = Instant::now();
        let pending =
            |after_ms, seq| Reverse(Pending { due: now + Duration::from_millis(after_ms), seq, frame: vec![] });
        let mut queue: BinaryHeap<_> = [pending(5, 0), pending(1, 1), pending(5, 2), pending(3, 3)].into();
        let order: Vec<u64> = std::iter::from_fn(|| queue.pop().map(|Reverse(p)| p.seq)).collect();
        assert_eq!(order, [1, 3, 0, 2]);
    }
}
