//! How `net` sees the node: [`NetHost`], a narrow door. A replica offers a session its
//! committed clock, a feed of commits, loads from the store and the receive path; membership
//! is a read-only view plus the two writes the protocol makes (redeeming an invite, recording
//! the name a peer gave). The node implements it; `net` never imports the node.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tandem_crdt::engine::Source;
use tandem_crdt::session::{LoadRequest, StoreFailure};
use tandem_crdt::{CatchUp, Delta, Member, NodeId, VersionVector};
use tokio::sync::broadcast;

/// A boxed future, for the host's async methods (the trait is used as `dyn`).
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A member list as the join handshake carries it: NodeId and addresses.
pub(crate) type MemberAddrs = Vec<(NodeId, Vec<String>)>;

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

    // The replica.
    /// The committed clock: exactly what is on disk.
    fn clock(&self) -> VersionVector;
    /// Every later commit. Subscribe before reading [`NetHost::clock`].
    fn subscribe_commits(&self) -> broadcast::Receiver<Commit>;
    /// Carries out a session's load request. Blocking (reads SQLite).
    fn load(&self, req: LoadRequest) -> Result<(CatchUp, Option<Vec<Delta>>), String>;
    /// The receive path: validate, deduplicate, apply, commit, announce. The caller must run
    /// the future to its end (the session runs it in a task of its own, never aborted): one
    /// dropped half-way would leave documents changed in memory but not committed.
    fn apply_remote(&self, from: NodeId, deltas: Vec<Delta>)
    -> BoxFuture<Result<(), StoreFailure>>;

    // Membership.
    fn is_member(&self, id: &NodeId) -> bool;
    fn members(&self) -> Vec<Member>;
    /// A member was just reached at `addr`: remember it first among its addresses.
    fn peer_seen_at(&self, id: NodeId, addr: std::net::SocketAddr) -> BoxFuture<()>;
    /// A peer said its name in Hello (untrusted; for people).
    fn peer_named(&self, id: NodeId, name: String) -> BoxFuture<()>;
    /// Inviter side of a join: checks the secret, admits `by`; returns our member list.
    fn redeem_invite(
        &self,
        secret: [u8; 32],
        by: NodeId,
        addrs: Vec<String>,
    ) -> BoxFuture<Result<MemberAddrs, String>>;
}
