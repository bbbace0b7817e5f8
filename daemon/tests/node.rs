//! The embeddable API end to end on a real data dir: documents, paths, durability across
//! reopen, bad input, subscriptions, compaction, the LRU bound and concurrent writers.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use tandem::crdt::{DeltaStore, PathError};
use tandem::{Config, DataDirError, DocError, DocId, Error, Node, Source, SubscriptionError};

mod common;
use common::{open, snapshots_reach};

#[tokio::test]
async fn an_empty_object_is_a_document() {
    // It once failed: `{}` makes no ops, so the document had no first change.
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let empty = node.create(Some(json!({}))).await.unwrap();
    assert_eq!(node.get(empty, "").await.unwrap(), json!({}));
    assert_eq!(node.history(empty).await.unwrap().len(), 1);
    node.close().await.unwrap();
}

#[tokio::test]
async fn documents_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let id = node.id();
    let inc = node.incarnation();
    let doc = node
        .create(Some(json!({"title": "hello", "tags": ["a"]})))
        .await
        .unwrap();
    node.put(doc, "/n", json!(1)).await.unwrap();
    node.insert(doc, "/tags/0", json!("z")).await.unwrap();
    node.delete_at(doc, "/tags/1").await.unwrap();
    node.splice_text(doc, "/title", 5, 0, ", world")
        .await
        .unwrap();
    node.update_text(doc, "/title", "hello, wide world")
        .await
        .unwrap();
    let empty = node.create(None).await.unwrap();
    let heads = node.heads(doc).await.unwrap();
    let clock = node.clock();
    assert_eq!(clock.count(), 7);
    node.close().await.unwrap();
    drop(node);

    let node = open(dir.path()).await;
    assert_eq!(node.id(), id, "identity is kept");
    assert_eq!(
        node.incarnation(),
        inc + 1,
        "every start is a new incarnation"
    );
    assert_eq!(node.clock(), clock);
    assert_eq!(node.heads(doc).await.unwrap(), heads);
    assert_eq!(
        node.get(doc, "").await.unwrap(),
        json!({"title": "hello, wide world", "tags": ["z"], "n": 1})
    );
    assert_eq!(node.get(empty, "").await.unwrap(), json!({}));
    let list = node.list().await.unwrap();
    assert_eq!(list.len(), 2);
    let info = list.iter().find(|i| i.id == doc).unwrap();
    assert_eq!(info.heads, heads);
    assert!(info.size > 0 && info.updated_at > 0);
    // A write after restart uses the new actor and continues the origin's sequence.
    node.put(doc, "/n", json!(2)).await.unwrap();
    assert_eq!(node.clock().max_seq(&id), 8);
}

