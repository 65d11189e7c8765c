//! Live state transfer: a running guest's whole state sent to a host that
//! has nothing (no image, no settings, no state), while the guest runs.
//!
//! The sender ([`send`]) follows the guest's writes with KVM's dirty log
//! ([`vmm::dirty::DirtyLog`]) and sends memory in rounds: first every page
//! that is not zero (pages never written are zero on the receiver too and
//! are not sent), then the pages written during the previous round, until
//! what is left would take no longer than [`TransferOptions::final_pause`]
//! to send at the rate the last round achieved (converging by rate), or
//! [`TransferOptions::max_rounds`] were sent. Then it asks the vCPU thread
//! for a live checkpoint ([`vmm::checkpoint::Checkpointer`]): at the next
//! exit boundary (the next digest point when the VM computes digests) the
//! guest stands still while the vCPU, the devices and the pages written
//! since the last round are copied, and runs on at once; that copy is the
//! only pause, and it is measured. The sender sends those pages and the
//! machine state, tagged with the checkpoint's exit index: the replication
//! log continues from there.
//!
//! The receiver ([`receive`]) builds guest memory from the settings that
//! arrive first (or checks them against its own), writes each page as it
//! arrives, and hands back memory and machine state, from which
//! [`vmm::Vm::restore`] builds the copy.
//!
//! # Wire format
//!
//! Every frame, both ways:
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | length of kind + sequence + payload, little-endian, at most [`MAX_FRAME`] |
//! | 1 | kind |
//! | 8 | sequence number, from 0 in each direction |
//! | n | payload |
//! | 32 | HMAC-SHA256 tag |
//!
//! The tag is keyed with a session key, HMAC-SHA256 of the pair's shared
//! key over `"ftvm transfer 1"`, the receiver's nonce and the sender's
//! nonce, and covers the direction byte, the length, kind, sequence and
//! payload; a frame out of sequence, from the other direction, of another
//! session or altered in any byte is refused, and the transfer fails.
//! Each page also carries the XXH3 of its contents, checked on arrival.
//!
//! 1. receiver → sender, unauthenticated: `FTVMXFER`, version (u16), its
//!    16-byte nonce;
//! 2. sender → receiver, `Begin`: the sender's 16-byte nonce (outside the
//!    MAC's key, inside the MACed payload), the guest settings' length
//!    (u32) and blob, and an opaque identity (the pair's guest identity,
//!    [`TransferOptions::identity`]); proves the sender holds the key;
//! 3. receiver → sender, `Ready` (proves the receiver holds the key, before
//!    any page leaves) or `Refuse` with a reason (settings that differ);
//! 4. sender → receiver: `Pages` (up to [`PAGES_PER_FRAME`] pages: address
//!    u64, zero flag u8, XXH3 u64, 4096 bytes unless zero), `RoundEnd`
//!    (round number u32), then `Machine` (the encoded
//!    [`MachineState`]);
//! 5. receiver → sender, `Done` (the exit index it will carry on from).
//!
//! A transfer cut anywhere (either side gone, the link cut, a frame
//! refused) fails on both sides with a [`TransferError`]; the sender's
//! guest has run on all along and stays as it was: a new transfer starts
//! from scratch.
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used))]

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ftvm_mac::{hmac_sha256, hmac_sha256_of, Hmac, Mac, Sha256};
use vmm::checkpoint::{self, Checkpointer, GuestSettings, MachineState};
use vmm::dirty::PAGE_SIZE;
use vmm::hook::ExitIndex;
use vmm::memory::GuestMem;

