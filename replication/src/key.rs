//! The shared key of a pair: the secret both hosts hold, read from
//! `--key-file` (DESIGN "Settings").
//!
//! The key is the file's bytes with trailing whitespace stripped (so an
//! editor's or `echo`'s newline does not count), at least [`MIN_KEY_LEN`]
//! bytes. The usual form is 64 hex digits, what [`generate`] returns and
//! `ftvm keygen` writes; the digits are used as they are, not decoded, so any
//! file of 32 or more bytes serves. A file that group or others may access is
//! refused, as OpenSSH refuses such a private key: whoever can read it can
//! pose as either host, and whoever can write it can cut the pair apart.
//!
//! Neither `Debug` nor `Display` of [`SharedKey`] shows the key.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The shortest key accepted: 32 bytes, 256 bits when random.
pub use ftvm_mac::MIN_KEY_LEN;
/// The longest key file read: nobody's key is this long, and the cap keeps a
/// wrong path (a disk image, `/dev/zero`) from being read whole.
pub const MAX_KEY_FILE_LEN: usize = 4096;
/// Permission bits that must be clear on a key file: any access by group or
/// others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Why a key could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key file could not be opened or read.
    #[error("cannot read key file {}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The key file is open to group or others.
    #[error("key file {} has mode {mode:04o}: group and others must have no access (chmod 600 it)", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    /// The key file is not a regular file.
    #[error("key file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    /// The key is shorter than [`MIN_KEY_LEN`] after stripping whitespace.
    #[error("the key is {len} bytes long; at least {min} are needed (`ftvm keygen` writes one)")]
    TooShort { len: usize, min: usize },
    /// The key file is longer than [`MAX_KEY_FILE_LEN`].
    #[error("key file {} is over {max} bytes: not a key file", path.display())]
    TooLong { path: PathBuf, max: usize },
}

/// The secret a pair shares. Only the channel's handshake reads the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey(Vec<u8>);

impl SharedKey {
    /// Read the key from `path`, refusing a file open to group or others.
    /// The mode is checked on the opened file, so the file checked is the
    /// file read.
    pub fn from_file(path: &Path) -> Result<SharedKey, KeyError> {
        let io_error = |source| KeyError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io_error)?;
        let metadata = file.metadata().map_err(io_error)?;
        if !metadata.is_file() {
            return Err(KeyError::NotAFile { path: path.to_owned() });
        }
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER_BITS != 0 {
            return Err(KeyError::Permissions { path: path.to_owned(), mode });
        }
        let mut bytes = Vec::new();
        // One byte past the cap tells a file at the cap from a longer one.
        let limit = u64::try_from(MAX_KEY_FILE_LEN).unwrap_or(u64::MAX).saturating_add(1);
        file.take(limit).read_to_end(&mut bytes).map_err(io_error)?;
        if bytes.len() > MAX_KEY_FILE_LEN {
            return Err(KeyError::TooLong { path: path.to_owned(), max: MAX_KEY_FILE_LEN });
        }
        SharedKey::from_bytes(bytes)
    }

    /// A key from bytes held in memory (trailing whitespace stripped, as for
    /// a file).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Result<SharedKey, KeyError> {
        let mut bytes = bytes.into();
        let len = bytes.trim_ascii_end().len();
        bytes.truncate(len);
        if len < MIN_KEY_LEN {
            return Err(KeyError::TooShort { len, min: MIN_KEY_LEN });
        }
        Ok(SharedKey(bytes))
    }

    /// The key's bytes, for deriving other keys (the handshake's, the heartbeats').
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedKey(<{} bytes, not shown>)", self.0.len())
    }
}

impl fmt::Display for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<shared key, {} bytes>", self.0.len())
    }
}

/// A new key: 32 bytes from the operating system's random source, as 64
/// lowercase hex digits (no newline), the form `ftvm keygen` writes.
///
/// # Panics
///
/// If the operating system cannot supply random bytes (`getrandom(2)` fails
/// only before the kernel's pool is initialised at boot, where it blocks, or
/// on kernels older than 3.17 without `/dev/urandom`): there is no key to
/// return then, and no fallback that would be safe.
pub fn generate() -> String {
    let mut key = [0u8; 32];
    #[allow(clippy::expect_used)]
    getrandom::fill(&mut key).expect("the operating system's random source failed");
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    fn key_file(contents: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        fs::set_permissions(file.path(), fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    #[test]
    fn generated_keys_are_64_hex_digits_and_differ() {
        let a = generate();
        let b = generate();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_generated_key_file_is_read_with_its_newline_stripped() {
        let key = generate();
        let file = key_file(format!("{key}\n").as_bytes(), 0o600);
        let read = SharedKey::from_file(file.path()).unwrap();
        assert_eq!(read.as_bytes(), key.as_bytes());
        assert_eq!(read, SharedKey::from_bytes(key.clone()).unwrap());
        // Trailing spaces, tabs and CRLF too; leading whitespace is key.
        let file = key_file(format!("{key} \t\r\n\n").as_bytes(), 0o400);
        assert_eq!(SharedKey::from_file(file.path()).unwrap().as_bytes(), key.as_bytes());
        let file = key_file(format!(" {key}").as_bytes(), 0o600);
        assert_eq!(SharedKey::from_file(file.path()).unwrap().as_bytes().len(), 65);
    }

    #[test]
    fn a_file_open_to_group_or_others_is_refused() {
        let key = generate();
        for mode in [0o640, 0o604, 0o644, 0o660, 0o606, 0o610] {
            let file = key_file(key.as_bytes(), mode);
            match SharedKey::from_file(file.path()) {
                Err(KeyError::Permissions { path, mode: found }) => {
                    assert_eq!(path, file.path());
                    assert_eq!(found, mode);
                }
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
    }

    #[test]
    fn short_long_missing_and_non_files_are_refused() {
        let file = key_file(&[b'a'; 31], 0o600);
        assert!(matches!(SharedKey::from_file(file.path()), Err(KeyError::TooShort { len: 31, min: 32 })));
        // Whitespace does not count towards the length.
        let file = key_file(b"0123456789abcdef0123456789abcde\n\n", 0o600);
        assert!(matches!(SharedKey::from_file(file.path()), Err(KeyError::TooShort { len: 31, .. })));
        let file = key_file(&[b'a'; MAX_KEY_FILE_LEN + 1], 0o600);
        assert!(matches!(SharedKey::from_file(file.path()), Err(KeyError::TooLong { .. })));
        let file = key_file(&[b'a'; MAX_KEY_FILE_LEN], 0o600);
        assert!(SharedKey::from_file(file.path()).is_ok());
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(SharedKey::from_file(&dir.path().join("absent")), Err(KeyError::Io { .. })));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(SharedKey::from_file(dir.path()), Err(KeyError::NotAFile { .. })));
    }

    #[test]
    fn debug_and_display_do_not_show_the_key() {
        let secret = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeedf00dfeed";
        let key = SharedKey::from_bytes(secret).unwrap();
        for shown in [format!("{key:?}"), format!("{key}"), format!("{key:#?}")] {
            assert!(!shown.contains("f00d"), "{shown}");
        }
    }
}
