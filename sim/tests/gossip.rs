//! SWIM gossip (`tandem_crdt::gossip`, foca) on simulated time: many nodes in one thread, a
//! model network with latency and loss, crashes and restarts, replayable by seed.
//!
//! Figures are printed (`cargo test -p tandem-sim --test gossip -- --nocapture`);
//! `GOSSIP_SEEDS=N` runs more seeds, `GOSSIP_HOURS=N` a longer loss soak.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use tandem_crdt::NodeId;
use tandem_crdt::gossip::{Gossip, GossipConfig, GossipId, GossipOutput, Health};
use tandem_sim::Rng;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn node_id(i: usize) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    NodeId::from_bytes(b)
}

/// A datagram in flight: (deliver at, order, to, from, packet).
type InFlight = Reverse<(Instant, u64, usize, usize, Vec<u8>)>;

struct Sim {
    start: Instant,
    now: Instant,
    nodes: Vec<Option<Gossip>>,
    incarnations: Vec<u64>,
    queue: BinaryHeap<InFlight>,
    order: u64,
    rng: Rng,
    loss: f64,
    seed: u64,
    /// Every health change seen: (at, observer, about, health).
    changes: Vec<(Duration, usize, usize, Health)>,
    bytes_sent: u64,
}

impl Sim {
    fn new(n: usize, seed: u64, loss: f64) -> Sim {
        let start = Instant::now();
        let mut sim = Sim {
            start,
            now: start,
            nodes: (0..n).map(|_| None).collect(),
            incarnations: vec![0; n],
            queue: BinaryHeap::new(),
            order: 0,
            rng: Rng(seed),
            loss,
            seed,
            changes: Vec::new(),
            bytes_sent: 0,
        };
        for i in 0..n {
            sim.start_node(i);
        }
        sim
    }

    fn start_node(&mut self, i: usize) {
        self.incarnations[i] += 1;
        let me = GossipId {
            node: node_id(i),
            incarnation: self.incarnations[i],
        };
        let seed = self.seed ^ ((i as u64) << 32) ^ self.incarnations[i];
        let mut g = Gossip::new(me, GossipConfig::default(), seed, self.now);
        g.set_members(self.now, (0..self.nodes.len()).map(node_id));
        self.nodes[i] = Some(g);
        self.drain(i);
    }

    fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
    }

    fn index(id: &NodeId) -> usize {
        let b = id.as_bytes();
        u64::from_le_bytes(b[..8].try_into().unwrap()) as usize - 1
    }

    fn drain(&mut self, i: usize) {
        let Some(g) = self.nodes[i].as_mut() else {
            return;
        };
        let mut outs = Vec::new();
        while let Some(o) = g.poll_output() {
            outs.push(o);
        }
        for o in outs {
            match o {
                GossipOutput::Send { to, packet } => {
                    self.bytes_sent += packet.len() as u64;
                    if self.rng.chance(self.loss) {
                        continue;
                    }
                    let latency = Duration::from_micros(500 + self.rng.below(20_000));
                    self.order += 1;
                    self.queue.push(Reverse((
                        self.now + latency,
                        self.order,
                        Self::index(&to),
                        i,
                        packet,
                    )));
                }
                GossipOutput::Health { node, health } => {
                    self.changes
                        .push((self.now - self.start, i, Self::index(&node), health));
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            let next_msg = self.queue.peek().map(|Reverse((t, ..))| *t);
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, g)| Some((g.as_ref()?.poll_timeout()?, i)))
                .min();
            let msg_first = match (next_msg, next_timer) {
                (Some(m), Some((t, _))) => m <= t,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let at = if msg_first {
                next_msg.unwrap()
            } else {
                next_timer.unwrap().0
            };
            if at > end {
                break;
            }
            self.now = at;
            if msg_first {
                let Reverse((_, _, to, from, packet)) = self.queue.pop().unwrap();
                if let Some(g) = self.nodes[to].as_mut() {
                    g.handle_datagram(self.now, node_id(from), &packet);
                    self.drain(to);
                }
            } else {
                let i = next_timer.unwrap().1;
                if let Some(g) = self.nodes[i].as_mut() {
                    g.handle_timeout(self.now);
                }
                self.drain(i);
            }
        }
        self.now = end;
    }

    /// How `observer` sees `about`.
    fn health(&self, observer: usize, about: usize) -> Option<(Health, u64)> {
        let g = self.nodes[observer].as_ref()?;
        let h = g.health().get(&node_id(about))?;
        Some((h.health, h.incarnation))
    }

    /// Runs until every live node but `about` sees `about` as `want` (with at least
    /// `incarnation`), or `limit` passes; returns how long it took.
    fn until_all_see(
        &mut self,
        about: usize,
        want: Health,
        incarnation: u64,
        limit: Duration,
    ) -> Option<Duration> {
        let from = self.now;
        while self.now - from < limit {
            let all = (0..self.nodes.len())
                .filter(|o| *o != about && self.nodes[*o].is_some())
                .all(|o| {
                    self.health(o, about)
                        .is_some_and(|(h, inc)| h == want && inc >= incarnation)
                });
            if all {
                return Some(self.now - from);
            }
            self.run_for(Duration::from_millis(50));
        }
        None
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A crashed member is declared down by every other member within a bound; a restarted one
/// (its next incarnation) is seen alive again. Over many seeds, for 3, 10 and 50 nodes, both
/// while the cluster is busy (20 s after it formed) and once it is calm (after 60 s: probes
/// every 4 s instead of 2).
#[test]
fn a_crashed_member_is_declared_down_by_all_and_a_restarted_one_is_alive_again() {
    for (n, seeds, warm) in [
        (3usize, env("GOSSIP_SEEDS", 20), 20),
        (3, env("GOSSIP_SEEDS", 20), 60),
        (10, env("GOSSIP_SEEDS", 20), 20),
        (10, env("GOSSIP_SEEDS", 20), 60),
        (50, env("GOSSIP_SEEDS", 20) / 4, 20),
        (50, env("GOSSIP_SEEDS", 20) / 4, 60),
    ] {
        let (mut down, mut back) = (Vec::new(), Vec::new());
        for seed in 0..seeds.max(1) {
            let mut sim = Sim::new(n, seed, 0.0);
            sim.run_for(Duration::from_secs(warm));
            for o in 0..n {
                for a in 0..n {
                    if o != a {
                        assert_eq!(
                            sim.health(o, a).map(|h| h.0),
                            Some(Health::Alive),
                            "seed {seed}: node {o} sees node {a} after warm-up"
                        );
                    }
                }
            }
            sim.crash(0);
            let took = sim
                .until_all_see(0, Health::Down, 1, Duration::from_secs(60))
                .unwrap_or_else(|| panic!("seed {seed}, {n} nodes: crash not detected in 60 s"));
            down.push(took);
            sim.start_node(0);
            let took = sim
                .until_all_see(0, Health::Alive, 2, Duration::from_secs(60))
                .unwrap_or_else(|| panic!("seed {seed}, {n} nodes: restart not seen in 60 s"));
            back.push(took);
        }
        println!(
            "{n} nodes, {} seeds, crash {warm} s after forming: crash to down everywhere p50 {:?} p99 {:?}; restart to alive everywhere p50 {:?} p99 {:?}",
            down.len(),
            pct(&mut down, 0.5),
            pct(&mut down, 0.99),
            pct(&mut back, 0.5),
            pct(&mut back, 0.99)
        );
        assert!(
            pct(&mut down, 1.0) < Duration::from_secs(30),
            "crash detection bound"
        );
    }
}

/// With 10% of datagrams lost, no live member is declared down over a simulated hour
/// (`GOSSIP_HOURS`), and idle gossip bytes per node stay small.
#[test]
fn ten_percent_loss_declares_no_live_member_down() {
    let hours = env("GOSSIP_HOURS", 1);
    for seed in 0..2 {
        let mut sim = Sim::new(10, 100 + seed, 0.10);
        sim.run_for(Duration::from_secs(20));
        let warm = sim.changes.len();
        let sent = sim.bytes_sent;
        sim.run_for(Duration::from_secs(3600 * hours));
        let downs: Vec<_> = sim.changes[warm..]
            .iter()
            .filter(|c| c.3 == Health::Down)
            .collect();
        let suspects = sim.changes[warm..]
            .iter()
            .filter(|c| c.3 == Health::Suspect)
            .count();
        println!(
            "seed {seed}: 10 nodes, 10% loss, {hours} h: {} down (false), {suspects} suspicions refuted; {:.0} bytes/s per node",
            downs.len(),
            (sim.bytes_sent - sent) as f64 / (3600.0 * hours as f64) / 10.0
        );
        assert!(
            downs.is_empty(),
            "seed {seed}: live members declared down: {downs:?}"
        );
    }
}

/// Idle gossip bytes per second per node for 3, 10 and 50 nodes (no loss).
#[test]
fn idle_gossip_cost() {
    for n in [3usize, 10, 50] {
        let mut sim = Sim::new(n, 7, 0.0);
        sim.run_for(Duration::from_secs(20));
        let sent = sim.bytes_sent;
        sim.run_for(Duration::from_secs(120));
        let rate = (sim.bytes_sent - sent) as f64 / 120.0 / n as f64;
        println!("{n} nodes idle: {rate:.0} gossip bytes/s per node");
        assert!(rate < 2_000.0, "{n} nodes: {rate} bytes/s per node");
    }
}
