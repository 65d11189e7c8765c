//! The heartbeat datagram: one fixed-size, MACed UDP datagram that says "this
//! process of this pair is alive", sent both ways on the dedicated link
//! (DESIGN "Failure detection and split brain").
//!
//! # Datagram layout
//!
//! All integers are little-endian. Every datagram is exactly
//! [`DATAGRAM_LEN`] (118) bytes.
//!
//! | offset | size | field                                                                    |
//! | ------ | ---- | ------------------------------------------------------------------------ |
//! | 0      | 2    | magic, [`MAGIC`] (`"fH"`)                                                |
//! | 2      | 2    | version, [`VERSION`]                                                     |
//! | 4      | 1    | sender's role: 1 primary, 2 secondary ([`Role`])                         |
//! | 5      | 1    | flags; none are defined in version 2, so it must be 0                    |
//! | 6      | 32   | pair id ([`PairId`]): which protected VM this pair serves                |
//! | 38     | 8    | incarnation ([`Incarnation`]): random, chosen when the sender started    |
//! | 46     | 8    | sequence number: 1, 2, 3 … per incarnation                               |
//! | 54     | 8    | the sender's exit index (informational)                                  |
//! | 62     | 8    | the sender's log position (informational)                                |
//! | 70     | 16   | challenge ([`Challenge`]): the sender's, for its peer to echo            |
//! | 86     | 16   | echo: the latest challenge the sender saw from its peer (zeros: none)    |
//! | 102    | 16   | HMAC-SHA256 of bytes `0 .. 102` under the heartbeat key, first 16 bytes  |
//!
//! Version 1 (86 bytes, without challenge and echo) let a heartbeat
//! recorded in an earlier run of the pair pass for a restart of the peer.
//!
//! The heartbeat key is `HMAC-SHA256(shared key, "heartbeat")` ([`HeartbeatKey`]):
//! heartbeats are authenticated with the pair's key (DESIGN), but never with
//! the very key the logging channel's handshake uses, so no heartbeat tag can
//! be mistaken for, or help forge, anything on the channel.
//!
//! # Why each field
//!
//! - The **pair id** keeps two pairs that share a link (and, by mistake, a
//!   key) from keeping each other alive. [`PairId::for_vm_name`] derives it
//!   from the VM name; any 32 bytes both hosts agree on will do.
//! - The **role** keeps a host's own heartbeats, reflected back at it, from
//!   counting as its peer's.
//! - The **incarnation** and **sequence number** let the receiver refuse a
//!   replayed datagram (sequence not newer than one already seen) while still
//!   accepting a peer that restarted (a new random incarnation, whose
//!   sequence starts again at 1).
//! - The **exit index** and **log position** are for status and logs only:
//!   nothing decides on them, because a heartbeat is not ordered with the log.
//! - The **challenge** and **echo** prove a heartbeat fresh: each receiver
//!   holds a random challenge, unknown before it started, and believes a
//!   heartbeat only if it echoes that challenge (or, from the incarnation
//!   it already follows, the one before). A heartbeat recorded before the
//!   receiver started (or before its last change of challenge) cannot echo
//!   it, and no one without the key can make one that does. See
//!   [`crate::detector`] for how a receiver challenges a stranger.
//!
//! # What the decoder checks, in order
//!
//! The length (exactly [`DATAGRAM_LEN`]), the magic and the version, then
//! the MAC, and only then anything the datagram says: role and flags. A
//! datagram that fails a check is refused whole. Any input of any length is
//! refused or accepted without a panic (see the proptests below). Whether a
//! valid heartbeat is *new* (not a replay) and for *this* pair is the
//! receiver's question ([`crate::detector::Receiver`]), not the decoder's.
//!
//! # Why a 16-byte MAC
//!
//! As for the logging channel's frames: truncating HMAC-SHA256 to its
//! leftmost 128 bits is allowed by RFC 2104 §5 and NIST SP 800-107 §5.3.4; a
//! forger without the key guesses a tag with probability 2^-128 per datagram.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The first two bytes of every heartbeat.
pub const MAGIC: [u8; 2] = *b"fH";
/// The datagram version this build speaks (2: with challenge and echo).
pub const VERSION: u16 = 2;
/// The length of every heartbeat datagram.
pub const DATAGRAM_LEN: usize = SIGNED_LEN + TAG_LEN;
/// The bytes the MAC covers: everything before the tag.
const SIGNED_LEN: usize = 102;
/// Length of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 16;
/// The shortest shared key accepted, as for the logging channel's key file.
pub use ftvm_mac::MIN_KEY_LEN;
/// The label the heartbeat key is derived with.
const KEY_LABEL: &[u8] = b"heartbeat";
/// The label the pair id of a VM name is derived with.
const PAIR_LABEL: &[u8] = b"ftvm pair id v1\0";
/// The label a receiver's next challenge is derived with.
const CHALLENGE_LABEL: &[u8] = b"next challenge";
/// Length of a [`Challenge`].
pub const CHALLENGE_LEN: usize = 16;

