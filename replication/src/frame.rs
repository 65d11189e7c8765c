//! The logging channel's wire format: versioned, length-delimited,
//! CRC-checked and MACed frames, each carrying a batch of consecutive log
//! records or one control message.
//!
//! # Frame layout
//!
//! All integers are little-endian.
//!
//! | offset        | size  | field                                                        |
//! | ------------- | ----- | ------------------------------------------------------------ |
//! | 0             | 2     | magic, [`MAGIC`] (`"fL"`)                                    |
//! | 2             | 2     | protocol version, [`PROTOCOL_VERSION`]                       |
//! | 4             | 1     | frame kind ([`FrameKind`])                                   |
//! | 5             | 1     | flags; none are defined in version 1, so it must be 0        |
//! | 6             | 8     | frame sequence number: 0, 1, 2 … per direction and session   |
//! | 14            | 4     | payload length `n`, at most [`MAX_PAYLOAD`]                  |
//! | 18            | n     | payload (below)                                              |
//! | 18 + n        | 4     | CRC32C (Castagnoli) of bytes `0 .. 18 + n`                   |
//! | 22 + n        | 16    | HMAC-SHA256 of bytes `0 .. 22 + n`, first 16 bytes           |
//!
//! Payloads by kind:
//!
//! | kind             | payload                                                                     |
//! | ---------------- | --------------------------------------------------------------------------- |
//! | 1 `Records`      | first position u64 (≥ 1), count u32 (≥ 1), then `count` records             |
//! | 2 `Ack`          | position u64: highest record the secondary received and stored              |
//! | 3 `Released`     | position u64: the primary released every output up to here                 |
//! | 4 `Hello`        | version u16, nonce \[32\], identity (image \[32\], memory bytes u64, config \[32\]) |
//! | 5 `HelloReply`   | nonce \[32\], identity (as in `Hello`), proof \[32\]                        |
//! | 6 `AuthProof`    | proof \[32\]                                                                |
//! | 7 `Shutdown`     | empty: the sender ends the session on purpose                               |
//! | 8                | reserved for heartbeats; refused as [`FrameError::UnknownKind`] in version 1 |
//! | 9 `Refused`      | reason u8 (1 authentication, 2 version + supported u16, 3 identity + field u8, 4 protocol) |
//!
//! # Records (version 2)
//!
//! A `Records` payload is small because most of a record is what the
//! previous ones already said. Both ends of a session keep the same
//! *context*, updated record by record in log order (the channel is one
//! ordered stream, so the decoder sees exactly what the encoder wrote): the
//! position the next frame starts at, the previous record's exit index, the
//! previous clock reading, and [`REF_SLOTS`] reference frames. `varint` is
//! LEB128 (7 bits a byte, low first, at most 10 bytes); `zigzag` maps a
//! signed difference to an unsigned one (0, -1, 1, -2 … → 0, 1, 2, 3 …);
//! differences wrap modulo 2^64, so any values round-trip.
//!
//! The payload: first position as varint zigzag(first − expected first),
//! count as varint (≥ 1), then `count` records. A record is its kind byte
//! ([`RecordKind`]), varint zigzag(exit − previous exit), then:
//!
//! - `Clock`: varint zigzag(ns − previous ns);
//! - `Entropy`: varint length (≤ [`MAX_ENTROPY_LEN`]) and the bytes;
//! - `Frame`: a mode byte: 0 an empty frame (no frame arrived); 1 a literal
//!   frame: varint length (≤ [`MAX_FRAME_LEN`]) and the bytes; 2 the same
//!   with a slot byte before the length, the frame then kept in that slot;
//!   3 a delta: slot byte, varint length, then runs until the length is
//!   covered, each varint *copy* (bytes taken from the slot's frame at the
//!   same offset) and varint *literal* (bytes that follow); the result is
//!   kept in the slot. Modes 2 and 3 carry frames of at most
//!   [`REF_MAX_LEN`] bytes (what a kept reference may cost is bounded);
//!   a run may neither copy past the reference or the frame, nor be empty;
//! - `Digest`: vcpu, devices, memory (three u64);
//! - `Shutdown` and `Barrier`: nothing;
//! - `Fault`: the fault's kind (u8, [`FaultKind`](crate::record::FaultKind)).
//!
//! The encoder picks a frame's slot from its flow (addresses and ports of an
//! IPv4 packet, else the Ethernet header) and length, and sends a delta only
//! where it is shorter than the literal: successive requests on one
//! connection differ in a few header bytes (identification, checksums,
//! sequence numbers, timestamps), so a kvstore request takes about a third
//! of its length. A truncated or overlong varint, a run out of bounds, an
//! unknown mode are each one [`FrameError::Malformed`] that names it.
//!
//! # What the decoder checks, in order
//!
//! Magic and version first (as soon as 2 and 4 bytes are there: their place
//! never changes, so any version can tell any other that they differ), then
//! the length against [`MAX_PAYLOAD`] before waiting for or buffering the
//! payload, then the CRC (a damaged frame is told apart from a forged one),
//! then the MAC, and only then anything the frame says: kind, flags,
//! sequence number, payload. A frame that fails a check is never returned,
//! not even partly, and the decoder refuses everything after it.
//!
//! # Why a 16-byte MAC
//!
//! Truncating HMAC-SHA256 to its leftmost 128 bits is allowed by RFC 2104 §5
//! and NIST SP 800-107 §5.3.4 (at least half the output and at least 80
//! bits). The tag only has to resist forgery by someone who does not know the
//! key; collisions do not help such an attacker. A forger guessing a tag wins
//! with probability 2^-128 per frame, and a wrong tag ends the session (the
//! decoder refuses everything after it), so each connection gives one guess.
//! 16 bytes instead of 32 saves 16 bytes on every frame of a channel that
//! sends many small ones.

#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used))]
#![deny(clippy::cast_possible_truncation, clippy::arithmetic_side_effects)]

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use vmm::hook::ExitIndex;

use crate::record::{FaultKind, LogPosition, Record, RecordKind, MAX_ENTROPY_LEN, MAX_FRAME_LEN};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"fL";
/// The protocol version this build speaks. Both ends must speak the same one.
pub const PROTOCOL_VERSION: u16 = 2;
/// Bytes as text when they are printable ASCII (`"HT"`), else in hex.
fn shown(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        format!("bytes {bytes:02x?}")
    }
}

/// Header length: magic, version, kind, flags, sequence number, length.
pub const HEADER_LEN: usize = 18;
/// CRC32C length.
pub const CRC_LEN: usize = 4;
/// Length of the truncated HMAC-SHA256 tag (see the module doc for why 16).
pub const MAC_LEN: usize = 16;
/// Bytes a frame adds around its payload.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + CRC_LEN + MAC_LEN;
/// The largest payload a frame may carry: 1 MiB. A peer's length field is
/// checked against it before a single payload byte is buffered, so a hostile
/// or broken peer costs at most this much memory per connection. Big enough
/// for any single record (the largest, a 65550-byte frame, takes 65567 bytes)
/// and for batches that keep the per-frame cost low.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The largest frame on the wire.
pub const MAX_FRAME: usize = MAX_PAYLOAD + FRAME_OVERHEAD;
/// The frame kind byte value reserved for heartbeats (refused in version 1).
pub const RESERVED_HEARTBEAT_KIND: u8 = 8;
/// The most bytes before the records of a `Records` payload: first
/// position (varint, up to 10), count (varint, up to 5).
pub const RECORDS_HEADER_LEN: usize = 15;
/// Reference frames each end of a session keeps for deltas.
pub const REF_SLOTS: usize = 256;
/// The longest frame kept as a reference (so the references of a session
/// cost at most `REF_SLOTS * REF_MAX_LEN` bytes, 512 KiB).
pub const REF_MAX_LEN: usize = 2048;
/// The most bytes a varint takes.
const VARINT_MAX: usize = 10;

/// Length of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// Length of a handshake proof (a full HMAC-SHA256).
pub const PROOF_LEN: usize = 32;

/// The shortest record on the wire: kind byte and a one-byte exit delta.
const MIN_RECORD_LEN: usize = 2;
/// Flag bits understood by this version: none.
const KNOWN_FLAGS: u8 = 0;

/// What a frame carries. The values are part of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A batch of consecutive log records.
    Records = 1,
    /// Secondary → primary: records received and stored.
    Ack = 2,
    /// Primary → secondary: outputs released to the world.
    Released = 3,
    /// Primary → secondary: the first handshake message.
    Hello = 4,
    /// Secondary → primary: the second handshake message.
    HelloReply = 5,
    /// Primary → secondary: the last handshake message.
    AuthProof = 6,
    /// Either way: the sender ends the session on purpose.
    Shutdown = 7,
    /// Either way: the sender refuses the session, and why.
    Refused = 9,
}

impl FrameKind {
    /// The kind a wire byte stands for, or `None` (unknown or reserved).
    pub fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Records,
            2 => FrameKind::Ack,
            3 => FrameKind::Released,
            4 => FrameKind::Hello,
            5 => FrameKind::HelloReply,
            6 => FrameKind::AuthProof,
            7 => FrameKind::Shutdown,
            9 => FrameKind::Refused,
            _ => return None,
        })
    }
}

/// A handshake nonce: 32 random bytes, fresh for each connection.
pub type Nonce = [u8; NONCE_LEN];

