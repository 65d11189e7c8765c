//! `kvstore`: a Redis-protocol key-value server on TCP port 6379, for
//! unmodified `redis-cli` and `redis-benchmark` (`-t ping,set,get,incr,mset`).
//!
//! The protocol and the keyspace are the `kvstore-resp` crate; this guest
//! wires it to smoltcp (`rt::net`): a pool of TCP sockets all kept in LISTEN
//! on port 6379 (smoltcp has no listen backlog: a SYN that finds no socket
//! in LISTEN is answered with a reset); a socket that closes goes back to
//! LISTEN.
//!
//! Parameters (`--param KEY=VALUE`):
//!
//! - `clients=N` (default 64, 1..=1024): concurrent connections served. A
//!   connection beyond N is answered `-ERR max number of clients reached`
//!   and closed, as Redis does at `maxclients`. The pool holds 4N + 8
//!   sockets, so that a SYN always finds one in LISTEN: a client that
//!   closes its N connections and opens N new ones at once (redis-benchmark
//!   between two tests) has its SYNs arrive in the same turn as its FINs,
//!   while the old sockets still wait for the client's last ACK (2N);
//!   `redis-benchmark -k 0` (a connection per request) opens each new
//!   connection before it closes the old one, so N old, N new and N closing
//!   can coexist, and some of those past N are refused (3N and more); the 8
//!   spares cover sockets in TIME-WAIT (10 s after the server closed: QUIT,
//!   a protocol error, a refused connection). A client that holds more
//!   than N connections at once, as `-k 0` briefly does, gets the error on
//!   the extra ones: give it `clients=` 2 × its `-c`.
//! - `maxmemory=BYTES` (optional; suffix k, m or g for KiB, MiB, GiB): the
//!   keyspace limit; writes past it get `-OOM`. Default: half of the memory
//!   left once the sockets and a fixed reserve are taken.
//!
//! Memory: every socket has a 24 KiB receive buffer (the window a client
//! fills before kvstore reads: bulk loads and pipelines need it) and an
//! 8 KiB transmit buffer (replies beyond it wait in the connection's own
//! buffer), 8.25 MiB for the default pool. A request or reply may be larger
//! than a socket buffer. The guest needs the
//! sockets + 4 MiB (image, NIC buffers, stack) + 8 MiB (keyspace and
//! connection buffers) at least: 21 MiB with the default pool (refused
//! below, with a message). At the VMM's default 64 MiB the keyspace limit is
//! about 25 MiB.
//!
//! Sizes: a bulk string (a key or a value) may have up to 66 560 bytes
//! (`kvstore_resp::limits::MAX_BULK_LEN`, 65 KiB); a longer one is answered
//! `-ERR Protocol error: invalid bulk length` and the connection is closed,
//! as Redis does past its `proto-max-bulk-len` (512 MB there).
//!
//! Back-pressure: a connection's replies wait in its output buffer while the
//! socket's transmit buffer is full; while 64 KiB or more wait, or the engine
//! holds requests back (its own high-water mark), nothing more is read from
//! that socket, so TCP flow control makes the client wait.
//!
//! SHUTDOWN (with or without NOSAVE: nothing is ever saved) closes every
//! connection first, as Redis does: each client gets a FIN after what was
//! already queued for it, the listening sockets stop, and the guest powers
//! off with status 0 once every FIN was acknowledged, or after
//! [`SHUTDOWN_GRACE_NS`] of guest time.
//!
//! Serial output: `kvstore: network up: MAC ..., IP ..., gateway ...`,
//! `kvstore: N clients, S sockets, keyspace limit M MiB`, then
//! `kvstore: listening on IP:6379`.
//!
//! Health: after each turn of the main loop in which the server's
//! invariants hold (the keyspace within its limit), the health port gets a
//! beat counter; an idle server turns at
//! least every 10 ms (`rt::net::MAX_SLEEP_NS`), so it reports at least that
//! often. Fault injection: `--param fault=...` with `fault_mtbf_ms=N` or
//! `fault_after_ms=N` (`rt::fault`), ticked once per turn, after the turn's
//! outputs and before its health report.
//!
//! Exits per turn: clock 2, health 1, one notify when anything is sent 1,
//! HLT 1, timer 2 when the deadline moves (every idle turn); an injected
//! transient fault adds an entropy read (1). An isolated request costs one
//! turn (5 exits); under load one turn serves every request that arrived
//! since the previous one.
//!
//! Power-off status (it serves forever otherwise): 1 when the network cannot
//! be brought up or memory is too small, 2 for bad parameters (the fault
//! injector's included).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;