#[tokio::test]
async fn bad_input_is_a_typed_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let doc = node
        .create(Some(json!({"n": 1, "t": "text", "l": [1, 2]})))
        .await
        .unwrap();
    let clock = node.clock();
    let unknown = DocId::from_bytes([9; 16]);

    assert!(
        matches!(node.get(unknown, "").await, Err(Error::Doc(DocError::NotFound(d))) if d == unknown)
    );
    assert!(matches!(
        node.put(unknown, "/a", json!(1)).await,
        Err(Error::Doc(DocError::NotFound(_)))
    ));
    assert!(matches!(
        node.get(doc, "nope").await,
        Err(Error::Doc(DocError::Path(PathError::Syntax { .. })))
    ));
    assert!(matches!(
        node.get(doc, "/zz").await,
        Err(Error::Doc(DocError::Path(PathError::NotFound { .. })))
    ));
    assert!(matches!(
        node.put(doc, "/n/x", json!(1)).await,
        Err(Error::Doc(DocError::Path(PathError::TypeMismatch { .. })))
    ));
    assert!(matches!(
        node.splice_text(doc, "/n", 0, 0, "x").await,
        Err(Error::Doc(DocError::Path(PathError::TypeMismatch { .. })))
    ));
    assert!(matches!(
        node.insert(doc, "/l/9", json!(1)).await,
        Err(Error::Doc(DocError::Path(PathError::OutOfRange { .. })))
    ));
    assert!(matches!(
        node.create(Some(json!([1]))).await,
        Err(Error::Doc(DocError::NotAnObject(_)))
    ));
    assert!(matches!(
        node.put(doc, "", json!("x")).await,
        Err(Error::Doc(DocError::Path(PathError::TypeMismatch { .. })))
    ));
    // A closure that fails writes nothing, even after making edits.
    let r = node
        .change(doc, |tx| {
            use automerge::transaction::Transactable;
            tx.put(automerge::ROOT, "half", 1)?;
            Err::<(), _>(Error::app("changed my mind"))
        })
        .await;
    assert!(matches!(r, Err(Error::App(_))));

    // Imports: garbage, truncated and empty files.
    let good = node.export(doc).await.unwrap();
    for bad in [
        b"garbage".to_vec(),
        good[..good.len() / 2].to_vec(),
        good[..good.len() - 1].to_vec(),
        Vec::new(),
    ] {
        assert!(
            matches!(
                node.import(&bad).await,
                Err(Error::Doc(DocError::CorruptImport(_)))
            ),
            "{} bytes",
            bad.len()
        );
    }
    assert_eq!(node.clock(), clock, "nothing was written");
    assert_eq!(node.list().await.unwrap().len(), 1);
    assert_eq!(
        node.get(doc, "").await.unwrap(),
        json!({"n": 1, "t": "text", "l": [1, 2]})
    );

    // A second process (here: a second open) on the same data dir.
    let second = Node::open(Config::new(dir.path())).await;
    let err = second.unwrap_err();
    assert!(
        matches!(err, Error::DataDir(DataDirError::Locked { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
}

#[tokio::test]
async fn export_import_round_trip_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let doc = node
        .create(Some(json!({"a": {"b": [1, "two"]}})))
        .await
        .unwrap();
    node.put(doc, "/c", json!(true)).await.unwrap();
    let bytes = node.export(doc).await.unwrap();
    assert!(automerge::Automerge::load(&bytes).is_ok());
    let copy = node.import(&bytes).await.unwrap();
    assert_ne!(copy, doc);
    assert_eq!(
        node.get(copy, "").await.unwrap(),
        node.get(doc, "").await.unwrap()
    );
    assert_eq!(
        node.heads(copy).await.unwrap(),
        node.heads(doc).await.unwrap()
    );
    node.put(copy, "/c", json!(false)).await.unwrap();

    node.delete(doc).await.unwrap();
    node.delete(doc).await.unwrap();
    assert!(matches!(
        node.get(doc, "").await,
        Err(Error::Doc(DocError::Deleted(_)))
    ));
    assert!(matches!(
        node.put(doc, "/x", json!(1)).await,
        Err(Error::Doc(DocError::Deleted(_)))
    ));
    assert_eq!(
        node.list()
            .await
            .unwrap()
            .iter()
            .map(|i| i.id)
            .collect::<Vec<_>>(),
        vec![copy]
    );
    node.close().await.unwrap();
    drop(node);
    let node = open(dir.path()).await;
    assert!(matches!(
        node.get(doc, "").await,
        Err(Error::Doc(DocError::Deleted(_)))
    ));
    assert_eq!(node.get(copy, "/c").await.unwrap(), json!(false));
}

/// An imported file is the document's whole state: a long one is stored with its snapshot in
/// the import's own commit, not rebuilt change by change by the compactor afterwards; a short
/// one (under the compaction threshold) gets none. Both read back the same after a reopen.
#[tokio::test]
async fn a_long_import_is_stored_with_its_snapshot() {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let mut am = automerge::Automerge::new();
    for i in 0..200_i64 {
        let mut tx = am.transaction();
        tx.put(automerge::ROOT, "n", i).unwrap();
        tx.commit();
    }
    let long = node.import(&am.save()).await.unwrap();
    // Counted as soon as the import returns: no compaction ran (nor could finish) meanwhile.
    let (stats, _) = node.stats().await.unwrap();
    assert_eq!((stats.snapshots, stats.deltas), (1, 200));
    let short = node
        .import(
            &node
                .export(node.create(Some(json!({"a": 1}))).await.unwrap())
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(node.stats().await.unwrap().0.snapshots, 1);
    node.put(long, "/m", json!("after")).await.unwrap();
    node.close().await.unwrap();
    drop(node);

    let node = open(dir.path()).await;
    assert_eq!(
        node.get(long, "").await.unwrap(),
        json!({"n": 199, "m": "after"})
    );
    assert_eq!(node.get(short, "").await.unwrap(), json!({"a": 1}));
    assert_eq!(node.history(long).await.unwrap().len(), 201);
}

#[tokio::test]
async fn subscribers_see_local_changes_with_patches() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let mut all = node.subscribe(None).unwrap();
    let doc = node.create(Some(json!({"k": 1}))).await.unwrap();
    let other = node.create(None).await.unwrap();
    let mut one = node.subscribe(Some(doc)).unwrap();
    node.put(other, "/x", json!(1)).await.unwrap();
    node.put(doc, "/k", json!(2)).await.unwrap();
    let heads_after_put = node.heads(doc).await.unwrap();
    node.delete(doc).await.unwrap();

    let e = all.recv().await.unwrap();
    assert_eq!((e.doc, e.source), (doc, Source::Local));
    assert!(!e.patches.is_empty());
    assert_eq!(all.recv().await.unwrap().doc, other);
    assert_eq!(all.recv().await.unwrap().doc, other);

    let e = one.recv().await.unwrap();
    assert_eq!(e.doc, doc);
    assert_eq!(e.heads, heads_after_put);
    assert_eq!(e.patches.len(), 1);
    let e = one.recv().await.unwrap();
    assert!(e.deleted);
    node.close().await.unwrap();
    assert_eq!(one.recv().await.unwrap_err(), SubscriptionError::Closed);
}

#[tokio::test]
async fn subscription_as_a_stream() {
    use tokio_stream::StreamExt as _;
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let doc = node.create(None).await.unwrap();
    let other = node.create(None).await.unwrap();
    let mut stream = node.subscribe(Some(doc)).unwrap().into_stream();
    node.put(other, "/x", json!(1)).await.unwrap();
    node.put(doc, "/x", json!(2)).await.unwrap();
    let e = stream.next().await.unwrap().unwrap();
    assert_eq!(e.doc, doc);
    node.close().await.unwrap();
    assert!(
        stream.next().await.is_none(),
        "the stream ends when the node closes"
    );
}

#[tokio::test]
async fn slow_subscriber_is_told_it_lagged() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.event_buffer = 4;
    let node = Node::open(cfg).await.unwrap();
    let mut sub = node.subscribe(None).unwrap();
    let doc = node.create(None).await.unwrap();
    for i in 0..10 {
        node.put(doc, "/i", json!(i)).await.unwrap();
    }
    assert!(matches!(sub.recv().await, Err(SubscriptionError::Lagged(n)) if n > 0));
    assert!(
        sub.recv().await.is_ok(),
        "after the gap report, events continue"
    );
}

#[tokio::test]
async fn compaction_folds_deltas_into_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.compact_after = 10;
    let node = Node::open(cfg.clone()).await.unwrap();
    let doc = node.create(Some(json!({"text": ""}))).await.unwrap();
    for i in 0..35 {
        node.splice_text(doc, "/text", i, 0, "x").await.unwrap();
    }
    assert_eq!(
        snapshots_reach(&node, 1).await,
        1,
        "compactor made a snapshot"
    );
    let (stats, _) = node.stats().await.unwrap();
    assert_eq!(stats.deltas, 36, "delta rows stay for peers");
    let want = node.get(doc, "").await.unwrap();
    node.close().await.unwrap();
    drop(node);
    let node = Node::open(cfg).await.unwrap();
    assert_eq!(node.get(doc, "").await.unwrap(), want);
    node.splice_text(doc, "/text", 0, 0, "y").await.unwrap();
}

