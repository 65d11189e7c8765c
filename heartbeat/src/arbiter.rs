//! The arbiter: an atomic test-and-set with a generation number on storage
//! both hosts share (`--arbiter file:PATH`), so that when the pair splits
//! exactly one side carries on (DESIGN "Failure detection and split brain").
//!
//! # The rule
//!
//! 1. When the pair forms (the logging channel's handshake is done), both
//!    sides read the arbiter's generation ([`Arbiter::current`]) and keep it.
//! 2. When one side decides its peer is dead (the secondary before it goes
//!    live; the primary before it carries on without a secondary), it claims
//!    with that generation ([`Arbiter::claim`]).
//! 3. A claim wins only if the file still holds that generation, and the
//!    win moves it one on, so exactly one claim wins per generation. The
//!    winner carries on; it reads the new generation as the one it will claim
//!    with when the next pair forms (after repair).
//! 4. The loser ([`Claim::Lost`]) stops its guest at once and exits with
//!    status 4 ("lost the arbiter", DESIGN "Exit status"). So does a side
//!    whose claim fails with an error: an error is never a win, and two live
//!    copies of one guest must never exist.
//!
//! Both sides can decide "dead" at once (a broken link, not a dead host):
//! both claim the same generation and one loses. A side that hesitates past
//! the other's win finds a newer generation and loses too.
//!
//! # The file
//!
//! A small text file, ftvm's own format, exactly three lines each ending in
//! `\n`:
//!
//! ```text
//! ftvm-arbiter v1
//! generation 7
//! owner kv-secondary-3f2a9c01d4e5b6a7
//! ```
//!
//! `generation` is a decimal u64 (digits only), 0 in a new file. `owner` is
//! who won the last claim, as the caller named itself ([`Owner`]; by
//! convention `NAME-ROLE-INCARNATION`), or `(none)` in a new file. Anything
//! else is refused as [`ArbiterError::Malformed`] and the file is left as it
//! is: an arbiter that cannot be read is not silently reset, because a reset
//! generation would let an old claim win again.
//!
//! # How it is made atomic
//!
//! Every operation holds an exclusive `flock(2)` on a lock file next to the
//! arbiter file, `PATH.lock` (created if missing, never renamed, never
//! written). Under the lock a claim reads the file, and if it wins writes
//! the new contents to `PATH.tmp`, fsyncs it, renames it over `PATH` and
//! fsyncs the directory: a crash leaves either the old file or the new one,
//! never a torn one. The lock is not taken on `PATH` itself because the
//! rename replaces that inode: a process waiting on the old inode's lock
//! would then read a file nobody else was locking.
//!
//! On NFS, Linux turns `flock` into a whole-file POSIX lock that the server
//! arbitrates, so the lock holds across hosts; the rename is atomic on the
//! server. If `PATH` is a symbolic link, the file it points to is the
//! arbiter (the link is resolved when the arbiter is opened), so the rename
//! never replaces a link to shared storage with a local file.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use crate::message::{Incarnation, Role};

/// The first line of every arbiter file.
const HEADER: &str = "ftvm-arbiter v1";
/// What the owner line holds before anyone won a claim.
const NO_OWNER: &str = "(none)";
/// The longest arbiter file read: a valid one is under 250 bytes.
const MAX_FILE_LEN: u64 = 1024;
/// The scheme of the only arbiter there is so far.
const FILE_SCHEME: &str = "file:";

/// Why the arbiter could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArbiterError {
    /// The `--arbiter` value is not one this build understands.
    #[error("arbiter `{spec}` is not understood: the accepted form is file:PATH (PATH naming a file)")]
    BadSpec { spec: String },
    /// The directory that should hold the arbiter file does not exist.
    #[error("the arbiter's directory {} does not exist (ftvm creates the file, not its directory)", dir.display())]
    NoDirectory { dir: PathBuf },
    /// Reading, writing or locking a file failed.
    #[error("arbiter file {}: I/O error", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The file is not in ftvm's arbiter format; it was left as it is.
    #[error("arbiter file {} is malformed at line {line} (expected {expected}); it was left as it is", path.display())]
    Malformed { path: PathBuf, line: usize, expected: &'static str },
    /// An owner name that the file format cannot hold.
    #[error("`{owner}` cannot name an arbiter owner: 1 to {max} characters from A-Z a-z 0-9 - _ . : @", max = Owner::MAX_LEN)]
    BadOwner { owner: String },
    /// The generation is u64::MAX and cannot move on.
    #[error("arbiter file {}: the generation cannot go past {}", path.display(), u64::MAX)]
    GenerationExhausted { path: PathBuf },
}

