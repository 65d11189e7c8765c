//! The logging channel: one TCP connection per protected VM, from the
//! primary (which connects) to the secondary (which listens), carrying log
//! records one way and acknowledgements the other.
//!
//! # Handshake
//!
//! ```text
//! primary                                              secondary
//!   Hello { version, nonce_p, identity_p }        ──▶  checks version, key (MAC)
//!   checks proof, guest                           ◀──  HelloReply { nonce_s, identity_s,
//!                                                          HMAC(key, "secondary" ‖ nonce_p ‖ nonce_s) }
//!                                                      checks guest
//!   AuthProof { HMAC(key, "primary" ‖ nonce_s ‖ nonce_p) } ──▶  checks proof
//! ```
//!
//! The secondary replies even to a primary whose guest differs, so that both
//! ends can name the field with both values; the primary then refuses under
//! the session key.
//!
//! # What is believed, and when
//!
//! Anyone who can reach the secondary's port can send it bytes, and anyone
//! who recorded an earlier session can replay a Hello (its MAC is under the
//! handshake key, which never changes). So the secondary acts on nothing the
//! peer says until a frame under the session key (which takes its own fresh
//! nonce) has verified: then a primary's proof that holds gives a session,
//! and a primary's refusal saying the guests differ is the one failure that
//! ends [`SecondaryChannel::accept`] ([`ChannelError::IdentityMismatch`]).
//! Everything before (bad magic, another version, a wrong MAC, a replayed
//! handshake, a timeout, a reset) is logged and refused, and the waiting
//! goes on; handshakes run concurrently and bounded, so idle connections
//! cannot hold a real primary out. The primary likewise believes nothing
//! before the secondary's proof over both nonces holds: only an identity
//! mismatch after it is final ([`ChannelError::is_retryable`]).
//!
//! `Hello` and `HelloReply`, sent before the session key exists, are MACed
//! with a handshake key derived from the shared key alone (HMAC(key,
//! "handshake" ‖ direction)); a peer with another key therefore fails the
//! very first frame's MAC, and both ends report
//! [`ChannelError::Authentication`]. Every later frame, `AuthProof` included,
//! is MACed with the session key HMAC(key, "session" ‖ nonce_p ‖ nonce_s),
//! refined per direction (HMAC(session key, direction)) so that a frame
//! reflected back to its sender fails its MAC. The proofs bind each side to
//! both fresh nonces, so a recorded handshake replayed later fails; the
//! session key is new for each connection, so a frame from an earlier
//! session fails its MAC, and the frame sequence numbers refuse a frame
//! duplicated, dropped or replayed within a session.
//!
//! A side that refuses the session tells its peer why with a `Refused` frame
//! when it can (the peer cannot check one MACed with another key, so a wrong
//! key shows there as a failed MAC, which also reads as `Authentication`),
//! then closes. Nothing is delivered to the caller before the handshake has
//! completed.
//!
//! # Buffering and backpressure
//!
//! The primary never blocks its caller: [`PrimaryChannel::send_records`],
//! [`PrimaryChannel::flush`] and [`PrimaryChannel::send_released`] are plain
//! functions that return without waiting, so the vCPU thread can call them
//! between two exits. Records are coalesced into frames of up to
//! [`FRAME_TARGET`] bytes, encoded and written when a flush is asked for
//! (on the flushing thread itself, with a non-blocking write: an output
//! waits for no other thread to wake), when a frame is full, or at the
//! latest [`ChannelConfig::flush_delay`] after the first record of a batch
//! was handed over (by a writer task, which also finishes what a full
//! socket did not take).
//!
//! The memory this takes is bounded by acknowledgements: the channel counts
//! the encoded bytes of every record handed to it and not yet acknowledged.
//! A batch that would take that count over
//! [`ChannelConfig::max_unacked_bytes`] is refused with
//! [`ChannelError::Backpressure`]: nothing of it is queued, the channel stays
//! usable, and the same batch (same first position) can be handed over again
//! once acks have come in. What to do meanwhile is the caller's decision; a
//! secondary that far behind is too far behind for a fast go-live, and the
//! primary's usual answer is to treat it as lost (win the arbiter, carry on
//! alone, repair later). [`PrimaryChannel::unacked_bytes`] shows how close the
//! channel is to the limit.
//!
//! The secondary reads frames as fast as its caller takes batches, holding
//! at most [`SECONDARY_QUEUE`] decoded batches; a caller that stops taking
//! them stops the reading, TCP's window closes, and the primary sees its
//! unacknowledged bytes grow: backpressure reaches the one place that can
//! decide what to do about it. Acks are cumulative and sent at once.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hmac::Mac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::frame::{
    check_record, encoded_record_len, hmac_sha256, hmac_sha256_of, FrameDecoder, FrameEncoder, FrameError,
    GuestIdentity, Hello, HelloReply, IdentityField, MacKey, Message, Nonce, RefuseReason, FRAME_OVERHEAD, NONCE_LEN,
    PROTOCOL_VERSION, RECORDS_HEADER_LEN,
};
use crate::key::SharedKey;
use crate::record::{LogPosition, Record};

/// The payload size at which the primary's writer cuts a `Records` frame and
/// sends it without waiting for the flush delay: large enough that the
/// per-frame cost (38 bytes, one CRC, one HMAC) is noise, small enough that
/// a frame goes out in a few hundred microseconds on a 10 Gbit/s link.
pub const FRAME_TARGET: usize = 256 * 1024;
/// Default for [`ChannelConfig::flush_delay`].
pub const DEFAULT_FLUSH_DELAY: Duration = Duration::from_millis(2);
/// Default for [`ChannelConfig::max_unacked_bytes`]: 64 MiB, over a second
/// of log at the rates a lockstep guest produces, far more than a healthy
/// link ever holds.
pub const DEFAULT_MAX_UNACKED_BYTES: u64 = 64 << 20;
/// Default for [`ChannelConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Decoded batches the secondary holds for a caller that has not taken them:
/// at most this many frames' payload (64 × [`FRAME_TARGET`] from an ftvm
/// primary, 64 × `MAX_PAYLOAD` at worst) plus their record headers.
pub const SECONDARY_QUEUE: usize = 64;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// What both ends of a channel are set up with.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// The pair's shared key.
    pub key: SharedKey,
    /// This host's guest; the peer's must be the same.
    pub identity: GuestIdentity,
    /// Primary: the longest a queued record waits for more to share its
    /// frame. Records that an output waits on are sent by
    /// [`PrimaryChannel::flush`] at once; the others only decide how much a
    /// go-live can replay, and a few milliseconds do not matter there.
    pub flush_delay: Duration,
    /// Primary: the most record bytes handed over and not yet acknowledged
    /// (see the module doc).
    pub max_unacked_bytes: u64,
    /// Both: how long the handshake may take before the connection is given
    /// up.
    pub handshake_timeout: Duration,
    /// The protocol version spoken; only tests speak another.
    version: u16,
}

impl ChannelConfig {
    /// A configuration with the default delays and limits.
    pub fn new(key: SharedKey, identity: GuestIdentity) -> ChannelConfig {
        ChannelConfig {
            key,
            identity,
            flush_delay: DEFAULT_FLUSH_DELAY,
            max_unacked_bytes: DEFAULT_MAX_UNACKED_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            version: PROTOCOL_VERSION,
        }
    }
}

/// One value of a [`GuestIdentity`] field, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityValue {
    /// A digest (image, settings).
    Digest([u8; 32]),
    /// A size in bytes (memory).
    Bytes(u64),
}

impl fmt::Display for IdentityValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityValue::Digest(digest) => digest.iter().try_for_each(|b| write!(f, "{b:02x}")),
            IdentityValue::Bytes(n) if n % (1 << 20) == 0 => write!(f, "{} MiB", n >> 20),
            IdentityValue::Bytes(n) => write!(f, "{n} bytes"),
        }
    }
}

/// What went wrong on a logging channel. Everything but
/// [`Backpressure`](Self::Backpressure), [`OutOfOrder`](Self::OutOfOrder) on
/// a send, [`AckBeyondReceived`](Self::AckBeyondReceived) and
/// [`ReleasedBeyondAcked`](Self::ReleasedBeyondAcked) ends the session.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer does not hold the same key, or its handshake did not prove it
    /// (a replayed handshake).
    #[error("the peer failed authentication: the two hosts do not hold the same key")]
    Authentication,
    /// The two ends speak different protocol versions.
    #[error("protocol version mismatch: this side speaks {ours}, the peer {theirs}")]
    Version { ours: u16, theirs: u16 },
    /// The two ends run different guests.
    #[error("the peer runs a different guest: the {field} is {ours} here and {theirs} there")]
    IdentityMismatch { field: IdentityField, ours: IdentityValue, theirs: IdentityValue },
    /// The peer refused the session for a reason this side did not see itself.
    #[error("the peer refused the session: {reason}")]
    Refused { reason: RefuseReason },
    /// The handshake did not finish in time.
    #[error("the handshake did not complete within {timeout:?}")]
    HandshakeTimeout { timeout: Duration },
    /// A frame from the peer failed a check.
    #[error("a frame from the peer was refused")]
    Frame(#[source] FrameError),
    /// A record or message could not be put in a frame (a record over its
    /// size cap).
    #[error("a frame could not be encoded")]
    Encode(#[source] FrameError),
    /// The peer sent a valid frame the protocol does not allow there.
    #[error("protocol violation by the peer: {what}")]
    Protocol { what: &'static str },
    /// Records handed over (or received) do not continue the log.
    #[error("records out of order: position {expected} was due, {found} came")]
    OutOfOrder { expected: LogPosition, found: LogPosition },
    /// The secondary is too far behind: the batch was not queued.
    #[error("the secondary is too far behind: {unacked_bytes} bytes unacknowledged, {batch_bytes} more would pass the {limit}-byte limit")]
    Backpressure { unacked_bytes: u64, batch_bytes: u64, limit: u64 },
    /// An ack for records this side has not received.
    #[error("cannot ack position {upto}: only {received} received")]
    AckBeyondReceived { upto: LogPosition, received: LogPosition },
    /// A release report for outputs whose records are not acknowledged.
    #[error("cannot report outputs up to {upto} released: only {acked} acknowledged")]
    ReleasedBeyondAcked { upto: LogPosition, acked: LogPosition },
    /// The connection was closed (by the peer, or after a clean shutdown).
    #[error("the logging channel is closed")]
    Closed,
    /// Reading or writing the socket failed.
    #[error("I/O on the logging channel failed")]
    Io(#[source] Arc<io::Error>),
    /// No random nonce could be had.
    #[error("the operating system's random source failed")]
    Random(#[source] getrandom::Error),
}

impl ChannelError {
    /// Whether a primary that got this from [`PrimaryChannel::connect`] may
    /// try again: true for everything but what a secondary proven to hold
    /// the key said ([`IdentityMismatch`](Self::IdentityMismatch): a real
    /// secondary of another guest) and local failures (no randomness, a
    /// frame this side cannot encode). A wrong MAC, another version, a
    /// refusal or garbage before the secondary's proof held may come from
    /// anyone who can answer on the secondary's address, so none of them
    /// may end a primary's waiting; a caller that keeps trying should say
    /// why, since a secondary set up with another key looks the same.
    ///
    /// [`SecondaryChannel::accept`] already keeps waiting through all of
    /// these and returns only what is not retryable.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ChannelError::IdentityMismatch { .. } | ChannelError::Random(_) | ChannelError::Encode(_))
    }
}

impl From<io::Error> for ChannelError {
    fn from(error: io::Error) -> Self {
        ChannelError::Io(Arc::new(error))
    }
}

/// A batch of consecutive records as the secondary receives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordBatch {
    /// Position of the first record.
    pub first: LogPosition,
    /// The records, at `first`, `first + 1`, … (never empty).
    pub records: Vec<Record>,
}

impl RecordBatch {
    /// Position of the last record.
    pub fn last(&self) -> LogPosition {
        let extra = u64::try_from(self.records.len().saturating_sub(1)).unwrap_or(u64::MAX);
        // The decoder checked that the positions fit.
        LogPosition(self.first.0.saturating_add(extra))
    }
}

// ---------------------------------------------------------------------------
// Keys and proofs

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    PrimaryToSecondary,
    SecondaryToPrimary,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::PrimaryToSecondary => b"primary to secondary",
            Direction::SecondaryToPrimary => b"secondary to primary",
        }
    }
}

fn handshake_key(key: &SharedKey, direction: Direction) -> MacKey {
    MacKey::new(&hmac_sha256_of(key.as_bytes(), &[b"handshake", direction.label()]))
}

fn session_keys(key: &SharedKey, nonce_p: &Nonce, nonce_s: &Nonce) -> (MacKey, MacKey) {
    let session = hmac_sha256_of(key.as_bytes(), &[b"session", nonce_p, nonce_s]);
    let p2s = MacKey::new(&hmac_sha256_of(&session, &[Direction::PrimaryToSecondary.label()]));
    let s2p = MacKey::new(&hmac_sha256_of(&session, &[Direction::SecondaryToPrimary.label()]));
    (p2s, s2p)
}

