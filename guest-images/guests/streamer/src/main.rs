//! `streamer`: sends a paced stream of UDP datagrams, the traffic a live
//! video feed makes, so that a receiver can see every loss, duplicate and
//! pause across a failover.
//!
//! Parameters (`--param KEY=VALUE`):
//!
//! - `dest=IP:PORT` (required): where the datagrams go.
//! - `rate=PPS` (default 1000, 1..=1000000): datagrams per second.
//! - `count=N` (optional): stop after N datagrams and power off with 0;
//!   without it the stream never ends.
//!
//! Each datagram is [`PAYLOAD_LEN`] (1316) bytes from source port
//! [`SOURCE_PORT`] (5000): the sequence number (u64, little-endian, from 0),
//! the guest clock in nanoseconds when the datagram was queued (u64,
//! little-endian; datagrams of one burst share the reading of their turn),
//! then filler (byte `i` of the payload is `i as u8`). IPv4 id 0 with Don't
//! Fragment, UDP checksum 0 (none): see `rt::net::UdpStream`.
//!
//! Datagram `seq` is due at `start + seq * 1e9 / rate` ns, `start` being the
//! moment the next hop answered ARP. A turn sends everything due, at most
//! [`MAX_BURST`] (128); a late guest catches up in bursts and never skips a
//! sequence number. Between datagrams it sleeps (timer + HLT).
//!
//! The datagrams do not go through smoltcp (which still answers ARP and
//! ping): they are prebuilt frames in their own transmit buffers, of which a
//! datagram writes 16 bytes. Where the guest's instructions are emulated
//! (this project's development machines run about 1.4 million guest
//! instructions a second), smoltcp's copies and checksum would cost several
//! milliseconds per datagram.
//!
//! Serial output: `streamer: network up: MAC ..., IP ..., gateway ...`,
//! `streamer: resolving NEXT-HOP (ARP) before sending to IP:PORT`, then
//! `streamer: sending to IP:PORT at N/s` when the stream starts, and with
//! `count`, `streamer: sent N datagrams` before powering off.
//!
//! Health: after each turn of the main loop the health port gets the next
//! sequence number (low 32 bits), unless datagrams have been due for a
//! second with none taken by the NIC (a wedged stream). Turns come at least
//! every 10 ms (`rt::net::MAX_SLEEP_NS`) whatever the rate. Fault injection:
//! `--param fault=...` with `fault_mtbf_ms=N` or `fault_after_ms=N`
//! (`rt::fault`), ticked once per turn, after the turn's outputs and before
//! its health report.
//!
//! Exits: 7 per datagram at rates the guest keeps up with (clock 2, health
//! 1, notify 1, timer 2, HLT 1); a burst of k datagrams costs the same 7; an
//! injected transient fault adds an entropy read (1). The next hop's MAC is
//! learnt once, before the stream starts.
//!
//! Power-off status: 0 after `count` datagrams, 1 when the network cannot be
//! brought up (no NIC, no IP, no route to `dest`), 2 for bad parameters (the
//! fault injector's included).
#![no_std]
#![no_main]

use core::fmt;

use rt::fault::Injector;
use rt::net::smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};
use rt::net::{Net, UdpStream, QUEUE_SIZE};

rt::entry!(main);

/// Bytes of each datagram's UDP payload (seven 188-byte MPEG-TS packets).
const PAYLOAD_LEN: usize = 1316;
/// The UDP source port of the stream.
const SOURCE_PORT: u16 = 5000;
/// Datagrams per second without `--param rate`.
const DEFAULT_RATE: u64 = 1000;
/// Highest rate accepted.
const MAX_RATE: u64 = 1_000_000;
/// Most datagrams sent in one turn, and the stream's transmit buffers: half
/// the transmit queue, the other half staying free for smoltcp's frames.
const MAX_BURST: usize = QUEUE_SIZE / 2;
/// Datagrams due this long with none sent: the stream is wedged, and the
/// guest stops reporting health.
const STALL_NS: u64 = 1_000_000_000;
/// How often an unanswered ARP request is repeated.
const ARP_RETRY_NS: u64 = 1_000_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Power-off status when the network cannot be brought up.
const EXIT_NO_NETWORK: u32 = 1;
/// Power-off status for bad parameters.
const EXIT_BAD_PARAM: u32 = 2;

fn main(boot: &'static rt::BootParams) -> u32 {
    let settings = match Settings::from_boot(boot) {
        Ok(settings) => settings,
        Err(e) => {
            rt::println!("streamer: {e}");
            return EXIT_BAD_PARAM;
        }
    };
    let faults = match rt::fault::Injector::from_boot(boot) {
        Ok(faults) => faults,
        Err(e) => {
            rt::println!("streamer: {e}");
            return EXIT_BAD_PARAM;
        }
    };
    let Some(mut net) = Net::start(boot, "streamer") else {
        return EXIT_NO_NETWORK;
    };
    let Some(hop) = net.next_hop(settings.dest_ip) else {
        rt::println!(
            "streamer: cannot start: {} is not on {}'s subnet and there is no gateway (--gateway)",
            settings.dest_ip,
            net.ip()
        );
        return EXIT_NO_NETWORK;
    };
    rt::println!("streamer: resolving {hop} (ARP) before sending to {}", settings.dest());
    stream(&mut net, &settings, hop, faults)
}