/// What both ends of a pair must agree on before any record flows: the
/// same guest image, the same memory size and the same guest settings
/// (DESIGN "Settings": `--ip`, `--mac`, `--gateway`, `--param`...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestIdentity {
    /// Digest of the guest image.
    pub image: [u8; 32],
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Digest of the guest settings that must match on both hosts.
    pub config: [u8; 32],
}

/// One field of [`GuestIdentity`], as an identity mismatch names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityField {
    /// The guest image digest.
    Image,
    /// The guest memory size.
    MemorySize,
    /// The guest settings digest.
    Config,
}

impl IdentityField {
    fn byte(self) -> u8 {
        match self {
            IdentityField::Image => 1,
            IdentityField::MemorySize => 2,
            IdentityField::Config => 3,
        }
    }

    fn from_byte(byte: u8) -> Option<IdentityField> {
        Some(match byte {
            1 => IdentityField::Image,
            2 => IdentityField::MemorySize,
            3 => IdentityField::Config,
            _ => return None,
        })
    }
}

impl fmt::Display for IdentityField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentityField::Image => "guest image (--guest)",
            IdentityField::MemorySize => "memory size (--memory-mib)",
            IdentityField::Config => {
                "guest configuration (--mac, --ip, --gateway, --param, and whether there is a --tap)"
            }
        })
    }
}

/// The primary's opening message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the primary speaks (equal to the header's).
    pub version: u16,
    /// The primary's nonce.
    pub nonce: Nonce,
    /// The primary's guest.
    pub identity: GuestIdentity,
}

/// The secondary's answer to [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloReply {
    /// The secondary's nonce.
    pub nonce: Nonce,
    /// The secondary's guest.
    pub identity: GuestIdentity,
    /// HMAC(key, "secondary" ‖ primary nonce ‖ secondary nonce).
    pub proof: [u8; PROOF_LEN],
}

/// Why a side refuses a session, as it tells its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The peer does not hold the same key.
    Authentication,
    /// The peer speaks another protocol version; this side speaks `supported`.
    UnsupportedVersion { supported: u16 },
    /// The peer runs a different guest.
    IdentityMismatch { field: IdentityField },
    /// The peer sent something the protocol does not allow here.
    Protocol,
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::Authentication => f.write_str("authentication failed (different keys)"),
            RefuseReason::UnsupportedVersion { supported } => write!(f, "it speaks only protocol version {supported}"),
            RefuseReason::IdentityMismatch { field } => write!(f, "the {field} differs"),
            RefuseReason::Protocol => f.write_str("protocol violation"),
        }
    }
}

/// The content of one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Records at positions `first`, `first + 1`, … (never empty).
    Records { first: LogPosition, records: Vec<Record> },
    /// Secondary → primary: every record up to `upto` is received and stored.
    Ack { upto: LogPosition },
    /// Primary → secondary: every output up to `upto` reached the world.
    Released { upto: LogPosition },
    /// Handshake, primary → secondary.
    Hello(Hello),
    /// Handshake, secondary → primary.
    HelloReply(HelloReply),
    /// Handshake, primary → secondary: HMAC(key, "primary" ‖ secondary nonce ‖ primary nonce).
    AuthProof { proof: [u8; PROOF_LEN] },
    /// The sender ends the session on purpose.
    Shutdown,
    /// The sender refuses the session.
    Refused(RefuseReason),
}

impl Message {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Records { .. } => FrameKind::Records,
            Message::Ack { .. } => FrameKind::Ack,
            Message::Released { .. } => FrameKind::Released,
            Message::Hello(_) => FrameKind::Hello,
            Message::HelloReply(_) => FrameKind::HelloReply,
            Message::AuthProof { .. } => FrameKind::AuthProof,
            Message::Shutdown => FrameKind::Shutdown,
            Message::Refused(_) => FrameKind::Refused,
        }
    }
}

/// A verified frame: every check passed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The frame's sequence number in its direction.
    pub seq: u64,
    /// What it carries.
    pub message: Message,
}

/// Why a frame was refused (or could not be encoded). After the decoder
/// returns one, the session is over: it refuses everything that follows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The stream does not start a frame where one is due.
    #[error(
        "the peer does not speak ftvm's logging protocol (it began with {}: another program on that port?)",
        shown(found)
    )]
    BadMagic { found: [u8; 2] },
    /// The peer speaks another protocol version.
    #[error("the peer speaks protocol version {found}, this side speaks {supported}")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// The payload length is over the cap (refused before buffering it).
    #[error("a frame payload of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    /// The frame was damaged in transit.
    #[error("frame {seq} failed its CRC: computed {expected:#010x}, the frame carries {found:#010x}")]
    CrcMismatch { seq: u64, expected: u32, found: u32 },
    /// The frame was made with another key (a peer with a different key, a
    /// frame from another session) or altered with its CRC recomputed.
    #[error("frame {seq} failed its MAC: made with another key or altered")]
    BadMac { seq: u64 },
    /// A frame other than the next one: duplicated, reordered, dropped or
    /// replayed within the session.
    #[error("frame {found} arrived where frame {expected} was due")]
    OutOfSequence { expected: u64, found: u64 },
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame ({buffered} bytes of it arrived)")]
    Truncated { buffered: usize },
    /// A frame kind this version does not know (or a reserved one).
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u8 },
    /// Flag bits this version does not know.
    #[error("unknown frame flags {flags:#04x}")]
    UnknownFlags { flags: u8 },
    /// A record kind this version does not know.
    #[error("unknown record kind {kind}")]
    UnknownRecordKind { kind: u8 },
    /// A length-prefixed field over its cap.
    #[error("{what} of {len} bytes is over its {max}-byte limit")]
    FieldTooLarge { what: &'static str, len: u64, max: u64 },
    /// The payload does not have the shape its kind requires.
    #[error("malformed frame: {what}")]
    Malformed { what: &'static str },
    /// 2^64 frames were sent in one direction (cannot happen in practice).
    #[error("the frame sequence numbers are exhausted")]
    SequenceExhausted,
}

/// A key frames are MACed with: an HMAC-SHA256 state with the key already
/// absorbed, cloned for each frame. Its `Debug` does not show the key.
#[derive(Clone)]
pub struct MacKey(Hmac<Sha256>);

impl MacKey {
    /// A MAC key from raw key bytes (any length; ftvm derives 32-byte keys).
    pub fn new(key: &[u8]) -> MacKey {
        MacKey(hmac_sha256(key))
    }

    fn tag(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(part);
        }
        mac
    }
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(..)")
    }
}

pub(crate) use ftvm_mac::{hmac_sha256, hmac_sha256_of};

/// The most bytes `record` takes in a `Records` payload (what it takes
/// depends on the records before it: usually much less).
pub fn encoded_record_len(record: &Record) -> usize {
    // Saturating: a record this large is refused by `encode_records` anyway.
    (1 + VARINT_MAX).saturating_add(match record {
        Record::Clock { .. } => VARINT_MAX,
        Record::Entropy { bytes, .. } => bytes.len().saturating_add(5),
        // Mode, slot, length.
        Record::Frame { frame, .. } => frame.len().saturating_add(7),
        Record::Digest { .. } => 24,
        Record::Shutdown { .. } | Record::Barrier { .. } | Record::Switchover { .. } => 0,
        Record::Fault { .. } => 1,
    })
}

/// Whether `record` can be encoded: its byte strings are within their caps.
/// The channel checks each record when it is handed over, so a bad one is
/// refused to its caller instead of failing the session later.
pub fn check_record(record: &Record) -> Result<(), FrameError> {
    let (what, len, max) = match record {
        Record::Entropy { bytes, .. } => ("entropy record", bytes.len(), MAX_ENTROPY_LEN),
        Record::Frame { frame, .. } => ("frame record", frame.len(), MAX_FRAME_LEN),
        _ => return Ok(()),
    };
    if len > max {
        return Err(FrameError::FieldTooLarge { what, len: to_u64(len), max: to_u64(max) });
    }
    Ok(())
}

/// Turns messages into frames for one direction of one session.
#[derive(Debug)]
pub struct FrameEncoder {
    key: MacKey,
    next_seq: u64,
    version: u16,
    payload: BytesMut,
    records: RecordContext,
    /// Reference frames a payload being encoded keeps, applied to
    /// `records` once its frame is sealed.
    kept: Vec<(usize, Bytes)>,
}

impl FrameEncoder {
    /// An encoder whose first frame is number 0, MACed with `key`.
    pub fn new(key: MacKey) -> FrameEncoder {
        FrameEncoder::with_version(key, PROTOCOL_VERSION)
    }

    /// An encoder that writes `version` in its headers (tests of version
    /// refusal speak a version this build does not).
    pub(crate) fn with_version(key: MacKey, version: u16) -> FrameEncoder {
        FrameEncoder {
            key,
            next_seq: 0,
            version,
            payload: BytesMut::new(),
            records: RecordContext::new(),
            kept: Vec::new(),
        }
    }

    /// MAC the frames from now on with `key` (the handshake's switch to the
    /// session key). Sequence numbers go on.
    pub fn set_key(&mut self, key: MacKey) {
        self.key = key;
    }