/// A generation of the arbiter: how many claims have been won on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who won a claim: a name the file format can hold (1 to
/// [`Owner::MAX_LEN`] characters from `A-Z a-z 0-9 - _ . : @`, so it is one
/// word on one line). By convention `NAME-ROLE-INCARNATION` ([`Owner::of`]):
/// the incarnation makes each process's name its own, so a process can
/// recognise its own win.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(String);

impl Owner {
    /// The longest owner name.
    pub const MAX_LEN: usize = 200;

    /// An owner called `name`, if the format can hold it.
    pub fn new(name: impl Into<String>) -> Result<Owner, ArbiterError> {
        let name = name.into();
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-_.:@".contains(c);
        if name.is_empty() || name.len() > Owner::MAX_LEN || !name.chars().all(allowed) {
            return Err(ArbiterError::BadOwner { owner: name });
        }
        Ok(Owner(name))
    }

    /// `VM-ROLE-INCARNATION`, e.g. `kv-secondary-3f2a9c01d4e5b6a7`.
    pub fn of(vm_name: &str, role: Role, incarnation: Incarnation) -> Result<Owner, ArbiterError> {
        Owner::new(format!("{vm_name}-{role}-{incarnation}"))
    }

    /// The name as written in the file.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The outcome of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This side won: the file now holds `generation` (the expected one
    /// plus one) and this side as owner. Carry on.
    Won {
        /// The generation the win moved the arbiter to.
        generation: Generation,
    },
    /// Somebody else won first: the file holds `generation` and `owner`.
    /// Stop the guest and exit with status 4.
    Lost {
        /// The generation the file holds.
        generation: Generation,
        /// Who won it (`None` if nobody ever did, i.e. the claim expected a
        /// generation the file has not reached).
        owner: Option<Owner>,
    },
}

/// An arbiter file, checked to be readable and in ftvm's format.
#[derive(Debug, Clone)]
pub struct Arbiter {
    path: PathBuf,
    lock_path: PathBuf,
    temp_path: PathBuf,
    dir: PathBuf,
}

impl Arbiter {
    /// Open the arbiter `spec` (`file:PATH`), creating the file at
    /// generation 0 if it is missing (its directory must exist), and
    /// checking it otherwise.
    pub fn open(spec: &str) -> Result<Arbiter, ArbiterError> {
        let bad_spec = || ArbiterError::BadSpec { spec: spec.to_owned() };
        let path = Path::new(spec.strip_prefix(FILE_SCHEME).ok_or_else(bad_spec)?);
        let name = path.file_name().ok_or_else(bad_spec)?;
        if spec.ends_with('/') {
            return Err(bad_spec());
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(ArbiterError::NoDirectory { dir: dir.to_owned() });
        }
        // Resolve links now (see the module doc): the directory, and the
        // file itself if it is there and is a link.
        let mut path = fs::canonicalize(dir).map_err(io_error(dir))?.join(name);
        if path.is_symlink() {
            path = fs::canonicalize(&path).map_err(io_error(&path))?;
        }
        let arbiter = Arbiter::at(path);
        arbiter.locked(|| match arbiter.read() {
            Err(ArbiterError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                tracing::info!(path = %arbiter.path.display(), "created the arbiter file at generation 0");
                arbiter.write(Generation(0), None)
            }
            other => other.map(|_| ()),
        })?;
        Ok(arbiter)
    }

