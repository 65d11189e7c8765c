//! Packet capture on one interface of a lab namespace, in this process: what `tcpdump -i IF`
//! does, without tcpdump.
//!
//! [`Netns::capture`] opens an `AF_PACKET` raw socket for every protocol, bound to the interface,
//! on a thread that has entered the namespace; once it returns, every frame that crosses the
//! interface, in either direction, is queued on the socket (the kernel hands a packet socket its
//! copy synchronously, before the frame goes on its way). A recorder thread moves the frames off
//! the socket as they come; [`Capture::stop`] drains what is still queued and returns them all.
//! A frame the kernel had to drop because the socket's buffer was full still counts: `stop` fails
//! then, since the capture can no longer say what crossed.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{Netns, IFNAME_MAX};

/// Bytes of socket buffer asked for: room for thousands of frames if the recorder falls behind.
const CAPTURE_RCVBUF: libc::c_int = 8 << 20;

/// Largest frame recorded whole; longer ones (there are none without offloads) are cut, and their
/// full length kept in [`Frame::len`].
const MAX_CAPTURED: usize = 65536;

/// Which way a captured frame crossed the interface, as the kernel tells a packet socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The namespace received the frame on the interface. On a TAP: a frame the program holding
    /// the TAP wrote, i.e. one the VM sent.
    Received,
    /// The namespace sent the frame out of the interface. On a TAP: a frame for the program
    /// holding it, i.e. one towards the VM (the bridge floods broadcasts there too).
    Sent,
}

/// One captured frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Which way it crossed the interface.
    pub direction: Direction,
    /// Its length on the wire (Ethernet header included, no FCS).
    pub len: usize,
    /// Its bytes, from the Ethernet header on (at most 64 KiB).
    pub bytes: Vec<u8>,
}

impl Frame {
    /// The EtherType (bytes 12..14), or 0 for a runt.
    pub fn ethertype(&self) -> u16 {
        match self.bytes.get(12..14) {
            Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
            _ => 0,
        }
    }
}

/// A running capture ([`Netns::capture`]). Dropping it stops the recorder and discards the frames.
pub struct Capture {
    what: String,
    /// An eventfd; written once, which makes it readable for good and stops the recorder.
    stop: Arc<File>,
    /// The frames recorded so far, for [`Capture::wait_for`].
    seen: Seen,
    recorder: Option<JoinHandle<Result<Vec<Frame>, String>>>,
}

/// Frames recorded so far, and a condition variable notified as more come.
type Seen = Arc<(std::sync::Mutex<Vec<Frame>>, std::sync::Condvar)>;

