//! What an idle cluster costs: three paired real `tandemd` processes (this build, release
//! profile) on loopback holding `BENCH_DOCS` documents (default 10,000, made on A and synced to
//! all), then left alone for `BENCH_SECS` seconds (default 60): CPU seconds each daemon used.
//! (Gossip's bytes are measured in the simulator: `sim/tests/gossip.rs`.)
//!
//! `cargo bench -p tandem --bench idle`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::json;

mod common;
mod tandemd;
use common::env_usize;
use tandemd::{Daemon, import_all, make_doc};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let docs = env_usize("BENCH_DOCS", 10_000);
    let secs = env_usize("BENCH_SECS", 60) as u64;
    let tmp = tempfile::tempdir().unwrap();
    let nodes: Vec<Daemon> = ["a", "b", "c"]
        .iter()
        .map(|n| Daemon::start(tmp.path().join(n), None))
        .collect();
    let files: Vec<Vec<u8>> = (0..docs).map(make_doc).collect();
    import_all(&nodes[0], &files);
    for n in &nodes[1..] {
        let token = nodes[0].json("POST", "/v1/invite", Some(json!({})))["token"].clone();
        n.json("POST", "/v1/join", Some(json!({ "token": token })));
    }
    let target = nodes[0].digest();
    let start = Instant::now();
    while !nodes.iter().all(|n| n.digest() == target) {
        assert!(start.elapsed() < Duration::from_secs(600), "sync");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let compaction and the last acknowledgements settle.
    std::thread::sleep(Duration::from_secs(15));
    let before: Vec<f64> = nodes.iter().map(|n| n.usage().0).collect();
    std::thread::sleep(Duration::from_secs(secs));
    println!(
        "tandem idle benchmark: 3 paired tandemd processes on loopback holding {docs} documents, idle for {secs} s"
    );
    for (name, (n, cpu)) in ["A", "B", "C"].iter().zip(nodes.iter().zip(before)) {
        println!("  {name}: {:.2} CPU s per {secs} s", n.usage().0 - cpu);
    }
}
