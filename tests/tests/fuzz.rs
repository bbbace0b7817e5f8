//! Mutation fuzzing of everything that parses bytes from the network or from disk: whole sync
//! streams fed through the frame reader into the real `Session` (Hello, Batch, Ack, CaughtUp,
//! with the version vectors and deltas inside), push and join frames, invite tokens, and
//! imported `.automerge` files; forged deltas (genuine signed ones altered field by field),
//! stored changes corrupted on disk and read back through the load path, and deeply nested
//! JSON. Inputs are valid encodings mutated by bit flips, byte edits, truncation, splices and
//! hostile lengths, all from one seed. Nothing may panic; what decodes is handled as a node
//! would (the session's stores validated by the engine); nothing forged or damaged is served.
//!
//! `FUZZ_ITERS` sets inputs per target (default 20,000); `FUZZ_SEED` the seed. A failing input
//! is written to `target/fuzz-failures/` for replay.

#![allow(clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::json;
use std::time::Instant;
use tandem::crdt::{Delta, DeltaBody, DeltaId, DocId, NodeId, Signer, VersionVector};
use tandem::members::Invite;

use tandem::crdt::engine::{Action, Engine, Input, MemStore};
use tandem::crdt::proto::{self, FrameReader, JoinMsg, PROTOCOL_VERSION, PushMsg, SyncMsg};
use tandem::crdt::session::{Output, Session, SessionConfig};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn iters() -> usize {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

/// A runtime for the targets that drive a real `Node`.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a4d_e11a)
}

/// One mutation of `input`, possibly spliced with another corpus entry.
fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.remove(i);
            }
            4 => v.truncate(rng.below(v.len() + 1)),
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            6 if v.len() >= 4 => {
                // A hostile varint/length somewhere: all-ones bytes.
                let i = rng.below(v.len() - 3);
                v[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x0f]);
            }
            _ => {
                let n = rng.below(16);
                v.extend((0..n).map(|_| rng.next() as u8));
            }
        }
    }
    v
}

/// Runs `check` on the corpus and `iters()` mutations; panics (after saving the input) if it
/// ever panics.
fn fuzz(name: &str, corpus: Vec<Vec<u8>>, check: impl FnMut(&[u8])) -> usize {
    fuzz_n(name, corpus, iters(), check)
}

/// [`fuzz`] with `n` mutations (for targets whose every input is slow).
fn fuzz_n(name: &str, corpus: Vec<Vec<u8>>, n: usize, mut check: impl FnMut(&[u8])) -> usize {
    let mut rng = Rng(seed() ^ name.len() as u64);
    let mut runs = 0;
    let mut inputs: Vec<Vec<u8>> = corpus.clone();
    inputs.extend((0..n).map(|_| Vec::new()));
    for i in 0..inputs.len() {
        let input = if i < corpus.len() {
            corpus[i].clone()
        } else {
            let base = &corpus[rng.below(corpus.len())];
            mutate(&mut rng, base, &corpus)
        };
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{name}-{i}"));
            std::fs::write(&path, &input).unwrap();
            panic!("{name}: input {i} panicked; saved to {}", path.display());
        }
        runs += 1;
    }
    eprintln!("{name}: {runs} inputs, no panic");
    runs
}

fn change(i: i64) -> Vec<u8> {
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "k", i).unwrap();
    tx.commit();
    doc.get_last_local_change().unwrap().raw_bytes().to_vec()
}

/// The peer whose stream is fuzzed: its deltas are signed by it, as a real node's are.
fn peer() -> Signer {
    Signer::from_seed([5; 32])
}

/// A delta of `signer`, linked after `prev` and signed.
fn signed(signer: &Signer, seq: u64, body: DeltaBody, prev: [u8; 32]) -> Delta {
    let mut d = Delta {
        id: DeltaId {
            origin: signer.id(),
            seq,
        },
        doc: DocId::from_bytes([1; 16]),
        body,
        auth: Default::default(),
    };
    signer.sign(&mut d, prev);
    d
}

