//! The daemon and the CLI as a user runs them: real `tandemd` processes on port 0, driven by
//! the real `tandem` binary, plus the API's auth and error contract.

#![allow(clippy::unwrap_used, clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; the workspace's binaries one level up.
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build --workspace` first",
        path.display()
    );
    path
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(bin("tandemd"))
            .args([
                "--data-dir",
                dir.path().to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--no-mdns",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !dir.path().join("api.json").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tandemd did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, dir }
    }

    fn tandem(&self, args: &[&str]) -> Output {
        tandem(self.dir.path(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.tandem(args);
        assert!(
            out.status.success(),
            "tandem {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn api(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.path().join("api.json")).unwrap(),
        )
        .unwrap();
        let token = std::fs::read_to_string(self.dir.path().join("api-token")).unwrap();
        (
            format!("http://{}", v["addr"].as_str().unwrap()),
            token.trim().to_string(),
        )
    }

    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tandemd exits 0 on SIGTERM: {status}");
        assert!(
            !self.dir.path().join("api.json").exists(),
            "api.json removed on exit"
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon running (it would also hold the test's pipes).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tandem(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("tandem"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_without_a_daemon_exits_3_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let out = tandem(dir.path(), &["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tandemd"));
    let out = tandem(dir.path(), &["doc", "nope"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn two_daemons_pair_and_sync_through_the_cli() {
    let a = Daemon::start();
    let b = Daemon::start();
    // A second daemon on the same data dir refuses to start.
    let second = Command::new(bin("tandemd"))
        .args([
            "--data-dir",
            a.dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-mdns",
        ])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"));

    let token = a.ok(&["invite", "--ttl", "5m"]);
    assert!(token.starts_with("tandem1"));
    b.ok(&["join", &token]);
    let doc = a.ok(&["doc", "new", r#"{"title":"hello","items":[]}"#]);
    a.ok(&["doc", "put", &doc, "/items/-", r#""milk""#]);
    let start = Instant::now();
    loop {
        let out = b.tandem(&["doc", "get", &doc, "/items", "--json"]);
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == r#"["milk"]"# {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "B did not get A's write"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(b.ok(&["members"]).contains(&a.ok(&["id", "--short"])));
    assert!(a.ok(&["doc", "ls"]).contains(&doc));
    let status: serde_json::Value = serde_json::from_str(&a.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["documents"], 1);

    // Export and import round-trip through files.
    let file = a.dir.path().join("doc.automerge");
    a.ok(&["doc", "export", &doc, "-o", file.to_str().unwrap()]);
    let copy = a.ok(&["doc", "import", file.to_str().unwrap()]);
    assert_eq!(
        a.ok(&["doc", "get", &copy, "/title", "--json"]),
        r#""hello""#
    );

    // Bad input: exit 1 with a message.
    for args in [
        vec!["doc", "get", &doc, "/nope"],
        vec!["doc", "get", "not-an-id"],
        vec!["doc", "put", &doc, "/title", "{not json"],
        vec!["join", "garbage"],
    ] {
        let out = a.tandem(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    a.ok(&["doc", "rm", &doc, "/items/0"]);
    a.ok(&["doc", "del", &copy]);
    assert!(a.tandem(&["doc", "get", &copy]).status.code() == Some(1));
    let (mut a, mut b) = (a, b);
    a.stop();
    b.stop();
}

#[test]
fn api_requires_the_token_and_answers_errors_in_json() {
    let a = Daemon::start();
    let (base, token) = a.api();
    assert_eq!(
        ureq::get(&format!("{base}/v1/health"))
            .call()
            .unwrap()
            .status(),
        200
    );
    for auth in [None, Some("Bearer wrong")] {
        let mut req = ureq::get(&format!("{base}/v1/status"));
        if let Some(h) = auth {
            req = req.set("Authorization", h);
        }
        match req.call() {
            Err(ureq::Error::Status(401, r)) => {
                let v: serde_json::Value = r.into_json().unwrap();
                assert_eq!(v["code"], "unauthorized");
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    let bearer = format!("Bearer {token}");
    let call = |method: &str, path: &str, body: Option<&[u8]>| {
        let req = ureq::request(method, &format!("{base}{path}")).set("Authorization", &bearer);
        match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        }
    };
    let expect = |r: Result<ureq::Response, ureq::Error>, status: u16, code: &str| match r {
        Err(ureq::Error::Status(s, resp)) => {
            assert_eq!(s, status);
            let v: serde_json::Value = resp.into_json().unwrap();
            assert_eq!(v["code"], code, "{v}");
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    };
    expect(
        call("POST", "/v1/docs", Some(b"{bad json")),
        400,
        "bad_json",
    );
    expect(
        call("POST", "/v1/docs", Some(b"[1,2]")),
        400,
        "not_an_object",
    );
    expect(
        call("GET", "/v1/docs/2u1LfLiX9MTrkMSuadVzga5nMzyf", None),
        404,
        "doc_not_found",
    );
    expect(call("GET", "/v1/docs/zzz", None), 400, "bad_id");
    let big = vec![b' '; tandem::api::MAX_BODY + 1];
    expect(call("POST", "/v1/docs/import", Some(&big)), 413, "bad_body");
    let created: serde_json::Value = call("POST", "/v1/docs", Some(br#"{"n":1}"#))
        .unwrap()
        .into_json()
        .unwrap();
    let id = created["id"].as_str().unwrap();
    expect(
        call("GET", &format!("/v1/docs/{id}?path=nope"), None),
        400,
        "bad_path",
    );
    expect(
        call("PUT", &format!("/v1/docs/{id}?path=/n/x"), Some(b"1")),
        409,
        "type_mismatch",
    );
    expect(
        call("POST", "/v1/docs/import", Some(b"not automerge")),
        400,
        "corrupt_import",
    );
    expect(call("GET", "/v1/nothing", None), 404, "no_route");
    let mut a = a;
    a.stop();
}