/// Why a datagram is not a heartbeat, or a key not a heartbeat key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// The datagram is not [`DATAGRAM_LEN`] bytes long.
    #[error("a heartbeat is {expected} bytes long, this datagram is {len}")]
    WrongLength { len: usize, expected: usize },
    /// The datagram does not start with [`MAGIC`].
    #[error("not a heartbeat: magic {found:02x?} instead of {MAGIC:02x?}")]
    BadMagic { found: [u8; 2] },
    /// The sender speaks another version.
    #[error("heartbeat version {found} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion { found: u16 },
    /// The MAC is wrong: forged, damaged, or sent with another key.
    #[error("the heartbeat's MAC is wrong: forged, damaged, or sent with another key")]
    BadMac,
    /// A correctly MACed heartbeat with a role byte this version does not
    /// define (a sender bug: it holds the key).
    #[error("the heartbeat's role byte {found} is neither 1 (primary) nor 2 (secondary)")]
    BadRole { found: u8 },
    /// A correctly MACed heartbeat with flags set that this version does not
    /// define.
    #[error("the heartbeat has flags {found:#04x} set; version {VERSION} defines none")]
    BadFlags { found: u8 },
    /// The shared key is too short to derive a heartbeat key from.
    #[error("the shared key is {len} bytes long; at least {MIN_KEY_LEN} are needed")]
    KeyTooShort { len: usize },
}

/// Which side of the pair sent a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The VMM whose guest is live.
    Primary,
    /// The VMM that replays the primary's log.
    Secondary,
}