    /// The sequence number the next frame gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Append one frame carrying `message` to `out`. On error nothing is
    /// appended and the sequence number is not used.
    pub fn encode(&mut self, message: &Message, out: &mut BytesMut) -> Result<(), FrameError> {
        if let Message::Records { first, records } = message {
            return self.encode_records(*first, records, out);
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        let filled = fill_payload(message, &mut payload);
        let result = filled.and_then(|()| self.seal(message.kind(), &payload, out));
        self.payload = payload;
        result
    }

    /// Append one `Records` frame carrying `records` at positions `first`,
    /// `first + 1`, … to `out`, without building a [`Message`]. The batch
    /// must fit [`MAX_PAYLOAD`]: [`RECORDS_HEADER_LEN`] plus the
    /// [`encoded_record_len`] of each record.
    pub fn encode_records(
        &mut self,
        first: LogPosition,
        records: &[Record],
        out: &mut BytesMut,
    ) -> Result<(), FrameError> {
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        self.kept.clear();
        let filled = fill_records(&self.records, first, records, &mut payload, &mut self.kept);
        // The context moves on only with a frame that goes out.
        let result = filled.and_then(|next| self.seal(FrameKind::Records, &payload, out).map(|()| next));
        if let Ok(next) = result {
            self.records.scalars = next;
            for (slot, frame) in self.kept.drain(..) {
                if let Some(kept) = self.records.refs.get_mut(slot) {
                    *kept = frame;
                }
            }
        }
        self.payload = payload;
        result.map(|_| ())
    }

    /// The payload bytes of the last frame encoded (what a batch of records
    /// took, before the frame's header, CRC and MAC).
    pub fn last_payload_len(&self) -> usize {
        self.payload.len()
    }

    fn seal(&mut self, kind: FrameKind, payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&len| usize::try_from(len).is_ok_and(|len| len <= MAX_PAYLOAD))
            .ok_or(FrameError::TooLarge { len: to_u64(payload.len()), max: to_u64(MAX_PAYLOAD) })?;
        let seq = self.next_seq;
        let next = seq.checked_add(1).ok_or(FrameError::SequenceExhausted)?;

        let mut header = [0u8; HEADER_LEN];
        let mut h = &mut header[..];
        h.put_slice(&MAGIC);
        h.put_u16_le(self.version);
        h.put_u8(kind as u8);
        h.put_u8(0);
        h.put_u64_le(seq);
        h.put_u32_le(len);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
        let crc_bytes = crc.to_le_bytes();
        let tag = self.key.tag(&[&header, payload, &crc_bytes]).finalize().into_bytes();

        out.reserve(payload.len().saturating_add(FRAME_OVERHEAD));
        out.put_slice(&header);
        out.put_slice(payload);
        out.put_slice(&crc_bytes);
        let (tag, _) = tag.split_first_chunk::<MAC_LEN>().ok_or(FrameError::Malformed { what: "MAC too short" })?;
        out.put_slice(tag);
        self.next_seq = next;
        Ok(())
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn put_identity(out: &mut BytesMut, identity: &GuestIdentity) {
    out.put_slice(&identity.image);
    out.put_u64_le(identity.memory_bytes);
    out.put_slice(&identity.config);
}

fn fill_payload(message: &Message, out: &mut BytesMut) -> Result<(), FrameError> {
    match message {
        // Encoded by `encode_records`, with the session's context.
        Message::Records { .. } => return Err(FrameError::Malformed { what: "records outside encode_records" }),
        Message::Ack { upto } | Message::Released { upto } => out.put_u64_le(upto.0),
        Message::Hello(hello) => {
            out.put_u16_le(hello.version);
            out.put_slice(&hello.nonce);
            put_identity(out, &hello.identity);
        }
        Message::HelloReply(reply) => {
            out.put_slice(&reply.nonce);
            put_identity(out, &reply.identity);
            out.put_slice(&reply.proof);
        }
        Message::AuthProof { proof } => out.put_slice(proof),
        Message::Shutdown => {}
        Message::Refused(reason) => match reason {
            RefuseReason::Authentication => out.put_u8(1),
            RefuseReason::UnsupportedVersion { supported } => {
                out.put_u8(2);
                out.put_u16_le(*supported);
            }
            RefuseReason::IdentityMismatch { field } => {
                out.put_u8(3);
                out.put_u8(field.byte());
            }
            RefuseReason::Protocol => out.put_u8(4),
        },
    }
    Ok(())
}

fn fill_records(
    context: &RecordContext,
    first: LogPosition,
    records: &[Record],
    out: &mut BytesMut,
    kept: &mut Vec<(usize, Bytes)>,
) -> Result<Scalars, FrameError> {
    let count = u32::try_from(records.len()).map_err(|_| FrameError::Malformed { what: "too many records" })?;
    check_positions(first, count)?;
    let mut at = context.scalars;
    put_varint(out, zigzag(first.0.wrapping_sub(at.next_first)));
    put_varint(out, u64::from(count));
    for record in records {
        out.put_u8(record.kind().byte());
        let exit = record.exit().0;
        put_varint(out, zigzag(exit.wrapping_sub(at.exit)));
        at.exit = exit;
        match record {
            Record::Clock { ns, .. } => {
                put_varint(out, zigzag(ns.wrapping_sub(at.clock)));
                at.clock = *ns;
            }
            Record::Entropy { bytes, .. } => put_capped(out, bytes, "entropy record", MAX_ENTROPY_LEN)?,
            Record::Frame { frame, .. } => put_frame(context, kept, out, frame)?,
            Record::Digest { vcpu, devices, memory, .. } => {
                out.put_u64_le(*vcpu);
                out.put_u64_le(*devices);
                out.put_u64_le(*memory);
            }
            Record::Shutdown { .. } | Record::Barrier { .. } | Record::Switchover { .. } => {}
            Record::Fault { fault, .. } => out.put_u8(fault.byte()),
        }
        // Stop early rather than fill a megabyte past the cap.
        if out.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len: to_u64(out.len()), max: to_u64(MAX_PAYLOAD) });
        }
    }
    // check_positions made sure this fits.
    at.next_first = first.0.wrapping_add(u64::from(count));
    Ok(at)
}

/// The frame modes of a `Frame` record (see the module doc).
const MODE_EMPTY: u8 = 0;
const MODE_LITERAL: u8 = 1;
const MODE_KEPT: u8 = 2;
const MODE_DELTA: u8 = 3;

/// A `Frame` record's body: a delta against the frame kept in its flow's
/// slot where that is shorter, else the literal frame.
fn put_frame(
    context: &RecordContext,
    kept: &mut Vec<(usize, Bytes)>,
    out: &mut BytesMut,
    frame: &Bytes,
) -> Result<(), FrameError> {
    if frame.is_empty() {
        out.put_u8(MODE_EMPTY);
        return Ok(());
    }
    if frame.len() > REF_MAX_LEN {
        out.put_u8(MODE_LITERAL);
        return put_capped(out, frame, "frame record", MAX_FRAME_LEN);
    }
    let slot = flow_slot(frame);
    // A frame kept earlier in this same payload counts already.
    let reference = kept
        .iter()
        .rev()
        .find(|(s, _)| *s == slot)
        .map(|(_, f)| f.as_ref())
        .or_else(|| context.refs.get(slot).map(|f| f.as_ref()))
        .unwrap_or(&[]);
    let mark = out.len();
    out.put_u8(MODE_DELTA);
    out.put_u8(u8::try_from(slot).unwrap_or(0));
    put_varint(out, to_u64(frame.len()));
    put_delta(out, reference, frame);
    let literal_len = 2usize.saturating_add(varint_len(to_u64(frame.len()))).saturating_add(frame.len());
    if out.len().saturating_sub(mark) >= literal_len {
        out.truncate(mark);
        out.put_u8(MODE_KEPT);
        out.put_u8(u8::try_from(slot).unwrap_or(0));
        put_varint(out, to_u64(frame.len()));
        out.put_slice(frame);
    }
    kept.push((slot, frame.clone()));
    Ok(())
}

/// Runs of (bytes copied from `reference`, literal bytes) that make `frame`.
/// Unchanged stretches shorter than a run's cost are sent as literals.
fn put_delta(out: &mut BytesMut, reference: &[u8], frame: &[u8]) {
    let differs = |i: usize| reference.get(i) != frame.get(i);
    let len = frame.len();
    let mut pos = 0;
    while pos < len {
        let mut start = pos;
        while start < len && !differs(start) {
            start = start.saturating_add(1);
        }
        let mut end = start;
        loop {
            while end < len && differs(end) {
                end = end.saturating_add(1);
            }
            // Absorb a short unchanged gap before more changes.
            let mut gap = end;
            while gap < len && !differs(gap) && gap.saturating_sub(end) < 3 {
                gap = gap.saturating_add(1);
            }
            if gap < len && gap > end && differs(gap) {
                end = gap;
                continue;
            }
            break;
        }
        put_varint(out, to_u64(start.saturating_sub(pos)));
        put_varint(out, to_u64(end.saturating_sub(start)));
        out.put_slice(frame.get(start..end).unwrap_or(&[]));
        pos = end;
    }
}

/// The slot for `frame`: a hash of its flow (IPv4: protocol, addresses and
/// ports; else its Ethernet header) and its length, so that a connection's
/// requests meet the previous request, not its acknowledgements.
fn flow_slot(frame: &[u8]) -> usize {
    let mut hash: u32 = 0x811c_9dc5;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    };
    let ipv4 = frame.get(12..14) == Some(&[0x08, 0x00][..]);
    match (ipv4, frame.get(14)) {
        (true, Some(&vihl)) => {
            let l4 = 14usize.saturating_add(usize::from(vihl & 0x0f).saturating_mul(4));
            eat(frame.get(23..24).unwrap_or(&[]));
            eat(frame.get(26..34).unwrap_or(&[]));
            eat(frame.get(l4..l4.saturating_add(4)).unwrap_or(&[]));
        }
        _ => eat(frame.get(..14).unwrap_or(frame)),
    }
    eat(&u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes());
    usize::try_from(hash).unwrap_or(0) % REF_SLOTS
}

