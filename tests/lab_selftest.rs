//! Checks of the namespace lab itself (crate `ftvm-lab`, `tests/lab/`): the LAN reaches the hosts and their
//! TAPs, the dedicated link works and can be impaired, labs run in parallel, and nothing is left
//! behind, also when a test panics. All need root: `netns_root_` in their names.

use ftvm_lab as lab;

use std::fs::File;
use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use lab::{Lab, Netns};

/// Bound for an address on a freshly built lab to answer.
const REACHABLE: Duration = Duration::from_secs(5);

/// Lab namespaces still listed by `ip netns` whose names start with `prefix`.
fn leftovers(prefix: &str) -> Vec<String> {
    lab::netns_list().into_iter().filter(|name| name.starts_with(prefix)).collect()
}

/// Root-namespace interfaces carrying a lab's tag.
fn root_ifnames_tagged(tag: &str) -> Vec<String> {
    let suffix = format!("-{tag}");
    lab::root_ifnames().into_iter().filter(|name| name.ends_with(&suffix)).collect()
}

/// Reads frames from `tap` until an ARP request for `target` arrives or `timeout` passes.
fn await_arp_request(tap: &mut File, target: Ipv4Addr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut frame = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        assert!(ready >= 0, "poll on the TAP: {}", std::io::Error::last_os_error());
        if ready == 0 {
            return false;
        }
        let len = tap.read(&mut frame).expect("reading the TAP");
        let frame = &frame[..len];
        // Ethernet type 0x0806 (ARP), operation 1 (request), target protocol address at 38..42.
        if len >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 1] && frame[38..42] == target.octets() {
            return true;
        }
    }
}

#[test]
fn netns_root_single_lab_client_reaches_host_and_tap() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::single("single");
    let host = lab.host_a();
    assert!(lab.hosts().len() == 1);
    assert!(lab.prefix().starts_with(lab::NETNS_PREFIX));
    assert!(host.netns().name().starts_with(lab.prefix()));

    // The host's own LAN address stands in for the guest until there is a VM.
    assert!(lab.client().wait_pingable(host.lan_ip(), REACHABLE), "client cannot ping host a at {}", host.lan_ip());
    assert!(host.netns().ping(lab.client_ip(), REACHABLE).is_some(), "host a cannot ping the client");

    // The TAP and the LAN veth are ports of the host's bridge...
    let ports = host.netns().ip(&["-o", "link", "show", "master", host.bridge()]);
    for port in [host.tap(), host.lan_dev()] {
        assert!(ports.contains(&format!(": {port}")), "{port} is not on {}: {ports}", host.bridge());
    }
    // ...so what the client sends towards the guest reaches the TAP: its ARP request for the
    // guest address. The ping itself times out, there is no guest to answer it.
    let mut tap = lab::open_tap(host.netns(), host.tap());
    assert!(lab.client().ping(lab.guest_ip(), Duration::from_millis(100)).is_none());
    assert!(
        await_arp_request(&mut tap, lab.guest_ip(), REACHABLE),
        "no ARP request for {} on {}",
        lab.guest_ip(),
        host.tap()
    );
    drop(tap);

    // Everything lives in the lab's namespaces, nothing in the root namespace.
    assert_eq!(root_ifnames_tagged(lab.ifname_tag()), Vec::<String>::new());
    assert_eq!(lab.guest_cidr(), "10.0.0.10/24");

    let (prefix, tag) = (lab.prefix().to_owned(), lab.ifname_tag().to_owned());
    drop(lab);
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert_eq!(root_ifnames_tagged(&tag), Vec::<String>::new());
}

#[test]
fn netns_root_pair_lab_dedicated_link_and_netem() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::pair("pair");
    let (a, b) = (lab.host_a(), lab.host_b());
    assert_eq!((a.link_ip(), b.link_ip()), (lab::LINK_IPS[0], lab::LINK_IPS[1]));

    assert!(a.netns().wait_pingable(b.link_ip(), REACHABLE), "a cannot ping b over the link");
    assert!(b.netns().ping(a.link_ip(), REACHABLE).is_some(), "b cannot ping a over the link");
    // Both hosts and the client share the LAN.
    assert!(a.netns().ping(b.lan_ip(), REACHABLE).is_some(), "a cannot ping b over the LAN");
    for host in lab.hosts() {
        assert!(lab.client().ping(host.lan_ip(), REACHABLE).is_some(), "client cannot ping {}", host.lan_ip());
    }
    assert_eq!(root_ifnames_tagged(lab.ifname_tag()), Vec::<String>::new());

    // The link is a route of its own: cut it and b's link address is gone while its LAN address
    // still answers.
    a.netns().set_link_up(a.link_dev(), false);
    assert!(a.netns().ping(b.link_ip(), Duration::from_millis(200)).is_none(), "link is down yet b answers");
    assert!(a.netns().ping(b.lan_ip(), REACHABLE).is_some(), "cutting the link cut the LAN");
    a.netns().set_link_up(a.link_dev(), true);
    assert!(a.netns().wait_pingable(b.link_ip(), REACHABLE), "link did not come back");

    const DELAY: Duration = Duration::from_millis(50);
    if !lab::netem_available() {
        // Not a skip of the whole test: everything above ran. The kernel lacks the qdisc.
        eprintln!("netem part skipped: this kernel has no sch_netem (CONFIG_NET_SCH_NETEM)");
        return;
    }
    let baseline = a.netns().ping(b.link_ip(), REACHABLE).expect("no reply before netem");
    assert!(baseline < DELAY, "link is already slower than the netem delay: {baseline:?}");
    lab::netem(a.netns(), a.link_dev(), &format!("delay {}ms", DELAY.as_millis()));
    let delayed = a.netns().ping(b.link_ip(), REACHABLE).expect("no reply with netem");
    assert!(delayed >= DELAY, "netem delay {DELAY:?} but RTT {delayed:?}");
    lab::netem_clear(a.netns(), a.link_dev());
    let cleared = a.netns().ping(b.link_ip(), REACHABLE).expect("no reply after netem");
    assert!(cleared < DELAY, "netem still delays after clearing: {cleared:?}");
}

