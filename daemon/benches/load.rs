//! Sustained load on a cluster of real `tandemd` processes (this build, release profile) on
//! loopback: three paired daemons, `BENCH_WRITERS` writers each (default 8) writing through
//! the HTTP API for `BENCH_SECS` seconds (default 60), each writer to its own document, one
//! new key per write (`PUT /v1/docs/{id}?path=/k<n>`), one request after another, or at most
//! `BENCH_RATE` writes per second per writer when set (writers then spread evenly over the
//! period, not in lockstep). Every node's `GET /v1/events` stream is
//! read throughout; an event names the keys it touched, so each write is matched to the moment
//! it arrived on each other node.
//!
//! Reported: acknowledged writes per second for the cluster, and replication lag p50/p99/max
//! (a write sent on one node to its event on another).
//!
//! `cargo bench -p tandem --bench load`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
mod tandemd;
use common::env_usize;
use tandemd::Daemon;

/// Per node and document, the highest key seen so far and when, one entry per event that
/// raised it.
type Seen = HashMap<(usize, String), Vec<(u64, Instant)>>;

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let writers = env_usize("BENCH_WRITERS", 8);
    let secs = env_usize("BENCH_SECS", 60) as u64;
    let rate = env_usize("BENCH_RATE", 0);
    let tmp = tempfile::tempdir().unwrap();
    let nodes: Vec<Arc<Daemon>> = ["a", "b", "c"]
        .iter()
        .map(|n| Arc::new(Daemon::start(tmp.path().join(n), None)))
        .collect();
    for n in &nodes[1..] {
        let token = nodes[0].json("POST", "/v1/invite", Some(json!({})))["token"].clone();
        n.json("POST", "/v1/join", Some(json!({ "token": token })));
    }
    let start = Instant::now();
    while !nodes.iter().all(|n| {
        n.json("GET", "/v1/peers", None)
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["connected"] == true)
            .count()
            == 2
    }) {
        assert!(start.elapsed() < Duration::from_secs(30), "pairing");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Each writer's document, made on its node and loaded everywhere (as an app watching it
    // would have it), so every event carries the paths it touched.
    let docs: Vec<(usize, String)> = (0..nodes.len())
        .flat_map(|n| (0..writers).map(move |_| n))
        .map(|n| {
            let id = nodes[n].json("POST", "/v1/docs", Some(json!({})))["id"]
                .as_str()
                .unwrap()
                .to_string();
            (n, id)
        })
        .collect();
    let start = Instant::now();
    for (_, id) in &docs {
        for n in &nodes {
            while n.req("GET", &format!("/v1/docs/{id}")).call().is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "documents spread"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    // One event reader per node.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    for (i, n) in nodes.iter().enumerate() {
        let resp = n.req("GET", "/v1/events").call().unwrap();
        let seen = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(resp.into_reader()).lines() {
                let Ok(line) = line else { break };
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                    continue;
                };
                let (Some(doc), Some(paths)) = (v["doc"].as_str(), v["paths"].as_array()) else {
                    continue;
                };
                let top = paths
                    .iter()
                    .filter_map(|p| p.as_str()?.strip_prefix("/k")?.parse::<u64>().ok())
                    .max();
                if let Some(top) = top {
                    let mut seen = seen.lock().unwrap();
                    let e = seen.entry((i, doc.to_string())).or_default();
                    if e.last().is_none_or(|(k, _)| *k < top) {
                        e.push((top, now));
                    }
                }
            }
        });
    }
    std::thread::sleep(Duration::from_millis(300));

    // The writers: (node, doc, key, sent) for every acknowledged write.
    let began = Instant::now();
    let deadline = began + Duration::from_secs(secs);
    let acked: Vec<(usize, String, u64, Instant)> = std::thread::scope(|s| {
        let writers = docs.len();
        let handles: Vec<_> = docs
            .iter()
            .enumerate()
            .map(|(w, (n, id))| {
                let node = nodes[*n].clone();
                // Rate-limited writers are spread evenly over the period, as independent
                // writers would be, not fired in lockstep (every daemon writing at the same
                // instant measured that pile-up on two cores, not the path a write takes).
                let phase = w as f64 / writers as f64;
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut k = 0u64;
                    while Instant::now() < deadline {
                        k += 1;
                        if rate > 0 {
                            let due = began
                                + Duration::from_secs_f64((k as f64 - 1.0 + phase) / rate as f64);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        let sent = Instant::now();
                        node.req("PUT", &format!("/v1/docs/{id}?path=/k{k}"))
                            .send_json(json!(k))
                            .unwrap();
                        out.push((*n, id.clone(), k, sent));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = began.elapsed();

    // Wait for the last writes to arrive everywhere (at most 30 s), then match.
    let wait_from = Instant::now();
    let arrived = |seen: &Seen| {
        docs.iter().all(|(origin, id)| {
            let last = acked
                .iter()
                .filter(|(_, d, _, _)| d == id)
                .map(|(_, _, k, _)| *k)
                .max()
                .unwrap_or(0);
            (0..nodes.len()).filter(|n| n != origin).all(|n| {
                seen.get(&(n, id.clone()))
                    .and_then(|v| v.last())
                    .is_some_and(|(k, _)| *k >= last)
            })
        })
    };
    while !arrived(&seen.lock().unwrap()) && wait_from.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = seen.lock().unwrap();
    let mut lags = Vec::new();
    let mut missing = 0usize;
    for (origin, id, k, sent) in &acked {
        for n in (0..nodes.len()).filter(|n| n != origin) {
            let arrival = seen.get(&(n, id.clone())).and_then(|v| {
                let i = v.partition_point(|(top, _)| top < k);
                v.get(i).map(|(_, t)| *t)
            });
            match arrival {
                Some(t) => lags.push(t.saturating_duration_since(*sent)),
                None => missing += 1,
            }
        }
    }
    lags.sort();
    let cpu: Vec<String> = nodes
        .iter()
        .map(|n| format!("{:.1}", n.usage().0))
        .collect();
    println!(
        "tandem load benchmark: 3 paired tandemd processes on loopback, {writers} writers each for {secs} s{}",
        if rate > 0 {
            format!(", at most {rate} writes/s each")
        } else {
            ", each as fast as its writes are acknowledged".to_string()
        }
    );
    println!(
        "  acknowledged writes: {} = {:.0} writes/s for the cluster; daemons' CPU s: {}",
        acked.len(),
        acked.len() as f64 / elapsed.as_secs_f64(),
        cpu.join(", ")
    );
    println!(
        "  replication lag (write sent on one node to its event on another), {} arrivals: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; never arrived: {missing}",
        lags.len(),
        pct(&lags, 0.5).as_secs_f64() * 1e3,
        pct(&lags, 0.99).as_secs_f64() * 1e3,
        lags.last().unwrap().as_secs_f64() * 1e3
    );
}
