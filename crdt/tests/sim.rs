//! A seeded, single-threaded simulator of many nodes running the sync logic of tandem-crdt
//! (`Engine` + `PeerSync` + `MemStore`) over a model network with latency, loss, duplication,
//! reordering, partitions and crashes. Every random choice comes from one seed.
//!
//! - `cargo test -p tandem-crdt --test sim` runs the CI-sized set (`SIM_SEEDS`, default 300).
//! - `SIM_SEED=1234 cargo test -p tandem-crdt --test sim -- replay --nocapture` replays one seed.
//!
//! The model: a connection is reliable (QUIC); losing a message means the connection broke,
//! so both sides drop the session and reconnect on the next tick with a fresh Hello. Messages
//! on one connection may still arrive out of order (push and catch-up use different streams).

#![allow(clippy::unwrap_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc};
use tandem_crdt::{
    Action, Delta, DeltaBody, DeltaId, DocId, Engine, Input, MemStore, NodeId, PeerSync,
    VersionVector, actor_id, json,
};

/// SplitMix64: small, fast, and the whole simulation replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() as f64 / u64::MAX as f64) < p
    }
}

/// Bugs the simulator can switch on, to prove the invariants catch them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bug {
    None,
    /// Received deltas are not forwarded to other peers.
    NoRelay,
    /// Pushes are not filtered by what the peer is known to hold.
    NoPushFilter,
}

#[derive(Clone, Debug)]
enum Msg {
    Hello(VersionVector),
    Deltas(Vec<Delta>),
}

struct Envelope {
    from: usize,
    to: usize,
    epoch: u64,
    msg: Msg,
}

struct SimNode {
    id: NodeId,
    up: bool,
    incarnation: u64,
    engine: Engine,
    store: MemStore,
    docs: BTreeMap<DocId, Automerge>,
    sessions: BTreeMap<usize, PeerSync>,
}

impl SimNode {
    fn new(i: usize) -> Self {
        let id = NodeId::from_bytes([i as u8 + 1; 32]);
        Self {
            id,
            up: true,
            incarnation: 1,
            engine: Engine::new(id, VersionVector::new()),
            store: MemStore::new(),
            docs: BTreeMap::new(),
            sessions: BTreeMap::new(),
        }
    }

    fn doc(&mut self, doc: DocId) -> &mut Automerge {
        let actor = actor_id(&self.id, self.incarnation);
        self.docs
            .entry(doc)
            .or_insert_with(|| Automerge::new().with_actor(actor))
    }

    fn apply(&mut self, deltas: &[Delta]) {
        for d in deltas {
            if let Some(bytes) = d.change_bytes() {
                let c = automerge::Change::try_from(bytes).unwrap();
                self.doc(d.doc).apply_changes([c]).unwrap();
            }
        }
    }

    /// Process crash and restart: memory is gone, the store (everything committed) stays.
    fn restart(&mut self) {
        self.incarnation += 1;
        self.sessions.clear();
        self.docs.clear();
        self.engine = Engine::new(self.id, self.store.clock());
        let all: Vec<Delta> = self.store.iter().cloned().collect();
        self.apply(&all);
    }

    fn deleted(&self, doc: &DocId) -> bool {
        self.store
            .iter()
            .any(|d| d.doc == *doc && d.body == DeltaBody::Tombstone)
    }
}

struct Sim {
    rng: Rng,
    bug: Bug,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    in_flight: BTreeMap<u64, Envelope>,
    nodes: Vec<SimNode>,
    /// Connection epoch per pair; bumped when a connection breaks, so stale messages drop.
    epochs: BTreeMap<(usize, usize), u64>,
    /// Which pairs may talk (the partition).
    allowed: Box<dyn Fn(usize, usize) -> bool>,
    loss: f64,
    dup: f64,
    acked: Vec<DeltaId>,
    redundant_sends: u64,
    delivered: u64,
}

