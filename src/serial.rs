//! `--serial FILE` with `--serial-max-mib N`: the guest's console in a file
//! that never grows past N MiB. When a write would take it past the cap,
//! the file is renamed to `FILE.1` (replacing the one before) and a fresh
//! FILE is started, so the console takes at most twice the cap on disk and
//! the newest output is always in FILE, the output before it in `FILE.1`.
//!
//! Only a regular file is rotated: FILE as a device (`/dev/null`), a FIFO,
//! a terminal or a symbolic link is written without a cap, since renaming
//! it would move the device node or the link, not the output.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A console file rotated at a size cap.
pub struct RotatingFile {
    path: PathBuf,
    /// `FILE.1`.
    previous: PathBuf,
    file: File,
    /// Bytes in the current FILE.
    written: u64,
    /// The cap in bytes; `None`: unlimited.
    max: Option<u64>,
}

impl RotatingFile {
    /// Create (or truncate) `path`; rotate it at `max` bytes (`None`: never;
    /// `Some(0)` is taken as `None`, as `--serial-max-mib 0` means), if it
    /// is a regular file (module doc).
    pub fn create(path: &Path, max: Option<u64>) -> io::Result<RotatingFile> {
        let mut previous = OsString::from(path.as_os_str());
        previous.push(".1");
        let file = File::create(path)?;
        let regular = std::fs::symlink_metadata(path)?.file_type().is_file();
        Ok(RotatingFile {
            path: path.to_owned(),
            previous: PathBuf::from(previous),
            file,
            written: 0,
            max: max.filter(|&m| m > 0 && regular),
        })
    }

    /// FILE becomes FILE.1; a new, empty FILE takes its place.
    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        std::fs::rename(&self.path, &self.previous)?;
        self.file = File::create(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(max) = self.max else {
            return self.file.write(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        // Rotate before a write that would pass the cap, unless FILE is
        // empty: a write larger than the cap is split instead, so that no
        // file ever holds more than the cap.
        if self.written > 0 && self.written.saturating_add(buf.len() as u64) > max {
            self.rotate()?;
        }
        let room = usize::try_from(max - self.written).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn rotates_to_dot_1_when_a_write_would_pass_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let old = dir.path().join("console.log.1");
        let mut f = RotatingFile::create(&path, Some(10)).unwrap();
        f.write_all(b"line one\n").unwrap(); // 9 bytes: fits
        assert_eq!(read(&path), b"line one\n");
        assert!(!old.exists(), "rotated before the cap was reached");
        f.write_all(b"line two\n").unwrap(); // 18 > 10: rotate first
        assert_eq!(read(&old), b"line one\n");
        assert_eq!(read(&path), b"line two\n");
        f.write_all(b"3\n").unwrap(); // 11 > 10: rotate, replacing FILE.1
        assert_eq!(read(&old), b"line two\n");
        assert_eq!(read(&path), b"3\n");
    }

    #[test]
    fn a_file_exactly_at_the_cap_is_kept_until_the_next_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut f = RotatingFile::create(&path, Some(4)).unwrap();
        f.write_all(b"abcd").unwrap();
        assert_eq!(read(&path), b"abcd");
        assert!(!dir.path().join("c.1").exists());
        f.write_all(b"e").unwrap();
        assert_eq!(read(&dir.path().join("c.1")), b"abcd");
        assert_eq!(read(&path), b"e");
    }

    #[test]
    fn a_write_larger_than_the_cap_is_split_and_nothing_is_lost_but_older_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut f = RotatingFile::create(&path, Some(4)).unwrap();
        f.write_all(b"0123456789").unwrap();
        // 0123 went to a FILE.1 that 4567 then replaced; 89 is in FILE.
        assert_eq!(read(&dir.path().join("c.1")), b"4567");
        assert_eq!(read(&path), b"89");
        // Never more than the cap in either file, whatever the writes.
        for chunk in [&b"x"[..], b"yyyyyyy", b"zz", b""] {
            f.write_all(chunk).unwrap();
            assert!(read(&path).len() <= 4 && read(&dir.path().join("c.1")).len() <= 4);
        }
    }

    #[test]
    fn zero_or_none_is_unlimited() {
        for max in [None, Some(0)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c");
            let mut f = RotatingFile::create(&path, max).unwrap();
            for _ in 0..100 {
                f.write_all(b"0123456789").unwrap();
            }
            assert_eq!(read(&path).len(), 1000);
            assert!(!dir.path().join("c.1").exists());
        }
    }

    #[test]
    fn a_symbolic_link_is_written_through_never_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut f = RotatingFile::create(&link, Some(4)).unwrap();
        f.write_all(b"0123456789").unwrap();
        assert_eq!(read(&target), b"0123456789");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(!dir.path().join("link.1").exists());
    }

    #[test]
    fn a_start_truncates_the_file_and_keeps_the_old_dot_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, b"from the last run").unwrap();
        std::fs::write(dir.path().join("c.1"), b"older").unwrap();
        let mut f = RotatingFile::create(&path, Some(100)).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(read(&path), b"new");
        assert_eq!(read(&dir.path().join("c.1")), b"older");
    }

    #[test]
    fn a_rotation_that_cannot_rename_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut f = RotatingFile::create(&path, Some(2)).unwrap();
        f.write_all(b"ab").unwrap();
        // FILE.1 is a non-empty directory: rename(2) cannot replace it.
        std::fs::create_dir(dir.path().join("c.1")).unwrap();
        std::fs::write(dir.path().join("c.1/x"), b"").unwrap();
        assert!(f.write_all(b"c").is_err());
        assert_eq!(read(&path), b"ab");
    }
}
