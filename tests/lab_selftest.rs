//! Checks of the namespace lab itself (crate `ftvm-lab`, `tests/lab/`): the LAN reaches the hosts and their
//! TAPs, the dedicated link works and can be impaired (netem, or the lab's relay where the kernel
//! has no netem), labs run in parallel, and nothing is left behind, also when a test panics. All
//! need root: `netns_root_` in their names.

use ftvm_lab as lab;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use lab::{Impairment, Lab, Netns};

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

/// Threads of this process whose name starts with `prefix`, as /proc shows them (cut to 15
/// bytes). The link relay of a lab names its threads "TAG ab rx" and so on. A thread shows its
/// name only once it has started running, and still shows for a moment after it was joined.
fn threads_named(prefix: &str) -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("reading /proc/self/task");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_owned())
        .filter(|comm| comm.starts_with(prefix))
        .collect()
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
    let mut child = lab::spawn(&mut std::process::Command::new("true"));
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

/// 10 % loss and 5 ms ± 5 ms delay: the experiment "no failover under a lossy, jittery link".
const IMPAIRMENT: Impairment =
    Impairment { loss_percent: 10.0, delay: Duration::from_millis(5), jitter: Duration::from_millis(5) };

/// How late beyond delay + jitter a datagram may arrive before the relay counts as broken (a
/// frame forgotten in its queue). Not a latency target: the relay and this test's threads run at
/// normal priority, and on a busy two-core machine a stall of 100 ms lands here (measured while a
/// failover benchmark ran), unlike netem's kernel timers. This machine is shared: no timing
/// figure is asserted tightly.
const SCHEDULING_MARGIN: Duration = Duration::from_secs(1);

/// Sends `count` numbered, timestamped UDP datagrams from `a` to `b`'s link address, one per
/// millisecond, receives them on `b`, and returns for each arrival, in arrival order, its sequence
/// number and one-way delay in nanoseconds (both ends share one clock: this process's).
fn udp_one_way(a: &lab::LabHost, b: &lab::LabHost, count: u32) -> Vec<(u32, i64)> {
    let b_ip = b.link_ip();
    // Sockets belong to the namespace they were created in, whichever thread uses them later.
    let receiver = b.netns().run(move || UdpSocket::bind((b_ip, 0))).expect("binding on b's link address");
    let a_ip = a.link_ip();
    let sender = a.netns().run(move || UdpSocket::bind((a_ip, 0))).expect("binding on a's link address");
    let to = receiver.local_addr().expect("receiver address");
    receiver.set_read_timeout(Some(Duration::from_millis(50))).expect("read timeout");

    let epoch = Instant::now();
    let (done, finished) = mpsc::channel();
    thread::scope(|scope| {
        scope.spawn(move || {
            for seq in 0..count {
                // Pacing, not synchronisation: datagram `seq` leaves at epoch + seq ms.
                let slot = epoch + Duration::from_millis(u64::from(seq));
                thread::sleep(slot.saturating_duration_since(Instant::now()));
                let sent_ns = u64::try_from(epoch.elapsed().as_nanos()).expect("under 584 years");
                let mut payload = [0u8; 12];
                payload[..4].copy_from_slice(&seq.to_be_bytes());
                payload[4..].copy_from_slice(&sent_ns.to_be_bytes());
                sender.send_to(&payload, to).expect("sending a datagram over the link");
            }
            done.send(Instant::now()).expect("the receiver waits for this");
        });

        let mut arrivals = Vec::new();
        let mut stop_at = None;
        let mut buf = [0u8; 64];
        loop {
            match receiver.recv(&mut buf) {
                Ok(12) => {
                    let received_ns = i64::try_from(epoch.elapsed().as_nanos()).expect("under 292 years");
                    let seq = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                    let sent_ns = i64::from_be_bytes(buf[4..12].try_into().expect("8 bytes"));
                    arrivals.push((seq, received_ns - sent_ns));
                }
                Ok(len) => panic!("unexpected datagram of {len} bytes"),
                // A socket with a receive timeout fails with EINTR, rather than restarting, after
                // any signal or stop of the process (signal(7)).
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => panic!("receiving on b: {e}"),
            }
            // Anything later than the last send plus the longest allowed delay is not coming.
            match finished.try_recv() {
                Ok(last_sent) => stop_at = Some(last_sent + IMPAIRMENT.delay + IMPAIRMENT.jitter + SCHEDULING_MARGIN),
                // The sender panicked; the scope passes its panic on once this returns.
                Err(mpsc::TryRecvError::Disconnected) if stop_at.is_none() => return arrivals,
                Err(_) => {}
            }
            if stop_at.is_some_and(|at| Instant::now() >= at) {
                return arrivals;
            }
        }
    })
}

