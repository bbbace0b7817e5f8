//! The daemon and the CLI as a user runs them: real `tandemd` processes on port 0, driven by
//! the real `tandem` binary, plus the API's auth and error contract.

#![allow(clippy::unwrap_used, clippy::result_large_err)]

use std::process::Command;
use std::time::{Duration, Instant};

mod support;
use support::{Daemon, bin, tandem};

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
    let a_short = a.ok(&["id", "--short"]);
    assert!(b.ok(&["members"]).contains(&a_short));
    // Members know each other by name (the host name by default), learned from the Hello.
    let a_name = json(&a.ok(&["status", "--json"]))["name"].clone();
    let start = Instant::now();
    while json(&b.ok(&["members", "--json"]))[0]["name"] != a_name {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "B never learned A's name"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // B watches; A's change shows up there as a line naming A. (Each poke writes a new value.)
    let watch = b.watch(&[&doc]);
    let pokes = std::cell::Cell::new(0);
    let line = watch.poke_until(
        20,
        || {
            pokes.set(pokes.get() + 1);
            a.ok(&["doc", "put", &doc, "/seen", &pokes.get().to_string()]);
        },
        |l| l.contains("/seen"),
    );
    assert!(line.contains(&doc) && line.contains(&a_short), "{line}");
    drop(watch);
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    let synced = json(&b.ok(&["sync", "wait", "--timeout", "20s", "--json"]));
    assert_eq!(synced["in_sync"], true);
    assert_eq!(synced["peers"], 1);

    // `doc edit` merges: while A's editor is open, B edits the same text; both edits survive.
    a.ok(&["doc", "put", &doc, "/body", r#""the quick brown fox""#]);
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    let dir = a.dir.path();
    let bin_tandem = bin("tandem");
    let b_dir = b.dir.path().to_str().unwrap();
    support::script(dir, "jump.sh", "sed -i 's/fox/fox jumps/' \"$1\"");
    let outer = support::script(
        dir,
        "slow.sh",
        &format!(
            "VISUAL={jump} {t} --data-dir {b_dir} doc edit {doc} /body || exit 1\n\
             {t} --data-dir {b_dir} sync wait --timeout 20s || exit 1\n\
             sed -i 's/the quick/the slow/' \"$1\"",
            jump = dir.join("jump.sh").display(),
            t = bin_tandem.display(),
        ),
    );
    let out = a.tandem_env(
        &["doc", "edit", &doc, "/body"],
        &[("VISUAL", outer.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    let want = r#""the slow brown fox jumps""#;
    assert_eq!(a.ok(&["doc", "get", &doc, "/body", "--json"]), want);
    let start = Instant::now();
    while b.ok(&["doc", "get", &doc, "/body", "--json"]) != want {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "B did not converge"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    // Removing a member cuts it off; removing a stranger is an error.
    let b_id = b.ok(&["id"]);
    a.ok(&["members", "rm", &b_id]);
    assert!(!a.ok(&["members"]).contains(&b_id[..8]));
    assert_eq!(a.tandem(&["members", "rm", &b_id]).status.code(), Some(1));
    assert_eq!(
        a.tandem(&["members", "rm", "nonsense"]).status.code(),
        Some(1)
    );
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
    // The API's description holds no secrets: served without a token.
    assert_eq!(
        ureq::get(&format!("{base}/v1/openapi.json"))
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

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn every_command_in_human_and_json_form() {
    use serde_json::json;
    let a = Daemon::start();
    let id = a.ok(&["id"]);
    let short = a.ok(&["id", "--short"]);
    assert_eq!(short.len(), 8);
    assert!(id.starts_with(&short));

    let human = a.ok(&["status"]);
    assert!(
        human.contains(&id) && human.contains("documents"),
        "{human}"
    );
    let status = json(&a.ok(&["status", "--json"]));
    assert_eq!(status["id"], id.as_str());
    assert!(status["listen"].as_str().unwrap().starts_with("127.0.0.1:"));

    // The daemon found by URL and token file instead of the data dir.
    let (base, _) = a.api();
    let elsewhere = tempfile::tempdir().unwrap();
    let token_file = a.dir.path().join("api-token");
    let via_api = |args: &[&str]| {
        let mut all = vec!["--api", &base, "--token-file", token_file.to_str().unwrap()];
        all.extend_from_slice(args);
        tandem(elsewhere.path(), &all)
    };
    let out = via_api(&["id"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "`id` reads the data dir, which has none"
    );
    let out = via_api(&["status", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        json(&String::from_utf8(out.stdout).unwrap())["id"],
        id.as_str()
    );
    let out = tandem(elsewhere.path(), &["--api", &base, "status"]);
    assert_eq!(out.status.code(), Some(2), "--api needs --token-file");

    assert!(a.ok(&["invite"]).starts_with("tandem1"));
    assert_eq!(
        a.tandem(&["invite", "--ttl", "soon"]).status.code(),
        Some(2)
    );
    assert!(a.ok(&["members"]).starts_with("ID"));
    assert!(json(&a.ok(&["members", "--json"])).is_array());
    assert!(a.ok(&["peers"]).starts_with("ID"));
    assert_eq!(json(&a.ok(&["peers", "--json"])), json!([]));

    // Documents.
    let empty = a.ok(&["doc", "new"]);
    assert_eq!(json(&a.ok(&["doc", "get", &empty, "--json"])), json!({}));
    let doc = a.ok(&["doc", "new", r#"{"title":"hello","n":1}"#]);
    assert_eq!(a.tandem(&["doc", "new", "[1]"]).status.code(), Some(1));
    let ls = a.ok(&["doc", "ls"]);
    assert!(
        ls.starts_with("ID") && ls.contains(&doc) && ls.contains(&empty),
        "{ls}"
    );
    let ids: Vec<String> = json(&a.ok(&["doc", "ls", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    assert!(ids.contains(&doc));
    let pretty = a.ok(&["doc", "get", &doc]);
    assert!(pretty.lines().count() > 1, "human output is pretty-printed");
    assert_eq!(json(&pretty), json!({"title": "hello", "n": 1}));
    assert_eq!(a.ok(&["doc", "get", &doc, "/n", "--json"]), "1");
    a.ok(&["doc", "put", &doc, "/n", "2"]);
    a.ok(&["doc", "put", &doc, "/tags", r#"["x","y"]"#]);
    a.ok(&["doc", "rm", &doc, "/tags/0"]);
    assert_eq!(a.ok(&["doc", "get", &doc, "/tags", "--json"]), r#"["y"]"#);
    assert_eq!(a.tandem(&["doc", "rm", &doc, ""]).status.code(), Some(1));

    // History: one line per change, each with this node as its origin and a time.
    let history = a.ok(&["doc", "history", &doc]);
    assert!(history.starts_with("CHANGE"), "{history}");
    assert_eq!(history.lines().count(), 1 + 4, "{history}");
    assert!(history.contains(&short));
    let h = json(&a.ok(&["doc", "history", &doc, "--json"]));
    let changes = h["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 4);
    assert!(changes.iter().all(|c| c["origin"] == id.as_str()));
    assert!(
        changes
            .iter()
            .all(|c| c["time"].as_i64().unwrap() > 1_700_000_000)
    );
    assert_eq!(h["heads"], json!([changes[3]["hash"]]));

    // Edit: the editor's change is saved as a diff; an unchanged file saves nothing; a failed
    // editor saves nothing; a non-text path is refused.
    let scripts = a.dir.path();
    let shout = support::script(scripts, "shout.sh", "sed -i 's/hello/hello world/' \"$1\"");
    let out = a.tandem_env(
        &["doc", "edit", &doc, "/title"],
        &[("EDITOR", shout.to_str().unwrap()), ("VISUAL", "")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        a.ok(&["doc", "get", &doc, "/title", "--json"]),
        r#""hello world""#
    );
    let before = a.ok(&["doc", "history", &doc, "--json"]);
    let out = a.tandem_env(&["doc", "edit", &doc, "/title"], &[("VISUAL", "true")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no change"));
    assert_eq!(a.ok(&["doc", "history", &doc, "--json"]), before);
    let out = a.tandem_env(&["doc", "edit", &doc, "/title"], &[("VISUAL", "false")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing saved"));
    // Someone replaces the whole field while the editor is open: the edit cannot be merged,
    // nothing is written, and the user's text is kept in a file the message names.
    let replace = support::script(
        scripts,
        "replace.sh",
        &format!(
            "{t} --data-dir {d} doc put {doc} /title '\"replaced\"' || exit 1\n\
             echo 'my precious edit' > \"$1\"",
            t = bin("tandem").display(),
            d = a.dir.path().display()
        ),
    );
    let out = a.tandem_env(
        &["doc", "edit", &doc, "/title"],
        &[("VISUAL", replace.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("replaced or removed"), "{err}");
    let kept = err
        .lines()
        .find_map(|l| l.strip_prefix("your text is kept in "))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(kept).unwrap().trim(),
        "my precious edit"
    );
    std::fs::remove_file(kept).unwrap();
    assert_eq!(
        a.ok(&["doc", "get", &doc, "/title", "--json"]),
        r#""replaced""#
    );
    let out = a.tandem_env(&["doc", "edit", &doc, "/n"], &[("VISUAL", "true")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not text"));

    // Watch, human and JSON: one line per change. (Each poke writes a new value: writing the
    // value a field already holds is no change and no event.)
    let pokes = std::cell::Cell::new(100);
    let watch = a.watch(&[&doc]);
    let line = watch.poke_until(
        20,
        || {
            pokes.set(pokes.get() + 1);
            a.ok(&["doc", "put", &doc, "/n", &pokes.get().to_string()]);
        },
        |l| l.contains(&doc),
    );
    assert!(line.contains("local") && line.contains("/n"), "{line}");
    let watch = a.watch(&["--json"]);
    let line = watch.poke_until(
        20,
        || {
            pokes.set(pokes.get() + 1);
            a.ok(&["doc", "put", &doc, "/flag", &pokes.get().to_string()]);
        },
        |_| true,
    );
    let v = json(&line);
    assert_eq!(v["event"], "change");
    assert_eq!(v["data"]["doc"], doc.as_str());
    assert_eq!(v["data"]["paths"], json!(["/flag"]));
    assert!(v["id"].as_str().unwrap().contains('-'));
    drop(watch);

    // Export, then import several files at once: one bad file fails the command after the
    // good ones are in, and their ids are printed.
    let good = a.dir.path().join("good.automerge");
    let bad = a.dir.path().join("bad.automerge");
    a.ok(&["doc", "export", &doc, "-o", good.to_str().unwrap()]);
    std::fs::write(&bad, b"not automerge").unwrap();
    let out = a.tandem(&[
        "doc",
        "import",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 of 3 files not imported"), "{stderr}");
    assert!(
        !stderr.contains('\r'),
        "no progress bar when stderr is not a terminal"
    );
    // On a terminal the same import draws a progress bar (`script` provides the terminal).
    let on_tty = format!(
        "{} --data-dir {} doc import {g} {g}",
        bin("tandem").display(),
        a.dir.path().display(),
        g = good.display()
    );
    match Command::new("script")
        .args(["-qec", &on_tty, "/dev/null"])
        .output()
    {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(
                text.contains("importing [") && text.contains('\r'),
                "{text:?}"
            );
        }
        Err(e) => eprintln!("skipping the progress-bar check: cannot run `script` ({e})"),
    }
    let n = a.ok(&["doc", "get", &doc, "/n", "--json"]);
    for copy in stdout.lines() {
        assert_eq!(a.ok(&["doc", "get", copy, "/n", "--json"]), n);
    }

    // Sync wait with no peers returns at once; completions.
    a.ok(&["sync", "wait", "--timeout", "5s"]);
    assert_eq!(
        json(&a.ok(&["sync", "wait", "--json"])),
        json!({"in_sync": true, "peers": 0, "holding": 0})
    );
    assert!(a.ok(&["completions", "bash"]).contains("_tandem"));
    assert!(a.ok(&["completions", "zsh"]).contains("#compdef tandem"));
    assert_eq!(a.tandem(&["completions", "cmd"]).status.code(), Some(2));

    a.ok(&["doc", "del", &empty]);
    assert_eq!(a.tandem(&["doc", "get", &empty]).status.code(), Some(1));
    // An open event stream does not hold up a clean stop.
    let watch = a.watch(&["--json"]);
    watch.poke_until(
        20,
        || {
            pokes.set(pokes.get() + 1);
            a.ok(&["doc", "put", &doc, "/n", &pokes.get().to_string()]);
        },
        |_| true,
    );
    let mut a = a;
    a.stop();
    drop(watch);
    // And with the daemon gone: exit 3 for anything that needs it, `id` still works.
    assert_eq!(a.tandem(&["doc", "ls"]).status.code(), Some(3));
    assert_eq!(a.ok(&["id"]), id);
}

/// Parses Prometheus text exposition: every sample line is `name{labels} value`, every
/// sample's family has HELP and TYPE, and a histogram's buckets grow up to `+Inf` == count.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut samples = std::collections::BTreeMap::new();
    let mut typed = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["gauge", "counter", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (key, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "no TYPE for {name}");
        if let Some(labels) = key.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (_, v) = pair.split_once('=').unwrap();
                assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
            }
        }
        samples.insert(key.to_string(), value);
    }
    samples
}

#[test]
fn api_metrics_openapi_events_and_text_edits() {
    use std::io::BufRead as _;
    let a = Daemon::start();
    let (base, token) = a.api();
    let bearer = format!("Bearer {token}");
    let get = |path: &str| {
        ureq::get(&format!("{base}{path}"))
            .set("Authorization", &bearer)
            .call()
    };
    let doc = a.ok(&["doc", "new", r#"{"text":"abc"}"#]);
    for i in 0..5 {
        a.ok(&["doc", "put", &doc, "/n", &i.to_string()]);
    }

    // Metrics parse, and say what they should.
    let resp = get("/metrics").unwrap();
    assert!(resp.content_type().starts_with("text/plain"));
    let m = parse_prometheus(&resp.into_string().unwrap());
    assert_eq!(m["tandem_documents"], 1.0);
    assert_eq!(m["tandem_deltas"], 6.0);
    assert_eq!(m["tandem_peers_connected"], 0.0);
    let count = m["tandem_commit_duration_seconds_count"];
    assert!(count >= 6.0, "{count}");
    assert_eq!(
        m["tandem_commit_duration_seconds_bucket{le=\"+Inf\"}"],
        count
    );
    let buckets: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("tandem_commit_duration_seconds_bucket"))
        .map(|(_, v)| *v)
        .collect();
    assert!(buckets.len() > 5);
    assert!(m["tandem_commit_duration_seconds_sum"] > 0.0);

    // Every route in the OpenAPI document is served (not the no-route fallback, not 405).
    let spec: serde_json::Value = get("/v1/openapi.json").unwrap().into_json().unwrap();
    let mut checked = 0;
    for (path, item) in spec["paths"].as_object().unwrap() {
        let path = path.replace("{id}", "zzz");
        for method in item
            .as_object()
            .unwrap()
            .keys()
            .filter(|m| *m != "parameters")
        {
            if path == "/v1/events" {
                continue; // a stream; checked below
            }
            let r = ureq::request(&method.to_uppercase(), &format!("{base}{path}"))
                .set("Authorization", &bearer)
                .send_bytes(b"{}");
            let (status, body) = match r {
                Ok(r) => (r.status(), String::new()),
                Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
                Err(e) => panic!("{method} {path}: {e}"),
            };
            assert_ne!(status, 405, "{method} {path}");
            assert!(!body.contains("no_route"), "{method} {path}: {body}");
            assert!(
                status < 500 || status == 502,
                "{method} {path}: {status} {body}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 18, "{checked}");

    // Events: ids, resume with Last-Event-ID, and a notice for ids from before a restart.
    let open = |last: Option<&str>| {
        let mut req =
            ureq::get(&format!("{base}/v1/events?doc={doc}")).set("Authorization", &bearer);
        if let Some(l) = last {
            req = req.set("Last-Event-ID", l);
        }
        let resp = req.call().unwrap();
        assert_eq!(resp.content_type(), "text/event-stream");
        std::io::BufReader::new(resp.into_reader()).lines()
    };
    // Reads one event: (event, id, data).
    fn next_event(
        lines: &mut impl Iterator<Item = std::io::Result<String>>,
    ) -> (String, String, serde_json::Value) {
        let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
        for line in lines {
            let line = line.unwrap();
            if line.is_empty() && !data.is_empty() {
                return (event, id, serde_json::from_str(&data).unwrap());
            }
            if let Some(v) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                event = v.to_string();
            } else if let Some(v) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                id = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                data = v.to_string();
            }
        }
        panic!("stream ended");
    }
    let mut live = open(None);
    // The stream starts now: poke until the first event arrives (the subscription may lag the
    // request by a moment), then resume from it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        loop {
            if tx.send(next_event(&mut live)).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let first = loop {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no event arrived"
        );
        // A new value each time: rewriting the same value is no change and no event.
        let poke = start.elapsed().as_nanos().to_string();
        a.ok(&["doc", "put", &doc, "/poke", &poke]);
        if let Ok(e) = rx.recv_timeout(Duration::from_secs(1)) {
            break e;
        }
    };
    assert_eq!(first.0, "change");
    assert_eq!(first.2["paths"], serde_json::json!(["/poke"]));
    a.ok(&["doc", "put", &doc, "/after", "1"]);
    a.ok(&["doc", "put", &doc, "/after", "2"]);
    let mut resumed = open(Some(&first.1));
    let (ev, id2, data) = next_event(&mut resumed);
    assert_eq!(
        (ev.as_str(), data["paths"].clone()),
        ("change", serde_json::json!(["/after"]))
    );
    let (_, id3, _) = next_event(&mut resumed);
    let n = |id: &str| id.rsplit_once('-').unwrap().1.parse::<u64>().unwrap();
    assert!(n(&first.1) < n(&id2) && n(&id2) < n(&id3));
    let mut stale = open(Some("99999-5"));
    let (ev, _, data) = next_event(&mut stale);
    assert_eq!(ev, "lagged");
    assert!(data["message"].as_str().unwrap().contains("restarted"));
    let bad = ureq::get(&format!("{base}/v1/events"))
        .set("Authorization", &bearer)
        .set("Last-Event-ID", "garbage")
        .call();
    assert!(matches!(bad, Err(ureq::Error::Status(400, _))));
    assert!(matches!(
        get("/v1/events?doc=nope"),
        Err(ureq::Error::Status(400, _))
    ));

    // Text edits against a base: a bad base is a 4xx with a JSON error; a good one merges.
    let r = get(&format!("/v1/docs/{doc}?path=/text")).unwrap();
    let heads = r.header("tandem-heads").unwrap().to_string();
    a.ok(&["doc", "put", &doc, "/other", "1"]);
    let put = |body: serde_json::Value| {
        ureq::put(&format!("{base}/v1/docs/{doc}/text?path=/text"))
            .set("Authorization", &bearer)
            .send_json(body)
    };
    let code = |r: Result<ureq::Response, ureq::Error>| match r {
        Err(ureq::Error::Status(s, r)) => {
            let v: serde_json::Value = r.into_json().unwrap();
            (s, v["code"].as_str().unwrap().to_string())
        }
        Ok(r) => (r.status(), String::new()),
        Err(e) => panic!("{e}"),
    };
    assert_eq!(
        code(put(serde_json::json!({"text": "x", "base": ["zz"]}))),
        (400, "bad_base".into())
    );
    let unknown = "00".repeat(32);
    assert_eq!(
        code(put(serde_json::json!({"text": "x", "base": [unknown]}))),
        (409, "bad_base".into())
    );
    assert_eq!(
        code(put(serde_json::json!({"txt": "x"}))),
        (400, "bad_json".into())
    );
    let base_heads: Vec<&str> = heads.split(',').collect();
    assert_eq!(
        code(put(serde_json::json!({"text": "abcd", "base": base_heads}))),
        (204, String::new())
    );
    assert_eq!(a.ok(&["doc", "get", &doc, "/text", "--json"]), r#""abcd""#);
    let put_n = ureq::put(&format!("{base}/v1/docs/{doc}/text?path=/n"))
        .set("Authorization", &bearer)
        .send_json(serde_json::json!({"text": "x"}));
    assert_eq!(code(put_n).0, 409, "not text");
    let mut a = a;
    a.stop();
}

#[test]
fn tandemd_config_file_flags_win_and_bad_keys_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("tandem.toml");
    let run = |args: &[&str], xdg: &std::path::Path| {
        Command::new(bin("tandemd"))
            .args(args)
            .env("XDG_CONFIG_HOME", xdg)
            .output()
            .unwrap()
    };
    // An unknown key and a bad value: exit 2, the message names the key and the file.
    for (text, key) in [
        ("listn = \"127.0.0.1:0\"\n", "unknown key `listn`"),
        ("api = \"10.0.0.1:80\"\n", "key `api`"),
        ("version = 7\n", "key `version`"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = run(&["--config", cfg.to_str().unwrap()], tmp.path());
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains("tandem.toml"), "{err}");
    }
    let out = run(&["--config", "/nonexistent/tandem.toml"], tmp.path());
    assert_eq!(out.status.code(), Some(2));

    // The default file ($XDG_CONFIG_HOME/tandem/config.toml) is read; flags win over it.
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir_all(xdg.join("tandem")).unwrap();
    let from_file = tmp.path().join("from-file");
    let from_flag = tmp.path().join("from-flag");
    std::fs::write(
        xdg.join("tandem/config.toml"),
        format!(
            "version = 1\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\nmdns = false\nlog_format = \"json\"\nname = \"work laptop\"\n",
            from_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(bin("tandemd"))
        .args(["--data-dir", from_flag.to_str().unwrap()])
        .env("XDG_CONFIG_HOME", &xdg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_for_file(&from_flag.join("api.json"));
    assert!(!from_file.exists(), "the flag's data dir wins");
    let status = json(
        &String::from_utf8(support::tandem(&from_flag, &["status", "--json"]).stdout).unwrap(),
    );
    assert_eq!(status["name"], "work laptop");
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = {
        use std::io::Read as _;
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        assert!(child.wait().unwrap().success());
        (stdout, stderr)
    };
    // JSON logs from the file; the ready line reports the chosen ports.
    let first = out.1.lines().next().unwrap();
    assert!(json(first).is_object(), "{first}");
    assert!(
        out.0.contains("listening on 127.0.0.1:") && out.0.contains("api on 127.0.0.1:"),
        "{}",
        out.0
    );
}

/// `sync wait` counts only what members confirmed storing: a stopped (SIGSTOP) member that was
/// sent a write does not hold it, a member that is off lacks what was written since it left,
/// and `--any` is satisfied by one member that holds everything.
#[test]
fn sync_wait_counts_only_what_members_confirmed_storing() {
    let a = Daemon::start();
    let mut b = Daemon::start();
    let c = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    c.ok(&["join", &a.ok(&["invite"])]);
    let doc = a.ok(&["doc", "new", r#"{"n":0}"#]);
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    let b_short = b.ok(&["id", "--short"]);
    let signal = |sig: &str, d: &Daemon| {
        let pid = d.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };

    // B is frozen: A's write is sent to it but never stored there.
    signal("-STOP", &b);
    a.ok(&["doc", "put", &doc, "/n", "1"]);
    let out = a.tandem(&["sync", "wait", "--timeout", "2s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&b_short) && err.contains("lacks 1"), "{err}");
    let behind = json(&String::from_utf8_lossy(
        &a.tandem(&["sync", "wait", "--timeout", "1s", "--json"])
            .stdout,
    ));
    assert_eq!(behind["in_sync"], false);
    assert_eq!(behind["behind"][0]["lacks"], 1);
    // One member (C) holds everything: enough for --any.
    a.ok(&["sync", "wait", "--any", "--timeout", "20s"]);
    signal("-CONT", &b);
    a.ok(&["sync", "wait", "--timeout", "20s"]);

    // B is off: what A writes now is something B lacks, and A says so.
    b.stop();
    a.ok(&["doc", "put", &doc, "/n", "2"]);
    let out = a.tandem(&["sync", "wait", "--timeout", "2s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&b_short) && err.contains("unreachable"),
        "{err}"
    );
    a.ok(&["sync", "wait", "--any", "--timeout", "20s"]);
}

/// A node cannot join its own invite: a clear error, and it never lists itself as a peer.
#[test]
fn a_node_cannot_join_its_own_invite() {
    let a = Daemon::start();
    let token = a.ok(&["invite"]);
    let out = a.tandem(&["join", &token]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("made by this node"), "{err}");
    assert_eq!(json(&a.ok(&["peers", "--json"])), serde_json::json!([]));
    assert_eq!(json(&a.ok(&["members", "--json"])), serde_json::json!([]));
    a.ok(&["sync", "wait", "--timeout", "2s"]);
}

/// The CLI finds the daemon as tandemd does: `--data-dir`, else `$TANDEM_DATA_DIR`, else the
/// config file's `data_dir`.
#[test]
fn the_cli_finds_the_data_dir_from_the_environment_and_the_config_file() {
    let a = Daemon::start();
    let id = a.ok(&["id"]);
    let config = a.dir.path().join("cli-config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\ndata_dir = {:?}\n",
            a.dir.path().to_str().unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(bin("tandem"))
            .args(args)
            .env("XDG_CONFIG_HOME", a.dir.path().join("no-config"))
            .env_remove("TANDEM_DATA_DIR")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let out = run(&["--config", config.to_str().unwrap(), "id"], &[]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
    let out = run(&["--config", config.to_str().unwrap(), "status"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["status"],
        &[("TANDEM_DATA_DIR", a.dir.path().to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default config file is read too.
    let xdg = a.dir.path().join("xdg");
    std::fs::create_dir_all(xdg.join("tandem")).unwrap();
    std::fs::copy(&config, xdg.join("tandem").join("config.toml")).unwrap();
    let out = run(&["status"], &[("XDG_CONFIG_HOME", xdg.to_str().unwrap())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `doc watch` follows the daemon through a restart on a new port and says events may have
/// been missed.
#[test]
fn doc_watch_recovers_from_a_daemon_restart() {
    let mut a = Daemon::start();
    let doc = a.ok(&["doc", "new", r#"{"n":0}"#]);
    let watch = a.watch(&["--json"]);
    // Every poke writes a new value: writing the same one again changes nothing, so a watch
    // that connected after the first poke would wait for an event that never comes.
    let n = std::cell::Cell::new(0);
    let first = watch.poke_until(
        20,
        || {
            n.set(n.get() + 1);
            a.ok(&["doc", "put", &doc, "/n", &n.get().to_string()]);
        },
        |l| l.contains("\"change\""),
    );
    assert!(first.contains(&doc), "{first}");
    a.stop();
    a.restart();
    let line = watch.poke_until(
        30,
        || {
            n.set(n.get() + 1);
            a.ok(&["doc", "put", &doc, "/n", &n.get().to_string()]);
        },
        |l| l.contains("\"lagged\"") || l.contains("\"change\""),
    );
    assert!(
        line.contains("lagged") && line.contains("restarted"),
        "{line}"
    );
    watch.poke_until(
        30,
        || {
            n.set(n.get() + 1);
            a.ok(&["doc", "put", &doc, "/n", &n.get().to_string()]);
        },
        |l| l.contains("\"change\"") && l.contains(&doc),
    );
}

/// What a new user trips over: short ids, JSON values, URLs without a scheme, silly TTLs,
/// version lines.
#[test]
fn rough_edges_a_new_user_hits() {
    let a = Daemon::start();
    let b = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    // Any unique prefix of a DocId works where an id is asked for.
    let doc = a.ok(&["doc", "new", r#"{"items":[]}"#]);
    a.ok(&["doc", "put", &doc[..6], "/items/-", r#""milk""#]);
    assert_eq!(
        a.ok(&["doc", "get", &doc[..6], "/items", "--json"]),
        r#"["milk"]"#
    );
    let out = a.tandem(&["doc", "get", "zzzz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no document id starts with"));
    // A bare word is not JSON, and the message says how to quote it.
    let out = a.tandem(&["doc", "put", &doc, "/items/-", "milk"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("a string needs quotes") && err.contains(r#"'"milk"'"#),
        "{err}"
    );
    // --api without http:// works.
    let (base, _) = a.api();
    let token_file = a.dir.path().join("api-token");
    let out = Command::new(bin("tandem"))
        .args(["--api", base.trim_start_matches("http://")])
        .args(["--token-file", token_file.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Invites live 1 minute to 30 days.
    for ttl in ["0s", "59s", "31d"] {
        let out = a.tandem(&["invite", "--ttl", ttl]);
        assert_eq!(out.status.code(), Some(1), "{ttl}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("at least 1 minute"));
    }
    // A member is removed by its short id.
    let b_short = b.ok(&["id", "--short"]);
    a.ok(&["members", "rm", &b_short]);
    assert_eq!(json(&a.ok(&["members", "--json"])), serde_json::json!([]));
    // Both binaries say the same version and the protocol they speak.
    let v = |b: &str| {
        let out = Command::new(bin(b)).arg("--version").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (d, c) = (v("tandemd"), v("tandem"));
    assert!(
        d.starts_with("tandemd ") && c.starts_with("tandem "),
        "{d} / {c}"
    );
    assert_eq!(
        d.trim_start_matches("tandemd "),
        c.trim_start_matches("tandem ")
    );
    assert!(d.contains("wire protocol"), "{d}");
}

/// Timestamps, counters and bytes through the CLI (the API's typed values): written as one-key
/// objects, read as automerge-js's JSON shows them, kept across a read-modify-write, and the
/// same on a peer; a counter's increments from two nodes add up.
#[test]
fn typed_values_keep_their_types_through_the_cli_and_across_peers() {
    let a = Daemon::start();
    let b = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    let doc = a.ok(&[
        "doc",
        "new",
        r#"{"at":{"$timestamp":"2026-12-06T06:17:45.5+01:00"},"likes":{"$counter":1},"raw":{"$bytes":"aGkh"}}"#,
    ]);
    let expected =
        serde_json::json!({"at": "2026-12-06T05:17:45.500Z", "likes": 1, "raw": [104, 105, 33]});
    assert_eq!(json(&a.ok(&["doc", "get", &doc, "--json"])), expected);
    // Writing back what was read changes nothing.
    let heads = a.ok(&["doc", "history", &doc, "--json"]);
    a.ok(&["doc", "put", &doc, "", &expected.to_string()]);
    assert_eq!(a.ok(&["doc", "history", &doc, "--json"]), heads);
    // Both nodes increment the counter; both increments count.
    let start = Instant::now();
    while b.tandem(&["doc", "get", &doc, "/likes"]).stdout != b"1\n" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "B did not get the doc"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.ok(&["doc", "put", &doc, "/likes", r#"{"$increment":2}"#]);
    b.ok(&["doc", "put", &doc, "/likes", r#"{"$increment":10}"#]);
    // A new time written as text stays a timestamp (it reads back normalised).
    b.ok(&["doc", "put", &doc, "/at", r#""2030-01-01T00:00:00Z""#]);
    let want =
        serde_json::json!({"at": "2030-01-01T00:00:00.000Z", "likes": 13, "raw": [104, 105, 33]});
    let start = Instant::now();
    while json(&a.ok(&["doc", "get", &doc, "--json"])) != want {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "A did not converge"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(json(&b.ok(&["doc", "get", &doc, "--json"])), want);
    // Bad typed values are refused and write nothing.
    for (value, says) in [
        (r#"{"$timestamp":"tomorrow"}"#, "ISO 8601"),
        (r#"{"$bytes":"***"}"#, "base64"),
    ] {
        let out = a.tandem(&["doc", "put", &doc, "/x", value]);
        assert_eq!(out.status.code(), Some(1), "{value}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{value}"
        );
    }
    let out = a.tandem(&["doc", "put", &doc, "/raw", r#"{"$increment":1}"#]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected counter"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&a.ok(&["doc", "get", &doc, "--json"])), want);
}

/// The status page: a one-time code from `tandem open` logs a browser in with an HttpOnly,
/// SameSite=Strict cookie; the cookie reads (GET) from this listener's own origin only.
#[test]
fn the_status_page_logs_in_once_and_only_reads() {
    let a = Daemon::start();
    let (base, _) = a.api();
    let url = a.ok(&["open"]);
    assert!(url.starts_with(&format!("{base}/ui/login?code=")), "{url}");
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let login = agent.get(&url).call().unwrap();
    assert_eq!(login.status(), 303);
    assert_eq!(login.header("location"), Some("/ui/"));
    let cookie = login.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    match agent.get(&url).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("a code works once: {other:?}"),
    }
    let page = agent
        .get(&format!("{base}/ui/"))
        .set("Cookie", &session)
        .call()
        .unwrap();
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(
        page.into_string()
            .unwrap()
            .contains("<title>tandem</title>")
    );
    let status = |extra: &[(&str, &str)]| {
        let mut req = agent
            .get(&format!("{base}/v1/status"))
            .set("Cookie", &session);
        for (k, v) in extra {
            req = req.set(k, v);
        }
        match req.call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(status(&[]), 200);
    assert_eq!(status(&[("Origin", base.as_str())]), 200);
    assert_eq!(
        status(&[("Origin", "https://evil.example")]),
        403,
        "another site"
    );
    let port = base.rsplit(':').next().unwrap();
    assert_eq!(
        status(&[("Host", &format!("evil.example:{port}"))]),
        403,
        "DNS rebinding"
    );
    let write = agent
        .post(&format!("{base}/v1/docs"))
        .set("Cookie", &session)
        .send_string("{}");
    assert!(
        matches!(write, Err(ureq::Error::Status(403, _))),
        "read only"
    );
    let anonymous = agent.get(&format!("{base}/v1/status")).call();
    assert!(matches!(anonymous, Err(ureq::Error::Status(401, _))));
}

/// Any local process can open connections to the API: half-sent requests are closed after the
/// header timeout, and past the connection limit they make room for real clients, so an
/// authorised write still gets through at once.
#[test]
fn half_sent_requests_cannot_starve_the_api() {
    use std::io::{Read, Write};
    let a = Daemon::start();
    let (base, _) = a.api();
    let addr = base.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..tandem::api::MAX_CONNECTIONS + 200 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        held.push(s);
    }
    let start = Instant::now();
    let doc = a.ok(&["doc", "new", r#"{"still":"served"}"#]);
    assert_eq!(
        a.ok(&["doc", "get", &doc, "/still", "--json"]),
        r#""served""#
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "the CLI waited {:?}",
        start.elapsed()
    );
    // The half-sent requests are closed (made room for, or timed out), none answered.
    std::thread::sleep(tandem::api::HEADER_TIMEOUT + Duration::from_secs(1));
    let mut buf = [0u8; 512];
    let open = held
        .iter_mut()
        .filter_map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let still_open = match s.read(&mut buf) {
                Ok(0) => false,                             // closed
                Ok(_) => !buf.starts_with(b"HTTP/1.1 408"), // an answer other than a timeout
                Err(e) => {
                    e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                }
            };
            still_open.then_some(())
        })
        .count();
    assert_eq!(open, 0, "{open} half-sent requests still held open");
}
