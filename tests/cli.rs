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

/// The cap on a guest image file, as `--help` states it.
const MAX_IMAGE_MIB: u64 = 64;

#[test]
fn a_guest_file_over_the_cap_is_refused_with_status_1_naming_the_cap() {
    // A sparse file one byte over the cap: refused by its size, unread.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.elf");
    std::fs::File::create(&path).unwrap().set_len((MAX_IMAGE_MIB << 20) + 1).unwrap();
    let out = run(&["run", "--guest", path.to_str().unwrap()]);
    let line = one_error_line(&out);
    assert!(line.contains("huge.elf") && line.contains(&format!("{MAX_IMAGE_MIB} MiB")), "{line}");
    assert_eq!(out.status.code(), Some(1));
    // Exactly the cap is not refused for its size (it is no ELF, though).
    std::fs::File::create(&path).unwrap().set_len(MAX_IMAGE_MIB << 20).unwrap();
    let out = run(&["run", "--guest", path.to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("MiB"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn an_unbounded_guest_file_is_refused_after_the_cap_not_read_forever() {
    // /dev/zero has no size to check: the binary reads at most the cap and
    // a byte. Without the cap it would read until memory runs out (the
    // helper kills it after 60 s and fails the test).
    let out = run(&["run", "--guest", "/dev/zero"]);
    let line = one_error_line(&out);
    assert!(line.contains("/dev/zero") && line.contains(&format!("{MAX_IMAGE_MIB} MiB")), "{line}");
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

#[test]
fn primary_without_its_required_settings_names_them_and_its_own_help() {
    let out = run(&["primary", "--guest", "hello"]);
    let line = one_error_line(&out);
    assert!(line.contains("--key-file") && line.contains("ftvm primary --help"), "{line}");
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["secondary", "--frobnicate"]);
    assert!(one_error_line(&out).contains("ftvm secondary --help"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unusable_peer_listen_and_arbiter_exit_2_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "0".repeat(64)).unwrap();
    let key = key.to_str().unwrap();
    for peer in ["foo", "10.0.1.2:70000", "::::"] {
        let out = run(&["primary", "--key-file", key, "--peer", peer]);
        assert!(one_error_line(&out).contains("--peer"), "--peer {peer}");
        assert_eq!(out.status.code(), Some(2), "--peer {peer}");
    }
    let out = run(&["secondary", "--key-file", key, "--listen", "127.0.0.1:99999"]);
    assert!(one_error_line(&out).contains("--listen"));
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["primary", "--key-file", key, "--peer", "127.0.0.1:7000", "--arbiter", "nfs:/x"]);
    assert!(one_error_line(&out).contains("--arbiter"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn status_refuses_a_name_that_is_a_path() {
    let out = run(&["status", "--name", "../../etc/x"]);
    assert!(one_error_line(&out).contains("--name"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keygen_creates_the_key_directory_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("etc/ftvm/pair.key");
    let out = run(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim().len(), 64);
}

#[test]
fn pair_settings_in_the_config_file_are_taken() {
    // A config file carrying every PAIR-OPT: the primary gets as far as
    // reading the key file it names (missing here: status 1, naming it).
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("pair.toml");
    let key = dir.path().join("no-such.key");
    let arb = dir.path().join("arbiter");
    std::fs::write(
        &conf,
        format!(
            "key-file = {:?}\npeer = \"127.0.0.1:9\"\narbiter = \"file:{}\"\nheartbeat-ms = 5\ncontrol = {:?}\n",
            key.to_str().unwrap(),
            arb.display(),
            dir.path().join("c.sock").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = run(&["primary", "--config", conf.to_str().unwrap()]);
    let line = one_error_line(&out);
    assert!(line.contains("no-such.key"), "{line}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn an_unprotected_start_beside_a_live_copy_exits_4_without_a_byte_out() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "0".repeat(64)).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let arb = dir.path().join("arbiter");
    // The arbiter as a secondary that went live leaves it (its documented format).
    std::fs::write(&arb, "ftvm-arbiter v1\ngeneration 1\nowner hello-secondary-00000000000000aa\n").unwrap();
    let spec = format!("file:{}", arb.display());
    let base = ["--guest", "hello", "--key-file", key.to_str().unwrap(), "--peer", "127.0.0.1:9", "--arbiter", &spec];
    let out = run(&[&["primary", "--unprotected-start"][..], &base].concat());
    let line = one_error_line(&out);
    assert!(line.contains("hello-secondary-00000000000000aa") && line.contains("ftvm arbiter --release"), "{line}");
    assert_eq!(out.status.code(), Some(4));
    assert!(out.stdout.is_empty(), "the guest's console wrote: {:?}", String::from_utf8_lossy(&out.stdout));
    // A protected start is refused as well, and nothing touched the file.
    let ctl = dir.path().join("p.sock");
    let out = run(&[&["primary", "--control", ctl.to_str().unwrap()][..], &base].concat());
    assert!(one_error_line(&out).contains("hello-secondary-00000000000000aa"));
    assert_eq!(out.status.code(), Some(4));
    assert!(std::fs::read_to_string(&arb).unwrap().contains("generation 1\n"));
    // The operator releases the copy known to be gone; an unprotected start
    // then claims the arbiter, runs, and frees it again when its guest stops.
    let out = run(&["arbiter", "--arbiter", &spec, "--release"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    if !common::kvm() {
        return;
    }
    let out = run(&[&["primary", "--unprotected-start"][..], &base].concat());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.is_empty(), "the guest ran");
    assert_eq!(std::fs::read_to_string(&arb).unwrap(), "ftvm-arbiter v1\ngeneration 4\nowner (none)\n");
}

#[test]
fn serial_max_mib_out_of_range_exits_2_from_flag_or_file() {
    let out = run(&["run", "--serial", "/tmp/never-written.log", "--serial-max-mib", "1048577"]);
    let line = one_error_line(&out);
    assert!(line.contains("--serial-max-mib 1048577") && line.contains("1048576"), "{line}");
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("vm.toml");
    std::fs::write(&conf, "serial-max-mib = 99999999\n").unwrap();
    let out = run(&["run", "--config", conf.to_str().unwrap()]);
    assert!(one_error_line(&out).contains("--serial-max-mib 99999999"));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn demo_help_names_only_flags_demo_takes() {
    let out = run(&["demo", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    let flags: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    assert!(flags.contains(&"--guest") && flags.contains(&"--failure"), "{help}");
    for flag in flags {
        assert!(
            ["--guest", "--failure", "--fault", "--help", "--version"].contains(&flag),
            "`ftvm demo` takes no {flag}:\n{help}"
        );
    }
}
