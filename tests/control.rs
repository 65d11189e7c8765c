//! The control socket of a running pair process (a secondary waiting for its
//! primary serves it before any VM exists): refuses to replace what is not
//! a stale socket of ours, is readable by its owner only, says "permission
//! denied" to anybody else, and is removed when the process ends.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::{Duration, Instant};

use common::{ftvm, one_error_line, run};

fn key(dir: &std::path::Path) -> String {
    let key = dir.join("key");
    std::fs::write(&key, "0".repeat(64)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    key.to_str().unwrap().to_string()
}

#[test]
fn an_existing_regular_file_is_never_replaced_by_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("precious.txt");
    std::fs::write(&ctl, "keep me").unwrap();
    let k = key(dir.path());
    let out = run(&["secondary", "--key-file", &k, "--listen", "127.0.0.1:0", "--control", ctl.to_str().unwrap()]);
    assert!(one_error_line(&out).contains("not a socket"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&ctl).unwrap(), "keep me");
}

#[test]
fn the_socket_is_owner_only_says_permission_denied_to_others_and_goes_with_the_process() {
    if !ftvm_lab::require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Others may reach the directory, so that only the socket's mode decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = dir.path().join("s.sock");
    let k = key(dir.path());
    // umask 000: the mode must not follow it.
    let mut cmd = ftvm();
    cmd.args(["secondary", "--key-file", &k, "--listen", "127.0.0.1:0", "--control", ctl.to_str().unwrap()]);
    // SAFETY-free: umask through the shell that starts it.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("umask 000; exec {:?} \"$@\"", cmd.get_program()))
        .arg("sh")
        .args(cmd.get_args())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !std::fs::symlink_metadata(&ctl).is_ok_and(|m| m.file_type().is_socket()) {
        assert!(started.elapsed() < Duration::from_secs(20), "no control socket appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_ftvm"), "status"])
        .args(["--control", ctl.to_str().unwrap()])
        .output()
        .unwrap();
    let line = one_error_line(&out);
    assert!(line.contains("permission denied"), "{line}");
    assert_eq!(out.status.code(), Some(1));
    assert!(run(&["status", "--control", ctl.to_str().unwrap()]).status.success());
    // SIGTERM: the process ends cleanly and takes its socket with it.
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    assert!(!ctl.exists(), "the control socket outlived its process");
}
