//! The `tandem` binary without a daemon: version, identity from a data dir, exit codes.
//! (Building this test also makes cargo build the `tandem` binary the end-to-end tests use.)

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn version_and_usage() {
    assert!(tandem(&["--version"]).status.success());
    assert_eq!(tandem(&["no-such-command"]).status.code(), Some(2));
}

#[test]
fn id_needs_an_identity_and_status_needs_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = tandem(&["--data-dir", d, "id"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hint"));
    let out = tandem(&["--data-dir", d, "status"]);
    assert_eq!(out.status.code(), Some(3), "daemon not running");
}