fn secondary_proof(key: &SharedKey, nonce_p: &Nonce, nonce_s: &Nonce) -> [u8; 32] {
    hmac_sha256_of(key.as_bytes(), &[b"secondary", nonce_p, nonce_s])
}

fn primary_proof(key: &SharedKey, nonce_p: &Nonce, nonce_s: &Nonce) -> [u8; 32] {
    hmac_sha256_of(key.as_bytes(), &[b"primary", nonce_s, nonce_p])
}

/// Check `proof` against HMAC(key, parts) in constant time.
fn proof_holds(key: &SharedKey, parts: &[&[u8]], proof: &[u8; 32]) -> bool {
    let mut mac = hmac_sha256(key.as_bytes());
    for part in parts {
        mac.update(part);
    }
    mac.verify_slice(proof).is_ok()
}

fn nonce() -> Result<Nonce, ChannelError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(ChannelError::Random)?;
    Ok(nonce)
}

fn identity_mismatch(ours: &GuestIdentity, theirs: &GuestIdentity) -> Option<ChannelError> {
    let (field, ours, theirs) = if ours.image != theirs.image {
        (IdentityField::Image, IdentityValue::Digest(ours.image), IdentityValue::Digest(theirs.image))
    } else if ours.memory_bytes != theirs.memory_bytes {
        (IdentityField::MemorySize, IdentityValue::Bytes(ours.memory_bytes), IdentityValue::Bytes(theirs.memory_bytes))
    } else if ours.config != theirs.config {
        (IdentityField::Config, IdentityValue::Digest(ours.config), IdentityValue::Digest(theirs.config))
    } else {
        return None;
    };
    Some(ChannelError::IdentityMismatch { field, ours, theirs })
}

// ---------------------------------------------------------------------------
// The handshake

/// A connection during the handshake: the whole stream, one encoder, one
/// decoder.
struct Wire {
    stream: TcpStream,
    encoder: FrameEncoder,
    decoder: FrameDecoder,
    version: u16,
}

impl Wire {
    fn new(stream: TcpStream, send: MacKey, receive: MacKey, version: u16) -> Wire {
        let mut decoder = FrameDecoder::with_version(receive, version);
        // Until the peer has proven itself, a frame larger than any
        // handshake message is refused from its header: a connection that
        // proves nothing holds a few hundred bytes, not a megabyte.
        decoder.set_max_payload(HANDSHAKE_MAX_PAYLOAD);
        Wire { stream, encoder: FrameEncoder::with_version(send, version), decoder, version }
    }

    /// The handshake is over: frames of any allowed size from now on.
    fn into_session(mut self) -> Wire {
        self.decoder.set_max_payload(crate::frame::MAX_PAYLOAD);
        self
    }

    async fn send(&mut self, message: &Message) -> Result<(), ChannelError> {
        let mut out = BytesMut::new();
        self.encoder.encode(message, &mut out).map_err(ChannelError::Encode)?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// The next handshake message. A frame that fails its MAC here comes
    /// from a peer with another key; one of another version, from a peer
    /// that speaks another protocol.
    async fn receive(&mut self) -> Result<Message, ChannelError> {
        let mut buf = BytesMut::with_capacity(HANDSHAKE_READ_CHUNK);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Ok(frame.message),
                Ok(None) => {}
                Err(error) => return Err(handshake_error(error)),
            }
            buf.clear();
            if self.stream.read_buf(&mut buf).await? == 0 {
                self.decoder.finish().map_err(handshake_error)?;
                return Err(ChannelError::Closed);
            }
            self.decoder.push(&buf);
        }
    }

    /// Tell the peer why this side refuses, then close. Best effort: the peer
    /// may be gone already, and the refusal stands either way.
    async fn refuse(mut self, reason: RefuseReason) {
        if let Err(error) = self.send(&Message::Refused(reason)).await {
            debug!(%error, "could not tell the peer why the session is refused");
        }
        let _ = self.stream.shutdown().await;
    }

    fn refused(&self, reason: RefuseReason) -> ChannelError {
        match reason {
            RefuseReason::Authentication => ChannelError::Authentication,
            RefuseReason::UnsupportedVersion { supported } => {
                ChannelError::Version { ours: self.version, theirs: supported }
            }
            reason => ChannelError::Refused { reason },
        }
    }
}

fn handshake_error(error: FrameError) -> ChannelError {
    match error {
        FrameError::BadMac { .. } => ChannelError::Authentication,
        FrameError::UnsupportedVersion { found, supported } => ChannelError::Version { ours: supported, theirs: found },
        error => ChannelError::Frame(error),
    }
}

/// The refusal to send for an error found during the handshake, if any.
fn refusal_for(error: &ChannelError, version: u16) -> Option<RefuseReason> {
    match error {
        ChannelError::Authentication => Some(RefuseReason::Authentication),
        ChannelError::Version { .. } => Some(RefuseReason::UnsupportedVersion { supported: version }),
        ChannelError::IdentityMismatch { field, .. } => Some(RefuseReason::IdentityMismatch { field: *field }),
        ChannelError::Protocol { .. } => Some(RefuseReason::Protocol),
        _ => None,
    }
}

const UNEXPECTED_IN_HANDSHAKE: ChannelError = ChannelError::Protocol { what: "unexpected frame in the handshake" };

/// A handshake that did not give a session: the error, and whether the peer
/// proved it holds the key *in this session* (a frame or proof bound to this
/// side's fresh nonce verified) before it failed. Only an authenticated
/// failure may end a VMM's waiting: anything else may come from anyone who
/// can reach the port, or replay what they recorded.
#[derive(Debug)]
struct HandshakeFailure {
    error: ChannelError,
    authenticated: bool,
}

impl HandshakeFailure {
    fn unauthenticated(error: ChannelError) -> HandshakeFailure {
        HandshakeFailure { error, authenticated: false }
    }
}

impl From<ChannelError> for HandshakeFailure {
    fn from(error: ChannelError) -> Self {
        HandshakeFailure::unauthenticated(error)
    }
}

async fn primary_handshake(stream: TcpStream, config: &ChannelConfig) -> Result<Wire, ChannelError> {
    let key = &config.key;
    let nonce_p = nonce()?;
    let mut wire = Wire::new(
        stream,
        handshake_key(key, Direction::PrimaryToSecondary),
        handshake_key(key, Direction::SecondaryToPrimary),
        config.version,
    );
    wire.send(&Message::Hello(Hello { version: config.version, nonce: nonce_p, identity: config.identity })).await?;
    let reply = match wire.receive().await? {
        Message::HelloReply(reply) => reply,
        Message::Refused(reason) => return Err(wire.refused(reason)),
        _ => return Err(UNEXPECTED_IN_HANDSHAKE),
    };
    // The secondary MACs everything after its reply with the session keys.
    let (p2s, s2p) = session_keys(key, &nonce_p, &reply.nonce);
    wire.encoder.set_key(p2s);
    wire.decoder.set_key(s2p);
    let checked = if !proof_holds(key, &[b"secondary", &nonce_p, &reply.nonce], &reply.proof) {
        Err(ChannelError::Authentication)
    } else if let Some(mismatch) = identity_mismatch(&config.identity, &reply.identity) {
        Err(mismatch)
    } else {
        Ok(())
    };
    if let Err(error) = checked {
        if let Some(reason) = refusal_for(&error, config.version) {
            wire.refuse(reason).await;
        }
        return Err(error);
    }
    wire.send(&Message::AuthProof { proof: primary_proof(key, &nonce_p, &reply.nonce) }).await?;
    Ok(wire.into_session())
}

/// The secondary's side of the handshake. `hello_seen` is set once a Hello
/// with a good MAC has arrived (the accept loop keeps such connections over
/// silent ones when it must drop one).
///
/// What is believed, and when: the Hello's MAC is under the handshake key,
/// which never changes, so a Hello recorded from an earlier session passes
/// it; nothing in the Hello (version, identity) is acted on yet. Only the
/// primary's next frame, MACed with the session key that takes this side's
/// fresh nonce, proves a live peer holding the key: an `AuthProof` that
/// holds, or a `Refused` saying the guests differ. An identity mismatch is
/// reported only then, as [`HandshakeFailure::authenticated`]; every
/// failure before that is unauthenticated.
async fn secondary_handshake(
    stream: TcpStream,
    config: &ChannelConfig,
    hello_seen: &AtomicBool,
) -> Result<Wire, HandshakeFailure> {
    let key = &config.key;
    let mut wire = Wire::new(
        stream,
        handshake_key(key, Direction::SecondaryToPrimary),
        handshake_key(key, Direction::PrimaryToSecondary),
        config.version,
    );
    let hello = match wire.receive().await {
        Ok(Message::Hello(hello)) => hello,
        Ok(Message::Refused(reason)) => return Err(wire.refused(reason).into()),
        Ok(_) => {
            wire.refuse(RefuseReason::Protocol).await;
            return Err(UNEXPECTED_IN_HANDSHAKE.into());
        }
        Err(error) => {
            // A peer that speaks another version or holds another key is
            // told why (best effort: it may be a real primary set up
            // wrongly); nothing it sent changes anything here.
            if let Some(reason) = refusal_for(&error, config.version) {
                wire.refuse(reason).await;
            }
            return Err(error.into());
        }
    };
    hello_seen.store(true, Ordering::Release);
    let nonce_s = nonce()?;
    let proof = secondary_proof(key, &hello.nonce, &nonce_s);
    wire.send(&Message::HelloReply(HelloReply { nonce: nonce_s, identity: config.identity, proof })).await?;
    let (p2s, s2p) = session_keys(key, &hello.nonce, &nonce_s);
    wire.encoder.set_key(s2p);
    wire.decoder.set_key(p2s);

    // The reply carries this side's identity, so a primary whose guest
    // differs names the field with both values and refuses under the
    // session key; this side then believes the Hello's identity.
    let failure = match wire.receive().await {
        Ok(Message::AuthProof { proof }) => {
            if !proof_holds(key, &[b"primary", &nonce_s, &hello.nonce], &proof) {
                HandshakeFailure::unauthenticated(ChannelError::Authentication)
            } else if let Some(mismatch) = identity_mismatch(&config.identity, &hello.identity) {
                // A primary that did not refuse itself: refuse it here.
                HandshakeFailure { error: mismatch, authenticated: true }
            } else {
                return Ok(wire.into_session());
            }
        }
        Ok(Message::Refused(reason)) => {
            // Authentic: it verified under the session key.
            let error = match (reason, identity_mismatch(&config.identity, &hello.identity)) {
                (RefuseReason::IdentityMismatch { .. }, Some(mismatch)) => mismatch,
                (reason, _) => wire.refused(reason),
            };
            let authenticated = matches!(error, ChannelError::IdentityMismatch { .. });
            return Err(HandshakeFailure { error, authenticated });
        }
        Ok(_) => HandshakeFailure::unauthenticated(UNEXPECTED_IN_HANDSHAKE),
        Err(error) => HandshakeFailure::unauthenticated(error),
    };
    if let Some(reason) = refusal_for(&failure.error, config.version) {
        wire.refuse(reason).await;
    }
    Err(failure)
}

async fn with_timeout<T>(
    timeout: Duration,
    handshake: impl std::future::Future<Output = Result<T, ChannelError>>,
) -> Result<T, ChannelError> {
    tokio::time::timeout(timeout, handshake).await.unwrap_or(Err(ChannelError::HandshakeTimeout { timeout }))
}

// ---------------------------------------------------------------------------
// What both sides share after the handshake

/// The first error that ended a session, watched by every task of it.
#[derive(Clone, Debug)]
struct Failure(Arc<watch::Sender<Option<ChannelError>>>);

impl Failure {
    fn new() -> Failure {
        Failure(Arc::new(watch::channel(None).0))
    }

