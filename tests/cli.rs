//! The command line refuses bad input with one line on stderr and the
//! documented status, never panic text. None of these needs KVM: each is
//! refused before a VM is made.

mod common;

use common::{one_error_line, run};

#[test]
fn malformed_toml_is_refused_with_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "memory-mib = \n[[[").unwrap();
    let out = run(&["run", "--config", path.to_str().unwrap()]);
    let line = one_error_line(&out);
    assert!(line.contains("bad.toml") && line.contains("line"), "{line}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unknown_toml_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, "memory-mb = 64\n").unwrap();
    let out = run(&["run", "--config", path.to_str().unwrap()]);
    assert!(one_error_line(&out).contains("memory-mb"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unknown_flag_is_refused_with_status_2() {
    let out = run(&["run", "--bogus"]);
    assert!(one_error_line(&out).contains("--bogus"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_guest_file_is_refused_with_status_1() {
    let out = run(&["run", "--guest", "/nonexistent/guest.elf"]);
    let line = one_error_line(&out);
    assert!(line.contains("/nonexistent/guest.elf"), "{line}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn not_an_elf_is_refused_with_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.elf");
    std::fs::write(&path, b"this is not an ELF image at all").unwrap();
    let out = run(&["run", "--guest", path.to_str().unwrap()]);
    if !common::kvm() {
        return;
    }
    let line = one_error_line(&out);
    assert!(line.contains("not a loadable x86_64 ELF"), "{line}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn memory_of_zero_or_absurd_size_is_refused_with_status_2() {
    for mib in ["0", "99999999", "-1", "lots"] {
        let flag = format!("--memory-mib={mib}");
        let out = run(&["run", &flag]);
        let line = one_error_line(&out);
        assert!(line.contains("memory-mib"), "{mib}: {line}");
        assert_eq!(out.status.code(), Some(2), "{mib}");
    }
}

#[test]
fn unknown_embedded_guest_is_refused_with_status_2() {
    let out = run(&["run", "--guest", "nosuchguest"]);
    assert!(one_error_line(&out).contains("nosuchguest"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn guests_lists_hello_but_not_test_guests() {
    let out = run(&["guests"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("hello ")), "{text}");
    assert!(!text.contains("triple-fault"), "{text}");
    let all = String::from_utf8_lossy(&run(&["guests", "--all"]).stdout).into_owned();
    assert!(all.contains("triple-fault") && all.contains("(test guest)"), "{all}");
}
