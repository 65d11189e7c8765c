//! `ftvm run` end to end on real KVM: guests built from source boot, print,
//! power off, fault, and are stopped from the host, each with its documented
//! exit status and one clear line.

mod common;

use std::time::Duration;

use common::{kvm, one_error_line, run, Running};

#[test]
fn kvm_hello_prints_its_line_and_exits_0() {
    if !kvm() {
        return;
    }
    let out = run(&["run"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from ftvm!\n");
    assert!(out.stderr.is_empty(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn kvm_devices_guest_sees_working_clock_timer_entropy_health() {
    if !kvm() {
        return;
    }
    let out = run(&["run", "--guest", "devices", "--memory-mib", "8"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "devices ok\n");
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn kvm_triple_fault_is_a_guest_fault_with_status_3() {
    if !kvm() {
        return;
    }
    let out = run(&["run", "--guest", "triple-fault"]);
    let line = one_error_line(&out);
    assert!(line.contains("guest triple fault at rip 0x"), "{line}");
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn kvm_pvpanic_is_a_guest_fault_with_status_3() {
    if !kvm() {
        return;
    }
    let out = run(&["run", "--guest", "panic"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deliberate panic"));
    let line = one_error_line(&out);
    assert!(line.contains("guest panicked (pvpanic event 0x1"), "{line}");
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn kvm_unknown_port_is_a_guest_fault_with_status_3() {
    if !kvm() {
        return;
    }
    let out = run(&["run", "--guest", "bad-port"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("still running"), "the guest ran past an unserved exit: {stdout}");
    let line = one_error_line(&out);
    assert!(line.contains("guest write of 4 bytes at port 0x1234, which no device serves"), "{line}");
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn kvm_spinning_guest_is_stopped_by_sigterm_and_exits_cleanly() {
    if !kvm() {
        return;
    }
    let mut vm = Running::spawn(&["run", "--guest", "spin"]);
    // The guest prints this line and then never exits again.
    vm.expect_line("spinning", Duration::from_secs(20));
    // SAFETY-free signal through the kill(1) tool: the child is ours and alive.
    let pid = vm.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = vm.child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(vm.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "stderr: {err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    assert!(!err.contains("thread '"), "{err}");
}

#[test]
fn kvm_serial_file_under_its_cap_holds_the_console() {
    if !kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.log");
    std::fs::write(dir.path().join("console.log.1"), "an older run\n").unwrap();
    let out = run(&["run", "--serial", path.to_str().unwrap(), "--serial-max-mib", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "the console went to stdout as well");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "Hello from ftvm!\n");
    // Below the cap nothing rotates: FILE.1 is the older run's still.
    assert_eq!(std::fs::read_to_string(dir.path().join("console.log.1")).unwrap(), "an older run\n");
}

/// `ftvm demo` in a process group of its own, signalled once its stderr
/// shows `at` (the whole group, as a terminal's Ctrl-C does, when `group`):
/// the status it exits with, its stderr lines and its stdout, after checking
/// that it left no namespace and no trial directory behind.
fn demo_interrupted(signal: &str, group: bool, at: &str) -> (Option<i32>, Vec<String>, String) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut child = common::ftvm()
        .arg("demo")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, lines) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains(at)) {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => seen.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("the demo never printed {at:?}: {seen:?}");
            }
        }
    }
    let target = if group { format!("-{pid}") } else { pid.to_string() };
    assert!(std::process::Command::new("kill").args([signal, "--", &target]).status().unwrap().success());
    // The rest of stderr ends when the demo exits (its VMMs' stderr goes to files).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while let Ok(l) = lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
        seen.push(l);
    }
    let status = child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let netns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let netns = String::from_utf8_lossy(&netns.stdout);
    assert!(!netns.contains(&format!("ftlab{pid}-")), "the demo left namespaces: {netns}");
    let trial_dirs = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("ftvm-demo-{pid}-")))
        .count();
    assert_eq!(trial_dirs, 0, "the demo left its trial directory");
    (status.code(), seen, out)
}

#[test]
fn kvm_demo_interrupted_tears_down_and_exits_130_for_sigint_143_for_sigterm() {
    if !(kvm() && ftvm_lab::require_root()) {
        return;
    }
    for (signal, group, at, code, name) in
        [("-INT", true, "client connected", 130, "SIGINT"), ("-TERM", false, "pair starting", 143, "SIGTERM")]
    {
        let (status, stderr, stdout) = demo_interrupted(signal, group, at);
        assert_eq!(status, Some(code), "{name}: {stderr:#?}");
        let last = stderr.last().map(String::as_str).unwrap_or("");
        assert!(last.starts_with(&format!("ftvm: interrupted by {name}")), "{name}: {stderr:#?}");
        assert_eq!(stderr.iter().filter(|l| l.contains("interrupted")).count(), 1, "{stderr:#?}");
        assert!(!stderr.iter().any(|l| l.contains("thread '")), "{stderr:#?}");
        assert!(!stdout.contains("thread '"), "{stdout}");
    }
}