    /// Record `error` unless an earlier one ended the session already.
    fn set(&self, error: ChannelError, role: &'static str) {
        self.0.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            warn!(role, %error, "logging channel failed");
            *slot = Some(error);
            true
        });
    }

    fn get(&self) -> Option<ChannelError> {
        self.0.borrow().clone()
    }

    fn check(&self) -> Result<(), ChannelError> {
        self.get().map_or(Ok(()), Err)
    }

    async fn wait(&self) -> ChannelError {
        let mut rx = self.0.subscribe();
        let error = match rx.wait_for(Option::is_some).await {
            Ok(slot) => slot.clone().unwrap_or(ChannelError::Closed),
            // Unreachable while `self` holds the sender.
            Err(_) => ChannelError::Closed,
        };
        error
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is consistent between statements: a panic elsewhere while
    // holding the lock leaves nothing half-done worth refusing over.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read the socket until the decoder yields frames; pass each to `handle`.
/// Returns when `handle` says stop, or with the error that ended the
/// session. An end of stream inside a frame is `Truncated`, between frames
/// `Closed`.
async fn read_frames(
    mut read: OwnedReadHalf,
    mut decoder: FrameDecoder,
    mut handle: impl AsyncFrameHandler,
) -> Result<(), ChannelError> {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        while let Some(frame) = decoder.next_frame().map_err(ChannelError::Frame)? {
            if handle.handle(frame.message).await? == Flow::Stop {
                return Ok(());
            }
        }
        buf.clear();
        if read.read_buf(&mut buf).await? == 0 {
            decoder.finish().map_err(ChannelError::Frame)?;
            return Err(ChannelError::Closed);
        }
        decoder.push(&buf);
    }
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

trait AsyncFrameHandler {
    async fn handle(&mut self, message: Message) -> Result<Flow, ChannelError>;
}

// ---------------------------------------------------------------------------
// Primary

/// The primary's end of a logging channel.
///
/// Dropping it closes the connection after the records already handed over
/// are written; the secondary sees the connection close without a
/// `Shutdown` and reports [`ChannelError::Closed`].
#[derive(Debug)]
pub struct PrimaryChannel {
    outbox: Arc<Outbox>,
    state: Arc<Mutex<PrimaryState>>,
    acked: watch::Receiver<LogPosition>,
    failure: Failure,
    max_unacked_bytes: u64,
    reader: JoinHandle<()>,
    sent: Arc<Sent>,
    on_ack: Arc<OnAck>,
}

/// What [`PrimaryChannel::on_ack`] runs, once set.
#[derive(Default)]
struct OnAck(OnceLock<Box<dyn Fn(LogPosition) + Send + Sync>>);

impl fmt::Debug for OnAck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() { "OnAck(set)" } else { "OnAck(none)" })
    }
}

/// What the writer sent of the log: the `Records` payloads' bytes, and the
/// same with each frame's header, CRC and MAC.
#[derive(Debug, Default)]
struct Sent {
    payload: AtomicU64,
    wire: AtomicU64,
}

/// Frames on their way to the socket, shared by whoever hands records over
/// (the vCPU thread, the shipper) and the writer task. A flush encodes and
/// writes on the caller's own thread (a non-blocking write): no hand-off to
/// another thread on the output path. The writer task only finishes what a
/// full socket left unwritten, cuts a batch whose flush delay passed, and
/// ends the session.
#[derive(Debug)]
struct Outbox {
    inner: Mutex<OutboxInner>,
    /// Wakes the writer task: a batch started (its flush delay runs), bytes
    /// were left unwritten, or the session ends.
    wake: Notify,
}

#[derive(Debug)]
struct OutboxInner {
    batcher: Batcher,
    /// The socket's write half, until the writer task ends (however it
    /// ends: the runtime may drop it): then the connection closes, even if
    /// the channel itself is still referenced.
    write: Option<Arc<OwnedWriteHalf>>,
    /// `shutdown` asked: the writer ends the session and answers here.
    closing: Option<oneshot::Sender<Result<(), ChannelError>>>,
    /// The channel was dropped: the writer writes what is there and stops.
    dropped: bool,
    /// A write found the socket full: the writer waits for room.
    blocked: bool,
    /// The writer task has ended: nobody would answer a shutdown.
    writer_done: bool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        lock(&self.inner)
    }

    /// Write what is encoded, without waiting: `Ok(true)` once all of it
    /// is out, `Ok(false)` when the socket is full (the writer task is then
    /// woken to finish).
    fn try_write_out(&self, inner: &mut OutboxInner) -> Result<bool, ChannelError> {
        if inner.blocked {
            return Ok(false);
        }
        let Some(write) = inner.write.clone() else { return Err(ChannelError::Closed) };
        while !inner.batcher.out.is_empty() {
            match write.try_write(&inner.batcher.out) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => inner.batcher.out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    inner.blocked = true;
                    self.wake.notify_one();
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        crate::cost::sent(inner.batcher.last_cut.0);
        Ok(true)
    }
}

#[derive(Debug, Default)]
struct PrimaryState {
    /// The position the next batch must start at; `None` before the first.
    next: Option<LogPosition>,
    /// The last position handed over.
    last: LogPosition,
    /// The secondary's latest ack.
    acked: LogPosition,
    /// The last position and encoded size of each batch not yet fully
    /// acknowledged, oldest first.
    unacked: VecDeque<(LogPosition, u64)>,
    /// Sum of the sizes in `unacked`.
    unacked_bytes: u64,
    /// The last position reported released.
    released: LogPosition,
}

impl PrimaryChannel {
    /// Connect to the secondary at `addr` and run the handshake.
    pub async fn connect(addr: impl ToSocketAddrs, config: ChannelConfig) -> Result<PrimaryChannel, ChannelError> {
        let stream = TcpStream::connect(addr).await?;
        PrimaryChannel::handshake(stream, config).await
    }

    /// Run the handshake on a connected stream (sets `TCP_NODELAY`: frames
    /// are written whole, and an output waits on each flush).
    pub async fn handshake(stream: TcpStream, config: ChannelConfig) -> Result<PrimaryChannel, ChannelError> {
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr().ok();
        let wire = with_timeout(config.handshake_timeout, primary_handshake(stream, &config)).await?;
        info!(role = "primary", ?peer, "logging channel established");
        Ok(PrimaryChannel::start(wire, &config))
    }

    fn start(wire: Wire, config: &ChannelConfig) -> PrimaryChannel {
        let Wire { stream, encoder, decoder, .. } = wire;
        let (read, write) = stream.into_split();
        let (acked_tx, acked) = watch::channel(LogPosition::NONE);
        let state = Arc::new(Mutex::new(PrimaryState::default()));
        let failure = Failure::new();
        let sent = Arc::new(Sent::default());
        let outbox = Arc::new(Outbox {
            inner: Mutex::new(OutboxInner {
                batcher: Batcher::new(encoder, sent.clone()),
                write: Some(Arc::new(write)),
                closing: None,
                dropped: false,
                blocked: false,
                writer_done: false,
            }),
            wake: Notify::new(),
        });
        // The writer runs until the channel is dropped or shut down, or the
        // session fails; nothing needs to join it.
        tokio::spawn(primary_writer(outbox.clone(), failure.clone(), config.flush_delay));
        let on_ack = Arc::new(OnAck::default());
        let handler = AckHandler { state: Arc::clone(&state), acked: acked_tx, on_ack: on_ack.clone() };
        let reader = tokio::spawn(watch_failure(failure.clone(), "primary", read_frames(read, decoder, handler)));
        PrimaryChannel {
            outbox,
            state,
            acked,
            failure,
            max_unacked_bytes: config.max_unacked_bytes,
            reader,
            sent,
            on_ack,
        }
    }

    /// Hand over `records`, at positions `first`, `first + 1`, …, for
    /// sending. Never blocks and never waits for the network: the records
    /// go out with the next flush, a full frame, or the flush delay (see the
    /// module doc).
    ///
    /// `first` must continue the log: the first call may start anywhere from
    /// position 1, each later one where the previous ended. Refused, with
    /// nothing queued: a gap or overlap ([`ChannelError::OutOfOrder`]), a
    /// record over its size cap ([`ChannelError::Frame`]), a batch that
    /// would take the unacknowledged bytes over the limit
    /// ([`ChannelError::Backpressure`]: hand the same batch over again
    /// later), and anything after the session failed (that error).
    pub fn send_records(&self, first: LogPosition, records: &[Record]) -> Result<(), ChannelError> {
        self.failure.check()?;
        let Some(extra) = records.len().checked_sub(1) else { return Ok(()) };
        let mut state = lock(&self.state);
        let expected = state.next.unwrap_or(first.max(LogPosition::FIRST));
        if first != expected {
            return Err(ChannelError::OutOfOrder { expected, found: first });
        }
        let last = u64::try_from(extra)
            .ok()
            .and_then(|extra| first.checked_add(extra))
            .filter(|last| last.0 < u64::MAX)
            .ok_or(ChannelError::OutOfOrder { expected, found: LogPosition(u64::MAX) })?;
        let mut batch_bytes = 0u64;
        for record in records {
            check_record(record).map_err(ChannelError::Encode)?;
            let len = u64::try_from(encoded_record_len(record)).unwrap_or(u64::MAX);
            batch_bytes = batch_bytes.saturating_add(len);
        }
        if state.unacked_bytes.saturating_add(batch_bytes) > self.max_unacked_bytes {
            return Err(ChannelError::Backpressure {
                unacked_bytes: state.unacked_bytes,
                batch_bytes,
                limit: self.max_unacked_bytes,
            });
        }
        {
            // Taken under the state lock, so batches are encoded in
            // position order.
            let mut inner = self.outbox.lock();
            let started = inner.batcher.pending_since.is_none();
            if let Err(e) = inner.batcher.push(first, records.to_vec()) {
                self.fail(e.clone());
                return Err(e);
            }
            // Full frames go out now; a batch that started waits for its
            // flush, or for the writer at its flush delay.
            if !inner.batcher.out.is_empty() {
                if let Err(e) = self.outbox.try_write_out(&mut inner) {
                    self.fail(e.clone());
                    return Err(e);
                }
            }
            if started && inner.batcher.pending_since.is_some() {
                self.outbox.wake.notify_one();
            }
        }
        state.next = last.checked_add(1);
        state.last = last;
        state.unacked.push_back((last, batch_bytes));
        state.unacked_bytes = state.unacked_bytes.saturating_add(batch_bytes);
        Ok(())
    }

    /// The session failed on this side (a write): record it, wake the writer.
    fn fail(&self, error: ChannelError) {
        self.failure.set(error, "primary");
        self.outbox.wake.notify_one();
    }

    /// An output is pending: encode everything handed over so far and write
    /// it now, on this thread, without waiting for the flush delay. Never
    /// blocks: what a full socket does not take, the writer task finishes.
    pub fn flush(&self) {
        if self.failure.get().is_some() {
            return;
        }
        let asked = crate::cost::stamp();
        let mut inner = self.outbox.lock();
        let anything = !inner.batcher.pending.is_empty() || !inner.batcher.out.is_empty();
        let written = inner.batcher.cut().and_then(|()| self.outbox.try_write_out(&mut inner));
        drop(inner);
        match written {
            Ok(true) => {
                if let Some(asked) = asked.filter(|_| anything) {
                    crate::cost::since(crate::cost::Stage::EncodeWrite, asked);
                }
            }
            Ok(false) => {}
            // The failure is what callers see next.
            Err(e) => self.fail(e),
        }
    }

    /// Tell the secondary that every output up to `upto` reached the world.
    /// `upto` may not pass what the secondary acknowledged (the output rule).
    /// Never blocks.
    pub fn send_released(&self, upto: LogPosition) -> Result<(), ChannelError> {
        self.failure.check()?;
        let mut state = lock(&self.state);
        if upto > state.acked {
            return Err(ChannelError::ReleasedBeyondAcked { upto, acked: state.acked });
        }
        if upto <= state.released {
            return Ok(());
        }
        state.released = upto;
        drop(state);
        let mut inner = self.outbox.lock();
        let written = inner
            .batcher
            .control(&Message::Released { upto })
            .and_then(|()| self.outbox.try_write_out(&mut inner).map(|_| ()));
        drop(inner);
        written.inspect_err(|e| self.fail(e.clone()))
    }

    /// Run `callback` with each new ack, on the task that read it, before
    /// [`acked`](Self::acked) changes: what the ack allows (releasing held
    /// outputs) happens without waking another task or thread. It must not
    /// block. Only the first callback set is kept (`false` for a later one).
    pub fn on_ack(&self, callback: impl Fn(LogPosition) + Send + Sync + 'static) -> bool {
        self.on_ack.0.set(Box::new(callback)).is_ok()
    }

    /// The secondary's cumulative acknowledgements: the highest position it
    /// received and stored, [`LogPosition::NONE`] before the first ack.
    pub fn acked(&self) -> watch::Receiver<LogPosition> {
        self.acked.clone()
    }

    /// Bytes of the log encoded so far: the `Records` payloads, and the
    /// same with the frames' headers, CRCs and MACs.
    pub fn log_bytes(&self) -> (u64, u64) {
        (self.sent.payload.load(Ordering::Relaxed), self.sent.wire.load(Ordering::Relaxed))
    }

    /// Encoded bytes of the records handed over and not yet acknowledged
    /// (their size bound, [`encoded_record_len`]: deltas are not known
    /// before the writer encodes them).
    pub fn unacked_bytes(&self) -> u64 {
        lock(&self.state).unacked_bytes
    }

    /// Records handed over and not yet acknowledged.
    pub fn unacked_records(&self) -> u64 {
        let state = lock(&self.state);
        state.last.0.saturating_sub(state.acked.0)
    }

    /// The error that ended the session, if one did.
    pub fn error(&self) -> Option<ChannelError> {
        self.failure.get()
    }

    /// Wait until the session fails, and say why.
    pub async fn failed(&self) -> ChannelError {
        self.failure.wait().await
    }