/// The receiver's greeting.
pub const MAGIC: [u8; 8] = *b"FTVMXFER";
/// Protocol version.
pub const VERSION: u16 = 1;
/// Largest frame (kind + sequence + payload) accepted.
pub const MAX_FRAME: usize = 1 << 20;
/// Longest identity carried in `Begin`.
pub const MAX_IDENTITY: usize = 4096;
/// Pages in one `Pages` frame.
pub const PAGES_PER_FRAME: usize = 64;
const PAGE: u64 = PAGE_SIZE as u64;
const TAG_LEN: usize = 32;
const NONCE_LEN: usize = 16;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Begin = 1,
    Ready = 2,
    Refuse = 3,
    Pages = 4,
    RoundEnd = 5,
    Machine = 6,
    Done = 7,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Begin,
            2 => Kind::Ready,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::RoundEnd,
            6 => Kind::Machine,
            7 => Kind::Done,
            _ => return None,
        })
    }
}

/// Why a transfer failed. Either side: the guest on the sender runs on.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The connection failed or closed.
    #[error("the transfer connection failed")]
    Io(#[from] std::io::Error),
    /// A frame whose tag does not verify (altered, replayed, another key).
    #[error("a transfer frame failed authentication (sequence {seq})")]
    Auth { seq: u64 },
    /// A page whose contents do not match its digest.
    #[error("page {addr:#x} does not match its digest")]
    PageDigest { addr: u64 },
    /// The peer broke the protocol.
    #[error("transfer protocol violation: {0}")]
    Protocol(String),
    /// The receiver refused (its settings differ).
    #[error("the receiver refused the transfer: {0}")]
    Refused(String),
    /// Taking, encoding or applying the state failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// Guest memory could not be had.
    #[error(transparent)]
    Vm(#[from] vmm::VmError),
    /// The dirty log could not be read or switched.
    #[error(transparent)]
    DirtyLog(#[from] vmm::dirty::DirtyLogError),
    /// The guest did not reach an exit boundary in time for the final stop.
    #[error("the guest reached no exit boundary for the final checkpoint within {0:?}")]
    NoCheckpoint(Duration),
    /// The VM failed the final checkpoint.
    #[error("the final checkpoint failed: {0}")]
    FinalCheckpoint(String),
    /// No randomness for the nonce.
    #[error("no randomness for the transfer nonce")]
    Random(#[source] getrandom::Error),
}

/// How the sender converges.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Stop pre-copying when what is left would take at most this long to
    /// send at the last round's rate.
    pub final_pause: Duration,
    /// Pre-copy rounds at most (after the first full pass).
    pub max_rounds: u32,
    /// Go to the final stop after this many rounds in a row that did not
    /// shrink what is left by a tenth.
    pub stalled_rounds: u32,
    /// How long to wait for the guest to reach an exit boundary.
    pub checkpoint_wait: Duration,
    /// Socket read timeout: a peer silent this long is gone.
    pub io_timeout: Duration,
    /// Opaque bytes (at most [`MAX_IDENTITY`]) sent in `Begin`, under the
    /// MAC: the pair's guest identity, which a receiver with no image
    /// cannot compute and takes from here for its logging channel.
    pub identity: Vec<u8>,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            final_pause: Duration::from_millis(2),
            max_rounds: 30,
            stalled_rounds: 3,
            checkpoint_wait: Duration::from_secs(10),
            io_timeout: Duration::from_secs(10),
            identity: Vec::new(),
        }
    }
}

/// What a finished transfer measured (sender side).
#[derive(Clone, Debug, Default)]
pub struct TransferReport {
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Pre-copy rounds, the full pass included.
    pub rounds: u32,
    /// Pages sent with contents.
    pub pages_sent: u64,
    /// Zero pages sent as a flag (written back to zero during the transfer).
    pub zero_pages_sent: u64,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Pages written while the guest stood still for the final checkpoint.
    pub final_pages: u64,
    /// How long the guest stood still.
    pub pause: Duration,
    /// From the start to the receiver's `Done`.
    pub total: Duration,
    /// The exit index the copy carries on from.
    pub exit_index: ExitIndex,
    /// What the `mark` given to [`send`] returned at the checkpoint.
    pub mark: u64,
}

/// One direction's framing: sequence numbers and the session key.
struct Framer {
    mac: Hmac<Sha256>,
    direction: u8,
    seq: u64,
}