#[tokio::test]
async fn cache_is_bounded_and_evicted_documents_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.cache_docs = 8;
    let node = Node::open(cfg).await.unwrap();
    let mut docs = Vec::new();
    for i in 0..40 {
        docs.push(node.create(Some(json!({"i": i}))).await.unwrap());
    }
    assert!(node.stats().await.unwrap().1 <= 8);
    for (i, doc) in docs.iter().enumerate() {
        node.put(*doc, "/j", json!(i)).await.unwrap();
        assert_eq!(node.get(*doc, "").await.unwrap(), json!({"i": i, "j": i}));
    }
    assert!(node.stats().await.unwrap().1 <= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let shared = node.create(Some(json!({"list": []}))).await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let own = node.create(None).await.unwrap();
            for i in 0..20 {
                node.put(own, "/i", json!(i)).await.unwrap();
                node.insert(shared, "/list/-", json!(w * 100 + i))
                    .await
                    .unwrap();
            }
            own
        }));
    }
    let mut own = Vec::new();
    for t in tasks {
        own.push(t.await.unwrap());
    }
    let clock = node.clock();
    assert_eq!(clock.count(), 1 + 16 * 41);
    node.close().await.unwrap();
    drop(node);
    let node = open(dir.path()).await;
    assert_eq!(node.clock(), clock);
    let list = node.get(shared, "/list").await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 16 * 20);
    for doc in own {
        assert_eq!(node.get(doc, "/i").await.unwrap(), json!(19));
    }
}

