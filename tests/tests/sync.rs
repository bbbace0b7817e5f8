//! Peers in sync over real QUIC sockets on loopback: invite and join, live writes, offline
//! edits that merge, relaying through a middle node, cheap reconnects, and trust.

#![allow(clippy::unwrap_used)]

mod support;

use support::{eventually, open_loopback as open};

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem::{Config, DocId, NetConfig, Node};

async fn pair(a: &Node, b: &Node) {
    let token = a.invite(Duration::from_secs(60)).await.unwrap();
    b.join(&token).await.unwrap();
}

async fn same_doc(a: &Node, b: &Node, doc: DocId) -> bool {
    match (a.get(doc, "").await, b.get(doc, "").await) {
        (Ok(x), Ok(y)) => x == y && a.heads(doc).await.ok() == b.heads(doc).await.ok(),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sync_and_merge_offline_edits() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path()).await;
    let b = open(db.path()).await;
    pair(&a, &b).await;
    assert!(a.members().iter().any(|m| m.id == b.id()));
    assert!(b.members().iter().any(|m| m.id == a.id()));

    let mut events = b.subscribe(None).unwrap();
    let doc = a
        .create(Some(json!({"title": "shared", "items": ["x"]})))
        .await
        .unwrap();
    eventually("B to see A's document", || async {
        b.get(doc, "/title").await.ok() == Some(json!("shared"))
    })
    .await;
    let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(e.source, tandem::Source::Remote(a.id()));
    assert_eq!(e.doc, doc);

    // B goes offline; both edit the same text and list.
    b.close().await.unwrap();
    drop(b);
    a.splice_text(doc, "/title", 0, 0, "A: ").await.unwrap();
    a.insert(doc, "/items/-", json!("from a")).await.unwrap();
    // B edits while still offline (reconnecting is fast enough now that a networked B would
    // already hold A's edits when it makes its own), then comes back.
    let b = Node::open(Config::new(db.path())).await.unwrap();
    b.splice_text(doc, "/title", 6, 0, " (b)").await.unwrap();
    b.insert(doc, "/items/0", json!("from b")).await.unwrap();
    b.close().await.unwrap();
    drop(b);
    let b = open(db.path()).await;
    eventually("A and B to converge", || same_doc(&a, &b, doc)).await;
    let v = a.get(doc, "").await.unwrap();
    assert_eq!(v["title"], json!("A: shared (b)"));
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    eventually("peer status in sync", || async {
        a.peers().iter().any(|p| p.connected && p.in_sync)
            && b.peers().iter().any(|p| p.connected && p.in_sync)
    })
    .await;
}