impl Framer {
    fn tag(&self, len: &[u8; 4], kind: u8, seq: u64, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(&[self.direction]);
        mac.update(len);
        mac.update(&[kind]);
        mac.update(&seq.to_le_bytes());
        mac.update(payload);
        mac
    }

    fn write(&mut self, out: &mut impl Write, kind: Kind, payload: &[u8]) -> Result<u64, TransferError> {
        let len =
            payload.len().checked_add(9).filter(|l| *l <= MAX_FRAME).ok_or_else(|| {
                TransferError::Protocol(format!("frame of {} bytes exceeds {MAX_FRAME}", payload.len()))
            })?;
        let len = u32::try_from(len).map_err(|_| TransferError::Protocol("frame too long".into()))?.to_le_bytes();
        let tag = self.tag(&len, kind as u8, self.seq, payload).finalize().into_bytes();
        out.write_all(&len)?;
        out.write_all(&[kind as u8])?;
        out.write_all(&self.seq.to_le_bytes())?;
        out.write_all(payload)?;
        out.write_all(&tag)?;
        self.seq = self.seq.checked_add(1).ok_or_else(|| TransferError::Protocol("sequence exhausted".into()))?;
        Ok(u64::try_from(len_total(payload.len())).unwrap_or(u64::MAX))
    }

    /// Read one frame into `buf` (its payload), checking length, sequence
    /// and tag before anything of it is used.
    fn read(&mut self, input: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, TransferError> {
        let mut len = [0u8; 4];
        input.read_exact(&mut len)?;
        let n = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
        if !(9..=MAX_FRAME).contains(&n) {
            return Err(TransferError::Protocol(format!("frame length {n} outside 9..={MAX_FRAME}")));
        }
        let mut head = [0u8; 9];
        input.read_exact(&mut head)?;
        let (kind, seq) = head.split_first().ok_or_else(|| TransferError::Protocol("short header".into()))?;
        let seq = u64::from_le_bytes(seq.try_into().map_err(|_| TransferError::Protocol("short header".into()))?);
        buf.resize(n.saturating_sub(9), 0);
        input.read_exact(buf)?;
        let mut tag = [0u8; TAG_LEN];
        input.read_exact(&mut tag)?;
        let expect = self.tag(&len, *kind, seq, buf);
        if expect.verify_slice(&tag).is_err() || seq != self.seq {
            return Err(TransferError::Auth { seq });
        }
        self.seq = self.seq.checked_add(1).ok_or_else(|| TransferError::Protocol("sequence exhausted".into()))?;
        Kind::from_byte(*kind).ok_or_else(|| TransferError::Protocol(format!("unknown frame kind {kind}")))
    }
}

fn len_total(payload: usize) -> usize {
    payload.saturating_add(4 + 9 + TAG_LEN)
}

/// The two directions' framers for a session.
fn framers(key: &[u8], receiver_nonce: &[u8], sender_nonce: &[u8]) -> (Framer, Framer) {
    let session = hmac_sha256_of(key, &[b"ftvm transfer 1", receiver_nonce, sender_nonce]);
    let to_receiver = Framer { mac: hmac_sha256(&session), direction: 0, seq: 0 };
    let to_sender = Framer { mac: hmac_sha256(&session), direction: 1, seq: 0 };
    (to_receiver, to_sender)
}

fn encode_settings(settings: &GuestSettings) -> Vec<u8> {
    vmm::state::encode(SETTINGS_VERSION, settings)
}

const SETTINGS_VERSION: vmm::state::StateVersion = vmm::state::StateVersion { kind: "settings", major: 1, minor: 0 };

/// Reads a little-endian field at a time off a payload.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TransferError> {
        if self.0.len() < n {
            return Err(TransferError::Protocol(format!("payload short by {} bytes", n - self.0.len())));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, TransferError> {
        self.take(1)?.first().copied().ok_or_else(|| TransferError::Protocol("short".into()))
    }
    fn u16(&mut self) -> Result<u16, TransferError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes(b.try_into().map_err(|_| TransferError::Protocol("short".into()))?))
    }
    fn u32(&mut self) -> Result<u32, TransferError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().map_err(|_| TransferError::Protocol("short".into()))?))
    }
    fn u64(&mut self) -> Result<u64, TransferError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| TransferError::Protocol("short".into()))?))
    }
}

