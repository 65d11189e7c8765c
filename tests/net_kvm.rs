//! The guests' network on real KVM, real TAP devices and network
//! namespaces (tests/lab): a hostile NIC driver ends in a typed device
//! error; `kvstore` serves real `redis-cli` and a concurrent client;
//! `streamer` delivers numbered datagrams in order.

mod common;
use ftvm_lab as lab;

use std::process::{Command, Stdio};

use lab::Lab;

/// `ftvm run ...` inside host a's namespace, on its TAP.
fn ftvm_in(lab: &Lab, args: &[&str]) -> Command {
    let host = lab.host_a();
    let mut cmd = host.netns().command(env!("CARGO_BIN_EXE_ftvm"));
    cmd.arg("run").args(["--tap", host.tap()]).args(args);
    cmd
}

fn ready() -> bool {
    common::kvm() && lab::require_root()
}

#[test]
fn kvm_netns_hostile_nic_driver_ends_in_a_typed_device_error() {
    if !ready() {
        return;
    }
    let lab = Lab::single("hostile");
    for (case, want) in [("outside", "is outside guest memory"), ("loop", "it loops"), ("size", "not a power of two")] {
        let param = format!("case={case}");
        let out = ftvm_in(&lab, &["--guest", "bad-virtio", "--param", &param])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A bad queue size is refused when the queue is made ready, before
        // the guest gets to post anything.
        if case != "size" {
            assert!(stdout.contains("posting a hostile TX chain"), "{case}: {stdout}");
        }
        assert!(!stdout.contains("still running"), "{case}: the guest went on after a device error: {stdout}");
        let line = common::one_error_line(&out);
        assert!(line.contains("the guest misused its virtio-net device") && line.contains(want), "{case}: {line}");
        assert_eq!(out.status.code(), Some(3), "{case}");
    }
}