    /// End the session on purpose: write every record handed over, then a
    /// `Shutdown` frame, and close. Acks that have not arrived by then are
    /// not waited for (wait on [`acked`](Self::acked) first for that).
    pub async fn shutdown(self) -> Result<(), ChannelError> {
        self.failure.check()?;
        let (done, finished) = oneshot::channel();
        {
            let mut inner = self.outbox.lock();
            if inner.writer_done {
                return Err(self.failure.get().unwrap_or(ChannelError::Closed));
            }
            inner.closing = Some(done);
        }
        self.outbox.wake.notify_one();
        let result = finished.await.unwrap_or_else(|_| Err(self.failure.get().unwrap_or(ChannelError::Closed)));
        self.reader.abort();
        result
    }
}

impl Drop for PrimaryChannel {
    fn drop(&mut self) {
        // The writer writes what was handed over and ends; the reader has
        // nobody left to report to.
        self.outbox.lock().dropped = true;
        self.outbox.wake.notify_one();
        self.reader.abort();
    }
}

/// Runs `task` and records its error as the session's failure.
async fn watch_failure(
    failure: Failure,
    role: &'static str,
    task: impl std::future::Future<Output = Result<(), ChannelError>>,
) {
    let stopped = failure.clone();
    tokio::select! {
        result = task => if let Err(error) = result { failure.set(error, role) },
        // Another task failed: nothing more to read.
        _ = stopped.wait() => {}
    }
}

struct AckHandler {
    state: Arc<Mutex<PrimaryState>>,
    acked: watch::Sender<LogPosition>,
    on_ack: Arc<OnAck>,
}

impl AsyncFrameHandler for AckHandler {
    async fn handle(&mut self, message: Message) -> Result<Flow, ChannelError> {
        let upto = match message {
            Message::Ack { upto } => upto,
            Message::Shutdown => return Err(ChannelError::Closed),
            Message::Refused(reason) => return Err(ChannelError::Refused { reason }),
            _ => return Err(ChannelError::Protocol { what: "the secondary sent a frame only a primary sends" }),
        };
        let mut state = lock(&self.state);
        if upto < state.acked {
            return Err(ChannelError::Protocol { what: "an ack went backwards" });
        }
        if upto > state.last {
            return Err(ChannelError::Protocol { what: "an ack for records never sent" });
        }
        state.acked = upto;
        crate::cost::acked(crate::cost::Stage::AckRoundTrip, upto.0);
        while let Some(&(last, bytes)) = state.unacked.front() {
            if last > upto {
                break;
            }
            state.unacked.pop_front();
            state.unacked_bytes = state.unacked_bytes.saturating_sub(bytes);
        }
        drop(state);
        if let Some(callback) = self.on_ack.0.get() {
            callback(upto);
        }
        self.acked.send_replace(upto);
        Ok(Flow::Continue)
    }
}

/// Frames being put together for the primary's socket.
#[derive(Debug)]
struct Batcher {
    encoder: FrameEncoder,
    /// Complete frames, ready to write.
    out: BytesMut,
    /// Records not yet in a frame, from position `first` on.
    pending: Vec<Record>,
    first: LogPosition,
    /// The `Records` payload size `pending` makes.
    pending_bytes: usize,
    /// When the oldest pending record was queued.
    pending_since: Option<Instant>,
    /// The last position put into a frame.
    last_cut: LogPosition,
    sent: Arc<Sent>,
}

impl Batcher {
    fn new(encoder: FrameEncoder, sent: Arc<Sent>) -> Batcher {
        Batcher {
            encoder,
            out: BytesMut::new(),
            pending: Vec::new(),
            first: LogPosition::NONE,
            pending_bytes: 0,
            pending_since: None,
            last_cut: LogPosition::NONE,
            sent,
        }
    }

    /// Add records at `first`, `first + 1`, …, cutting a frame whenever the
    /// next record would take it past [`FRAME_TARGET`].
    fn push(&mut self, first: LogPosition, records: Vec<Record>) -> Result<(), ChannelError> {
        let mut position = first;
        for record in records {
            let len = encoded_record_len(&record);
            if !self.pending.is_empty() && self.pending_bytes.saturating_add(len) > FRAME_TARGET {
                self.cut()?;
            }
            if self.pending.is_empty() {
                self.first = position;
                self.pending_bytes = RECORDS_HEADER_LEN;
                self.pending_since.get_or_insert_with(Instant::now);
            }
            self.pending.push(record);
            self.pending_bytes = self.pending_bytes.saturating_add(len);
            // `send_records` checked that the positions fit.
            position = position.checked_add(1).unwrap_or(position);
        }
        Ok(())
    }

    /// Put the pending records into one frame.
    fn cut(&mut self) -> Result<(), ChannelError> {
        if !self.pending.is_empty() {
            self.encoder.encode_records(self.first, &self.pending, &mut self.out).map_err(ChannelError::Encode)?;
            let payload = u64::try_from(self.encoder.last_payload_len()).unwrap_or(u64::MAX);
            self.sent.payload.fetch_add(payload, Ordering::Relaxed);
            self.sent.wire.fetch_add(payload.saturating_add(FRAME_OVERHEAD as u64), Ordering::Relaxed);
            let extra = u64::try_from(self.pending.len().saturating_sub(1)).unwrap_or(0);
            self.last_cut = self.first.checked_add(extra).unwrap_or(self.first);
            self.pending.clear();
            self.pending_bytes = 0;
        }
        self.pending_since = None;
        Ok(())
    }

    /// A control frame, after the records queued before it.
    fn control(&mut self, message: &Message) -> Result<(), ChannelError> {
        self.cut()?;
        self.encoder.encode(message, &mut self.out).map_err(ChannelError::Encode)?;
        Ok(())
    }
}

/// When the writer task ends, however it ends (the runtime may drop it):
/// closes the connection, and tells a shutdown waiting for it how it ended.
struct CloseOnDrop(Arc<Outbox>, Failure);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let mut inner = self.0.lock();
        inner.write = None;
        inner.writer_done = true;
        if let Some(done) = inner.closing.take() {
            let _ = done.send(Err(self.1.get().unwrap_or(ChannelError::Closed)));
        }
    }
}

async fn primary_writer(outbox: Arc<Outbox>, failure: Failure, flush_delay: Duration) {
    let _report = crate::cost::ReportOnDrop("primary");
    let _close = CloseOnDrop(outbox.clone(), failure.clone());
    let stopped = failure.clone();
    tokio::select! {
        result = write_loop(&outbox, flush_delay) => {
            if let Err(error) = result {
                failure.set(error, "primary");
            }
        }
        _ = stopped.wait() => {}
    }
}

/// Sleep until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What the writer task does: cut batches whose flush delay passed, finish
/// what a full socket left, end the session when asked or dropped.
async fn write_loop(outbox: &Outbox, flush_delay: Duration) -> Result<(), ChannelError> {
    loop {
        let deadline = {
            let inner = outbox.lock();
            // A delay too large for the clock means "no delay limit".
            inner.batcher.pending_since.and_then(|since| since.checked_add(flush_delay))
        };
        tokio::select! {
            () = outbox.wake.notified() => {}
            () = sleep_until(deadline) => {}
        }
        let (closing, dropped) = {
            let mut inner = outbox.lock();
            let due = inner
                .batcher
                .pending_since
                .is_some_and(|since| since.checked_add(flush_delay).is_some_and(|due| Instant::now() >= due));
            let closing = inner.closing.is_some();
            if due || closing || inner.dropped {
                inner.batcher.cut()?;
            }
            if closing {
                inner.batcher.control(&Message::Shutdown)?;
            }
            (closing, inner.dropped)
        };
        write_all(outbox).await?;
        if closing {
            let done = outbox.lock().closing.take();
            if let Some(done) = done {
                let _ = done.send(Ok(()));
            }
            return Ok(());
        }
        if dropped {
            return Ok(());
        }
    }
}

/// Write everything encoded, waiting for room as long as it takes.
async fn write_all(outbox: &Outbox) -> Result<(), ChannelError> {
    loop {
        let write = {
            let mut inner = outbox.lock();
            inner.blocked = false;
            if outbox.try_write_out(&mut inner)? {
                return Ok(());
            }
            inner.write.clone().ok_or(ChannelError::Closed)?
        };
        write.writable().await?;
    }
}

// ---------------------------------------------------------------------------
// Secondary

/// The secondary's end of a logging channel.
#[derive(Debug)]
pub struct SecondaryChannel {
    batches: mpsc::Receiver<Delivery>,
    acker: Acker,
    released: watch::Receiver<LogPosition>,
    failure: Failure,
    /// Set once the log ended: `Ok` after the primary's shutdown.
    ended: Option<Result<(), ChannelError>>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

#[derive(Debug)]
enum Delivery {
    Batch(RecordBatch),
    End,
    Failed(ChannelError),
}

/// Handshakes the secondary runs at once while it waits for its primary.
/// Each holds a socket and at most a few KiB; 64 is far more than a real
/// primary needs (one) and few enough that idle connections cost little.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Unauthenticated refusals the secondary logs one by one before it logs
/// only at doubling counts (a flood of bad connections must not flood the log).
pub const LOGGED_REFUSALS: u64 = 16;
/// The largest payload of a handshake frame (`HelloReply`, 136 bytes, is the
/// largest), with room to spare.
const HANDSHAKE_MAX_PAYLOAD: usize = 512;
/// Bytes asked of the socket per read during the handshake.
const HANDSHAKE_READ_CHUNK: usize = 4 * 1024;
/// How long accept waits when the process is out of descriptors and no
/// pending handshake can be dropped to free one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// `error` and its sources, one after the other.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn worth_logging(count: u64) -> bool {
    count <= LOGGED_REFUSALS || count.is_power_of_two()
}

async fn secondary_handshake_bounded(
    stream: TcpStream,
    config: &ChannelConfig,
    hello_seen: &AtomicBool,
) -> Result<Wire, HandshakeFailure> {
    stream.set_nodelay(true).map_err(ChannelError::from)?;
    let timeout = config.handshake_timeout;
    tokio::time::timeout(timeout, secondary_handshake(stream, config, hello_seen))
        .await
        .unwrap_or(Err(HandshakeFailure::unauthenticated(ChannelError::HandshakeTimeout { timeout })))
}

/// What a failed `accept(2)` means for the waiting.
enum ListenerError {
    /// One incoming connection went wrong (reset or aborted before accept).
    OfThatConnection,
    /// The process or system ran out of descriptors or memory: transient.
    OutOfResources,
    /// The listener itself is broken.
    Fatal,
}

fn listener_error_kind(error: &io::Error) -> ListenerError {
    use io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted | ErrorKind::WouldBlock => {
            ListenerError::OfThatConnection
        }
        ErrorKind::OutOfMemory => ListenerError::OutOfResources,
        // EMFILE, ENFILE, ENOBUFS, ENOMEM; EPROTO and EPERM (a firewall)
        // concern one connection.
        _ => match error.raw_os_error() {
            Some(23 | 24 | 105 | 12) => ListenerError::OutOfResources,
            Some(71 | 1) => ListenerError::OfThatConnection,
            _ => ListenerError::Fatal,
        },
    }
}

/// One handshake in flight in [`SecondaryChannel::accept`].
struct PendingHandshake {
    id: tokio::task::Id,
    abort: tokio::task::AbortHandle,
    /// A Hello with a good MAC arrived on it.
    hello_seen: Arc<AtomicBool>,
}

/// The handshakes in flight, oldest first.
#[derive(Default)]
struct PendingHandshakes {
    tasks: tokio::task::JoinSet<(SocketAddr, Result<Wire, HandshakeFailure>)>,
    order: VecDeque<PendingHandshake>,
}

impl PendingHandshakes {
    /// Start the handshake of a new connection, first dropping one if
    /// [`MAX_PENDING_HANDSHAKES`] are in flight.
    fn start(&mut self, stream: TcpStream, peer: SocketAddr, config: &Arc<ChannelConfig>) {
        if self.order.len() >= MAX_PENDING_HANDSHAKES {
            self.drop_one();
        }
        let hello_seen = Arc::new(AtomicBool::new(false));
        let (config, seen) = (Arc::clone(config), Arc::clone(&hello_seen));
        let abort = self.tasks.spawn(async move {
            let result = secondary_handshake_bounded(stream, &config, &seen).await;
            (peer, result)
        });
        self.order.push_back(PendingHandshake { id: abort.id(), abort, hello_seen });
    }

    /// Drop the oldest handshake whose peer has not sent a good Hello, or
    /// the oldest of all if every one has. False if none is in flight.
    fn drop_one(&mut self) -> bool {
        let silent = self.order.iter().position(|p| !p.hello_seen.load(Ordering::Acquire));
        let Some(dropped) = self.order.remove(silent.unwrap_or(0)) else { return false };
        debug!(pending = MAX_PENDING_HANDSHAKES, "dropped the oldest pending handshake to make room");
        dropped.abort.abort();
        true
    }

