//! A host TAP device: the world end of the guest's NIC.
//!
//! Opened by name through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI` (frames
//! are plain Ethernet, no packet-information prefix, no vnet header) and in
//! nonblocking mode, so the thread that owns it polls [`Tap::as_raw_fd`] and
//! reads until [`Tap::read_frame`] returns `None`. Frames never go to a
//! device directly: the input source queues them, and the device takes them
//! at an exit (see `devices::virtio_net`).
//!
//! With CAP_NET_ADMIN, opening a name that does not exist creates a
//! transient TAP of that name (the kernel's TUNSETIFF semantics); without it,
//! the TAP must exist (`ip tuntap add NAME mode tap user USER`).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The clone device of the tun/tap driver.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name the kernel accepts (IFNAMSIZ less the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// TUNSETIFF flags: a TAP (Ethernet frames) without the packet-information
/// prefix, as the `c_short` `struct ifreq` holds them.
const TAP_FLAGS: libc::c_short = 0x1002;
const _: () = assert!(TAP_FLAGS as libc::c_int == libc::IFF_TAP | libc::IFF_NO_PI);

/// Errors from opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit in IFNAMSIZ.
    #[error("TAP name {name:?} is {len} bytes long, the limit is {MAX_NAME_LEN}")]
    NameTooLong { name: String, len: usize },
    /// The name is empty or holds a byte the kernel refuses or expands.
    #[error("TAP name {name:?} is empty or holds a NUL, '/', '%', ':' or whitespace")]
    InvalidName { name: String },
    /// `/dev/net/tun` could not be opened.
    #[error("opening {TUN_PATH} failed (is the tun module loaded?)")]
    Open(#[source] io::Error),
    /// The kernel refused to attach to the TAP.
    #[error("attaching to TAP device {name:?} failed (does the device exist, is it a TAP without multi-queue or vnet header, and are you root or its owner?)")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach to the TAP device `name`, nonblocking.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.len() > MAX_NAME_LEN {
            return Err(TapError::NameTooLong { name: name.into(), len: name.len() });
        }
        // The kernel's dev_valid_name refuses '/', ':' and whitespace; a '%'
        // would make it pick a name of its own (tap%d).
        if name.is_empty()
            || name.bytes().any(|b| b == 0 || b == b'/' || b == b'%' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(TapError::InvalidName { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::Open)?;

        // SAFETY: ifreq is a C struct of integers, byte arrays and a union of
        // such; all zeroes is a valid value of it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            // c_char is i8 or u8 depending on the target: a bit-for-bit copy.
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` at the pointer
        // it is given; `req` is such a struct, NUL-terminated in its name (the
        // name is at most IFNAMSIZ-1 bytes, the rest zeroed), and lives for
        // the call. `file` is an open /dev/net/tun descriptor.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff { name: name.into(), source: io::Error::last_os_error() });
        }
        Ok(Tap { file, name: name.into() })
    }

    /// Whether a network interface called `name` exists in the calling
    /// thread's network namespace. Lets a caller refuse a missing TAP rather
    /// than have TUNSETIFF create a transient one that nothing configured.
    pub fn exists(name: &str) -> bool {
        let Ok(cname) = std::ffi::CString::new(name) else { return false };
        // SAFETY: if_nametoindex only reads the NUL-terminated string it is
        // given; `cname` lives for the call.
        unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
    }

    /// Wait (at most `timeout`) until frames written to this TAP can leave
    /// it: the kernel turns the carrier on when the TAP is opened, but a
    /// bridge enables its port only when the link-watch work runs, a moment
    /// later; a frame written before that is dropped. With the TAP in a
    /// bridge, waits for the port to forward (`brport/state` 3); else for
    /// its operational state to be up. Returns whether it saw it ready; an
    /// interface this namespace's sysfs does not show counts as ready.
    pub fn wait_ready(&self, timeout: std::time::Duration) -> bool {
        let dir = std::path::Path::new("/sys/class/net").join(&self.name);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().map(|s| s.trim().to_owned());
        let started = std::time::Instant::now();
        loop {
            let ready = match read("brport/state") {
                Some(state) => state == "3",
                None => read("operstate").is_none_or(|s| s == "up" || s == "unknown"),
            };
            if ready {
                return true;
            }
            if started.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one frame into `buf` (a frame longer than `buf` is truncated by
    /// the kernel; 65550 bytes hold any). `Ok(None)` when no frame is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write one frame. The kernel takes a frame whole or not at all; an
    /// `ErrorKind::WouldBlock` error means it was not sent.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n != frame.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TAP took {n} of a {}-byte frame", frame.len()),
            ));
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn names_checked_before_any_syscall() {
        assert!(matches!(Tap::open("a-name-far-too-long"), Err(TapError::NameTooLong { len: 19, .. })));
        for bad in ["", "a/b", "tap%d", "a b", "a:b", "a\0b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::InvalidName { .. })), "{bad:?} accepted");
        }
    }

    /// A TAP made with `ip tuntap` for one test, deleted on drop (also when
    /// the test panics). Named after the process: one at a time.
    struct ScratchTap(String);

    impl ScratchTap {
        fn create() -> ScratchTap {
            let name = format!("ftvmt{}", std::process::id());
            let tap = ScratchTap(name);
            run(&["tuntap", "add", "dev", &tap.0, "mode", "tap"]);
            // Keep the kernel's IPv6 autoconfiguration traffic off it.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.0), "1");
            run(&["link", "set", &tap.0, "up"]);
            tap
        }
    }

    impl Drop for ScratchTap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }

    fn run(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?} failed: {status}");
    }

    /// Skip (with a note) unless root; fail instead when FTVM_REQUIRE_KVM=1.
    fn root_or_skip(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root && std::path::Path::new(TUN_PATH).exists() {
            return true;
        }
        assert!(
            std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test} needs root and {TUN_PATH} (FTVM_REQUIRE_KVM=1)"
        );
        eprintln!("skipping {test}: needs root and {TUN_PATH}");
        false
    }

    /// A raw AF_PACKET socket bound to one interface: sees the frames the
    /// TAP writes into the host, and sends frames that the TAP reads.
    struct PacketSocket(std::os::fd::OwnedFd);

    const ETH_P_ALL: u16 = 0x0003;

    impl PacketSocket {
        fn bind(ifname: &str) -> PacketSocket {
            let proto = i32::from(ETH_P_ALL.to_be());
            // SAFETY: plain socket(2) call; the result is checked.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let cname = std::ffi::CString::new(ifname).unwrap();
            // SAFETY: cname is a NUL-terminated string living for the call.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert!(ifindex != 0, "if_nametoindex({ifname}): {}", io::Error::last_os_error());
            // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = i32::try_from(ifindex).unwrap();
            // SAFETY: addr is a sockaddr_ll of the size passed, living for the call.
            let rc = unsafe {
                libc::bind(
                    owned.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
                )
            };
            assert!(rc == 0, "bind: {}", io::Error::last_os_error());
            PacketSocket(owned)
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: frame is a live slice of the length passed.
            let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize, "send: {}", io::Error::last_os_error());
        }

        fn recv(&self, buf: &mut [u8]) -> usize {
            // SAFETY: buf is a live, writable slice of the length passed.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n >= 0, "recv: {}", io::Error::last_os_error());
            n as usize
        }
    }

    /// Wait until `fd` is readable; false after the 5 s failure bound.
    fn readable(fd: RawFd) -> bool {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, living for the call.
        unsafe { libc::poll(&mut pfd, 1, 5000) > 0 }
    }

    fn frame(ethertype: u16, marker: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]); // broadcast
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, marker]); // locally administered
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend((0..46u8).map(|i| i ^ marker));
        f
    }

    /// Frames both ways between the TAP and the host stack (needs root).
    #[test]
    fn tap_root_frames_both_ways() {
        if !root_or_skip("tap_root_frames_both_ways") {
            return;
        }
        let scratch = ScratchTap::create();
        let tap = Tap::open(&scratch.0).expect("open the scratch TAP");
        assert_eq!(tap.name(), scratch.0);
        let sock = PacketSocket::bind(&scratch.0);
        // IEEE 802 local experimental ethertype: nothing else sends it.
        const ETHERTYPE: u16 = 0x88b5;

        // Nothing is waiting that we sent; reads never block.
        let mut buf = vec![0u8; 65550];
        while let Some(n) = tap.read_frame(&mut buf).unwrap() {
            assert_ne!(buf.get(12..14), Some(&ETHERTYPE.to_be_bytes()[..]), "{n}-byte frame of ours early");
        }

        // TAP → host.
        let out = frame(ETHERTYPE, 1);
        tap.write_frame(&out).unwrap();
        loop {
            assert!(readable(sock.0.as_raw_fd()), "frame written to the TAP never reached the host");
            let n = sock.recv(&mut buf);
            if buf[..n] == out[..] {
                break;
            }
        }

        // Host → TAP.
        let inbound = frame(ETHERTYPE, 2);
        sock.send(&inbound);
        loop {
            assert!(readable(tap.as_raw_fd()), "frame sent on the interface never reached the TAP");
            if let Some(n) = tap.read_frame(&mut buf).unwrap() {
                if buf[..n] == inbound[..] {
                    break;
                }
            }
        }
    }

    #[test]
    fn tap_root_non_tap_device_is_a_clear_error() {
        if !root_or_skip("tap_root_non_tap_device_is_a_clear_error") {
            return;
        }
        // Root creates a transient TAP for a missing name; a name already
        // taken by a non-TAP device is refused.
        match Tap::open("lo") {
            Err(TapError::SetIff { name, source }) => {
                assert_eq!(name, "lo");
                assert!(source.raw_os_error().is_some());
            }
            other => panic!("opening lo as a TAP: {other:?}"),
        }
    }
}