/// What the parameters ask for.
struct Settings {
    dest_ip: Ipv4Address,
    dest_port: u16,
    rate: u64,
    count: Option<u64>,
}

impl Settings {
    fn from_boot(boot: &'static rt::BootParams) -> Result<Settings, ParamError> {
        let dest = boot.param("dest").ok_or(ParamError::NoDest)?;
        let (dest_ip, dest_port) = rt::net::parse_endpoint(dest).ok_or(ParamError::BadDest(dest))?;
        let rate = match boot.param("rate") {
            None => DEFAULT_RATE,
            Some(text) => {
                text.parse().ok().filter(|rate| (1..=MAX_RATE).contains(rate)).ok_or(ParamError::BadRate(text))?
            }
        };
        let count = match boot.param("count") {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| ParamError::BadCount(text))?),
        };
        Ok(Settings { dest_ip, dest_port, rate, count })
    }

    fn dest(&self) -> IpEndpoint {
        IpEndpoint::new(IpAddress::Ipv4(self.dest_ip), self.dest_port)
    }

    /// When datagram `seq` is due, for a stream that started at `start`.
    fn due(&self, start: u64, seq: u64) -> u64 {
        let offset = u128::from(seq) * NS_PER_S / u128::from(self.rate);
        start.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
    }
}

/// A `--param` the streamer cannot use.
enum ParamError {
    NoDest,
    BadDest(&'static str),
    BadRate(&'static str),
    BadCount(&'static str),
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::NoDest => f.write_str("--param dest=IP:PORT is required"),
            ParamError::BadDest(text) => {
                write!(f, "--param dest={text:?} is not IPv4-ADDRESS:PORT")
            }
            ParamError::BadRate(text) => {
                write!(f, "--param rate={text:?} is not a number of datagrams per second in 1..={MAX_RATE}")
            }
            ParamError::BadCount(text) => {
                write!(f, "--param count={text:?} is not a number of datagrams")
            }
        }
    }
}

/// Where the stream is.
enum Phase {
    /// Waiting for the next hop to answer ARP; the request is repeated at
    /// `retry`.
    Resolving { retry: u64 },
    /// Sending; datagram `seq` is due at `settings.due(start, seq)`.
    Streaming { start: u64 },
}

/// Resolves the next hop, then streams; returns the power-off status.
fn stream(net: &mut Net, settings: &Settings, hop: Ipv4Address, mut faults: Injector) -> u32 {
    let dest = settings.dest();
    let flow = UdpStream {
        src_port: SOURCE_PORT,
        dest_ip: settings.dest_ip,
        dest_port: settings.dest_port,
        payload_len: PAYLOAD_LEN,
    };
    let mut phase = Phase::Resolving { retry: 0 };
    let mut seq: u64 = 0;
    // The last turn at which the stream was on schedule or sent something.
    let mut progress: u64 = 0;
    loop {
        let now = net.poll();

        if let Phase::Resolving { retry } = phase {
            if let (true, Some(mac)) = (net.arp_seen(), net.arp_mac()) {
                // Filler: byte i of the payload is i as u8 (the head
                // overwrites the first 16).
                if let Err(e) = net.open_stream(&flow, mac, MAX_BURST, |i| i as u8) {
                    rt::println!("streamer: cannot start: {e}");
                    return EXIT_NO_NETWORK;
                }
                rt::println!("streamer: sending to {dest} at {}/s", settings.rate);
                phase = Phase::Streaming { start: now };
            } else if now >= retry {
                net.send_arp_request(hop);
                phase = Phase::Resolving { retry: now.saturating_add(ARP_RETRY_NS) };
            }
        }

        let wake = match phase {
            Phase::Resolving { retry } => retry,
            Phase::Streaming { start } => {
                let mut burst = 0;
                while burst < MAX_BURST
                    && settings.count.is_none_or(|count| seq < count)
                    && settings.due(start, seq) <= now
                {
                    if !net.send_stream(&head(seq, now)) {
                        // Every stream buffer is on the ring: later.
                        break;
                    }
                    seq += 1;
                    burst += 1;
                }
                if burst > 0 || settings.due(start, seq) > now {
                    progress = now;
                }
                settings.due(start, seq)
            }
        };
        // Sends what this turn queued (the device transmits during the
        // notify); then an injected fault may strike (after outputs the last
        // healthy point does not cover); then the turn is done: healthy
        // unless datagrams have been due for STALL_NS with not one taken by
        // the NIC (a wedged stream). The value is free-form: the low half of
        // the sequence number shows progress.
        net.send();
        faults.tick(now);
        if matches!(phase, Phase::Resolving { .. }) || now.saturating_sub(progress) < STALL_NS {
            faults.report_health(seq as u32);
        }
        // Sleeps (at most rt::net::MAX_SLEEP_NS, 10 ms).
        net.sleep(Some(faults.wake_at().map_or(wake, |at| at.min(wake))));
        if settings.count == Some(seq) {
            rt::println!("streamer: sent {seq} datagrams");
            return 0;
        }
    }
}

/// The head of datagram `seq`: sequence number, clock reading.
fn head(seq: u64, now: u64) -> [u8; 16] {
    let mut head = [0; 16];
    head[..8].copy_from_slice(&seq.to_le_bytes());
    head[8..].copy_from_slice(&now.to_le_bytes());
    head
}
