//! How `net` sees the node: [`NetHost`], a narrow door. A replica offers a session its
//! committed clock, a feed of commits, loads from the store and the receive path; membership
//! is a read-only view plus what the protocol brings in (an invite to redeem, a Raft RPC, a
//! member saying this node was removed). The node implements it; `net` never imports the node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tandem_crdt::engine::Source;
use tandem_crdt::members::MemberList;
use tandem_crdt::proto::RaftMsg;
use tandem_crdt::session::{LoadRequest, StoreFailure};
use tandem_crdt::{CatchUp, Delta, Member, NodeId, VersionVector};
use tokio::sync::broadcast;

/// A boxed future, for the host's async methods (the trait is used as `dyn`).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An invite presented by a joiner, for the inviter's node to redeem.
#[derive(Debug, Clone)]
pub(crate) struct Redeem {
    pub(crate) secret: [u8; 32],
    pub(crate) by: NodeId,
    pub(crate) addrs: Vec<String>,
    pub(crate) name: String,
    pub(crate) prefer_voter: bool,
}

/// Deltas the node committed, in commit order: made here (`Local`) or received (`Remote`).
#[derive(Debug, Clone)]
pub(crate) struct Commit {
    pub(crate) deltas: Arc<Vec<Delta>>,
    pub(crate) source: Source,
}

/// What the node offers the network layer.
pub(crate) trait NetHost: Send + Sync + 'static {
    fn id(&self) -> NodeId;
    /// What this node calls itself (sent in Hello).
    fn name(&self) -> String;
    /// This run's incarnation (renewed on every start): gossip's identity is (id, incarnation).
    fn incarnation(&self) -> u64;

    // The replica.
    /// The committed clock: exactly what is on disk.
    fn clock(&self) -> VersionVector;
    /// Every later commit. Subscribe before reading [`NetHost::clock`].
    fn subscribe_commits(&self) -> broadcast::Receiver<Commit>;
    /// Carries out a session's load request. Blocking (reads SQLite).
    fn load(&self, req: LoadRequest) -> Result<(CatchUp, Option<Vec<Delta>>), String>;
    /// The receive path: validate, deduplicate, apply, commit, announce. In two steps: the
    /// outer future validates, applies and queues the commit, and resolves to the inner one,
    /// which waits for that commit. A session runs the outer ones one after another, in the
    /// order of its stores (a batch may build on the one queued before it), and waits for the
    /// commits meanwhile. The caller must run both to their end (in tasks never aborted): one
    /// dropped half-way would leave documents changed in memory but not committed. `live`: a
    /// push, not a catch-up batch (see [`tandem_crdt::session::Output::Store`]). `parsed`:
    /// changes parsed on arrival, by position (see [`tandem_crdt::Input::RemoteParsed`]).
    fn apply_remote(
        &self,
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
        live: bool,
    ) -> BoxFuture<BoxFuture<Result<(), StoreFailure>>>;

    // Membership.
    fn is_member(&self, id: &NodeId) -> bool;
    fn members(&self) -> Vec<Member>;
    /// Whether this node asks to be a voter whenever possible (said when joining).
    fn prefer_voter(&self) -> bool;
    /// A member was just reached at `addr`: remember it first among its addresses.
    fn peer_seen_at(&self, id: NodeId, addr: std::net::SocketAddr) -> BoxFuture<()>;
    /// Inviter side of a join: checks the secret and commits the admission; returns the
    /// joiner's Raft id and the member list.
    fn redeem_invite(&self, req: Redeem) -> BoxFuture<Result<(u64, MemberList), String>>;
    /// Serves one Raft RPC from member `from`.
    fn raft(&self, from: NodeId, msg: RaftMsg) -> BoxFuture<RaftMsg>;
    /// Member `by` closed our connection saying this node was removed.
    fn told_removed(&self, by: NodeId) -> BoxFuture<()>;
}

/// How Raft reaches a member: one request, one reply, on the live connection to it.
pub(crate) trait RaftLink: Send + Sync + 'static {
    /// Sends `msg` to `to`; the reply, or why there is none.
    fn call(&self, to: NodeId, msg: RaftMsg) -> BoxFuture<Result<RaftMsg, String>>;
    /// Whether a connection to `to` is up now.
    fn connected(&self, to: &NodeId) -> bool;
    /// Whether `to` looks alive: connected, and gossip does not suspect it (a stopped process
    /// keeps its connection open until the idle timeout; SWIM notices sooner).
    fn alive(&self, to: &NodeId) -> bool;
}
