//! One document with a long history, with real `tandemd` processes (this build, release profile)
//! on loopback, against Automerge itself in the same run.
//!
//! The document is an editing trace like automerge's own `essay` benchmark: one text typed a
//! keystroke per change (`BENCH_CHANGES` changes, default 262,961 as in that trace), with
//! backspaces and cursor jumps from a seeded generator. Measured in a child process (so its
//! peak RSS is its own): `Automerge::load` of the saved file. Then the file is imported into A
//! (`POST /v1/docs/import`), a fresh B joins, and the bench measures the time to equal clocks,
//! B's CPU and peak RSS, and B reading the document back.
//!
//! `cargo bench -p tandem --bench history` (`BENCH_PERF=FILE` profiles B's sync with `perf record
//! --call-graph dwarf`, `BENCH_PERF_A=FILE` A's)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc};

mod common;
mod tandemd;
use common::env_usize;
use tandemd::Daemon;

/// A typing trace: mostly inserts at the cursor, some backspaces, now and then a jump.
fn make_trace(changes: usize) -> Vec<u8> {
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let text = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
    tx.commit();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut len, mut cursor) = (0usize, 0usize);
    for _ in 1..changes {
        let r = next();
        let mut tx = doc.transaction();
        match r % 100 {
            0..=84 => {
                let c = (b'a' + (r >> 8) as u8 % 26) as char;
                let c = if (r >> 16) % 6 == 0 { ' ' } else { c };
                tx.splice_text(&text, cursor, 0, &c.to_string()).unwrap();
                cursor += 1;
                len += 1;
            }
            85..=96 if cursor > 0 => {
                tx.splice_text(&text, cursor - 1, 1, "").unwrap();
                cursor -= 1;
                len -= 1;
            }
            _ => {
                cursor = ((r >> 20) as usize) % (len + 1);
                // A jump alone is no change; type one character there.
                tx.splice_text(&text, cursor, 0, "x").unwrap();
                cursor += 1;
                len += 1;
            }
        }
        tx.commit();
    }
    doc.save()
}

/// Peak RSS of this process in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // The child: load the file with Automerge, report time and peak RSS.
    if let Some(i) = args.iter().position(|a| a == "--load") {
        let bytes = std::fs::read(&args[i + 1]).unwrap();
        let start = Instant::now();
        let doc = Automerge::load(&bytes).unwrap();
        let took = start.elapsed();
        assert!(doc.length(doc.get(ROOT, "text").unwrap().unwrap().1) > 0);
        println!("{} {}", took.as_secs_f64(), peak_rss_mb());
        return;
    }

    let changes = env_usize("BENCH_CHANGES", 262_961);
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let file = make_trace(changes);
    let made = start.elapsed();
    let path = tmp.path().join("essay.automerge");
    std::fs::write(&path, &file).unwrap();

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--load")
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8(out.stdout).unwrap();
    let mut it = out.split_whitespace().map(|s| s.parse::<f64>().unwrap());
    let (am_load, am_rss) = (it.next().unwrap(), it.next().unwrap());

    let a = Daemon::start(tmp.path().join("a"), None);
    let start = Instant::now();
    let id = a
        .req("POST", "/v1/docs/import")
        .send_bytes(&file)
        .unwrap()
        .into_json::<serde_json::Value>()
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let import = start.elapsed();
    let target = a.digest();

    let perf = std::env::var("BENCH_PERF").ok();
    let b = Daemon::start(tmp.path().join("b"), perf.as_deref());
    // `BENCH_PERF_A=FILE` profiles A (the sender) during the sync.
    let perf_a = std::env::var("BENCH_PERF_A")
        .ok()
        .map(|f| a.perf_attach(&f));
    let (a_cpu_before, _) = a.usage();
    let sync = b.join_until(&a, &target);
    let a_cpu = a.usage().0 - a_cpu_before;
    // Before perf takes its time to stop: B compacts the document once the sync is quiet.
    let (b_cpu, b_rss) = b.usage();
    if let Some(p) = perf_a {
        tandemd::stop_perf(p);
    }
    if perf.is_some() {
        // The profile is of the sync alone.
        println!(
            "  join to equal clocks: {:.3} s (under perf)",
            sync.as_secs_f64()
        );
        return;
    }
    // B's writer thread: how long its commits took, and how many.
    let metrics = b.get("/metrics");
    let metric = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let (commit_s, commits) = (
        metric("tandem_commit_duration_seconds_sum"),
        metric("tandem_commit_duration_seconds_count"),
    );
    let start = Instant::now();
    b.get(&format!("/v1/docs/{id}"));
    let read = start.elapsed();
    let (_, b_rss_read) = b.usage();

    println!(
        "tandem history benchmark: one text document of {changes} changes ({} KB saved; made in {:.1} s)",
        file.len() / 1024,
        made.as_secs_f64()
    );
    println!("  Automerge::load in one process: {am_load:.3} s, peak RSS {am_rss:.0} MB");
    println!("  import on A over HTTP: {:.3} s", import.as_secs_f64());
    println!(
        "  fresh B joins, to equal clocks: {:.3} s = {:.2}x the load; B CPU {b_cpu:.2} s (A {a_cpu:.2} s), B peak RSS {b_rss:.0} MB = {:.2}x",
        sync.as_secs_f64(),
        sync.as_secs_f64() / am_load,
        b_rss / am_rss
    );
    println!("  B's commits: {commits} taking {commit_s:.3} s");
    println!(
        "  first read on B: {:.3} s; B peak RSS after {b_rss_read:.0} MB",
        read.as_secs_f64()
    );
}