fn describe(m: &Msg) -> String {
    match m {
        Msg::Hello(c) => format!("Hello({} deltas)", c.count()),
        Msg::Deltas(d) => format!(
            "Deltas({:?})",
            d.iter().map(|d| d.id.to_string()).collect::<Vec<_>>()
        ),
    }
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

const TICK: u64 = 50;

impl Sim {
    fn new(seed: u64, n: usize, bug: Bug) -> Self {
        let mut rng = Rng(seed);
        let loss = [0.0, 0.01, 0.05][rng.below(3) as usize];
        let dup = [0.0, 0.05][rng.below(2) as usize];
        Sim {
            rng,
            bug,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            in_flight: BTreeMap::new(),
            nodes: (0..n).map(SimNode::new).collect(),
            epochs: BTreeMap::new(),
            allowed: Box::new(|_, _| true),
            loss,
            dup,
            acked: Vec::new(),
            redundant_sends: 0,
            delivered: 0,
        }
    }

    /// Only nodes in the same group may talk.
    fn partition(&mut self, groups: Vec<Vec<usize>>) {
        let group_of = move |n: usize| groups.iter().position(|g| g.contains(&n));
        self.allowed = Box::new(move |a, b| group_of(a).is_some() && group_of(a) == group_of(b));
    }

    /// `i` can reach nobody.
    fn isolate(&mut self, i: usize) {
        self.allowed = Box::new(move |a, b| a != i && b != i);
    }

    /// `a` and `b` cannot reach each other (everything else can).
    fn cut(&mut self, x: usize, y: usize) {
        self.allowed = Box::new(move |a, b| pair(a, b) != pair(x, y));
    }

    /// Everyone can reach everyone.
    fn heal(&mut self) {
        self.allowed = Box::new(|_, _| true);
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.nodes[a].sessions.contains_key(&b) || self.nodes[b].sessions.contains_key(&a)
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("t={} {}", self.now, what());
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        self.trace(|| format!("send {from}->{to} {}", describe(&msg)));
        if self.rng.chance(self.loss) {
            self.trace(|| format!("  lost: {from}-{to} disconnects"));
            self.disconnect(from, to);
            return;
        }
        let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
        let epoch = self.epochs.get(&pair(from, to)).copied().unwrap_or(0);
        for _ in 0..copies {
            let at = self.now + 1 + self.rng.below(20);
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq)));
            self.in_flight.insert(
                self.seq,
                Envelope {
                    from,
                    to,
                    epoch,
                    msg: msg.clone(),
                },
            );
        }
    }

    /// The process of node `i` dies: its connections break (peers notice), memory is lost,
    /// and it restarts from its store when it comes back up.
    fn crash(&mut self, i: usize) {
        for p in 0..self.nodes.len() {
            if p != i && self.connected(i, p) {
                self.disconnect(i, p);
            }
        }
        self.nodes[i].up = false;
        self.nodes[i].restart();
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        self.nodes[a].sessions.remove(&b);
        self.nodes[b].sessions.remove(&a);
        *self.epochs.entry(pair(a, b)).or_default() += 1;
    }

    /// Sends `deltas` to every session of `n` except `except`, filtered by what each holds.
    fn push(&mut self, n: usize, deltas: &[Delta], except: Option<usize>) {
        let peers: Vec<usize> = self.nodes[n]
            .sessions
            .keys()
            .copied()
            .filter(|p| Some(*p) != except)
            .collect();
        for p in peers {
            let Some(s) = self.nodes[n].sessions.get(&p) else {
                continue;
            };
            let send: Vec<Delta> = if self.bug == Bug::NoPushFilter {
                deltas.to_vec()
            } else {
                s.unknown(deltas)
            };
            self.redundant_sends += send.iter().filter(|d| s.holds(d.id)).count() as u64;
            if send.is_empty() {
                continue;
            }
            self.nodes[n].sessions.get_mut(&p).unwrap().note(&send);
            self.send(n, p, Msg::Deltas(send));
        }
    }

    fn tick(&mut self) {
        // Reconnect every allowed pair of live nodes that is not connected.
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                let ok = self.nodes[a].up && self.nodes[b].up && (self.allowed)(a, b);
                if ok && !self.connected(a, b) {
                    *self.epochs.entry((a, b)).or_default() += 1;
                    let ca = self.nodes[a].engine.clock().clone();
                    let cb = self.nodes[b].engine.clock().clone();
                    let epoch = self.epochs[&(a, b)];
                    self.send(a, b, Msg::Hello(ca));
                    // If that was lost, the connection is already gone: no half-open session.
                    if self.epochs[&(a, b)] == epoch {
                        self.send(b, a, Msg::Hello(cb));
                    }
                } else if !ok && self.connected(a, b) {
                    self.disconnect(a, b);
                }
            }
        }
    }

    fn deliver(&mut self, env: Envelope) {
        let (from, to) = (env.from, env.to);
        if !self.nodes[to].up || self.epochs.get(&pair(from, to)).copied().unwrap_or(0) != env.epoch
        {
            return;
        }
        self.delivered += 1;
        self.trace(|| format!("deliver {from}->{to} {}", describe(&env.msg)));
        match env.msg {
            Msg::Hello(clock) => {
                let sync = PeerSync::new(clock);
                let mut plan = sync.plan(&self.nodes[to].engine);
                self.nodes[to].sessions.insert(from, sync);
                while let Some(batch) = plan.next_batch(&self.nodes[to].store, 2048).unwrap() {
                    // A lost message breaks the connection mid-way; the next Hello starts over.
                    let Some(s) = self.nodes[to].sessions.get_mut(&from) else {
                        break;
                    };
                    let batch = s.unknown(&batch);
                    s.note(&batch);
                    if !batch.is_empty() {
                        self.send(to, from, Msg::Deltas(batch));
                    }
                }
            }
            Msg::Deltas(deltas) => {
                let Some(s) = self.nodes[to].sessions.get_mut(&from) else {
                    // The peer's Hello (first on the stream) has not arrived yet: QUIC would
                    // hold these bytes until it has, so deliver them again a little later.
                    let at = self.now + 1 + self.rng.below(5);
                    self.seq += 1;
                    self.queue.push(Reverse((at, self.seq)));
                    let msg = Msg::Deltas(deltas);
                    self.in_flight.insert(
                        self.seq,
                        Envelope {
                            from,
                            to,
                            epoch: env.epoch,
                            msg,
                        },
                    );
                    return;
                };
                s.note(&deltas);
                let from_id = self.nodes[from].id;
                let mut fresh = Vec::new();
                for a in self.nodes[to].engine.handle(Input::RemoteDeltas {
                    from: from_id,
                    deltas,
                }) {
                    match a {
                        Action::Persist { deltas, .. } => fresh = deltas,
                        Action::Reject { error, .. } => panic!("valid delta rejected: {error}"),
                    }
                }
                self.nodes[to].store.insert(fresh.clone());
                self.nodes[to].apply(&fresh);
                if self.bug != Bug::NoRelay {
                    self.push(to, &fresh, Some(from));
                }
            }
        }
    }

    fn local_write(&mut self, n: usize, docs: usize) {
        if !self.nodes[n].up {
            return;
        }
        let doc = DocId::from_bytes([self.rng.below(docs as u64) as u8; 16]);
        if self.nodes[n].deleted(&doc) {
            return;
        }
        let kind = self.rng.below(20);
        let r1 = self.rng.next();
        let r2 = self.rng.next();
        let node = &mut self.nodes[n];
        let body = if kind == 0 {
            DeltaBody::Tombstone
        } else {
            let am = node.doc(doc);
            let before = am.get_heads();
            let mut tx = am.transaction();
            let list = match tx.get(ROOT, "list").unwrap() {
                Some((automerge::Value::Object(ObjType::List), id)) => id,
                _ => tx.put_object(ROOT, "list", ObjType::List).unwrap(),
            };
            let text = match tx.get(ROOT, "text").unwrap() {
                Some((automerge::Value::Object(ObjType::Text), id)) => id,
                _ => tx.put_object(ROOT, "text", ObjType::Text).unwrap(),
            };
            match kind % 4 {
                0 => tx.put(ROOT, format!("k{}", r1 % 4), r2 as i64).unwrap(),
                1 => {
                    let len = tx.length(&list);
                    tx.insert(&list, (r1 as usize) % (len + 1), r2 as i64)
                        .unwrap();
                }
                2 => {
                    let len = tx.length(&list);
                    if len > 0 {
                        tx.delete(&list, (r1 as usize) % len).unwrap();
                    }
                }
                _ => {
                    let len = tx.length(&text);
                    let pos = (r1 as usize) % (len + 1);
                    let del = ((r2 % 3) as usize).min(len - pos);
                    tx.splice_text(&text, pos, del as isize, "ab").unwrap();
                }
            }
            tx.commit();
            if am.get_heads() == before {
                return; // nothing changed, nothing to replicate
            }
            DeltaBody::Change(am.get_last_local_change().unwrap().raw_bytes().to_vec())
        };
        let mut made = Vec::new();
        for a in node.engine.handle(Input::LocalChange { doc, body }) {
            if let Action::Persist { deltas, .. } = a {
                made = deltas;
            }
        }
        node.store.insert(made.clone()); // the commit: acknowledged from here on
        self.acked.extend(made.iter().map(|d| d.id));
        self.push(n, &made, None);
    }

    /// Runs the network until `until`, with a tick every TICK.
    fn run_until(&mut self, until: u64) {
        while self.now < until {
            let next_tick = (self.now / TICK + 1) * TICK;
            match self.queue.peek() {
                Some(Reverse((at, _))) if *at <= next_tick => {
                    let Reverse((at, seq)) = self.queue.pop().unwrap();
                    self.now = at;
                    if let Some(env) = self.in_flight.remove(&seq) {
                        self.deliver(env);
                    }
                }
                _ => {
                    self.now = next_tick;
                    self.tick();
                }
            }
        }
    }

    fn quiet(&self) -> bool {
        self.queue.is_empty()
    }

    /// The invariants; `Err` says which failed.
    fn check(&self, docs: usize) -> Result<(), String> {
        let clock0 = self.nodes[0].engine.clock();
        for (i, n) in self.nodes.iter().enumerate() {
            if &n.store.clock() != n.engine.clock() {
                return Err(format!("node {i}: clock does not match its store"));
            }
            if n.engine.clock() != clock0 {
                return Err(format!(
                    "node {i}: clock differs from node 0 (lacks {}, has extra {})",
                    n.engine.clock().missing_count(clock0),
                    clock0.missing_count(n.engine.clock())
                ));
            }
            for id in &self.acked {
                if n.store.get(id).is_none() {
                    return Err(format!("node {i}: acknowledged delta {id} missing"));
                }
            }
        }
        for d in 0..docs {
            let doc = DocId::from_bytes([d as u8; 16]);
            let states: Vec<_> = self
                .nodes
                .iter()
                .map(|n| {
                    let heads = n.docs.get(&doc).map(|a| a.get_heads()).unwrap_or_default();
                    let json = n.docs.get(&doc).map(|a| json::object_to_json(a, &ROOT));
                    (heads, json, n.deleted(&doc))
                })
                .collect();
            if states.iter().any(|s| s != &states[0]) {
                return Err(format!("document {d} differs between nodes"));
            }
        }
        if self.redundant_sends > 0 {
            return Err(format!(
                "{} deltas sent to peers known to hold them",
                self.redundant_sends
            ));
        }
        Ok(())
    }
}

