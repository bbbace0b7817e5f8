//! Crash safety: a child process writes, imports and catches up (stores batches of another
//! node's deltas) through `Node` and prints each acknowledgement; we SIGKILL it at a random
//! moment, reopen the data dir, and every acknowledged write, import and batch must be there.
//! Rounds reuse one data dir, so recovery after recovery is exercised too. `CRASH_ROUNDS` sets
//! the number of rounds (default 20; the closing notes report 100).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::Rng as _;
use serde_json::json;
use tandem::{Config, DocId, Node};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let rounds: usize = std::env::var("CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    // Another node with history to catch up on: 300 documents x 5 changes.
    let source = tempfile::tempdir().unwrap();
    {
        let src = Node::open(Config::new(source.path())).await.unwrap();
        for i in 0..300 {
            let d = src.create(Some(json!({"i": i}))).await.unwrap();
            for c in 0..4 {
                src.put(d, "/c", json!(c)).await.unwrap();
            }
        }
        src.close().await.unwrap();
    }
    let mut rng = rand::rng();
    let mut acked: BTreeMap<DocId, u64> = BTreeMap::new();
    let mut imported: Vec<DocId> = Vec::new();
    let mut ingested: BTreeMap<tandem::NodeId, u64> = BTreeMap::new();
    let mut total = 0usize;
    let mut killed_mid_catch_up = 0;
    for round in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
            .arg(dir.path())
            .arg(source.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        let wait = Duration::from_millis(rng.random_range(100..600));
        std::thread::sleep(wait);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = ingested.values().sum::<u64>();
        for line in &lines {
            // A line cut by the kill is not an acknowledgement.
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("ack"), Some(doc), Some(n), None) => {
                    if let (Ok(doc), Ok(n)) = (doc.parse::<DocId>(), n.parse::<u64>()) {
                        let e = acked.entry(doc).or_insert(0);
                        *e = (*e).max(n);
                        total += 1;
                    }
                }
                (Some("imported"), Some(doc), None, None) => {
                    if let Ok(doc) = doc.parse::<DocId>() {
                        imported.push(doc);
                        total += 1;
                    }
                }
                (Some("ingested"), Some(origin), Some(seq), None) => {
                    if let (Ok(origin), Ok(seq)) = (origin.parse(), seq.parse::<u64>()) {
                        let e = ingested.entry(origin).or_insert(0);
                        *e = (*e).max(seq);
                        total += 1;
                    }
                }
                _ => {}
            }
        }

        let caught_up = ingested.values().sum::<u64>();
        if caught_up > before && caught_up < 1500 {
            killed_mid_catch_up += 1;
        }
        let node = Node::open(Config::new(dir.path())).await.unwrap();
        for (doc, max) in &acked {
            let value = node.get(*doc, "").await.unwrap();
            for n in 0..=*max {
                assert_eq!(
                    value[format!("k{n}")],
                    json!(n),
                    "round {round}: {doc} lost acknowledged write {n}"
                );
            }
        }
        for doc in &imported {
            assert_eq!(
                node.get(*doc, "/c").await.unwrap(),
                json!(3),
                "round {round}: lost imported {doc}"
            );
        }
        let clock = node.clock();
        for (origin, seq) in &ingested {
            for s in 1..=*seq {
                assert!(
                    clock.contains(tandem::crdt::DeltaId {
                        origin: *origin,
                        seq: s
                    }),
                    "round {round}: lost caught-up delta {s} of {origin}"
                );
            }
        }
        let (stats, _) = node.stats().await.unwrap();
        assert_eq!(
            stats.deltas,
            node.clock().count(),
            "round {round}: clock matches stored deltas"
        );
        node.close().await.unwrap();
    }
    assert!(
        total > rounds,
        "the child acknowledged writes ({total} in {rounds} rounds)"
    );
    assert!(!imported.is_empty(), "imports were acknowledged");
    assert!(!ingested.is_empty(), "catch-up batches were acknowledged");
    eprintln!(
        "{rounds} rounds ({killed_mid_catch_up} killed mid catch-up), {total} acknowledgements ({} imports, catch-up to seq {:?}), all present after SIGKILL",
        imported.len(),
        ingested.values().collect::<Vec<_>>()
    );
}