/// Accumulates pages into `Pages` frames.
struct PageBatch {
    payload: Vec<u8>,
    count: u16,
}

impl PageBatch {
    fn new() -> PageBatch {
        PageBatch { payload: Vec::with_capacity(2 + PAGES_PER_FRAME * (17 + PAGE_SIZE)), count: 0 }
    }

    /// Add a page; `true` when the batch is full.
    fn push(&mut self, addr: u64, data: &[u8]) -> bool {
        if self.count == 0 {
            self.payload.clear();
            self.payload.extend_from_slice(&[0, 0]);
        }
        self.payload.extend_from_slice(&addr.to_le_bytes());
        if checkpoint::is_zero(data) {
            self.payload.push(0);
            self.payload.extend_from_slice(&0u64.to_le_bytes());
        } else {
            self.payload.push(1);
            self.payload.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(data).to_le_bytes());
            self.payload.extend_from_slice(data);
        }
        self.count = self.count.saturating_add(1);
        usize::from(self.count) >= PAGES_PER_FRAME
    }

    /// Send what is batched, if anything.
    fn flush(
        &mut self,
        framer: &mut Framer,
        out: &mut impl Write,
        report: &mut TransferReport,
    ) -> Result<(), TransferError> {
        if self.count == 0 {
            return Ok(());
        }
        if let Some(n) = self.payload.get_mut(..2) {
            n.copy_from_slice(&self.count.to_le_bytes());
        }
        report.bytes_sent = report.bytes_sent.saturating_add(framer.write(out, Kind::Pages, &self.payload)?);
        self.count = 0;
        Ok(())
    }
}

/// Send a running guest's state to the receiver at the other end of
/// `stream`. On success the receiver holds a copy at
/// [`TransferReport::exit_index`]; on failure the guest runs on as before
/// and nothing of the transfer is left (the dirty log stops following).
pub fn send(
    stream: TcpStream,
    key: &[u8],
    vm: &Checkpointer,
    options: &TransferOptions,
) -> Result<TransferReport, TransferError> {
    send_marked(stream, key, vm, options, Box::new(|| 0))
}

/// [`send`], with `mark` run on the vCPU thread at the final checkpoint
/// while the guest stands still (the primary reads its log position there);
/// its value is [`TransferReport::mark`].
pub fn send_marked(
    stream: TcpStream,
    key: &[u8],
    vm: &Checkpointer,
    options: &TransferOptions,
    mark: vmm::checkpoint::Mark,
) -> Result<TransferReport, TransferError> {
    let result = send_inner(stream, key, vm, options, mark);
    if result.is_err() {
        vm.cancel();
    }
    if let Err(e) = vm.dirty().stop_transfer() {
        tracing::warn!(error = %e, "cannot switch the dirty log back after a transfer");
    }
    result
}

