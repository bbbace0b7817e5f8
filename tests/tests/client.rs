//! `tandem::client::Daemon` against a real tandemd: every method, the typed errors (compared
//! with what an embedded `Node` returns for the same mistakes), and the event stream across a
//! daemon restart on a new port.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::Daemon as Tandemd;
use tandem::client::{ClientError, DaemonEvent, Subscribe};
use tandem::crdt::PathError;
use tandem::{DocError, Error, MembershipError, Node, SubscriptionError};

fn client(d: &Tandemd) -> tandem::client::Daemon {
    tandem::client::Daemon::find(d.dir.path()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_document_method_works_on_the_daemons_documents() {
    let d = Tandemd::start();
    let c = client(&d);
    let doc = c
        .create(Some(
            json!({"title": "groceries", "items": ["milk"], "n": 1}),
        ))
        .await
        .unwrap();
    // The CLI sees what the client made, and the other way round.
    assert_eq!(
        d.ok(&["doc", "get", &doc.to_string(), "/title"]),
        "\"groceries\""
    );
    d.ok(&["doc", "put", &doc.to_string(), "/n", "2"]);
    assert_eq!(c.get(doc, "/n").await.unwrap(), json!(2));

    c.insert(doc, "/items/0", json!("eggs")).await.unwrap();
    c.insert(doc, "/items/-", json!("tea")).await.unwrap();
    c.put(doc, "/done", json!(false)).await.unwrap();
    c.delete_at(doc, "/n").await.unwrap();
    c.splice_text(doc, "/title", 0, 0, "weekly ").await.unwrap();
    assert_eq!(
        c.get(doc, "").await.unwrap(),
        json!({"title": "weekly groceries", "items": ["eggs", "milk", "tea"], "done": false})
    );

    // A three-way text edit: the text as read, edited while someone else edits it too.
    let (before, base) = c.get_with_heads(doc, "/title").await.unwrap();
    assert_eq!(before, json!("weekly groceries"));
    assert_eq!(base, c.heads(doc).await.unwrap());
    c.update_text(doc, "/title", "weekly groceries!")
        .await
        .unwrap();
    c.update_text_from(doc, "/title", &base, "our weekly groceries")
        .await
        .unwrap();
    assert_eq!(
        c.get(doc, "/title").await.unwrap(),
        json!("our weekly groceries!")
    );

    let history = c.history(doc).await.unwrap();
    assert_eq!(history.len(), 9, "{history:?}");
    assert!(history.iter().all(|h| h.origin.is_some()));
    let heads = c.heads(doc).await.unwrap();
    assert!(heads.iter().all(|h| history.iter().any(|e| e.hash == *h)));

    let listed = c.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].id, &listed[0].heads), (doc, &heads));

    let bytes = c.export(doc).await.unwrap();
    let copy = c.import(&bytes).await.unwrap();
    assert_ne!(copy, doc, "an import is a new document");
    assert_eq!(
        c.get(copy, "").await.unwrap(),
        c.get(doc, "").await.unwrap()
    );
    assert!(matches!(
        c.import(b"not automerge").await,
        Err(Error::Doc(DocError::CorruptImport(_)))
    ));
    c.delete(copy).await.unwrap();
    let fresh = c.create(None).await.unwrap();
    assert_eq!(c.get(fresh, "").await.unwrap(), json!({}));

    c.delete(fresh).await.unwrap();
    assert!(matches!(
        c.get(fresh, "").await,
        Err(Error::Doc(DocError::Deleted(d))) if d == fresh
    ));
    assert_eq!(c.list().await.unwrap().len(), 1);

    // The node and its members.
    let status = c.status().await.unwrap();
    assert_eq!(status["documents"], json!(1));
    assert!(c.peers().await.unwrap().is_array());
    assert_eq!(c.members().await.unwrap().as_array().map(Vec::len), Some(0));
    let invite = c.invite(Duration::from_secs(600)).await.unwrap();
    assert!(invite.starts_with("tandem1"), "{invite}");
    assert!(matches!(
        c.join(&invite).await,
        Err(Error::Membership(MembershipError::OwnInvite))
    ));
    assert!(c.login_url().await.unwrap().contains("/ui/login?code="));
    let me: tandem::NodeId = status["id"].as_str().unwrap().parse().unwrap();
    assert!(matches!(
        c.remove_member(me).await,
        Err(Error::Membership(MembershipError::RemoveSelf))
    ));
    let stranger: tandem::NodeId = "a".repeat(52).parse().unwrap();
    assert!(!c.remove_member(stranger).await.unwrap());
    let epoch = c.recover_membership().await.unwrap();
    assert_eq!(
        c.status().await.unwrap()["membership"]["epoch"],
        json!(epoch)
    );
}

