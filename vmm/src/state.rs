//! The saved-state format ftvm owns: every device's and the vCPU's state is a
//! plain serde struct, stored behind a header so that a blob from another
//! build, another device or a corrupted peer is refused, never misread.
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FTVMSTAT` |
//! | 16 | kind: the state type's name, NUL-padded (`"serial"`, `"vcpu"`) |
//! | 2 | major version: must equal the reader's |
//! | 2 | minor version: must not be newer than the reader's |
//! | 4 | payload length, capped at [`MAX_PAYLOAD`] before anything is allocated |
//! | 4 | CRC32C of the payload |
//! | n | payload, postcard-encoded |
//!
//! Fields added in a minor version carry `#[serde(default)]`.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// "FTVMSTAT".
pub const MAGIC: [u8; 8] = *b"FTVMSTAT";
/// Bytes of the header before the payload.
pub const HEADER_LEN: usize = 8 + 16 + 2 + 2 + 4 + 4;
/// Largest payload accepted (device state is small; guest memory travels
/// separately).
pub const MAX_PAYLOAD: u32 = 16 << 20;

/// A state type's identity and version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateVersion {
    /// Name of the state type, at most 16 bytes.
    pub kind: &'static str,
    /// Incompatible layout changes.
    pub major: u16,
    /// Compatible additions (new fields with defaults).
    pub minor: u16,
}

