//! The programs the lab, the tests and the benchmarks run, and the one line that names the Debian
//! package of a missing one.
//!
//! A test that spawns a program which is not installed must not end in "No such file or
//! directory" or, through `ip netns exec`, in an exec failure with exit status 255: it ends in
//! "redis-cli not found: install Debian's redis-tools (scripts/test does)". Everything in the lab
//! spawns through [`spawn`], [`spawn_error`], [`check_tool`] or [`require_tool`], and the tests do
//! the same.

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The Debian 12 package of every program the lab, the tests, the benchmarks and `ftvm demo` run.
/// `scripts/test` installs the same list.
pub const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("redis-cli", "redis-tools"),
    ("redis-benchmark", "redis-tools"),
    ("redis-server", "redis-server"),
    ("objdump", "binutils"),
    ("kill", "procps"),
    ("promtool", "prometheus"),
    ("ocf-tester", "resource-agents"),
    ("xmllint", "libxml2-utils"),
    ("corosync", "corosync"),
    ("pacemakerd", "pacemaker"),
    ("crm_mon", "pacemaker-cli-utils"),
    ("crm_attribute", "pacemaker-cli-utils"),
    ("systemd-analyze", "systemd"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
];

/// The one line for a program that is not installed: "redis-cli not found: install Debian's
/// redis-tools (scripts/test does)". A program not in [`TOOL_PACKAGES`] is named without a package.
pub fn tool_missing(program: &str) -> String {
    match TOOL_PACKAGES.iter().find(|(tool, _)| *tool == program) {
        Some((_, package)) => format!("{program} not found: install Debian's {package} (scripts/test does)"),
        None => format!("{program} not found on PATH"),
    }
}

/// Where `program` is found on the search path `path` (a `PATH` value), as execvp would find it:
/// the first directory holding an executable regular file of that name. A `program` containing a
/// '/' is returned as it is if it is an executable file.
pub fn find_in_path(program: &str, path: &OsStr) -> Option<PathBuf> {
    if program.contains('/') {
        let candidate = PathBuf::from(program);
        return is_executable(&candidate).then_some(candidate);
    }
    std::env::split_paths(path).map(|dir| dir.join(program)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// `Err` with [`tool_missing`]'s line unless `program` is on this process's `PATH`. For programs
/// started indirectly (`ip netns exec NS PROGRAM`), where the spawn itself would succeed.
pub fn check_tool(program: &str) -> Result<(), String> {
    // Unset PATH: what execvp searches then.
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/bin:/usr/bin"));
    match find_in_path(program, &path) {
        Some(_) => Ok(()),
        None => Err(tool_missing(program)),
    }
}

/// Panics with [`tool_missing`]'s line unless `program` is on this process's `PATH`
/// ([`check_tool`]).
pub fn require_tool(program: &str) {
    if let Err(message) = check_tool(program) {
        panic!("{message}");
    }
}

/// The message for a failure to start `cmd`: [`tool_missing`]'s line when its program does not
/// exist, else the command line and the error.
pub fn spawn_error(cmd: &Command, e: &io::Error) -> String {
    if e.kind() == io::ErrorKind::NotFound {
        tool_missing(&cmd.get_program().to_string_lossy())
    } else {
        format!("`{cmd:?}` could not start: {e}")
    }
}

/// Spawns `cmd`; panics with [`spawn_error`]'s message if it cannot start.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.spawn().unwrap_or_else(|e| panic!("{}", spawn_error(cmd, &e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        assert_eq!(tool_missing("redis-cli"), "redis-cli not found: install Debian's redis-tools (scripts/test does)");
        assert_eq!(tool_missing("ip"), "ip not found: install Debian's iproute2 (scripts/test does)");
        assert_eq!(tool_missing("frobnicate"), "frobnicate not found on PATH");
    }

    #[test]
    fn find_in_path_finds_executables_only() {
        let dir = std::env::temp_dir().join(format!("ftvm-lab-tools-{}", std::process::id()));
        let (bin, other) = (dir.join("bin"), dir.join("other"));
        for d in [&bin, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let write = |path: &Path, mode| {
            std::fs::write(path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&bin.join("tool"), 0o755);
        write(&other.join("tool"), 0o755);
        write(&bin.join("data"), 0o644);
        let path = std::env::join_paths([&other, &bin]).unwrap();
        // The first directory wins, as with execvp.
        assert_eq!(find_in_path("tool", &path), Some(other.join("tool")));
        assert_eq!(find_in_path("data", &path), None, "not executable");
        assert_eq!(find_in_path("absent", &path), None);
        let absolute = bin.join("tool");
        assert_eq!(find_in_path(absolute.to_str().unwrap(), OsStr::new("")), Some(absolute.clone()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn spawning_a_missing_program_says_which_package() {
        let mut cmd = Command::new("redis-cli");
        cmd.env("PATH", "/nonexistent");
        // Command resolves the program with the child's PATH when one is set.
        let err = cmd.spawn().expect_err("no redis-cli in /nonexistent");
        assert_eq!(spawn_error(&cmd, &err), tool_missing("redis-cli"));
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || spawn(&mut cmd)))
            .expect_err("spawn must panic");
        let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert_eq!(message, tool_missing("redis-cli"));
    }
}
