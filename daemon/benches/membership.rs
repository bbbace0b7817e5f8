//! Membership with real `tandemd` processes (this build, release profile) on loopback: the time
//! from `join` to every member listing the newcomer, and from `members rm` to every member
//! refusing it (gone from its list, disconnected), p50/p99 over `BENCH_JOINS` (default 20)
//! newcomers into clusters of 3 and 5 members. Each newcomer is invited by a different member
//! (not always the leader, so admissions are forwarded too) and removed by another.
//!
//! `cargo bench -p tandem --bench membership`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
mod tandemd;
use common::env_usize;
use tandemd::Daemon;

fn id(d: &Daemon) -> String {
    d.json("GET", "/v1/status", None)["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn lists(d: &Daemon, who: &str) -> bool {
    d.json("GET", "/v1/members", None)
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == who)
}

fn connected(d: &Daemon, who: &str) -> bool {
    d.json("GET", "/v1/peers", None)
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == who && p["connected"] == true)
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn join(n: &Daemon, by: &Daemon) {
    let token = by.json("POST", "/v1/invite", Some(json!({})))["token"].clone();
    n.json("POST", "/v1/join", Some(json!({ "token": token })));
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let joins = env_usize("BENCH_JOINS", 20);
    let tmp = tempfile::tempdir().unwrap();
    for size in [3usize, 5] {
        let nodes: Vec<Daemon> = (0..size)
            .map(|i| Daemon::start(tmp.path().join(format!("c{size}-{i}")), None))
            .collect();
        for n in &nodes[1..] {
            join(n, &nodes[0]);
        }
        let ids: Vec<String> = nodes.iter().map(id).collect();
        for (k, n) in nodes.iter().enumerate() {
            wait("the cluster to form", || {
                ids.iter()
                    .enumerate()
                    .all(|(i, other)| i == k || lists(n, other))
            });
        }
        wait("every member a voter", || {
            nodes[0].json("GET", "/v1/status", None)["membership"]["voters"]
                .as_array()
                .is_some_and(|v| v.len() == size)
        });
        let (mut admit, mut remove) = (Vec::new(), Vec::new());
        for j in 0..joins {
            let newcomer = Daemon::start(tmp.path().join(format!("n{size}-{j}")), None);
            let nid = id(&newcomer);
            let start = Instant::now();
            join(&newcomer, &nodes[j % size]);
            for n in &nodes {
                wait("every member to list the newcomer", || lists(n, &nid));
            }
            admit.push(start.elapsed());
            wait("connected", || nodes.iter().all(|n| connected(n, &nid)));
            let start = Instant::now();
            let by = &nodes[(j + 1) % size];
            by.json("DELETE", &format!("/v1/members/{nid}"), None);
            for n in &nodes {
                wait("every member to refuse it", || {
                    !lists(n, &nid) && !connected(n, &nid)
                });
            }
            remove.push(start.elapsed());
            drop(newcomer);
        }
        let s: Value = nodes[0].json("GET", "/v1/status", None)["membership"].clone();
        println!(
            "{size} members ({} voters), {joins} joins: join to listed everywhere p50 {:.0} ms, p99 {:.0} ms; \
             rm to refused everywhere p50 {:.0} ms, p99 {:.0} ms",
            s["voters"].as_array().map_or(0, |v| v.len()),
            pct(&mut admit, 0.5).as_secs_f64() * 1e3,
            pct(&mut admit, 0.99).as_secs_f64() * 1e3,
            pct(&mut remove, 0.5).as_secs_f64() * 1e3,
            pct(&mut remove, 0.99).as_secs_f64() * 1e3,
        );
    }
}
