//! One sync session with one peer, as a sans-IO state machine in the style of quinn-proto:
//! the caller feeds it what happened (`handle_*`, each with `now`) and carries out what it asks
//! for ([`Session::poll_output`]); it reads no clock, touches no socket and no store.
//!
//! The protocol it runs (see `docs/protocol.md`):
//! - Both sides send [`SyncMsg::Hello`] (version, NodeId, clock) first on the sync stream. A
//!   wrong version, a Hello naming another node than the connection's pinned identity, or no
//!   Hello within [`SessionConfig::hello_timeout`] closes the session.
//! - Catch-up: what the peer lacks, in `(origin, seq)` order, in batches of at most
//!   [`SessionConfig::batch_bytes`], at most [`SessionConfig::window`] unacknowledged. The
//!   receiver stores each batch before it acknowledges it; a batch over the window, out of
//!   order, or an ack for no batch is a protocol error, and a batch not acknowledged within
//!   [`SessionConfig::ack_timeout`] closes the session. [`SyncMsg::CaughtUp`] ends it.
//! - Push: every delta this node commits (made here or received from anyone: that is the
//!   relay) goes on the push stream if the peer is not known to hold it.
//! - Lag: if the push stream backs up past [`SessionConfig::push_buffer`] bytes, or the node's
//!   feed of commits overflowed, live pushes stop and, once the stream drains, what the peer
//!   lacks is sent from the store instead ("repair"): a slow peer never holds up local writes.
//! - Acks: a peer holds a delta only once it said so: its Hello clock, what it sent us, the
//!   batches it acknowledged, and the pushes it acknowledged with [`SyncMsg::PushAck`]. What
//!   was merely sent is not held (the peer may be stopped, or crash before storing it).
//! - In sync: our committed clock equals what the peer holds.
//!
//! Storage leaves the session as requests ([`Output::Load`], [`Output::Store`]) and comes back
//! as inputs ([`Session::handle_loaded`], [`Session::handle_stored`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::clock::VersionVector;
use crate::delta::Delta;
use crate::engine::{CatchUp, Source};
use crate::id::{DeltaId, NodeId};
use crate::peer::PeerSync;
use crate::proto::{BATCH_BYTES, PROTOCOL_VERSION, PushMsg, SyncMsg};

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Unacknowledged catch-up batches allowed in flight, each way.
    pub window: usize,
    /// Target size of one catch-up batch.
    pub batch_bytes: usize,
    /// Most bytes of received batches and pushes stored at once: what waits while a store
    /// runs joins the next one up to this, so a receiver that falls behind commits less often
    /// (each commit has a fixed cost: an fsync, the pages every commit rewrites). Default two
    /// batches: with a window of four, the next two arrive while these are stored (four at
    /// once left the receiver waiting for the sender to refill the whole window).
    pub store_bytes: usize,
    /// Store requests out at once: the next is validated and queued while the one before
    /// commits (the host carries them out in order; see [`Output::Store`]). At least one (a
    /// session given none takes one).
    pub stores: usize,
    /// How long to wait for the peer's Hello.
    pub hello_timeout: Duration,
    /// How long a sent batch may wait for its ack.
    pub ack_timeout: Duration,
    /// Bytes of pushes handed out but not yet written before live pushing stops (lag).
    pub push_buffer: usize,
    /// What this node calls itself, sent in Hello.
    pub name: String,
    /// A deliberate bug, for proving that the simulator's invariants catch it. Always
    /// [`Fault::None`] outside tests.
    #[doc(hidden)]
    pub fault: Fault,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            window: 4,
            batch_bytes: BATCH_BYTES,
            store_bytes: 2 * BATCH_BYTES,
            stores: 2,
            hello_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(120),
            push_buffer: 1 << 20,
            name: String::new(),
            fault: Fault::None,
        }
    }
}

/// Bugs that can be switched on in a session, so tests can show the simulator catches them.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Deltas received from others are not pushed on (no relay).
    NoRelay,
    /// Pushes are not filtered by what the peer is known to hold.
    NoPushFilter,
    /// A batch is acknowledged on arrival, before it is stored.
    AckBeforeStore,
}

/// Which stream of catch-up a load is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The catch-up after Hello, sent as [`SyncMsg::Batch`]es.
    CatchUp,
    /// Sending from the store after the push feed lagged, as [`PushMsg::Push`]es.
    Repair,
}

/// Where a load starts.
#[derive(Debug, Clone)]
pub enum Cursor {
    /// Plan what a peer holding this clock lacks, against the node's current clock
    /// ([`crate::Engine::catch_up`]), then load the first batch.
    Start(VersionVector),
    /// Load the next batch of a plan under way.
    Continue(CatchUp),
}

/// A request to read the next batch from the store. Answer with [`Session::handle_loaded`]
/// and the plan after the batch.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    pub lane: Lane,
    pub cursor: Cursor,
    pub max_bytes: usize,
}

impl LoadRequest {
    /// Carries the request out against `engine` (for the plan) and `store`.
    pub fn run<S: crate::engine::DeltaStore>(
        self,
        engine: &crate::Engine,
        store: &S,
    ) -> Result<(CatchUp, Option<Vec<Delta>>), S::Error> {
        self.run_with(|known| engine.catch_up(known), store)
    }

    /// The same, with the plan made by `plan` only when the request starts one: a caller
    /// whose engine sits behind a lock takes it for the plan alone, not for every batch.
    pub fn run_with<S: crate::engine::DeltaStore>(
        self,
        plan: impl FnOnce(&VersionVector) -> CatchUp,
        store: &S,
    ) -> Result<(CatchUp, Option<Vec<Delta>>), S::Error> {
        let mut plan = match self.cursor {
            Cursor::Start(known) => plan(&known),
            Cursor::Continue(p) => p,
        };
        let batch = plan.next_batch(store, self.max_bytes)?;
        Ok((plan, batch))
    }
}

/// Identifies one [`Output::Store`] request.
pub type StoreId = u64;

/// Why a store request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreFailure {
    /// The peer sent a delta that failed validation (the valid ones were kept).
    Invalid(String),
    /// The node could not store them (disk full, closed).
    Failed(String),
}