use kvstore_resp::limits::OUTPUT_HIGH_WATER;
use kvstore_resp::{Conn, ConnStatus, Store};
use rt::fault::Injector;
use rt::net::smoltcp::iface::SocketHandle;
use rt::net::smoltcp::socket::tcp;
use rt::net::smoltcp::time::Duration;
use rt::net::Net;

rt::entry!(main);

/// The Redis port.
const PORT: u16 = 6379;
/// Bytes of each socket's receive buffer: the TCP window a client can fill
/// before kvstore reads (bulk loads, pipelines).
const RX_BUF: usize = 24 * 1024;
/// Bytes of each socket's transmit buffer (replies beyond it wait in the
/// connection's own buffer).
const TX_BUF: usize = 8 * 1024;
/// Concurrent connections without `--param clients`.
const DEFAULT_CLIENTS: usize = 64;
/// Most concurrent connections accepted as a parameter.
const MAX_CLIENTS: usize = 1024;
/// Sockets beyond twice `clients`, for the ones waiting out TIME-WAIT.
const SPARE_SOCKETS: usize = 8;
/// Most time SHUTDOWN waits for the clients to acknowledge their FIN.
const SHUTDOWN_GRACE_NS: u64 = 2_000_000_000;
/// The reply to a connection beyond `clients` (Redis's words).
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";
/// Memory reserved besides the sockets: image, NIC buffers and rings,
/// stack, allocator slack.
const FIXED_RESERVE: u64 = 4 << 20;
/// Least memory left for the keyspace and the connections' buffers.
const MIN_FREE: u64 = 8 << 20;
/// Stop reading from a socket while this much output waits to be sent.
const READ_HIGH_WATER: usize = 64 * 1024;
/// Expired keys removed per turn, at most (the rest go lazily or next turn).
const SWEEP_BUDGET: usize = 32;
/// Keep-alive probes on idle connections, and the silence after which a
/// peer is taken for dead (its socket aborted and listening again). Without
/// them a client that vanished would hold its socket forever.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
const TIMEOUT: Duration = Duration::from_secs(180);

/// Power-off status when the network cannot be brought up or memory is short.
const EXIT_NO_NETWORK: u32 = 1;
/// Power-off status for bad parameters.
const EXIT_BAD_PARAM: u32 = 2;

fn main(boot: &'static rt::BootParams) -> u32 {
    let settings = match Settings::from_boot(boot) {
        Ok(settings) => settings,
        Err(e) => {
            rt::println!("kvstore: {e}");
            return EXIT_BAD_PARAM;
        }
    };
    let faults = match rt::fault::Injector::from_boot(boot) {
        Ok(faults) => faults,
        Err(e) => {
            rt::println!("kvstore: {e}");
            return EXIT_BAD_PARAM;
        }
    };
    let Some(mut net) = Net::start(boot, "kvstore") else {
        return EXIT_NO_NETWORK;
    };

    let sockets = pool_size(settings.clients);
    let mut pool: Vec<Client> = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        // Zeroed 8 bytes at a time: `vec![0; n]` would take seconds here.
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(rt::net::zeroed_vec(RX_BUF)),
            tcp::SocketBuffer::new(rt::net::zeroed_vec(TX_BUF)),
        );
        configure(&mut socket);
        if let Err(e) = socket.listen(PORT) {
            rt::println!("kvstore: cannot listen on port {PORT}: {e}");
            return EXIT_NO_NETWORK;
        }
        pool.push(Client { handle: net.sockets.add(socket), session: None });
    }
    rt::println!(
        "kvstore: {} clients, {sockets} sockets, keyspace limit {} MiB",
        settings.clients,
        settings.store_limit >> 20
    );
    rt::println!("kvstore: listening on {}:{PORT}", net.ip());
    serve(&mut net, &mut pool, Store::with_limit(settings.store_limit), settings.clients, faults)
}

/// Sockets for `clients` connections (see the module documentation).
const fn pool_size(clients: usize) -> usize {
    4 * clients + SPARE_SOCKETS
}

/// What the parameters and the guest's memory allow.
struct Settings {
    clients: usize,
    store_limit: usize,
}

impl Settings {
    fn from_boot(boot: &'static rt::BootParams) -> Result<Settings, ParamError> {
        let clients = match boot.param("clients") {
            None => DEFAULT_CLIENTS,
            Some(text) => {
                text.parse().ok().filter(|n| (1..=MAX_CLIENTS).contains(n)).ok_or(ParamError::BadClients(text))?
            }
        };
        // Bounded by MAX_CLIENTS: no overflow.
        let socket_bytes = (pool_size(clients) * (RX_BUF + TX_BUF)) as u64;
        let reserved = socket_bytes + FIXED_RESERVE;
        let needed = reserved + MIN_FREE;
        if boot.mem_size < needed {
            return Err(ParamError::MemoryTooSmall { clients, needed, has: boot.mem_size });
        }
        let free = boot.mem_size - reserved;
        let limit = match boot.param("maxmemory") {
            None => free / 2,
            Some(text) => {
                let limit = parse_bytes(text).ok_or(ParamError::BadMaxMemory(text))?;
                if limit > free {
                    return Err(ParamError::MaxMemoryTooLarge { limit, free });
                }
                limit
            }
        };
        // Guest memory is below 3 GiB: fits in usize.
        let store_limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(Settings { clients, store_limit })
    }
}