    /// A handshake ended (or was aborted): forget it.
    fn finished(&mut self, id: tokio::task::Id) {
        self.order.retain(|p| p.id != id);
    }
}

/// Sends the secondary's acks; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct Acker {
    acks: Arc<watch::Sender<LogPosition>>,
    delivered: Arc<AtomicU64>,
    failure: Failure,
}

impl Acker {
    /// Acknowledge every record up to `upto` as received and stored. Sent at
    /// once, without blocking; acks are cumulative, so one lower than an
    /// earlier one changes nothing. Refused for records not yet delivered by
    /// [`SecondaryChannel::recv`].
    pub fn ack(&self, upto: LogPosition) -> Result<(), ChannelError> {
        self.failure.check()?;
        let received = LogPosition(self.delivered.load(Ordering::Acquire));
        if upto > received {
            return Err(ChannelError::AckBeyondReceived { upto, received });
        }
        self.acks.send_if_modified(|acked| {
            let newer = upto > *acked;
            if newer {
                *acked = upto;
            }
            newer
        });
        Ok(())
    }
}

impl SecondaryChannel {
    /// Wait on `listener` for the primary and return the first session that
    /// authenticates.
    ///
    /// Returns only: a session; an identity mismatch that a peer proven to
    /// hold the key reported or showed ([`ChannelError::IdentityMismatch`]:
    /// a real primary of another guest); or an error of the listener itself
    /// that waiting cannot cure. Every other failure (bad magic, another
    /// version, a wrong MAC or key, a replayed handshake, a timeout, a
    /// reset) is unauthenticated: it is logged as one warning naming the
    /// remote address and why (the first [`LOGGED_REFUSALS`] of them, then at
    /// doubling counts), and the waiting goes on. Nothing unauthenticated
    /// ends or changes this side's waiting.
    ///
    /// Handshakes run concurrently, at most [`MAX_PENDING_HANDSHAKES`] at
    /// once, each bounded by [`ChannelConfig::handshake_timeout`]; when a new
    /// connection finds them all taken, the oldest one that has not yet sent
    /// a Hello with a good MAC is dropped (the oldest of all if every one
    /// has), so connections that stay idle cannot keep a real primary out.
    ///
    /// Cancel-safe in the sense that dropping it drops every connection it
    /// holds; a later call starts afresh.
    pub async fn accept(listener: &TcpListener, config: ChannelConfig) -> Result<SecondaryChannel, ChannelError> {
        let config = Arc::new(config);
        let mut pending = PendingHandshakes::default();
        let mut refused = 0u64;
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        pending.start(stream, peer, &config);
                        // Let the new handshake read what its peer already
                        // sent before the next connection may push it out.
                        tokio::task::yield_now().await;
                    }
                    Err(error) => match listener_error_kind(&error) {
                        ListenerError::OfThatConnection => debug!(%error, "an incoming connection failed before accept"),
                        ListenerError::OutOfResources => {
                            refused = refused.saturating_add(1);
                            if worth_logging(refused) {
                                warn!(%error, count = refused, "cannot accept connections for now; waiting for a handshake to end");
                            }
                            // Out of descriptors or memory: free one by
                            // dropping the oldest pending handshake, or wait
                            // a little if none holds any.
                            if !pending.drop_one() {
                                tokio::time::sleep(ACCEPT_BACKOFF).await;
                            }
                        }
                        ListenerError::Fatal => return Err(error.into()),
                    },
                },
                Some(joined) = pending.tasks.join_next_with_id() => match joined {
                    Ok((id, (peer, result))) => {
                        pending.finished(id);
                        match result {
                            Ok(wire) => {
                                info!(role = "secondary", %peer, "logging channel established");
                                return Ok(SecondaryChannel::start(wire));
                            }
                            Err(HandshakeFailure { error, authenticated: true }) => {
                                warn!(%peer, %error, "refused the primary: it proved the key but runs another guest");
                                return Err(error);
                            }
                            Err(HandshakeFailure { error, authenticated: false }) => {
                                refused = refused.saturating_add(1);
                                if worth_logging(refused) {
                                    warn!(%peer, count = refused, "refused a connection from {peer}: {}", chain(&error));
                                }
                            }
                        }
                    }
                    // Dropped to make room (aborted), or a panic in a task
                    // that handles peer input: neither ends the waiting.
                    Err(error) => {
                        pending.finished(error.id());
                        if error.is_panic() {
                            warn!(%error, "a handshake task panicked");
                        }
                    }
                },
            }
        }
    }

    /// Run the handshake on an accepted stream, and only on it: every
    /// failure is returned, authenticated or not. A secondary waiting for
    /// its primary uses [`accept`](Self::accept), which refuses bad peers
    /// and keeps waiting.
    pub async fn handshake(stream: TcpStream, config: ChannelConfig) -> Result<SecondaryChannel, ChannelError> {
        let peer: Option<SocketAddr> = stream.peer_addr().ok();
        let wire = secondary_handshake_bounded(stream, &config, &AtomicBool::new(false))
            .await
            .map_err(|failure| failure.error)?;
        info!(role = "secondary", ?peer, "logging channel established");
        Ok(SecondaryChannel::start(wire))
    }

    fn start(wire: Wire) -> SecondaryChannel {
        let Wire { stream, encoder, decoder, .. } = wire;
        let (read, write) = stream.into_split();
        let (deliver, batches) = mpsc::channel(SECONDARY_QUEUE);
        let (released_tx, released) = watch::channel(LogPosition::NONE);
        let (acks, acks_rx) = watch::channel(LogPosition::NONE);
        let failure = Failure::new();
        let handler = RecordHandler { deliver: deliver.clone(), next: None, released: released_tx };
        let reader = tokio::spawn(secondary_reader(read, decoder, handler, deliver, failure.clone()));
        let writer = tokio::spawn(secondary_writer(write, encoder, acks_rx, failure.clone()));
        let acker = Acker { acks: Arc::new(acks), delivered: Arc::new(AtomicU64::new(0)), failure: failure.clone() };
        SecondaryChannel { batches, acker, released, failure, ended: None, reader, writer }
    }

    /// The next batch of records, in log order. `Ok(None)` once the primary
    /// ended the session on purpose (and on every later call); the error
    /// that ended the session otherwise (again on every later call). Every
    /// batch returned passed every check; none after a failed frame is.
    ///
    /// Cancel-safe: a batch is either returned or still queued.
    pub async fn recv(&mut self) -> Result<Option<RecordBatch>, ChannelError> {
        if let Some(ended) = &self.ended {
            return ended.clone().map(|()| None);
        }
        let delivery = self.batches.recv().await.unwrap_or_else(|| {
            // The reader is gone without a word: only a panic does that.
            Delivery::Failed(self.failure.get().unwrap_or(ChannelError::Closed))
        });
        match delivery {
            Delivery::Batch(batch) => {
                self.acker.delivered.fetch_max(batch.last().0, Ordering::AcqRel);
                Ok(Some(batch))
            }
            Delivery::End => {
                self.ended = Some(Ok(()));
                Ok(None)
            }
            Delivery::Failed(error) => {
                self.ended = Some(Err(error.clone()));
                Err(error)
            }
        }
    }

    /// Acknowledge every record up to `upto` (see [`Acker::ack`]).
    pub fn ack(&self, upto: LogPosition) -> Result<(), ChannelError> {
        self.acker.ack(upto)
    }

    /// A handle that acks from another task or thread.
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// The primary's reports of released outputs: every output up to this
    /// position reached the world.
    pub fn released(&self) -> watch::Receiver<LogPosition> {
        self.released.clone()
    }

    /// The error that ended the session, if one did.
    pub fn error(&self) -> Option<ChannelError> {
        self.failure.get()
    }

    /// Resolves with the session's failure as soon as it happens, before
    /// [`recv`](Self::recv) has returned the batches received before it (a
    /// dead primary is known at once, however far behind the caller is).
    /// Never resolves for a session that ends cleanly.
    pub fn on_failure(&self) -> impl std::future::Future<Output = ChannelError> + Send + 'static {
        let failure = self.failure.clone();
        async move { failure.wait().await }
    }
}

impl Drop for SecondaryChannel {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

struct RecordHandler {
    deliver: mpsc::Sender<Delivery>,
    /// The position the next batch must start at; `None` before the first
    /// (a log received after a repair starts where the checkpoint ends).
    next: Option<LogPosition>,
    released: watch::Sender<LogPosition>,
}

impl AsyncFrameHandler for RecordHandler {
    async fn handle(&mut self, message: Message) -> Result<Flow, ChannelError> {
        match message {
            Message::Records { first, records } => {
                if let Some(expected) = self.next.filter(|&expected| expected != first) {
                    return Err(ChannelError::OutOfOrder { expected, found: first });
                }
                let batch = RecordBatch { first, records };
                self.next = batch.last().checked_add(1);
                crate::cost::sent(batch.last().0);
                if self.deliver.send(Delivery::Batch(batch)).await.is_err() {
                    // Nobody takes batches any more.
                    return Ok(Flow::Stop);
                }
                Ok(Flow::Continue)
            }
            Message::Released { upto } => {
                if upto < *self.released.borrow() {
                    return Err(ChannelError::Protocol { what: "a release report went backwards" });
                }
                // The output rule: nothing is released before it is acked,
                // and nothing is acked before it is received.
                let received = self.next.map_or(LogPosition::NONE, |next| LogPosition(next.0.saturating_sub(1)));
                if upto > received {
                    return Err(ChannelError::Protocol { what: "outputs released past the records received" });
                }
                self.released.send_replace(upto);
                Ok(Flow::Continue)
            }
            Message::Shutdown => {
                let _ = self.deliver.send(Delivery::End).await;
                Ok(Flow::Stop)
            }
            Message::Refused(reason) => Err(ChannelError::Refused { reason }),
            _ => Err(ChannelError::Protocol { what: "the primary sent a frame only a secondary sends" }),
        }
    }
}

async fn secondary_reader(
    read: OwnedReadHalf,
    decoder: FrameDecoder,
    handler: RecordHandler,
    deliver: mpsc::Sender<Delivery>,
    failure: Failure,
) {
    let stopped = failure.clone();
    let result = tokio::select! {
        result = read_frames(read, decoder, handler) => result,
        error = stopped.wait() => Err(error),
    };
    if let Err(error) = result {
        failure.set(error.clone(), "secondary");
        // After every batch that passed: the caller sees them, then this.
        let _ = deliver.send(Delivery::Failed(error)).await;
    }
}

async fn secondary_writer(
    mut write: OwnedWriteHalf,
    mut encoder: FrameEncoder,
    mut acks: watch::Receiver<LogPosition>,
    failure: Failure,
) {
    let _report = crate::cost::ReportOnDrop("secondary");
    let stopped = failure.clone();
    let result = async {
        let mut out = BytesMut::new();
        // Ends when the channel (the acks' sender) is dropped.
        while acks.changed().await.is_ok() {
            let upto = *acks.borrow_and_update();
            out.clear();
            encoder.encode(&Message::Ack { upto }, &mut out).map_err(ChannelError::Encode)?;
            write.write_all(&out).await?;
            crate::cost::acked(crate::cost::Stage::ReceiveToAck, upto.0);
        }
        Ok::<(), ChannelError>(())
    };
    tokio::select! {
        result = result => if let Err(error) = result { failure.set(error, "secondary") },
        _ = stopped.wait() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FRAME_OVERHEAD, HEADER_LEN};
    use bytes::Bytes;
    use tokio::time::timeout;
    use vmm::hook::ExitIndex;

    /// The failure bound of every wait: generous, never slept.
    const BOUND: Duration = Duration::from_secs(20);
    const KEY: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    fn identity() -> GuestIdentity {
        GuestIdentity { image: [0x11; 32], memory_bytes: 64 << 20, config: [0x22; 32] }
    }

    fn config() -> ChannelConfig {
        ChannelConfig::new(SharedKey::from_bytes(KEY).unwrap(), identity())
    }

    /// The record at `position`: every kind, deterministic.
    fn record(position: u64) -> Record {
        let exit = ExitIndex(position * 3);
        match position % 4 {
            0 => Record::Clock { exit, ns: position * 1000 },
            1 => Record::Entropy { exit, bytes: Bytes::copy_from_slice(&position.to_le_bytes()) },
            2 => Record::Frame { exit, frame: Bytes::from(vec![u8::try_from(position % 251).unwrap(); 60]) },
            _ => Record::Digest { exit, vcpu: position, devices: !position, memory: position.rotate_left(7) },
        }
    }

    fn batch(first: u64, count: u64) -> Vec<Record> {
        (first..first + count).map(record).collect()
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    /// Connect a primary with `p` to a secondary with `s` over loopback.
    async fn pair(
        p: ChannelConfig,
        s: ChannelConfig,
    ) -> (Result<PrimaryChannel, ChannelError>, Result<SecondaryChannel, ChannelError>) {
        let (listener, addr) = listener().await;
        let secondary = tokio::spawn(async move { SecondaryChannel::accept(&listener, s).await });
        let primary = timeout(BOUND, PrimaryChannel::connect(addr, p)).await.unwrap();
        let secondary = timeout(BOUND, secondary).await.unwrap().unwrap();
        (primary, secondary)
    }

    /// Like [`pair`], but the secondary runs the handshake on the one
    /// connection and reports how it ended, authenticated or not.
    async fn pair_once(
        p: ChannelConfig,
        s: ChannelConfig,
    ) -> (Result<PrimaryChannel, ChannelError>, Result<SecondaryChannel, ChannelError>) {
        let (listener, addr) = listener().await;
        let secondary = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            SecondaryChannel::handshake(stream, s).await
        });
        let primary = timeout(BOUND, PrimaryChannel::connect(addr, p)).await.unwrap();
        let secondary = timeout(BOUND, secondary).await.unwrap().unwrap();
        (primary, secondary)
    }