/// Why a session closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// The peer broke the protocol (or sent invalid data).
    Protocol,
    /// The peer did not answer in time.
    Timeout,
    /// This node failed (its store).
    Local,
}

/// What the session asks its driver to do, in order.
#[derive(Debug, Clone)]
pub enum Output {
    /// Write a message on the sync stream.
    Send(SyncMsg),
    /// Write a message on our push stream; report it with [`Session::handle_push_written`].
    Push(PushMsg),
    /// Read a batch from the store.
    Load(LoadRequest),
    /// Store deltas the peer sent (validate, deduplicate, commit); answer with
    /// [`Session::handle_stored`]. Up to [`SessionConfig::stores`] are out at once: the host
    /// validates and queues them in the order asked, and commits them in that order (a batch
    /// may depend on the one before). `live`: they came as a push (fresh writes, a few
    /// documents), not as a catch-up batch, so a node may want their patches at once; a
    /// catch-up batch may be stored without loading its documents.
    Store {
        id: StoreId,
        deltas: Vec<Delta>,
        live: bool,
    },
    /// The peer's Hello arrived; it calls itself `name` (untrusted, for people).
    Hello { name: String },
    /// The in-sync state changed.
    InSync(bool),
    /// The peer sent everything we lacked as of our Hello.
    PeerCaughtUp,
    /// Close the connection; the session is over.
    Close { code: CloseCode, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello { deadline: Instant },
    Open,
    Closed,
}

/// State of one outgoing catch-up (or repair) plan.
#[derive(Debug)]
enum Plan {
    Idle,
    /// A load is out; its answer continues the plan.
    Loading,
    /// Waiting for room (window or push buffer) to load the next batch.
    Parked(CatchUp),
    Done,
}

/// A store request out (see [`Session::handle_stored`]).
#[derive(Debug)]
struct Storing {
    id: StoreId,
    owed: Vec<Owed>,
    result: Option<Result<(), StoreFailure>>,
}

/// A received frame waiting to be stored: its deltas, their encoded size (counted once, when
/// it arrives), and what it owes the peer.
#[derive(Debug)]
struct Received {
    owed: Owed,
    deltas: Vec<Delta>,
    bytes: usize,
}

impl Received {
    fn new(owed: Owed, deltas: Vec<Delta>) -> Self {
        let bytes = deltas.iter().map(Delta::encoded_len).sum();
        Self {
            owed,
            deltas,
            bytes,
        }
    }
}

/// What a received frame owes the peer once stored.
#[derive(Debug, Clone, Copy)]
enum Owed {
    /// An `Ack` for batch `seq`.
    Ack(u64),
    /// A count in the next `PushAck`.
    PushAck,
    /// Nothing (only under [`Fault::AckBeforeStore`], which acked on arrival).
    Nothing,
}

/// One sync session. See the module docs.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    me: NodeId,
    peer: NodeId,
    phase: Phase,
    /// What the peer holds or was sent, as far as we know (from its Hello on): the filter
    /// that keeps us from sending a delta twice.
    sync: Option<PeerSync>,
    /// What the peer confirmed it holds: its Hello clock, what it sent us, and what it
    /// acknowledged. In-sync and [`Session::lacks`] are judged on this.
    held: VersionVector,
    /// Our committed clock as we were told: the clock at start plus every commit fed since.
    ours: VersionVector,
    in_sync: bool,
    // Outgoing catch-up.
    catch_up: Plan,
    sent_batches: u64,
    /// Sent batches awaiting their ack: seq, when sent, and what they carried.
    unacked: VecDeque<(u64, Instant, Vec<DeltaId>)>,
    /// Push frames sent and not yet acknowledged, oldest first: what each carried.
    pushes_unacked: VecDeque<Vec<DeltaId>>,
    /// Push frames sent, and push frames acknowledged, since the session began.
    pushes_sent: u64,
    pushes_acked: u64,
    /// Push frames received and stored (what our `PushAck`s count).
    pushes_stored: u64,
    // Incoming.
    recv_batches: u64,
    /// Received batches not yet acknowledged (stored or queued).
    unacked_in: usize,
    received: VecDeque<Received>,
    /// Store requests out, oldest first, with what their frames owe the peer once stored and,
    /// once finished, the result (acknowledged in order).
    storing: VecDeque<Storing>,
    next_store: StoreId,
    // Outgoing pushes.
    push_sizes: VecDeque<usize>,
    push_unwritten: usize,
    lagging: bool,
    repair: Plan,
    repair_again: bool,
    /// Fault hook for the simulator: the next push frame is lost after it was accounted for.
    lose_next_push: bool,
    out: VecDeque<Output>,
}