fn send_inner(
    stream: TcpStream,
    key: &[u8],
    vm: &Checkpointer,
    options: &TransferOptions,
    mark: vmm::checkpoint::Mark,
) -> Result<TransferReport, TransferError> {
    let started = Instant::now();
    stream.set_read_timeout(Some(options.io_timeout))?;
    stream.set_write_timeout(Some(options.io_timeout))?;
    stream.set_nodelay(true)?;
    let mut input = BufReader::new(stream.try_clone()?);
    let mut out = BufWriter::with_capacity(1 << 20, stream);

    let mut hello = [0u8; 8 + 2 + NONCE_LEN];
    input.read_exact(&mut hello)?;
    let (magic, rest) = hello.split_at(8);
    let (version, receiver_nonce) = rest.split_at(2);
    if magic != MAGIC {
        return Err(TransferError::Protocol("the peer is not an ftvm transfer receiver".into()));
    }
    if version != VERSION.to_le_bytes() {
        return Err(TransferError::Protocol(format!(
            "receiver speaks transfer version {version:?}, this is {VERSION}"
        )));
    }
    let mut sender_nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut sender_nonce).map_err(TransferError::Random)?;
    let (mut tx, mut rx) = framers(key, receiver_nonce, &sender_nonce);
    let mut report =
        TransferReport { memory_bytes: vm.settings().memory_mib.saturating_mul(1 << 20), ..TransferReport::default() };

    if options.identity.len() > MAX_IDENTITY {
        return Err(TransferError::Protocol(format!(
            "an identity of {} bytes exceeds {MAX_IDENTITY}",
            options.identity.len()
        )));
    }
    let settings = encode_settings(vm.settings());
    let mut begin = sender_nonce.to_vec();
    begin.extend_from_slice(&u32::try_from(settings.len()).unwrap_or(u32::MAX).to_le_bytes());
    begin.extend_from_slice(&settings);
    begin.extend_from_slice(&options.identity);
    report.bytes_sent = report.bytes_sent.saturating_add(tx.write(&mut out, Kind::Begin, &begin)?);
    out.flush()?;
    let mut buf = Vec::new();
    match rx.read(&mut input, &mut buf)? {
        Kind::Ready => {}
        Kind::Refuse => return Err(TransferError::Refused(String::from_utf8_lossy(&buf).into_owned())),
        other => return Err(TransferError::Protocol(format!("expected Ready, got {other:?}"))),
    }

    // Round 0: follow writes from now on, then send every non-zero page.
    let dirty = vm.dirty();
    dirty.start_transfer()?;
    let mem = vm.memory();
    let pages = dirty.pages();
    let mut batch = PageBatch::new();
    let mut page = vec![0u8; PAGE_SIZE];
    let mut round_start = Instant::now();
    let mut round_bytes = report.bytes_sent;
    // Only pages the host ever backed can be non-zero.
    let candidates: Box<dyn Iterator<Item = usize>> = match checkpoint::touched_pages(mem, pages) {
        Some(touched) => Box::new(touched.iter().collect::<Vec<_>>().into_iter()),
        None => Box::new(0..pages),
    };
    for index in candidates {
        let addr = u64::try_from(index).unwrap_or(u64::MAX).saturating_mul(PAGE);
        checkpoint::read_page(mem, addr, &mut page)?;
        if checkpoint::is_zero(&page) {
            continue;
        }
        report.pages_sent = report.pages_sent.saturating_add(1);
        if batch.push(addr, &page) {
            batch.flush(&mut tx, &mut out, &mut report)?;
        }
    }
    batch.flush(&mut tx, &mut out, &mut report)?;
    report.bytes_sent = report.bytes_sent.saturating_add(tx.write(&mut out, Kind::RoundEnd, &0u32.to_le_bytes())?);
    out.flush()?;
    report.rounds = 1;
    // Bytes per second the last round achieved.
    let mut rate = rate_of(report.bytes_sent.saturating_sub(round_bytes), round_start.elapsed());

    // Later rounds: the pages written meanwhile, until what is left is
    // small enough for the pause, or stops shrinking (the guest writes as
    // fast as the link sends: more rounds would not help).
    let mut previous_left = u64::MAX;
    let mut stalled = 0u32;
    loop {
        let set = dirty.take_for_transfer()?;
        let left = u64::try_from(set.count()).unwrap_or(u64::MAX).saturating_mul(PAGE);
        let would_take = Duration::from_secs_f64(left as f64 / rate.max(1.0));
        stalled =
            if left.saturating_mul(10) >= previous_left.saturating_mul(9) { stalled.saturating_add(1) } else { 0 };
        previous_left = left;
        if would_take <= options.final_pause || report.rounds > options.max_rounds || stalled >= options.stalled_rounds
        {
            // Small enough: send it while the guest still runs; the final
            // checkpoint copies what is written from this take on.
            send_pages(&set, mem, &mut batch, &mut tx, &mut out, &mut report, &mut page)?;
            break;
        }
        round_start = Instant::now();
        round_bytes = report.bytes_sent;
        send_pages(&set, mem, &mut batch, &mut tx, &mut out, &mut report, &mut page)?;
        report.bytes_sent =
            report.bytes_sent.saturating_add(tx.write(&mut out, Kind::RoundEnd, &report.rounds.to_le_bytes())?);
        out.flush()?;
        report.rounds = report.rounds.saturating_add(1);
        rate = rate_of(report.bytes_sent.saturating_sub(round_bytes), round_start.elapsed());
    }

    // The final stop, on the vCPU thread at the next exit boundary.
    let reply = vm.request_marked(mark);
    let asked = Instant::now();
    let live = loop {
        match reply.recv_timeout(Duration::from_millis(1)) {
            Ok(Ok(live)) => break live,
            Ok(Err(e)) => return Err(TransferError::FinalCheckpoint(e)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if asked.elapsed() < options.checkpoint_wait => {
                // A guest halted with no deadline makes no exit by itself.
                vm.nudge();
            }
            Err(_) => return Err(TransferError::NoCheckpoint(options.checkpoint_wait)),
        }
    };
    report.mark = live.mark;
    report.pause = live.pause;
    report.exit_index = live.state.exit_index;
    for (addr, data) in live.pages.iter().zip(live.data.chunks_exact(PAGE_SIZE)) {
        report.final_pages = report.final_pages.saturating_add(1);
        count_page(&mut report, data);
        if batch.push(*addr, data) {
            batch.flush(&mut tx, &mut out, &mut report)?;
        }
    }
    batch.flush(&mut tx, &mut out, &mut report)?;
    report.bytes_sent = report.bytes_sent.saturating_add(tx.write(&mut out, Kind::Machine, &live.state.encode())?);
    out.flush()?;
    match rx.read(&mut input, &mut buf)? {
        Kind::Done => {
            let at = Cursor(&buf).u64()?;
            if at != report.exit_index.0 {
                return Err(TransferError::Protocol(format!(
                    "the receiver carries on from exit {at}, not {}",
                    report.exit_index
                )));
            }
        }
        other => return Err(TransferError::Protocol(format!("expected Done, got {other:?}"))),
    }
    report.total = started.elapsed();
    Ok(report)
}