/// Echoes `len` bytes over TCP from `a` to `b`'s link address and back; panics on failure.
fn tcp_echo(a: &lab::LabHost, b: &lab::LabHost, len: usize) {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let b_ip = b.link_ip();
    let listener = b.netns().run(move || TcpListener::bind((b_ip, 0))).expect("listening on b's link address");
    let to: SocketAddr = listener.local_addr().expect("listener address");
    // Not scoped: if the client fails, this thread stays blocked in accept and the test fails
    // anyway, instead of hanging while the scope waits for it.
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accepting on b");
        stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
        let mut data = Vec::new();
        stream.read_to_end(&mut data).expect("reading the request on b");
        stream.write_all(&data).expect("echoing on b");
    });
    let mut stream = a.netns().run(move || TcpStream::connect_timeout(&to, TIMEOUT)).expect("connecting from a");
    stream.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let request: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    stream.write_all(&request).expect("sending from a");
    stream.shutdown(Shutdown::Write).expect("half-closing from a");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("reading the echo on a");
    assert!(reply == request, "TCP echo over the impaired link came back altered ({} bytes)", reply.len());
    server.join().expect("the echo server failed");
}

/// Percentile `p` (0 to 100) of sorted `values`, nearest rank.
fn percentile(sorted: &[i64], p: usize) -> i64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[test]
fn netns_root_impaired_link_loses_and_jitters() {
    if !lab::require_root() {
        return;
    }
    assert_eq!(IMPAIRMENT.to_string(), "loss 10% delay 5ms 5ms");
    let lab = Lab::pair_impaired("imp", IMPAIRMENT);
    let (a, b) = (lab.host_a(), lab.host_b());
    let tag = lab.ifname_tag().to_owned();
    // Same names and addresses as a plain pair lab.
    assert_eq!((a.link_ip(), b.link_ip()), (lab::LINK_IPS[0], lab::LINK_IPS[1]));
    assert_eq!((a.link_dev(), b.link_dev()), (format!("ln-{tag}").as_str(), format!("ln-{tag}").as_str()));
    assert_eq!(lab.impairment(), Some(IMPAIRMENT));
    let relayed = !lab::netem_available();
    assert_eq!(lab.link_stats().is_some(), relayed, "a relay exactly when the kernel has no netem");
    let relay_threads = format!("{tag} ");
    if relayed {
        let details = a.netns().ip(&["-d", "link", "show", a.link_dev()]);
        assert!(details.contains("tun type tap"), "the relayed link is not a TAP: {details}");
        // A thread names itself once it runs, which may be a moment after Lab::pair_impaired.
        assert!(
            lab::wait_for(Duration::from_secs(1), || threads_named(&relay_threads).len() == 4),
            "expected two relay threads per direction: {:?}",
            threads_named(&relay_threads)
        );
    } else {
        eprintln!("the kernel has netem: the link is a veth with netem, there is no relay to count");
    }

    // Resolves ARP both ways, so that the datagrams below are all the link carries.
    assert!(a.netns().wait_pingable(b.link_ip(), REACHABLE), "a cannot ping b over the impaired link");
    assert!(b.netns().wait_pingable(a.link_ip(), REACHABLE), "b cannot ping a over the impaired link");
    assert_eq!(root_ifnames_tagged(&tag), Vec::<String>::new());

    const SENT: u32 = 2000;
    let before = lab.link_stats();
    let started = Instant::now();
    let arrivals = udp_one_way(a, b, SENT);
    let took = started.elapsed();
    let after = lab.link_stats();

    let received = arrivals.len();
    let fraction = received as f64 / f64::from(SENT);
    let mut seqs: Vec<u32> = arrivals.iter().map(|&(seq, _)| seq).collect();
    // Arrivals behind one with a higher number: overtaken in the link.
    let mut highest = 0;
    let reordered = seqs
        .iter()
        .filter(|&&seq| {
            let overtaken = seq < highest;
            highest = highest.max(seq);
            overtaken
        })
        .count();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), received, "datagrams were duplicated");
    let mut delays: Vec<i64> = arrivals.iter().map(|&(_, delay)| delay).collect();
    delays.sort_unstable();
    let ms = |ns: i64| ns as f64 / 1e6;
    let (min, p10, p50, p90, max) = (
        delays[0],
        percentile(&delays, 10),
        percentile(&delays, 50),
        percentile(&delays, 90),
        delays[delays.len() - 1],
    );
    eprintln!(
        "impaired link ({IMPAIRMENT}): {received}/{SENT} received ({:.1} %) in {took:.2?}; one-way delay ms: \
         min {:.2} p10 {:.2} p50 {:.2} p90 {:.2} max {:.2}; {reordered} reordered; relay {before:?} -> {after:?}",
        fraction * 100.0,
        ms(min),
        ms(p10),
        ms(p50),
        ms(p90),
        ms(max),
    );

    assert!((0.85..=0.95).contains(&fraction), "received {received} of {SENT} with 10 % loss");
    let bound = IMPAIRMENT.delay + IMPAIRMENT.jitter + SCHEDULING_MARGIN;
    assert!(min >= 0, "a datagram arrived before it was sent: {min} ns");
    assert!(
        max <= bound.as_nanos() as i64,
        "a datagram took {:.2} ms, more than {bound:?} (p90 {:.2} ms): the relay lost track of it",
        ms(max),
        ms(p90)
    );
    assert!(
        p90 - p10 >= Duration::from_millis(4).as_nanos() as i64,
        "delays do not spread: p10 {:.2} ms, p90 {:.2} ms",
        ms(p10),
        ms(p90)
    );
    // Load only adds delay: the median cannot fall below the impairment's unless frames skip it.
    assert!(p50 >= Duration::from_millis(3).as_nanos() as i64, "median delay {:.2} ms, not about 5 ms", ms(p50));
    assert!(reordered >= received / 20, "only {reordered} of {received} datagrams were reordered");

    if let (Some(before), Some(after)) = (before, after) {
        // ARP (a re-validation of an entry) may add a few frames to what the test sent.
        const NOISE: u64 = 5;
        let sent = u64::from(SENT);
        let lost = sent - received as u64;
        let a_to_b = |f: fn(&lab::DirectionStats) -> u64| f(&after.a_to_b) - f(&before.a_to_b);
        let (read, dropped, forwarded) = (a_to_b(|d| d.read), a_to_b(|d| d.dropped), a_to_b(|d| d.forwarded));
        assert!((sent..=sent + NOISE).contains(&read), "relay read {read} frames from a, the test sent {sent}");
        assert!(dropped.abs_diff(lost) <= NOISE, "relay dropped {dropped} frames a to b, {lost} datagrams were lost");
        assert!(forwarded.abs_diff(received as u64) <= NOISE, "relay forwarded {forwarded}, b received {received}");
        assert_eq!(read, dropped + forwarded, "frames still in flight or refused: {before:?} -> {after:?}");
        assert_eq!(after.a_to_b.undeliverable, 0);
        assert!(after.b_to_a.read - before.b_to_a.read <= NOISE, "b sent on the link while only receiving UDP");
    }

    // Lossy and jittery, but TCP gets through.
    tcp_echo(a, b, 4096);

    // Failover tests cut the link by setting one end down; with TAPs as with the veth, nothing
    // crosses it then, either way.
    a.netns().set_link_up(a.link_dev(), false);
    let cut = lab.link_stats();
    assert!(b.netns().ping(a.link_ip(), Duration::from_millis(200)).is_none(), "a's end is down yet a answers");
    if let (Some(cut), Some(now)) = (cut, lab.link_stats()) {
        assert!(now.b_to_a.read > cut.b_to_a.read, "b's ping did not reach the relay");
        assert_eq!(now.b_to_a.forwarded, cut.b_to_a.forwarded, "the relay delivered to a TAP that is down");
    }
    a.netns().set_link_up(a.link_dev(), true);
    assert!(a.netns().wait_pingable(b.link_ip(), REACHABLE), "the link did not come back");

    let prefix = lab.prefix().to_owned();
    drop(lab);
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert_eq!(root_ifnames_tagged(&tag), Vec::<String>::new());
    // Joined threads leave /proc/self/task a moment after pthread_join returns.
    assert!(
        lab::wait_for(Duration::from_secs(1), || threads_named(&relay_threads).is_empty()),
        "relay threads outlived the lab: {:?}",
        threads_named(&relay_threads)
    );
}