impl Session {
    /// A session with `peer` (the identity the connection pinned), starting from our committed
    /// clock `ours`. Subscribe to the node's commits *before* reading `ours`, and feed every
    /// later commit to [`Session::handle_committed`]: then each delta is either in `ours` (sent
    /// by catch-up) or fed later (pushed), never neither. Our Hello is the first output.
    pub fn new(
        mut cfg: SessionConfig,
        me: NodeId,
        peer: NodeId,
        ours: VersionVector,
        now: Instant,
    ) -> Self {
        let hello = SyncMsg::Hello {
            version: PROTOCOL_VERSION,
            node: me,
            name: cfg.name.clone(),
            clock: ours.clone(),
        };
        let deadline = now + cfg.hello_timeout;
        cfg.stores = cfg.stores.max(1);
        Self {
            cfg,
            me,
            peer,
            phase: Phase::AwaitHello { deadline },
            sync: None,
            held: VersionVector::new(),
            ours,
            in_sync: false,
            catch_up: Plan::Idle,
            sent_batches: 0,
            unacked: VecDeque::new(),
            pushes_unacked: VecDeque::new(),
            pushes_sent: 0,
            pushes_acked: 0,
            pushes_stored: 0,
            recv_batches: 0,
            unacked_in: 0,
            received: VecDeque::new(),
            storing: VecDeque::new(),
            next_store: 0,
            push_sizes: VecDeque::new(),
            push_unwritten: 0,
            lagging: false,
            repair: Plan::Idle,
            repair_again: false,
            lose_next_push: false,
            out: VecDeque::from([Output::Send(hello)]),
        }
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The next thing to do, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitHello { deadline } => Some(deadline),
            Phase::Open => self
                .unacked
                .front()
                .map(|(_, t, _)| *t + self.cfg.ack_timeout),
            Phase::Closed => None,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Whether the peer's Hello has arrived.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Whether the driver should read the next frame of the peer's push stream. Pushes are
    /// read only after Hello (they are filtered by its clock) and one stored at a time, so a
    /// fast peer meets flow control instead of filling memory.
    pub fn wants_push(&self) -> bool {
        self.phase == Phase::Open && self.received.is_empty()
    }

    /// What the peer holds as far as we know (`None` before its Hello).
    pub fn known(&self) -> Option<&VersionVector> {
        self.sync.as_ref().map(PeerSync::known)
    }

    /// Our committed clock as the session knows it.
    pub fn ours(&self) -> &VersionVector {
        &self.ours
    }

    /// Whether our committed clock equals what the peer confirmed it holds.
    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    /// What the peer confirmed it holds (empty before its Hello).
    pub fn held(&self) -> &VersionVector {
        &self.held
    }

    /// How many deltas of ours the peer has not confirmed holding.
    pub fn lacks(&self) -> u64 {
        self.held.missing_count(&self.ours)
    }

    /// Push frames sent and not yet acknowledged.
    pub fn pushes_unacked(&self) -> usize {
        self.pushes_unacked.len()
    }

    /// Sent batches not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// The seqs of sent batches awaiting their ack, oldest first.
    pub fn unacked_seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.unacked.iter().map(|(s, _, _)| *s)
    }

    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Whether live pushes are paused because the push stream backed up.
    pub fn is_lagging(&self) -> bool {
        self.lagging
    }

    /// A frame arrived on the sync stream.
    pub fn handle_sync(&mut self, _now: Instant, msg: SyncMsg) {
        match (self.phase, msg) {
            (Phase::Closed, _) => {}
            (
                Phase::AwaitHello { .. },
                SyncMsg::Hello {
                    version,
                    node,
                    name,
                    clock,
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return self.close(
                        CloseCode::Protocol,
                        format!("unsupported protocol version {version}"),
                    );
                }
                if node != self.peer {
                    return self.close(CloseCode::Protocol, "Hello names another node".into());
                }
                self.phase = Phase::Open;
                self.held = clock.clone();
                self.sync = Some(PeerSync::new(clock.clone()));
                self.out.push_back(Output::Hello { name });
                self.catch_up = Plan::Loading;
                self.load(Lane::CatchUp, Cursor::Start(clock));
                self.update_in_sync();
            }
            (Phase::AwaitHello { .. }, other) => self.close(
                CloseCode::Protocol,
                format!(
                    "expected Hello, got {}",
                    crate::proto::Message::name(&other)
                ),
            ),
            (Phase::Open, SyncMsg::Hello { .. }) => {
                self.close(CloseCode::Protocol, "a second Hello".into())
            }
            (Phase::Open, SyncMsg::Batch { seq, deltas }) => {
                if seq != self.recv_batches + 1 {
                    return self.close(
                        CloseCode::Protocol,
                        format!(
                            "batch {seq} out of order (expected {})",
                            self.recv_batches + 1
                        ),
                    );
                }
                if self.unacked_in >= self.cfg.window {
                    return self.close(
                        CloseCode::Protocol,
                        format!("batch {seq} is over the window of {}", self.cfg.window),
                    );
                }
                self.recv_batches = seq;
                self.unacked_in += 1;
                self.note_received(&deltas);
                if self.cfg.fault == Fault::AckBeforeStore {
                    self.unacked_in -= 1;
                    self.out.push_back(Output::Send(SyncMsg::Ack { seq }));
                    self.received
                        .push_back(Received::new(Owed::Nothing, deltas));
                } else {
                    self.received
                        .push_back(Received::new(Owed::Ack(seq), deltas));
                }
                self.store_next();
                self.update_in_sync();
            }
            (Phase::Open, SyncMsg::Ack { seq }) => {
                match self.unacked.front() {
                    Some((s, _, _)) if *s == seq => {
                        if let Some((_, _, ids)) = self.unacked.pop_front() {
                            for id in ids {
                                self.held.insert(id);
                            }
                        }
                        self.update_in_sync();
                    }
                    _ => {
                        return self
                            .close(CloseCode::Protocol, format!("ack for unknown batch {seq}"));
                    }
                }
                if let Plan::Parked(_) = self.catch_up
                    && let Plan::Parked(plan) = std::mem::replace(&mut self.catch_up, Plan::Loading)
                {
                    self.load(Lane::CatchUp, Cursor::Continue(plan));
                }
            }
            (Phase::Open, SyncMsg::CaughtUp) => self.out.push_back(Output::PeerCaughtUp),
            (Phase::Open, SyncMsg::Resync { clock, reply }) => {
                // The peer's own word on what it holds, as trusted as its Hello.
                self.held.join(&clock);
                // Forget what we only believed it had (sent, never acknowledged, possibly
                // lost to a bug): from now on the filter is what it holds plus what is still
                // on its way, and the rest goes from the store.
                let mut known = self.held.clone();
                let in_flight = self.unacked.iter().map(|(_, _, ids)| ids);
                for id in in_flight.chain(&self.pushes_unacked).flatten() {
                    known.insert(*id);
                }
                self.sync = Some(PeerSync::new(known));
                self.start_repair();
                if !reply && !self.ours.missing(&clock).is_empty() {
                    self.out.push_back(Output::Send(SyncMsg::Resync {
                        clock: self.ours.clone(),
                        reply: true,
                    }));
                }
                self.update_in_sync();
            }
            (Phase::Open, SyncMsg::PushAck { stored }) => {
                if stored < self.pushes_acked || stored > self.pushes_sent {
                    return self.close(
                        CloseCode::Protocol,
                        format!(
                            "push ack for {stored} frames, with {} sent and {} acknowledged",
                            self.pushes_sent, self.pushes_acked
                        ),
                    );
                }
                while self.pushes_acked < stored {
                    self.pushes_acked += 1;
                    for id in self.pushes_unacked.pop_front().unwrap_or_default() {
                        self.held.insert(id);
                    }
                }
                self.update_in_sync();
            }
        }
    }