#[tokio::test]
async fn sqlite_store_answers_catch_up_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let doc = node.create(None).await.unwrap();
    for i in 0..30 {
        node.put(doc, "/i", json!(i)).await.unwrap();
    }
    let me = node.id();
    node.close().await.unwrap();
    drop(node);
    let signer = tandem::Identity::load_or_create(dir.path())
        .unwrap()
        .signer();
    let (store, rec) =
        tandem::store::Store::open(&dir.path().join("tandem.db"), &signer, Default::default())
            .unwrap();
    let engine = tandem::crdt::Engine::new(signer, rec.clock.clone());
    let mut peer = tandem::crdt::VersionVector::new();
    peer.insert_range(me, 1, 10);
    let mut plan = engine.catch_up(&peer);
    let mut seqs = Vec::new();
    while let Some(batch) = plan.next_batch(&store, 300).unwrap() {
        assert!(batch.len() == 1 || batch.iter().map(|d| d.encoded_len()).sum::<usize>() <= 300);
        for d in &batch {
            d.validate().unwrap();
        }
        // Signed and chained as stored: one check vouches for each batch's run.
        assert!(
            tandem::crdt::sign::verify_batch(&batch)
                .iter()
                .all(|ok| *ok)
        );
        seqs.extend(batch.iter().map(|d| d.id.seq));
    }
    assert_eq!(seqs, (11..=31).collect::<Vec<_>>());
    let direct = store.load_range(&me, 5..=6, usize::MAX).unwrap();
    assert_eq!(direct.len(), 2);
}

#[tokio::test]
async fn text_edits_from_an_old_base_merge_and_a_replaced_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let doc = node
        .create(Some(json!({"body": "the quick brown fox"})))
        .await
        .unwrap();
    let base = node.heads(doc).await.unwrap();
    // Someone edits the end while "the editor is open"...
    node.update_text(doc, "/body", "the quick brown fox jumps")
        .await
        .unwrap();
    // ...and the editor saves a change to the start, made against `base`.
    node.update_text_from(doc, "/body", &base, "the slow brown fox")
        .await
        .unwrap();
    assert_eq!(
        node.get(doc, "/body").await.unwrap(),
        json!("the slow brown fox jumps")
    );
    // Unchanged text against its base writes nothing.
    let heads = node.heads(doc).await.unwrap();
    node.update_text_from(doc, "/body", &heads, "the slow brown fox jumps")
        .await
        .unwrap();
    assert_eq!(node.heads(doc).await.unwrap(), heads);
    // The field was replaced by a new text since the base: the edit would vanish; refused.
    node.put(doc, "/body", json!("new text")).await.unwrap();
    let err = node
        .update_text_from(doc, "/body", &heads, "edited")
        .await
        .unwrap_err();
    assert!(
        matches!(err, tandem::Error::Doc(tandem::DocError::TextReplaced(_))),
        "{err}"
    );
    assert_eq!(node.get(doc, "/body").await.unwrap(), json!("new text"));
    // Unknown base heads are an error too.
    let bogus = [automerge::ChangeHash([7; 32])];
    assert!(matches!(
        node.update_text_from(doc, "/body", &bogus, "x").await,
        Err(tandem::Error::Doc(tandem::DocError::BadBase(_)))
    ));
    node.close().await.unwrap();
}

