//! Damage on disk, found and healed: a stored change with flipped bytes is never served, it is
//! quarantined (out of the clock) and a good copy from a member replaces it; a damaged snapshot
//! is dropped and the document rebuilt from its deltas; a damaged own delta's seq is never
//! reused. The network path (members sending the good copy by themselves) is in
//! `tests/tests/sync.rs`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tandem::crdt::DeltaId;
use tandem::{Config, DocError, DocId, Error, Node};

mod common;
use common::{open, snapshots_reach};

/// Flips three bytes in the middle of the stored change `(origin, seq)`, as a bad disk might.
/// SQLite's own checks still pass: the damage is inside a value.
fn flip_change(dir: &Path, id: DeltaId) {
    let db = rusqlite::Connection::open(dir.join("tandem.db")).unwrap();
    let mut change: Vec<u8> = db
        .query_row(
            "SELECT change FROM deltas WHERE origin = ?1 AND seq = ?2",
            rusqlite::params![id.origin.as_bytes().as_slice(), id.seq as i64],
            |r| r.get(0),
        )
        .unwrap();
    let mid = change.len() / 2;
    for b in &mut change[mid..mid + 3] {
        *b ^= 0x5a;
    }
    db.execute(
        "UPDATE deltas SET change = ?3 WHERE origin = ?1 AND seq = ?2",
        rusqlite::params![id.origin.as_bytes().as_slice(), id.seq as i64, change],
    )
    .unwrap();
    let ok: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[tokio::test]
async fn a_damaged_change_is_reported_not_served_and_healed_from_a_member() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path()).await;
    let b = open(db.path()).await;
    let doc = a.create(Some(json!({"k0": 0}))).await.unwrap();
    for i in 1..5 {
        a.put(doc, &format!("/k{i}"), json!(i)).await.unwrap();
    }
    let other = a.create(Some(json!({"fine": true}))).await.unwrap();
    // B is a member holding everything.
    let all = a.deltas_missing_from(&b.clock()).await.unwrap();
    b.ingest(a.id(), all).await.unwrap();
    let want = a.get(doc, "").await.unwrap();
    a.close().await.unwrap();
    drop(a);

    let victim = DeltaId {
        origin: b.clock().iter().next().map(|(o, _)| *o).unwrap(),
        seq: 3,
    };
    flip_change(da.path(), victim);
    let a = open(da.path()).await;
    let mut events = a.subscribe(None).unwrap();
    // Not served without its keys: an error that says what happened.
    let err = a.get(doc, "").await.unwrap_err();
    assert!(
        matches!(err, Error::Doc(DocError::Damaged { doc: d, deltas: 1 }) if d == doc),
        "{err}"
    );
    assert!(
        err.to_string().contains("fetched again from members"),
        "{err}"
    );
    // Reported: the status list, the counter, an event; and gone from the clock.
    let damaged = a.damaged().await.unwrap();
    assert_eq!(damaged.len(), 1);
    assert_eq!((damaged[0].id, damaged[0].doc), (victim, doc));
    assert!(damaged[0].why.contains("checksum"), "{}", damaged[0].why);
    assert_eq!(a.damage_found(), 1);
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.doc, doc);
    assert!(ev.damaged.is_some());
    assert!(!a.clock().contains(victim));
    assert_eq!(a.stats().await.unwrap().0.deltas, a.clock().count());
    // The rest of the node serves as before.
    assert_eq!(a.get(other, "/fine").await.unwrap(), json!(true));

    // A member sends what A now lacks: the good copy replaces the damaged one.
    let missing = b.deltas_missing_from(&a.clock()).await.unwrap();
    assert_eq!(missing.iter().map(|d| d.id).collect::<Vec<_>>(), [victim]);
    a.ingest(b.id(), missing).await.unwrap();
    assert_eq!(a.get(doc, "").await.unwrap(), want);
    assert!(a.damaged().await.unwrap().is_empty());
    assert_eq!(a.clock(), b.clock());
    assert_eq!(a.stats().await.unwrap().0.deltas, a.clock().count());

    // And it stays healed across a restart.
    a.close().await.unwrap();
    drop(a);
    let a = open(da.path()).await;
    assert_eq!(a.get(doc, "").await.unwrap(), want);
}

#[tokio::test]
async fn damage_is_found_when_serving_a_peer_too() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path()).await;
    let doc = a.create(Some(json!({"k": 1}))).await.unwrap();
    a.put(doc, "/k", json!(2)).await.unwrap();
    let me = a.id();
    a.close().await.unwrap();
    drop(a);
    flip_change(da.path(), DeltaId { origin: me, seq: 2 });
    let a = open(da.path()).await;
    let b = open(db.path()).await;
    // Catch-up for a fresh peer reads the damaged delta: refused, never sent.
    let err = a.deltas_missing_from(&b.clock()).await.unwrap_err();
    assert!(err.to_string().contains("damaged"), "{err}");
    // ...and quarantined, so the next catch-up goes through without it.
    for _ in 0..200 {
        if !a.damaged().await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.damaged().await.unwrap().len(), 1);
    let sent = a.deltas_missing_from(&b.clock()).await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(b.clock().count(), 0);
    drop(db);
}

#[tokio::test]
async fn a_damaged_own_delta_never_has_its_seq_reused() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path()).await;
    let doc = a.create(Some(json!({"k": 1}))).await.unwrap();
    a.put(doc, "/k", json!(2)).await.unwrap();
    let me = a.id();
    a.close().await.unwrap();
    drop(a);
    // The latest own delta, never sent anywhere, is damaged.
    let last = DeltaId { origin: me, seq: 2 };
    flip_change(dir.path(), last);
    let a = open(dir.path()).await;
    assert!(a.get(doc, "").await.is_err());
    let fresh = a.create(Some(json!({"new": 1}))).await.unwrap();
    assert_eq!(a.clock().max_seq(&me), 3, "seq 2 is not reused");
    a.close().await.unwrap();
    drop(a);
    // Nor after a restart, though seq 2 is not in the clock.
    let a = open(dir.path()).await;
    a.put(fresh, "/new", json!(2)).await.unwrap();
    assert_eq!(a.clock().max_seq(&me), 4);
    assert!(!a.clock().contains(last));
}

#[tokio::test]
async fn a_damaged_snapshot_is_dropped_and_the_document_rebuilt_from_its_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.compact_after = 5;
    let a = Node::open(cfg.clone()).await.unwrap();
    let doc: DocId = a.create(Some(json!({"n": 0}))).await.unwrap();
    for i in 1..=12 {
        a.put(doc, "/n", json!(i)).await.unwrap();
    }
    assert_eq!(snapshots_reach(&a, 1).await, 1);
    a.close().await.unwrap();
    drop(a);
    {
        let db = rusqlite::Connection::open(dir.path().join("tandem.db")).unwrap();
        let mut snap: Vec<u8> = db
            .query_row("SELECT snapshot FROM snapshots", [], |r| r.get(0))
            .unwrap();
        let mid = snap.len() / 2;
        snap[mid] ^= 0xff;
        snap[mid + 1] ^= 0xff;
        db.execute("UPDATE snapshots SET snapshot = ?1", [snap])
            .unwrap();
    }
    let a = Node::open(cfg).await.unwrap();
    assert_eq!(a.get(doc, "/n").await.unwrap(), json!(12));
    assert_eq!(a.damage_found(), 1);
    assert!(a.damaged().await.unwrap().is_empty(), "no delta was lost");
}