#[test]
fn netns_root_impaired_lab_dropped_by_panic_leaves_nothing() {
    if !lab::require_root() {
        return;
    }
    let (sender, receiver) = mpsc::channel();
    let crashed = thread::spawn(move || {
        let lab = Lab::pair_impaired("imppanic", IMPAIRMENT);
        // The relay has carried frames and its threads are running when the panic comes.
        assert!(lab.host_a().netns().wait_pingable(lab.host_b().link_ip(), REACHABLE), "no link");
        sender.send((lab.prefix().to_owned(), lab.ifname_tag().to_owned())).expect("the test thread waits for this");
        panic!("deliberate panic with a live impaired lab (expected in this test)");
    });
    assert!(crashed.join().is_err(), "the lab thread was meant to panic");
    let (prefix, tag) = receiver.recv().expect("the lab thread reported its lab");
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
    assert_eq!(root_ifnames_tagged(&tag), Vec::<String>::new());
    let relay_threads = format!("{tag} ");
    assert!(
        lab::wait_for(Duration::from_secs(1), || threads_named(&relay_threads).is_empty()),
        "relay threads outlived the lab: {:?}",
        threads_named(&relay_threads)
    );
}

/// An Ethernet frame from the guest's side of a TAP: broadcast, from a locally administered MAC,
/// EtherType 0x88b5 (IEEE's local experimental type, which no stack answers) and `payload`.
fn experimental_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend_from_slice(payload);
    frame.resize(frame.len().max(60), 0);
    frame
}

