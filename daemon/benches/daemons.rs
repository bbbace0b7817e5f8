//! What a user sees, with real `tandemd` processes (this build, release profile) on loopback,
//! against the limit measured in the same run: bare `automerge` + `rusqlite` in one process
//! (decode and check every change, apply each document's changes to a fresh Automerge
//! document, insert the change bytes into SQLite in one transaction, fsynced).
//! Imports run four at a time, as `tandem doc import FILES...` sends them.
//!
//! Workload (as automerge-repo's own benchmarks): `BENCH_DOCS` documents (default 1000), each
//! with an `items` list made in 10 changes, imported into A as `.automerge` files over HTTP.
//! Then a fresh B joins A; measured: time to equal clocks, B's CPU and peak RSS, reading every
//! document on B over HTTP, and `GET /v1/status` on B.
//!
//! `cargo bench -p tandem --bench daemons` (`BENCH_DOCS=10000` for the 10k row;
//! `BENCH_PERF=FILE` runs B under `perf record --call-graph dwarf -o FILE`, for profiles of the
//! sync; its CPU and RSS figures are then perf's; `BENCH_PERF_READS=FILE` profiles B while it
//! serves the reads, `BENCH_PERF_IMPORT=FILE` A while it imports; `BENCH_READ_AFTER=SECS`
//! waits before the reads; `BENCH_TANDEMD=PATH` runs another build's tandemd, to compare builds
//! in one sitting)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use automerge::Automerge;

mod common;
mod tandemd;
use common::env_usize;
use tandemd::{Daemon, make_doc};

/// The limit: the same changes through bare automerge and SQLite in this process.
fn limit(files: &[Vec<u8>], dir: &Path) -> Duration {
    // The change bytes, as they would arrive.
    let changes: Vec<Vec<Vec<u8>>> = files
        .iter()
        .map(|f| {
            Automerge::load(f)
                .unwrap()
                .get_changes(&[])
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect()
        })
        .collect();
    let mut db = rusqlite::Connection::open(dir.join("limit.db")).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "synchronous", "FULL").unwrap();
    db.execute_batch(
        "CREATE TABLE c (doc INTEGER, seq INTEGER, change BLOB, PRIMARY KEY (doc, seq))",
    )
    .unwrap();
    let start = Instant::now();
    let tx = db.transaction().unwrap();
    {
        let mut ins = tx
            .prepare("INSERT INTO c (doc, seq, change) VALUES (?1, ?2, ?3)")
            .unwrap();
        for (d, doc_changes) in changes.iter().enumerate() {
            let mut am = Automerge::new();
            let parsed: Vec<automerge::Change> = doc_changes
                .iter()
                .map(|b| {
                    let c = automerge::Change::try_from(b.as_slice()).unwrap();
                    assert_eq!(&b[4..8], &c.hash().0[..4], "checksum");
                    c
                })
                .collect();
            am.apply_changes(parsed).unwrap();
            for (s, b) in doc_changes.iter().enumerate() {
                ins.execute(rusqlite::params![d as i64, s as i64, b])
                    .unwrap();
            }
        }
    }
    tx.commit().unwrap();
    start.elapsed()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let docs = env_usize("BENCH_DOCS", 1000);
    let tmp = tempfile::tempdir().unwrap();
    let files: Vec<Vec<u8>> = (0..docs).map(make_doc).collect();
    let limit = limit(&files, tmp.path());

    let a = Daemon::start(tmp.path().join("a"), None);
    // As `tandem doc import FILES...` does: a few imports in flight at once.
    let perf_import = std::env::var("BENCH_PERF_IMPORT")
        .ok()
        .map(|f| a.perf_attach(&f));
    let start = Instant::now();
    let ids = tandemd::import_all(&a, &files);
    let import = start.elapsed();
    if let Some(p) = perf_import {
        tandemd::stop_perf(p);
    }
    let (_, a_rss) = a.usage();
    let target = a.digest();

    let perf = std::env::var("BENCH_PERF").ok();
    let b = Daemon::start(tmp.path().join("b"), perf.as_deref());
    let sync = b.join_until(&a, &target);
    let (b_cpu, b_rss) = b.usage();

    if perf.is_some() {
        // The profile is of the sync alone.
        println!(
            "  join to equal clocks: {:.3} s (under perf)",
            sync.as_secs_f64()
        );
        return;
    }
    // `BENCH_READ_AFTER=SECS`: read once B has had that long to compact what it received
    // (by default the reads start at once, as a user's would, racing the compactor).
    if let Ok(secs) = std::env::var("BENCH_READ_AFTER") {
        std::thread::sleep(Duration::from_secs(secs.parse().unwrap()));
    }
    let perf_reads = std::env::var("BENCH_PERF_READS")
        .ok()
        .map(|f| b.perf_attach(&f));
    let (b_cpu_before, _) = b.usage();
    let start = Instant::now();
    for id in &ids {
        b.get(&format!("/v1/docs/{id}"));
    }
    let read = start.elapsed();
    let b_cpu_read = b.usage().0 - b_cpu_before;
    if let Some(p) = perf_reads {
        tandemd::stop_perf(p);
    }
    let (_, b_rss_read) = b.usage();
    // The last 1,000 read again: still loaded (the cache holds 1,024 documents), so what HTTP
    // and JSON cost without the load.
    let recent = &ids[ids.len().saturating_sub(1000)..];
    let start = Instant::now();
    for id in recent {
        b.get(&format!("/v1/docs/{id}"));
    }
    let hot = start.elapsed() / recent.len().max(1) as u32;

    // Median of 50 requests, body read.
    let median_ms = |path: &str| {
        let mut took: Vec<Duration> = (0..50)
            .map(|_| {
                let t = Instant::now();
                b.get(path);
                t.elapsed()
            })
            .collect();
        took.sort();
        took[took.len() / 2].as_secs_f64() * 1e3
    };
    let (status, metrics) = (median_ms("/v1/status"), median_ms("/metrics"));

    println!(
        "tandem daemons benchmark: two real tandemd processes on loopback, {docs} docs x 10 changes"
    );
    println!(
        "  limit (bare automerge + SQLite, one process): {:.3} s",
        limit.as_secs_f64()
    );
    println!(
        "  join to equal clocks: {:.3} s = {:.2}x the limit; B CPU {b_cpu:.2} s, B peak RSS {b_rss:.0} MB",
        sync.as_secs_f64(),
        sync.as_secs_f64() / limit.as_secs_f64()
    );
    println!(
        "  import on A over HTTP: {:.0} docs/s; A peak RSS {a_rss:.0} MB",
        docs as f64 / import.as_secs_f64()
    );
    println!(
        "  read every doc on B over HTTP: {:.3} ms per doc (B CPU {:.3} ms per doc); B peak RSS after {b_rss_read:.0} MB; a loaded doc again: {:.3} ms",
        read.as_secs_f64() * 1e3 / docs as f64,
        b_cpu_read * 1e3 / docs as f64,
        hot.as_secs_f64() * 1e3
    );
    println!("  GET /v1/status on B: median {status:.3} ms; GET /metrics: median {metrics:.3} ms");
}