/// The same mistakes made through an embedded `Node` and through the daemon client give the
/// same error values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_come_back_as_the_errors_an_embedded_node_returns() {
    let d = Tandemd::start();
    let c = client(&d);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(tandem::Config::new(dir.path())).await.unwrap();
    let initial = json!({"n": 1, "items": [], "t": "text"});
    let on_daemon = c.create(Some(initial.clone())).await.unwrap();
    let on_node = node.create(Some(initial)).await.unwrap();
    let missing = tandem::DocId::from_bytes([9; 16]);

    let (a, b) = (on_daemon, on_node);
    for (what, ea, eb) in [
        (
            "an unknown document",
            c.get(missing, "").await.unwrap_err(),
            node.get(missing, "").await.unwrap_err(),
        ),
        (
            "nothing at the path",
            c.get(a, "/nope").await.unwrap_err(),
            node.get(b, "/nope").await.unwrap_err(),
        ),
        (
            "splice into a number",
            c.splice_text(a, "/n", 0, 0, "x").await.unwrap_err(),
            node.splice_text(b, "/n", 0, 0, "x").await.unwrap_err(),
        ),
        (
            "insert past the end",
            c.insert(a, "/items/5", json!(1)).await.unwrap_err(),
            node.insert(b, "/items/5", json!(1)).await.unwrap_err(),
        ),
        (
            "a bad pointer",
            c.put(a, "items", json!(1)).await.unwrap_err(),
            node.put(b, "items", json!(1)).await.unwrap_err(),
        ),
        (
            "a timestamp that is not one",
            c.put(a, "/at", json!({"$timestamp": "yesterday"}))
                .await
                .unwrap_err(),
            node.put(b, "/at", json!({"$timestamp": "yesterday"}))
                .await
                .unwrap_err(),
        ),
        (
            "a root that is not an object",
            c.create(Some(json!([1]))).await.unwrap_err(),
            node.create(Some(json!([1]))).await.unwrap_err(),
        ),
        (
            "deleting the root",
            c.delete_at(a, "").await.unwrap_err(),
            node.delete_at(b, "").await.unwrap_err(),
        ),
        (
            "increment where no counter is",
            c.put(a, "/n", json!({"$increment": 1})).await.unwrap_err(),
            node.put(b, "/n", json!({"$increment": 1}))
                .await
                .unwrap_err(),
        ),
        (
            "a malformed invite",
            c.join("tandem1garbage").await.unwrap_err(),
            node.join("tandem1garbage").await.unwrap_err(),
        ),
    ] {
        assert_eq!(
            format!("{ea:?}").replace(&a.to_string(), "DOC"),
            format!("{eb:?}").replace(&b.to_string(), "DOC"),
            "{what}"
        );
    }
    assert!(matches!(
        c.get(missing, "").await,
        Err(Error::Doc(DocError::NotFound(d))) if d == missing
    ));
    assert!(matches!(
        c.splice_text(on_daemon, "/n", 0, 0, "x").await,
        Err(Error::Doc(DocError::Path(PathError::TypeMismatch { .. })))
    ));
    node.close().await.unwrap();

    // Errors of the client itself.
    let (url, _) = d.api();
    let wrong = tandem::client::Daemon::connect(&url, "not-the-token");
    match wrong.list().await {
        Err(Error::Client(ClientError::Api { status, code, .. })) => {
            assert_eq!((status, code.as_str()), (401, "unauthorized"));
        }
        other => panic!("{other:?}"),
    }
    let nowhere = tempfile::tempdir().unwrap();
    assert!(matches!(
        tandem::client::Daemon::find(nowhere.path()),
        Err(Error::Client(ClientError::NotRunning { .. }))
    ));
}