fn count_page(report: &mut TransferReport, data: &[u8]) {
    if checkpoint::is_zero(data) {
        report.zero_pages_sent = report.zero_pages_sent.saturating_add(1);
    } else {
        report.pages_sent = report.pages_sent.saturating_add(1);
    }
}

fn rate_of(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-6)
}

#[allow(clippy::too_many_arguments)]
fn send_pages(
    set: &vmm::dirty::PageBitmap,
    mem: &GuestMem,
    batch: &mut PageBatch,
    tx: &mut Framer,
    out: &mut impl Write,
    report: &mut TransferReport,
    page: &mut [u8],
) -> Result<(), TransferError> {
    for index in set.iter() {
        let addr = u64::try_from(index).unwrap_or(u64::MAX).saturating_mul(PAGE);
        checkpoint::read_page(mem, addr, page)?;
        count_page(report, page);
        if batch.push(addr, page) {
            batch.flush(tx, out, report)?;
        }
    }
    batch.flush(tx, out, report)
}

/// What a receiver got: the state to restore and the memory holding the
/// guest's pages, for [`vmm::Vm::restore`].
pub struct Received {
    /// vCPU, devices, settings, exit index.
    pub state: MachineState,
    /// Guest memory with every page written.
    pub memory: GuestMem,
    /// Pages written (with contents or zeroed).
    pub pages: u64,
    /// Bytes read off the connection.
    pub bytes: u64,
    /// Pre-copy rounds seen.
    pub rounds: u32,
    /// The sender's [`TransferOptions::identity`], authenticated.
    pub identity: Vec<u8>,
}