/// One random scenario: writes, partitions, crashes, then heal; returns the invariants' verdict.
fn scenario(seed: u64, bug: Bug) -> Result<(String, u64), String> {
    let mut rng = Rng(seed ^ 0x5eed);
    let n = 2 + rng.below(7) as usize; // 2..=8 nodes
    let docs = 1 + rng.below(4) as usize;
    let mut sim = Sim::new(seed, n, bug);
    let phases = 3 + rng.below(4);
    for _ in 0..phases {
        // A random partition (or none), some crashes, a burst of writes.
        match rng.below(4) {
            0 => sim.heal(),
            1 => {
                let cut = 1 + rng.below(n as u64 - 1) as usize;
                sim.partition(vec![(0..cut).collect(), (cut..n).collect()]);
            }
            2 => sim.isolate(rng.below(n as u64) as usize),
            _ => {
                let (x, y) = (rng.below(n as u64) as usize, rng.below(n as u64) as usize);
                sim.cut(x, y);
            }
        }
        for i in 0..n {
            if rng.chance(0.1) {
                sim.crash(i);
            } else if !sim.nodes[i].up {
                sim.nodes[i].up = true;
            }
        }
        for _ in 0..rng.below(30) {
            let at = rng.below(n as u64) as usize;
            sim.local_write(at, docs);
            let t = sim.now + rng.below(5);
            sim.run_until(t);
        }
        let t = sim.now + 200 + rng.below(500);
        sim.run_until(t);
    }
    // Heal: everyone up, no partition; convergence must follow within the stated bound.
    sim.heal();
    for node in &mut sim.nodes {
        node.up = true;
    }
    sim.loss = 0.0;
    let healed = sim.now;
    const BOUND: u64 = 2_000;
    while sim.now < healed + BOUND {
        let t = sim.now + TICK;
        sim.run_until(t);
        if sim.quiet() && sim.check(docs).is_ok() {
            break;
        }
    }
    if std::env::var("SIM_TRACE").is_ok() {
        for (i, node) in sim.nodes.iter().enumerate() {
            eprintln!(
                "node {i}: up {} clock {:?} sessions {:?} store {}",
                node.up,
                node.engine.clock(),
                node.sessions.keys().collect::<Vec<_>>(),
                node.store.len()
            );
        }
        eprintln!("epochs {:?} queue {}", sim.epochs, sim.queue.len());
    }
    sim.check(docs)
        .map_err(|e| format!("seed {seed} ({n} nodes, bug {bug:?}): {e}"))?;
    let summary = format!(
        "{n} nodes, {} writes, {} messages, converged {} ms after heal",
        sim.acked.len(),
        sim.delivered,
        sim.now - healed
    );
    Ok((summary, sim.now))
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![s];
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    (1..=n).collect()
}