    /// The arbiter at `path`, a resolved path with a file name.
    fn at(path: PathBuf) -> Arbiter {
        let with_suffix = |suffix: &str| {
            let mut name = path.file_name().unwrap_or_default().to_owned();
            name.push(suffix);
            path.with_file_name(name)
        };
        let dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_owned);
        Arbiter { lock_path: with_suffix(".lock"), temp_path: with_suffix(".tmp"), dir, path }
    }

    /// The arbiter file (links resolved).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The generation the file holds and who won it.
    pub fn current(&self) -> Result<(Generation, Option<Owner>), ArbiterError> {
        self.locked(|| self.read())
    }

    /// The test-and-set: if the file holds `expected`, move it to
    /// `expected + 1` with `me` as owner and return [`Claim::Won`];
    /// otherwise leave it and return [`Claim::Lost`] with what it holds.
    ///
    /// A claim repeated after a win (the caller did not see the answer, say
    /// because an fsync reported an error after the rename) finds
    /// `expected + 1` owned by `me` and is a win again: the owner names one
    /// process, so nobody else can have written that.
    pub fn claim(&self, expected: Generation, me: &Owner) -> Result<Claim, ArbiterError> {
        let claim = self.locked(|| {
            let (generation, owner) = self.read()?;
            if generation == expected {
                let next = expected
                    .0
                    .checked_add(1)
                    .map(Generation)
                    .ok_or_else(|| ArbiterError::GenerationExhausted { path: self.path.clone() })?;
                self.write(next, Some(me))?;
                return Ok(Claim::Won { generation: next });
            }
            if expected.0.checked_add(1) == Some(generation.0) && owner.as_ref() == Some(me) {
                return Ok(Claim::Won { generation });
            }
            Ok(Claim::Lost { generation, owner })
        })?;
        match &claim {
            Claim::Won { generation } => {
                tracing::info!(path = %self.path.display(), %generation, owner = %me, "won the arbiter")
            }
            Claim::Lost { generation, owner } => tracing::warn!(
                path = %self.path.display(), %expected, %generation,
                owner = owner.as_ref().map_or(NO_OWNER, Owner::as_str), me = %me,
                "lost the arbiter: somebody else already took over"
            ),
        }
        Ok(claim)
    }

    /// Give ownership up: if the file holds `expected` (and, when `me` is
    /// given, names `me` as owner), move it to `expected + 1` with no owner
    /// and return `true`; otherwise leave it and return `false`. The live
    /// copy releases when its guest stops, so that a new pair or an
    /// unprotected start may claim; an operator releases the owner of a
    /// copy known to be gone (its host died) with `me` = `None`.
    pub fn release(&self, expected: Generation, me: Option<&Owner>) -> Result<bool, ArbiterError> {
        self.locked(|| {
            let (generation, owner) = self.read()?;
            if generation != expected || (me.is_some() && owner.as_ref() != me) {
                return Ok(false);
            }
            let next = expected
                .0
                .checked_add(1)
                .map(Generation)
                .ok_or_else(|| ArbiterError::GenerationExhausted { path: self.path.clone() })?;
            self.write(next, None)?;
            tracing::info!(path = %self.path.display(), generation = %next, "released the arbiter");
            Ok(true)
        })
    }

    /// Run `f` holding the exclusive lock. The lock is released when the
    /// lock file is closed, at the end of this call or if the process dies.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, ArbiterError>) -> Result<T, ArbiterError> {
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(io_error(&self.lock_path))?;
        // rustix's flock rather than std's `File::lock`, which needs Rust
        // 1.89 while the workspace promises 1.85. A signal may interrupt the
        // wait; the wait goes on.
        loop {
            match rustix::fs::flock(&lock, FlockOperation::LockExclusive) {
                Err(rustix::io::Errno::INTR) => continue,
                result => break result.map_err(io::Error::from).map_err(io_error(&self.lock_path))?,
            }
        }
        let result = f();
        drop(lock);
        result
    }

    /// Read and parse the file. Call with the lock held.
    fn read(&self) -> Result<(Generation, Option<Owner>), ArbiterError> {
        let mut bytes = Vec::new();
        // One byte past the cap tells a file at the cap from a longer one.
        let file = File::open(&self.path).map_err(io_error(&self.path))?;
        file.take(MAX_FILE_LEN.saturating_add(1)).read_to_end(&mut bytes).map_err(io_error(&self.path))?;
        parse(&bytes).map_err(|(line, expected)| ArbiterError::Malformed { path: self.path.clone(), line, expected })
    }

    /// Replace the file's contents atomically and durably. Call with the
    /// lock held.
    fn write(&self, generation: Generation, owner: Option<&Owner>) -> Result<(), ArbiterError> {
        let contents = format(generation, owner);
        let mut temp = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.temp_path)
            .map_err(io_error(&self.temp_path))?;
        temp.write_all(contents.as_bytes()).map_err(io_error(&self.temp_path))?;
        // The contents reach the disk before the name points at them …
        temp.sync_all().map_err(io_error(&self.temp_path))?;
        drop(temp);
        fs::rename(&self.temp_path, &self.path).map_err(io_error(&self.path))?;
        // … and the name does before anyone is told of the win.
        File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io_error(&self.dir))
    }
}