/// Receive a guest's state from the sender at the other end of `stream`.
/// `expected`: settings this host was given, which must match the
/// sender's (`None`: take the sender's). Nothing is kept on failure.
pub fn receive(
    stream: TcpStream,
    key: &[u8],
    expected: Option<&GuestSettings>,
    io_timeout: Duration,
) -> Result<Received, TransferError> {
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    stream.set_nodelay(true)?;
    let mut input = BufReader::with_capacity(1 << 20, stream.try_clone()?);
    let mut out = BufWriter::new(stream);
    let mut receiver_nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut receiver_nonce).map_err(TransferError::Random)?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&receiver_nonce);
    out.write_all(&hello)?;
    out.flush()?;

    // Begin: the sender's nonce is inside the payload the tag covers, and
    // the tag's key depends on it: read the frame raw, derive, then check.
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let n = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
    if !(9 + NONCE_LEN..=MAX_FRAME).contains(&n) {
        return Err(TransferError::Protocol(format!("Begin frame length {n} out of range")));
    }
    let mut rest = vec![0u8; n.saturating_add(TAG_LEN)];
    input.read_exact(&mut rest)?;
    let sender_nonce = rest.get(9..9 + NONCE_LEN).ok_or_else(|| TransferError::Protocol("short Begin".into()))?;
    let (mut rx, mut tx) = framers(key, &receiver_nonce, sender_nonce);
    let mut replay = len.to_vec();
    replay.extend_from_slice(&rest);
    let mut buf = Vec::new();
    let mut bytes = u64::try_from(replay.len()).unwrap_or(u64::MAX);
    if rx.read(&mut replay.as_slice(), &mut buf)? != Kind::Begin {
        return Err(TransferError::Protocol("the first frame is not Begin".into()));
    }
    let mut c = Cursor(buf.get(NONCE_LEN..).unwrap_or_default());
    let settings_len = usize::try_from(c.u32()?).unwrap_or(usize::MAX);
    let settings: GuestSettings =
        vmm::state::decode(SETTINGS_VERSION, c.take(settings_len)?).map_err(checkpoint::CheckpointError::from)?;
    let identity = c.0.to_vec();
    if identity.len() > MAX_IDENTITY {
        return Err(TransferError::Protocol(format!("an identity of {} bytes exceeds {MAX_IDENTITY}", identity.len())));
    }
    if let Some(mine) = expected {
        if let Err(e) = settings.check_matches(mine) {
            tx.write(&mut out, Kind::Refuse, e.to_string().as_bytes())?;
            out.flush()?;
            return Err(TransferError::Refused(e.to_string()));
        }
    }
    let memory = checkpoint::new_memory(&settings)?;
    tx.write(&mut out, Kind::Ready, &[])?;
    out.flush()?;

    let mut pages = 0u64;
    let mut rounds = 0u32;
    let zero = vec![0u8; PAGE_SIZE];
    loop {
        let kind = rx.read(&mut input, &mut buf)?;
        bytes = bytes.saturating_add(u64::try_from(len_total(buf.len())).unwrap_or(u64::MAX));
        match kind {
            Kind::Pages => {
                let mut c = Cursor(&buf);
                let count = c.u16()?;
                for _ in 0..count {
                    let addr = c.u64()?;
                    let flag = c.u8()?;
                    let hash = c.u64()?;
                    let data = match flag {
                        0 => zero.as_slice(),
                        1 => c.take(PAGE_SIZE)?,
                        other => return Err(TransferError::Protocol(format!("page flag {other}"))),
                    };
                    if flag == 1 && xxhash_rust::xxh3::xxh3_64(data) != hash {
                        return Err(TransferError::PageDigest { addr });
                    }
                    checkpoint::write_page(&memory, settings.memory_mib, addr, data)?;
                    pages = pages.saturating_add(1);
                }
                if !c.0.is_empty() {
                    return Err(TransferError::Protocol("trailing bytes in a Pages frame".into()));
                }
            }
            Kind::RoundEnd => {
                let round = Cursor(&buf).u32()?;
                if round != rounds {
                    return Err(TransferError::Protocol(format!("round {round} after {rounds} rounds")));
                }
                rounds = rounds.saturating_add(1);
            }
            Kind::Machine => {
                let state = MachineState::decode(&buf)?;
                if state.settings != settings {
                    return Err(TransferError::Protocol("the machine state's settings differ from Begin's".into()));
                }
                tx.write(&mut out, Kind::Done, &state.exit_index.0.to_le_bytes())?;
                out.flush()?;
                return Ok(Received { state, memory, pages, bytes, rounds, identity });
            }
            other => return Err(TransferError::Protocol(format!("unexpected {other:?} frame"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_any_altered_byte_is_refused() {
        let (mut tx, _) = framers(b"k", b"n1", b"n2");
        let mut wire = Vec::new();
        tx.write(&mut wire, Kind::RoundEnd, &7u32.to_le_bytes()).unwrap();
        tx.write(&mut wire, Kind::Ready, &[]).unwrap();
        let (mut rx, _) = framers(b"k", b"n1", b"n2");
        let mut buf = Vec::new();
        let mut r = wire.as_slice();
        assert_eq!(rx.read(&mut r, &mut buf).unwrap(), Kind::RoundEnd);
        assert_eq!(buf, 7u32.to_le_bytes());
        assert_eq!(rx.read(&mut r, &mut buf).unwrap(), Kind::Ready);
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x10;
            let (mut rx, _) = framers(b"k", b"n1", b"n2");
            let mut r = bad.as_slice();
            let first = rx.read(&mut r, &mut buf);
            let second = first.as_ref().ok().map(|_| rx.read(&mut r, &mut buf));
            assert!(first.is_err() || second.is_some_and(|s| s.is_err()), "flipping byte {i} went unnoticed");
        }
        // Another session's key, the other direction, a replayed frame.
        let (mut other, _) = framers(b"k", b"n1", b"n3");
        assert!(matches!(other.read(&mut wire.as_slice(), &mut buf), Err(TransferError::Auth { .. })));
        let (_, mut reverse) = framers(b"k", b"n1", b"n2");
        assert!(matches!(reverse.read(&mut wire.as_slice(), &mut buf), Err(TransferError::Auth { .. })));
        let (mut rx, _) = framers(b"k", b"n1", b"n2");
        let one = len_total(4);
        let mut twice = wire[..one].to_vec();
        twice.extend_from_slice(&wire[..one]);
        let mut r = twice.as_slice();
        rx.read(&mut r, &mut buf).unwrap();
        assert!(matches!(rx.read(&mut r, &mut buf), Err(TransferError::Auth { seq: 0 })));
    }

    #[test]
    fn batches_mark_zero_pages_and_carry_digests() {
        let mut b = PageBatch::new();
        let data = vec![7u8; PAGE_SIZE];
        assert!(!b.push(0x1000, &data));
        assert!(!b.push(0x2000, &[0u8; PAGE_SIZE]));
        assert_eq!(b.count, 2);
        let mut c = Cursor(&b.payload[2..]);
        assert_eq!(c.u64().unwrap(), 0x1000);
        assert_eq!(c.u8().unwrap(), 1);
        assert_eq!(c.u64().unwrap(), xxhash_rust::xxh3::xxh3_64(&data));
        c.take(PAGE_SIZE).unwrap();
        assert_eq!(c.u64().unwrap(), 0x2000);
        assert_eq!(c.u8().unwrap(), 0);
        assert!(Cursor(&[1]).u64().is_err());
    }
}