/// `123`, `64k`, `16mb`, `1G`: bytes, or KiB, MiB, GiB (case-insensitive).
fn parse_bytes(text: &str) -> Option<u64> {
    const UNITS: [(&str, u32); 8] =
        [("", 0), ("b", 0), ("k", 10), ("kb", 10), ("m", 20), ("mb", 20), ("g", 30), ("gb", 30)];
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let (_, shift) = UNITS.iter().find(|(name, _)| name.eq_ignore_ascii_case(unit))?;
    number.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A `--param` the server cannot use, or too little memory.
enum ParamError {
    BadClients(&'static str),
    BadMaxMemory(&'static str),
    MemoryTooSmall { clients: usize, needed: u64, has: u64 },
    MaxMemoryTooLarge { limit: u64, free: u64 },
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::BadClients(text) => {
                write!(f, "--param clients={text:?} is not a number of connections in 1..={MAX_CLIENTS}")
            }
            ParamError::BadMaxMemory(text) => {
                write!(f, "--param maxmemory={text:?} is not a size (bytes, or with k, m or g)")
            }
            ParamError::MemoryTooSmall { clients, needed, has } => write!(
                f,
                "needs at least {} MiB of memory for {clients} clients, has {} MiB (--memory-mib)",
                needed.div_ceil(1 << 20),
                has >> 20
            ),
            ParamError::MaxMemoryTooLarge { limit, free } => {
                write!(f, "--param maxmemory={limit} is more than the {free} bytes left once the sockets are allocated")
            }
        }
    }
}

/// Socket options: no Nagle (replies go out at once, as Redis sets
/// TCP_NODELAY), keep-alive and timeout.
fn configure(socket: &mut tcp::Socket<'_>) {
    socket.set_nagle_enabled(false);
    socket.set_keep_alive(Some(KEEP_ALIVE));
    socket.set_timeout(Some(TIMEOUT));
}

/// One socket of the pool, and its client connection while it has one.
struct Client {
    handle: SocketHandle,
    session: Option<Session>,
}

/// A client connection: protocol state and replies not yet in the socket.
struct Session {
    conn: Conn,
    out: Vec<u8>,
    /// The engine asked to close (QUIT, protocol error): send `out`, then
    /// close; read nothing more.
    closing: bool,
}

/// Serves until SHUTDOWN.
fn serve(net: &mut Net, pool: &mut [Client], mut store: Store, clients: usize, mut faults: Injector) -> u32 {
    let mut beat: u32 = 0;
    loop {
        let now = net.poll();
        // Connections admitted before this turn and still open both ways;
        // new ones are admitted in pool order while fewer than `clients`.
        let mut admitted = pool
            .iter()
            .filter(|client| {
                client.session.as_ref().is_some_and(|s| !s.closing)
                    && net.sockets.get::<tcp::Socket>(client.handle).state() == tcp::State::Established
            })
            .count();
        let mut open = 0;
        let mut shutdown = false;
        for client in pool.iter_mut() {
            let socket = net.sockets.get_mut::<tcp::Socket>(client.handle);
            shutdown |= client.serve(socket, &mut store, now, clients, &mut admitted);
            if client.session.is_some() {
                open += 1;
            }
        }
        if shutdown {
            shut_down(net, pool, &faults);
        }
        store.set_connected_clients(open);
        store.sweep(now, SWEEP_BUDGET);
        // The turn's replies go out, then an injected fault may strike
        // (after outputs the last healthy point does not cover: what
        // `--output-mode fast` may have to roll back), then the turn is
        // done: healthy when the server's own invariants hold (the keyspace
        // within its limit), a point that covers every reply sent so far.
        net.send();
        faults.tick(now);
        if store.used_bytes() <= store.limit_bytes() {
            beat = beat.wrapping_add(1);
            faults.report_health(beat);
        }
        // Nothing here needs a turn before new input or smoltcp's timers
        // (which sleep() takes into account; it sleeps at most
        // rt::net::MAX_SLEEP_NS, so an idle server still turns and reports
        // every 10 ms), except a persistent injected fault's moment.
        net.sleep(faults.wake_at());
    }
}

impl Client {
    /// One turn of this socket: take a new connection (or refuse it with an
    /// error when `admitted` reached `clients`), send waiting replies,
    /// execute requests, close, or listen again. True when a request was
    /// SHUTDOWN.
    fn serve(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        store: &mut Store,
        now: u64,
        clients: usize,
        admitted: &mut usize,
    ) -> bool {
        match socket.state() {
            tcp::State::Closed => {
                // Closed by reset, timeout or after our close: listen again.
                self.session = None;
                configure(socket);
                // Only fails on a socket that is open, or on port 0.
                let _ = socket.listen(PORT);
                return false;
            }
            tcp::State::Listen | tcp::State::SynReceived | tcp::State::SynSent => return false,
            tcp::State::TimeWait => {
                // Our close completed; the socket lingers, then is Closed.
                self.session = None;
                return false;
            }
            _ => {}
        }
        let session = self.session.get_or_insert_with(|| {
            let mut session = Session { conn: Conn::new(), out: Vec::new(), closing: false };
            if *admitted < clients {
                *admitted += 1;
            } else {
                // Over the limit: say so, then close without reading.
                session.out.extend_from_slice(MAX_CLIENTS_REPLY);
                session.closing = true;
            }
            session
        });
        let mut shutdown = false;
        session.send(socket);
        if session.conn.has_pending_input() && session.out.len() < OUTPUT_HIGH_WATER {
            // Requests held back while the output was full.
            let status = session.conn.feed(&[], store, now, &mut session.out);
            shutdown |= status == ConnStatus::Shutdown;
            session.closing |= status != ConnStatus::Open;
            session.send(socket);
        }
        while !session.closing
            && !shutdown
            && !session.conn.has_pending_input()
            && session.out.len() < READ_HIGH_WATER
            && socket.can_recv()
        {
            let fed = socket.recv(|input| {
                let status = session.conn.feed(input, store, now, &mut session.out);
                (input.len(), status)
            });
            match fed {
                Ok(status) => {
                    shutdown |= status == ConnStatus::Shutdown;
                    session.closing |= status != ConnStatus::Open;
                }
                Err(_) => break,
            }
            session.send(socket);
        }
        let drained = session.out.is_empty() && !session.conn.has_pending_input();
        let peer_done = socket.state() == tcp::State::CloseWait && !socket.can_recv();
        if drained && (session.closing || peer_done) && socket.may_send() {
            // FIN after what the socket still holds.
            socket.close();
        }
        shutdown
    }
}

impl Session {
    /// Moves as much output as the socket takes into it.
    fn send(&mut self, socket: &mut tcp::Socket<'_>) {
        if self.out.is_empty() {
            return;
        }
        match socket.send_slice(&self.out) {
            Ok(n) if n == self.out.len() => self.out.clear(),
            Ok(n) => {
                self.out.drain(..n);
            }
            // The connection cannot send any more (reset, closed): the
            // socket's state says so next turn.
            Err(_) => {}
        }
    }
}

/// SHUTDOWN (as Redis: no reply to it): every connection gets what was
/// queued for it and a FIN, nothing new is accepted, and the guest powers
/// off with status 0 once every FIN was acknowledged (or after
/// [`SHUTDOWN_GRACE_NS`]), so that no client is left waiting on a
/// connection that silently went away.
fn shut_down(net: &mut Net, pool: &mut [Client], faults: &Injector) -> ! {
    rt::println!("kvstore: SHUTDOWN, closing connections");
    for client in pool.iter_mut() {
        let socket = net.sockets.get_mut::<tcp::Socket>(client.handle);
        if let Some(session) = client.session.as_mut() {
            session.send(socket);
        }
        // LISTEN and SYN-RECEIVED end at once (a late SYN gets a reset); an
        // open connection sends its FIN after what the socket holds.
        socket.close();
    }
    let deadline = net.now_ns().saturating_add(SHUTDOWN_GRACE_NS);
    let mut beat: u32 = 0;
    loop {
        net.send();
        // Closing down is doing what was asked: still healthy.
        beat = beat.wrapping_add(1);
        faults.report_health(beat);
        net.sleep(Some(deadline));
        let now = net.poll();
        let waiting = pool
            .iter()
            .filter(|client| {
                !matches!(
                    net.sockets.get::<tcp::Socket>(client.handle).state(),
                    tcp::State::Closed | tcp::State::TimeWait | tcp::State::FinWait2
                )
            })
            .count();
        if waiting == 0 || now >= deadline {
            rt::println!("kvstore: SHUTDOWN, powering off ({waiting} connections not closed)");
            rt::power_off(0);
        }
    }
}