    /// A frame arrived on the peer's push stream.
    pub fn handle_push(&mut self, _now: Instant, msg: PushMsg) {
        match self.phase {
            Phase::Closed => {}
            Phase::AwaitHello { .. } => {
                self.close(CloseCode::Protocol, "Push before Hello".into());
            }
            Phase::Open => {
                let PushMsg::Push { deltas } = msg;
                self.note_received(&deltas);
                self.received
                    .push_back(Received::new(Owed::PushAck, deltas));
                self.store_next();
                self.update_in_sync();
            }
        }
    }

    /// A store request finished. Stores finish in any order; they are acknowledged in the
    /// order they were asked for.
    pub fn handle_stored(&mut self, _now: Instant, id: StoreId, result: Result<(), StoreFailure>) {
        if self.phase == Phase::Closed {
            return;
        }
        let Some(s) = self.storing.iter_mut().find(|s| s.id == id) else {
            return;
        };
        s.result.get_or_insert(result);
        while self.storing.front().is_some_and(|s| s.result.is_some()) {
            let Some(Storing {
                owed,
                result: Some(result),
                ..
            }) = self.storing.pop_front()
            else {
                break;
            };
            match result {
                Err(StoreFailure::Invalid(why)) => {
                    return self.close(CloseCode::Protocol, format!("invalid delta: {why}"));
                }
                Err(StoreFailure::Failed(why)) => {
                    return self.close(CloseCode::Local, format!("cannot store: {why}"));
                }
                Ok(()) => self.settle(&owed),
            }
        }
        self.store_next();
    }

    /// Received frames are stored: acknowledge them. Pushes are acknowledged by count once no
    /// further push waits to be stored, so a burst costs one `PushAck`.
    fn settle(&mut self, owed: &[Owed]) {
        let mut pushes = 0;
        for o in owed {
            match o {
                Owed::Ack(seq) => {
                    self.unacked_in -= 1;
                    self.out.push_back(Output::Send(SyncMsg::Ack { seq: *seq }));
                }
                Owed::PushAck => pushes += 1,
                Owed::Nothing => {}
            }
        }
        if pushes > 0 {
            self.pushes_stored += pushes;
            let waits = |o: &Owed| matches!(o, Owed::PushAck);
            if !self.received.iter().any(|r| waits(&r.owed))
                && !self.storing.iter().any(|s| s.owed.iter().any(waits))
            {
                self.out.push_back(Output::Send(SyncMsg::PushAck {
                    stored: self.pushes_stored,
                }));
            }
        }
    }

    /// The node committed `deltas` (made here, or received from `source`): push what the peer
    /// lacks.
    pub fn handle_committed(&mut self, _now: Instant, deltas: &[Delta], source: Source) {
        for d in deltas {
            self.ours.insert(d.id);
        }
        if self.phase != Phase::Open {
            return;
        }
        if !self.lagging {
            let relayed = matches!(source, Source::Remote(_));
            let send = match (self.cfg.fault, &self.sync) {
                (Fault::NoRelay, _) if relayed => Vec::new(),
                (Fault::NoPushFilter, _) => deltas.to_vec(),
                (_, Some(s)) => s.unknown(deltas),
                (_, None) => Vec::new(),
            };
            self.push(send);
        }
        self.update_in_sync();
    }

    /// The node's feed of commits overflowed: some commits were never fed. `committed` is the
    /// node's committed clock now. What the peer lacks goes from the store instead.
    pub fn handle_feed_lagged(&mut self, _now: Instant, committed: VersionVector) {
        self.ours = committed;
        if self.phase == Phase::Open {
            self.start_repair();
        }
        self.update_in_sync();
    }

    /// A push handed out by [`Output::Push`] was written to the stream.
    pub fn handle_push_written(&mut self, _now: Instant) {
        if let Some(size) = self.push_sizes.pop_front() {
            self.push_unwritten -= size;
        }
        if self.phase != Phase::Open || self.push_unwritten > self.cfg.push_buffer / 2 {
            return;
        }
        if self.lagging {
            self.lagging = false;
            self.start_repair();
        } else if let Plan::Parked(_) = self.repair
            && let Plan::Parked(plan) = std::mem::replace(&mut self.repair, Plan::Loading)
        {
            self.load(Lane::Repair, Cursor::Continue(plan));
        }
    }

    /// A load finished: `plan` is the plan after it, `batch` what it read (`None`: the plan
    /// is exhausted).
    pub fn handle_loaded(
        &mut self,
        now: Instant,
        lane: Lane,
        plan: CatchUp,
        batch: Option<Vec<Delta>>,
    ) {
        if self.phase != Phase::Open {
            return;
        }
        let Some(sync) = &self.sync else { return };
        match lane {
            Lane::CatchUp => {
                let Some(batch) = batch else {
                    self.catch_up = Plan::Done;
                    self.out.push_back(Output::Send(SyncMsg::CaughtUp));
                    return;
                };
                // Skip what the peer received meanwhile (by push, or from us earlier).
                let batch = sync.unknown(&batch);
                if !batch.is_empty() {
                    if let Some(s) = &mut self.sync {
                        s.note(&batch);
                    }
                    self.sent_batches += 1;
                    let ids = batch.iter().map(|d| d.id).collect();
                    self.unacked.push_back((self.sent_batches, now, ids));
                    self.out.push_back(Output::Send(SyncMsg::Batch {
                        seq: self.sent_batches,
                        deltas: batch,
                    }));
                }
                if self.unacked.len() < self.cfg.window {
                    self.catch_up = Plan::Loading;
                    self.load(Lane::CatchUp, Cursor::Continue(plan));
                } else {
                    self.catch_up = Plan::Parked(plan);
                }
            }
            Lane::Repair => {
                let Some(batch) = batch else {
                    self.repair = Plan::Idle;
                    if std::mem::take(&mut self.repair_again) {
                        self.start_repair();
                    }
                    return;
                };
                let batch = sync.unknown(&batch);
                self.push(batch);
                if self.lagging {
                    // Resumes (from scratch) when the stream drains.
                    self.repair = Plan::Idle;
                } else if self.push_unwritten > self.cfg.push_buffer / 2 {
                    self.repair = Plan::Parked(plan);
                } else {
                    self.repair = Plan::Loading;
                    self.load(Lane::Repair, Cursor::Continue(plan));
                }
            }
        }
        self.update_in_sync();
    }