#[test]
fn random_scenarios_converge() {
    let mut sim_ms = 0u64;
    let seeds = seeds();
    for &seed in &seeds {
        match scenario(seed, Bug::None) {
            Ok((_, t)) => sim_ms += t,
            Err(e) => panic!(
                "{e}\nreplay: SIM_SEED={seed} cargo test -p tandem-crdt --test sim -- replay --nocapture"
            ),
        }
    }
    assert!(sim_ms > 0);
    eprintln!(
        "{} seeds, {:.2} simulated hours (1 unit = 1 ms)",
        seeds.len(),
        sim_ms as f64 / 3_600_000.0
    );
}

#[test]
fn replay() {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        println!("{:?}", scenario(seed, Bug::None));
    }
}

#[test]
fn the_invariants_catch_a_relay_bug() {
    // A line: 0 - 1 - 2, where 0 and 2 never meet. Without relaying they cannot converge.
    let caught =
        (1..=20u64).find_map(|seed| line_of_three(seed, Bug::NoRelay).err().map(|e| (seed, e)));
    let (seed, e) = caught.expect("the relay bug went unnoticed");
    eprintln!("caught with seed {seed}: {e}");
    // The same scenario with relaying on converges.
    line_of_three(1, Bug::None).unwrap();
}

/// Writes at both ends of a line 0 - 1 - 2 (0 and 2 never connect), then checks.
fn line_of_three(seed: u64, bug: Bug) -> Result<(), String> {
    let mut sim = Sim::new(seed, 3, bug);
    sim.loss = 0.0;
    sim.allowed = Box::new(|a, b| a.abs_diff(b) == 1);
    for i in 0..10 {
        sim.local_write(if i % 2 == 0 { 0 } else { 2 }, 1);
        let t = sim.now + 10;
        sim.run_until(t);
    }
    let t = sim.now + 2_000;
    sim.run_until(t);
    sim.check(1)
}