impl Role {
    /// The other side of the pair: whose heartbeats this side receives.
    pub fn peer(self) -> Role {
        match self {
            Role::Primary => Role::Secondary,
            Role::Secondary => Role::Primary,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Secondary => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Role, MessageError> {
        match byte {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Secondary),
            found => Err(MessageError::BadRole { found }),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

/// Which protected VM a pair serves: 32 bytes both hosts agree on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PairId(pub [u8; 32]);

impl PairId {
    /// The pair id of the VM called `name` (`--name`): SHA-256 of a fixed
    /// label and the name. Both hosts run the VM under the same name, so
    /// they derive the same id without exchanging it.
    pub fn for_vm_name(name: &str) -> PairId {
        let mut hash = Sha256::new();
        hash.update(PAIR_LABEL);
        hash.update(name.as_bytes());
        PairId(hash.finalize().into())
    }
}

impl fmt::Debug for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight bytes tell pairs apart in a log line; all 32 are noise.
        write!(f, "PairId(")?;
        for byte in self.0.iter().take(8) {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// One run of a sender process: a random 64-bit number chosen when it
/// starts, so that a restarted process (whose sequence numbers start again)
/// is told apart from a replay of the old one's heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Incarnation(pub u64);

impl Incarnation {
    /// A fresh incarnation from the operating system's random source.
    pub fn random() -> Result<Incarnation, getrandom::Error> {
        getrandom::u64().map(Incarnation)
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A receiver's challenge: 16 bytes its peer must echo for a heartbeat to
/// be believed. Random when the receiver starts; the next one is derived
/// from it under the heartbeat key ([`HeartbeatKey::next_challenge`]), so
/// nobody without the key can tell it in advance.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Challenge(pub [u8; CHALLENGE_LEN]);

impl Challenge {
    /// The echo of a sender that has seen no challenge yet.
    pub const NONE: Challenge = Challenge([0; CHALLENGE_LEN]);

    /// A fresh challenge from the operating system's random source.
    pub fn random() -> Result<Challenge, getrandom::Error> {
        let mut bytes = [0u8; CHALLENGE_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Challenge(bytes))
    }
}

impl fmt::Debug for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Challenge(")?;
        for byte in self.0.iter().take(4) {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Where a sender is, for status and logs: nothing is decided on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The sender's exit index: guest exits since boot.
    pub exit_index: u64,
    /// The sender's log position: on a primary the last record written, on
    /// a secondary the last record received.
    pub log_position: u64,
}

/// A heartbeat's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Who sent it.
    pub role: Role,
    /// Which pair it belongs to.
    pub pair: PairId,
    /// The sending process's incarnation.
    pub incarnation: Incarnation,
    /// 1, 2, 3 … per incarnation.
    pub seq: u64,
    /// Where the sender was when it sent it.
    pub progress: Progress,
    /// The sender's challenge, for the receiver to echo.
    pub challenge: Challenge,
    /// The receiver's challenge as the sender last saw it
    /// ([`Challenge::NONE`] if it has seen none).
    pub echo: Challenge,
}

/// The key heartbeats are MACed with, derived from the pair's shared key.
/// Its `Debug` does not show the key.
#[derive(Clone)]
pub struct HeartbeatKey(Hmac<Sha256>);

impl HeartbeatKey {
    /// `HMAC-SHA256(shared, "heartbeat")`, ready to MAC heartbeats. `shared`
    /// is the pair's key (the key file's bytes), at least [`MIN_KEY_LEN`]
    /// bytes.
    pub fn derive(shared: &[u8]) -> Result<HeartbeatKey, MessageError> {
        if shared.len() < MIN_KEY_LEN {
            return Err(MessageError::KeyTooShort { len: shared.len() });
        }
        let mut derive = hmac_sha256(shared);
        derive.update(KEY_LABEL);
        let key: [u8; 32] = derive.finalize().into_bytes().into();
        Ok(HeartbeatKey(hmac_sha256(&key)))
    }

    fn tag(&self, signed: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.0.clone();
        mac.update(signed);
        mac
    }

    /// The challenge a receiver moves to after `current`, when it has
    /// believed `incarnation`: HMAC(heartbeat key, label ‖ current ‖
    /// incarnation), truncated. Heartbeats that echo `current` from any
    /// other incarnation are then refused.
    pub fn next_challenge(&self, current: Challenge, incarnation: Incarnation) -> Challenge {
        let mut mac = self.tag(CHALLENGE_LABEL);
        mac.update(&current.0);
        mac.update(&incarnation.0.to_le_bytes());
        let digest = mac.finalize().into_bytes();
        let mut next = [0u8; CHALLENGE_LEN];
        for (out, byte) in next.iter_mut().zip(digest.iter()) {
            *out = *byte;
        }
        Challenge(next)
    }
}

impl fmt::Debug for HeartbeatKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HeartbeatKey(..)")
    }
}

use ftvm_mac::hmac_sha256;

impl Heartbeat {
    /// The datagram for this heartbeat, MACed with `key`.
    pub fn encode(&self, key: &HeartbeatKey) -> [u8; DATAGRAM_LEN] {
        let mut signed = [0u8; SIGNED_LEN];
        let mut writer = Writer(&mut signed);
        writer.put(&MAGIC);
        writer.put(&VERSION.to_le_bytes());
        writer.put(&[self.role.to_byte(), 0]); // role, flags
        writer.put(&self.pair.0);
        writer.put(&self.incarnation.0.to_le_bytes());
        writer.put(&self.seq.to_le_bytes());
        writer.put(&self.progress.exit_index.to_le_bytes());
        writer.put(&self.progress.log_position.to_le_bytes());
        writer.put(&self.challenge.0);
        writer.put(&self.echo.0);
        debug_assert!(writer.0.is_empty(), "the fields fill the signed part exactly");
        let tag = key.tag(&signed).finalize().into_bytes();
        let mut datagram = [0u8; DATAGRAM_LEN];
        let (head, tail) = datagram.split_at_mut(SIGNED_LEN);
        head.copy_from_slice(&signed);
        for (out, byte) in tail.iter_mut().zip(tag.iter()) {
            *out = *byte;
        }
        datagram
    }

    /// The heartbeat in `datagram`, if it is one and its MAC is right under
    /// `key`. Never panics, whatever the bytes.
    pub fn decode(datagram: &[u8], key: &HeartbeatKey) -> Result<Heartbeat, MessageError> {
        let Ok(datagram) = <&[u8; DATAGRAM_LEN]>::try_from(datagram) else {
            return Err(MessageError::WrongLength { len: datagram.len(), expected: DATAGRAM_LEN });
        };
        let mut reader = Reader(datagram);
        let magic: [u8; 2] = reader.array();
        if magic != MAGIC {
            return Err(MessageError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes(reader.array());
        if version != VERSION {
            return Err(MessageError::UnsupportedVersion { found: version });
        }
        let (signed, tag) = datagram.split_at(SIGNED_LEN);
        // Constant-time comparison of the leftmost TAG_LEN bytes.
        key.tag(signed).verify_truncated_left(tag).map_err(|_| MessageError::BadMac)?;
        let [role] = reader.array();
        let role = Role::from_byte(role)?;
        let [flags] = reader.array();
        if flags != 0 {
            return Err(MessageError::BadFlags { found: flags });
        }
        Ok(Heartbeat {
            role,
            pair: PairId(reader.array()),
            incarnation: Incarnation(u64::from_le_bytes(reader.array())),
            seq: u64::from_le_bytes(reader.array()),
            progress: Progress {
                exit_index: u64::from_le_bytes(reader.array()),
                log_position: u64::from_le_bytes(reader.array()),
            },
            challenge: Challenge(reader.array()),
            echo: Challenge(reader.array()),
        })
    }
}

/// Reads fixed-size fields off the front of a whole datagram. The decoder
/// reads exactly the layout's fields from an array of exactly
/// [`DATAGRAM_LEN`] bytes, so a read past the end is a bug in this file, not
/// something a peer can cause; it yields zeros rather than panicking.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some((head, rest)) = self.0.split_first_chunk::<N>() {
            out = *head;
            self.0 = rest;
        } else {
            debug_assert!(false, "heartbeat layout read past the datagram");
        }
        out
    }
}

/// Writes fields one after another into the signed part; the mirror of
/// [`Reader`]. The encoder writes exactly the layout's fields, so running out
/// of room is a bug in this file (caught by the layout test), never a panic.
struct Writer<'a>(&'a mut [u8]);

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        match std::mem::take(&mut self.0).split_at_mut_checked(bytes.len()) {
            Some((head, rest)) => {
                head.copy_from_slice(bytes);
                self.0 = rest;
            }
            None => debug_assert!(false, "heartbeat layout wrote past the signed part"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> HeartbeatKey {
        HeartbeatKey::derive(&[7u8; 32]).unwrap()
    }

    fn sample() -> Heartbeat {
        Heartbeat {
            role: Role::Secondary,
            pair: PairId::for_vm_name("kv"),
            incarnation: Incarnation(0x0123_4567_89ab_cdef),
            seq: 42,
            progress: Progress { exit_index: 1_000_000, log_position: 77 },
            challenge: Challenge([0xc1; 16]),
            echo: Challenge([0xe2; 16]),
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let datagram = sample().encode(&key());
        assert_eq!(datagram.len(), 118);
        assert_eq!(&datagram[0..2], b"fH");
        assert_eq!(&datagram[2..4], &2u16.to_le_bytes());
        assert_eq!(datagram[4], 2);
        assert_eq!(datagram[5], 0);
        assert_eq!(&datagram[6..38], &PairId::for_vm_name("kv").0);
        assert_eq!(&datagram[38..46], &0x0123_4567_89ab_cdefu64.to_le_bytes());
        assert_eq!(&datagram[46..54], &42u64.to_le_bytes());
        assert_eq!(&datagram[54..62], &1_000_000u64.to_le_bytes());
        assert_eq!(&datagram[62..70], &77u64.to_le_bytes());
        assert_eq!(&datagram[70..86], &[0xc1; 16]);
        assert_eq!(&datagram[86..102], &[0xe2; 16]);
        // The tag is HMAC(HMAC(shared, "heartbeat"), bytes 0..102), truncated.
        let derived: [u8; 32] = {
            let mut mac = ftvm_mac::hmac_sha256(&[7u8; 32]);
            mac.update(b"heartbeat");
            mac.finalize().into_bytes().into()
        };
        let mut mac = ftvm_mac::hmac_sha256(&derived);
        mac.update(&datagram[..102]);
        assert_eq!(&datagram[102..], &mac.finalize().into_bytes()[..16]);
    }

    #[test]
    fn round_trip() {
        let heartbeat = sample();
        assert_eq!(Heartbeat::decode(&heartbeat.encode(&key()), &key()), Ok(heartbeat));
    }

    #[test]
    fn a_short_key_is_refused() {
        assert_eq!(HeartbeatKey::derive(&[1u8; 31]).unwrap_err(), MessageError::KeyTooShort { len: 31 });
        assert!(HeartbeatKey::derive(&[1u8; 32]).is_ok());
    }

    #[test]
    fn another_key_is_a_bad_mac() {
        let other = HeartbeatKey::derive(&[8u8; 32]).unwrap();
        assert_eq!(Heartbeat::decode(&sample().encode(&other), &key()), Err(MessageError::BadMac));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let datagram = sample().encode(&key());
        for byte in 0..DATAGRAM_LEN {
            for bit in 0..8 {
                let mut bad = datagram;
                bad[byte] ^= 1 << bit;
                assert!(Heartbeat::decode(&bad, &key()).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn checks_come_in_the_documented_order() {
        let good = sample().encode(&key());
        assert_eq!(
            Heartbeat::decode(&good[..117], &key()),
            Err(MessageError::WrongLength { len: 117, expected: DATAGRAM_LEN })
        );
        // A version-1 heartbeat (86 bytes) is refused by its length.
        assert_eq!(Heartbeat::decode(&good[..86], &key()), Err(MessageError::WrongLength { len: 86, expected: 118 }));
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(Heartbeat::decode(&long, &key()), Err(MessageError::WrongLength { len: 119, expected: 118 }));
        let mut bad = good;
        bad[0] = b'x';
        assert_eq!(Heartbeat::decode(&bad, &key()), Err(MessageError::BadMagic { found: *b"xH" }));
        let mut bad = good;
        bad[2] = 1;
        assert_eq!(Heartbeat::decode(&bad, &key()), Err(MessageError::UnsupportedVersion { found: 1 }));
        // Role and flags are only looked at under a good MAC: a forger
        // learns nothing from which of them is refused.
        let mut bad = good;
        bad[4] = 9;
        assert_eq!(Heartbeat::decode(&bad, &key()), Err(MessageError::BadMac));
    }

    /// A datagram with the given role and flag bytes, correctly MACed (what
    /// a buggy sender holding the key would send).
    fn signed_with(role: u8, flags: u8) -> [u8; DATAGRAM_LEN] {
        let mut datagram = sample().encode(&key());
        datagram[4] = role;
        datagram[5] = flags;
        let tag = key().tag(&datagram[..SIGNED_LEN]).finalize().into_bytes();
        datagram[SIGNED_LEN..].copy_from_slice(&tag[..TAG_LEN]);
        datagram
    }

    #[test]
    fn undefined_role_and_flags_are_refused_under_a_good_mac() {
        assert_eq!(Heartbeat::decode(&signed_with(3, 0), &key()), Err(MessageError::BadRole { found: 3 }));
        assert_eq!(Heartbeat::decode(&signed_with(1, 0x80), &key()), Err(MessageError::BadFlags { found: 0x80 }));
        assert_eq!(Heartbeat::decode(&signed_with(1, 0), &key()).unwrap().role, Role::Primary);
    }

    #[test]
    fn pair_ids_differ_by_name_and_debug_hides_keys() {
        assert_ne!(PairId::for_vm_name("a"), PairId::for_vm_name("b"));
        assert_eq!(PairId::for_vm_name("a"), PairId::for_vm_name("a"));
        assert_eq!(format!("{:?}", key()), "HeartbeatKey(..)");
        assert_eq!(Incarnation(0xab).to_string(), "00000000000000ab");
    }

    fn any_heartbeat() -> impl Strategy<Value = Heartbeat> {
        (
            any::<bool>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
        )
            .prop_map(|(primary, pair, incarnation, seq, exit_index, log_position, challenge, echo)| {
                Heartbeat {
                    role: if primary { Role::Primary } else { Role::Secondary },
                    pair: PairId(pair),
                    incarnation: Incarnation(incarnation),
                    seq,
                    progress: Progress { exit_index, log_position },
                    challenge: Challenge(challenge),
                    echo: Challenge(echo),
                }
            })
    }

    #[test]
    fn the_next_challenge_depends_on_key_challenge_and_incarnation() {
        let c = Challenge([5; 16]);
        let next = key().next_challenge(c, Incarnation(1));
        assert_ne!(next, c);
        assert_eq!(next, key().next_challenge(c, Incarnation(1)));
        assert_ne!(next, key().next_challenge(c, Incarnation(2)));
        assert_ne!(next, key().next_challenge(Challenge([6; 16]), Incarnation(1)));
        assert_ne!(next, HeartbeatKey::derive(&[8u8; 32]).unwrap().next_challenge(c, Incarnation(1)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Almost always refused; the point is that it returns at all.
            let _ = Heartbeat::decode(&bytes, &key());
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_header_never_panic(rest in any::<[u8; DATAGRAM_LEN - 4]>()) {
            let mut datagram = [0u8; DATAGRAM_LEN];
            datagram[..2].copy_from_slice(&MAGIC);
            datagram[2..4].copy_from_slice(&VERSION.to_le_bytes());
            datagram[4..].copy_from_slice(&rest);
            prop_assert_eq!(Heartbeat::decode(&datagram, &key()), Err(MessageError::BadMac));
        }

        #[test]
        fn every_heartbeat_round_trips(heartbeat in any_heartbeat()) {
            prop_assert_eq!(Heartbeat::decode(&heartbeat.encode(&key()), &key()), Ok(heartbeat));
        }

        #[test]
        fn any_single_byte_change_is_refused(heartbeat in any_heartbeat(), at in 0..DATAGRAM_LEN, x in 1..=255u8) {
            let mut datagram = heartbeat.encode(&key());
            datagram[at] ^= x;
            prop_assert!(Heartbeat::decode(&datagram, &key()).is_err());
        }
    }
}