#[test]
fn netns_root_capture_sees_every_frame_a_tap_user_sends_both_ways() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::single("capture");
    let host = lab.host_a();
    // Host a's TAP held as a VMM holds it; the lab is quiet (no IPv6 chatter), so the frames the
    // capture records are exactly those this test causes.
    let mut tap = lab::open_tap(host.netns(), host.tap());

    // A frame written to the TAP, and the capture stopped at once, without waiting for anything:
    // the frame must be there. This is what the failover test relies on to prove that an old
    // primary emitted nothing.
    for round in 0..20u8 {
        let capture = host.netns().capture(host.tap());
        let frame = experimental_frame(&[round; 46]);
        tap.write_all(&frame).expect("writing a frame to the TAP");
        let frames: Vec<_> = capture.stop().into_iter().filter(|f| f.ethertype() == 0x88b5).collect();
        assert_eq!(
            frames,
            vec![lab::Frame { direction: lab::Direction::Received, len: frame.len(), bytes: frame.clone() }],
            "round {round}"
        );
    }

    // A capture that saw nothing returns nothing: an empty result means no frame crossed.
    assert_eq!(host.netns().capture(host.tap()).stop(), Vec::<lab::Frame>::new());

    // A burst, back to back: none lost, in order.
    let capture = host.netns().capture(host.tap());
    for i in 0..2000u16 {
        tap.write_all(&experimental_frame(&i.to_be_bytes())).expect("writing a frame to the TAP");
    }
    let frames = capture.stop();
    // Only this test's frames: the kernel's own (an IGMP report, IPv6 router solicitations) may
    // cross the interface meanwhile.
    let sequence: Vec<u16> = frames
        .iter()
        .filter(|f| f.ethertype() == 0x88b5)
        .map(|f| u16::from_be_bytes([f.bytes[14], f.bytes[15]]))
        .collect();
    assert_eq!(sequence, (0..2000).collect::<Vec<u16>>(), "frames lost or reordered");

    // The other way: what the bridge sends towards the VM (the client's ARP request for the
    // guest's address) is recorded as sent. Once the TAP's reader has it, the capture has it.
    let capture = host.netns().capture(host.tap());
    assert!(lab.client().ping(lab.guest_ip(), Duration::from_millis(100)).is_none(), "nothing answers for the guest");
    assert!(await_arp_request(&mut tap, lab.guest_ip(), REACHABLE), "no ARP request on {}", host.tap());
    let frames = capture.stop();
    let arp_for_guest =
        |f: &lab::Frame| f.ethertype() == 0x0806 && f.bytes.get(38..42) == Some(&lab.guest_ip().octets()[..]);
    assert!(
        frames.iter().any(|f| f.direction == lab::Direction::Sent && arp_for_guest(f)),
        "the ARP request towards the TAP was not captured as sent: {frames:?}"
    );
    assert!(frames.iter().all(|f| f.direction == lab::Direction::Sent), "nothing was written to the TAP: {frames:?}");

    // A capture is bound to its interface: frames of the host's LAN veth alone are not on the TAP.
    let capture = host.netns().capture(host.tap());
    let lan = host.netns().capture(host.lan_dev());
    assert!(lab.client().wait_pingable(host.lan_ip(), REACHABLE), "client cannot ping host a");
    let lan_frames = lan.stop();
    assert!(lan_frames.iter().any(|f| f.ethertype() == 0x0800), "no IPv4 frame on {}: {lan_frames:?}", host.lan_dev());
    let tap_frames = capture.stop();
    // (A bridge floods multicast, e.g. the kernel's IGMP reports, to every port: only unicast
    // counts here.)
    let unicast = |f: &lab::Frame| f.bytes.first().is_some_and(|b| b & 1 == 0);
    assert!(
        !tap_frames.iter().any(|f| f.ethertype() == 0x0800 && unicast(f)),
        "unicast IPv4 for the host reached the TAP: {tap_frames:?}"
    );
    drop(tap);
}