    async fn wait_acked(primary: &PrimaryChannel, upto: u64) {
        let mut acked = primary.acked();
        timeout(BOUND, acked.wait_for(|acked| acked.0 >= upto)).await.unwrap().unwrap();
    }

    /// Take batches, acking each, until the channel ends; return them and how it ended.
    async fn drain(secondary: &mut SecondaryChannel) -> (Vec<RecordBatch>, Result<(), ChannelError>) {
        let mut batches = Vec::new();
        loop {
            match timeout(BOUND, secondary.recv()).await.expect("the secondary neither received nor failed") {
                Ok(Some(batch)) => {
                    // Fails once the session has failed: the batches that
                    // passed before it are still delivered, but cannot be
                    // acked any more.
                    let _ = secondary.ack(batch.last());
                    batches.push(batch);
                }
                Ok(None) => return (batches, Ok(())),
                Err(error) => return (batches, Err(error)),
            }
        }
    }

    fn positions(batches: &[RecordBatch]) -> Vec<u64> {
        batches.iter().flat_map(|b| (b.first.0..=b.last().0).collect::<Vec<_>>()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handshake_then_100_000_records_in_order_with_cumulative_acks() {
        const N: u64 = 100_000;
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (primary.unwrap(), secondary.unwrap());

        let consumer = tokio::spawn(async move {
            let mut next = 1;
            let mut batches = 0;
            loop {
                let Some(batch) = timeout(BOUND, secondary.recv()).await.unwrap().unwrap() else { break };
                assert_eq!(batch.first, LogPosition(next), "batches arrive in order, without gaps");
                for (position, got) in (next..).zip(&batch.records) {
                    assert_eq!(got, &record(position));
                }
                next = batch.last().0 + 1;
                batches += 1;
                secondary.ack(batch.last()).unwrap();
            }
            (next - 1, batches, secondary)
        });

        // Acks only ever grow, and end at N.
        let mut acked = primary.acked();
        let watcher = tokio::spawn(async move {
            let mut last = LogPosition::NONE;
            while last.0 < N {
                timeout(BOUND, acked.changed()).await.unwrap().unwrap();
                let now = *acked.borrow_and_update();
                assert!(now >= last, "ack went from {last} to {now}");
                last = now;
            }
            last
        });

        // One record per call, as a recorder at each exit would; a flush now
        // and then, as pending outputs would ask.
        for position in 1..=N {
            primary.send_records(LogPosition(position), &[record(position)]).unwrap();
            if position % 997 == 0 {
                primary.flush();
            }
        }
        primary.flush();
        assert_eq!(timeout(BOUND, watcher).await.unwrap().unwrap(), LogPosition(N));
        assert_eq!(primary.unacked_bytes(), 0);
        assert_eq!(primary.unacked_records(), 0);
        primary.shutdown().await.unwrap();

        let (last, batches, mut secondary) = timeout(BOUND, consumer).await.unwrap().unwrap();
        assert_eq!(last, N);
        assert!(batches < N, "records were coalesced into frames ({batches} batches)");
        // The end stays the end.
        assert!(matches!(secondary.recv().await, Ok(None)));
        assert!(secondary.error().is_none());
    }

    /// A secondary that stops reading fills the socket: flushes from a
    /// plain thread then write what fits and return at once, and the writer
    /// task finishes the rest, in order, once the secondary reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_socket_leaves_the_rest_to_the_writer_in_order() {
        const N: u64 = 20_000;
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (Arc::new(primary.unwrap()), secondary.unwrap());
        let sender = primary.clone();
        let big = |position: u64| Record::Frame {
            exit: ExitIndex(position),
            frame: Bytes::from(vec![u8::try_from(position % 251).unwrap(); 1500]),
        };
        // 30 MB, far more than the socket buffers and the secondary's queue.
        let feeder = std::thread::spawn(move || {
            for position in 1..=N {
                let started = std::time::Instant::now();
                sender.send_records(LogPosition(position), &[big(position)]).unwrap();
                sender.flush();
                assert!(started.elapsed() < BOUND, "a flush blocked on a full socket");
            }
        });
        timeout(BOUND, tokio::task::spawn_blocking(move || feeder.join().unwrap())).await.unwrap().unwrap();
        let mut next = 1;
        while next <= N {
            let batch = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
            assert_eq!(batch.first, LogPosition(next), "in order, without gaps");
            for (position, got) in (next..).zip(&batch.records) {
                assert_eq!(got, &big(position));
            }
            next = batch.last().0 + 1;
            secondary.ack(batch.last()).unwrap();
        }
        assert!(primary.error().is_none());
    }

    #[tokio::test]
    async fn the_ack_callback_sees_each_ack_before_the_watch_does() {
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (primary.unwrap(), secondary.unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut acked = primary.acked();
        let (log, watch) = (seen.clone(), acked.clone());
        assert!(primary.on_ack(move |upto| {
            // The watch has not moved yet: whoever waits on it finds what
            // the callback did done.
            assert!(*watch.borrow() < upto);
            log.lock().unwrap().push(upto.0);
        }));
        assert!(!primary.on_ack(|_| {}), "only the first callback is kept");
        for (first, count) in [(1, 3), (4, 5), (9, 2)] {
            primary.send_records(LogPosition(first), &batch(first, count)).unwrap();
            primary.flush();
            let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
            secondary.ack(got.last()).unwrap();
            let last = got.last();
            timeout(BOUND, acked.wait_for(|a| *a >= last)).await.unwrap().unwrap();
        }
        assert_eq!(*seen.lock().unwrap(), [3, 8, 10]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_thread_outside_the_runtime_hands_records_over() {
        // The vCPU thread is a plain thread: no runtime, no await.
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (Arc::new(primary.unwrap()), secondary.unwrap());
        let vcpu = {
            let primary = Arc::clone(&primary);
            std::thread::spawn(move || {
                for position in 1..=1000 {
                    primary.send_records(LogPosition(position), &[record(position)]).unwrap();
                }
                primary.flush();
                *primary.acked().borrow()
            })
        };
        let mut received = Vec::new();
        while received.len() < 1000 {
            let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
            secondary.ack(got.last()).unwrap();
            received.extend(got.records);
        }
        assert_eq!(received, batch(1, 1000));
        vcpu.join().unwrap();
        wait_acked(&primary, 1000).await;
    }

    #[tokio::test]
    async fn the_flush_delay_sends_records_without_a_flush() {
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (primary.unwrap(), secondary.unwrap());
        primary.send_records(LogPosition(1), &batch(1, 3)).unwrap();
        let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, RecordBatch { first: LogPosition(1), records: batch(1, 3) });
    }

    #[tokio::test]
    async fn released_reports_reach_the_secondary_and_follow_the_acks() {
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (primary.unwrap(), secondary.unwrap());
        primary.send_records(LogPosition(1), &batch(1, 5)).unwrap();
        primary.flush();
        assert!(matches!(
            primary.send_released(LogPosition(1)),
            Err(ChannelError::ReleasedBeyondAcked { upto: LogPosition(1), acked: LogPosition::NONE })
        ));
        let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
        assert!(matches!(
            secondary.ack(LogPosition(6)),
            Err(ChannelError::AckBeyondReceived { upto: LogPosition(6), received: LogPosition(5) })
        ));
        secondary.acker().ack(got.last()).unwrap();
        wait_acked(&primary, 5).await;
        primary.send_released(LogPosition(4)).unwrap();
        let mut released = secondary.released();
        timeout(BOUND, released.wait_for(|r| *r == LogPosition(4))).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_primary_is_told_when_the_secondary_falls_too_far_behind() {
        let mut p = config();
        p.max_unacked_bytes = 10_000;
        let (primary, secondary) = pair(p, config()).await;
        let (primary, mut secondary) = (primary.unwrap(), secondary.unwrap());

        // The secondary takes nothing: the unacknowledged bytes grow until
        // a batch is refused, without send_records ever blocking.
        let mut next = 1;
        let refused = loop {
            match primary.send_records(LogPosition(next), &batch(next, 10)) {
                Ok(()) => next += 10,
                Err(error) => break error,
            }
            assert!(next < 10_000, "never refused");
        };
        let ChannelError::Backpressure { unacked_bytes, batch_bytes, limit } = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(limit, 10_000);
        assert!(unacked_bytes <= limit && unacked_bytes + batch_bytes > limit);
        assert_eq!(primary.unacked_bytes(), unacked_bytes);
        assert_eq!(primary.unacked_records(), next - 1);
        // Nothing of the refused batch was queued: a gap would be refused.
        assert!(matches!(
            primary.send_records(LogPosition(next + 10), &batch(next + 10, 1)),
            Err(ChannelError::OutOfOrder { .. })
        ));

        // The secondary catches up; the same batch goes through.
        primary.flush();
        let mut received = 0;
        while received < next - 1 {
            let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
            secondary.ack(got.last()).unwrap();
            received = got.last().0;
        }
        wait_acked(&primary, next - 1).await;
        assert_eq!(primary.unacked_bytes(), 0);
        primary.send_records(LogPosition(next), &batch(next, 10)).unwrap();
        primary.flush();
        let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(got, RecordBatch { first: LogPosition(next), records: batch(next, 10) });
        assert!(primary.error().is_none());
    }

    #[tokio::test]
    async fn send_records_refuses_gaps_overlaps_and_oversize_records() {
        let (primary, _secondary) = pair(config(), config()).await;
        let primary = primary.unwrap();
        assert!(matches!(
            primary.send_records(LogPosition::NONE, &batch(1, 1)),
            Err(ChannelError::OutOfOrder { expected: LogPosition(1), found: LogPosition(0) })
        ));
        // An empty batch is nothing.
        primary.send_records(LogPosition(77), &[]).unwrap();
        // The first batch may start later than 1 (a log after a repair).
        primary.send_records(LogPosition(40), &batch(40, 2)).unwrap();
        for wrong in [41, 43] {
            assert!(matches!(
                primary.send_records(LogPosition(wrong), &batch(wrong, 1)),
                Err(ChannelError::OutOfOrder { expected: LogPosition(42), .. })
            ));
        }
        let big = Record::Entropy { exit: ExitIndex(1), bytes: vec![0; crate::record::MAX_ENTROPY_LEN + 1].into() };
        assert!(matches!(
            primary.send_records(LogPosition(42), &[big]),
            Err(ChannelError::Encode(FrameError::FieldTooLarge { .. }))
        ));
        primary.send_records(LogPosition(42), &batch(42, 1)).unwrap();
        assert!(primary.error().is_none());
    }

    #[tokio::test]
    async fn a_wrong_key_is_refused_on_both_ends() {
        let mut s = config();
        s.key = SharedKey::from_bytes(crate::key::generate()).unwrap();
        let (primary, secondary) = pair_once(config(), s).await;
        assert!(matches!(primary, Err(ChannelError::Authentication)), "{primary:?}");
        assert!(matches!(secondary, Err(ChannelError::Authentication)), "{secondary:?}");
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_on_both_ends() {
        let mut p = config();
        // A primary of the version before the smaller log (issue 16).
        p.version = 1;
        let (primary, secondary) = pair_once(p, config()).await;
        assert!(matches!(primary, Err(ChannelError::Version { ours: 1, theirs: 2 })), "{primary:?}");
        assert!(matches!(secondary, Err(ChannelError::Version { ours: 2, theirs: 1 })), "{secondary:?}");
    }

    #[tokio::test]
    async fn a_different_guest_is_refused_on_both_ends_naming_the_field() {
        type Change = fn(&mut GuestIdentity);
        let cases: [(IdentityField, Change); 3] = [
            (IdentityField::Image, |id| id.image[31] ^= 1),
            (IdentityField::MemorySize, |id| id.memory_bytes = 128 << 20),
            (IdentityField::Config, |id| id.config = [0x33; 32]),
        ];
        for (field, change) in cases {
            let mut s = config();
            change(&mut s.identity);
            let (primary, secondary) = pair(config(), s.clone()).await;
            let ours = config().identity;
            let theirs = s.identity;
            for (side, result, here, there) in
                [("primary", primary.map(drop), ours, theirs), ("secondary", secondary.map(drop), theirs, ours)]
            {
                match result {
                    Err(ChannelError::IdentityMismatch { field: f, ours, theirs }) => {
                        assert_eq!(f, field, "{side}");
                        let value = |id: GuestIdentity| match field {
                            IdentityField::Image => IdentityValue::Digest(id.image),
                            IdentityField::MemorySize => IdentityValue::Bytes(id.memory_bytes),
                            IdentityField::Config => IdentityValue::Digest(id.config),
                        };
                        assert_eq!((ours, theirs), (value(here), value(there)), "{side}");
                    }
                    other => panic!("{side}, {field}: {other:?}"),
                }
            }
        }
        let error = ChannelError::IdentityMismatch {
            field: IdentityField::MemorySize,
            ours: IdentityValue::Bytes(64 << 20),
            theirs: IdentityValue::Bytes(128 << 20),
        };
        assert_eq!(
            error.to_string(),
            "the peer runs a different guest: the memory size (--memory-mib) is 64 MiB here and 128 MiB there"
        );
        let error = FrameError::BadMagic { found: *b"HT" };
        assert_eq!(
            error.to_string(),
            "the peer does not speak ftvm's logging protocol (it began with \"HT\": another program on that port?)"
        );
    }

    #[tokio::test]
    async fn a_replayed_hello_reply_fails_authentication() {
        // A fake secondary with the right key answers with a reply recorded
        // from an earlier session: its proof covers another primary nonce.
        let (listener, addr) = listener().await;
        let fake = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let key = config().key;
            let mut wire = Wire::new(
                stream,
                handshake_key(&key, Direction::SecondaryToPrimary),
                handshake_key(&key, Direction::PrimaryToSecondary),
                PROTOCOL_VERSION,
            );
            let Message::Hello(_) = wire.receive().await.unwrap() else { panic!("no hello") };
            let nonce_s = [7; 32];
            let proof = secondary_proof(&key, &[6; 32], &nonce_s);
            wire.send(&Message::HelloReply(HelloReply { nonce: nonce_s, identity: identity(), proof })).await.unwrap();
            wire
        });
        let primary = timeout(BOUND, PrimaryChannel::connect(addr, config())).await.unwrap();
        assert!(matches!(primary, Err(ChannelError::Authentication)), "{primary:?}");
        drop(fake.await.unwrap());
    }

    #[tokio::test]
    async fn records_instead_of_the_auth_proof_are_refused_and_never_delivered() {
        let (listener, addr) = listener().await;
        let secondary = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            SecondaryChannel::handshake(stream, config()).await
        });
        let key = config().key;
        let mut wire = Wire::new(
            TcpStream::connect(addr).await.unwrap(),
            handshake_key(&key, Direction::PrimaryToSecondary),
            handshake_key(&key, Direction::SecondaryToPrimary),
            PROTOCOL_VERSION,
        );
        let nonce_p = [5; 32];
        let hello = Hello { version: PROTOCOL_VERSION, nonce: nonce_p, identity: identity() };
        wire.send(&Message::Hello(hello)).await.unwrap();
        let Message::HelloReply(reply) = wire.receive().await.unwrap() else { panic!("no reply") };
        let (p2s, _) = session_keys(&key, &nonce_p, &reply.nonce);
        wire.encoder.set_key(p2s);
        wire.send(&Message::Records { first: LogPosition(1), records: batch(1, 3) }).await.unwrap();
        let secondary = timeout(BOUND, secondary).await.unwrap().unwrap();
        assert!(matches!(secondary, Err(ChannelError::Protocol { .. })), "{secondary:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_the_handshake_out() {
        let (listener, addr) = listener().await;
        let mut s = config();
        s.handshake_timeout = Duration::from_millis(200);
        let secondary = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            SecondaryChannel::handshake(stream, s).await
        });
        let _silent = TcpStream::connect(addr).await.unwrap();
        let secondary = timeout(BOUND, secondary).await.unwrap().unwrap();
        assert!(matches!(secondary, Err(ChannelError::HandshakeTimeout { .. })), "{secondary:?}");
    }