/// Everything in the data dir is private to this user, even in a dir that existed open, and
/// files restored with open modes are fixed on start.
#[cfg(unix)]
#[tokio::test]
async fn the_data_dir_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let node = Node::open(Config::new(&dir)).await.unwrap();
    node.create(Some(serde_json::json!({"a": 1})))
        .await
        .unwrap();
    assert_eq!(mode(&dir), 0o700);
    for f in [
        "tandem.db",
        "tandem.db-wal",
        "identity.key",
        "LOCK",
        "reserve",
    ] {
        let p = dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
    assert!(dir.join("reserve").exists(), "the disk reserve is kept");
    node.close().await.unwrap();
    drop(node);
    // A restore left the database readable by everyone: fixed on the next start.
    std::fs::set_permissions(
        dir.join("tandem.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = Node::open(Config::new(&dir)).await.unwrap();
    assert_eq!(mode(&dir.join("tandem.db")), 0o600);
    assert_eq!(mode(&dir), 0o700);
    node.close().await.unwrap();
    // The API token too.
    let token = tandem::api::load_or_create_token(&dir).unwrap();
    let tf = dir.join(tandem::api::TOKEN_FILE);
    assert_eq!(mode(&tf), 0o600);
    std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(tandem::api::load_or_create_token(&dir).unwrap(), token);
    assert_eq!(mode(&tf), 0o600);
}

/// Nesting is bounded: a write that would nest deeper than the limit is refused, and a document
/// made deeper elsewhere (imported here, as a peer's would arrive) is an error to read, never
/// a crash of the node.
#[tokio::test]
async fn deep_nesting_is_refused_or_reported_never_a_crash() {
    use tandem::crdt::json::MAX_DEPTH;
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::open(Config::new(tmp.path())).await.unwrap();
    let mut events = node.subscribe(None).unwrap();
    let nest = |levels: usize| {
        let mut v = serde_json::json!(1);
        for _ in 0..levels {
            v = serde_json::json!({ "a": v });
        }
        v
    };
    // MAX_DEPTH nested objects fit exactly (the root is the first); the scalar at the bottom
    // can be replaced by a scalar, not by one more object.
    let doc = node.create(Some(nest(MAX_DEPTH))).await.unwrap();
    let mut path = String::new();
    for _ in 0..MAX_DEPTH {
        path.push_str("/a");
    }
    assert!(matches!(
        node.put(doc, &path, nest(1)).await,
        Err(Error::Doc(DocError::Path(PathError::TooDeep { .. })))
    ));
    node.put(doc, &path, serde_json::json!(2)).await.unwrap();
    assert_eq!(node.get(doc, &path).await.unwrap(), serde_json::json!(2));

    // 600 levels, made with Automerge directly, as a peer could.
    let mut am = automerge::Automerge::new();
    let mut tx = am.transaction();
    let mut obj = automerge::ROOT;
    for _ in 0..600 {
        obj = automerge::transaction::Transactable::put_object(
            &mut tx,
            &obj,
            "a",
            automerge::ObjType::Map,
        )
        .unwrap();
    }
    tx.commit();
    let deep = node.import(&am.save()).await.unwrap();
    assert!(matches!(
        node.get(deep, "").await,
        Err(Error::Doc(DocError::Path(PathError::TooDeep { .. })))
    ));
    // The node is fine and still serves everything else.
    assert_eq!(node.get(doc, &path).await.unwrap(), serde_json::json!(2));
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {}
    node.close().await.unwrap();
}

/// A data dir whose database was lost (deleted, or truncated to nothing) but whose identity
/// remains does not start as an empty node without a word.
#[tokio::test]
async fn a_lost_database_is_refused_not_silently_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let node = Node::open(Config::new(tmp.path())).await.unwrap();
    node.create(Some(serde_json::json!({"precious": true})))
        .await
        .unwrap();
    node.close().await.unwrap();
    drop(node);
    let db = tmp.path().join("tandem.db");
    for extra in ["tandem.db-wal", "tandem.db-shm"] {
        let _ = std::fs::remove_file(tmp.path().join(extra));
    }
    std::fs::File::create(&db).unwrap(); // truncated to 0 bytes
    let err = Node::open(Config::new(tmp.path())).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataDir(DataDirError::LostDatabase { state: "empty", .. })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("Restore it from a backup"),
        "{err}"
    );
    std::fs::remove_file(&db).unwrap();
    let err = Node::open(Config::new(tmp.path())).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DataDir(DataDirError::LostDatabase {
                state: "missing",
                ..
            })
        ),
        "{err}"
    );
    assert!(!db.exists(), "nothing was created in its place");
}