/// The next event, or the test fails after 20 s.
async fn next(s: &mut tandem::client::EventStream) -> Result<DaemonEvent, SubscriptionError> {
    tokio::time::timeout(Duration::from_secs(20), s.recv())
        .await
        .expect("an event within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_follows_the_daemon_across_a_restart_on_a_new_port() {
    let mut d = Tandemd::start();
    let c = client(&d);
    let doc = c.create(Some(json!({"n": 0}))).await.unwrap();
    let mut all = c
        .subscribe_with(Subscribe {
            patches: true,
            ..Subscribe::default()
        })
        .await
        .unwrap();
    let mut one = c.subscribe(Some(doc)).await.unwrap();

    c.put(doc, "/n", json!(1)).await.unwrap();
    let heads = c.heads(doc).await.unwrap();
    // (The create's event may come first if the journal was a moment behind the request.)
    let until_put = async |s: &mut tandem::client::EventStream| loop {
        match next(s).await {
            Ok(DaemonEvent::Change(ch)) if ch.heads == heads => break ch,
            Ok(_) => continue,
            Err(e) => panic!("{e:?}"),
        }
    };
    let ch = until_put(&mut all).await;
    assert_eq!((ch.doc, ch.paths.clone()), (doc, vec!["/n".to_string()]));
    assert_eq!(ch.source, tandem::Source::Local);
    let patches = ch.patches.clone().unwrap();
    assert_eq!(patches[0]["action"], json!("put"), "{patches:?}");
    let same = until_put(&mut one).await;
    assert_eq!(same.id, ch.id);
    assert_eq!(all.last_event_id().as_deref(), Some(ch.id.as_str()));

    // Restart: the daemon comes back on another port; edits made while it was down and after
    // it came back arrive, after a `Restarted` notice (its earlier events are gone).
    let old = c.addr();
    let blocking = tokio::task::spawn_blocking(move || {
        d.stop();
        d.restart();
        d
    });
    let d = blocking.await.unwrap();
    let back = client(&d);
    assert_ne!(back.addr(), old, "tandemd came back on a new port");
    // The old client follows it (it re-reads api.json when the old port refuses).
    c.put(doc, "/n", json!(2)).await.unwrap();
    assert_eq!(c.addr(), back.addr());
    assert_eq!(next(&mut all).await, Err(SubscriptionError::Restarted));
    let got = loop {
        match next(&mut all).await {
            Ok(DaemonEvent::Change(ch)) => break ch,
            Ok(DaemonEvent::Member(_)) => continue,
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(got.doc, doc);
    assert_eq!(next(&mut one).await, Err(SubscriptionError::Restarted));
    assert!(matches!(next(&mut one).await, Ok(DaemonEvent::Change(_))));

    // A stream resumed from an id of this epoch misses nothing.
    let after = all.last_event_id();
    drop(all);
    c.put(doc, "/n", json!(3)).await.unwrap();
    let mut resumed = c
        .subscribe_with(Subscribe {
            after,
            ..Subscribe::default()
        })
        .await
        .unwrap();
    let Ok(DaemonEvent::Change(ch)) = next(&mut resumed).await else {
        panic!()
    };
    assert_eq!(ch.doc, doc);
    assert_eq!(c.get(doc, "/n").await.unwrap(), json!(3));
    assert!(ch.patches.is_none(), "patches only when asked for");

    // A subscription to a document that does not exist is refused at once.
    let missing = tandem::DocId::from_bytes([1; 16]);
    assert!(matches!(
        c.subscribe(Some(missing)).await,
        Err(Error::Doc(DocError::NotFound(_)))
    ));
}

/// The to-do example, run against the daemon (`--daemon=DIR`, and `--daemon` finding it
/// through `$TANDEM_DATA_DIR`): its list is a document of the daemon's, read by the CLI.
#[test]
fn the_todo_example_runs_against_the_daemon() {
    let d = Tandemd::start();
    let exe = support::bin("examples/todo");
    let state = tempfile::tempdir().unwrap();
    let todo = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let out = std::process::Command::new(&exe)
            .args(args)
            .env("TODO_DIR", state.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "todo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let flag = format!("--daemon={}", d.dir.path().display());
    todo(&[&flag, "add", "buy milk"], &[]);
    let out = todo(
        &["--daemon", "add", "call mum"],
        &[("TANDEM_DATA_DIR", d.dir.path())],
    );
    assert!(
        out.contains("buy milk") && out.contains("call mum"),
        "{out}"
    );
    let doc = std::fs::read_to_string(state.path().join("todo-doc")).unwrap();
    let items = d.ok(&["doc", "get", doc.trim(), "/items/1/title"]);
    assert_eq!(items, "\"call mum\"");
    // No node of its own was made: the app's state dir holds only the document's id.
    assert!(!state.path().join("identity.key").exists());
}