fn frame_corpus() -> Vec<Vec<u8>> {
    let signer = peer();
    let node = signer.id();
    let mut clock = VersionVector::new();
    clock.insert_range(node, 1, 1000);
    clock.insert_range(node, 1005, 1010);
    clock.insert_range(NodeId::from_bytes([6; 32]), 3, 9);
    let first = signed(&signer, 1001, DeltaBody::Change(change(1)), [7; 32]);
    let second = signed(
        &signer,
        1002,
        DeltaBody::Tombstone,
        tandem::crdt::sign::chain_hash(&first),
    );
    let hello = SyncMsg::Hello {
        version: PROTOCOL_VERSION,
        node,
        name: "laptop".into(),
        clock,
    };
    let batch = SyncMsg::Batch {
        seq: 1,
        deltas: vec![first, second],
    };
    // A whole sync stream: what a peer sends after the connection opens.
    let stream: Vec<u8> = [hello, batch, SyncMsg::Ack { seq: 1 }, SyncMsg::CaughtUp]
        .iter()
        .flat_map(|m| proto::encode(m).unwrap())
        .collect();
    let push = PushMsg::Push {
        deltas: vec![signed(&signer, 3, DeltaBody::Change(change(3)), [0; 32])],
    };
    let joins = [
        JoinMsg::Request {
            secret: [9; 32],
            addrs: vec!["127.0.0.1:7373".into()],
            name: "laptop".into(),
            prefer_voter: false,
        },
        JoinMsg::Accepted {
            raft_id: 2,
            list: {
                let mut l = tandem::crdt::MemberList::default();
                l.apply(tandem::crdt::MemberCommand::Found {
                    cluster: [1; 16],
                    founder: node,
                    name: "a".into(),
                    addrs: vec!["10.0.0.1:1".into()],
                    prefer_voter: false,
                    at: 1,
                });
                l
            },
        },
        JoinMsg::Refused {
            reason: "no".into(),
        },
    ];
    let mut corpus = vec![stream, proto::encode(&push).unwrap()];
    corpus.extend(joins.iter().map(|m| proto::encode(m).unwrap()));
    corpus
}

/// Feeds `bytes` as the sync stream of a peer to a real `Session`, carrying out what it asks
/// for as a node would, until the stream ends, a frame is undecodable, or the session closes.
/// Returns how many deltas it stored.
fn run_session(bytes: &[u8]) -> usize {
    let signer = std::sync::Arc::new(Signer::from_seed([1; 32]));
    let me = signer.id();
    let peer = peer().id();
    let now = Instant::now();
    let mut engine = Engine::new(signer, VersionVector::new());
    let mut store = MemStore::new();
    let mut session = Session::new(
        SessionConfig::default(),
        me,
        peer,
        VersionVector::new(),
        now,
    );
    let mut reader = FrameReader::new();
    reader.push(bytes);
    loop {
        while let Some(out) = session.poll_output() {
            match out {
                Output::Load(req) => {
                    let lane = req.lane;
                    let (plan, batch) = req.run(&engine, &store).unwrap();
                    session.handle_loaded(now, lane, plan, batch);
                }
                Output::Store { id, deltas, .. } => {
                    let mut result = Ok(());
                    for a in engine.handle(Input::RemoteDeltas { from: peer, deltas }) {
                        match a {
                            Action::Persist { deltas, .. } => store.insert(deltas),
                            Action::Reject { error, .. } => {
                                result = Err(tandem::crdt::session::StoreFailure::Invalid(
                                    error.to_string(),
                                ));
                            }
                        }
                    }
                    session.handle_stored(now, id, result);
                }
                _ => {}
            }
        }
        if session.is_closed() {
            return store.len();
        }
        match reader.next_frame::<SyncMsg>() {
            Ok(Some((msg, _))) => session.handle_sync(now, msg),
            Ok(None) | Err(_) => return store.len(),
        }
    }
}

#[test]
fn fuzz_sync_streams_through_the_session_and_frames() {
    let corpus = frame_corpus();
    assert_eq!(
        run_session(&corpus[0]),
        2,
        "the unmutated stream's batch is stored"
    );
    fuzz("frames", corpus, |bytes| {
        run_session(bytes);
        let body = bytes.get(4..).unwrap_or_default();
        if let Ok(PushMsg::Push { deltas }) = proto::decode::<PushMsg>(body) {
            for d in deltas {
                let _ = d.validate();
            }
        }
        let _ = proto::decode::<JoinMsg>(body);
        let mut r = FrameReader::new();
        r.push(bytes);
        while let Ok(Some((SyncMsg::Hello { clock, .. }, _))) = r.next_frame::<SyncMsg>() {
            let _ = clock.count();
            let _ = clock.digest();
        }
    });
}