#[test]
fn the_invariants_catch_redundant_pushes() {
    let caught = (1..=50u64).find_map(|seed| scenario(seed, Bug::NoPushFilter).err());
    let e = caught.expect("unfiltered pushes went unnoticed");
    assert!(e.contains("known to hold"), "{e}");
}

#[test]
fn partition_matrix_every_two_three_split_of_five() {
    for mask in 0u32..32 {
        if mask.count_ones() != 2 {
            continue;
        }
        let side = move |i: usize| mask & (1 << i) != 0;
        let mut sim = Sim::new(u64::from(mask), 5, Bug::None);
        sim.loss = 0.0;
        let (left, right): (Vec<usize>, Vec<usize>) = (0..5).partition(|i| side(*i));
        sim.partition(vec![left, right]);
        for i in 0..40 {
            sim.local_write(i % 5, 2);
            let t = sim.now + 3;
            sim.run_until(t);
        }
        let t = sim.now + 500;
        sim.run_until(t);
        assert!(
            sim.check(2).is_err(),
            "split {mask:05b}: the two sides cannot agree yet"
        );
        sim.heal();
        let t = sim.now + 2_000;
        sim.run_until(t);
        sim.check(2)
            .unwrap_or_else(|e| panic!("split {mask:05b} after heal: {e}"));
    }
}
