//! The local API's cost over the library it wraps, printed from one run (durability Full):
//! - sequential writes: `Node::put` in-process against `PUT /v1/docs/{id}` over HTTP with a
//!   kept-alive connection, and against `tandem doc put` (a process per write, as a shell
//!   script would);
//! - 16 concurrent writers, in-process against HTTP (group commit must still share fsyncs);
//! - latency: p50 / p99 from sending an HTTP write to its reply, and to its `change` event
//!   arriving on a `GET /v1/events` stream.
//!
//! `cargo bench -p tandem --bench api` (set `BENCH_WRITES`, default 1000)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::BufRead as _;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem::{Config, Node};

mod common;
use common::env_usize;

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().max_idle_connections(64).build()
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_WRITES", 1000);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(Config::new(dir.path())).await.unwrap();
    let token = "bench-token".to_string();
    let (addr, _task) = tandem::api::serve(
        node.clone(),
        "127.0.0.1:0".parse().unwrap(),
        token.clone(),
        Vec::new(),
        std::future::pending(),
    )
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let bearer = format!("Bearer {token}");
    let doc = node.create(Some(json!({"n": 0}))).await.unwrap();

    // Sequential, in-process and over HTTP (one kept-alive connection), interleaved in rounds
    // on two documents so both see the same database size, WAL and compaction load.
    let http_doc = node.create(Some(json!({"n": 0}))).await.unwrap();
    let url = format!("{base}/v1/docs/{http_doc}?path=/n");
    let rounds = 10;
    let per_round = (n / rounds).max(1);
    let (mut t_direct, mut t_http) = (Duration::ZERO, Duration::ZERO);
    let a = agent();
    for r in 0..rounds {
        let t = Instant::now();
        for i in 0..per_round {
            node.put(doc, "/n", json!(r * per_round + i)).await.unwrap();
        }
        t_direct += t.elapsed();
        let (a2, b2, u2) = (a.clone(), bearer.clone(), url.clone());
        t_http += tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            for i in 0..per_round {
                a2.put(&u2)
                    .set("Authorization", &b2)
                    .send_json(json!(r * per_round + i))
                    .unwrap();
            }
            t.elapsed()
        })
        .await
        .unwrap();
    }
    let direct = rate(rounds * per_round, t_direct);
    let http = rate(rounds * per_round, t_http);

    // Sequential reads over HTTP: the request/response cost alone, no commit.
    let (b4, u4) = (bearer.clone(), url.clone());
    let http_read = tokio::task::spawn_blocking(move || {
        let a = agent();
        let t = Instant::now();
        for _ in 0..n {
            // Body read: an unread response costs its connection.
            a.get(&u4)
                .set("Authorization", &b4)
                .call()
                .unwrap()
                .into_string()
                .unwrap();
        }
        rate(n, t.elapsed())
    })
    .await
    .unwrap();

    // Sequential: the CLI, a process per write (needs the built binary; skipped otherwise).
    let cli = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("tandem")))
        .filter(|p| p.exists());
    let cli_rate = match &cli {
        Some(bin) => {
            tandem::api::write_api_file(dir.path(), addr).unwrap();
            std::fs::write(dir.path().join(tandem::api::TOKEN_FILE), &token).unwrap();
            let m = (n / 10).max(20);
            let t = Instant::now();
            for i in 0..m {
                let ok = std::process::Command::new(bin)
                    .arg("--data-dir")
                    .arg(dir.path())
                    .args(["doc", "put", &doc.to_string(), "/n", &i.to_string()])
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
            }
            Some(rate(m, t.elapsed()))
        }
        None => None,
    };

    // 16 concurrent writers on 16 documents.
    let writers = 16;
    let mut docs = Vec::new();
    for _ in 0..writers {
        docs.push(node.create(Some(json!({"n": 0}))).await.unwrap());
    }
    let per = n / writers;
    let t = Instant::now();
    let tasks: Vec<_> = docs
        .iter()
        .map(|&d| {
            let node = node.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    node.put(d, "/n", json!(i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let direct16 = rate(per * writers, t.elapsed());
    let t = Instant::now();
    let threads: Vec<_> = docs
        .iter()
        .map(|d| {
            let url = format!("{base}/v1/docs/{d}?path=/n");
            let bearer = bearer.clone();
            std::thread::spawn(move || {
                let a = agent();
                for i in 0..per {
                    a.put(&url)
                        .set("Authorization", &bearer)
                        .send_json(json!(i))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let http16 = rate(per * writers, t.elapsed());

    // Event latency over SSE.
    let samples = (n / 5).max(50);
    let (b3, u3, base3) = (bearer.clone(), url.clone(), base.clone());
    let lat = tokio::task::spawn_blocking(move || {
        let resp = ureq::get(&format!("{base3}/v1/events?doc={http_doc}"))
            .set("Authorization", &b3)
            .call()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Instant>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(resp.into_reader()).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("data:") && tx.send(Instant::now()).is_err() {
                    break;
                }
            }
        });
        let a = agent();
        // Warm up until the stream is live.
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no events arrive"
            );
            // A new value each time: rewriting the same value is no change and no event.
            a.put(&u3)
                .set("Authorization", &b3)
                .send_json(json!(-(start.elapsed().as_nanos() as i64)))
                .unwrap();
            if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
                break;
            }
        }
        while rx.try_recv().is_ok() {}
        let (mut to_ack, mut to_event) = (Vec::new(), Vec::new());
        for i in 0..samples {
            let sent = Instant::now();
            a.put(&u3)
                .set("Authorization", &b3)
                .send_json(json!(i))
                .unwrap();
            to_ack.push(sent.elapsed());
            let seen = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            to_event.push(seen.saturating_duration_since(sent));
        }
        to_ack.sort();
        to_event.sort();
        (to_ack, to_event)
    })
    .await
    .unwrap();
    let (to_ack, to_event) = lat;
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];

    println!("api bench, durability Full, {n} writes per row");
    println!("sequential writes:");
    println!("  in-process Node::put     {direct:>9.0}/s");
    println!(
        "  HTTP PUT (keep-alive)    {http:>9.0}/s   {:.1}% of in-process",
        100.0 * http / direct
    );
    println!("  HTTP GET (no commit)     {http_read:>9.0}/s   the HTTP round trip alone");
    match cli_rate {
        Some(r) => println!(
            "  tandem doc put (process){r:>9.0}/s   {:.1}% of in-process",
            100.0 * r / direct
        ),
        None => println!("  tandem doc put           skipped: build the workspace first"),
    }
    println!("16 concurrent writers:");
    println!("  in-process               {direct16:>9.0}/s");
    println!(
        "  HTTP                     {http16:>9.0}/s   {:.1}% of in-process",
        100.0 * http16 / direct16
    );
    println!("latency from sending an HTTP write ({samples} samples; the commit included):");
    println!(
        "  to its 204 reply             p50 {:?}, p99 {:?}",
        pct(&to_ack, 0.50),
        pct(&to_ack, 0.99)
    );
    println!(
        "  to its event on /v1/events   p50 {:?}, p99 {:?}",
        pct(&to_event, 0.50),
        pct(&to_event, 0.99)
    );
    node.close().await.unwrap();
}
