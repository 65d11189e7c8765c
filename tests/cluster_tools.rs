//! The operator's files: shell completions from `ftvm completions`, the
//! systemd unit templates in cluster/systemd (checked by systemd-analyze),
//! the OpenSAF IMM sample (well-formed XML).

mod common;

use std::path::Path;
use std::process::Command;

use ftvm_lab as lab;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let bash = common::run(&["completions", "bash"]);
    assert!(bash.status.success());
    let text = String::from_utf8(bash.stdout).unwrap();
    for needle in ["complete -F", "primary", "secondary", "--metrics", "--arbiter", "completions"] {
        assert!(text.contains(needle), "{needle} missing from the bash completions");
    }
    // bash parses it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ftvm.bash");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(out.status.success(), "bash -n: {}", String::from_utf8_lossy(&out.stderr));
    let zsh = common::run(&["completions", "zsh"]);
    assert!(zsh.status.success() && String::from_utf8_lossy(&zsh.stdout).starts_with("#compdef ftvm"));
    let fish = common::run(&["completions", "fish"]);
    assert!(fish.status.success() && String::from_utf8_lossy(&fish.stdout).contains("complete -c ftvm"));
    let bad = common::run(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn systemd_units_pass_systemd_analyze() {
    if !lab::require_root() {
        return;
    }
    lab::require_tool("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for role in ["primary", "secondary", "spare", "standby"] {
        let text = std::fs::read_to_string(repo(&format!("cluster/systemd/ftvm-{role}@.service"))).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/ftvm "), "{role}");
        // An instance, with the binary this test built in place of the
        // installed one (systemd-analyze checks that it exists).
        let unit = dir.path().join(format!("ftvm-{role}@kv.service"));
        std::fs::write(&unit, text.replace("/usr/local/bin/ftvm", env!("CARGO_BIN_EXE_ftvm"))).unwrap();
        units.push(unit);
    }
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(&units).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {err}");
}

#[test]
fn the_imm_sample_is_well_formed_and_names_the_clc_commands() {
    lab::require_tool("xmllint");
    let path = repo("cluster/opensaf/ftvm-imm.xml");
    let out = Command::new("xmllint").arg("--noout").arg(&path).output().unwrap();
    assert!(out.status.success(), "xmllint: {}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&path).unwrap();
    for action in ["instantiate", "terminate", "cleanup", "amstart", "amstop"] {
        assert!(text.contains(&format!("<value>{action}</value>")), "{action}");
    }
    // 2N, one component per node.
    assert!(text.contains("<name>saAmfSgtRedundancyModel</name>\n      <value>1</value>"));
    assert_eq!(text.matches("<object class=\"SaAmfComp\">").count(), 2);
}