/// Everyone knows everyone: C, invited by B, is in A's member list too (replicated by Raft),
/// so A and C sync directly, and keep syncing with B gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_invited_by_another_is_known_to_all() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let b = open(dirs[1].path()).await;
    let c = open(dirs[2].path()).await;
    pair(&a, &b).await; // A invites B
    pair(&b, &c).await; // B invites C: the admission is committed through the leader
    for n in [&a, &b, &c] {
        eventually("every member to list all three", || async {
            n.members().len() == 2
        })
        .await;
    }
    eventually("A and C connected directly", || async {
        a.peers()
            .iter()
            .any(|p| p.id == Some(c.id()) && p.connected)
    })
    .await;
    b.close().await.unwrap();
    let from_a = a.create(Some(json!({"by": "a"}))).await.unwrap();
    let from_c = c.create(Some(json!({"by": "c"}))).await.unwrap();
    eventually("C to get A's doc with B off", || async {
        c.get(from_a, "/by").await.ok() == Some(json!("a"))
    })
    .await;
    eventually("A to get C's doc with B off", || async {
        a.get(from_c, "/by").await.ok() == Some(json!("c"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_is_enforced() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let b = open(dirs[1].path()).await;
    let stranger = open(dirs[2].path()).await;

    // An expired invite, then a reused one.
    let expired = a.invite(Duration::from_millis(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(b.join(&expired).await.is_err());
    let token = a.invite(Duration::from_secs(60)).await.unwrap();
    b.join(&token).await.unwrap();
    let reuse = stranger.join(&token).await.unwrap_err();
    assert!(reuse.to_string().contains("already been used"), "{reuse}");
    assert!(stranger.join("tandem1garbage").await.is_err());

    // A stranger that dials A is refused and learns nothing.
    let secret = a.create(Some(json!({"secret": true}))).await.unwrap();
    let mut cfg = Config::new(dirs[2].path().join("s2"));
    cfg.net = Some(NetConfig {
        peers: vec![(a.id(), a.listen_addr().unwrap())],
        ..NetConfig::loopback()
    });
    let s2 = Node::open(cfg).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s2.get(secret, "").await.is_err());
    assert!(
        !a.peers()
            .iter()
            .any(|p| p.id == Some(s2.id()) && p.connected)
    );

    // A removed member is cut off and refused.
    eventually("B connected", || async {
        a.peers()
            .iter()
            .any(|p| p.id == Some(b.id()) && p.connected)
    })
    .await;
    eventually("B has the doc", || async {
        b.get(secret, "").await.is_ok()
    })
    .await;
    assert!(a.remove_member(b.id()).await.unwrap());
    eventually("B disconnected", || async {
        !a.peers()
            .iter()
            .any(|p| p.id == Some(b.id()) && p.connected)
    })
    .await;
    a.put(secret, "/after", json!(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        b.get(secret, "/after").await.is_err(),
        "removed member gets nothing new"
    );
    assert!(
        !a.peers()
            .iter()
            .any(|p| p.id == Some(b.id()) && p.connected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_costs_what_changed_not_what_exists() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path()).await;
    let b = open(db.path()).await;
    pair(&a, &b).await;
    let mut docs = Vec::new();
    for i in 0..1000 {
        docs.push(a.create(Some(json!({"i": i}))).await.unwrap());
    }
    let t = Instant::now();
    eventually("B to hold 1000 docs", || async { b.clock() == a.clock() }).await;
    eprintln!(
        "B caught up with 1000 docs {:?} after A finished",
        t.elapsed()
    );
    b.close().await.unwrap();
    drop(b);

    for doc in &docs[..5] {
        a.put(*doc, "/edited", json!(true)).await.unwrap();
    }
    let before: u64 = a
        .peers()
        .iter()
        .map(|p| p.bytes_sent + p.bytes_received)
        .sum();
    let b = open(db.path()).await;
    eventually("B to catch up", || async { b.clock() == a.clock() }).await;
    eventually("A to see B in sync", || async {
        a.peers().iter().any(|p| p.connected && p.in_sync)
    })
    .await;
    let after: u64 = a
        .peers()
        .iter()
        .map(|p| p.bytes_sent + p.bytes_received)
        .sum();
    let b_side: u64 = b
        .peers()
        .iter()
        .map(|p| p.bytes_sent + p.bytes_received)
        .sum();
    // Five small changes are a few hundred bytes; the rest is Hello (clocks) and acks.
    let limit = 64 * 1024 + 5 * 1024;
    assert!(
        after - before <= limit,
        "A counted {} bytes for the reconnect",
        after - before
    );
    assert!(
        b_side <= limit,
        "B counted {b_side} bytes for the reconnect"
    );
    eprintln!(
        "reconnect after 5 edits among 1000 docs: A counted {} bytes, B {b_side}",
        after - before
    );
    for doc in &docs[..5] {
        assert_eq!(b.get(*doc, "/edited").await.unwrap(), json!(true));
    }
}

/// A member of `a` whose process is replaced by a raw QUIC client speaking for it: its id, a
/// client endpoint, and a client config presenting its key.
async fn raw_member(
    a: &Node,
    dir: &Path,
) -> (tandem::NodeId, quinn::Endpoint, quinn::ClientConfig) {
    use tandem::net::tls;
    let h = open(dir).await;
    pair(a, &h).await;
    let id = h.id();
    h.close().await.unwrap();
    drop(h);
    let identity = tandem::Identity::load_or_create(dir).unwrap();
    let cfg = tls::client_config(&identity, tls::ALPN_SYNC).unwrap();
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    (id, endpoint, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_blocks_neither_others_nor_local_writes() {
    use tandem::net::{tls, wire};
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let b = open(dirs[1].path()).await;
    pair(&a, &b).await;
    let (h_id, endpoint, mut cfg) = raw_member(&a, dirs[2].path()).await;
    // H advertises tiny receive windows and never reads: A's sends to it block almost at once.
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(quinn::VarInt::from_u32(8 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(16 * 1024));
    cfg.transport_config(std::sync::Arc::new(transport));
    let conn = endpoint
        .connect_with(cfg, a.listen_addr().unwrap(), &tls::server_name(&a.id()))
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv_never_read) = conn.open_bi().await.unwrap();
    send.write_all(&[wire::StreamKind::Sync.byte()])
        .await
        .unwrap();
    let hello = wire::SyncMsg::Hello {
        version: wire::PROTOCOL_VERSION,
        node: h_id,
        name: "x".into(),
        clock: tandem::crdt::VersionVector::new(),
    };
    send.write_all(&wire::encode(&hello).unwrap())
        .await
        .unwrap();
    // 200 KB for the stalled peer, far past its windows.
    let doc = a.create(Some(json!({"text": ""}))).await.unwrap();
    let chunk = "x".repeat(1024);
    let start = Instant::now();
    for i in 0..200 {
        a.splice_text(doc, "/text", i * chunk.len(), 0, &chunk)
            .await
            .unwrap();
    }
    let writes = start.elapsed();
    eventually("B to receive everything while H stalls", || async {
        b.clock() == a.clock()
    })
    .await;
    assert!(
        conn.close_reason().is_none(),
        "the stalled peer is still connected"
    );
    eprintln!("200 x 1 KiB local writes took {writes:?} with a stalled peer connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_member_is_cut_off_and_others_are_served() {
    use tandem::net::{tls, wire};
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let b = open(dirs[1].path()).await;
    pair(&a, &b).await;
    let (h_id, endpoint, client_cfg) = raw_member(&a, dirs[2].path()).await;
    let target = a.listen_addr().unwrap();
    let connect = || async {
        endpoint
            .connect_with(client_cfg.clone(), target, &tls::server_name(&a.id()))
            .unwrap()
            .await
            .unwrap()
    };

    let hello = |clock| wire::SyncMsg::Hello {
        version: wire::PROTOCOL_VERSION,
        node: h_id,
        name: "x".into(),
        clock,
    };
    let good_change = {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "k", 1).unwrap();
        tx.commit();
        doc.get_last_local_change().unwrap().raw_bytes().to_vec()
    };
    let mut bad_change = good_change.clone();
    let last = bad_change.len() - 1;
    bad_change[last] ^= 0xff;
    let bad_delta = tandem::crdt::Delta {
        id: tandem::crdt::DeltaId {
            origin: h_id,
            seq: 1,
        },
        doc: DocId::from_bytes([7; 16]),
        body: tandem::crdt::DeltaBody::Change(bad_change),
        auth: Default::default(),
    };
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3]),
        ("truncated", {
            let mut f = wire::encode(&hello(tandem::crdt::VersionVector::new())).unwrap();
            f.truncate(f.len() - 3);
            f
        }),
        (
            "oversized",
            ((wire::MAX_FRAME as u32) + 1).to_le_bytes().to_vec(),
        ),
        ("invalid change", {
            let mut f = wire::encode(&hello(tandem::crdt::VersionVector::new())).unwrap();
            f.extend(
                wire::encode(&wire::SyncMsg::Batch {
                    seq: 1,
                    deltas: vec![bad_delta],
                })
                .unwrap(),
            );
            f
        }),
    ];
    for (name, bytes) in attacks {
        let conn = connect().await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[wire::StreamKind::Sync.byte()])
            .await
            .unwrap();
        send.write_all(&bytes).await.unwrap();
        let _ = send.finish();
        // A answers with its Hello, then closes the connection with a reason.
        let _ = wire::read::<wire::SyncMsg>(&mut recv).await;
        let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect(name);
        eprintln!("{name}: closed with {reason}");
        // Meanwhile A keeps serving B.
        let doc = a.create(Some(json!({"after": name}))).await.unwrap();
        eventually("B served", || async {
            b.get(doc, "/after").await.ok() == Some(json!(name))
        })
        .await;
    }
    assert!(
        a.get(DocId::from_bytes([7; 16]), "").await.is_err(),
        "nothing bad was stored"
    );
    assert_eq!(a.clock().max_seq(&h_id), 0);
}

/// A member (H) sends A a delta in B's name before B ever wrote: A refuses it, names H, and
/// the genuine delta with that id, when B writes it, is not taken for a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delta_through_a_member_is_refused_naming_it() {
    use tandem::net::tls;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let b = open(dirs[1].path()).await;
    pair(&a, &b).await;
    let (h_id, endpoint, cfg) = raw_member(&a, dirs[2].path()).await;
    let h_key = tandem::Identity::load_or_create(dirs[2].path())
        .unwrap()
        .signer();
    let change = {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "owned", true).unwrap();
        tx.commit();
        doc.get_last_local_change().unwrap().raw_bytes().to_vec()
    };
    let b_first = tandem::crdt::DeltaId {
        origin: b.id(),
        seq: 1,
    };
    let mut forged = tandem::crdt::Delta {
        id: b_first,
        doc: DocId::from_bytes([9; 16]),
        body: tandem::crdt::DeltaBody::Change(change),
        auth: Default::default(),
    };
    // Signed, but by H's key: what a compromised member can do.
    h_key.sign(&mut forged, [0; 32]);

    let conn = endpoint
        .connect_with(cfg, a.listen_addr().unwrap(), &tls::server_name(&a.id()))
        .unwrap()
        .await
        .unwrap();
    let reason = support::send_batch(&conn, h_id, vec![forged]).await;
    eprintln!("forger closed with: {reason}");
    assert!(
        reason.to_string().contains("not signed by its origin"),
        "{reason}"
    );
    assert!(
        !a.clock().contains(b_first),
        "the forged delta was not stored"
    );
    assert!(a.get(DocId::from_bytes([9; 16]), "").await.is_err());
    // A says which peer sent it.
    eventually("A names the forger", || async {
        a.peers().iter().any(|p| {
            p.id == Some(h_id)
                && p.error
                    .as_deref()
                    .is_some_and(|e| e.contains("not signed by its origin"))
        })
    })
    .await;

    // B's genuine first delta is not mistaken for a duplicate of the forged one.
    let doc = b.create(Some(json!({"genuine": true}))).await.unwrap();
    eventually("A to hold B's genuine write", || async {
        a.clock().contains(b_first) && a.get(doc, "/genuine").await.ok() == Some(json!(true))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_raft_streams_and_unknown_kinds_are_refused_alone() {
    use tandem::net::{tls, wire};
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let doc = a.create(Some(json!({"k": 1}))).await.unwrap();
    let (h_id, endpoint, cfg) = raw_member(&a, dirs[1].path()).await;
    let conn = endpoint
        .connect_with(cfg, a.listen_addr().unwrap(), &tls::server_name(&a.id()))
        .unwrap()
        .await
        .unwrap();
    // A Raft stream carrying an undecodable frame, and a kind nobody knows: each is refused...
    let (mut raft_send, mut raft_recv) = conn.open_bi().await.unwrap();
    raft_send
        .write_all(&[wire::StreamKind::Raft.byte(), 3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut unknown = conn.open_uni().await.unwrap();
    unknown.write_all(&[0x7f, 1, 2, 3]).await.unwrap();
    let mut buf = [0u8; 1];
    let refused = tokio::time::timeout(Duration::from_secs(10), raft_recv.read_exact(&mut buf))
        .await
        .expect("the raft stream is answered");
    assert!(refused.is_err(), "the bad raft stream is refused");
    let stopped = tokio::time::timeout(Duration::from_secs(10), unknown.stopped())
        .await
        .expect("the unknown stream is stopped");
    assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");
    // ...and the connection still syncs: a proper sync stream gets A's Hello and a batch.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[wire::StreamKind::Sync.byte()])
        .await
        .unwrap();
    let hello = wire::SyncMsg::Hello {
        version: wire::PROTOCOL_VERSION,
        node: h_id,
        name: "h".into(),
        clock: tandem::crdt::VersionVector::new(),
    };
    send.write_all(&wire::encode(&hello).unwrap())
        .await
        .unwrap();
    let first = wire::read::<wire::SyncMsg>(&mut recv).await.unwrap();
    assert!(matches!(first, Some((wire::SyncMsg::Hello { node, .. }, _)) if node == a.id()));
    let batch = wire::read::<wire::SyncMsg>(&mut recv).await.unwrap();
    let Some((wire::SyncMsg::Batch { deltas, .. }, _)) = batch else {
        panic!("expected a batch, got {batch:?}");
    };
    assert!(deltas.iter().any(|d| d.doc == doc));
    assert!(conn.close_reason().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_learns_why_and_backs_off() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let b = open(dirs[1].path()).await;
    pair(&a, &b).await;
    eventually("B connected to A", || async {
        b.peers().iter().any(|p| p.connected)
    })
    .await;
    assert!(a.remove_member(b.id()).await.unwrap());
    // B learns it was removed (from the log, or from A closing its connection with the
    // reason), says so, and stops dialing altogether.
    eventually("B to know it was removed", || async {
        b.membership_status()
            .await
            .unwrap()
            .removed
            .is_some_and(|r| r.by == a.id())
    })
    .await;
    assert_eq!(b.membership_status().await.unwrap().role, "removed");
    assert!(b.members().is_empty());
    let err = b.invite(Duration::from_secs(60)).await.unwrap_err();
    assert!(err.to_string().contains("removed"), "{err}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        assert!(!b.peers().iter().any(|p| p.connected), "B reconnected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !a.peers().iter().any(|p| p.id == Some(b.id())),
        "A lists B no more"
    );
    // B keeps its data and can be invited again: a fresh Raft id.
    let old_raft_id = b.membership_status().await.unwrap().raft_id;
    pair(&a, &b).await;
    eventually("B back as a member", || async {
        a.members().iter().any(|m| m.id == b.id()) && b.members().iter().any(|m| m.id == a.id())
    })
    .await;
    let new_raft_id = b.membership_status().await.unwrap().raft_id;
    assert_ne!(
        old_raft_id, new_raft_id,
        "a re-invited device gets a new Raft id"
    );
    let doc = a.create(Some(json!({"back": true}))).await.unwrap();
    eventually("B syncs again", || async {
        b.get(doc, "/back").await.ok() == Some(json!(true))
    })
    .await;
}

/// With mDNS off, two members that both restarted on new ports find each other again: each
/// dials the other where it last connected from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_both_moved_find_each_other_again() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path()).await;
    let b = open(db.path()).await;
    pair(&a, &b).await;
    let connected = |n: &Node| n.peers().iter().any(|p| p.connected);
    eventually("A and B connected", || async {
        connected(&a) && connected(&b)
    })
    .await;
    // A restarts on a new port: it still reaches B, and B learns where A is now.
    let a_old = a.listen_addr().unwrap();
    a.close().await.unwrap();
    drop(a);
    let a = open(da.path()).await;
    assert_ne!(a.listen_addr().unwrap(), a_old, "a new port");
    eventually("A back", || async { connected(&a) && connected(&b) }).await;
    // B restarts on a new port too: A's idea of B is stale, but B dials A where A connected
    // from, and they sync.
    b.close().await.unwrap();
    drop(b);
    let b = open(db.path()).await;
    let doc = a.create(Some(json!({"moved": true}))).await.unwrap();
    eventually("B to get A's write after both moved", || async {
        b.get(doc, "/moved").await.ok() == Some(json!(true))
    })
    .await;
}

/// A member that answers every dial with garbage is redialed with backoff, not twice a
/// second, and the reason is shown for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_breaks_the_protocol_is_redialed_with_backoff() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tandem::net::tls;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = open(dirs[0].path()).await;
    let h = open(dirs[1].path()).await;
    pair(&a, &h).await;
    let h_id = h.id();
    let h_addr = h.listen_addr().unwrap();
    h.close().await.unwrap();
    drop(h);
    // H's identity now answers at H's address with a server that sends garbage.
    let identity = tandem::Identity::load_or_create(dirs[1].path()).unwrap();
    // (The old endpoint's socket may linger a moment after close.)
    let start = Instant::now();
    let endpoint = loop {
        match quinn::Endpoint::server(tls::server_config(&identity).unwrap(), h_addr) {
            Ok(e) => break e,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot take over H's address: {e}"),
        }
    };
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok((mut send, _recv)) = conn.accept_bi().await {
                    let _ = send.write_all(&[0xff; 16]).await;
                }
                conn.closed().await;
            });
        }
    });
    eventually("A to say why H fails", || async {
        a.peers()
            .iter()
            .any(|p| p.id == Some(h_id) && p.error.as_deref().is_some_and(|e| e.contains("frame")))
    })
    .await;
    let before = accepted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = accepted.load(Ordering::SeqCst) - before;
    // Backoff after failures: 0.5 s, 1 s, 2 s... at most a few dials in 3 s (it was 6+).
    assert!(during <= 3, "{during} dials in 3 s");
    server.abort();
}

/// A clock whose wall time a test moves forward.
#[derive(Debug, Default)]
struct ShiftedClock(std::sync::atomic::AtomicI64);

impl tandem::clock::Clock for ShiftedClock {
    fn now(&self) -> Instant {
        tandem::clock::SystemClock.now()
    }
    fn wall_ms(&self) -> i64 {
        tandem::clock::SystemClock.wall_ms() + self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_expire_by_the_nodes_clock() {
    use tandem::clock::Clock as _;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let clock = std::sync::Arc::new(ShiftedClock::default());
    let mut cfg = Config::new(dirs[0].path());
    cfg.net = Some(NetConfig::loopback());
    cfg.clock = clock.clone();
    let a = Node::open(cfg).await.unwrap();
    let b = open(dirs[1].path()).await;
    let token = a.invite(Duration::from_secs(600)).await.unwrap();
    // Eleven minutes pass on A (and only there: B still thinks the invite is fresh).
    clock
        .0
        .store(11 * 60 * 1000, std::sync::atomic::Ordering::SeqCst);
    assert!(clock.wall_ms() > tandem::clock::SystemClock.wall_ms());
    let err = b.join(&token).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(a.members().is_empty() && b.members().is_empty());
}

/// mDNS on loopback: members whose stored addresses went stale (both restarted on new ports)
/// find each other again by NodeId. The network-namespace variant is in `mdns_netns.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_rediscover_each_other_over_mdns() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let open_mdns = |dir: std::path::PathBuf| async move {
        let mut cfg = Config::new(dir);
        cfg.net = Some(NetConfig {
            mdns: true,
            interfaces: vec!["lo".into()],
            ..NetConfig::loopback()
        });
        Node::open(cfg).await.unwrap()
    };
    let a = open(da.path()).await;
    let b = open(db.path()).await;
    pair(&a, &b).await;
    let (a_id, b_id) = (a.id(), b.id());
    for n in [a, b] {
        n.close().await.unwrap();
    }
    // New ports: what each remembers of the other is now wrong.
    let a = open_mdns(da.path().to_path_buf()).await;
    let b = open_mdns(db.path().to_path_buf()).await;
    let doc = a.create(Some(json!({"found": "by mdns"}))).await.unwrap();
    eventually("B to find A over mDNS and sync", || async {
        b.get(doc, "/found").await.ok() == Some(json!("by mdns"))
    })
    .await;
    // One side's discovery may have been enough to connect; the other's follows.
    eventually("each to see the other nearby", || async {
        b.nearby().iter().any(|(id, _, _)| *id == a_id)
            && a.nearby().iter().any(|(id, _, _)| *id == b_id)
    })
    .await;
}