#[test]
fn fuzz_invite_tokens() {
    let corpus: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            Invite {
                inviter: NodeId::from_bytes([i; 32]),
                addrs: vec![format!("192.168.1.{i}:7373"), "[::1]:7373".into()],
                secret: [i; 32],
                expires_at: 1_700_000_000_000 + i64::from(i),
            }
            .to_token()
            .into_bytes()
        })
        .collect();
    fuzz("invites", corpus, |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = Invite::parse(text);
        }
    });
}

#[test]
fn fuzz_automerge_imports() {
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let node = rt
        .block_on(tandem::Node::open(tandem::Config::new(dir.path())))
        .unwrap();
    let corpus: Vec<Vec<u8>> = rt.block_on(async {
        let mut c = Vec::new();
        for v in [json!({"a": 1}), json!({"t": "text", "l": [1, {"m": true}]})] {
            let d = node.create(Some(v)).await.unwrap();
            node.put(d, "/x", json!("more")).await.unwrap();
            c.push(node.export(d).await.unwrap());
        }
        c
    });
    let before = node.clock();
    let mut accepted = 0;
    fuzz("imports", corpus, |bytes| {
        if rt.block_on(node.import(bytes)).is_ok() {
            accepted += 1;
        }
    });
    // Whatever was accepted is a whole, valid document; nothing else was written.
    let (stats, _) = rt.block_on(node.stats()).unwrap();
    assert_eq!(stats.deltas, node.clock().count());
    assert!(node.clock().count() >= before.count());
    eprintln!("imports: {accepted} mutated files were valid documents and imported whole");
}

/// Forged deltas: genuine signed chains from two origins, altered field by field as a lying
/// member could (another origin, another seq or document, a changed body, a borrowed `prev` or
/// signature), fed to a real engine. Whatever it accepts must be exactly a genuine delta.
#[test]
fn fuzz_forged_deltas_are_never_accepted() {
    use tandem::crdt::sign::chain_hash;
    let a = Signer::from_seed([11; 32]);
    let b = Signer::from_seed([12; 32]);
    let mut genuine: Vec<Delta> = Vec::new();
    for s in [&a, &b] {
        let mut prev = [0; 32];
        for seq in 1..=6 {
            let body = if seq == 4 {
                DeltaBody::Tombstone
            } else {
                DeltaBody::Change(change(seq as i64 * 7))
            };
            let d = signed(s, seq, body, prev);
            prev = chain_hash(&d);
            genuine.push(d);
        }
    }
    let by_id: std::collections::BTreeMap<DeltaId, Delta> =
        genuine.iter().map(|d| (d.id, d.clone())).collect();
    let me = std::sync::Arc::new(Signer::from_seed([13; 32]));
    let mut rng = Rng(seed() ^ 0xf0_4e);
    let (mut accepted, mut refused) = (0usize, 0usize);
    for _ in 0..iters() / 4 {
        // A window of the genuine deltas, in order, then 1-3 alterations.
        let start = rng.below(genuine.len());
        let len = 1 + rng.below(genuine.len() - start);
        let mut batch: Vec<Delta> = genuine[start..start + len].to_vec();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(batch.len());
            let other = genuine[rng.below(genuine.len())].clone();
            let d = &mut batch[i];
            match rng.below(8) {
                0 => d.id.origin = other.id.origin,
                1 => d.id.seq = d.id.seq.wrapping_add(1 + rng.below(3) as u64),
                2 => d.doc = DocId::from_bytes([rng.next() as u8; 16]),
                3 => d.body = other.body,
                4 => d.auth.prev[rng.below(32)] ^= 1 << rng.below(8),
                5 => d.auth.sig.0[rng.below(64)] ^= 1 << rng.below(8),
                6 => d.auth = other.auth,
                _ => {
                    // Signed by the forger's own key under another origin's name.
                    me.sign(d, other.auth.prev);
                }
            }
        }
        let mut engine = Engine::new(me.clone(), VersionVector::new());
        for action in engine.handle(Input::RemoteDeltas {
            from: me.id(),
            deltas: batch,
        }) {
            match action {
                Action::Persist { deltas, .. } => {
                    for d in deltas {
                        let real = by_id.get(&d.id);
                        assert!(
                            real.is_some_and(|r| r.doc == d.doc && r.body == d.body),
                            "a forged delta was accepted: {:?}",
                            d.id
                        );
                        accepted += 1;
                    }
                }
                Action::Reject { .. } => refused += 1,
            }
        }
    }
    assert!(accepted > 0 && refused > 0);
    eprintln!("forged deltas: {refused} refused, {accepted} genuine accepted, none forged");
}