#[test]
fn netns_root_capture_of_a_missing_interface_says_so() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::single("capmissing");
    let netns = lab.host_a().netns();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| netns.capture("nosuchif0"))).err();
    let message = panic.and_then(|p| p.downcast_ref::<String>().cloned()).unwrap_or_default();
    assert!(message.contains("no interface nosuchif0"), "{message:?}");
}

#[test]
fn netns_root_a_missing_program_is_one_line_naming_its_package() {
    if !lab::require_root() {
        return;
    }
    let lab = Lab::single("missing");
    let netns = lab.client();
    // Installed: an `ip netns exec` command line.
    let cmd = netns.try_command("ip").expect("ip is installed");
    assert_eq!(cmd.get_program(), "ip");
    // Not installed: the one line, as an Err, or as the panic of Netns::command. Without the
    // check, `ip netns exec` would start and fail later with status 255.
    let absent = "ftvm-no-such-program";
    assert_eq!(netns.try_command(absent).err(), Some(format!("{absent} not found on PATH")));
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| netns.command(absent))).err();
    let message = panic.and_then(|p| p.downcast_ref::<String>().cloned()).unwrap_or_default();
    assert_eq!(message, format!("{absent} not found on PATH"));
    // A known tool names its Debian package.
    assert_eq!(
        lab::tool_missing("redis-benchmark"),
        "redis-benchmark not found: install Debian's redis-tools (scripts/test does)"
    );
}
