//! The README's five-minute tour, run exactly as written (only its `cargo` build lines are
//! skipped: the test runs against the binaries this test build made).

#![allow(clippy::unwrap_used)]

use std::process::Command;

mod support;
use support::bin;

/// The shell blocks between `<!-- tour -->` and `<!-- /tour -->` in the README.
fn tour() -> String {
    let readme = include_str!("../../README.md");
    let start = readme.find("<!-- tour -->").expect("README has a tour");
    let end = readme.find("<!-- /tour -->").expect("the tour ends");
    let mut script = String::new();
    let mut in_block = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if in_block && !line.trim_start().starts_with("cargo ") {
            script.push_str(line);
            script.push('\n');
        }
    }
    script
}

#[test]
fn the_readme_tour_works_as_written() {
    let script = tour();
    assert!(script.contains("tandem --data-dir \"$b\" join"), "{script}");
    let tmp = tempfile::tempdir().unwrap();
    let bins = bin("tandem").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // -e: any failing command fails the tour. The trap stops the background daemons even
    // then, so none outlives the test (they would also hold its pipes open).
    let wrapped = format!("set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&wrapped)
        .current_dir(tmp.path())
        .env("PATH", path)
        .env("TMPDIR", tmp.path())
        .env("XDG_CONFIG_HOME", tmp.path().join("config"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the tour failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // What the tour's comments promise.
    assert!(
        stdout.contains("ready, listening on 127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains(r#"["milk"]"#), "{stdout}");
    assert!(
        stdout.contains("/items/0"),
        "the watch saw A's write: {stdout}"
    );
    assert!(
        stdout.contains("connected") && stdout.contains("yes"),
        "{stdout}"
    );
    assert!(stdout.contains("CHANGE"), "{stdout}");
}