/// Corrupted stored changes, fed through the load path: one stored change of a document is
/// mutated in SQLite, the node reopens and reads it. It must answer with the true document or
/// an error, never a wrong document; then a member's good copy heals it.
#[test]
fn fuzz_corrupt_stored_changes_are_never_served() {
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let db_path = dir.path().join("tandem.db");
    let mut cfg = tandem::Config::new(dir.path());
    cfg.compact_after = 1_000; // keep the changes as changes
    let (doc, want, pristine, me) = rt.block_on(async {
        let node = tandem::Node::open(cfg.clone()).await.unwrap();
        let doc = node.create(Some(json!({"k0": 0}))).await.unwrap();
        for i in 1..6 {
            node.put(doc, &format!("/k{i}"), json!(i)).await.unwrap();
        }
        let want = node.get(doc, "").await.unwrap();
        let all = node
            .deltas_missing_from(&VersionVector::new())
            .await
            .unwrap();
        let me = node.id();
        node.close().await.unwrap();
        (doc, want, all, me)
    });
    let mut rng = Rng(seed() ^ 0x10ad);
    let rounds = (iters() / 100).max(20);
    let (mut served, mut reported) = (0, 0);
    for round in 0..rounds {
        let victim = &pristine[rng.below(pristine.len())];
        let Some(good) = victim.change_bytes() else {
            continue;
        };
        let bad = mutate(&mut rng, good, &[good.to_vec()]);
        {
            let db = rusqlite::Connection::open(&db_path).unwrap();
            db.execute(
                "UPDATE deltas SET change = ?2 WHERE origin = ?1 AND seq = ?3",
                rusqlite::params![me.as_bytes().as_slice(), bad, victim.id.seq as i64],
            )
            .unwrap();
        }
        rt.block_on(async {
            let node = tandem::Node::open(cfg.clone()).await.unwrap();
            match node.get(doc, "").await {
                Ok(v) => {
                    assert_eq!(v, want, "round {round}: a damaged document was served");
                    served += 1;
                }
                Err(_) => reported += 1,
            }
            // A member holding everything sends what this node now lacks: healed.
            let lacks: Vec<Delta> = pristine
                .iter()
                .filter(|d| !node.clock().contains(d.id))
                .cloned()
                .collect();
            node.ingest(NodeId::from_bytes([3; 32]), lacks)
                .await
                .unwrap();
            assert_eq!(
                node.get(doc, "").await.unwrap(),
                want,
                "round {round}: not healed"
            );
            assert!(node.damaged().await.unwrap().is_empty());
            node.close().await.unwrap();
        });
    }
    assert!(reported > 0);
    eprintln!(
        "stored changes: {rounds} corrupted; {reported} reported, {served} unchanged bytes served, 0 wrong"
    );
}