#[test]
fn netns_root_lab_dropped_by_panic_leaves_nothing() {
    if !lab::require_root() {
        return;
    }
    let (sender, receiver) = mpsc::channel();
    let crashed = thread::spawn(move || {
        let lab = Lab::pair("panic");
        let child = lab.host_a().netns().spawn("sleep", &["1000"]);
        // A daemon the lab never heard of: only `ip netns pids` finds it at teardown.
        lab.host_b().netns().exec(&["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"]);
        let strays = lab.host_b().netns().pids();
        assert_eq!(strays.len(), 1, "expected one daemon in host b: {strays:?}");
        sender
            .send((lab.prefix().to_owned(), lab.ifname_tag().to_owned(), child.id(), strays[0]))
            .expect("the test thread waits for this");
        panic!("deliberate panic with a live lab (expected in this test)");
    });
    assert!(crashed.join().is_err(), "the lab thread was meant to panic");
    let (prefix, tag, child, stray) = receiver.recv().expect("the lab thread reported its lab");

    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert_eq!(root_ifnames_tagged(&tag), Vec::<String>::new());
    for pid in [child, stray] {
        // Teardown waited for both to exit: gone, or a zombie until init reaps the daemon.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|rest| rest.chars().next());
        assert!(stat.is_empty() || state == Some('Z'), "pid {pid} survived teardown: {stat}");
    }
}

#[test]
fn netns_root_parallel_labs() {
    if !lab::require_root() {
        return;
    }
    let (sender, receiver) = mpsc::channel();
    let builders: Vec<_> = (0..4)
        .map(|i| {
            let sender = sender.clone();
            thread::spawn(move || {
                let lab = if i % 2 == 0 { Lab::single(&format!("par{i}")) } else { Lab::pair(&format!("par{i}")) };
                sender.send(lab.prefix().to_owned()).expect("the test thread waits for this");
                // Same addresses in every lab, without interference: each is its own world.
                assert!(lab.client().wait_pingable(lab.host_a().lan_ip(), REACHABLE), "lab {i}: no LAN");
                if i % 2 == 1 {
                    let (a, b) = (lab.host_a(), lab.host_b());
                    assert!(a.netns().wait_pingable(b.link_ip(), REACHABLE), "lab {i}: no link");
                }
            })
        })
        .collect();
    drop(sender);
    for builder in builders {
        assert!(builder.join().is_ok(), "a parallel lab failed");
    }
    let mut prefixes: Vec<String> = receiver.iter().collect();
    assert_eq!(prefixes.len(), 4);
    for prefix in &prefixes {
        assert_eq!(leftovers(prefix), Vec::<String>::new());
    }
    prefixes.sort();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 4, "labs shared a prefix");
}

#[test]
fn netns_root_sweeper_removes_namespaces_of_dead_processes() {
    if !lab::require_root() {
        return;
    }
    // A pid that is certainly dead: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().expect("spawning true");
    let dead = child.id();
    child.wait().expect("waiting for true");
    assert!(!Path::new(&format!("/proc/{dead}")).exists());

    let stale = format!("{}{dead}-0-stale-x", lab::NETNS_PREFIX);
    // Created as a lab would, but never deleted by this process: as if it had crashed.
    std::mem::forget(Netns::create(stale.clone()));
    // Another test process sweeping at the same time may remove it first; either way it must go.
    lab::sweep_stale();
    let left = !leftovers(&stale).is_empty();
    if left {
        lab::run(std::process::Command::new("ip").args(["netns", "delete", &stale]));
    }
    assert!(!left, "sweep_stale left {stale} behind");

    // Namespaces of live processes, this one included, are not touched.
    let lab = Lab::single("sweep");
    lab::sweep_stale();
    // switch, client, host a
    assert_eq!(leftovers(lab.prefix()).len(), 3, "sweep_stale removed a live lab");
}
