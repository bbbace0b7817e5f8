//! Sync benchmarks over real QUIC on loopback, printed from one run:
//! - bulk: `BENCH_DOCS` (1000) documents x 10 changes on A; a fresh B joins; time until every
//!   document is readable on B, against the same changes ingested in-process with no network
//!   (the limit);
//! - latency: p50 / p99 from a write on A (its commit included) to the event on B;
//! - catch-up: B holds `BENCH_CATCHUP_DOCS` (10000) synced documents, goes offline, A edits 5;
//!   bytes (the nodes' own counters) and time for B to be back in sync.
//!
//! `cargo bench -p tandem --bench sync`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem::{Config, DocId, NetConfig, Node};

mod common;
use common::env_usize;

async fn open(dir: &Path, net: bool) -> Node {
    let mut cfg = Config::new(dir);
    if net {
        cfg.net = Some(NetConfig::loopback());
    }
    Node::open(cfg).await.unwrap()
}

async fn pair(a: &Node, b: &Node) {
    let token = a.invite(Duration::from_secs(60)).await.unwrap();
    b.join(&token).await.unwrap();
}

async fn wait_until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < limit, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Creates `docs` documents with `changes` changes each, 16 writers at once.
async fn fill(node: &Node, docs: usize, changes: usize) -> Vec<DocId> {
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let node = node.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (w..docs).step_by(16) {
                    let doc = node
                        .create(Some(json!({"title": format!("doc {i}"), "n": 0})))
                        .await
                        .unwrap();
                    for c in 1..changes {
                        node.put(doc, "/n", json!(c)).await.unwrap();
                    }
                    ids.push(doc);
                }
                ids
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

async fn all_readable(node: &Node, docs: &[DocId]) {
    for d in docs {
        node.get(*d, "").await.unwrap();
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let docs = env_usize("BENCH_DOCS", 1000);
    let catchup_docs = env_usize("BENCH_CATCHUP_DOCS", 10_000);
    let tmp = tempfile::tempdir().unwrap();

    // Bulk.
    let a = open(&tmp.path().join("a"), true).await;
    let ids = fill(&a, docs, 10).await;
    let deltas = a.deltas_missing_from(&Default::default()).await.unwrap();
    let limit_node = open(&tmp.path().join("limit"), false).await;
    let start = Instant::now();
    for chunk in deltas.chunks(2000) {
        limit_node.ingest(a.id(), chunk.to_vec()).await.unwrap();
    }
    all_readable(&limit_node, &ids).await;
    let limit = start.elapsed();
    limit_node.close().await.unwrap();
    // What signatures cost inside that: checking every delta's run the way a receiver does
    // (in the batches a catch-up sends), and checking each signature alone.
    let start = Instant::now();
    let mut authentic = 0;
    for chunk in deltas.chunks(500) {
        authentic += tandem::crdt::sign::verify_batch(chunk)
            .iter()
            .filter(|ok| **ok)
            .count();
    }
    let verify_runs = start.elapsed();
    assert_eq!(authentic, deltas.len());
    let start = Instant::now();
    for d in &deltas {
        let hash = tandem::crdt::sign::chain_hash(d);
        assert!(tandem::crdt::sign::verify(&d.id.origin, &hash, &d.auth.sig));
    }
    let verify_each = start.elapsed();
    let signer = tandem::crdt::Signer::from_seed([1; 32]);
    let mut copies = deltas.clone();
    let start = Instant::now();
    let mut prev = [0; 32];
    for d in &mut copies {
        prev = signer.sign(d, prev);
    }
    let sign_each = start.elapsed();

    let b = open(&tmp.path().join("b"), true).await;
    let start = Instant::now();
    pair(&a, &b).await;
    let target = a.clock();
    wait_until("bulk sync", Duration::from_secs(300), async || {
        b.clock() == target
    })
    .await;
    all_readable(&b, &ids).await;
    let bulk = start.elapsed();

    // Bulk again to a fresh C that has an event subscriber, as tandemd always has (its event
    // journal): every new document's event then carries its patches.
    let c = open(&tmp.path().join("c"), true).await;
    let mut sub = c.subscribe(None).unwrap();
    let drain = tokio::spawn(async move {
        while !matches!(sub.recv().await, Err(tandem::SubscriptionError::Closed)) {}
    });
    let start = Instant::now();
    pair(&a, &c).await;
    wait_until(
        "bulk sync with a subscriber",
        Duration::from_secs(300),
        async || c.clock() == target,
    )
    .await;
    all_readable(&c, &ids).await;
    let bulk_sub = start.elapsed();
    c.close().await.unwrap();
    drain.abort();

    // Latency.
    let doc = ids[0];
    let mut events = b.subscribe(Some(doc)).unwrap();
    let mut lat = Vec::new();
    for i in 0..500 {
        let t = Instant::now();
        a.put(doc, "/latency", json!(i)).await.unwrap();
        loop {
            let e = events.recv().await.unwrap();
            if e.doc == doc {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    a.close().await.unwrap();
    b.close().await.unwrap();
    drop((a, b));

    // Catch-up.
    let a = open(&tmp.path().join("ca"), true).await;
    let b = open(&tmp.path().join("cb"), true).await;
    pair(&a, &b).await;
    let cids = fill(&a, catchup_docs, 1).await;
    let target = a.clock();
    wait_until("catch-up setup", Duration::from_secs(600), async || {
        b.clock() == target
    })
    .await;
    b.close().await.unwrap();
    drop(b);
    let mut change_bytes = 0;
    let before_clock = a.clock();
    for d in &cids[..5] {
        a.put(*d, "/edited", json!(true)).await.unwrap();
    }
    for d in a.deltas_missing_from(&before_clock).await.unwrap() {
        change_bytes += d.change_bytes().map_or(0, <[u8]>::len);
    }
    let before: u64 = a
        .peers()
        .iter()
        .map(|p| p.bytes_sent + p.bytes_received)
        .sum();
    let start = Instant::now();
    let b = open(&tmp.path().join("cb"), true).await;
    let target = a.clock();
    wait_until("catch-up", Duration::from_secs(60), async || {
        b.clock() == target
    })
    .await;
    let catchup = start.elapsed();
    wait_until("catch-up counters", Duration::from_secs(10), async || {
        a.peers().iter().any(|p| p.connected && p.in_sync)
    })
    .await;
    let after: u64 = a
        .peers()
        .iter()
        .map(|p| p.bytes_sent + p.bytes_received)
        .sum();

    println!("tandem sync benchmark (loopback QUIC, durability=full, 2 worker threads)");
    println!(
        "  bulk: {docs} docs x 10 changes to a fresh B: {:.2} s; in-process ingest (limit) {:.2} s; ratio {:.2}x (target <= 2x)",
        bulk.as_secs_f64(),
        limit.as_secs_f64(),
        bulk.as_secs_f64() / limit.as_secs_f64()
    );
    println!(
        "  signatures on those {} deltas: checked by runs (as received) {:.1} ms; every signature alone would be {:.1} ms; signing them {:.1} ms",
        deltas.len(),
        verify_runs.as_secs_f64() * 1e3,
        verify_each.as_secs_f64() * 1e3,
        sign_each.as_secs_f64() * 1e3
    );
    println!(
        "  bulk to a fresh node with an event subscriber (as tandemd): {:.2} s; ratio {:.2}x the limit",
        bulk_sub.as_secs_f64(),
        bulk_sub.as_secs_f64() / limit.as_secs_f64()
    );
    println!(
        "  latency write on A -> event on B: p50 {:.2} ms, p99 {:.2} ms (targets 2 ms, 10 ms)",
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  catch-up: {catchup_docs} synced docs, 5 edited offline: {} bytes exchanged ({} of them change bytes), back in sync in {:.1} ms",
        after - before,
        change_bytes,
        catchup.as_secs_f64() * 1e3
    );
}
