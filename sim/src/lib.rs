//! A seeded, single-threaded simulator of many tandem nodes. It steps the production state
//! machines of `tandem-crdt` ([`Session`], [`Dialer`], [`Engine`]) over a model network at
//! stream level, the way the daemon's driver does over QUIC, and checks invariants. Every
//! random choice comes from one seed, so any failure replays exactly.
//!
//! The model:
//! - A connection carries a sync stream (both ways) and a push stream per direction. Each
//!   stream is FIFO (QUIC streams are ordered); the streams of one connection are independent,
//!   so a push can overtake a batch. Latency per message is random.
//! - Loss breaks the connection (QUIC retransmits; what a lossy path really does is time out):
//!   both ends learn it after a short delay, or at the idle timeout when the peer just died.
//! - Duplication: QUIC never duplicates a stream's frames, so duplicates come from above it:
//!   the same deltas arrive over several connections (relays, reconnects), and a dial may be
//!   carried out twice (a retried handshake), which the one-connection rule must settle.
//! - The node's commit feed may overflow for a session (it then gets `handle_feed_lagged`).
//! - Partitions (`partition`, `isolate`, `cut`, `heal`); dials across them fail.
//! - Crashes: memory (sessions, loaded documents, stores in flight) is lost, the store stays;
//!   the node restarts from its store with a new incarnation.
//! - Stores and loads finish after a random delay, as on a real disk.
//! - SWIM gossip ([`Gossip`], foca) runs beside the sessions on simulated time, its datagrams
//!   on the connections (lost at random); a member it hears is alive but not connected is
//!   dialed at once, as the daemon does.
//! - Anti-entropy ([`Entropy`]) runs beside the sessions: digests travel as datagrams (lost
//!   at random, never breaking a connection), and an exchange it asks for goes to the session
//!   ([`Session::resync`]). A fault hook loses push frames after the session accounted for
//!   them (`push_loss`), as a bug would: only anti-entropy repairs that without a reconnect.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjType, ROOT, ReadDoc};
use tandem_crdt::dialer::{Admit, ConnId, Dialer, DialerConfig};
use tandem_crdt::engine::{Action, CatchUp, Engine, Input, MemStore, Source};
use tandem_crdt::entropy::{Entropy, EntropyConfig, EntropyOutput, Link};
use tandem_crdt::gossip::{Gossip, GossipConfig, GossipId, GossipOutput, Health};
use tandem_crdt::proto::DatagramKind;
use tandem_crdt::proto::{PushMsg, SyncMsg};
use tandem_crdt::session::{Fault, Lane, LoadRequest, Output, Session, SessionConfig};
use tandem_crdt::{
    Delta, DeltaBody, DeltaId, DocId, NodeId, Signer, VersionVector, actor_id, json,
};

/// SplitMix64 (`tandem_crdt::rng`): the whole simulation replays from its seed.
pub use tandem_crdt::rng::Rng;

/// Milliseconds of simulated time.
pub type Ms = u64;

/// The timer tick: sessions' and dialers' timeouts are checked this often.
pub const TICK: Ms = 10;
/// How long an end waits to notice a peer that died without a word (QUIC idle timeout).
pub const IDLE: Ms = 300;

#[derive(Debug, Clone)]
enum Wire {
    Sync(SyncMsg),
    Push(PushMsg),
}

impl Wire {
    fn describe(&self) -> String {
        match self {
            Wire::Sync(SyncMsg::Hello { clock, .. }) => format!("Hello({} deltas)", clock.count()),
            Wire::Sync(SyncMsg::Batch { seq, deltas }) => {
                format!(
                    "Batch {seq} ({:?})",
                    deltas.iter().map(|d| d.id.to_string()).collect::<Vec<_>>()
                )
            }
            Wire::Sync(m) => format!("{m:?}"),
            Wire::Push(PushMsg::Push { deltas }) => format!(
                "Push({:?})",
                deltas.iter().map(|d| d.id.to_string()).collect::<Vec<_>>()
            ),
        }
    }
}

#[derive(Debug)]
enum Event {
    /// The frame at the head of stream `stream` of `conn` towards `to` may be read.
    Deliver {
        conn: ConnId,
        to: usize,
        stream: u8,
    },
    DialDone {
        from: usize,
        to: usize,
        incarnation: u64,
    },
    Lost {
        conn: ConnId,
        at: usize,
    },
    Stored {
        node: usize,
        incarnation: u64,
        conn: ConnId,
        from: NodeId,
        id: u64,
        deltas: Vec<Delta>,
    },
    Loaded {
        node: usize,
        incarnation: u64,
        conn: ConnId,
        req: LoadRequest,
    },
    /// A digest datagram arrives.
    Datagram {
        conn: ConnId,
        to: usize,
        from: usize,
        packet: Vec<u8>,
    },
}

/// One end of a connection, on one node.
struct End {
    peer: usize,
    session: Session,
    /// When the last store asked for lands: a session's stores land in the order asked, as
    /// the daemon queues them (a batch may build on the one before).
    last_store: Ms,
}

/// A node: the production state machines plus a model of its store and documents.
pub struct SimNode {
    pub id: NodeId,
    pub up: bool,
    pub incarnation: u64,
    pub engine: Engine,
    signer: Arc<Signer>,
    pub store: MemStore,
    pub docs: BTreeMap<DocId, Automerge>,
    pub dialer: Dialer,
    pub entropy: Entropy,
    pub gossip: Gossip,
    ends: BTreeMap<ConnId, End>,
}

