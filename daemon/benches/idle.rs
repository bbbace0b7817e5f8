//! What an idle cluster costs: three paired real `tandemd` processes (this build, release
//! profile) on loopback holding `BENCH_DOCS` documents (default 10,000, made on A and synced to
//! all), left to settle `BENCH_SETTLE` seconds (default 35: gossip calms down 30 s after the
//! last change), then alone for `BENCH_SECS` seconds (default 60): CPU seconds each daemon
//! used. The reference, in the same window, when `syncthing` is installed (or named by
//! `BENCH_SYNCTHING`; `BENCH_SYNCTHING=0` skips it): three paired Syncthing instances sharing a
//! folder of as many small files, synced to all three before the window starts.
//! (Gossip's bytes are measured in the simulator: `sim/tests/gossip.rs`.)
//!
//! `cargo bench -p tandem --bench idle`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::json;

mod common;
mod syncthing;
mod tandemd;
use common::{cpu_since, env_usize, thread_cpu};
use tandemd::{Daemon, import_all, make_doc};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let docs = env_usize("BENCH_DOCS", 10_000);
    let secs = env_usize("BENCH_SECS", 60) as u64;
    let settle = env_usize("BENCH_SETTLE", 35) as u64;
    let tmp = tempfile::tempdir().unwrap();
    // The reference first: its files take Syncthing a while to sync.
    let reference = syncthing::binary().map(|bin| {
        let files: Vec<(String, Vec<u8>)> = (0..docs)
            .map(|k| {
                let items: Vec<String> = (0..10)
                    .map(|c| format!("\"item {c} of doc {k}\""))
                    .collect();
                (
                    format!("doc{k:06}.json"),
                    format!("{{\"items\": [{}]}}\n", items.join(", ")).into_bytes(),
                )
            })
            .collect();
        let cluster = syncthing::Cluster::start(&bin, &tmp.path().join("syncthing"), &files);
        let synced = cluster.wait_synced(docs, Duration::from_secs(900));
        (cluster, synced)
    });
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
    // Let compaction, the last acknowledgements and gossip settle.
    std::thread::sleep(Duration::from_secs(settle));
    let mut pids: Vec<(String, u32)> = ["A", "B", "C"]
        .iter()
        .zip(&nodes)
        .map(|(name, n)| (format!("tandemd {name}"), n.child.id()))
        .collect();
    if let Some((cluster, _)) = &reference {
        for (name, pid) in ["a", "b", "c"].iter().zip(cluster.pids()) {
            pids.push((format!("syncthing {name}"), pid));
        }
    }
    let before: Vec<_> = pids.iter().map(|(_, pid)| thread_cpu(*pid)).collect();
    std::thread::sleep(Duration::from_secs(secs));
    let used: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|((_, pid), b)| cpu_since(*pid, b))
        .collect();
    println!(
        "idle benchmark: 3 paired processes on loopback holding {docs} documents (files), idle for {secs} s after {settle} s to settle, measured in the same window"
    );
    for ((name, _), cpu) in pids.iter().zip(&used) {
        println!("  {name}: {cpu:.3} CPU s per {secs} s");
    }
    match &reference {
        None => println!("  (no syncthing installed: no reference; BENCH_SYNCTHING names one)"),
        Some((_, false)) => println!(
            "  (syncthing did not sync every file within 15 min: its figures are not idle)"
        ),
        Some(_) => {
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            println!(
                "  tandemd / syncthing (means): {:.2}x",
                mean(&used[..3]) / mean(&used[3..]).max(1e-9)
            );
        }
    }
}
