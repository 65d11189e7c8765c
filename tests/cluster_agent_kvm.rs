//! The OCF resource agent `cluster/pacemaker/ftvm`, run for real on one
//! host with KVM: `ocf-tester` (Debian's resource-agents) passes on it, and
//! its monitor reports what ftvm's status says (the cluster test,
//! tests/cluster_kvm.rs, drives it from a real Pacemaker).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ftvm_lab as lab;

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/pacemaker/ftvm")
}

/// A single-node setting for the agent: a `spin` guest, a key, an arbiter,
/// two loopback addresses (no peer ever listens on the second), and the
/// agent's dirs, all in `dir`. As OCF_RESKEY_ variables.
fn params(dir: &Path, port: u16) -> Vec<(String, String)> {
    let key = common::key_file(dir, "k");
    let config = dir.join("vm.toml");
    let serial = dir.join("serial.log");
    std::fs::write(
        &config,
        format!("guest = \"spin\"\nmemory-mib = 16\nkey-file = \"{key}\"\nserial = \"{}\"\n", serial.display()),
    )
    .unwrap();
    let d = |n: &str| dir.join(n).display().to_string();
    vec![
        ("name".into(), format!("ocf{port}")),
        ("config".into(), config.display().to_string()),
        ("arbiter".into(), format!("file:{}", d("arbiter"))),
        ("addresses".into(), format!("n1=127.0.0.1:{port} n2=127.0.0.1:{}", port + 1)),
        ("binary".into(), env!("CARGO_BIN_EXE_ftvm").into()),
        ("CRM_meta_on_node".into(), "n1".into()),
        ("pair_wait".into(), "1".into()),
        ("log_dir".into(), d("log")),
        ("control_dir".into(), d("run")),
    ]
}

/// The agent's `action` with `params` (as Pacemaker calls it); its exit status.
fn action(dir: &Path, params: &[(String, String)], action: &str, extra: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(agent());
    cmd.arg(action).env("OCF_ROOT", "/usr/lib/ocf").env("OCF_RESOURCE_INSTANCE", "ftvm-test");
    cmd.env("HA_RSCTMP", dir.join("rsctmp"));
    for (k, v) in params {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    for (k, v) in extra {
        cmd.env(format!("OCF_RESKEY_{k}"), v);
    }
    let out: Output = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn kvm_ocf_tester_passes_on_the_agent() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    lab::require_tool("ocf-tester");
    lab::require_tool("xmllint");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rsctmp")).unwrap();
    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "ftvm-test"]).env("HA_RSCTMP", dir.path().join("rsctmp"));
    for (k, v) in params(dir.path(), 17_101) {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    cmd.arg(agent());
    let out = lab::spawn(cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()))
        .wait_with_output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("passed all tests"), "ocf-tester:\n{text}");
    assert!(!text.contains("rc="), "ocf-tester reported a wrong exit code:\n{text}");
}

#[test]
fn kvm_agent_monitor_follows_ftvm_status() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rsctmp")).unwrap();
    let p = params(dir.path(), 17_111);
    let probe = [("CRM_meta_interval", "0")];
    let unpromoted = [("CRM_meta_interval", "11000"), ("CRM_meta_role", "Unpromoted")];
    assert_eq!(action(dir.path(), &p, "monitor", &probe).0, 7, "nothing started");
    let (rc, text) = action(dir.path(), &p, "validate-all", &[]);
    assert_eq!(rc, 0, "{text}");
    // A node that `addresses` does not name is a configuration error (6).
    let (rc, _) = action(dir.path(), &p, "validate-all", &[("CRM_meta_on_node", "n9")]);
    assert_eq!(rc, 6);
    assert_eq!(action(dir.path(), &p, "start", &[]).0, 0);
    let sock = dir.path().join("run").join("ocf17111.sock");
    assert_eq!(common::status_json(sock.to_str().unwrap())["role"], "secondary");
    assert_eq!(action(dir.path(), &p, "monitor", &unpromoted).0, 0, "a waiting secondary is unpromoted");
    // No peer pairs within pair_wait: promote runs the guest unprotected,
    // which the promoted monitor reports as degraded (191).
    let (rc, text) = action(dir.path(), &p, "promote", &[]);
    assert_eq!(rc, 0, "{text}");
    let st = common::status_json(sock.to_str().unwrap());
    assert_eq!(st["role"], "standalone", "{st}");
    assert_eq!(action(dir.path(), &p, "monitor", &[("CRM_meta_interval", "10000")]).0, 191);
    assert_eq!(action(dir.path(), &p, "monitor", &probe).0, 191, "a probe says promoted (degraded)");
    // The live copy holds the arbiter: a second start elsewhere would be a
    // spare, and ftvm refuses a second primary.
    let arb = common::run(&["arbiter", "--arbiter", &format!("file:{}", dir.path().join("arbiter").display())]);
    assert!(String::from_utf8_lossy(&arb.stdout).contains("standalone"), "{arb:?}");
    // The live copy dies: a failed promoted instance (9).
    let pid: i32 =
        std::fs::read_to_string(dir.path().join("rsctmp").join("ftvm-ocf17111.pid")).unwrap().trim().parse().unwrap();
    common::signal("KILL", pid as u32);
    assert!(lab::wait_for(std::time::Duration::from_secs(10), || !Path::new(&format!("/proc/{pid}")).exists()));
    let (rc, text) = action(dir.path(), &p, "monitor", &[("CRM_meta_interval", "10000")]);
    assert_eq!(rc, 9, "{text}");
    // Pacemaker's recovery: demote and stop succeed, then all is stopped (7).
    assert_eq!(action(dir.path(), &p, "demote", &[]).0, 0);
    assert_eq!(action(dir.path(), &p, "stop", &[]).0, 0);
    assert_eq!(action(dir.path(), &p, "monitor", &probe).0, 7);
    assert_eq!(action(dir.path(), &p, "frobnicate", &[]).0, 3, "unknown action: unimplemented");
}
