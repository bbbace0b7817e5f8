//! Mutation fuzzing of everything that parses bytes from the network or from disk: wire frames
//! (Hello, Batch, Push, join messages, with the version vectors and deltas inside), invite
//! tokens, and imported `.automerge` files. Inputs are valid encodings mutated by bit flips,
//! byte edits, truncation, splices and hostile lengths, all from one seed. Nothing may panic;
//! frames and deltas that decode are validated like a node would.
//!
//! `FUZZ_ITERS` sets inputs per target (default 20,000); `FUZZ_SEED` the seed. A failing input
//! is written to `target/fuzz-failures/` for replay.

#![allow(clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::json;
use tandem::crdt::{Delta, DeltaBody, DeltaId, DocId, NodeId, VersionVector};
use tandem::members::Invite;
use tandem::net::wire::{self, Msg};

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
fn fuzz(name: &str, corpus: Vec<Vec<u8>>, mut check: impl FnMut(&[u8])) -> usize {
    let mut rng = Rng(seed() ^ name.len() as u64);
    let mut runs = 0;
    let mut inputs: Vec<Vec<u8>> = corpus.clone();
    inputs.extend((0..iters()).map(|_| Vec::new()));
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

fn frame_corpus() -> Vec<Vec<u8>> {
    let node = NodeId::from_bytes([5; 32]);
    let mut clock = VersionVector::new();
    clock.insert_range(node, 1, 1000);
    clock.insert_range(node, 1005, 1010);
    clock.insert_range(NodeId::from_bytes([6; 32]), 3, 9);
    let delta = |seq, body| Delta {
        id: DeltaId { origin: node, seq },
        doc: DocId::from_bytes([1; 16]),
        body,
    };
    let msgs = [
        Msg::Hello {
            version: wire::PROTOCOL_VERSION,
            node,
            name: "laptop".into(),
            clock,
        },
        Msg::Batch {
            seq: 7,
            deltas: vec![
                delta(1, DeltaBody::Change(change(1))),
                delta(2, DeltaBody::Tombstone),
            ],
        },
        Msg::Push {
            deltas: vec![delta(3, DeltaBody::Change(change(3)))],
        },
        Msg::Ack { seq: 7 },
        Msg::CaughtUp,
        Msg::JoinRequest {
            secret: [9; 32],
            addrs: vec!["127.0.0.1:7373".into()],
        },
        Msg::JoinAccepted {
            members: vec![(node, vec!["10.0.0.1:1".into()])],
        },
        Msg::JoinRefused {
            reason: "no".into(),
        },
    ];
    msgs.iter()
        .map(|m| wire::encode(m).unwrap()[4..].to_vec())
        .collect()
}

#[test]
fn fuzz_wire_frames_and_deltas() {
    fuzz("frames", frame_corpus(), |bytes| {
        if let Ok(msg) = wire::decode(bytes) {
            match msg {
                Msg::Batch { deltas, .. } | Msg::Push { deltas } => {
                    for d in deltas {
                        let _ = d.validate();
                    }
                }
                Msg::Hello { clock, .. } => {
                    let _ = clock.count();
                    let _ = clock.digest();
                }
                _ => {}
            }
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
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
