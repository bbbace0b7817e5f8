//! Write and open benchmarks for `tandem::Node`, printed as one table from one run.
//!
//! `cargo bench -p tandem --bench node` (env `BENCH_WRITES`, default 20000; `BENCH_DOCS`,
//! default 10000). It measures:
//! - sequential acknowledged writes/s (one task, each write durable before the next);
//! - 16 concurrent writers' acknowledged writes/s (group commit shares fsyncs);
//! - bare Automerge commits/s of the same edits, no storage: the limit;
//! - cold open of a node holding `BENCH_DOCS` documents: time and peak RSS, in a fresh process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use automerge::Automerge;
use serde_json::json;
use tandem::crdt::{Pointer, pointer};
use tandem::{Config, Node};

mod common;
use common::env_usize;

/// The edits measured; every variant (bare Automerge, sequential, concurrent) makes the same.
#[derive(Clone, Copy, Debug)]
enum Edit {
    /// Set `/n` to `i`: the smallest possible change.
    Scalar,
    /// Append a to-do item `{"title": "item i", "done": false}` to `/items`.
    TodoItem,
}

impl Edit {
    fn path(self) -> &'static str {
        match self {
            Edit::Scalar => "/n",
            Edit::TodoItem => "/items/-",
        }
    }

    fn value(self, i: usize) -> serde_json::Value {
        match self {
            Edit::Scalar => json!(i),
            Edit::TodoItem => json!({"title": format!("item {i}"), "done": false}),
        }
    }

    fn initial() -> serde_json::Value {
        json!({"items": []})
    }

    async fn apply(self, node: &Node, doc: tandem::DocId, i: usize) {
        match self {
            Edit::Scalar => node.put(doc, self.path(), self.value(i)).await.unwrap(),
            Edit::TodoItem => node.insert(doc, self.path(), self.value(i)).await.unwrap(),
        }
    }
}

/// Bare Automerge commits; with `extract`, also fetch each commit's change bytes (what any
/// store or sync must do, and what `get_last_local_change` recomputes from the op set).
fn bare_automerge(edit: Edit, writes: usize, docs: usize, extract: bool) -> f64 {
    let mut ams: Vec<Automerge> = (0..docs)
        .map(|_| {
            let mut am = Automerge::new();
            am.transact(|tx| pointer::put(tx, &Pointer::root(), &Edit::initial()))
                .unwrap();
            am
        })
        .collect();
    let p = Pointer::parse(edit.path()).unwrap();
    let start = Instant::now();
    for i in 0..writes {
        let am = &mut ams[i % docs];
        am.transact(|tx| match edit {
            Edit::Scalar => pointer::put(tx, &p, &edit.value(i)),
            Edit::TodoItem => pointer::insert(tx, &p, &edit.value(i)),
        })
        .unwrap();
        if extract {
            let change = am.get_last_local_change().unwrap();
            std::hint::black_box(change.raw_bytes().to_vec());
        }
    }
    writes as f64 / start.elapsed().as_secs_f64()
}

async fn sequential(node: &Node, edit: Edit, writes: usize) -> f64 {
    let doc = node.create(Some(Edit::initial())).await.unwrap();
    let start = Instant::now();
    for i in 0..writes {
        edit.apply(node, doc, i).await;
    }
    writes as f64 / start.elapsed().as_secs_f64()
}