/// The context both ends of a session keep for `Records` payloads.
#[derive(Debug)]
struct RecordContext {
    scalars: Scalars,
    /// Reference frames, [`REF_SLOTS`] of them (empty until kept).
    refs: Vec<Bytes>,
}

/// The numbers records are told as differences from.
#[derive(Clone, Copy, Debug, Default)]
struct Scalars {
    next_first: u64,
    exit: u64,
    clock: u64,
}

impl RecordContext {
    fn new() -> RecordContext {
        RecordContext { scalars: Scalars::default(), refs: vec![Bytes::new(); REF_SLOTS] }
    }
}

fn zigzag(difference: u64) -> u64 {
    // The difference read as a two's-complement i64.
    let sign = if difference >> 63 == 1 { u64::MAX } else { 0 };
    (difference << 1) ^ sign
}

fn unzigzag(value: u64) -> u64 {
    (value >> 1) ^ (value & 1).wrapping_neg()
}

fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8(u8::try_from(value & 0x7f).unwrap_or(0) | 0x80);
        value >>= 7;
    }
    out.put_u8(u8::try_from(value).unwrap_or(0));
}

fn varint_len(value: u64) -> usize {
    let bits = 64usize.saturating_sub(value.leading_zeros() as usize).max(1);
    bits.div_ceil(7)
}

fn put_capped(out: &mut BytesMut, bytes: &[u8], what: &'static str, max: usize) -> Result<(), FrameError> {
    let len = u32::try_from(bytes.len()).ok().filter(|_| bytes.len() <= max).ok_or(FrameError::FieldTooLarge {
        what,
        len: to_u64(bytes.len()),
        max: to_u64(max),
    })?;
    put_varint(out, u64::from(len));
    out.put_slice(bytes);
    Ok(())
}

/// A `Records` frame holds at least one record, starts at position 1 or
/// later, and its last position fits a u64.
fn check_positions(first: LogPosition, count: u32) -> Result<(), FrameError> {
    if first == LogPosition::NONE {
        return Err(FrameError::Malformed { what: "records start at position 0" });
    }
    let Some(extra) = count.checked_sub(1) else {
        return Err(FrameError::Malformed { what: "a records frame without records" });
    };
    first.checked_add(u64::from(extra)).ok_or(FrameError::Malformed { what: "record positions overflow" })?;
    Ok(())
}