impl Netns {
    /// Starts capturing every frame that crosses `ifname` in this namespace, both ways (as
    /// `tcpdump -i IFNAME` would). When it returns the capture is live: a frame that crosses
    /// afterwards is recorded, even if [`Capture::stop`] follows at once. Panics if the interface
    /// does not exist or the socket cannot be opened (root is needed).
    pub fn capture(&self, ifname: &str) -> Capture {
        assert!(ifname.len() <= IFNAME_MAX, "interface name {ifname} is longer than IFNAMSIZ allows");
        let what = format!("{ifname} in {}", self.name());
        let name = ifname.to_owned();
        // A packet socket belongs to the namespace of the thread that created it, and ifindexes
        // are per namespace: both happen on a thread inside the namespace.
        let socket = self.run(move || open_packet_socket(&name)).unwrap_or_else(|e| panic!("capturing on {what}: {e}"));
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: fd is the fresh descriptor eventfd just returned; nothing else owns it.
        let stop = Arc::new(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        let stop_for_recorder = Arc::clone(&stop);
        let seen: Seen = Arc::default();
        let seen_for_recorder = Arc::clone(&seen);
        let recorder = std::thread::Builder::new()
            .name(format!("capture {ifname}"))
            .spawn(move || record(&socket, &stop_for_recorder, &seen_for_recorder))
            .unwrap_or_else(|e| panic!("spawning the capture thread for {what}: {e}"));
        Capture { what, stop, seen, recorder: Some(recorder) }
    }
}

impl Capture {
    /// Waits (at most `timeout`) until the frames recorded so far satisfy `done`; whether they did.
    pub fn wait_for(&self, timeout: std::time::Duration, mut done: impl FnMut(&[Frame]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let (lock, changed) = &*self.seen;
        let mut frames = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if done(&frames) {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            frames = changed.wait_timeout(frames, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    /// Stops the capture and returns every frame that crossed the interface since
    /// [`Netns::capture`] returned, in the order the kernel delivered them. Panics if the kernel
    /// dropped frames for lack of buffer (the capture would be incomplete) or the socket failed.
    pub fn stop(mut self) -> Vec<Frame> {
        match self.finish() {
            Ok(frames) => frames,
            Err(message) => panic!("capture on {}: {message}", self.what),
        }
    }

    fn finish(&mut self) -> Result<Vec<Frame>, String> {
        let Some(recorder) = self.recorder.take() else {
            return Ok(Vec::new());
        };
        // Adds 1 to the eventfd's counter: readable from now on, since nobody reads it.
        (&*self.stop).write_all(&1u64.to_ne_bytes()).map_err(|e| format!("signalling the recorder: {e}"))?;
        recorder.join().map_err(|_| "the recorder thread panicked".to_owned())?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(message) = self.finish() {
            eprintln!("capture on {}: {message}", self.what);
        }
    }
}

/// Opens a packet socket for every protocol bound to `ifname` in the calling thread's namespace.
fn open_packet_socket(ifname: &str) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(ifname).map_err(|_| io::Error::other("interface name contains a NUL"))?;
    // SAFETY: cname is a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::other(format!("no interface {ifname}: {}", io::Error::last_os_error())));
    }
    // Protocol 0: the socket receives nothing until bind names the protocol and the interface, so
    // no frame of another interface slips in between.
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is the fresh descriptor socket just returned; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Past net.core.rmem_max: root may (SO_RCVBUFFORCE).
    setsockopt_int(&socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, CAPTURE_RCVBUF)?;
    // SAFETY: sockaddr_ll is plain old data for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex = libc::c_int::try_from(ifindex).map_err(io::Error::other)?;
    // SAFETY: addr is a valid sockaddr_ll for the length passed and outlives the call.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Statistics count from the socket's creation; read them once so that only drops after this
    // point count (there can be none: nothing was bound before).
    packet_drops(&socket)?;
    Ok(socket)
}

/// Gives a UDP socket a receive buffer of `bytes`, past `net.core.rmem_max`
/// (SO_RCVBUFFORCE: root), for a receiver that must not drop a burst.
pub fn force_receive_buffer(socket: &std::net::UdpSocket, bytes: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsFd;
    let fd = socket.as_fd().try_clone_to_owned()?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
}

fn setsockopt_int(socket: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value is a c_int that outlives the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Frames the kernel dropped for the socket since the last call (reading resets the counters).
fn packet_drops(socket: &OwnedFd) -> io::Result<u32> {
    let mut stats = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: stats and len are valid for writes and outlive the call; len holds stats' size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            std::ptr::from_mut(&mut stats).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(stats.tp_drops)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The recorder: moves frames off `socket` as they arrive until `stop` becomes readable, then
/// takes what is still queued and checks that the kernel dropped nothing.
fn record(socket: &OwnedFd, stop: &File, seen: &Seen) -> Result<Vec<Frame>, String> {
    let mut frames = Vec::new();
    let mut buf = vec![0u8; MAX_CAPTURED];
    loop {
        let fds = crate::poll_data_or_stop(socket.as_raw_fd(), stop.as_raw_fd())?;
        // Whatever is queued now, also when stopping: stop is signalled after the frames it
        // must cover were handed to the socket.
        let before = frames.len();
        drain(socket, &mut buf, &mut frames)?;
        if frames.len() > before {
            let (lock, changed) = &**seen;
            lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(&frames[before..]);
            changed.notify_all();
        }
        if fds[1].revents != 0 {
            let drops = packet_drops(socket).map_err(|e| format!("reading the socket's statistics: {e}"))?;
            if drops > 0 {
                return Err(format!(
                    "the kernel dropped {drops} frames for lack of buffer after {} recorded: the capture is incomplete",
                    frames.len()
                ));
            }
            return Ok(frames);
        }
    }
}

/// Reads every frame queued on `socket` without blocking.
fn drain(socket: &OwnedFd, buf: &mut [u8], frames: &mut Vec<Frame>) -> Result<(), String> {
    loop {
        // SAFETY: sockaddr_ll is plain old data for which all zeroes is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // MSG_TRUNC: the return value is the frame's real length even if it was cut.
        // SAFETY: buf is valid for writes of buf.len() bytes, from and from_len for theirs, and
        // from_len holds from's size; all outlive the call.
        let len = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::from_mut(&mut from).cast(),
                &mut from_len,
            )
        };
        if len < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(format!("recvfrom: {e}")),
            }
        }
        let len = usize::try_from(len).map_err(|e| e.to_string())?;
        let direction = if from.sll_pkttype == libc::PACKET_OUTGOING { Direction::Sent } else { Direction::Received };
        frames.push(Frame { direction, len, bytes: buf[..len.min(buf.len())].to_vec() });
    }
}