async fn concurrent(node: &Node, edit: Edit, writers: usize, writes: usize) -> f64 {
    let mut docs = Vec::new();
    for _ in 0..writers {
        docs.push(node.create(Some(Edit::initial())).await.unwrap());
    }
    let per = writes / writers;
    let start = Instant::now();
    let tasks: Vec<_> = docs
        .into_iter()
        .map(|doc| {
            let node = node.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    edit.apply(&node, doc, i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    (per * writers) as f64 / start.elapsed().as_secs_f64()
}

fn writer_counts(node: &Node) -> (u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = node.writer_stats();
    (
        s.commits.load(Relaxed),
        s.writes.load(Relaxed),
        s.commit_micros.load(Relaxed),
    )
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Child mode: open the node, list its documents, read one, report time and peak RSS.
async fn child_open(dir: &str) {
    let start = Instant::now();
    let node = Node::open(Config::new(dir)).await.unwrap();
    let opened = start.elapsed();
    let list = node.list().await.unwrap();
    let first = node.get(list[0].id, "").await.unwrap();
    let listed = start.elapsed();
    assert!(first.is_object());
    println!(
        "{} {} {} {}",
        list.len(),
        opened.as_micros(),
        listed.as_micros(),
        peak_rss_kib()
    );
}

async fn populate(dir: &std::path::Path, docs: usize) -> Duration {
    let node = Node::open(Config::new(dir)).await.unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let node = node.clone();
            tokio::spawn(async move {
                for i in (w..docs).step_by(16) {
                    let doc = node
                        .create(Some(
                            json!({"title": format!("doc {i}"), "items": [1, 2, 3]}),
                        ))
                        .await
                        .unwrap();
                    node.put(doc, "/n", json!(i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = start.elapsed();
    node.close().await.unwrap();
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child-open") {
        child_open(&args[i + 1]).await;
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes harness=false benches
    }
    let writes = env_usize("BENCH_WRITES", 20_000);
    let docs = env_usize("BENCH_DOCS", 10_000);
    let dir = tempfile::tempdir().unwrap();

    let mut durability = tandem::Durability::Full;
    if std::env::var("BENCH_DURABILITY").as_deref() == Ok("normal") {
        durability = tandem::Durability::Normal;
    }
    let mut rows = Vec::new();
    for edit in [Edit::Scalar, Edit::TodoItem] {
        let bare = bare_automerge(edit, writes, 16, false);
        let extract = bare_automerge(edit, writes, 16, true);
        let mut cfg = Config::new(dir.path().join(format!("{edit:?}")));
        cfg.durability = durability;
        if let Some(n) = std::env::var("BENCH_COMPACT_AFTER")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            cfg.compact_after = n;
        }
        let node = Node::open(cfg).await.unwrap();
        let seq = sequential(&node, edit, writes / 4).await;
        let (c0, w0, m0) = writer_counts(&node);
        let conc = concurrent(&node, edit, 16, writes).await;
        let (c1, w1, m1) = writer_counts(&node);
        let commits = (c1 - c0).max(1) as f64;
        eprintln!(
            "{edit:?}: 16 writers: {:.1} writes per commit, {:.0} us per commit",
            (w1 - w0) as f64 / commits,
            (m1 - m0) as f64 / commits
        );
        node.close().await.unwrap();
        rows.push((edit, bare, extract, seq, conc));
    }

    let big = dir.path().join("big");
    let fill = populate(&big, docs).await;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--child-open", big.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<u64> = text
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    assert_eq!(
        f.len(),
        4,
        "child said: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    println!(
        "tandem node benchmark (durability={durability:?}, {writes} writes, 2 worker threads)"
    );
    for (edit, bare, extract, seq, conc) in rows {
        println!("  edit {edit:?}:");
        println!("    bare automerge commits (limit)    {bare:>10.0} /s");
        println!("    bare commits + change bytes       {extract:>10.0} /s");
        println!(
            "    sequential acknowledged writes    {seq:>10.0} /s   ({:.1}% of limit)",
            100.0 * seq / bare
        );
        println!(
            "    16 writers acknowledged writes    {conc:>10.0} /s   ({:.1}% of limit; target >= 60%)",
            100.0 * conc / bare
        );
    }
    println!(
        "  populate {docs} docs (2 writes each)  {:>10.2} s",
        fill.as_secs_f64()
    );
    println!(
        "  cold open of {} docs: open {:.1} ms, open+list+read {:.1} ms, peak RSS {:.1} MB (target < 100 MB)",
        f[0],
        f[1] as f64 / 1000.0,
        f[2] as f64 / 1000.0,
        f[3] as f64 / 1024.0
    );
}
