//! Anti-entropy on the simulator: push frames are lost at random after the sessions accounted
//! for them (as a bug in the push path would lose them), no connection ever breaks, so nothing
//! but the clock digests can notice. Every run must still converge within [`BOUND_MS`].
//!
//! Figures are printed (`cargo test -p tandem-sim --test entropy -- --nocapture`);
//! `ENTROPY_SEEDS=N` runs more seeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tandem_crdt::session::Fault;
use tandem_sim::{Ms, Rng, Sim};

/// Convergence after the last write, with 20% of push frames lost and 5% of digests lost.
const BOUND_MS: Ms = 15_000;

fn seeds() -> u64 {
    std::env::var("ENTROPY_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// One run: `n` nodes connect, 60 writes at random nodes over ~3 s, with pushes lost; then
/// the time from the last write until every node holds the same deltas and documents (`None`
/// if not within the bound).
fn run(seed: u64, entropy: bool) -> (usize, Option<Ms>, u64) {
    let mut rng = Rng(seed ^ 0xe47);
    let n = 2 + rng.below(7) as usize; // 2..=8 nodes
    let docs = 1 + rng.below(3) as usize;
    let mut sim = Sim::new(seed, n, Fault::None);
    sim.loss = 0.0; // no connection breaks: no reconnect repairs anything
    sim.feed_loss = 0.0; // nor does a lagging feed's repair
    sim.push_loss = 0.2;
    sim.entropy = entropy;
    sim.run_until(500);
    for _ in 0..60 {
        let at = rng.below(n as u64) as usize;
        sim.local_write(at, docs);
        let t = sim.now + rng.below(100);
        sim.run_until(t);
    }
    let last = sim.now;
    while sim.now < last + BOUND_MS {
        let t = sim.now + 50;
        sim.run_until(t);
        sim.check_safety()
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if sim.check(docs).is_ok() {
            let exchanges = sim.nodes.iter().map(|x| x.entropy.exchanges()).sum();
            return (n, Some(sim.now - last), exchanges);
        }
    }
    if std::env::var("ENTROPY_DEBUG").is_ok() {
        eprintln!("seed {seed}: {:?}\n{}", sim.check(docs), sim.dump());
        for (i, x) in sim.nodes.iter().enumerate() {
            let ag: Vec<bool> = sim.nodes.iter().map(|y| x.entropy.agrees(&y.id)).collect();
            eprintln!(
                "node {i}: exchanges {} dropped {:?} agrees {ag:?}",
                x.entropy.exchanges(),
                x.entropy.dropped()
            );
        }
    }
    (n, None, 0)
}

#[test]
fn lost_pushes_are_repaired_by_digests_alone() {
    let mut times = Vec::new();
    let mut exchanges = 0;
    for seed in 0..seeds() {
        let (n, took, x) = run(seed, true);
        let took = took.unwrap_or_else(|| {
            panic!("seed {seed} ({n} nodes): not converged {BOUND_MS} ms after the last write")
        });
        times.push(took);
        exchanges += x;
    }
    times.sort_unstable();
    let p = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!(
        "anti-entropy, 20% pushes lost, {} seeds of 2-8 nodes: converged after the last write p50 {} ms, p99 {} ms, max {} ms; {:.1} exchanges per run",
        times.len(),
        p(0.5),
        p(0.99),
        p(1.0),
        exchanges as f64 / times.len() as f64
    );
}

/// The same runs without anti-entropy do not converge: what repaired them above was the
/// digests, not something else in the harness.
#[test]
fn without_digests_lost_pushes_stay_lost() {
    let stuck = (0..10).filter(|s| run(*s, false).1.is_none()).count();
    println!(
        "without anti-entropy: {stuck} of 10 runs still apart {BOUND_MS} ms after the last write"
    );
    assert!(stuck >= 8, "only {stuck} of 10 runs stayed apart");
}

/// Idle digest bytes per second per node for 3, 10 and 50 nodes: every member holds the same
/// clock (one origin per node), is connected to every other and in sync, and has its own
/// addresses in the book (measured after the entries, all new at the start, have spread). (SWIM's own idle bytes are in `tests/gossip.rs`.)
#[test]
fn idle_digest_cost() {
    use std::time::{Duration, Instant};
    use tandem_crdt::VersionVector;
    use tandem_crdt::entropy::{Entropy, EntropyConfig, EntropyOutput, Link};
    use tandem_crdt::{NodeId, Signer};
    for n in [3usize, 10, 50] {
        let t = Instant::now();
        let keys: Vec<Signer> = (0..n)
            .map(|i| {
                let mut b = [0u8; 32];
                b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                Signer::from_seed(b)
            })
            .collect();
        let ids: Vec<NodeId> = keys.iter().map(Signer::id).collect();
        let mut clock = VersionVector::new();
        for id in &ids {
            clock.insert_range(*id, 1, 1_000);
        }
        let mut nodes: Vec<Entropy> = (0..n)
            .map(|i| {
                let mut e = Entropy::new(ids[i], EntropyConfig::default(), i as u64, t);
                e.set_members(ids.iter().copied());
                e.set_clock(&clock);
                e.set_own_addrs(
                    &keys[i],
                    1,
                    vec![
                        format!("10.0.{}.{}:7000", i / 250, i % 250 + 1)
                            .parse()
                            .unwrap(),
                    ],
                );
                e.set_links(ids.iter().filter(|x| **x != ids[i]).map(|x| {
                    (
                        *x,
                        Link {
                            rtt: Duration::from_millis(1),
                            busy: false,
                            in_sync: true,
                        },
                    )
                }));
                e
            })
            .collect();
        let index = |id: &NodeId| ids.iter().position(|x| x == id).unwrap();
        let (mut bytes, mut exchanges) = (0u64, 0u64);
        // After a warm-up in which every address entry is new (and spread first).
        let (warm, secs) = (240, 120);
        let mut now = t;
        while now < t + Duration::from_secs(warm + secs) {
            now += Duration::from_millis(250);
            if now < t + Duration::from_secs(warm) {
                bytes = 0;
            }
            for i in 0..n {
                nodes[i].handle_timeout(now);
                while let Some(o) = nodes[i].poll_output() {
                    match o {
                        EntropyOutput::Send { to, packet } => {
                            bytes += packet.len() as u64;
                            let from = ids[i];
                            nodes[index(&to)].handle_datagram(now, from, &packet);
                        }
                        EntropyOutput::Exchange { .. } => exchanges += 1,
                        _ => {}
                    }
                }
            }
        }
        let rate = bytes as f64 / secs as f64 / n as f64;
        println!("{n} nodes idle: {rate:.0} digest bytes/s per node");
        assert_eq!(
            exchanges, 0,
            "an idle cluster in agreement exchanges nothing"
        );
        assert!(rate < 200.0, "{n} nodes: {rate} digest bytes/s per node");
    }
}
