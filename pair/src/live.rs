//! The live world a secondary attaches at go-live: its TAP, opened then
//! (go-live waits until the bridge forwards on it, so that no re-emitted
//! frame is dropped), the live clock continuing from the last logged
//! reading, and the guest's address announced.

use std::io::Write;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use replication::go_live::LiveWorld;
use vmm::hook::HookError;
use vmm::tap::Tap;
use vmm::world::{LiveInput, LiveOutput};

use crate::secondary::MakeLive;

/// Gratuitous ARPs sent at go-live, and the gap between them: a single
/// frame just after a TAP opens can be lost (QEMU announces five times).
pub const ANNOUNCEMENTS: u32 = 5;
pub const ANNOUNCE_GAP: Duration = Duration::from_millis(120);
/// The longest a go-live waits for its TAP to forward frames.
pub const TAP_READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The TAP a secondary goes live on.
pub enum LiveTap {
    /// The guest has no NIC.
    None,
    /// Opened already.
    Opened(Arc<Tap>),
    /// To open at go-live. A secondary does not hold its TAP before: a
    /// primary on the same host (tests, benchmarks) may share it, and a
    /// single-queue TAP takes one holder.
    Later(String),
}

impl LiveTap {
    fn attach(self) -> Result<Option<Arc<Tap>>, HookError> {
        match self {
            LiveTap::None => Ok(None),
            LiveTap::Opened(t) => Ok(Some(t)),
            LiveTap::Later(name) => Tap::open(&name)
                .map(|t| Some(Arc::new(t)))
                .map_err(|e| HookError::Network(std::io::Error::other(e.to_string()))),
        }
    }
}

/// The real world of a host: TAP `tap` (if the guest has a NIC), the serial
/// console to `serial`; the guest's `mac` and `ip` announced on the TAP.
pub fn tap_world(tap: LiveTap, mac: [u8; 6], ip: Option<(Ipv4Addr, u8)>, serial: Box<dyn Write + Send>) -> MakeLive {
    tap_world_kept(tap, mac, ip, serial, Arc::default())
}

/// Where [`tap_world_kept`] keeps the TAP it attached at go-live.
pub type KeptTap = Arc<std::sync::OnceLock<Arc<Tap>>>;

/// [`tap_world`], keeping the TAP it attaches in `kept`: a live copy that
/// boots its guest again (`--on-fault restart`) goes on with the same open
/// TAP rather than opening the device again, which fails (EBUSY) while
/// anything from the first go-live (the announcements) still holds it.
pub fn tap_world_kept(
    tap: LiveTap,
    mac: [u8; 6],
    ip: Option<(Ipv4Addr, u8)>,
    serial: Box<dyn Write + Send>,
    kept: KeptTap,
) -> MakeLive {
    Box::new(move |clock: u64, wake| {
        let tap = tap.attach()?;
        if let Some(t) = &tap {
            let _ = kept.set(t.clone());
        }
        if let Some(t) = &tap {
            // Frames that reached this host before go-live were the old
            // primary's business (or lost with it): the guest starts here.
            let mut buf = vec![0u8; 65550];
            while let Ok(Some(_)) = t.read_frame(&mut buf) {}
            // Re-emitted outputs go out first thing: they must not be
            // dropped by a bridge port that is not forwarding yet.
            if !t.wait_ready(TAP_READY_TIMEOUT) {
                tracing::warn!(tap = t.name(), "the TAP did not become ready; sending anyway");
            }
        }
        let mut input = LiveInput::new(clock, vec![wake]);
        let mut output = LiveOutput::new(serial);
        if let Some(t) = &tap {
            input = input.with_tap(t.clone());
            output = output.with_tap(t.clone());
            announce(t.clone(), mac, ip);
        }
        Ok(LiveWorld { input: Box::new(input), output: Box::new(output) })
    })
}

/// Announce the guest's MAC and IP with [`ANNOUNCEMENTS`] gratuitous ARPs,
/// [`ANNOUNCE_GAP`] apart, from a thread of their own.
pub fn announce(tap: Arc<Tap>, mac: [u8; 6], ip: Option<(Ipv4Addr, u8)>) {
    let Some((ip, _)) = ip else { return };
    let frame = replication::go_live::gratuitous_arp(mac, ip.octets());
    let _ = std::thread::Builder::new().name("announce".into()).spawn(move || {
        for i in 0..ANNOUNCEMENTS {
            if i > 0 {
                std::thread::sleep(ANNOUNCE_GAP);
            }
            let _ = tap.write_frame(&frame);
        }
    });
}
