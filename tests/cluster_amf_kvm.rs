//! The OpenSAF AMF CLC-CLI commands `cluster/opensaf/ftvm-clc`, tested
//! against their contract with real VMMs on KVM (OpenSAF itself is not
//! packaged for Debian or PyPI, so it is not run): exit codes, idempotence,
//! active monitoring that notices a crash, cleanup after a crash, and a
//! replica on a second "node" (its own state and control directories) that
//! pairs with the live copy.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ftvm_lab as lab;

fn clc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/opensaf/ftvm-clc")
}

/// One node's environment for the commands: the guest (`crunch`, no NIC), a
/// key, the shared arbiter, this node's and the peer's loopback addresses,
/// and the node's own directories under `dir/NODE`.
struct Node {
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Node {
    fn new(shared: &Path, node: &str, listen: u16, peer: u16) -> Node {
        let dir = shared.join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let d = |n: &str| dir.join(n).display().to_string();
        let env = vec![
            ("FTVM_NAME".into(), "amfkv".into()),
            ("FTVM_CONFIG".into(), shared.join("vm.toml").display().to_string()),
            ("FTVM_ARBITER".into(), format!("file:{}", shared.join("arbiter").display())),
            ("FTVM_LISTEN".into(), format!("127.0.0.1:{listen}")),
            ("FTVM_PEER".into(), format!("127.0.0.1:{peer}")),
            ("FTVM_BINARY".into(), env!("CARGO_BIN_EXE_ftvm").into()),
            ("FTVM_CONTROL_DIR".into(), d("run")),
            ("FTVM_STATE_DIR".into(), d("state")),
            ("FTVM_LOG_DIR".into(), d("log")),
            ("FTVM_PAIR_WAIT".into(), "2".into()),
            ("FTVM_AM_INTERVAL_MS".into(), "100".into()),
            ("FTVM_AMF_ERROR_CMD".into(), format!("echo \"$SA_AMF_COMPONENT_NAME\" > {}", d("error-reported"))),
            ("SA_AMF_COMPONENT_NAME".into(), format!("safComp=ftvm,safSu={node}")),
            // As the failover tests: a noisy host must not fail a live peer over.
            ("FTVM_ARGS".into(), format!("--dead-after {}", common::TEST_DEAD_AFTER)),
        ];
        Node { env, dir }
    }

    /// `ftvm-clc ACTION`: (exit status, stderr).
    fn clc(&self, action: &str) -> (i32, String) {
        let mut cmd = Command::new(clc());
        cmd.arg(action).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("state/amfkv.pid")).ok()?.trim().parse().ok()
    }

    fn status_of(&self) -> serde_json::Value {
        common::status_json(self.dir.join("run/amfkv.sock").to_str().unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Whatever the test left running on this node.
        let _ = self.clc("cleanup");
    }
}

fn running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let key = common::key_file(dir.path(), "k");
    let serial = dir.path().join("serial.log");
    // crunch, endless: a clock reading between rounds of work gives the
    // replica exits at which to see the log's end.
    let config = format!(
        "guest = \"crunch\"\nparam = [\"rounds=1000000000\"]\nmemory-mib = 16\nkey-file = \"{key}\"\nserial = \"{}\"\n",
        serial.display()
    );
    std::fs::write(dir.path().join("vm.toml"), config).unwrap();
    dir
}

#[test]
fn amf_clc_refuses_a_missing_setting_with_status_2() {
    let dir = setup();
    let mut node = Node::new(dir.path(), "SC-1", 17_201, 17_202);
    node.env.retain(|(k, _)| k != "FTVM_ARBITER");
    let (rc, err) = node.clc("instantiate");
    assert_eq!(rc, 2, "{err}");
    assert_eq!(err.trim(), "ftvm-clc: FTVM_ARBITER is not set (the component's command environment must set it)");
    assert_eq!(Node::new(dir.path(), "SC-1", 17_201, 17_202).clc("frobnicate").0, 2);
}