/// A state blob that cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Shorter than its header or its declared payload.
    #[error("state blob truncated: {len} bytes, {needed} needed")]
    Truncated { len: usize, needed: usize },
    /// Not a state blob at all.
    #[error("state blob has a bad magic number")]
    BadMagic,
    /// A blob of another state type.
    #[error("state blob is of kind {found:?}, expected {expected:?}")]
    WrongKind { expected: &'static str, found: String },
    /// A version this build cannot read.
    #[error("{kind} state version {found_major}.{found_minor} cannot be read by version {major}.{minor}")]
    WrongVersion { kind: &'static str, major: u16, minor: u16, found_major: u16, found_minor: u16 },
    /// The declared payload is larger than any valid state.
    #[error("{kind} state payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte cap")]
    TooLarge { kind: &'static str, len: u32 },
    /// The payload does not match its checksum.
    #[error("{kind} state checksum mismatch: header says {expected:#010x}, payload has {found:#010x}")]
    CrcMismatch { kind: &'static str, expected: u32, found: u32 },
    /// Bytes left over after the payload.
    #[error("{kind} state blob has {extra} trailing bytes")]
    Trailing { kind: &'static str, extra: usize },
    /// The payload does not decode as the state type.
    #[error("{kind} state payload does not decode: {reason}")]
    Decode { kind: &'static str, reason: String },
    /// The payload decoded but holds a value the device cannot take.
    #[error("{kind} state is invalid: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// Encode `state` behind a header for `version`.
pub fn encode<T: Serialize>(version: StateVersion, state: &T) -> Vec<u8> {
    // postcard only fails on a writer error or a type serde cannot express
    // (maps with non-string keys are fine): neither happens with a Vec and
    // the plain state structs of this crate, whatever values they hold.
    #[allow(clippy::expect_used)]
    let payload = postcard::to_allocvec(state).expect("state structs always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN.saturating_add(payload.len()));
    out.extend_from_slice(&MAGIC);
    // The name, cut at 16 bytes and NUL-padded (zip stops at the shorter).
    let mut kind = [0u8; 16];
    for (dst, src) in kind.iter_mut().zip(version.kind.as_bytes()) {
        *dst = *src;
    }
    out.extend_from_slice(&kind);
    out.extend_from_slice(&version.major.to_le_bytes());
    out.extend_from_slice(&version.minor.to_le_bytes());
    // Device state is far below 4 GiB; MAX_PAYLOAD is the real bound.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The header's fields, split off the front of a blob in order.
struct Header<'a> {
    rest: &'a [u8],
}

impl<'a> Header<'a> {
    /// The next `N` bytes; `None` when fewer are left.
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (field, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*field)
    }
}

/// Decode a blob written by [`encode`] for `version`, checking everything.
pub fn decode<T: DeserializeOwned>(version: StateVersion, blob: &[u8]) -> Result<T, StateError> {
    let truncated = |needed| StateError::Truncated { len: blob.len(), needed };
    let mut header = Header { rest: blob };
    let (Some(magic), Some(kind_bytes), Some(major), Some(minor), Some(len), Some(expected_crc)) = (
        header.take::<8>(),
        header.take::<16>(),
        header.take::<2>(),
        header.take::<2>(),
        header.take::<4>(),
        header.take::<4>(),
    ) else {
        return Err(truncated(HEADER_LEN));
    };
    if magic != MAGIC {
        return Err(StateError::BadMagic);
    }
    // The name ends at the first NUL, or fills all 16 bytes.
    let kind = kind_bytes.split(|b| *b == 0).next().unwrap_or_default();
    if kind != version.kind.as_bytes() {
        return Err(StateError::WrongKind {
            expected: version.kind,
            found: String::from_utf8_lossy(kind).into_owned(),
        });
    }
    let (major, minor) = (u16::from_le_bytes(major), u16::from_le_bytes(minor));
    if major != version.major || minor > version.minor {
        return Err(StateError::WrongVersion {
            kind: version.kind,
            major: version.major,
            minor: version.minor,
            found_major: major,
            found_minor: minor,
        });
    }
    let len = u32::from_le_bytes(len);
    let payload_len = usize::try_from(len)
        .ok()
        .filter(|_| len <= MAX_PAYLOAD)
        .ok_or(StateError::TooLarge { kind: version.kind, len })?;
    let payload = header.rest;
    match payload.len().checked_sub(payload_len) {
        None => return Err(truncated(HEADER_LEN.saturating_add(payload_len))),
        Some(0) => {}
        Some(extra) => return Err(StateError::Trailing { kind: version.kind, extra }),
    }
    let found = crc32c::crc32c(payload);
    let expected_crc = u32::from_le_bytes(expected_crc);
    if found != expected_crc {
        return Err(StateError::CrcMismatch { kind: version.kind, expected: expected_crc, found });
    }
    let (value, rest) = postcard::take_from_bytes(payload)
        .map_err(|e| StateError::Decode { kind: version.kind, reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(StateError::Trailing { kind: version.kind, extra: rest.len() });
    }
    Ok(value)
}

/// A device or vCPU whose state is plain data and whose live object can be
/// rebuilt from it.
pub trait Persist: Sized {
    /// The plain state struct.
    type State: Serialize + DeserializeOwned;
    /// Identity and version of [`Persist::State`].
    const VERSION: StateVersion;

    /// The current state.
    fn save(&self) -> Self::State;

    /// Check `state` and apply it. On error `self` is unchanged.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;

    /// [`Persist::save`], encoded with its header.
    fn save_blob(&self) -> Vec<u8> {
        encode(Self::VERSION, &self.save())
    }

    /// Decode, check and apply a blob from [`Persist::save_blob`].
    fn restore_blob(&mut self, blob: &[u8]) -> Result<(), StateError> {
        let state: Self::State = decode(Self::VERSION, blob)?;
        self.restore(&state)
    }
}

/// What a bus holds of a device's state: [`Persist`] made object-safe (no
/// associated type, no constant). Every [`Persist`] type has it through the
/// blanket implementation below, so a device writes only what is its own
/// (its state struct, `save`, `restore` and its checks) and cannot forget
/// to snapshot: a [`BusDevice`](crate::bus::BusDevice) must be `Persist`.
pub trait Snapshot {
    /// The state as a versioned blob ([`encode`]).
    fn snapshot(&self) -> Vec<u8>;

    /// Replace the state with a blob from [`Snapshot::snapshot`],
    /// validating it first; on error the object is unchanged.
    fn restore_snapshot(&mut self, blob: &[u8]) -> Result<(), StateError>;
}

impl<P: Persist> Snapshot for P {
    fn snapshot(&self) -> Vec<u8> {
        self.save_blob()
    }

    fn restore_snapshot(&mut self, blob: &[u8]) -> Result<(), StateError> {
        self.restore_blob(blob)
    }
}

/// Checks every [`Persist`] type must pass: save → restore → save gives the
/// same bytes, a blob of another version or a truncated one is refused with a
/// typed error and leaves the object unchanged. `mutate` must change the
/// state so that its blob differs.
#[cfg(test)]
pub(crate) fn check_persist<P: Persist>(mut fresh: P, mut used: P, mutate: impl FnOnce(&mut P)) {
    let before = fresh.save_blob();
    mutate(&mut used);
    let blob = used.save_blob();
    assert_ne!(before, blob, "mutation did not change the saved state");
    fresh.restore_blob(&blob).expect("restore of own blob");
    assert_eq!(fresh.save_blob(), blob, "save → restore → save differs");

    // Wrong major version.
    let mut wrong = blob.clone();
    wrong[24] ^= 0x80;
    let untouched = used.save_blob();
    assert!(matches!(used.restore_blob(&wrong), Err(StateError::WrongVersion { .. })));
    // Newer minor version.
    let mut newer = blob.clone();
    newer[26..28].copy_from_slice(&(P::VERSION.minor + 1).to_le_bytes());
    assert!(matches!(used.restore_blob(&newer), Err(StateError::WrongVersion { .. })));
    // Truncated at every length.
    for n in 0..blob.len() {
        assert!(
            matches!(used.restore_blob(&blob[..n]), Err(StateError::Truncated { .. })),
            "truncation to {n} bytes not refused as truncated"
        );
    }
    // A flipped payload byte.
    if blob.len() > HEADER_LEN {
        let mut corrupt = blob.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        assert!(matches!(used.restore_blob(&corrupt), Err(StateError::CrcMismatch { .. })));
    }
    assert_eq!(used.save_blob(), untouched, "a refused blob changed the state");
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: StateVersion = StateVersion { kind: "t", major: 1, minor: 1 };

    #[test]
    fn round_trip_and_refusals() {
        let blob = encode(V, &(7u32, String::from("x")));
        let back: (u32, String) = decode(V, &blob).unwrap();
        assert_eq!(back, (7, "x".into()));
        let other = StateVersion { kind: "u", ..V };
        assert!(matches!(decode::<(u32, String)>(other, &blob), Err(StateError::WrongKind { .. })));
        let mut big = blob.clone();
        big[28..32].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(decode::<(u32, String)>(V, &big), Err(StateError::TooLarge { .. })));
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(decode::<(u32, String)>(V, &long), Err(StateError::Trailing { .. })));
        let mut magic = blob;
        magic[0] = b'X';
        assert_eq!(decode::<(u32, String)>(V, &magic), Err(StateError::BadMagic));
    }
}