    #[tokio::test]
    async fn either_end_reports_the_other_going_away() {
        // The primary goes: the secondary gets what was sent, then Closed.
        let (primary, secondary) = pair(config(), config()).await;
        let (primary, mut secondary) = (primary.unwrap(), secondary.unwrap());
        primary.send_records(LogPosition(1), &batch(1, 4)).unwrap();
        drop(primary);
        let (batches, end) = drain(&mut secondary).await;
        assert_eq!(positions(&batches), [1, 2, 3, 4]);
        assert!(matches!(end, Err(ChannelError::Closed)), "{end:?}");
        assert!(matches!(secondary.recv().await, Err(ChannelError::Closed)));

        // The secondary goes: the primary's channel fails, and says so.
        let (primary, secondary) = pair(config(), config()).await;
        let primary = primary.unwrap();
        drop(secondary);
        let error = timeout(BOUND, primary.failed()).await.unwrap();
        assert!(matches!(error, ChannelError::Closed | ChannelError::Io(_)), "{error:?}");
        assert!(primary.send_records(LogPosition(1), &batch(1, 1)).is_err());
    }

    // --- hostile peers of a waiting secondary (issue 12, items 2 and 3) ---

    /// A Hello frame as the primary sends it, MACed with `key`'s handshake
    /// key, speaking `version`.
    fn hello_bytes(key: &SharedKey, version: u16, identity: GuestIdentity) -> Vec<u8> {
        let mut out = BytesMut::new();
        FrameEncoder::with_version(handshake_key(key, Direction::PrimaryToSecondary), version)
            .encode(&Message::Hello(Hello { version, nonce: [9; 32], identity }), &mut out)
            .unwrap();
        out.to_vec()
    }

    /// What a real primary sent over a whole earlier session (Hello,
    /// AuthProof, records, Shutdown), recorded by a proxy on the way.
    async fn recorded_session() -> Vec<u8> {
        let (s_listener, s_addr) = listener().await;
        let (p_listener, p_addr) = listener().await;
        let secondary = tokio::spawn(async move { SecondaryChannel::accept(&s_listener, config()).await });
        let recorder = tokio::spawn(async move {
            let (from_primary, _) = p_listener.accept().await.unwrap();
            let to_secondary = TcpStream::connect(s_addr).await.unwrap();
            let (mut p_read, mut p_write) = from_primary.into_split();
            let (mut s_read, mut s_write) = to_secondary.into_split();
            let back = tokio::spawn(async move { tokio::io::copy(&mut s_read, &mut p_write).await });
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = p_read.read(&mut buf).await.unwrap_or(0);
                if n == 0 || s_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            let _ = s_write.shutdown().await;
            back.abort();
            seen
        });
        let primary = timeout(BOUND, PrimaryChannel::connect(p_addr, config())).await.unwrap().unwrap();
        let mut secondary = timeout(BOUND, secondary).await.unwrap().unwrap().unwrap();
        primary.send_records(LogPosition(1), &batch(1, 3)).unwrap();
        primary.flush();
        let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!(got.records, batch(1, 3));
        primary.shutdown().await.unwrap();
        timeout(BOUND, recorder).await.unwrap().unwrap()
    }

    /// Read until the other end closes (or resets) the connection.
    async fn until_closed(stream: &mut TcpStream) {
        let mut buf = [0u8; 1024];
        while let Ok(n) = timeout(BOUND, stream.read(&mut buf)).await.expect("the secondary kept a bad peer") {
            if n == 0 {
                break;
            }
        }
    }

    /// A real primary pairs with the secondary behind `accept`, and the
    /// session carries records.
    async fn a_real_primary_pairs(addr: SocketAddr, accept: JoinHandle<Result<SecondaryChannel, ChannelError>>) {
        let primary = timeout(BOUND, PrimaryChannel::connect(addr, config())).await.unwrap().unwrap();
        let mut secondary = timeout(BOUND, accept).await.unwrap().unwrap().unwrap();
        primary.send_records(LogPosition(1), &batch(1, 5)).unwrap();
        primary.flush();
        let got = timeout(BOUND, secondary.recv()).await.unwrap().unwrap().unwrap();
        assert_eq!((got.first, got.records), (LogPosition(1), batch(1, 5)));
    }

    #[tokio::test]
    async fn nothing_unauthenticated_ends_the_waiting_and_a_real_primary_then_pairs() {
        let (listener, addr) = listener().await;
        let mut s = config();
        s.handshake_timeout = Duration::from_millis(300);
        let accept = tokio::spawn(async move { SecondaryChannel::accept(&listener, s).await });

        let key = config().key;
        let other_key = SharedKey::from_bytes(crate::key::generate()).unwrap();
        let good = hello_bytes(&key, PROTOCOL_VERSION, identity());
        let other_guest = GuestIdentity { memory_bytes: 128 << 20, ..identity() };
        let old_hello_of_another_guest = hello_bytes(&key, PROTOCOL_VERSION, other_guest);
        let mut refusal = BytesMut::new();
        FrameEncoder::new(handshake_key(&key, Direction::PrimaryToSecondary))
            .encode(&Message::Refused(RefuseReason::IdentityMismatch { field: IdentityField::Image }), &mut refusal)
            .unwrap();
        // A Hello of another guest, then a refusal naming the difference
        // that is not under this session's key (a recorded one).
        // Its frame 1, under the handshake key: what an attacker without
        // this session's key can send at best.
        let mut spliced = old_hello_of_another_guest.clone();
        let mut encoder = FrameEncoder::new(handshake_key(&key, Direction::PrimaryToSecondary));
        encoder.encode(&Message::Shutdown, &mut BytesMut::new()).unwrap();
        let mut tail = BytesMut::new();
        let mismatch = Message::Refused(RefuseReason::IdentityMismatch { field: IdentityField::MemorySize });
        encoder.encode(&mismatch, &mut tail).unwrap();
        spliced.extend_from_slice(&tail);
        let mut oversize = Vec::from(&good[..14]);
        oversize.extend_from_slice(&u32::try_from(crate::frame::MAX_PAYLOAD).unwrap().to_le_bytes());
        oversize.resize(64 * 1024, 0x55);
        let recorded = recorded_session().await;

        // (what, bytes sent, close the sending side after them)
        let variants: Vec<(&str, Vec<u8>, bool)> = vec![
            ("the issue's four bytes", b"fL\x02\x00".to_vec(), true),
            ("the four bytes, held open", b"fL\x02\x00".to_vec(), false),
            ("a whole hello of another version", hello_bytes(&key, 2, identity()), false),
            ("bad magic", b"GET / HTTP/1.1\r\n\r\n".to_vec(), false),
            ("a truncated hello", good[..good.len() / 2].to_vec(), true),
            ("a hello MACed with another key", hello_bytes(&other_key, PROTOCOL_VERSION, identity()), false),
            ("a replayed hello of another guest, then silence", old_hello_of_another_guest, false),
            ("a replayed hello of another guest, then a recorded refusal", spliced, false),
            ("a refusal instead of a hello", refusal.to_vec(), false),
            ("an oversize frame", oversize, false),
            ("an earlier session replayed whole", recorded, false),
            ("silence", Vec::new(), false),
            ("a connection closed at once", Vec::new(), true),
        ];
        for (what, bytes, close) in variants {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // The secondary may close first: a write error is fine.
            let _ = stream.write_all(&bytes).await;
            if close {
                let _ = stream.shutdown().await;
            }
            until_closed(&mut stream).await;
            assert!(!accept.is_finished(), "{what}: accept returned {:?}", accept.await);
        }
        a_real_primary_pairs(addr, accept).await;
    }