#[test]
fn kvm_amf_clc_alone_instantiate_monitor_crash_cleanup() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let dir = setup();
    let node = Node::new(dir.path(), "SC-1", 17_211, 17_212);
    // Nothing to clean up or stop yet: both succeed.
    assert_eq!(node.clc("cleanup").0, 0);
    assert_eq!(node.clc("amstop").0, 0);
    assert_eq!(node.clc("health").0, 1, "nothing runs");
    // No replica answers: after FTVM_PAIR_WAIT the copy runs unprotected.
    let (rc, err) = node.clc("instantiate");
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("UNPROTECTED"), "{err}");
    let pid = node.pid().expect("a pid file");
    assert_eq!(node.status_of()["role"], "standalone");
    // Idempotent: the same live copy.
    assert_eq!(node.clc("instantiate").0, 0);
    assert_eq!(node.pid(), Some(pid));
    assert_eq!(node.clc("health").0, 0);
    assert_eq!(node.clc("amstart").0, 0);
    let monitor = std::fs::read_to_string(node.dir.join("state/amfkv.am.pid")).unwrap();
    assert_eq!(node.clc("amstart").0, 0);
    assert_eq!(std::fs::read_to_string(node.dir.join("state/amfkv.am.pid")).unwrap(), monitor, "one monitor");
    // The VMM crashes: active monitoring reports it through FTVM_AMF_ERROR_CMD.
    common::signal("KILL", pid);
    let reported = node.dir.join("error-reported");
    assert!(lab::wait_for(Duration::from_secs(30), || reported.exists()), "no error report");
    assert_eq!(std::fs::read_to_string(&reported).unwrap().trim(), "safComp=ftvm,safSu=SC-1");
    let reason = std::fs::read_to_string(node.dir.join("state/amfkv.am.failed")).unwrap();
    // Seen either way round: the dying VMM's socket may close before the
    // process is gone.
    assert!(reason.contains("the ftvm process is gone") || reason.contains("does not answer"), "{reason}");
    let (rc, err) = node.clc("health");
    assert_eq!(rc, 1);
    assert!(err.contains("the ftvm process is gone"), "{err}");
    // Cleanup after the crash: nothing of the guest is left, twice over.
    assert_eq!(node.clc("cleanup").0, 0);
    assert!(!node.dir.join("state/amfkv.pid").exists());
    assert!(!node.dir.join("run/amfkv.sock").exists(), "the crashed VMM's socket is gone");
    assert_eq!(node.clc("cleanup").0, 0);
    assert!(!running(pid));
    // The crashed unprotected copy still owns the arbiter (it could not
    // release it): a new live copy is refused until an operator releases it.
    let (rc, err) = node.clc("instantiate");
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("ftvm primary amfkv ended"), "{err}");
}

#[test]
fn kvm_amf_clc_pair_instantiate_terminate_rearms_the_replica() {
    if !(common::kvm() && lab::require_root()) {
        return;
    }
    let dir = setup();
    let sc1 = Node::new(dir.path(), "SC-1", 17_221, 17_222);
    let sc2 = Node::new(dir.path(), "SC-2", 17_222, 17_221);
    // SC-2 keeps a replica; SC-1 gets the active assignment and pairs with it.
    assert_eq!(sc2.clc("standby").0, 0);
    assert_eq!(sc2.clc("standby").0, 0, "idempotent");
    let replica = sc2.pid().unwrap();
    let (rc, err) = sc1.clc("instantiate");
    assert_eq!(rc, 0, "{err}");
    let st = sc1.status_of();
    assert_eq!((st["role"].as_str(), st["peer"].as_str()), (Some("primary"), Some("up")), "{st}");
    assert_eq!(sc2.status_of()["role"], "secondary");
    assert_eq!(sc1.clc("health").0, 0);
    // The replica is not the component: terminate on SC-2 leaves it alone.
    assert_eq!(sc2.clc("terminate").0, 0);
    assert_eq!(sc2.pid(), Some(replica));
    assert!(running(replica));
    // Terminate on SC-1: a planned stop of the guest (the replica does not
    // take it over: it ends too), then SC-1 re-arms a replica of its own.
    let live = sc1.pid().unwrap();
    let (rc, err) = sc1.clc("terminate");
    assert_eq!(rc, 0, "{err}");
    assert!(!running(live));
    assert!(lab::wait_for(Duration::from_secs(30), || !running(replica)), "SC-2's replica outlived the guest");
    let st = sc1.status_of();
    assert_eq!((st["role"].as_str(), st["state"].as_str()), (Some("secondary"), Some("waiting for the primary")));
    let (rc, _) = sc1.clc("terminate");
    assert_eq!(rc, 0, "terminate is idempotent");
    for node in [&sc1, &sc2] {
        assert_eq!(node.clc("cleanup").0, 0);
    }
}