/// A data dir from before deltas were signed (schema 4): it opens with every document; this
/// node's own deltas are signed then, so members accept them; another origin's unsigned
/// deltas stay readable here but are not relayed (members would refuse them).
#[tokio::test]
async fn deltas_stored_before_signing_are_signed_or_kept_local() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path()).await;
    let doc = node.create(Some(json!({"n": 0}))).await.unwrap();
    for i in 1..4 {
        node.put(doc, "/n", json!(i)).await.unwrap();
    }
    let other = {
        let o = tempfile::tempdir().unwrap();
        let n = open(o.path()).await;
        let d = n.create(Some(json!({"theirs": 1}))).await.unwrap();
        let deltas = n.deltas_missing_from(&Default::default()).await.unwrap();
        (d, deltas)
    };
    node.ingest(other.1[0].id.origin, other.1.clone())
        .await
        .unwrap();
    let me = node.id();
    node.close().await.unwrap();
    drop(node);
    {
        // As schema 4 left it: no signatures anywhere.
        let db = rusqlite::Connection::open(dir.path().join("tandem.db")).unwrap();
        db.execute_batch(
            "UPDATE deltas SET prev = NULL, sig = NULL;
             DELETE FROM meta WHERE key = 'own_signed';",
        )
        .unwrap();
    }
    let node = open(dir.path()).await;
    assert_eq!(node.get(doc, "/n").await.unwrap(), json!(3));
    assert_eq!(node.get(other.0, "/theirs").await.unwrap(), json!(1));
    let served = node.deltas_missing_from(&Default::default()).await.unwrap();
    assert_eq!(served.len(), 4, "own deltas only");
    assert!(served.iter().all(|d| d.id.origin == me));
    assert!(
        tandem::crdt::sign::verify_batch(&served)
            .iter()
            .all(|ok| *ok)
    );
    // New writes continue the chain.
    node.put(doc, "/n", json!(4)).await.unwrap();
    let all = node.deltas_missing_from(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(
        all[4].auth.prev,
        tandem::crdt::sign::chain_hash(&all[3]),
        "linked"
    );
}

/// Status pages poll the row counts; they are kept as commits change them, not recounted,
/// and must equal a recount after creates, deletes, tombstones from peers, compaction and
/// damage.
#[tokio::test]
async fn kept_counts_equal_a_recount() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.compact_after = 4;
    let node = Node::open(cfg.clone()).await.unwrap();
    let recount = || {
        let db = rusqlite::Connection::open(dir.path().join("tandem.db")).unwrap();
        let q = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as u64;
        (
            q("SELECT count(*) FROM documents WHERE deleted = 0"),
            q("SELECT count(*) FROM deltas"),
            q("SELECT count(*) FROM snapshots"),
        )
    };
    let kept = |node: &Node| {
        let node = node.clone();
        async move {
            let s = node.stats().await.unwrap().0;
            (s.documents, s.deltas, s.snapshots)
        }
    };
    let mut docs = Vec::new();
    for i in 0..6 {
        let d = node.create(Some(json!({"i": i}))).await.unwrap();
        for n in 0..6 {
            node.put(d, "/n", json!(n)).await.unwrap();
        }
        docs.push(d);
    }
    node.delete(docs[0]).await.unwrap();
    node.delete(docs[0]).await.ok();
    // A peer's documents, one of them deleted there.
    let other = tempfile::tempdir().unwrap();
    let peer = open(other.path()).await;
    let theirs = peer.create(Some(json!({"p": 1}))).await.unwrap();
    peer.create(Some(json!({"p": 2}))).await.unwrap();
    peer.delete(theirs).await.unwrap();
    node.ingest(
        peer.id(),
        peer.deltas_missing_from(&node.clock()).await.unwrap(),
    )
    .await
    .unwrap();
    assert!(snapshots_reach(&node, 5).await >= 5, "snapshots were made");
    assert_eq!(kept(&node).await, recount());
    node.close().await.unwrap();
    drop(node);
    let node = Node::open(cfg).await.unwrap();
    assert_eq!(kept(&node).await, recount());
}