impl SimNode {
    fn doc(&mut self, doc: DocId) -> &mut Automerge {
        let actor = actor_id(&self.id, self.incarnation);
        self.docs
            .entry(doc)
            .or_insert_with(|| Automerge::new().with_actor(actor))
    }

    fn apply(&mut self, deltas: &[Delta]) {
        for d in deltas {
            if let Some(bytes) = d.change_bytes()
                && let Ok(c) = automerge::Change::try_from(bytes)
            {
                let _ = self.doc(d.doc).apply_changes([c]);
            }
        }
    }

    pub fn deleted(&self, doc: &DocId) -> bool {
        self.store
            .iter()
            .any(|d| d.doc == *doc && d.body == DeltaBody::Tombstone)
    }

    /// The live sessions: peer index and session.
    pub fn sessions(&self) -> impl Iterator<Item = (usize, &Session)> {
        self.ends.values().map(|e| (e.peer, &e.session))
    }
}

/// Per connection and direction, what the oracle knows: what the receiver is known to hold
/// (for "no delta sent to a peer known to hold it"), the batches in flight and their deltas.
#[derive(Default)]
struct Oracle {
    known: VersionVector,
    hello_seen: bool,
    batches: BTreeMap<u64, Vec<DeltaId>>,
    /// Push frames sent, in order, and how many the receiver acknowledged.
    pushes: Vec<Vec<DeltaId>>,
    pushes_acked: usize,
}

/// The simulator.
pub struct Sim {
    pub rng: Rng,
    pub now: Ms,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Ms, u64)>>,
    events: BTreeMap<u64, Event>,
    pub nodes: Vec<SimNode>,
    next_conn: ConnId,
    /// Live connections: (dialer, acceptor).
    links: BTreeMap<ConnId, (usize, usize)>,
    /// Last delivery time per (conn, receiver, stream), to keep streams FIFO.
    stream_tail: BTreeMap<(ConnId, usize, u8), Ms>,
    /// Frames in flight per (conn, receiver, stream), in order.
    streams: BTreeMap<(ConnId, usize, u8), std::collections::VecDeque<Wire>>,
    /// (conn, sender) -> oracle of the receiving side.
    oracle: BTreeMap<(ConnId, usize), Oracle>,
    allowed: Box<dyn Fn(usize, usize) -> bool>,
    pub loss: f64,
    pub dup: f64,
    pub feed_loss: f64,
    /// Chance that a push frame is lost after the session accounted for it (a bug's loss).
    pub push_loss: f64,
    /// Chance that a digest datagram is lost.
    pub datagram_loss: f64,
    /// Whether anti-entropy runs (off: only reconnects repair lost pushes).
    pub entropy: bool,
    pub session_cfg: SessionConfig,
    /// Deltas whose local write returned (committed).
    pub acked: Vec<DeltaId>,
    pub violations: Vec<String>,
    pub delivered: u64,
    pub trace: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// The dialer's tunables in simulated time (milliseconds matter here, not minutes).
pub fn dialer_config() -> DialerConfig {
    DialerConfig {
        base: Duration::from_millis(20),
        max_backoff: Duration::from_millis(500),
        jitter: Duration::from_millis(20),
        breaker_failures: 6,
        breaker_retry: Duration::from_millis(2_000),
        simultaneous: Duration::from_millis(100),
    }
}

/// A node's anti-entropy, all nodes members.
fn sim_entropy(me: NodeId, ids: &[NodeId], seed: u64, now: Instant) -> Entropy {
    let mut e = Entropy::new(me, EntropyConfig::default(), seed, now);
    e.set_members(ids.iter().copied());
    e
}

/// A node's SWIM gossip at `incarnation`, all nodes members.
fn sim_gossip(me: NodeId, incarnation: u64, ids: &[NodeId], seed: u64, now: Instant) -> Gossip {
    let mut g = Gossip::new(
        GossipId {
            node: me,
            incarnation,
        },
        GossipConfig::default(),
        seed ^ incarnation.rotate_left(32),
        now,
    );
    g.set_members(now, ids.iter().copied());
    g
}

/// A fixed round-trip time per pair of nodes, for the anti-entropy's choice of holder.
fn rtt(a: usize, b: usize) -> Duration {
    let (x, y) = pair(a, b);
    Duration::from_millis(2 + ((x * 7 + y * 13) % 20) as u64)
}