/// Deeply nested JSON of random shapes: written whole or refused with `TooDeep`, never a
/// crash, and what was written reads back the same.
#[test]
fn fuzz_deep_json_is_refused_or_stored_whole() {
    use tandem::crdt::json::MAX_DEPTH;
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let node = rt
        .block_on(tandem::Node::open(tandem::Config::new(dir.path())))
        .unwrap();
    let mut rng = Rng(seed() ^ 0xdee9);
    let (mut stored, mut refused) = (0, 0);
    for _ in 0..(iters() / 100).max(50) {
        // A chain of objects and lists around 100 levels deep, with side branches.
        let depth = MAX_DEPTH - 20 + rng.below(60);
        let mut v = json!(rng.next() as u32);
        // Containers from the root object down: the root, plus one per wrap.
        let mut levels = 1;
        for _ in 0..depth {
            v = if rng.below(2) == 0 {
                json!({ "a": v, "s": rng.below(9) })
            } else {
                json!([rng.below(9), v])
            };
            levels += 1;
        }
        let doc_value = json!({ "root": v });
        match rt.block_on(node.create(Some(doc_value.clone()))) {
            Ok(doc) => {
                assert!(levels <= MAX_DEPTH, "{levels} levels were accepted");
                assert_eq!(rt.block_on(node.get(doc, "")).unwrap(), doc_value);
                stored += 1;
            }
            Err(tandem::Error::Doc(tandem::DocError::Path(tandem::crdt::PathError::TooDeep {
                ..
            }))) => {
                assert!(levels > MAX_DEPTH, "{levels} levels were refused");
                refused += 1;
            }
            Err(e) => panic!("deep JSON: unexpected error {e}"),
        }
    }
    assert!(stored > 0 && refused > 0);
    eprintln!("deep JSON: {stored} stored whole, {refused} refused as too deep");

    // Deep Automerge documents of random shapes, as a peer's could arrive: imported, then read
    // as the document or refused as too deep; never a crash.
    let (mut read, mut too_deep) = (0, 0);
    for _ in 0..(iters() / 1000).max(20) {
        let depth = 50 + rng.below(700);
        let mut am = automerge::Automerge::new();
        let mut tx = am.transaction();
        let mut obj = automerge::ROOT;
        let mut in_list = false;
        for _ in 0..depth {
            use automerge::transaction::Transactable;
            let kind = if rng.below(3) == 0 {
                automerge::ObjType::List
            } else {
                automerge::ObjType::Map
            };
            obj = if in_list {
                tx.insert_object(&obj, 0, kind).unwrap()
            } else {
                tx.put_object(&obj, "a", kind).unwrap()
            };
            in_list = kind == automerge::ObjType::List;
        }
        tx.commit();
        let doc = rt.block_on(node.import(&am.save())).unwrap();
        match rt.block_on(node.get(doc, "")) {
            Ok(_) => {
                assert!(depth < MAX_DEPTH, "{depth} levels were served");
                read += 1;
            }
            Err(tandem::Error::Doc(tandem::DocError::Path(tandem::crdt::PathError::TooDeep {
                ..
            }))) => too_deep += 1,
            Err(e) => panic!("deep Automerge document: unexpected error {e}"),
        }
    }
    assert!(too_deep > 0);
    eprintln!("deep Automerge documents: {read} read, {too_deep} refused as too deep");
}