    #[tokio::test]
    async fn random_and_mutated_handshakes_never_end_the_waiting() {
        let (listener, addr) = listener().await;
        let mut s = config();
        s.handshake_timeout = Duration::from_millis(300);
        let accept = tokio::spawn(async move { SecondaryChannel::accept(&listener, s).await });
        let good = hello_bytes(&config().key, PROTOCOL_VERSION, identity());
        let recorded = recorded_session().await;
        // A deterministic xorshift: a failure reproduces.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..300u64 {
            let below = |n: usize, r: u64| usize::try_from(r % u64::try_from(n).unwrap()).unwrap();
            let bytes: Vec<u8> = match case % 4 {
                // Random bytes, sometimes behind the right magic and version.
                0 => {
                    let mut b: Vec<u8> = (0..below(200, next())).map(|_| next().to_le_bytes()[0]).collect();
                    if next() % 2 == 0 {
                        b.splice(0..0, [b'f', b'L', 1, 0]);
                    }
                    b
                }
                // The good Hello with one byte changed.
                1 => {
                    let mut b = good.clone();
                    let at = below(b.len(), next());
                    b[at] ^= u8::try_from(1 + next() % 255).unwrap();
                    b
                }
                // The good Hello cut short.
                2 => good[..below(good.len(), next())].to_vec(),
                // An earlier session, one byte changed, or cut short.
                _ => {
                    let mut b = recorded.clone();
                    let at = below(b.len(), next());
                    if next() % 2 == 0 {
                        b[at] ^= u8::try_from(1 + next() % 255).unwrap();
                    } else {
                        b.truncate(at);
                    }
                    b
                }
            };
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(&bytes).await;
            let _ = stream.shutdown().await;
            until_closed(&mut stream).await;
            assert!(!accept.is_finished(), "case {case} ({bytes:02x?}): accept returned {:?}", accept.await);
        }
        a_real_primary_pairs(addr, accept).await;
    }

    #[tokio::test]
    async fn a_primary_of_another_guest_is_refused_only_once_it_proved_the_key() {
        // An unauthenticated Hello of another guest is not believed (above);
        // a real primary of another guest ends the waiting with the mismatch.
        let (listener, addr) = listener().await;
        let accept = tokio::spawn(async move { SecondaryChannel::accept(&listener, config()).await });
        let mut p = config();
        p.identity.config = [0x44; 32];
        let primary = timeout(BOUND, PrimaryChannel::connect(addr, p)).await.unwrap();
        let secondary = timeout(BOUND, accept).await.unwrap().unwrap();
        for result in [primary.map(drop), secondary.map(drop)] {
            let error = result.unwrap_err();
            assert!(matches!(error, ChannelError::IdentityMismatch { field: IdentityField::Config, .. }), "{error:?}");
            assert!(!error.is_retryable());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_hundred_idle_connections_do_not_keep_a_real_primary_out() {
        let (listener, addr) = listener().await;
        // The default handshake timeout (5 s), as a real secondary runs.
        let accept = tokio::spawn(async move { SecondaryChannel::accept(&listener, config()).await });
        let mut idle = Vec::new();
        for i in 0..500 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // Every fifth one sends a replayed Hello (it passes the
            // handshake MAC) and then stalls.
            if i % 5 == 0 {
                stream.write_all(&hello_bytes(&config().key, PROTOCOL_VERSION, identity())).await.unwrap();
            }
            idle.push(stream);
        }
        let started = std::time::Instant::now();
        a_real_primary_pairs(addr, accept).await;
        let took = started.elapsed();
        eprintln!("paired {took:?} after connecting, with 500 idle connections held open");
        // Aimed at well under a second; generous for a loaded machine.
        assert!(took < Duration::from_secs(3), "the real primary waited {took:?}");
        drop(idle);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_new_connections_does_not_keep_a_real_primary_out() {
        let (listener, addr) = listener().await;
        let accept = tokio::spawn(async move { SecondaryChannel::accept(&listener, config()).await });
        let (stop, mut stopped) = watch::channel(false);
        let (flooding, is_flooding) = oneshot::channel();
        let flood = tokio::spawn(async move {
            let mut held = Vec::new();
            let mut flooding = Some(flooding);
            while !*stopped.borrow_and_update() && held.len() < 3000 {
                tokio::select! {
                    stream = TcpStream::connect(addr) => match stream {
                        Ok(stream) => held.push(stream),
                        Err(_) => break,
                    },
                    _ = stopped.changed() => break,
                }
                if held.len() == 200 {
                    let _ = flooding.take().map(|tx| tx.send(()));
                }
            }
            held.len()
        });
        // The real primary comes while the flood is on.
        timeout(BOUND, is_flooding).await.unwrap().unwrap();
        let started = std::time::Instant::now();
        a_real_primary_pairs(addr, accept).await;
        let took = started.elapsed();
        stop.send_replace(true);
        let opened = timeout(BOUND, flood).await.unwrap().unwrap();
        eprintln!("paired {took:?} after connecting, during a flood of {opened} new connections");
        assert!(opened > 0);
        assert!(took < Duration::from_secs(3), "the real primary waited {took:?} ({opened} attacker connections)");
    }

    #[tokio::test]
    async fn a_primary_may_retry_whatever_an_unproven_secondary_answers() {
        let key = config().key;
        let other_key = SharedKey::from_bytes(crate::key::generate()).unwrap();
        let reply = |key: &SharedKey| {
            let mut out = BytesMut::new();
            let proof = secondary_proof(key, &[1; 32], &[2; 32]);
            FrameEncoder::new(handshake_key(key, Direction::SecondaryToPrimary))
                .encode(&Message::HelloReply(HelloReply { nonce: [2; 32], identity: identity(), proof }), &mut out)
                .unwrap();
            out.to_vec()
        };
        let refusal = |reason| {
            let mut out = BytesMut::new();
            FrameEncoder::new(handshake_key(&key, Direction::SecondaryToPrimary))
                .encode(&Message::Refused(reason), &mut out)
                .unwrap();
            out.to_vec()
        };
        let answers: Vec<(&str, Vec<u8>)> = vec![
            ("another version", b"fL\x02\x00".to_vec()),
            ("garbage", b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
            ("a reply under another key", reply(&other_key)),
            ("a replayed reply", reply(&key)),
            (
                "an unproven refusal naming the guest",
                refusal(RefuseReason::IdentityMismatch { field: IdentityField::Image }),
            ),
            ("an unproven refusal naming the version", refusal(RefuseReason::UnsupportedVersion { supported: 7 })),
            ("a close", Vec::new()),
        ];
        for (what, answer) in answers {
            let (listener, addr) = listener().await;
            let fake = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut hello = [0u8; 64];
                let _ = stream.read(&mut hello).await;
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
                until_closed(&mut stream).await;
            });
            let error = timeout(BOUND, PrimaryChannel::connect(addr, config())).await.unwrap().unwrap_err();
            assert!(error.is_retryable(), "{what}: {error:?}");
            assert!(!matches!(error, ChannelError::IdentityMismatch { .. }), "{what}: {error:?}");
            timeout(BOUND, fake).await.unwrap().unwrap();
        }
    }

    // --- a man in the middle ---

    #[derive(Clone, Copy, Debug)]
    enum Tamper {
        /// Flip one payload byte.
        Corrupt,
        /// Flip one payload byte and fix the CRC.
        Forge,
        /// Send the frame twice.
        Duplicate,
        /// Send the next frame before this one.
        Reorder,
        /// Leave the frame out.
        Drop,
        /// Send half the frame, then close.
        Truncate,
    }

    /// Forward primary → secondary frame by frame, tampering with frame
    /// `at` as told; secondary → primary as it is.
    async fn proxy(listener: TcpListener, secondary: SocketAddr, tamper: Tamper, at: u64) {
        let (from_primary, _) = listener.accept().await.unwrap();
        let to_secondary = TcpStream::connect(secondary).await.unwrap();
        let (mut p_read, mut p_write) = from_primary.into_split();
        let (mut s_read, mut s_write) = to_secondary.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut s_read, &mut p_write).await;
        });
        let mut buf = BytesMut::new();
        let mut index = 0u64;
        let mut held: Option<Bytes> = None;
        loop {
            while buf.len() >= HEADER_LEN {
                let len = u32::from_le_bytes(buf[14..18].try_into().unwrap());
                let total = usize::try_from(len).unwrap() + FRAME_OVERHEAD;
                if buf.len() < total {
                    break;
                }
                let frame = buf.split_to(total).freeze();
                let this = index;
                index += 1;
                let mut out = Vec::new();
                match (tamper, this) {
                    (Tamper::Corrupt, n) if n == at => {
                        let mut bad = frame.to_vec();
                        bad[HEADER_LEN + 5] ^= 0x10;
                        out.push(Bytes::from(bad));
                    }
                    (Tamper::Forge, n) if n == at => {
                        let mut bad = frame.to_vec();
                        bad[HEADER_LEN + 5] ^= 0x10;
                        let signed = bad.len() - FRAME_OVERHEAD + HEADER_LEN;
                        let crc = crc32c::crc32c(&bad[..signed]).to_le_bytes();
                        bad[signed..signed + 4].copy_from_slice(&crc);
                        out.push(Bytes::from(bad));
                    }
                    (Tamper::Duplicate, n) if n == at => out.extend([frame.clone(), frame]),
                    (Tamper::Reorder, n) if n == at => held = Some(frame),
                    (Tamper::Reorder, n) if n == at + 1 => out.extend([frame].into_iter().chain(held.take())),
                    (Tamper::Drop, n) if n == at => {}
                    (Tamper::Truncate, n) if n == at => {
                        p_write_half(&mut s_write, &frame[..frame.len() / 2]).await;
                        let _ = s_write.shutdown().await;
                        back.abort();
                        return;
                    }
                    _ => out.push(frame),
                }
                for frame in out {
                    p_write_half(&mut s_write, &frame).await;
                }
            }
            if p_read.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                let _ = s_write.shutdown().await;
                let _ = back.await;
                return;
            }
        }
    }

    async fn p_write_half(write: &mut OwnedWriteHalf, bytes: &[u8]) {
        let _ = write.write_all(bytes).await;
    }

    /// Frames 0 and 1 are the primary's Hello and AuthProof; records start
    /// at frame 2. Batches of 10 records each, one frame each: frames 2 and
    /// 3 (positions 1–20) are acked before the tampered frame 4 (21–30) and
    /// the frames after it (31–50) are sent.
    async fn tampered_run(tamper: Tamper) -> (Vec<u64>, ChannelError, PrimaryChannel) {
        let (s_listener, s_addr) = listener().await;
        let (p_listener, p_addr) = listener().await;
        let secondary = tokio::spawn(async move { SecondaryChannel::accept(&s_listener, config()).await });
        tokio::spawn(proxy(p_listener, s_addr, tamper, 4));
        let primary = timeout(BOUND, PrimaryChannel::connect(p_addr, config())).await.unwrap().unwrap();
        let mut secondary = timeout(BOUND, secondary).await.unwrap().unwrap().unwrap();
        let consumer = tokio::spawn(async move { drain(&mut secondary).await });

        for k in 0..2 {
            primary.send_records(LogPosition(10 * k + 1), &batch(10 * k + 1, 10)).unwrap();
            primary.flush();
            wait_acked(&primary, 10 * (k + 1)).await;
        }
        for k in 2..5 {
            primary.send_records(LogPosition(10 * k + 1), &batch(10 * k + 1, 10)).unwrap();
            primary.flush();
        }
        let (batches, end) = timeout(BOUND, consumer).await.unwrap().unwrap();
        // Every record delivered is the one sent at its position.
        for b in &batches {
            assert_eq!(b.records, batch(b.first.0, b.records.len().try_into().unwrap()));
        }
        (positions(&batches), end.unwrap_err(), primary)
    }

    #[tokio::test]
    async fn a_corrupted_byte_is_refused_by_its_crc() {
        let (delivered, error, _) = tampered_run(Tamper::Corrupt).await;
        assert_eq!(delivered, (1..=20).collect::<Vec<_>>());
        assert!(matches!(error, ChannelError::Frame(FrameError::CrcMismatch { seq: 4, .. })), "{error:?}");
    }

    #[tokio::test]
    async fn a_forged_frame_is_refused_by_its_mac() {
        let (delivered, error, _) = tampered_run(Tamper::Forge).await;
        assert_eq!(delivered, (1..=20).collect::<Vec<_>>());
        assert!(matches!(error, ChannelError::Frame(FrameError::BadMac { seq: 4 })), "{error:?}");
    }

    #[tokio::test]
    async fn a_duplicated_frame_is_refused() {
        let (delivered, error, _) = tampered_run(Tamper::Duplicate).await;
        // The first copy was good and is delivered; the second is not.
        assert_eq!(delivered, (1..=30).collect::<Vec<_>>());
        assert!(matches!(error, ChannelError::Frame(FrameError::OutOfSequence { expected: 5, found: 4 })), "{error:?}");
    }

    #[tokio::test]
    async fn reordered_frames_are_refused() {
        let (delivered, error, _) = tampered_run(Tamper::Reorder).await;
        assert_eq!(delivered, (1..=20).collect::<Vec<_>>());
        assert!(matches!(error, ChannelError::Frame(FrameError::OutOfSequence { expected: 4, found: 5 })), "{error:?}");
    }

    #[tokio::test]
    async fn a_dropped_frame_is_refused() {
        let (delivered, error, _) = tampered_run(Tamper::Drop).await;
        assert_eq!(delivered, (1..=20).collect::<Vec<_>>());
        assert!(matches!(error, ChannelError::Frame(FrameError::OutOfSequence { expected: 4, found: 5 })), "{error:?}");
    }

    #[tokio::test]
    async fn a_truncated_stream_is_refused() {
        let (delivered, error, primary) = tampered_run(Tamper::Truncate).await;
        assert_eq!(delivered, (1..=20).collect::<Vec<_>>());
        assert!(matches!(error, ChannelError::Frame(FrameError::Truncated { .. })), "{error:?}");
        // The primary sees its connection go too.
        let error = timeout(BOUND, primary.failed()).await.unwrap();
        assert!(matches!(error, ChannelError::Closed | ChannelError::Io(_)), "{error:?}");
    }
}