    /// Time passed; closes the session if the peer is overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitHello { deadline } if now >= deadline => self.close(
                CloseCode::Timeout,
                format!("no Hello within {:?}", self.cfg.hello_timeout),
            ),
            Phase::Open => {
                if let Some((seq, at, _)) = self.unacked.front()
                    && now >= *at + self.cfg.ack_timeout
                {
                    let why = format!(
                        "batch {seq} not acknowledged within {:?}",
                        self.cfg.ack_timeout
                    );
                    self.close(CloseCode::Timeout, why);
                }
            }
            _ => {}
        }
    }

    /// Anti-entropy found that this peer and we differ although no sync is under way (a push
    /// lost to a bug, a half-dead path): send our committed clock `committed` so the peer
    /// sends what we lack (and, if it lacks something of ours, answers with its clock so we
    /// send it). Ignored before the Hello (its catch-up covers the same ground).
    pub fn resync(&mut self, _now: Instant, committed: &VersionVector) {
        if self.phase != Phase::Open {
            return;
        }
        self.ours.join(committed);
        self.out.push_back(Output::Send(SyncMsg::Resync {
            clock: self.ours.clone(),
            reply: false,
        }));
        self.update_in_sync();
    }

    /// Anti-entropy heard that the peer holds (at least) `clock`: what it said in a digest
    /// equal to ours. The peer's own word, as trusted as its Hello; in-sync is judged on it.
    pub fn handle_peer_clock(&mut self, _now: Instant, clock: &VersionVector) {
        if self.phase != Phase::Open {
            return;
        }
        self.held.join(clock);
        if let Some(s) = &mut self.sync {
            s.join(clock);
        }
        self.update_in_sync();
    }

    /// Whether a catch-up or repair is under way (anti-entropy prefers an idle peer).
    pub fn is_busy(&self) -> bool {
        !matches!(self.catch_up, Plan::Idle | Plan::Done)
            || !matches!(self.repair, Plan::Idle | Plan::Done)
            || !self.received.is_empty()
            || !self.storing.is_empty()
    }

    /// Fault hook for the simulator: the next push frame is lost after it was accounted for
    /// (the peer is believed to have been sent it), as a bug in the push path would lose it.
    #[doc(hidden)]
    pub fn lose_next_push(&mut self) {
        self.lose_next_push = true;
    }

    /// The driver cannot go on (a stream failed): the session is over.
    pub fn handle_closed(&mut self) {
        self.phase = Phase::Closed;
    }

    fn close(&mut self, code: CloseCode, reason: String) {
        if self.phase == Phase::Closed {
            return;
        }
        self.phase = Phase::Closed;
        self.out.push_back(Output::Close { code, reason });
    }

    fn load(&mut self, lane: Lane, cursor: Cursor) {
        self.out.push_back(Output::Load(LoadRequest {
            lane,
            cursor,
            max_bytes: self.cfg.batch_bytes,
        }));
    }

    fn push(&mut self, deltas: Vec<Delta>) {
        if deltas.is_empty() {
            return;
        }
        if let Some(s) = &mut self.sync {
            s.note(&deltas);
        }
        if std::mem::take(&mut self.lose_next_push) {
            return;
        }
        let size: usize = deltas.iter().map(Delta::encoded_len).sum();
        self.pushes_sent += 1;
        self.pushes_unacked
            .push_back(deltas.iter().map(|d| d.id).collect());
        self.push_sizes.push_back(size);
        self.push_unwritten += size;
        self.out.push_back(Output::Push(PushMsg::Push { deltas }));
        if self.push_unwritten > self.cfg.push_buffer {
            self.lagging = true;
        }
    }

    fn start_repair(&mut self) {
        if self.lagging {
            return; // starts when the stream drains
        }
        match self.repair {
            Plan::Idle | Plan::Done => {
                let Some(known) = self.known().cloned() else {
                    return;
                };
                self.repair = Plan::Loading;
                self.load(Lane::Repair, Cursor::Start(known));
            }
            Plan::Loading | Plan::Parked(_) => self.repair_again = true,
        }
    }

    /// Asks for the next store. What else waits joins it, up to [`SessionConfig::store_bytes`]:
    /// a node that falls behind then stores many changes at once instead of one push at a time (applying
    /// to a document costs per call as well as per change), so it catches up under load.
    fn store_next(&mut self) {
        while self.storing.len() < self.cfg.stores {
            let Some(first) = self.received.pop_front() else {
                return;
            };
            if first.deltas.is_empty() {
                self.settle(&[first.owed]);
                continue;
            }
            let mut live = matches!(first.owed, Owed::PushAck);
            let (mut owed, mut deltas, mut size) = (vec![first.owed], first.deltas, first.bytes);
            while self
                .received
                .front()
                .is_some_and(|next| size + next.bytes <= self.cfg.store_bytes)
            {
                let Some(next) = self.received.pop_front() else {
                    break;
                };
                size += next.bytes;
                live &= matches!(next.owed, Owed::PushAck);
                owed.push(next.owed);
                deltas.extend(next.deltas);
            }
            self.next_store += 1;
            self.storing.push_back(Storing {
                id: self.next_store,
                owed,
                result: None,
            });
            self.out.push_back(Output::Store {
                id: self.next_store,
                deltas,
                live,
            });
        }
    }

    /// Deltas the peer sent: it holds them (it sends only what it committed).
    fn note_received(&mut self, deltas: &[Delta]) {
        if let Some(s) = &mut self.sync {
            s.note(deltas);
        }
        for d in deltas {
            self.held.insert(d.id);
        }
    }

    fn update_in_sync(&mut self) {
        let now = self.phase == Phase::Open
            && self.ours.compare(&self.held) == crate::clock::Causality::Equal;
        if now != self.in_sync {
            self.in_sync = now;
            self.out.push_back(Output::InSync(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::DeltaBody;
    use crate::engine::{Action, Engine, Input, MemStore};
    use crate::id::DocId;

    fn n(i: u8) -> NodeId {
        crate::sign::Signer::from_seed([i; 32]).id()
    }

    fn signer(i: u8) -> std::sync::Arc<crate::sign::Signer> {
        std::sync::Arc::new(crate::sign::Signer::from_seed([i; 32]))
    }

    use crate::engine::tests::change;

    /// Node n(`node`)'s Hello, holding `clock`.
    fn hello(node: u8, clock: VersionVector) -> SyncMsg {
        SyncMsg::Hello {
            version: PROTOCOL_VERSION,
            node: n(node),
            name: String::new(),
            clock,
        }
    }

    /// A session with n(2) whose Hello (empty clock) has arrived.
    fn opened() -> Session {
        let t = Instant::now();
        let mut s = Session::new(
            SessionConfig::default(),
            n(1),
            n(2),
            VersionVector::new(),
            t,
        );
        s.handle_sync(t, hello(2, VersionVector::new()));
        s
    }

    /// One node's side: engine, store, and its session with the other.
    struct Side {
        engine: Engine,
        store: MemStore,
        session: Session,
    }

    impl Side {
        fn new(me: u8, peer: u8, writes: usize, cfg: SessionConfig, now: Instant) -> Self {
            let mut engine = Engine::new(signer(me), VersionVector::new());
            let mut store = MemStore::new();
            for i in 0..writes {
                store.insert([engine.local_delta(
                    DocId::from_bytes([me; 16]),
                    DeltaBody::Change(change(i % 50)),
                )]);
            }
            let session = Session::new(cfg, n(me), n(peer), store.clock(), now);
            Self {
                engine,
                store,
                session,
            }
        }

        /// Carries out loads and stores at once; returns the messages for the other side.
        fn drain(&mut self, now: Instant) -> Vec<Output> {
            let mut wire = Vec::new();
            while let Some(o) = self.session.poll_output() {
                match o {
                    Output::Load(req) => {
                        let lane = req.lane;
                        let (plan, batch) = req.run(&self.engine, &self.store).unwrap();
                        self.session.handle_loaded(now, lane, plan, batch);
                    }
                    Output::Store { id, deltas, .. } => {
                        let from = self.session.peer();
                        let mut fresh = Vec::new();
                        for a in self.engine.handle(Input::RemoteDeltas { from, deltas }) {
                            if let Action::Persist { deltas, .. } = a {
                                fresh = deltas;
                            }
                        }
                        self.store.insert(fresh.clone());
                        self.session
                            .handle_committed(now, &fresh, Source::Remote(from));
                        self.session.handle_stored(now, id, Ok(()));
                    }
                    Output::Push(_) => {
                        wire.push(o);
                        self.session.handle_push_written(now);
                    }
                    other => wire.push(other),
                }
            }
            wire
        }
    }

    fn deliver(to: &mut Side, msgs: Vec<Output>, now: Instant) -> Vec<Output> {
        let mut local = Vec::new();
        for m in msgs {
            match m {
                Output::Send(msg) => to.session.handle_sync(now, msg),
                Output::Push(msg) => to.session.handle_push(now, msg),
                other => local.push(other),
            }
        }
        local
    }

    fn closes(outs: &[Output]) -> Option<String> {
        outs.iter().find_map(|o| match o {
            Output::Close { reason, .. } => Some(reason.clone()),
            _ => None,
        })
    }

    fn small_batches() -> SessionConfig {
        SessionConfig {
            batch_bytes: 300,
            store_bytes: 1_200,
            ..SessionConfig::default()
        }
    }

    #[test]
    fn catch_up_is_windowed_acked_and_ends_in_sync() {
        let t = Instant::now();
        let mut a = Side::new(1, 2, 40, small_batches(), t);
        let mut b = Side::new(2, 1, 3, small_batches(), t);
        let mut max_unacked = 0;
        let mut steps = 0;
        loop {
            let from_a = a.drain(t);
            let from_b = b.drain(t);
            max_unacked = max_unacked
                .max(a.session.unacked())
                .max(b.session.unacked());
            assert!(closes(&from_a).is_none() && closes(&from_b).is_none());
            let wire = from_a
                .iter()
                .chain(&from_b)
                .any(|o| matches!(o, Output::Send(_) | Output::Push(_)));
            if !wire {
                break;
            }
            deliver(&mut b, from_a, t);
            deliver(&mut a, from_b, t);
            steps += 1;
            assert!(steps < 1_000);
        }
        assert_eq!(max_unacked, 4, "the window fills and is never exceeded");
        assert_eq!(a.store.clock(), b.store.clock());
        assert!(a.session.in_sync() && b.session.in_sync());
        assert_eq!(
            a.session.unacked() + b.session.unacked(),
            0,
            "every batch acked"
        );
    }

    #[test]
    fn a_hello_naming_another_node_closes() {
        let t = Instant::now();
        let mut a = Side::new(1, 2, 0, SessionConfig::default(), t);
        let mut imposter = Side::new(3, 1, 0, SessionConfig::default(), t);
        let hello = imposter.drain(t);
        deliver(&mut a, hello, t);
        let out = a.drain(t);
        assert_eq!(closes(&out).as_deref(), Some("Hello names another node"));
        assert!(a.session.is_closed());
    }

    #[test]
    fn wrong_version_and_messages_before_hello_close() {
        let t = Instant::now();
        let mut a = Side::new(1, 2, 0, SessionConfig::default(), t);
        a.drain(t);
        a.session.handle_sync(
            t,
            SyncMsg::Hello {
                version: 99,
                node: n(2),
                name: String::new(),
                clock: VersionVector::new(),
            },
        );
        assert!(closes(&a.drain(t)).unwrap().contains("version 99"));
        let mut a = Side::new(1, 2, 0, SessionConfig::default(), t);
        a.drain(t);
        a.session.handle_sync(t, SyncMsg::Ack { seq: 1 });
        assert!(closes(&a.drain(t)).unwrap().contains("expected Hello"));
        let mut a = Side::new(1, 2, 0, SessionConfig::default(), t);
        a.drain(t);
        assert!(!a.session.wants_push(), "pushes wait for Hello");
        a.session.handle_push(t, PushMsg::Push { deltas: vec![] });
        assert!(closes(&a.drain(t)).is_some());
    }

    #[test]
    fn a_batch_over_the_window_or_out_of_order_closes() {
        let t = Instant::now();
        let mut e = Engine::new(signer(2), VersionVector::new());
        let mut batch = |seq| SyncMsg::Batch {
            seq,
            deltas: vec![e.local_delta(DocId::from_bytes([1; 16]), DeltaBody::Tombstone)],
        };
        // Over the window: five batches while none is acknowledged (stores never finish).
        let mut s = opened();
        for seq in 1..=5 {
            s.handle_sync(t, batch(seq));
        }
        let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
        assert_eq!(
            closes(&out).as_deref(),
            Some("batch 5 is over the window of 4")
        );
        // Out of order.
        let mut s = opened();
        s.handle_sync(t, batch(2));
        let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
        assert!(closes(&out).unwrap().contains("out of order"));
        // An ack for a batch never sent.
        let mut s = opened();
        s.handle_sync(t, SyncMsg::Ack { seq: 1 });
        let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
        assert!(closes(&out).unwrap().contains("unknown batch"));
    }

    #[test]
    fn acks_follow_stores_and_invalid_deltas_close() {
        let t = Instant::now();
        let mut s = Session::new(
            SessionConfig::default(),
            n(1),
            n(2),
            VersionVector::new(),
            t,
        );
        s.handle_sync(t, hello(2, VersionVector::new()));
        let mut e = Engine::new(signer(2), VersionVector::new());
        let d = e.local_delta(DocId::from_bytes([1; 16]), DeltaBody::Change(change(1)));
        s.handle_sync(
            t,
            SyncMsg::Batch {
                seq: 1,
                deltas: vec![d],
            },
        );
        let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
        let id = out
            .iter()
            .find_map(|o| match o {
                Output::Store { id, .. } => Some(*id),
                _ => None,
            })
            .unwrap();
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::Send(SyncMsg::Ack { .. }))),
            "no ack before the store finished"
        );
        s.handle_stored(t, id, Ok(()));
        assert!(matches!(
            s.poll_output(),
            Some(Output::Send(SyncMsg::Ack { seq: 1 }))
        ));
        s.handle_push(
            t,
            PushMsg::Push {
                deltas: vec![e.local_delta(DocId::from_bytes([1; 16]), DeltaBody::Tombstone)],
            },
        );
        let Some(Output::Store { id, .. }) = s.poll_output() else {
            panic!()
        };
        s.handle_stored(t, id, Err(StoreFailure::Invalid("bad checksum".into())));
        let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
        assert!(closes(&out).unwrap().contains("bad checksum"));
    }

    #[test]
    fn timeouts_close_a_silent_peer() {
        let t = Instant::now();
        let cfg = SessionConfig::default();
        let mut s = Session::new(cfg.clone(), n(1), n(2), VersionVector::new(), t);
        assert_eq!(s.poll_timeout(), Some(t + cfg.hello_timeout));
        s.handle_timeout(t + cfg.hello_timeout - Duration::from_millis(1));
        assert!(!s.is_closed());
        s.handle_timeout(t + cfg.hello_timeout);
        assert!(s.is_closed());
        // A batch that is never acknowledged.
        let mut a = Side::new(1, 2, 5, cfg.clone(), t);
        a.drain(t);
        a.session.handle_sync(t, hello(2, VersionVector::new()));
        a.drain(t);
        assert_eq!(a.session.unacked(), 1);
        assert_eq!(a.session.poll_timeout(), Some(t + cfg.ack_timeout));
        a.session.handle_timeout(t + cfg.ack_timeout);
        assert!(closes(&a.drain(t)).unwrap().contains("not acknowledged"));
    }

    #[test]
    fn pushes_skip_what_the_peer_holds_and_lag_falls_back_to_the_store() {
        let t = Instant::now();
        let cfg = SessionConfig {
            push_buffer: 2_000,
            ..SessionConfig::default()
        };
        let mut a = Side::new(1, 2, 0, cfg, t);
        let mut b_clock = VersionVector::new();
        a.drain(t);
        a.session.handle_sync(t, hello(2, b_clock.clone()));
        a.drain(t);
        let doc = DocId::from_bytes([1; 16]);
        // Commit one: pushed. A delta the peer is known to hold: not pushed.
        let d1 = a.engine.local_delta(doc, DeltaBody::Change(change(10)));
        a.store.insert([d1.clone()]);
        a.session
            .handle_committed(t, std::slice::from_ref(&d1), Source::Local);
        let pushes = |s: &mut Session| {
            std::iter::from_fn(|| s.poll_output())
                .filter(|o| matches!(o, Output::Push(_)))
                .count()
        };
        assert_eq!(pushes(&mut a.session), 1);
        a.session.handle_push_written(t);
        a.session
            .handle_committed(t, std::slice::from_ref(&d1), Source::Local);
        assert_eq!(pushes(&mut a.session), 0, "not twice");
        b_clock.insert(d1.id);
        // The stream backs up: pushes stop past the buffer, nothing written meanwhile.
        let mut pushed = 0;
        for i in 0..20 {
            let d = a
                .engine
                .local_delta(doc, DeltaBody::Change(change(200 + i)));
            a.store.insert([d.clone()]);
            a.session.handle_committed(t, &[d], Source::Local);
            while let Some(o) = a.session.poll_output() {
                if matches!(o, Output::Push(_)) {
                    pushed += 1;
                }
            }
        }
        assert!(a.session.is_lagging());
        assert!(pushed < 20, "pushes stopped at the buffer ({pushed})");
        // It drains: the rest goes from the store, and they end in sync.
        for _ in 0..pushed {
            a.session.handle_push_written(t);
        }
        assert!(!a.session.is_lagging());
        let rest = a.drain(t);
        let repaired: usize = rest
            .iter()
            .map(|o| match o {
                Output::Push(PushMsg::Push { deltas }) => deltas.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(pushed + repaired, 20, "each delta sent exactly once");
        // Sent is not held: in sync only once the peer acknowledges storing them all.
        assert!(!a.session.in_sync());
        assert_eq!(a.session.lacks(), 21);
        let frames = a.session.pushes_unacked() as u64;
        a.session
            .handle_sync(t, SyncMsg::PushAck { stored: frames - 1 });
        assert!(!a.session.in_sync() && a.session.lacks() > 0);
        a.session
            .handle_sync(t, SyncMsg::PushAck { stored: frames });
        assert!(a.session.in_sync());
        assert_eq!(a.session.lacks(), 0);
        // An ack for more than was sent is a protocol error.
        a.session
            .handle_sync(t, SyncMsg::PushAck { stored: frames + 1 });
        assert!(a.session.is_closed());
    }

    #[test]
    fn pushes_are_acknowledged_once_stored_and_a_burst_costs_one_ack() {
        let t = Instant::now();
        let mut s = opened();
        let mut e = Engine::new(signer(2), VersionVector::new());
        let doc = DocId::from_bytes([1; 16]);
        for _ in 0..4 {
            let d = e.local_delta(doc, DeltaBody::Change(change(1)));
            s.handle_push(t, PushMsg::Push { deltas: vec![d] });
        }
        let mut acks = Vec::new();
        let mut stores = Vec::new();
        while let Some(o) = s.poll_output() {
            match o {
                Output::Store { id, deltas, live } => {
                    assert!(live, "pushes are live");
                    stores.push(deltas.len());
                    s.handle_stored(t, id, Ok(()));
                }
                Output::Send(SyncMsg::PushAck { stored }) => acks.push(stored),
                _ => {}
            }
        }
        // Two stores at a time: the first pushes alone, the two that queued behind them together.
        assert_eq!(
            stores,
            vec![1, 1, 2],
            "every frame stored, queued ones at once"
        );
        assert_eq!(acks, vec![4], "one ack once the queue drained");
    }

    #[test]
    fn two_stores_run_at_once_and_are_acknowledged_in_order() {
        let t = Instant::now();
        let mut s = opened();
        let mut e = Engine::new(signer(2), VersionVector::new());
        let doc = DocId::from_bytes([1; 16]);
        for seq in 1..=3 {
            let d = e.local_delta(doc, DeltaBody::Change(change(seq as usize)));
            s.handle_sync(
                t,
                SyncMsg::Batch {
                    seq,
                    deltas: vec![d],
                },
            );
        }
        let mut stores = Vec::new();
        let mut acks = Vec::new();
        let drain = |s: &mut Session, stores: &mut Vec<StoreId>, acks: &mut Vec<u64>| {
            while let Some(o) = s.poll_output() {
                match o {
                    Output::Store { id, .. } => stores.push(id),
                    Output::Send(SyncMsg::Ack { seq }) => acks.push(seq),
                    _ => {}
                }
            }
        };
        drain(&mut s, &mut stores, &mut acks);
        assert_eq!(
            stores,
            vec![1, 2],
            "the second is asked while the first runs"
        );
        // The second finishes first: nothing is acknowledged before the first.
        s.handle_stored(t, 2, Ok(()));
        drain(&mut s, &mut stores, &mut acks);
        assert!(acks.is_empty(), "acknowledged in order: {acks:?}");
        assert_eq!(stores, vec![1, 2], "two at a time");
        s.handle_stored(t, 1, Ok(()));
        drain(&mut s, &mut stores, &mut acks);
        assert_eq!(acks, vec![1, 2]);
        assert_eq!(stores, vec![1, 2, 3]);
        s.handle_stored(t, 3, Ok(()));
        drain(&mut s, &mut stores, &mut acks);
        assert_eq!(acks, vec![1, 2, 3]);
        assert_eq!(stores, vec![1, 2, 3], "nothing else to store");
    }

    #[test]
    fn a_resync_resends_what_a_lost_push_carried_and_answers_with_our_clock() {
        let t = Instant::now();
        let mut a = Side::new(1, 2, 0, SessionConfig::default(), t);
        a.session.handle_sync(t, hello(2, VersionVector::new()));
        a.drain(t);
        // A write whose push is lost after it was accounted for.
        let d = a
            .engine
            .local_delta(DocId::from_bytes([1; 16]), DeltaBody::Change(change(1)));
        a.store.insert([d.clone()]);
        a.session.lose_next_push();
        a.session
            .handle_committed(t, std::slice::from_ref(&d), Source::Local);
        assert!(a.drain(t).iter().all(|o| !matches!(o, Output::Push(_))));
        assert!(!a.session.in_sync());
        // The peer, holding one delta of its own, asks for an exchange.
        let mut theirs = VersionVector::new();
        theirs.insert(DeltaId {
            origin: n(2),
            seq: 1,
        });
        a.session.handle_sync(
            t,
            SyncMsg::Resync {
                clock: theirs.clone(),
                reply: false,
            },
        );
        let out = a.drain(t);
        let resent: Vec<DeltaId> = out
            .iter()
            .flat_map(|o| match o {
                Output::Push(PushMsg::Push { deltas }) => deltas.iter().map(|d| d.id).collect(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            resent,
            vec![d.id],
            "the lost delta goes again, from the store"
        );
        assert!(out.iter().any(|o| matches!(
            o,
            Output::Send(SyncMsg::Resync { reply: true, clock }) if clock.contains(d.id)
        )));
        // A reply is never answered.
        a.session.handle_sync(
            t,
            SyncMsg::Resync {
                clock: theirs,
                reply: true,
            },
        );
        assert!(
            !a.drain(t)
                .iter()
                .any(|o| matches!(o, Output::Send(SyncMsg::Resync { .. })))
        );
        // A digest equal to ours tells the session the peer holds it all.
        let mut all = a.store.clock();
        all.insert(DeltaId {
            origin: n(2),
            seq: 1,
        });
        a.session.handle_peer_clock(t, &all);
        assert_eq!(a.session.lacks(), 0);
    }
}