impl Sim {
    /// `n` nodes, all members of each other, with loss and duplication drawn from `seed`.
    pub fn new(seed: u64, n: usize, fault: Fault) -> Self {
        let mut rng = Rng(seed);
        let loss = [0.0, 0.01, 0.05][rng.below(3) as usize];
        let dup = [0.0, 0.05][rng.below(2) as usize];
        let feed_loss = [0.0, 0.02][rng.below(2) as usize];
        let base = Instant::now();
        let signers: Vec<Arc<Signer>> = (0..n)
            .map(|i| Arc::new(Signer::from_seed([i as u8 + 1; 32])))
            .collect();
        let ids: Vec<NodeId> = signers.iter().map(|s| s.id()).collect();
        let nodes = (0..n)
            .map(|i| {
                let mut dialer = Dialer::new(ids[i], dialer_config());
                for (j, id) in ids.iter().enumerate() {
                    if j != i {
                        // Addresses are only labels here: port = node index.
                        dialer.add(
                            *id,
                            &[std::net::SocketAddr::from(([10, 0, 0, 1], j as u16))],
                            base,
                        );
                    }
                }
                SimNode {
                    id: ids[i],
                    up: true,
                    incarnation: 1,
                    engine: Engine::new(signers[i].clone(), VersionVector::new()),
                    signer: signers[i].clone(),
                    store: MemStore::new(),
                    docs: BTreeMap::new(),
                    dialer,
                    entropy: sim_entropy(ids[i], &ids, i as u64, base),
                    gossip: sim_gossip(ids[i], 1, &ids, i as u64, base),
                    ends: BTreeMap::new(),
                }
            })
            .collect();
        Sim {
            rng,
            now: 0,
            base,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes,
            next_conn: 0,
            links: BTreeMap::new(),
            stream_tail: BTreeMap::new(),
            streams: BTreeMap::new(),
            oracle: BTreeMap::new(),
            allowed: Box::new(|_, _| true),
            loss,
            dup,
            feed_loss,
            push_loss: 0.0,
            datagram_loss: 0.05,
            entropy: true,
            session_cfg: SessionConfig {
                batch_bytes: 2_048,
                store_bytes: 8_192,
                hello_timeout: Duration::from_millis(1_000),
                ack_timeout: Duration::from_millis(5_000),
                push_buffer: 16 * 1024,
                fault,
                ..SessionConfig::default()
            },
            acked: Vec::new(),
            violations: Vec::new(),
            delivered: 0,
            trace: std::env::var("SIM_TRACE").is_ok(),
        }
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("t={} {}", self.now, what());
        }
    }

    fn schedule(&mut self, at: Ms, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Only nodes in the same group may talk.
    pub fn partition(&mut self, groups: Vec<Vec<usize>>) {
        let group_of = move |n: usize| groups.iter().position(|g| g.contains(&n));
        self.allowed = Box::new(move |a, b| group_of(a).is_some() && group_of(a) == group_of(b));
    }

    /// `i` can reach nobody.
    pub fn isolate(&mut self, i: usize) {
        self.allowed = Box::new(move |a, b| a != i && b != i);
    }

    /// `x` and `y` cannot reach each other (everything else can).
    pub fn cut(&mut self, x: usize, y: usize) {
        self.allowed = Box::new(move |a, b| pair(a, b) != pair(x, y));
    }

    /// Only these pairs can talk.
    pub fn only(&mut self, f: impl Fn(usize, usize) -> bool + 'static) {
        self.allowed = Box::new(f);
    }

    /// Everyone can reach everyone.
    pub fn heal(&mut self) {
        self.allowed = Box::new(|_, _| true);
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[a].up && self.nodes[b].up && (self.allowed)(a, b)
    }

    /// Whether `a` and `b` have a session between them.
    pub fn connected(&self, a: usize, b: usize) -> bool {
        self.links.values().any(|&(x, y)| pair(x, y) == pair(a, b))
    }

    /// The process of node `i` dies: its connections break silently (peers notice at the idle
    /// timeout, or sooner when it comes back and dials them), memory is lost, and it restarts
    /// from its store.
    pub fn crash(&mut self, i: usize) {
        self.log(|| format!("crash {i}"));
        let conns: Vec<ConnId> = self.nodes[i].ends.keys().copied().collect();
        for c in conns {
            self.nodes[i].ends.remove(&c);
            if let Some((x, y)) = self.links.remove(&c) {
                let other = if x == i { y } else { x };
                let at = self.now + IDLE;
                self.schedule(at, Event::Lost { conn: c, at: other });
            }
        }
        let n = &mut self.nodes[i];
        n.up = false;
        n.incarnation += 1;
        n.docs.clear();
        // The chain goes on from the last own delta stored, as the daemon's does.
        let clock = n.store.clock();
        let last = DeltaId {
            origin: n.id,
            seq: clock.max_seq(&n.id),
        };
        let chain = n
            .store
            .get(&last)
            .map_or([0; 32], tandem_crdt::sign::chain_hash);
        n.engine = Engine::new(n.signer.clone(), clock).with_chain(chain);
        let mut dialer = Dialer::new(n.id, dialer_config());
        let peers: Vec<NodeId> = n.dialer.peers().collect();
        for p in peers {
            dialer.add(p, n.dialer.addrs(&p), self.base);
        }
        n.dialer = dialer;
        let ids: Vec<NodeId> = self.nodes.iter().map(|x| x.id).collect();
        let n = &mut self.nodes[i];
        n.entropy = sim_entropy(
            n.id,
            &ids,
            n.incarnation,
            self.base + Duration::from_millis(self.now),
        );
        let all: Vec<Delta> = n.store.iter().cloned().collect();
        n.apply(&all);
    }

    /// Brings a crashed node back.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].up = true;
    }

    /// Breaks connection `conn`; both ends learn it after a short delay.
    fn break_link(&mut self, conn: ConnId) {
        if let Some((a, b)) = self.links.remove(&conn) {
            self.log(|| format!("  conn {conn} ({a}-{b}) breaks"));
            for end in [a, b] {
                let at = self.now + 1 + self.rng.below(20);
                self.schedule(at, Event::Lost { conn, at: end });
            }
        }
    }

    /// Ends `conn` at node `at` (the session is gone; the dialer hears of it).
    fn drop_end(&mut self, at: usize, conn: ConnId) {
        let now = self.instant();
        let node = &mut self.nodes[at];
        if let Some(end) = node.ends.remove(&conn) {
            let peer = self.nodes[end.peer].id;
            let node = &mut self.nodes[at];
            node.dialer
                .disconnected(&peer, conn, true, now, &mut self.rng);
        }
    }

    fn send(&mut self, conn: ConnId, from: usize, wire: Wire) {
        let Some(&(a, b)) = self.links.get(&conn) else {
            return;
        };
        let to = if a == from { b } else { a };
        self.log(|| format!("send {from}->{to} on {conn}: {}", wire.describe()));
        self.observe_send(conn, from, &wire);
        if self.rng.chance(self.loss) {
            self.log(|| "  lost".into());
            self.break_link(conn);
            return;
        }
        let stream = match wire {
            Wire::Sync(_) => 0,
            Wire::Push(_) => 1,
        };
        let tail = self.stream_tail.entry((conn, to, stream)).or_insert(0);
        let at = (self.now + 1 + self.rng.below(20)).max(*tail);
        *tail = at;
        self.streams
            .entry((conn, to, stream))
            .or_default()
            .push_back(wire);
        self.schedule(at, Event::Deliver { conn, to, stream });
    }

    /// The oracle's view of a send: deltas to a peer known to hold them, the window.
    fn observe_send(&mut self, conn: ConnId, from: usize, wire: &Wire) {
        let window = self.session_cfg.window;
        let o = self.oracle.entry((conn, from)).or_default();
        let deltas = match wire {
            Wire::Sync(SyncMsg::Batch { seq, deltas }) => {
                o.batches
                    .insert(*seq, deltas.iter().map(|d| d.id).collect());
                if o.batches.len() > window {
                    let v = format!(
                        "conn {conn}: node {from} has {} batches unacknowledged (window {window})",
                        o.batches.len()
                    );
                    self.violations.push(v);
                }
                deltas
            }
            Wire::Push(PushMsg::Push { deltas }) => {
                o.pushes.push(deltas.iter().map(|d| d.id).collect());
                deltas
            }
            _ => return,
        };
        let o = self.oracle.entry((conn, from)).or_default();
        let redundant = deltas.iter().filter(|d| o.known.contains(d.id)).count();
        if redundant > 0 && self.trace {
            eprintln!(
                "  redundant: {:?}",
                deltas
                    .iter()
                    .filter(|d| o.known.contains(d.id))
                    .map(|d| d.id.to_string())
                    .collect::<Vec<_>>()
            );
        }
        for d in deltas {
            o.known.insert(d.id);
        }
        if redundant > 0 && o.hello_seen {
            self.violations.push(format!(
                "conn {conn}: node {from} sent {redundant} deltas to a peer known to hold them"
            ));
        }
    }

    /// The oracle's view of a delivery: what the receiver holds, acks after stores.
    fn observe_delivery(&mut self, conn: ConnId, to: usize, wire: &Wire) {
        let from = match self.links.get(&conn) {
            Some(&(a, b)) if a == to => b,
            Some(&(a, _)) => a,
            None => return,
        };
        match wire {
            Wire::Sync(SyncMsg::Hello { clock, .. }) => {
                // What `from` holds, as `to` learns it: `to`'s sends are judged against it.
                let o = self.oracle.entry((conn, to)).or_default();
                o.known.join(clock);
                o.hello_seen = true;
            }
            Wire::Sync(SyncMsg::Batch { deltas, .. }) | Wire::Push(PushMsg::Push { deltas }) => {
                let o = self.oracle.entry((conn, to)).or_default();
                for d in deltas {
                    o.known.insert(d.id);
                }
            }
            Wire::Sync(SyncMsg::Ack { seq }) => {
                // `from` acknowledged `to`'s batch: it must be in `from`'s store by now.
                let o = self.oracle.entry((conn, to)).or_default();
                let ids = o.batches.remove(seq).unwrap_or_default();
                let missing = ids
                    .iter()
                    .filter(|id| self.nodes[from].store.get(id).is_none())
                    .count();
                if missing > 0 {
                    self.violations.push(format!(
                        "conn {conn}: node {from} acknowledged batch {seq} with {missing} deltas not stored"
                    ));
                }
            }
            Wire::Sync(SyncMsg::PushAck { stored }) => {
                // `from` says it stored `to`'s first `stored` push frames: it must hold them.
                let o = self.oracle.entry((conn, to)).or_default();
                let upto = (*stored as usize).min(o.pushes.len());
                let ids: Vec<DeltaId> = o.pushes[o.pushes_acked.min(upto)..upto]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                o.pushes_acked = o.pushes_acked.max(upto);
                let missing = ids
                    .iter()
                    .filter(|id| self.nodes[from].store.get(id).is_none())
                    .count();
                if missing > 0 {
                    let ids: Vec<String> = ids
                        .iter()
                        .filter(|id| self.nodes[from].store.get(id).is_none())
                        .map(|id| id.to_string())
                        .collect();
                    self.violations.push(format!(
                        "conn {conn}: node {from} acknowledged pushes with {missing} deltas not stored: {ids:?}"
                    ));
                }
            }
            Wire::Sync(SyncMsg::Resync { clock, .. }) => {
                // As a Hello: what `from` holds, as `to` learns it.
                self.oracle.entry((conn, to)).or_default().known.join(clock);
            }
            Wire::Sync(SyncMsg::CaughtUp) => {}
        }
    }

    /// Feeds `deltas`, just committed at node `n`, to its sessions.
    fn committed(&mut self, n: usize, deltas: &[Delta], source: Source) {
        let now = self.instant();
        let conns: Vec<ConnId> = self.nodes[n].ends.keys().copied().collect();
        for c in conns {
            let lagged = self.rng.chance(self.feed_loss);
            let lose = self.rng.chance(self.push_loss);
            let clock = self.nodes[n].store.clock();
            if let Some(end) = self.nodes[n].ends.get_mut(&c) {
                if lose {
                    end.session.lose_next_push();
                }
                if lagged {
                    end.session.handle_feed_lagged(now, clock);
                } else {
                    end.session.handle_committed(now, deltas, source);
                }
            }
            self.pump(n, c);
        }
    }

    /// Carries out what the session of `conn` at node `n` asks for.
    fn pump(&mut self, n: usize, conn: ConnId) {
        loop {
            let Some(end) = self.nodes[n].ends.get_mut(&conn) else {
                return;
            };
            let Some(out) = end.session.poll_output() else {
                return;
            };
            let peer = end.peer;
            let inc = self.nodes[n].incarnation;
            match out {
                Output::Send(m) => self.send(conn, n, Wire::Sync(m)),
                Output::Push(m) => {
                    self.send(conn, n, Wire::Push(m));
                    let now = self.instant();
                    if let Some(end) = self.nodes[n].ends.get_mut(&conn) {
                        end.session.handle_push_written(now);
                    }
                }
                Output::Load(req) => {
                    let at = self.now + self.rng.below(3);
                    self.schedule(
                        at,
                        Event::Loaded {
                            node: n,
                            incarnation: inc,
                            conn,
                            req,
                        },
                    );
                }
                Output::Store { id, deltas, .. } => {
                    let mut at = self.now + self.rng.below(4);
                    if let Some(end) = self.nodes[n].ends.get_mut(&conn) {
                        at = at.max(end.last_store);
                        end.last_store = at;
                    }
                    let from = self.nodes[peer].id;
                    self.schedule(
                        at,
                        Event::Stored {
                            node: n,
                            incarnation: inc,
                            conn,
                            from,
                            id,
                            deltas,
                        },
                    );
                }
                Output::Close { reason, .. } => {
                    self.log(|| format!("  node {n} closes conn {conn} to {peer}: {reason}"));
                    self.violations
                        .push(format!("node {n} closed its session with {peer}: {reason}"));
                    self.break_link(conn);
                    self.drop_end(n, conn);
                    return;
                }
                Output::Hello { .. } | Output::InSync(_) | Output::PeerCaughtUp => {}
            }
        }
    }

    fn deliver(&mut self, ev: Event) {
        match ev {
            Event::Deliver { conn, to, stream } => {
                if !self.links.contains_key(&conn) || !self.nodes[to].ends.contains_key(&conn) {
                    self.streams.remove(&(conn, to, stream));
                    return;
                }
                let now = self.instant();
                if stream == 1
                    && self.nodes[to]
                        .ends
                        .get(&conn)
                        .is_some_and(|e| !e.session.wants_push())
                {
                    // Flow control: the driver does not read the push stream now; the frame
                    // waits at the head of the stream, and everything behind it waits too.
                    let at = self.now + 1 + self.rng.below(5);
                    self.schedule(at, Event::Deliver { conn, to, stream });
                    return;
                }
                let Some(wire) = self
                    .streams
                    .get_mut(&(conn, to, stream))
                    .and_then(|q| q.pop_front())
                else {
                    return;
                };
                self.delivered += 1;
                self.log(|| format!("deliver to {to} on {conn}: {}", wire.describe()));
                self.observe_delivery(conn, to, &wire);
                if let Some(end) = self.nodes[to].ends.get_mut(&conn) {
                    match wire {
                        Wire::Sync(m) => end.session.handle_sync(now, m),
                        Wire::Push(m) => end.session.handle_push(now, m),
                    }
                }
                self.pump(to, conn);
            }
            Event::DialDone {
                from,
                to,
                incarnation,
            } => {
                if self.nodes[from].incarnation != incarnation || !self.nodes[from].up {
                    return;
                }
                let now = self.instant();
                let to_id = self.nodes[to].id;
                if !self.reachable(from, to) {
                    self.log(|| format!("dial {from}->{to} fails"));
                    self.nodes[from]
                        .dialer
                        .dial_failed(&to_id, now, &mut self.rng);
                    return;
                }
                self.connect(from, to);
            }
            Event::Lost { conn, at } => {
                self.links.remove(&conn);
                self.drop_end(at, conn);
            }
            Event::Datagram {
                conn,
                to,
                from,
                packet,
            } => {
                if self.links.contains_key(&conn) && self.nodes[to].up {
                    let now = self.instant();
                    let from = self.nodes[from].id;
                    let node = &mut self.nodes[to];
                    if packet.first() == Some(&(DatagramKind::Digest as u8)) {
                        node.entropy.handle_datagram(now, from, &packet);
                    } else {
                        node.gossip.handle_datagram(now, from, &packet);
                    }
                }
            }
            Event::Stored {
                node,
                incarnation,
                conn,
                from,
                id,
                deltas,
            } => {
                if self.nodes[node].incarnation != incarnation {
                    return; // crashed meanwhile: the write never happened
                }
                // A store under way completes even if its session is gone meanwhile.
                self.store_remote(node, from, deltas);
                let now = self.instant();
                if let Some(end) = self.nodes[node].ends.get_mut(&conn) {
                    end.session.handle_stored(now, id, Ok(()));
                }
                self.pump(node, conn);
            }
            Event::Loaded {
                node,
                incarnation,
                conn,
                req,
            } => {
                if self.nodes[node].incarnation != incarnation
                    || !self.nodes[node].ends.contains_key(&conn)
                {
                    return;
                }
                let lane: Lane = req.lane;
                let n = &self.nodes[node];
                let Ok((plan, batch)) = req.run(&n.engine, &n.store);
                let plan: CatchUp = plan;
                let now = self.instant();
                if let Some(end) = self.nodes[node].ends.get_mut(&conn) {
                    end.session.handle_loaded(now, lane, plan, batch);
                }
                self.pump(node, conn);
            }
        }
    }

    /// Node `n`'s connection to member `to`, if any: its id and the peer's index.
    fn conn_to(&self, n: usize, to: NodeId) -> Option<(ConnId, usize)> {
        self.nodes[n]
            .ends
            .iter()
            .find(|(_, e)| self.nodes[e.peer].id == to)
            .map(|(c, e)| (*c, e.peer))
    }

    /// Sends a datagram from node `n` to member `to` on their connection, if there is one
    /// (lost at random, like any datagram).
    fn send_datagram(&mut self, n: usize, to: NodeId, packet: Vec<u8>) {
        let Some((conn, peer)) = self.conn_to(n, to) else {
            return;
        };
        if self.rng.chance(self.datagram_loss) {
            return;
        }
        let at = self.now + 1 + self.rng.below(20);
        self.schedule(
            at,
            Event::Datagram {
                conn,
                to: peer,
                from: n,
                packet,
            },
        );
    }

    /// Runs node `n`'s SWIM gossip: packets out as datagrams; a member heard alive but not
    /// connected is dialed at once (the dialer may be backing off).
    fn gossip_tick(&mut self, n: usize) {
        let now = self.instant();
        self.nodes[n].gossip.handle_timeout(now);
        while let Some(out) = self.nodes[n].gossip.poll_output() {
            match out {
                GossipOutput::Send { to, packet } => self.send_datagram(n, to, packet),
                GossipOutput::Health { node, health } => {
                    if health == Health::Alive && self.conn_to(n, node).is_none() {
                        self.nodes[n].dialer.learn(node, &[], now);
                    }
                }
            }
        }
    }

    /// Whether every up node sees every other up node alive.
    pub fn all_alive(&self) -> bool {
        self.nodes.iter().filter(|a| a.up).all(|a| {
            self.nodes.iter().filter(|b| b.up && b.id != a.id).all(|b| {
                a.gossip
                    .health()
                    .get(&b.id)
                    .is_some_and(|h| h.health == Health::Alive)
            })
        })
    }

    /// Runs node `n`'s anti-entropy: its clock and links, its rounds; digests go out as
    /// datagrams on its connections, exchanges to the sessions.
    fn entropy_tick(&mut self, n: usize) {
        let now = self.instant();
        let clock = self.nodes[n].engine.clock().clone();
        self.nodes[n].entropy.set_clock(&clock);
        let links: Vec<(NodeId, Link)> = self.nodes[n]
            .ends
            .values()
            .filter(|e| e.session.is_open())
            .map(|e| {
                (
                    self.nodes[e.peer].id,
                    Link {
                        rtt: rtt(n, e.peer),
                        busy: e.session.is_busy(),
                        in_sync: e.session.in_sync(),
                    },
                )
            })
            .collect();
        let node = &mut self.nodes[n];
        node.entropy.set_links(links);
        node.entropy.handle_timeout(now);
        while let Some(out) = self.nodes[n].entropy.poll_output() {
            match out {
                EntropyOutput::Send { to, packet } => self.send_datagram(n, to, packet),
                EntropyOutput::Exchange { with } => {
                    let Some((conn, peer)) = self.conn_to(n, with) else {
                        continue;
                    };
                    self.log(|| format!("node {n} asks {peer} for an exchange"));
                    let clock = self.nodes[n].store.clock();
                    if let Some(end) = self.nodes[n].ends.get_mut(&conn) {
                        end.session.resync(now, &clock);
                    }
                    self.pump(n, conn);
                }
                EntropyOutput::Agrees { with, clock } => {
                    if let Some((conn, _)) = self.conn_to(n, with) {
                        if let Some(end) = self.nodes[n].ends.get_mut(&conn) {
                            end.session.handle_peer_clock(now, &clock);
                        }
                        self.pump(n, conn);
                    }
                }
                // Every node already knows every address here.
                EntropyOutput::Addresses { .. } => {}
            }
        }
    }

    /// The receive path: dedupe and validate by the engine, commit, apply, feed sessions.
    fn store_remote(&mut self, node: usize, from: NodeId, deltas: Vec<Delta>) {
        let mut fresh = Vec::new();
        for a in self.nodes[node]
            .engine
            .handle(Input::RemoteDeltas { from, deltas })
        {
            match a {
                Action::Persist { deltas, .. } => fresh = deltas,
                Action::Reject { error, .. } => self
                    .violations
                    .push(format!("node {node}: a valid delta was rejected: {error}")),
            }
        }
        if fresh.is_empty() {
            return;
        }
        self.nodes[node].store.insert(fresh.clone());
        self.nodes[node].apply(&fresh);
        self.committed(node, &fresh, Source::Remote(from));
    }

    /// A dial from `from` reached `to`: both ends admit it (or not) and start sessions.
    fn connect(&mut self, from: usize, to: usize) {
        self.next_conn += 1;
        let conn = self.next_conn;
        let now = self.instant();
        let (fid, tid) = (self.nodes[from].id, self.nodes[to].id);
        let fa = self.nodes[from].dialer.connected(tid, conn, true, now);
        let ta = self.nodes[to].dialer.connected(fid, conn, false, now);
        self.log(|| format!("conn {conn}: {from} dialed {to}: {fa:?} / {ta:?}"));
        for (node, admit) in [(from, fa), (to, ta)] {
            if let Admit::Accept {
                replaces: Some(old),
            } = admit
            {
                // That node closes the old connection; the other end hears of it.
                self.nodes[node].ends.remove(&old);
                self.break_link(old);
            }
        }
        if fa == Admit::Refuse || ta == Admit::Refuse {
            // The side that refuses closes it; the other sees it closed at once. (The two can
            // disagree when one has not yet noticed its old connection died; the dialer then
            // simply dials again.)
            self.nodes[from]
                .dialer
                .disconnected(&tid, conn, true, now, &mut self.rng);
            self.nodes[to]
                .dialer
                .disconnected(&fid, conn, true, now, &mut self.rng);
            return;
        }
        self.links.insert(conn, (from, to));
        for (me, peer) in [(from, to), (to, from)] {
            let node = &self.nodes[me];
            let session = Session::new(
                self.session_cfg.clone(),
                node.id,
                self.nodes[peer].id,
                node.store.clock(),
                now,
            );
            self.nodes[me].ends.insert(
                conn,
                End {
                    peer,
                    session,
                    last_store: 0,
                },
            );
        }
        self.pump(from, conn);
        self.pump(to, conn);
    }

    /// Timers: session timeouts, due dials, partitions that cut live connections.
    fn tick(&mut self) {
        let now = self.instant();
        let broken: Vec<ConnId> = self
            .links
            .iter()
            .filter(|(_, (a, b))| !(self.allowed)(*a, *b))
            .map(|(c, _)| *c)
            .collect();
        for c in broken {
            self.break_link(c);
        }
        for n in 0..self.nodes.len() {
            if !self.nodes[n].up {
                continue;
            }
            let due: Vec<ConnId> = self.nodes[n]
                .ends
                .iter()
                .filter(|(_, e)| e.session.poll_timeout().is_some_and(|t| t <= now))
                .map(|(c, _)| *c)
                .collect();
            for c in due {
                if let Some(end) = self.nodes[n].ends.get_mut(&c) {
                    end.session.handle_timeout(now);
                }
                self.pump(n, c);
            }
            self.gossip_tick(n);
            if self.entropy {
                self.entropy_tick(n);
            }
            while let Some(dial) = self.nodes[n].dialer.poll_dial(now) {
                let to = self
                    .nodes
                    .iter()
                    .position(|x| x.id == dial.peer)
                    .unwrap_or(n);
                let incarnation = self.nodes[n].incarnation;
                // A dial carried out twice (a retried handshake) now and then.
                let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
                for _ in 0..copies {
                    let at = self.now + 1 + self.rng.below(10);
                    self.schedule(
                        at,
                        Event::DialDone {
                            from: n,
                            to,
                            incarnation,
                        },
                    );
                }
            }
        }
    }

    /// A random local write at node `n` on one of `docs` documents.
    pub fn local_write(&mut self, n: usize, docs: usize) {
        if !self.nodes[n].up {
            return;
        }
        let doc = DocId::from_bytes([self.rng.below(docs as u64) as u8; 16]);
        if self.nodes[n].deleted(&doc) {
            return;
        }
        let kind = self.rng.below(20);
        let r1 = self.rng.next_u64();
        let r2 = self.rng.next_u64();
        let node = &mut self.nodes[n];
        let body = if kind == 0 {
            DeltaBody::Tombstone
        } else {
            let am = node.doc(doc);
            let before = am.get_heads();
            let Some(change) = random_edit(am, kind, r1, r2) else {
                return;
            };
            if am.get_heads() == before {
                return;
            }
            DeltaBody::Change(change)
        };
        let mut made = Vec::new();
        for a in node.engine.handle(Input::LocalChange { doc, body }) {
            if let Action::Persist { deltas, .. } = a {
                made = deltas;
            }
        }
        node.store.insert(made.clone()); // the commit: acknowledged from here on
        self.acked.extend(made.iter().map(|d| d.id));
        self.committed(n, &made, Source::Local);
    }

    /// Runs until `until`, with a timer tick every [`TICK`].
    pub fn run_until(&mut self, until: Ms) {
        while self.now < until {
            let next_tick = (self.now / TICK + 1) * TICK;
            match self.queue.peek() {
                Some(Reverse((at, _))) if *at <= next_tick.min(until) => {
                    let Some(Reverse((at, seq))) = self.queue.pop() else {
                        break;
                    };
                    self.now = self.now.max(at);
                    if let Some(ev) = self.events.remove(&seq) {
                        self.deliver(ev);
                    }
                }
                _ => {
                    self.now = next_tick.min(until.max(self.now + 1));
                    if self.now.is_multiple_of(TICK) {
                        self.tick();
                    }
                }
            }
        }
    }

    /// No message, store or load in flight.
    pub fn quiet(&self) -> bool {
        self.queue.is_empty()
    }

    /// The invariants that hold at any quiet moment, and the violations seen so far.
    pub fn check_safety(&self) -> Result<(), String> {
        if let Some(v) = self.violations.first() {
            return Err(format!("{v} (and {} more)", self.violations.len() - 1));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if &n.store.clock() != n.engine.clock() {
                return Err(format!("node {i}: clock does not match its store"));
            }
            // Held means stored: checked at every step, not only when the network is quiet.
            for (p, s) in n.sessions() {
                let lacks = self.nodes[p].store.clock().missing_count(&n.store.clock());
                if s.in_sync() && lacks > 0 {
                    return Err(format!(
                        "node {i} says it is in sync with {p}, which lacks {lacks} deltas"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Everything: safety, convergence of clocks and documents, no acknowledged write lost,
    /// every batch acknowledged, every session in sync.
    pub fn check(&self, docs: usize) -> Result<(), String> {
        self.check_safety()?;
        let clock0 = self.nodes[0].engine.clock();
        for (i, n) in self.nodes.iter().enumerate() {
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
            for (p, s) in n.sessions() {
                if s.unacked() > 0 {
                    return Err(format!(
                        "node {i}: {} batches to {p} never acked",
                        s.unacked()
                    ));
                }
                if s.is_open() && !s.in_sync() {
                    return Err(format!("node {i}: not in sync with {p} though converged"));
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
                    let json = n
                        .docs
                        .get(&doc)
                        .map(|a| json::object_to_json(a, &ROOT).ok());
                    (heads, json, n.deleted(&doc))
                })
                .collect();
            if states.iter().any(|s| s != &states[0]) {
                return Err(format!("document {d} differs between nodes"));
            }
        }
        Ok(())
    }

    /// A summary of each node, for traces.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            s += &format!(
                "node {i}: up {} clock {} deltas, sessions {:?}\n",
                n.up,
                n.store.len(),
                n.sessions()
                    .map(|(p, s)| (p, s.in_sync(), s.unacked()))
                    .collect::<Vec<_>>()
            );
        }
        s
    }
}

/// A random edit of a small document: map keys, a list, a text.
fn random_edit(am: &mut Automerge, kind: u64, r1: u64, r2: u64) -> Option<Vec<u8>> {
    let mut tx = am.transaction();
    let list = match tx.get(ROOT, "list").ok()? {
        Some((automerge::Value::Object(ObjType::List), id)) => id,
        _ => tx.put_object(ROOT, "list", ObjType::List).ok()?,
    };
    let text = match tx.get(ROOT, "text").ok()? {
        Some((automerge::Value::Object(ObjType::Text), id)) => id,
        _ => tx.put_object(ROOT, "text", ObjType::Text).ok()?,
    };
    match kind % 4 {
        0 => tx.put(ROOT, format!("k{}", r1 % 4), r2 as i64).ok()?,
        1 => {
            let len = tx.length(&list);
            tx.insert(&list, (r1 as usize) % (len + 1), r2 as i64)
                .ok()?;
        }
        2 => {
            let len = tx.length(&list);
            if len > 0 {
                tx.delete(&list, (r1 as usize) % len).ok()?;
            }
        }
        _ => {
            let len = tx.length(&text);
            let pos = (r1 as usize) % (len + 1);
            let del = ((r2 % 3) as usize).min(len - pos);
            tx.splice_text(&text, pos, del as isize, "ab").ok()?;
        }
    }
    tx.commit();
    Some(am.get_last_local_change()?.raw_bytes().to_vec())
}

/// The outcome of one scenario.
#[derive(Debug)]
pub struct Outcome {
    pub nodes: usize,
    pub writes: usize,
    pub messages: u64,
    /// Simulated ms from heal to convergence.
    pub converged_after: Ms,
    pub sim_ms: Ms,
}

/// How long after healing every node must have converged.
pub const BOUND: Ms = 5_000;

/// How long after healing gossip must see every member alive (a member declared down while
/// cut off is heard again within seconds of the heal).
pub const HEALTH_BOUND: Ms = 20_000;

/// One random scenario: phases of partitions, crashes and writes, then heal; the invariants'
/// verdict.
pub fn scenario(seed: u64, fault: Fault) -> Result<Outcome, String> {
    let mut rng = Rng(seed ^ 0x5eed);
    let n = 2 + rng.below(7) as usize; // 2..=8 nodes
    let docs = 1 + rng.below(4) as usize;
    let mut sim = Sim::new(seed, n, fault);
    let phases = 3 + rng.below(4);
    let fail = |sim: &Sim, e: String| {
        if sim.trace {
            eprintln!("{}", sim.dump());
        }
        format!("seed {seed} ({n} nodes, fault {fault:?}): {e}")
    };
    for _ in 0..phases {
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
                sim.restart(i);
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
        sim.check_safety().map_err(|e| fail(&sim, e))?;
    }
    sim.heal();
    for i in 0..n {
        sim.restart(i);
    }
    sim.loss = 0.0;
    let healed = sim.now;
    while sim.now < healed + BOUND {
        let t = sim.now + TICK;
        sim.run_until(t);
        if sim.quiet() && sim.check(docs).is_ok() {
            break;
        }
    }
    sim.check(docs).map_err(|e| fail(&sim, e))?;
    // And gossip sees every member alive again (the restarted ones at their new incarnation).
    while !sim.all_alive() && sim.now < healed + HEALTH_BOUND {
        let t = sim.now + 50;
        sim.run_until(t);
    }
    if !sim.all_alive() {
        return Err(fail(
            &sim,
            format!("not every member alive to every other {HEALTH_BOUND} ms after the heal"),
        ));
    }
    Ok(Outcome {
        nodes: n,
        writes: sim.acked.len(),
        messages: sim.delivered,
        converged_after: sim.now - healed,
        sim_ms: sim.now,
    })
}

/// Writes at both ends of a line 0 - 1 - 2 (0 and 2 never connect), then checks: only
/// relaying can make them converge.
pub fn line_of_three(seed: u64, fault: Fault) -> Result<(), String> {
    let mut sim = Sim::new(seed, 3, fault);
    sim.loss = 0.0;
    sim.only(|a, b| a.abs_diff(b) == 1);
    for i in 0..10 {
        sim.local_write(if i % 2 == 0 { 0 } else { 2 }, 1);
        let t = sim.now + 10;
        sim.run_until(t);
    }
    let t = sim.now + 2_000;
    sim.run_until(t);
    sim.check(1)
}