/// A catch-up batch stores documents nobody has loaded without loading them: their listed
/// heads must still be exactly the documents' heads (single-writer, merged multi-writer and
/// out-of-order histories alike), and a reader racing the batch never keeps a copy that
/// lacks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_batches_keep_exact_heads_without_loading() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let c = open(dirs[1].path()).await;
    let b = open(dirs[2].path()).await;
    let mut docs = Vec::new();
    for i in 0..40 {
        let d = a.create(Some(json!({"i": i, "n": 0}))).await.unwrap();
        for n in 1..4 {
            a.put(d, "/n", json!(n)).await.unwrap();
        }
        docs.push(d);
    }
    // Half the documents get concurrent edits from C, merged back into A, then edited again:
    // histories with two origins whose later changes depend on the other's.
    let to_c = a.deltas_missing_from(&c.clock()).await.unwrap();
    c.ingest(a.id(), to_c).await.unwrap();
    for d in docs.iter().step_by(2) {
        a.put(*d, "/a", json!(true)).await.unwrap();
        c.put(*d, "/c", json!(true)).await.unwrap();
    }
    let to_a = c.deltas_missing_from(&a.clock()).await.unwrap();
    a.ingest(c.id(), to_a).await.unwrap();
    for d in docs.iter().step_by(2) {
        a.put(*d, "/after", json!(1)).await.unwrap();
    }
    // B gets everything A holds in batches of (origin, seq) order, as a catch-up sends them:
    // A's later changes arrive before C's they depend on. Readers race the batches.
    let all = a.deltas_missing_from(&b.clock()).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = docs
        .iter()
        .step_by(3)
        .map(|d| {
            let (b, d, stop) = (b.clone(), *d, stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = b.get(d, "").await;
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for chunk in all.chunks(50) {
        b.ingest(a.id(), chunk.to_vec()).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(b.clock(), a.clock());
    let listed = listed_heads(&b).await;
    for d in &docs {
        assert_eq!(b.get(*d, "").await.unwrap(), a.get(*d, "").await.unwrap());
        let loaded = b.heads(*d).await.unwrap();
        assert_eq!(loaded, a.heads(*d).await.unwrap(), "{d}");
        assert_eq!(listed[d], loaded, "listed heads of {d}");
    }
}

/// Two catch-up batches for the same documents at once (two peers, two origins): each
/// document's listed heads still equal its heads (one batch lands without loading, the other
/// waits for it and applies in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bulk_batches_for_the_same_documents_keep_exact_heads() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let c = open(dirs[1].path()).await;
    let b = open(dirs[2].path()).await;
    let mut docs = Vec::new();
    for i in 0..30 {
        docs.push(a.create(Some(json!({"i": i}))).await.unwrap());
    }
    let base = a.deltas_missing_from(&c.clock()).await.unwrap();
    c.ingest(a.id(), base.clone()).await.unwrap();
    b.ingest(a.id(), base).await.unwrap();
    // Concurrent edits on A and C to every document.
    for d in &docs {
        a.put(*d, "/a", json!(1)).await.unwrap();
        c.put(*d, "/c", json!(1)).await.unwrap();
    }
    let from_a = a.deltas_missing_from(&b.clock()).await.unwrap();
    let from_c = c.deltas_missing_from(&b.clock()).await.unwrap();
    let (r1, r2) = tokio::join!(b.ingest(a.id(), from_a), b.ingest(c.id(), from_c));
    r1.unwrap();
    r2.unwrap();
    let listed = listed_heads(&b).await;
    for d in &docs {
        let loaded = b.heads(*d).await.unwrap();
        assert_eq!(loaded.len(), 2, "both edits are heads");
        assert_eq!(listed[d], loaded, "listed heads of {d}");
    }
}

/// A batch whose changes wait for dependencies not received yet, then (the documents evicted
/// meanwhile) the batch with those dependencies: listed heads must still be the documents'
/// heads, though the stored heads did not cover the waiting changes.
#[tokio::test]
async fn out_of_order_batches_after_eviction_keep_exact_heads() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let c = open(dirs[1].path()).await;
    let mut cfg = Config::new(dirs[2].path());
    cfg.cache_docs = 1;
    let b = Node::open(cfg).await.unwrap();
    let mut docs = Vec::new();
    for i in 0..10 {
        docs.push(a.create(Some(json!({"i": i}))).await.unwrap());
    }
    c.ingest(a.id(), a.deltas_missing_from(&c.clock()).await.unwrap())
        .await
        .unwrap();
    for d in &docs {
        c.put(*d, "/c", json!(1)).await.unwrap();
    }
    // C's edits first: they wait for A's creations, which come in a later batch.
    let all = c.deltas_missing_from(&b.clock()).await.unwrap();
    let (from_c, from_a): (Vec<_>, Vec<_>) = all.into_iter().partition(|d| d.id.origin == c.id());
    b.ingest(c.id(), from_c).await.unwrap();
    b.ingest(a.id(), from_a).await.unwrap();
    let listed = listed_heads(&b).await;
    for d in &docs {
        let loaded = b.heads(*d).await.unwrap();
        assert_eq!(loaded, c.heads(*d).await.unwrap());
        assert_eq!(listed[d], loaded, "listed heads of {d}");
    }
}

/// One long history arriving in many catch-up batches of one document each (as a long
/// document's catch-up comes) lands without loading the document: each batch derives its
/// heads from those the previous one left. Heads stay exact, also where a second origin's
/// changes interleave; then the document loads (in steps: more changes than one step holds)
/// to the same state as the sender's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_in_many_batches_lands_without_loading() {
    use tandem::automerge::transaction::Transactable;
    use tandem::automerge::{Automerge, ObjType, ROOT};
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, c, b) = (
        open(dirs[0].path()).await,
        open(dirs[1].path()).await,
        open(dirs[2].path()).await,
    );
    // 21,000 keystrokes, one change each.
    let mut am = Automerge::new();
    let mut tx = am.transaction();
    let text = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
    tx.commit();
    for i in 0..21_000usize {
        let mut tx = am.transaction();
        tx.splice_text(&text, i / 2, 0, "ab").unwrap();
        tx.commit();
    }
    let doc = a.import(&am.save()).await.unwrap();
    // C edits concurrently with the end of A's history, and A merges it and goes on: B gets
    // A's later changes, whose dependencies include C's, before C's.
    c.ingest(a.id(), a.deltas_missing_from(&c.clock()).await.unwrap())
        .await
        .unwrap();
    c.put(doc, "/c", json!(true)).await.unwrap();
    a.put(doc, "/a", json!(true)).await.unwrap();
    a.ingest(c.id(), c.deltas_missing_from(&a.clock()).await.unwrap())
        .await
        .unwrap();
    a.put(doc, "/after", json!(1)).await.unwrap();
    // The imported history first, in slices: none may load the document. Then the rest, in
    // (origin, seq) order: A's last change waits for C's, so that batch applies in memory.
    let (history, rest): (Vec<_>, Vec<_>) = a
        .deltas_missing_from(&b.clock())
        .await
        .unwrap()
        .into_iter()
        .partition(|d| d.id.origin == a.id() && d.id.seq <= 21_001);
    assert_eq!(history.len(), 21_001);
    for chunk in history.chunks(700) {
        b.ingest(a.id(), chunk.to_vec()).await.unwrap();
        assert!(
            !b.is_loaded_for_tests(doc),
            "a catch-up batch loaded the document"
        );
    }
    assert_eq!(listed_heads(&b).await[&doc].len(), 1);
    b.ingest(a.id(), rest).await.unwrap();
    assert_eq!(b.clock(), a.clock());
    let heads = a.heads(doc).await.unwrap();
    assert_eq!(listed_heads(&b).await[&doc], heads, "listed heads");
    assert_eq!(b.heads(doc).await.unwrap(), heads, "loaded heads");
    assert_eq!(b.get(doc, "").await.unwrap(), a.get(doc, "").await.unwrap());
}

/// Each document's heads as `list` reports them.
async fn listed_heads(
    node: &Node,
) -> std::collections::BTreeMap<DocId, Vec<tandem::automerge::ChangeHash>> {
    node.list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.id, i.heads))
        .collect()
}
