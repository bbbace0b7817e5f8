//! Crash safety: a child process writes through `Node` and prints each acknowledged write; we
//! SIGKILL it at a random moment, reopen the data dir, and every acknowledged write must be
//! there. Rounds reuse one data dir, so recovery after recovery is exercised too.
//! `CRASH_ROUNDS` sets the number of rounds (default 20).

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
    let mut rng = rand::rng();
    let mut acked: BTreeMap<DocId, u64> = BTreeMap::new();
    let mut total = 0usize;
    for round in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-writer"))
            .arg(dir.path())
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
        for line in &lines {
            // A line cut by the kill is not an acknowledgement.
            let mut parts = line.split(' ');
            if let (Some("ack"), Some(doc), Some(n), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
                && let (Ok(doc), Ok(n)) = (doc.parse::<DocId>(), n.parse::<u64>())
            {
                let e = acked.entry(doc).or_insert(0);
                *e = (*e).max(n);
                total += 1;
            }
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
    eprintln!("{rounds} rounds, {total} acknowledged writes, all present after SIGKILL");
}
