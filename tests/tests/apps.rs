//! JavaScript apps on tandemd: runs `tests/js` (the real `@automerge/automerge-repo` 2.x client
//! and its WebSocket adapter against real tandemd processes and the CLI) with Node.js's test
//! runner. The npm packages are installed by `npm install` here when missing (`.ci/run` installs
//! Node.js). Without Node.js the test says so and skips.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn automerge_repo_apps_sync_through_tandemd() {
    if !have("node") || !have("npm") {
        eprintln!(
            "SKIPPED: Node.js and npm are not installed; the automerge-repo tests need them (.ci/run installs them)"
        );
        return;
    }
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    if !js.join("node_modules/@automerge/automerge-repo").exists() {
        // Not `npm ci`: see .ci/run.
        let out = Command::new("npm")
            .args(["install", "--no-audit", "--no-fund"])
            .current_dir(&js)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "npm install in tests/js failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bins = support::bin("tandemd");
    let out = Command::new("npm")
        .arg("test")
        .current_dir(&js)
        .env("TANDEM_BIN_DIR", bins.parent().unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the JavaScript tests failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(
        passed >= 10,
        "expected every JavaScript test to run:\n{stdout}"
    );
    eprintln!("{passed} JavaScript tests passed");
}