/// Raft RPCs as a member could send them, mutated: well-formed lies (a vote for a far later
/// term, entries that remove this node, a proposal) and garbage. Raft trusts members (it is
/// not Byzantine-tolerant: a lying member can disturb the member list, which is why only
/// invited devices are members), but nothing may crash the node or stop it serving data.
#[test]
fn fuzz_raft_messages_never_crash_the_node() {
    let (rt, dir) = (runtime(), tempfile::tempdir().unwrap());
    let node = rt
        .block_on(tandem::Node::open(tandem::Config::new(dir.path())))
        .unwrap();
    // Let it found its own cluster first, so the samples carry its cluster id.
    rt.block_on(async {
        let start = std::time::Instant::now();
        while node.membership_status().await.unwrap().epoch == 0 {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let liar = tandem::NodeId::from_bytes([5; 32]);
    let corpus: Vec<Vec<u8>> = node
        .raft_samples_for_tests(2, liar)
        .into_iter()
        .map(|f| f[4..].to_vec())
        .collect();
    assert_eq!(corpus.len(), 3);
    let (mut answered, mut undecodable) = (0, 0);
    let runs = {
        let check = |body: &[u8]| {
            let served = rt.block_on(async {
                tokio::time::timeout(
                    std::time::Duration::from_millis(200),
                    node.raft_frame_for_tests(liar, body),
                )
                .await
            });
            match served {
                Ok(Some(_)) | Err(_) => answered += 1,
                Ok(None) => undecodable += 1,
            }
        };
        fuzz_n("raft", corpus, (iters() / 20).max(60), check)
    };
    eprintln!("raft: {runs} inputs: {answered} served, {undecodable} undecodable");
    // Still serving data, and its status still answers.
    let doc = rt
        .block_on(node.create(Some(json!({"after": "raft fuzz"}))))
        .unwrap();
    assert_eq!(
        rt.block_on(node.get(doc, "/after")).unwrap(),
        json!("raft fuzz")
    );
    rt.block_on(node.membership_status()).unwrap();
    rt.block_on(node.close()).unwrap();
}

/// Gossip datagrams (genuine SWIM packets from one member to another, mutated) fed to a fresh
/// gossip of the addressee as if from that member: nothing panics, and what is dropped changes
/// nothing.
#[test]
fn fuzz_gossip_packets() {
    use std::time::Duration;
    use tandem::crdt::gossip::{Gossip, GossipConfig, GossipId, GossipOutput};
    let t = Instant::now();
    let ids: Vec<NodeId> = (1..=3).map(|i| NodeId::from_bytes([i; 32])).collect();
    let make = |i: usize| {
        let mut g = Gossip::new(
            GossipId {
                node: ids[i],
                incarnation: 1,
            },
            GossipConfig::default(),
            i as u64,
            t,
        );
        g.set_members(t, ids.iter().copied());
        g
    };
    // A corpus of genuine packets: what node 0 sends node 2 while they talk for a few seconds.
    let (mut a, mut b) = (make(0), make(2));
    let mut corpus = Vec::new();
    let mut now = t;
    for _ in 0..400 {
        now += Duration::from_millis(50);
        for (x, y) in [(0, 2), (2, 0)] {
            let (from, to) = if x == 0 {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            from.handle_timeout(now);
            let mut out = Vec::new();
            while let Some(o) = from.poll_output() {
                out.push(o);
            }
            for o in out {
                if let GossipOutput::Send { to: dst, packet } = o
                    && dst == ids[y]
                {
                    if x == 0 {
                        corpus.push(packet.clone());
                    }
                    to.handle_datagram(now, ids[x], &packet);
                }
            }
        }
    }
    assert!(corpus.len() >= 20, "{} packets", corpus.len());
    let mut c = make(2);
    let mut dropped_before = 0;
    let runs = fuzz("gossip", corpus, |p| {
        let health = c.health().clone();
        // From node 0's connection: most mutations are forged, garbage or refused.
        c.handle_datagram(now, ids[0], p);
        let dropped: u64 = c.dropped().values().sum();
        if dropped > dropped_before {
            assert_eq!(c.health(), &health, "a dropped datagram changed health");
            dropped_before = dropped;
        }
        c.handle_timeout(now);
        while c.poll_output().is_some() {}
    });
    eprintln!("gossip: {runs} inputs, {:?}", c.dropped());
}

/// Digest datagrams (genuine anti-entropy packets with clock pages and address entries,
/// mutated) fed to a member's anti-entropy: nothing panics, a dropped one asks for nothing,
/// and no mutation makes it send more than one answer per datagram.
#[test]
fn fuzz_digest_packets() {
    use std::time::Duration;
    use tandem::crdt::VersionVector;
    use tandem::crdt::entropy::{Entropy, EntropyConfig, EntropyOutput, Link};
    let t = Instant::now();
    let keys: Vec<tandem::crdt::Signer> = (1..=3)
        .map(|i| tandem::crdt::Signer::from_seed([i; 32]))
        .collect();
    let ids: Vec<NodeId> = keys.iter().map(|k| k.id()).collect();
    let make = |i: usize, clock: &VersionVector| {
        let mut e = Entropy::new(ids[i], EntropyConfig::default(), i as u64, t);
        e.set_members(ids.iter().copied());
        e.set_clock(clock);
        e.set_links(ids.iter().filter(|n| **n != ids[i]).map(|n| {
            (
                *n,
                Link {
                    rtt: Duration::from_millis(1),
                    busy: false,
                    in_sync: false,
                },
            )
        }));
        e
    };
    let mut clock = VersionVector::new();
    for i in 0..40u8 {
        clock.insert_range(NodeId::from_bytes([i + 10; 32]), 1, 1 + i as u64 * 1000);
    }
    let mut a = make(0, &clock);
    a.set_own_addrs(
        &keys[0],
        1 << 24,
        vec![
            "10.0.0.1:4000".parse().unwrap(),
            "[::1]:4000".parse().unwrap(),
        ],
    );
    let mut corpus = Vec::new();
    let mut now = t;
    for _ in 0..30 {
        now += Duration::from_secs(1);
        a.handle_timeout(now);
        while let Some(o) = a.poll_output() {
            if let EntropyOutput::Send { packet, .. } = o {
                corpus.push(packet);
            }
        }
    }
    assert!(corpus.len() >= 10, "{} packets", corpus.len());
    let mut c = make(2, &VersionVector::new());
    let mut dropped_before = 0;
    let runs = fuzz("digest", corpus, |p| {
        c.handle_datagram(now, ids[0], p);
        let dropped: u64 = c.dropped().values().sum();
        let mut sends = 0;
        while let Some(o) = c.poll_output() {
            if dropped > dropped_before {
                panic!("a dropped datagram asked for {o:?}");
            }
            sends += usize::from(matches!(o, EntropyOutput::Send { .. }));
        }
        assert!(sends <= 1);
        dropped_before = dropped;
        now += Duration::from_millis(300);
        c.handle_timeout(now);
        while c.poll_output().is_some() {}
    });
    eprintln!("digest: {runs} inputs, {:?}", c.dropped());
}