/// Takes the bytes of one direction of a session as they arrive, in pieces
/// of any size, and yields whole verified frames in order, or one error.
///
/// Use: [`push`](Self::push) what was read, then call
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`, then read
/// again; at the end of the stream call [`finish`](Self::finish), which
/// refuses a frame cut short. The buffer holds at most one frame (at most
/// [`MAX_FRAME`] bytes) plus whatever one `push` added.
#[derive(Debug)]
pub struct FrameDecoder {
    key: MacKey,
    version: u16,
    /// The largest payload accepted: [`MAX_PAYLOAD`] unless lowered.
    max_payload: usize,
    next_seq: u64,
    buf: BytesMut,
    failed: Option<FrameError>,
    records: RecordContext,
}

impl FrameDecoder {
    /// A decoder that expects frame 0 first, MACed with `key`.
    pub fn new(key: MacKey) -> FrameDecoder {
        FrameDecoder::with_version(key, PROTOCOL_VERSION)
    }

    /// A decoder that accepts `version` (tests of version refusal).
    pub(crate) fn with_version(key: MacKey, version: u16) -> FrameDecoder {
        FrameDecoder {
            key,
            version,
            max_payload: MAX_PAYLOAD,
            next_seq: 0,
            buf: BytesMut::new(),
            failed: None,
            records: RecordContext::new(),
        }
    }

    /// Refuse payloads over `max` bytes (at most [`MAX_PAYLOAD`]) from the
    /// next frame on, before buffering them, as [`FrameError::TooLarge`].
    /// The handshake, whose frames are a few hundred bytes, lowers it so
    /// that a connection that has proven nothing yet costs little memory.
    pub fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max.min(MAX_PAYLOAD);
    }

    /// Verify the frames from now on with `key` (the handshake's switch to
    /// the session key). Sequence numbers go on.
    pub fn set_key(&mut self, key: MacKey) {
        self.key = key;
    }

    /// The sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether an error ended the session.
    pub fn failed(&self) -> Option<&FrameError> {
        self.failed.as_ref()
    }

    /// Add bytes that arrived. Ignored once the decoder has failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next whole verified frame, `Ok(None)` if more bytes are needed,
    /// or the error that ends the session (returned again on every later
    /// call).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        self.decode().map_err(|error| self.fail(error))
    }

    /// The stream ended: an error if it ended inside a frame (or the session
    /// had already failed).
    pub fn finish(&mut self) -> Result<(), FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            let error = FrameError::Truncated { buffered: self.buf.len() };
            Err(self.fail(error))
        }
    }

    fn fail(&mut self, error: FrameError) -> FrameError {
        self.failed = Some(error.clone());
        self.buf = BytesMut::new();
        error
    }

    fn decode(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut header = Reader(self.buf.as_ref());
        // Check what can be checked as soon as it arrives, so a stream of
        // garbage or another version is told at once, not after 18 bytes.
        let Ok(magic) = header.array::<2>() else { return Ok(None) };
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let Ok(version) = header.u16() else { return Ok(None) };
        if version != self.version {
            return Err(FrameError::UnsupportedVersion { found: version, supported: self.version });
        }
        let (Ok(kind), Ok(flags), Ok(seq), Ok(len)) = (header.u8(), header.u8(), header.u64(), header.u32()) else {
            return Ok(None);
        };
        let payload_len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.max_payload)
            .ok_or(FrameError::TooLarge { len: u64::from(len), max: to_u64(self.max_payload) })?;
        // Cannot overflow: payload_len <= max_payload <= MAX_PAYLOAD.
        let signed_len = HEADER_LEN.saturating_add(payload_len);
        let total = signed_len.saturating_add(CRC_LEN + MAC_LEN);
        if self.buf.len() < total {
            self.buf.reserve(total.saturating_sub(self.buf.len()));
            return Ok(None);
        }

        let frame = self.buf.split_to(total).freeze();
        let (signed, trailer) = frame.split_at_checked(signed_len).ok_or(SHORT)?;
        let mut trailer = Reader(trailer);
        let crc_bytes = trailer.array::<CRC_LEN>()?;
        let tag = trailer.array::<MAC_LEN>()?;
        let found = u32::from_le_bytes(crc_bytes);
        let expected = crc32c::crc32c(signed);
        if found != expected {
            return Err(FrameError::CrcMismatch { seq, expected, found });
        }
        self.key.tag(&[signed, &crc_bytes]).verify_truncated_left(&tag).map_err(|_| FrameError::BadMac { seq })?;

        // Authentic from here on: what the frame says can be believed.
        let kind = FrameKind::from_byte(kind).ok_or(FrameError::UnknownKind { kind })?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(FrameError::UnknownFlags { flags });
        }
        if seq != self.next_seq {
            return Err(FrameError::OutOfSequence { expected: self.next_seq, found: seq });
        }
        // In range: HEADER_LEN <= signed_len <= frame.len() by construction.
        let payload = frame.slice(HEADER_LEN..signed_len);
        let message = parse_payload(kind, version, payload, &mut self.records)?;
        self.next_seq = seq.checked_add(1).ok_or(FrameError::SequenceExhausted)?;
        Ok(Some(Frame { seq, message }))
    }
}

/// Checked reads from a byte slice; running out is "malformed" (callers that
/// read a partial header treat it as "need more bytes").
struct Reader<'a>(&'a [u8]);

const SHORT: FrameError = FrameError::Malformed { what: "the payload is shorter than its contents" };

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(SHORT)?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        self.array().map(u64::from_le_bytes)
    }
}

/// Checked reads from a payload that hand out byte strings as zero-copy
/// slices of the frame.
struct Payload(Bytes);

impl Payload {
    fn u8(&mut self) -> Result<u8, FrameError> {
        self.0.try_get_u8().map_err(|_| SHORT)
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        self.0.try_get_u16_le().map_err(|_| SHORT)
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        self.0.try_get_u64_le().map_err(|_| SHORT)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        self.0.try_copy_to_slice(&mut out).map_err(|_| SHORT)?;
        Ok(out)
    }

    /// A LEB128 varint (at most 10 bytes; past 64 bits is refused).
    fn varint(&mut self) -> Result<u64, FrameError> {
        let mut value = 0u64;
        for i in 0..VARINT_MAX {
            let byte = self.u8().map_err(|_| FrameError::Malformed { what: "a varint is cut short" })?;
            if i == VARINT_MAX - 1 && byte > 1 {
                break;
            }
            let shift = u32::try_from(i).unwrap_or(0).saturating_mul(7);
            value |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(FrameError::Malformed { what: "a varint runs past 64 bits" })
    }

    /// A varint-length-prefixed byte string of at most `max` bytes; the cap
    /// is checked before the length is used.
    fn capped(&mut self, what: &'static str, max: usize) -> Result<Bytes, FrameError> {
        let len = self.varint()?;
        let len = usize::try_from(len).ok().filter(|&len| len <= max).ok_or(FrameError::FieldTooLarge {
            what,
            len,
            max: to_u64(max),
        })?;
        if self.0.remaining() < len {
            return Err(SHORT);
        }
        Ok(self.0.split_to(len))
    }

    fn identity(&mut self) -> Result<GuestIdentity, FrameError> {
        Ok(GuestIdentity { image: self.array()?, memory_bytes: self.u64()?, config: self.array()? })
    }

    fn end(self) -> Result<(), FrameError> {
        if self.0.has_remaining() {
            Err(FrameError::Malformed { what: "trailing bytes after the payload" })
        } else {
            Ok(())
        }
    }
}

fn parse_payload(
    kind: FrameKind,
    version: u16,
    payload: Bytes,
    context: &mut RecordContext,
) -> Result<Message, FrameError> {
    let mut p = Payload(payload);
    let message = match kind {
        FrameKind::Records => parse_records(&mut p, context)?,
        FrameKind::Ack => Message::Ack { upto: LogPosition(p.u64()?) },
        FrameKind::Released => Message::Released { upto: LogPosition(p.u64()?) },
        FrameKind::Hello => {
            let hello = Hello { version: p.u16()?, nonce: p.array()?, identity: p.identity()? };
            if hello.version != version {
                return Err(FrameError::Malformed { what: "the hello's version differs from its header's" });
            }
            Message::Hello(hello)
        }
        FrameKind::HelloReply => {
            Message::HelloReply(HelloReply { nonce: p.array()?, identity: p.identity()?, proof: p.array()? })
        }
        FrameKind::AuthProof => Message::AuthProof { proof: p.array()? },
        FrameKind::Shutdown => Message::Shutdown,
        FrameKind::Refused => Message::Refused(match p.u8()? {
            1 => RefuseReason::Authentication,
            2 => RefuseReason::UnsupportedVersion { supported: p.u16()? },
            3 => RefuseReason::IdentityMismatch {
                field: IdentityField::from_byte(p.u8()?)
                    .ok_or(FrameError::Malformed { what: "unknown identity field" })?,
            },
            4 => RefuseReason::Protocol,
            _ => return Err(FrameError::Malformed { what: "unknown refusal reason" }),
        }),
    };
    p.end()?;
    Ok(message)
}

fn parse_records(p: &mut Payload, context: &mut RecordContext) -> Result<Message, FrameError> {
    let at = &mut context.scalars;
    let first = LogPosition(at.next_first.wrapping_add(unzigzag(p.varint()?)));
    let count = u32::try_from(p.varint()?).map_err(|_| FrameError::Malformed { what: "record count" })?;
    check_positions(first, count)?;
    let count = usize::try_from(count).map_err(|_| FrameError::Malformed { what: "record count" })?;
    // Refuse a count the payload cannot hold before reserving room for it.
    if count > p.0.remaining() / MIN_RECORD_LEN {
        return Err(FrameError::Malformed { what: "more records than the payload can hold" });
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = p.u8()?;
        let kind = RecordKind::from_byte(kind).ok_or(FrameError::UnknownRecordKind { kind })?;
        let exit = at.exit.wrapping_add(unzigzag(p.varint()?));
        at.exit = exit;
        let exit = ExitIndex(exit);
        records.push(match kind {
            RecordKind::Clock => {
                let ns = at.clock.wrapping_add(unzigzag(p.varint()?));
                at.clock = ns;
                Record::Clock { exit, ns }
            }
            RecordKind::Entropy => Record::Entropy { exit, bytes: p.capped("entropy record", MAX_ENTROPY_LEN)? },
            RecordKind::Frame => Record::Frame { exit, frame: parse_frame(p, &mut context.refs)? },
            RecordKind::Digest => Record::Digest { exit, vcpu: p.u64()?, devices: p.u64()?, memory: p.u64()? },
            RecordKind::Shutdown => Record::Shutdown { exit },
            RecordKind::Barrier => Record::Barrier { exit },
            RecordKind::Switchover => Record::Switchover { exit },
            RecordKind::Fault => {
                let byte = p.u8()?;
                let fault = FaultKind::from_byte(byte).ok_or(FrameError::Malformed { what: "fault kind" })?;
                Record::Fault { exit, fault }
            }
        });
    }
    // check_positions made sure this fits.
    at.next_first = first.0.wrapping_add(u64::try_from(count).unwrap_or(0));
    Ok(Message::Records { first, records })
}

/// A `Frame` record's body (see the module doc), keeping it as a reference
/// where its mode says so.
fn parse_frame(p: &mut Payload, refs: &mut [Bytes]) -> Result<Bytes, FrameError> {
    const OUT_OF_BOUNDS: FrameError = FrameError::Malformed { what: "a frame delta's run goes out of bounds" };
    let mode = p.u8()?;
    let slot = match mode {
        MODE_EMPTY => return Ok(Bytes::new()),
        MODE_LITERAL => return p.capped("frame record", MAX_FRAME_LEN),
        MODE_KEPT | MODE_DELTA => usize::from(p.u8()?),
        _ => return Err(FrameError::Malformed { what: "unknown frame mode" }),
    };
    let len = p.varint()?;
    let len = usize::try_from(len).ok().filter(|&len| len <= REF_MAX_LEN).ok_or(FrameError::FieldTooLarge {
        what: "kept frame record",
        len,
        max: to_u64(REF_MAX_LEN),
    })?;
    let frame = if mode == MODE_KEPT {
        if p.0.remaining() < len {
            return Err(SHORT);
        }
        // A copy: the kept reference must not hold the whole received frame.
        Bytes::copy_from_slice(&p.0.split_to(len))
    } else {
        let reference = refs.get(slot).cloned().unwrap_or_default();
        let mut frame = Vec::with_capacity(len);
        while frame.len() < len {
            let copy = usize::try_from(p.varint()?).map_err(|_| OUT_OF_BOUNDS)?;
            let literal = usize::try_from(p.varint()?).map_err(|_| OUT_OF_BOUNDS)?;
            if copy == 0 && literal == 0 {
                return Err(FrameError::Malformed { what: "a frame delta's run is empty" });
            }
            let pos = frame.len();
            let copied = pos.checked_add(copy).filter(|&end| end <= len).ok_or(OUT_OF_BOUNDS)?;
            frame.extend_from_slice(reference.get(pos..copied).ok_or(OUT_OF_BOUNDS)?);
            if copied.checked_add(literal).is_none_or(|end| end > len) {
                return Err(OUT_OF_BOUNDS);
            }
            if p.0.remaining() < literal {
                return Err(SHORT);
            }
            frame.extend_from_slice(&p.0.split_to(literal));
        }
        if len == 0 {
            return Err(FrameError::Malformed { what: "an empty frame as a delta" });
        }
        Bytes::from(frame)
    };
    if let Some(kept) = refs.get_mut(slot) {
        *kept = frame.clone();
    }
    Ok(frame)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    fn key(label: &str) -> MacKey {
        MacKey::new(label.as_bytes())
    }

    fn identity() -> GuestIdentity {
        GuestIdentity { image: [1; 32], memory_bytes: 64 << 20, config: [2; 32] }
    }

    fn sample_records() -> Vec<Record> {
        vec![
            Record::Clock { exit: ExitIndex(10), ns: 123_456_789 },
            Record::Entropy { exit: ExitIndex(11), bytes: Bytes::from_static(&[9, 8, 7, 6]) },
            Record::Frame { exit: ExitIndex(12), frame: Bytes::from_static(b"\xff\xff\xff\xff\xff\xffethernet") },
            Record::Digest { exit: ExitIndex(13), vcpu: 1, devices: 2, memory: 3 },
            Record::Shutdown { exit: ExitIndex(14) },
        ]
    }

    fn encode_all(encoder: &mut FrameEncoder, messages: &[Message]) -> BytesMut {
        let mut out = BytesMut::new();
        for message in messages {
            encoder.encode(message, &mut out).unwrap();
        }
        out
    }

    /// Decode everything in `bytes`, then the end of the stream.
    fn decode_all(decoder: &mut FrameDecoder, bytes: &[u8]) -> (Vec<Frame>, Result<(), FrameError>) {
        decoder.push(bytes);
        let mut frames = Vec::new();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return (frames, decoder.finish()),
                Err(error) => return (frames, Err(error)),
            }
        }
    }

    /// A frame sealed by hand, so a test can put anything in it and still
    /// pass CRC and MAC.
    fn seal_raw(key: &MacKey, version: u16, kind: u8, flags: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&version.to_le_bytes());
        frame.push(kind);
        frame.push(flags);
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        frame.extend_from_slice(payload);
        let crc = crc32c::crc32c(&frame).to_le_bytes();
        frame.extend_from_slice(&crc);
        let tag = key.tag(&[&frame]).finalize().into_bytes();
        frame.extend_from_slice(&tag[..MAC_LEN]);
        frame
    }

    fn varint(value: u64) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_varint(&mut out, value);
        out.to_vec()
    }

    /// A `Records` payload by hand, for a fresh decoder (whose context
    /// expects position 0, exit 0, clock 0).
    fn records_payload(first: u64, count: u32, body: &[u8]) -> Vec<u8> {
        let mut payload = varint(zigzag(first));
        payload.extend_from_slice(&varint(u64::from(count)));
        payload.extend_from_slice(body);
        payload
    }

    fn refused(bytes: &[u8], key: &MacKey) -> FrameError {
        let (frames, end) = decode_all(&mut FrameDecoder::new(key.clone()), bytes);
        assert!(frames.is_empty(), "a bad frame was returned: {frames:?}");
        end.unwrap_err()
    }

    // --- round trips ---

    fn record_strategy() -> impl Strategy<Value = Record> {
        let exit = any::<u64>().prop_map(ExitIndex);
        prop_oneof![
            (exit.clone(), any::<u64>()).prop_map(|(exit, ns)| Record::Clock { exit, ns }),
            (exit.clone(), vec(any::<u8>(), 0..=MAX_ENTROPY_LEN))
                .prop_map(|(exit, bytes)| Record::Entropy { exit, bytes: bytes.into() }),
            (exit.clone(), vec(any::<u8>(), 0..=1600))
                .prop_map(|(exit, frame)| Record::Frame { exit, frame: frame.into() }),
            // Now and then a frame up to the cap (one repeated byte: cheap).
            (exit.clone(), 0..=MAX_FRAME_LEN, any::<u8>())
                .prop_map(|(exit, len, byte)| Record::Frame { exit, frame: vec![byte; len].into() }),
            (exit.clone(), any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(exit, vcpu, devices, memory)| Record::Digest { exit, vcpu, devices, memory }),
            exit.clone().prop_map(|exit| Record::Shutdown { exit }),
            exit.clone().prop_map(|exit| Record::Barrier { exit }),
            exit.clone().prop_map(|exit| Record::Switchover { exit }),
            (exit, proptest::sample::select(FaultKind::ALL.to_vec()))
                .prop_map(|(exit, fault)| Record::Fault { exit, fault }),
        ]
    }

    fn identity_strategy() -> impl Strategy<Value = GuestIdentity> {
        (any::<[u8; 32]>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(image, memory_bytes, config)| GuestIdentity {
            image,
            memory_bytes,
            config,
        })
    }

    fn message_strategy() -> impl Strategy<Value = Message> {
        let position = any::<u64>().prop_map(LogPosition);
        let field =
            prop_oneof![Just(IdentityField::Image), Just(IdentityField::MemorySize), Just(IdentityField::Config)];
        let reason = prop_oneof![
            Just(RefuseReason::Authentication),
            any::<u16>().prop_map(|supported| RefuseReason::UnsupportedVersion { supported }),
            field.prop_map(|field| RefuseReason::IdentityMismatch { field }),
            Just(RefuseReason::Protocol),
        ];
        prop_oneof![
            4 => (1..=u64::MAX - 64, vec(record_strategy(), 1..=16))
                .prop_map(|(first, records)| Message::Records { first: LogPosition(first), records }),
            1 => position.clone().prop_map(|upto| Message::Ack { upto }),
            1 => position.prop_map(|upto| Message::Released { upto }),
            1 => (any::<Nonce>(), identity_strategy())
                .prop_map(|(nonce, identity)| Message::Hello(Hello { version: PROTOCOL_VERSION, nonce, identity })),
            1 => (any::<Nonce>(), identity_strategy(), any::<[u8; 32]>())
                .prop_map(|(nonce, identity, proof)| Message::HelloReply(HelloReply { nonce, identity, proof })),
            1 => any::<[u8; 32]>().prop_map(|proof| Message::AuthProof { proof }),
            1 => Just(Message::Shutdown),
            1 => reason.prop_map(Message::Refused),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any messages, encoded and cut into pieces anywhere, decode to the
        /// same messages with consecutive sequence numbers.
        #[test]
        fn round_trip_in_any_fragmentation(
            messages in vec(message_strategy(), 1..8),
            cuts in vec(any::<prop::sample::Index>(), 0..24),
        ) {
            let mut encoder = FrameEncoder::new(key("session"));
            let stream = encode_all(&mut encoder, &messages);
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();

            let mut decoder = FrameDecoder::new(key("session"));
            let mut decoded = Vec::new();
            for piece in cuts.windows(2) {
                decoder.push(&stream[piece[0]..piece[1]]);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    decoded.push(frame);
                }
            }
            decoder.finish().unwrap();
            prop_assert_eq!(decoded.len(), messages.len());
            for (seq, (frame, message)) in decoded.into_iter().zip(messages).enumerate() {
                prop_assert_eq!(frame.seq, u64::try_from(seq).unwrap());
                prop_assert_eq!(frame.message, message);
            }
            prop_assert_eq!(decoder.next_seq(), encoder.next_seq());
        }

        /// Frames like a connection's traffic (a few bases, each sent again
        /// with bytes changed and now and then another length), in batches
        /// of any size: each decodes to what was sent, so both ends' reference
        /// frames stay in step, and the records never take more than their
        /// bound.
        #[test]
        fn similar_frames_round_trip_through_deltas(
            bases in vec(vec(any::<u8>(), 1..300), 1..4),
            edits in vec((any::<prop::sample::Index>(), vec((any::<prop::sample::Index>(), any::<u8>()), 0..6), -8i64..8), 1..40),
            batch in 1usize..6,
            clock_steps in vec(any::<u32>(), 40),
        ) {
            let mut records = Vec::new();
            let mut ns = 1u64 << 40;
            for (i, (which, changes, grow)) in edits.iter().enumerate() {
                let mut frame = bases[which.index(bases.len())].clone();
                for (at, byte) in changes {
                    let at = at.index(frame.len());
                    frame[at] = *byte;
                }
                let len = (frame.len() as i64 + grow).clamp(1, 400) as usize;
                frame.resize(len, 0x5a);
                let exit = ExitIndex(1000 + 3 * i as u64);
                records.push(Record::Frame { exit, frame: frame.into() });
                ns += u64::from(clock_steps[i % clock_steps.len()]);
                records.push(Record::Clock { exit, ns });
            }
            let mut encoder = FrameEncoder::new(key("session"));
            let mut decoder = FrameDecoder::new(key("session"));
            let mut position = 1u64;
            for chunk in records.chunks(batch) {
                let mut out = BytesMut::new();
                encoder.encode_records(LogPosition(position), chunk, &mut out).unwrap();
                let bound: usize = RECORDS_HEADER_LEN + chunk.iter().map(encoded_record_len).sum::<usize>();
                prop_assert!(out.len() <= bound + FRAME_OVERHEAD);
                decoder.push(&out);
                let frame = decoder.next_frame().unwrap().unwrap();
                prop_assert_eq!(frame.message, Message::Records { first: LogPosition(position), records: chunk.to_vec() });
                position += chunk.len() as u64;
            }
        }

        /// Whatever arrives, the decoder returns verified frames or one error,
        /// and never panics.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512), magic in any::<bool>()) {
            let mut decoder = FrameDecoder::new(key("session"));
            if magic {
                decoder.push(&MAGIC);
                decoder.push(&PROTOCOL_VERSION.to_le_bytes());
            }
            let (frames, _) = decode_all(&mut decoder, &bytes);
            prop_assert!(frames.is_empty());
        }
    }

    #[test]
    fn each_record_kind_round_trips_and_sizes_match() {
        let records = sample_records();
        let mut out = BytesMut::new();
        let mut encoder = FrameEncoder::new(key("k"));
        encoder.encode_records(LogPosition(5), &records, &mut out).unwrap();
        let bound: usize = RECORDS_HEADER_LEN + records.iter().map(encoded_record_len).sum::<usize>();
        assert!(out.len() <= bound + FRAME_OVERHEAD, "{} bytes over the bound {bound}", out.len());
        assert_eq!(encoder.last_payload_len(), out.len() - FRAME_OVERHEAD);
        let (frames, end) = decode_all(&mut FrameDecoder::new(key("k")), &out);
        end.unwrap();
        assert_eq!(frames, [Frame { seq: 0, message: Message::Records { first: LogPosition(5), records } }]);
    }

    /// A kvstore SET as the guest's NIC receives it: Ethernet, IPv4, TCP with
    /// timestamps, then the RESP command; `n` moves what moves between one
    /// request and the next on a connection.
    #[allow(clippy::cast_possible_truncation)] // the low bits are what moves
    fn set_request(connection: u16, n: u32) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let payload = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:__rand_int__\r\n$3\r\nxxx\r\n";
        let total = u16::try_from(20 + 32 + payload.len()).unwrap();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&(u16::try_from(n % 65536).unwrap() ^ connection).to_be_bytes());
        f.extend_from_slice(&[0x40, 0, 64, 6]);
        f.extend_from_slice(&(n.wrapping_mul(7919) as u16).to_be_bytes());
        f.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 10]);
        f.extend_from_slice(&(40000 + connection).to_be_bytes());
        f.extend_from_slice(&6379u16.to_be_bytes());
        f.extend_from_slice(&(1_000_000 + n * payload.len() as u32).to_be_bytes());
        f.extend_from_slice(&(5_000_000 + n * 5).to_be_bytes());
        f.extend_from_slice(&[0x80, 0x18, 0x01, 0xf6]);
        f.extend_from_slice(&(n.wrapping_mul(31337) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 1, 1, 8, 10]);
        f.extend_from_slice(&(7_000_000 + n * 3).to_be_bytes());
        f.extend_from_slice(&(9_000_000 + n * 3).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn a_connections_requests_take_a_fraction_of_their_length() {
        let mut encoder = FrameEncoder::new(key("k"));
        let mut decoder = FrameDecoder::new(key("k"));
        let (mut raw, mut sent, mut position, mut exit) = (0usize, 0usize, 1u64, 100u64);
        for n in 0..50 {
            for connection in 0..16 {
                let frame = set_request(connection, n);
                raw += frame.len();
                exit += 3;
                let records = vec![Record::Frame { exit: ExitIndex(exit), frame: frame.into() }];
                let mut out = BytesMut::new();
                encoder.encode_records(LogPosition(position), &records, &mut out).unwrap();
                sent += encoder.last_payload_len();
                decoder.push(&out);
                assert_eq!(
                    decoder.next_frame().unwrap().unwrap().message,
                    Message::Records { first: LogPosition(position), records }
                );
                position += 1;
            }
        }
        let per_request = sent as f64 / 800.0;
        assert!(per_request < 40.0, "{per_request:.1} bytes per request (raw {:.1})", raw as f64 / 800.0);
    }

    #[test]
    fn largest_records_fit_one_frame() {
        let records = vec![
            Record::Frame { exit: ExitIndex(1), frame: vec![0xab; MAX_FRAME_LEN].into() },
            Record::Entropy { exit: ExitIndex(2), bytes: vec![0xcd; MAX_ENTROPY_LEN].into() },
        ];
        let mut out = BytesMut::new();
        FrameEncoder::new(key("k")).encode_records(LogPosition(1), &records, &mut out).unwrap();
        let (frames, end) = decode_all(&mut FrameDecoder::new(key("k")), &out);
        end.unwrap();
        assert_eq!(frames[0].message, Message::Records { first: LogPosition(1), records });
    }

    // --- refusals ---

    #[test]
    fn every_truncation_is_refused() {
        let mut out = BytesMut::new();
        FrameEncoder::new(key("k")).encode_records(LogPosition(1), &sample_records(), &mut out).unwrap();
        for len in 1..out.len() {
            assert_eq!(refused(&out[..len], &key("k")), FrameError::Truncated { buffered: len }, "cut at {len}");
        }
        // Nothing at all is a clean end, not a truncation.
        assert_eq!(decode_all(&mut FrameDecoder::new(key("k")), &[]).1, Ok(()));
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        // Each frame checked as the first of its stream.
        let frames: Vec<BytesMut> = [
            Message::Records { first: LogPosition(1), records: sample_records() },
            Message::Ack { upto: LogPosition(77) },
            Message::Hello(Hello { version: PROTOCOL_VERSION, nonce: [3; 32], identity: identity() }),
            Message::Shutdown,
        ]
        .into_iter()
        .map(|message| encode_all(&mut FrameEncoder::new(key("k")), &[message]))
        .collect();
        for frame in frames {
            for bit in 0..frame.len() * 8 {
                let mut bad = frame.to_vec();
                bad[bit / 8] ^= 1 << (bit % 8);
                // `refused` asserts no frame came out, and an error did
                // (possibly only at the end of the stream, when the flip made
                // the length longer).
                let error = refused(&bad, &key("k"));
                let at = bit / 8;
                match at {
                    0..2 => assert!(matches!(error, FrameError::BadMagic { .. }), "bit {bit}: {error:?}"),
                    2..4 => assert!(matches!(error, FrameError::UnsupportedVersion { .. }), "bit {bit}: {error:?}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn a_flipped_bit_with_a_recomputed_crc_fails_the_mac() {
        let mut out = BytesMut::new();
        FrameEncoder::new(key("k")).encode(&Message::Ack { upto: LogPosition(1) }, &mut out).unwrap();
        let mut bad = out.to_vec();
        bad[HEADER_LEN] ^= 1;
        let signed = bad.len() - CRC_LEN - MAC_LEN;
        let crc = crc32c::crc32c(&bad[..signed]).to_le_bytes();
        bad[signed..signed + CRC_LEN].copy_from_slice(&crc);
        assert_eq!(refused(&bad, &key("k")), FrameError::BadMac { seq: 0 });
    }

    #[test]
    fn a_damaged_frame_reports_its_crc() {
        let mut out = BytesMut::new();
        FrameEncoder::new(key("k")).encode(&Message::Ack { upto: LogPosition(1) }, &mut out).unwrap();
        let mut bad = out.to_vec();
        bad[HEADER_LEN + 2] ^= 0x40;
        let signed = bad.len() - CRC_LEN - MAC_LEN;
        let found = u32::from_le_bytes(bad[signed..signed + CRC_LEN].try_into().unwrap());
        let expected = crc32c::crc32c(&bad[..signed]);
        assert_eq!(refused(&bad, &key("k")), FrameError::CrcMismatch { seq: 0, expected, found });
    }

    #[test]
    fn duplicated_reordered_dropped_and_replayed_frames_are_refused() {
        let messages: Vec<Message> = (1..=3).map(|n| Message::Ack { upto: LogPosition(n) }).collect();
        let mut encoder = FrameEncoder::new(key("k"));
        let frames: Vec<BytesMut> =
            messages.iter().map(|m| encode_all(&mut encoder, std::slice::from_ref(m))).collect();
        let cases: [(&str, Vec<&BytesMut>, u64, u64); 4] = [
            ("duplicated", vec![&frames[0], &frames[0]], 1, 0),
            ("reordered", vec![&frames[1], &frames[0]], 0, 1),
            ("dropped", vec![&frames[0], &frames[2]], 1, 2),
            ("replayed", vec![&frames[0], &frames[1], &frames[2], &frames[1]], 3, 1),
        ];
        for (what, stream, expected, found) in cases {
            let mut decoder = FrameDecoder::new(key("k"));
            let bytes: Vec<u8> = stream.iter().flat_map(|f| f.iter().copied()).collect();
            let (good, end) = decode_all(&mut decoder, &bytes);
            assert_eq!(end, Err(FrameError::OutOfSequence { expected, found }), "{what}");
            // Everything before the bad frame, nothing from it on.
            assert_eq!(good.len(), usize::try_from(expected).unwrap(), "{what}");
        }
    }

    #[test]
    fn a_frame_of_another_session_key_is_refused() {
        let mut out = BytesMut::new();
        FrameEncoder::new(key("an earlier session")).encode(&Message::Shutdown, &mut out).unwrap();
        assert_eq!(refused(&out, &key("this session")), FrameError::BadMac { seq: 0 });
    }

    #[test]
    fn another_version_is_refused_as_soon_as_it_shows() {
        let mut out = BytesMut::new();
        // Version 1: fixed-width records, before issue 16's smaller log.
        FrameEncoder::with_version(key("k"), 1).encode(&Message::Shutdown, &mut out).unwrap();
        let mut decoder = FrameDecoder::new(key("k"));
        decoder.push(&out[..4]);
        assert_eq!(decoder.next_frame(), Err(FrameError::UnsupportedVersion { found: 1, supported: 2 }));
    }

    #[test]
    fn bad_magic_is_refused_as_soon_as_it_shows() {
        let mut decoder = FrameDecoder::new(key("k"));
        decoder.push(b"GE");
        assert_eq!(decoder.next_frame(), Err(FrameError::BadMagic { found: *b"GE" }));
    }

    #[test]
    fn an_oversize_length_is_refused_before_the_payload_arrives() {
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        header.extend_from_slice(&[FrameKind::Records as u8, 0]);
        header.extend_from_slice(&0u64.to_le_bytes());
        for len in [u32::try_from(MAX_PAYLOAD).unwrap() + 1, u32::MAX] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(&len.to_le_bytes());
            let mut decoder = FrameDecoder::new(key("k"));
            decoder.push(&bytes);
            assert_eq!(
                decoder.next_frame(),
                Err(FrameError::TooLarge { len: u64::from(len), max: u64::try_from(MAX_PAYLOAD).unwrap() })
            );
            assert_eq!(decoder.buffered(), 0);
        }
        // The largest allowed length waits for its payload.
        let mut bytes = header.clone();
        bytes.extend_from_slice(&u32::try_from(MAX_PAYLOAD).unwrap().to_le_bytes());
        let mut decoder = FrameDecoder::new(key("k"));
        decoder.push(&bytes);
        assert_eq!(decoder.next_frame(), Ok(None));
    }

    #[test]
    fn a_lowered_payload_cap_refuses_before_buffering_and_keeps_smaller_frames() {
        let k = key("k");
        let mut out = BytesMut::new();
        let mut encoder = FrameEncoder::new(k.clone());
        encoder.encode(&Message::Ack { upto: LogPosition(3) }, &mut out).unwrap();
        encoder.encode(&Message::Records { first: LogPosition(1), records: sample_records() }, &mut out).unwrap();
        let mut decoder = FrameDecoder::new(k);
        decoder.set_max_payload(8);
        // The 8-byte Ack passes; the Records frame is refused from its header alone.
        let ack_len = FRAME_OVERHEAD + 8;
        decoder.push(&out[..ack_len + HEADER_LEN]);
        assert_eq!(decoder.next_frame().unwrap().unwrap().message, Message::Ack { upto: LogPosition(3) });
        assert!(matches!(decoder.next_frame(), Err(FrameError::TooLarge { max: 8, .. })), "{:?}", decoder.failed());
        assert_eq!(decoder.buffered(), 0);
        // A cap above MAX_PAYLOAD is MAX_PAYLOAD.
        let mut decoder = FrameDecoder::new(key("k"));
        decoder.set_max_payload(usize::MAX);
        assert_eq!(decoder.max_payload, MAX_PAYLOAD);
    }

    #[test]
    fn after_an_error_everything_is_refused() {
        let k = key("k");
        let mut encoder = FrameEncoder::new(k.clone());
        let good = encode_all(&mut encoder, &[Message::Ack { upto: LogPosition(1) }]);
        let mut decoder = FrameDecoder::new(k.clone());
        decoder.push(b"xx");
        let error = decoder.next_frame().unwrap_err();
        decoder.push(&good);
        assert_eq!(decoder.next_frame(), Err(error.clone()));
        assert_eq!(decoder.finish(), Err(error.clone()));
        assert_eq!(decoder.failed(), Some(&error));
    }

    #[test]
    fn authentic_but_malformed_frames_are_refused() {
        let k = key("k");
        let clock = |exit: u64| [vec![RecordKind::Clock.byte()], varint(zigzag(exit)), varint(zigzag(5))].concat();
        let mut huge_entropy = vec![RecordKind::Entropy.byte(), 2];
        huge_entropy.extend_from_slice(&varint(u64::try_from(MAX_ENTROPY_LEN + 1).unwrap()));
        huge_entropy.extend_from_slice(&vec![0; MAX_ENTROPY_LEN + 1]);
        let mut short_frame = vec![RecordKind::Frame.byte(), 2, MODE_LITERAL];
        short_frame.extend_from_slice(&varint(100));
        short_frame.extend_from_slice(&[0; 10]);
        let frame = |body: &[u8]| [&[RecordKind::Frame.byte(), 2][..], body].concat();
        let malformed = |what| FrameError::Malformed { what };
        let mut trailing = clock(1);
        trailing.push(0);

        let records = FrameKind::Records as u8;
        let cases: Vec<(&str, Vec<u8>, FrameError)> = vec![
            ("unknown kind", seal_raw(&k, PROTOCOL_VERSION, 0x7f, 0, 0, &[]), FrameError::UnknownKind { kind: 0x7f }),
            (
                "reserved heartbeat kind",
                seal_raw(&k, PROTOCOL_VERSION, RESERVED_HEARTBEAT_KIND, 0, 0, &[]),
                FrameError::UnknownKind { kind: RESERVED_HEARTBEAT_KIND },
            ),
            (
                "flags",
                seal_raw(&k, PROTOCOL_VERSION, FrameKind::Shutdown as u8, 1, 0, &[]),
                FrameError::UnknownFlags { flags: 1 },
            ),
            (
                "unknown record kind",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, 1, &[0x66; 9])),
                FrameError::UnknownRecordKind { kind: 0x66 },
            ),
            (
                "entropy over its cap",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, 1, &huge_entropy)),
                FrameError::FieldTooLarge {
                    what: "entropy record",
                    len: u64::try_from(MAX_ENTROPY_LEN + 1).unwrap(),
                    max: u64::try_from(MAX_ENTROPY_LEN).unwrap(),
                },
            ),
            (
                "frame past the payload",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, 1, &short_frame)),
                SHORT,
            ),
            (
                "position 0",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(0, 1, &clock(1))),
                FrameError::Malformed { what: "records start at position 0" },
            ),
            (
                "no records",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, 0, &[])),
                FrameError::Malformed { what: "a records frame without records" },
            ),
            (
                "positions overflow",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(u64::MAX, 2, &[clock(1), clock(2)].concat()),
                ),
                FrameError::Malformed { what: "record positions overflow" },
            ),
            (
                "count past the payload",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, u32::MAX, &clock(1))),
                FrameError::Malformed { what: "more records than the payload can hold" },
            ),
            (
                "trailing bytes",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, 1, &trailing)),
                FrameError::Malformed { what: "trailing bytes after the payload" },
            ),
            (
                "a varint cut short",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &[0x82]),
                malformed("a varint is cut short"),
            ),
            (
                "a varint past 64 bits",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &[0xff; 11]),
                malformed("a varint runs past 64 bits"),
            ),
            (
                "a ten-byte varint with more than one bit in its last byte",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &[&[0x80; 9][..], &[0x02]].concat()),
                malformed("a varint runs past 64 bits"),
            ),
            (
                "an exit delta cut short",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(1, 1, &[RecordKind::Clock.byte(), 0x80]),
                ),
                malformed("a varint is cut short"),
            ),
            (
                "an unknown frame mode",
                seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(1, 1, &frame(&[9]))),
                malformed("unknown frame mode"),
            ),
            (
                "a delta copying past its (empty) reference",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(1, 1, &frame(&[MODE_DELTA, 7, 4, 2, 2, 1, 1])),
                ),
                malformed("a frame delta's run goes out of bounds"),
            ),
            (
                "a delta's literal past the frame",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(1, 1, &frame(&[MODE_DELTA, 7, 2, 0, 3, 1, 1, 1])),
                ),
                malformed("a frame delta's run goes out of bounds"),
            ),
            (
                "an empty run",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(1, 1, &frame(&[MODE_DELTA, 7, 2, 0, 0])),
                ),
                malformed("a frame delta's run is empty"),
            ),
            (
                "a delta's literal cut short",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(1, 1, &frame(&[MODE_DELTA, 7, 4, 0, 4, 1])),
                ),
                SHORT,
            ),
            (
                "a kept frame over the reference size",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    records,
                    0,
                    0,
                    &records_payload(1, 1, &frame(&[&[MODE_KEPT, 7][..], &varint(4096)].concat())),
                ),
                FrameError::FieldTooLarge { what: "kept frame record", len: 4096, max: 2048 },
            ),
            ("short ack", seal_raw(&k, PROTOCOL_VERSION, FrameKind::Ack as u8, 0, 0, &[1, 2, 3]), SHORT),
            (
                "hello of another version than its header",
                seal_raw(
                    &k,
                    PROTOCOL_VERSION,
                    FrameKind::Hello as u8,
                    0,
                    0,
                    &[&99u16.to_le_bytes()[..], &[0; 104]].concat(),
                ),
                FrameError::Malformed { what: "the hello's version differs from its header's" },
            ),
            (
                "unknown refusal",
                seal_raw(&k, PROTOCOL_VERSION, FrameKind::Refused as u8, 0, 0, &[99]),
                FrameError::Malformed { what: "unknown refusal reason" },
            ),
        ];
        for (what, frame, error) in cases {
            assert_eq!(refused(&frame, &k), error, "{what}");
        }
        // The hand-sealed frames are otherwise right: a good one decodes.
        let (frames, end) = decode_all(
            &mut FrameDecoder::new(k.clone()),
            &seal_raw(&k, PROTOCOL_VERSION, records, 0, 0, &records_payload(9, 1, &clock(4))),
        );
        end.unwrap();
        assert_eq!(
            frames[0].message,
            Message::Records { first: LogPosition(9), records: vec![Record::Clock { exit: ExitIndex(4), ns: 5 }] }
        );
    }

    #[test]
    fn the_encoder_refuses_what_the_decoder_would() {
        let mut encoder = FrameEncoder::new(key("k"));
        let mut out = BytesMut::new();
        let big_entropy = Record::Entropy { exit: ExitIndex(1), bytes: vec![0; MAX_ENTROPY_LEN + 1].into() };
        let big_frame = Record::Frame { exit: ExitIndex(1), frame: vec![0; MAX_FRAME_LEN + 1].into() };
        for record in [&big_entropy, &big_frame] {
            assert!(matches!(check_record(record), Err(FrameError::FieldTooLarge { .. })));
            assert!(matches!(
                encoder.encode_records(LogPosition(1), std::slice::from_ref(record), &mut out),
                Err(FrameError::FieldTooLarge { .. })
            ));
        }
        let many: Vec<Record> =
            (0..20).map(|n| Record::Frame { exit: ExitIndex(n), frame: vec![0; MAX_FRAME_LEN].into() }).collect();
        assert!(matches!(encoder.encode_records(LogPosition(1), &many, &mut out), Err(FrameError::TooLarge { .. })));
        assert!(matches!(
            encoder.encode_records(LogPosition(0), &sample_records(), &mut out),
            Err(FrameError::Malformed { .. })
        ));
        assert!(matches!(encoder.encode_records(LogPosition(1), &[], &mut out), Err(FrameError::Malformed { .. })));
        // Nothing was written and no sequence number was used.
        assert!(out.is_empty());
        assert_eq!(encoder.next_seq(), 0);
        encoder.encode_records(LogPosition(1), &sample_records(), &mut out).unwrap();
        assert_eq!(encoder.next_seq(), 1);
    }

    #[test]
    fn a_key_switch_applies_from_the_next_frame() {
        let (a, b) = (key("handshake"), key("session"));
        let mut encoder = FrameEncoder::new(a.clone());
        let mut out = encode_all(&mut encoder, &[Message::Shutdown]);
        encoder.set_key(b.clone());
        out.extend_from_slice(&encode_all(&mut encoder, &[Message::Ack { upto: LogPosition(3) }]));
        let mut decoder = FrameDecoder::new(a);
        decoder.push(&out);
        assert_eq!(decoder.next_frame().unwrap().unwrap().message, Message::Shutdown);
        decoder.set_key(b);
        assert_eq!(
            decoder.next_frame().unwrap().unwrap(),
            Frame { seq: 1, message: Message::Ack { upto: LogPosition(3) } }
        );
    }
}