/// An I/O error on `path`, for `map_err`.
fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ArbiterError + '_ {
    move |source| ArbiterError::Io { path: path.to_owned(), source }
}

/// The file's text for `generation` and `owner`.
fn format(generation: Generation, owner: Option<&Owner>) -> String {
    format!("{HEADER}\ngeneration {generation}\nowner {}\n", owner.map_or(NO_OWNER, Owner::as_str))
}

/// Parse the file's bytes; on failure, the line (from 1) that is wrong and
/// what was expected there.
fn parse(bytes: &[u8]) -> Result<(Generation, Option<Owner>), (usize, &'static str)> {
    const GENERATION: &str = "`generation N`";
    const OWNER: &str = "`owner NAME`";
    let text = std::str::from_utf8(bytes).map_err(|_| (1, "UTF-8 text"))?;
    let mut lines = text.split_inclusive('\n');
    let mut line = |number: usize, expected: &'static str| {
        lines.next().and_then(|line| line.strip_suffix('\n')).ok_or((number, expected))
    };
    if line(1, "the header `ftvm-arbiter v1`")? != HEADER {
        return Err((1, "the header `ftvm-arbiter v1`"));
    }
    let generation = line(2, GENERATION)?
        .strip_prefix("generation ")
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .map(Generation)
        .ok_or((2, GENERATION))?;
    let owner = match line(3, OWNER)?.strip_prefix("owner ").ok_or((3, OWNER))? {
        NO_OWNER => None,
        name => Some(Owner::new(name).map_err(|_| (3, OWNER))?),
    };
    if lines.next().is_some() {
        return Err((4, "the end of the file"));
    }
    Ok((generation, owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::sync::{Arc, Barrier};

    fn spec(path: &Path) -> String {
        format!("file:{}", path.display())
    }

    fn owner(name: &str) -> Owner {
        Owner::new(name).unwrap()
    }

    #[test]
    fn a_missing_file_is_created_at_generation_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter");
        let arbiter = Arbiter::open(&spec(&path)).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "ftvm-arbiter v1\ngeneration 0\nowner (none)\n");
        assert_eq!(arbiter.current().unwrap(), (Generation(0), None));
        // Opening it again reads it, and does not reset it.
        arbiter.claim(Generation(0), &owner("a")).unwrap();
        let again = Arbiter::open(&spec(&path)).unwrap();
        assert_eq!(again.current().unwrap(), (Generation(1), Some(owner("a"))));
    }

    #[test]
    fn release_frees_only_what_is_still_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter");
        let arbiter = Arbiter::open(&spec(&path)).unwrap();
        let (live, other) = (owner("kv-secondary-01"), owner("kv-primary-02"));
        arbiter.claim(Generation(0), &live).unwrap();
        // Somebody else's release, or a stale generation, changes nothing.
        assert!(!arbiter.release(Generation(1), Some(&other)).unwrap());
        assert!(!arbiter.release(Generation(0), None).unwrap());
        assert_eq!(arbiter.current().unwrap(), (Generation(1), Some(live.clone())));
        // The owner's own release moves the generation on, with no owner.
        assert!(arbiter.release(Generation(1), Some(&live)).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "ftvm-arbiter v1\ngeneration 2\nowner (none)\n");
        // A claim of the old generation (a stale copy) cannot win it back.
        assert!(matches!(arbiter.claim(Generation(0), &live).unwrap(), Claim::Lost { .. }));
        // An operator's release needs no owner.
        arbiter.claim(Generation(2), &other).unwrap();
        assert!(arbiter.release(Generation(3), None).unwrap());
        assert_eq!(arbiter.current().unwrap(), (Generation(4), None));
    }

    #[test]
    fn a_claim_is_a_test_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter");
        let arbiter = Arbiter::open(&spec(&path)).unwrap();
        let (primary, secondary) = (owner("kv-primary-01"), owner("kv-secondary-02"));
        assert_eq!(arbiter.claim(Generation(0), &secondary).unwrap(), Claim::Won { generation: Generation(1) });
        assert_eq!(fs::read_to_string(&path).unwrap(), "ftvm-arbiter v1\ngeneration 1\nowner kv-secondary-02\n");
        assert_eq!(
            arbiter.claim(Generation(0), &primary).unwrap(),
            Claim::Lost { generation: Generation(1), owner: Some(secondary.clone()) }
        );
        // The winner asking again (it missed the answer) wins again, once.
        assert_eq!(arbiter.claim(Generation(0), &secondary).unwrap(), Claim::Won { generation: Generation(1) });
        assert_eq!(arbiter.current().unwrap(), (Generation(1), Some(secondary.clone())));
        // A claim from the future (a generation the file has not reached) loses.
        assert_eq!(
            arbiter.claim(Generation(5), &primary).unwrap(),
            Claim::Lost { generation: Generation(1), owner: Some(secondary) }
        );
        assert!(!dir.path().join("arbiter.tmp").exists());
        assert!(dir.path().join("arbiter.lock").exists());
    }

    #[test]
    fn a_malformed_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arbiter");
        let arbiter = Arbiter::open(&spec(&path)).unwrap();
        let cases: [(&[u8], usize); 14] = [
            (b"", 1),
            (b"garbage\n", 1),
            (b"ftvm-arbiter v2\ngeneration 1\nowner a\n", 1),
            (b"\xff\xfe\n", 1),
            (b"ftvm-arbiter v1\n", 2),
            (b"ftvm-arbiter v1\ngeneration\nowner a\n", 2),
            (b"ftvm-arbiter v1\ngeneration +1\nowner a\n", 2),
            (b"ftvm-arbiter v1\ngeneration 18446744073709551616\nowner a\n", 2),
            (b"ftvm-arbiter v1\ngeneration 1 \nowner a\n", 2),
            (b"ftvm-arbiter v1\ngeneration 1\nowner a", 3),
            (b"ftvm-arbiter v1\ngeneration 1\nowner \n", 3),
            (b"ftvm-arbiter v1\ngeneration 1\nowner a b\n", 3),
            (b"ftvm-arbiter v1\ngeneration 1\nowner a\n\n", 4),
            (b"ftvm-arbiter v1\r\ngeneration 1\r\nowner a\r\n", 1),
        ];
        for (contents, line) in cases {
            fs::write(&path, contents).unwrap();
            let show = String::from_utf8_lossy(contents);
            match arbiter.claim(Generation(1), &owner("b")) {
                Err(ArbiterError::Malformed { line: found, .. }) => assert_eq!(found, line, "{show:?}"),
                other => panic!("{show:?}: {other:?}"),
            }
            assert!(matches!(arbiter.current(), Err(ArbiterError::Malformed { .. })), "{show:?}");
            assert!(matches!(Arbiter::open(&spec(&path)), Err(ArbiterError::Malformed { .. })), "{show:?}");
            assert_eq!(fs::read(&path).unwrap(), contents, "{show:?} was overwritten");
        }
        // Too long to be an arbiter file: refused without reading it all.
        fs::write(&path, vec![b'x'; 1 << 20]).unwrap();
        assert!(matches!(arbiter.current(), Err(ArbiterError::Malformed { line: 1, .. })));
        let message = Arbiter::open(&spec(&path)).unwrap_err().to_string();
        assert!(message.contains("malformed at line 1") && message.contains("left as it is"), "{message}");
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("arbiter");
        let error = Arbiter::open(&spec(&path)).unwrap_err();
        assert!(matches!(&error, ArbiterError::NoDirectory { dir: d } if d == &dir.path().join("no-such-dir")));
        assert!(error.to_string().contains("does not exist"), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn bad_specs_say_the_accepted_form() {
        for spec in ["", "file:", "file:/", "nfs:/x/y", "/var/lib/ftvm/arbiter", "file:/tmp/", "File:/tmp/a"] {
            let error = Arbiter::open(spec).unwrap_err();
            assert!(matches!(error, ArbiterError::BadSpec { .. }), "{spec:?}: {error:?}");
            assert!(error.to_string().contains("file:PATH"), "{error}");
        }
    }

    #[test]
    fn a_relative_path_and_a_symlink_are_resolved() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        let target = shared.join("arbiter");
        Arbiter::open(&spec(&target)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let arbiter = Arbiter::open(&spec(&link)).unwrap();
        assert_eq!(arbiter.path(), fs::canonicalize(&target).unwrap());
        arbiter.claim(Generation(0), &owner("x")).unwrap();
        // The claim went to the file the link points to; the link is still a link.
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(fs::read_to_string(&target).unwrap().contains("owner x"));
    }

    #[test]
    fn owners_are_one_word() {
        assert_eq!(
            Owner::of("kv", Role::Secondary, Incarnation(0xab)).unwrap().as_str(),
            "kv-secondary-00000000000000ab"
        );
        for bad in ["", "(none)", "a b", "a\nb", "é", &"x".repeat(201)] {
            assert!(matches!(Owner::new(bad), Err(ArbiterError::BadOwner { .. })), "{bad:?}");
        }
        assert!(Owner::new("x".repeat(200)).is_ok());
    }

    #[test]
    fn two_threads_racing_for_each_generation_win_once_each() {
        const ROUNDS: u64 = 1000;
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(&dir.path().join("arbiter"));
        Arbiter::open(&spec).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = ["primary", "secondary"]
            .into_iter()
            .map(|name| {
                let (barrier, spec) = (barrier.clone(), spec.clone());
                std::thread::spawn(move || {
                    // Each thread its own Arbiter: every operation opens its
                    // own lock file description, as two hosts would.
                    let arbiter = Arbiter::open(&spec).unwrap();
                    let me = owner(name);
                    (0..ROUNDS)
                        .map(|round| {
                            barrier.wait();
                            matches!(arbiter.claim(Generation(round), &me).unwrap(), Claim::Won { .. })
                        })
                        .collect::<Vec<bool>>()
                })
            })
            .collect();
        let results: Vec<Vec<bool>> = racers.into_iter().map(|racer| racer.join().unwrap()).collect();
        let (primary, secondary) = (&results[0], &results[1]);
        assert_eq!(primary.len(), secondary.len());
        for (round, (p, s)) in primary.iter().zip(secondary).enumerate() {
            assert!(p ^ s, "round {round}: primary won {p}, secondary won {s}");
        }
        // How the wins split depends on the scheduler (on one CPU the
        // thread the barrier releases last may win every round), so it is
        // shown, not asserted.
        let wins = primary.iter().filter(|won| **won).count();
        println!("primary won {wins} of {ROUNDS} rounds, secondary {}", primary.len() - wins);
        assert_eq!(Arbiter::open(&spec).unwrap().current().unwrap().0, Generation(ROUNDS));
    }

    /// The environment variable that turns the test below into one of the
    /// racing processes.
    const CHILD: &str = "FTVM_ARBITER_RACE_CHILD";

    #[test]
    fn processes_racing_win_each_generation_exactly_once() {
        const PROCESSES: usize = 4;
        const GENERATIONS: u64 = 200;
        // As a child: claim whatever generation the file holds until it
        // reaches GENERATIONS, and print each generation won.
        if let Ok(spec) = std::env::var(CHILD) {
            let arbiter = Arbiter::open(&spec).unwrap();
            let me = owner(&format!("child-{}", std::process::id()));
            loop {
                let (generation, _) = arbiter.current().unwrap();
                if generation.0 >= GENERATIONS {
                    return;
                }
                if let Claim::Won { generation } = arbiter.claim(generation, &me).unwrap() {
                    println!("won {generation}");
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(&dir.path().join("arbiter"));
        Arbiter::open(&spec).unwrap();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..PROCESSES)
            .map(|_| {
                Command::new(&exe)
                    .args(["--exact", "arbiter::tests::processes_racing_win_each_generation_exactly_once"])
                    .args(["--nocapture", "--test-threads", "1", "-q"])
                    .env(CHILD, &spec)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut won: Vec<u64> = Vec::new();
        let mut winners = 0;
        for child in children {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "a child failed: {output:?}");
            let stdout = String::from_utf8(output.stdout).unwrap();
            let mine: Vec<u64> =
                stdout.lines().filter_map(|line| line.strip_prefix("won ")).map(|n| n.parse().unwrap()).collect();
            winners += usize::from(!mine.is_empty());
            won.extend(mine);
        }
        won.sort_unstable();
        assert_eq!(won, (1..=GENERATIONS).collect::<Vec<_>>(), "each generation won exactly once");
        println!("{winners} of {PROCESSES} processes won at least one generation");
        assert_eq!(Arbiter::open(&spec).unwrap().current().unwrap().0, Generation(GENERATIONS));
    }
}
