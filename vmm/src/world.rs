//! The live world: the input source and output sink of a VM that is not
//! replaying. The clock is the host's monotonic clock, entropy is the host's
//! getrandom, a HLT sleeps until the guest's deadline or a wake-up, serial
//! output goes to a writer (stdout or a file).
//!
//! The replication crate wraps these: the recorder asks the live world and
//! logs the answer; the secondary's go-live switches from the log to them.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use crate::tap::Tap;

use crate::hook::{ExitIndex, GuestSignal, HookError, InputSource, OutputSink, Wake};

/// Inputs from the host.
pub struct LiveInput {
    /// Guest clock = `offset_ns` + host monotonic time since `start`.
    start: Instant,
    offset_ns: u64,
    /// The last reading served: the guest clock never goes backwards.
    last_ns: u64,
    /// Readable when the HLT sleep must end early (stop, frame arrival).
    wake_fds: Vec<std::os::fd::RawFd>,
    /// Where received frames come from, if the guest has a NIC.
    tap: Option<Arc<Tap>>,
    rx_buf: Vec<u8>,
}

/// Bytes a received frame may have: a 64 KiB GSO frame plus headers. The
/// TAP is opened without offloads, so frames are at most the MTU in practice.
const MAX_FRAME: usize = 65550;

impl LiveInput {
    /// A live source whose clock starts at `offset_ns` now (0 for a fresh
    /// boot; the last logged reading at a go-live). `wake_fds` end a HLT
    /// sleep when readable; they must outlive the source.
    pub fn new(offset_ns: u64, wake_fds: Vec<std::os::fd::RawFd>) -> Self {
        LiveInput { start: Instant::now(), offset_ns, last_ns: offset_ns, wake_fds, tap: None, rx_buf: Vec::new() }
    }

    /// Receive the NIC's frames from `tap`; a frame arriving also ends a HLT
    /// sleep.
    pub fn with_tap(mut self, tap: Arc<Tap>) -> Self {
        use std::os::fd::AsRawFd;
        self.wake_fds.push(tap.as_raw_fd());
        self.rx_buf = vec![0; MAX_FRAME];
        self.tap = Some(tap);
        self
    }

    fn now_ns(&mut self) -> u64 {
        let elapsed = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let now = self.offset_ns.saturating_add(elapsed).max(self.last_ns);
        self.last_ns = now;
        now
    }
}

/// Block until one of `fds` is readable or `timeout` passes (`None`: no
/// timeout). Returns whether an fd became readable.
pub fn wait_readable(fds: &[std::os::fd::RawFd], timeout: Option<std::time::Duration>) -> std::io::Result<bool> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        // Always below 1e9: fits.
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfds` is a live, exclusively borrowed array of `len` pollfds;
    // `ts_ptr` is null or points at `ts`, alive for the call; a null sigmask
    // leaves the mask unchanged.
    let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
    if n >= 0 {
        return Ok(n > 0);
    }
    let err = std::io::Error::last_os_error();
    if err.kind() == std::io::ErrorKind::Interrupted {
        // The kick signal: the caller re-checks why it woke.
        return Ok(true);
    }
    Err(err)
}

impl InputSource for LiveInput {
    fn clock_ns(&mut self, _exit: ExitIndex) -> Result<u64, HookError> {
        Ok(self.now_ns())
    }

    fn entropy(&mut self, _exit: ExitIndex, buf: &mut [u8]) -> Result<(), HookError> {
        let mut rest = buf;
        while !rest.is_empty() {
            // SAFETY: `rest` is a valid, exclusively borrowed buffer of
            // `rest.len()` bytes for getrandom to fill.
            let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(HookError::Entropy(err));
            };
            // getrandom fills at most `rest.len()` bytes: `n..` is in range.
            rest = std::mem::take(&mut rest).get_mut(n..).unwrap_or_default();
        }
        Ok(())
    }

    fn halt(&mut self, _exit: ExitIndex, deadline: Option<u64>) -> Result<Wake, HookError> {
        let timeout = match deadline {
            Some(d) => match d.checked_sub(self.now_ns()) {
                Some(left) if left > 0 => Some(std::time::Duration::from_nanos(left)),
                _ => return Ok(Wake::Deadline),
            },
            None => None,
        };
        let woke = wait_readable(&self.wake_fds, timeout).map_err(HookError::Wait)?;
        Ok(if woke { Wake::Event } else { Wake::Deadline })
    }

    fn receive_frame(&mut self, _exit: ExitIndex) -> Result<Option<Vec<u8>>, HookError> {
        let Some(tap) = &self.tap else { return Ok(None) };
        match tap.read_frame(&mut self.rx_buf).map_err(HookError::Network)? {
            Some(n) => Ok(self.rx_buf.get(..n).map(<[u8]>::to_vec)),
            None => Ok(None),
        }
    }
}

/// Outputs to the host. Serial bytes are buffered and flushed at each
/// newline and when the sink is dropped.
pub struct LiveOutput {
    serial: std::io::LineWriter<Box<dyn Write + Send>>,
    healthy: u64,
    tap: Option<Arc<Tap>>,
    /// Frames the TAP would not take (queue full, link down), dropped as a
    /// NIC with no carrier drops them.
    tx_dropped: u64,
}

impl LiveOutput {
    /// Serial output to `serial`.
    pub fn new(serial: Box<dyn Write + Send>) -> Self {
        LiveOutput { serial: std::io::LineWriter::new(serial), healthy: 0, tap: None, tx_dropped: 0 }
    }

    /// Send the NIC's frames to `tap`.
    pub fn with_tap(mut self, tap: Arc<Tap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Frames the TAP refused and that were dropped.
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }
}

impl OutputSink for LiveOutput {
    fn serial(&mut self, _exit: ExitIndex, bytes: &[u8]) -> Result<(), HookError> {
        self.serial.write_all(bytes).map_err(HookError::Output)
    }

    fn transmit_frame(&mut self, exit: ExitIndex, frame: &[u8]) -> Result<(), HookError> {
        let Some(tap) = &self.tap else { return Ok(()) };
        match tap.write_frame(frame) {
            Ok(()) => Ok(()),
            // Queue full, or the interface is down (EIO): the frame is lost
            // on the wire, as with a real NIC; TCP and the application cope.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EIO) => {
                self.tx_dropped = self.tx_dropped.wrapping_add(1);
                tracing::trace!(%exit, len = frame.len(), "TAP refused a frame; dropped");
                Ok(())
            }
            Err(e) => Err(HookError::Network(e)),
        }
    }

    fn signal(&mut self, exit: ExitIndex, signal: GuestSignal) -> Result<(), HookError> {
        match signal {
            GuestSignal::Healthy { .. } => self.healthy = self.healthy.wrapping_add(1),
            // The vCPU loop stops the guest and reports the panic as its error.
            GuestSignal::Panicked { event } => tracing::debug!(%exit, event, "guest reported a panic"),
        }
        Ok(())
    }
}

impl Drop for LiveOutput {
    fn drop(&mut self) {
        let _ = self.serial.flush();
        if self.tx_dropped > 0 {
            tracing::warn!(
                frames = self.tx_dropped,
                "the TAP refused frames (queue full or interface down); they were dropped"
            );
        }
    }
}
