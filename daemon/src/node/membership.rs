//! Membership and peers as the node offers them (invites, joining, members, removal, peer
//! status), and [`NodeLink`]: the node seen through the network layer's narrow door
//! ([`NetHost`]).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use std::collections::BTreeSet;

use tandem_crdt::members::{Applied, MemberList};
use tandem_crdt::proto::RaftMsg;
use tandem_crdt::session::{LoadRequest, StoreFailure};
use tandem_crdt::{CatchUp, Delta, Invite, Member, MemberCommand, NodeId, VersionVector};
use tokio::sync::broadcast;

use super::{Inner, Node};
use crate::Error;
use crate::error::{DocError, MembershipError};
use crate::members::Membership;
use crate::net::BoxFuture;
use crate::net::{Commit, Net, NetError, NetHost, PeerStatus, Redeem};
use crate::raft::{Consensus, ConsensusStatus};

impl Node {
    pub(crate) fn net(&self) -> Option<&Net> {
        self.inner.net.get()
    }

    fn members_ref(&self) -> &Membership {
        &self.inner.members
    }

    /// The addresses peers can dial this node at (what an invite carries); empty offline.
    pub fn addrs(&self) -> Vec<String> {
        self.net().map(Net::advertised_addrs).unwrap_or_default()
    }

    /// The QUIC address this node listens on, if networking is on.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.net().and_then(Net::local_addr)
    }

    fn consensus(&self) -> Result<&Consensus, Error> {
        self.members_ref()
            .consensus()
            .ok_or_else(|| MembershipError::Consensus("not started".into()).into())
    }

    /// Fails if this node was removed (saying by whom and when).
    fn check_not_removed(&self) -> Result<(), Error> {
        match self.consensus()?.removed() {
            Some(r) => {
                Err(
                    MembershipError::Removed(format!(" by {} at unix ms {}", r.by.short(), r.at))
                        .into(),
                )
            }
            None => Ok(()),
        }
    }

    /// Makes a one-time invite token valid for `ttl`. Admitting needs a majority of the
    /// voters: if they are not reachable (within 3 s) this fails, naming the voters needed.
    /// If they are but the leader was just lost, it waits for the election (as a proposal
    /// would).
    pub async fn invite(&self, ttl: Duration) -> Result<String, Error> {
        let net = self.net().ok_or(NetError::Disabled)?;
        self.check_not_removed()?;
        let consensus = self.consensus()?;
        let started = self.inner.clock.now();
        loop {
            let status = consensus.status().await;
            if status.changes_possible {
                break;
            }
            let waited = self.inner.clock.now().saturating_duration_since(started);
            let patience = if status.quorum_reachable() {
                crate::raft::PROPOSE_TIMEOUT
            } else {
                Duration::from_secs(3)
            };
            if waited > patience {
                return Err(MembershipError::NoQuorum(status.why_not.unwrap_or_default()).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as i64;
        let expires_at = self.inner.clock.wall_ms().saturating_add(ttl_ms);
        let secret: [u8; 32] = rand::random();
        let (invite, write) =
            self.members_ref()
                .new_invite(secret, net.advertised_addrs(), expires_at);
        self.inner.store.write(write).await?;
        Ok(invite.to_token())
    }

    /// Joins the cluster of whoever made `token`: proves the secret to the inviter, which
    /// commits the admission; this node then leaves its own one-member cluster and follows
    /// the new one's log. A node that already has other members cannot join another cluster.
    pub async fn join(&self, token: &str) -> Result<(), Error> {
        let invite = Invite::parse(token)?;
        if invite.inviter == self.id() {
            return Err(MembershipError::OwnInvite.into());
        }
        let net = self.net().ok_or(NetError::Disabled)?;
        let consensus = self.consensus()?;
        let others = self.members().len();
        if others > 0 && consensus.removed().is_none() {
            return Err(MembershipError::AlreadyInCluster(others + 1).into());
        }
        let (raft_id, list, at) = net.join(&invite).await?;
        consensus.restart_as(raft_id, list).await?;
        self.learn_members();
        // Where the inviter just answered, whatever the list says of it: dialed at once (its
        // own first dial here came before this node knew it was a member, and was refused).
        net.learn(invite.inviter, &[at]);
        tracing::info!(raft_id, "joined the cluster");
        Ok(())
    }

    /// Tells the network where every member is (after a join, or when the list changes).
    fn learn_members(&self) {
        if let Some(net) = self.net() {
            for m in self.members() {
                let parsed: Vec<SocketAddr> =
                    m.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                net.learn(m.id, &parsed);
            }
        }
    }

    /// Follows the applied member list: new members are dialed at once, removed ones cut off
    /// everywhere, and if this node was removed it stops syncing with everyone.
    pub(super) fn follow_member_list(&self) {
        let Some(consensus) = self.members_ref().consensus() else {
            return;
        };
        let mut rx = consensus.subscribe();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut known: BTreeSet<NodeId> = BTreeSet::new();
            let mut was_removed = false;
            loop {
                let Some(node) = weak.upgrade().map(|inner| Node { inner }) else {
                    break;
                };
                let removed = node
                    .members_ref()
                    .consensus()
                    .is_some_and(|c| c.removed().is_some());
                let now: BTreeSet<NodeId> = node.members().iter().map(|m| m.id).collect();
                if let Some(net) = node.net() {
                    net.members_changed();
                    if removed && !was_removed {
                        net.leave();
                    }
                    for id in known.difference(&now).filter(|_| !removed) {
                        net.remove(*id);
                        tracing::info!(peer = %id.short(), "member removed; cut off");
                    }
                    if now.difference(&known).next().is_some() {
                        node.learn_members();
                    }
                }
                was_removed = removed;
                known = now;
                drop(node);
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// Inviter side of a join: takes the invite, commits the admission (through the leader),
    /// and returns the joiner's Raft id and the member list. A failed admission gives the
    /// invite back.
    async fn redeem_invite(&self, req: Redeem) -> Result<(u64, MemberList), Error> {
        let by = req.by;
        if by == self.id() {
            return Err(MembershipError::OwnInvite.into());
        }
        self.check_not_removed()?;
        let hash = self
            .members_ref()
            .reserve(&req.secret, self.inner.clock.wall_ms())?;
        let cmd = MemberCommand::Admit {
            id: by,
            name: req.name,
            addrs: req.addrs,
            prefer_voter: req.prefer_voter,
            by: self.id(),
            at: self.inner.clock.wall_ms(),
        };
        let consensus = self.consensus()?;
        let raft_id = match consensus.propose(cmd).await {
            Ok(Applied::Admitted { raft_id }) => raft_id,
            Ok(other) => {
                self.members_ref().release(&hash);
                return Err(MembershipError::Consensus(format!("admission: {other:?}")).into());
            }
            Err(e) => {
                self.members_ref().release(&hash);
                return Err(e.into());
            }
        };
        if let Err(e) = self.inner.store.write(Membership::used(hash, by)).await {
            tracing::warn!(error = %e, "could not record the invite as used");
        }
        // The leader applied it; this node (if not the leader) applies it a moment later.
        let deadline = self.inner.clock.now() + Duration::from_secs(2);
        while !consensus.list().is_member(&by) && self.inner.clock.now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let list = (*consensus.list()).clone();
        if !list.is_member(&by) {
            tracing::debug!("admission not applied here yet; the joiner learns it from the log");
        }
        Ok((raft_id, list))
    }

    /// Nodes seen on the LAN (members or not): id, addresses, when (unix ms).
    pub fn nearby(&self) -> Vec<(NodeId, Vec<SocketAddr>, i64)> {
        self.net().map(Net::nearby).unwrap_or_default()
    }

    /// The nodes this node syncs with: the replicated member list (without this node).
    pub fn members(&self) -> Vec<Member> {
        self.members_ref().members()
    }

    /// Records where a member was just reached (a failed write only loses the hint).
    async fn note_member_addr(&self, id: NodeId, addr: SocketAddr) {
        if let Some(w) = self.members_ref().reached_at(id, addr.to_string())
            && let Err(e) = self.inner.store.write(w).await
        {
            tracing::warn!(peer = %id.short(), error = %e, "could not record a member's address");
        }
    }

    /// Removes a member: a Raft commit (needs a majority of the voters). Once applied, every
    /// member closes its connection and refuses it. Returns whether it was a member.
    pub async fn remove_member(&self, id: NodeId) -> Result<bool, Error> {
        if id == self.id() {
            return Err(MembershipError::RemoveSelf.into());
        }
        self.check_not_removed()?;
        let cmd = MemberCommand::Remove {
            id,
            by: self.id(),
            at: self.inner.clock.wall_ms(),
        };
        let removed = matches!(
            self.consensus()?.propose(cmd).await?,
            Applied::Removed(true)
        );
        if removed {
            tracing::info!(peer = %id.short(), "member removed");
        }
        Ok(removed)
    }

    /// Fault injection for tests (like raft-rs's `Network::cut`): no connection to or from
    /// `peers` until the next call; an empty list heals every link. Both ends should cut.
    #[doc(hidden)]
    pub fn cut_links_for_tests(&self, peers: &[NodeId]) {
        if let Some(net) = self.net() {
            net.cut(peers.iter().copied().collect());
        }
    }

    /// For fuzzing: serves one Raft stream frame body as if member `from` had sent it, and
    /// names the reply (`None` if it does not decode). `samples` gives well-formed frames to
    /// start from.
    #[doc(hidden)]
    pub async fn raft_frame_for_tests(&self, from: NodeId, body: &[u8]) -> Option<&'static str> {
        use tandem_crdt::proto::Message as _;
        let msg = tandem_crdt::proto::decode::<RaftMsg>(body).ok()?;
        let reply = self.members_ref().consensus()?.serve(from, msg).await;
        Some(reply.name())
    }

    #[doc(hidden)]
    pub fn raft_samples_for_tests(&self, from_raft_id: u64, from: NodeId) -> Vec<Vec<u8>> {
        self.members_ref()
            .consensus()
            .map(|c| c.sample_requests(from_raft_id, from))
            .unwrap_or_default()
            .iter()
            .filter_map(|m| tandem_crdt::proto::encode(m).ok())
            .collect()
    }

    /// Membership as Raft sees it here: role, leader, voters, whether changes are possible.
    pub async fn membership_status(&self) -> Result<ConsensusStatus, Error> {
        Ok(self.consensus()?.status().await)
    }

    /// Recovery after voters were lost for good: starts a new epoch of the member list in
    /// which this node is the only voter (others rejoin it as they reconnect). Returns the new
    /// epoch. Run it on one survivor only: two recoveries make two rival epochs.
    pub async fn recover_membership(&self) -> Result<u64, Error> {
        let epoch = self.consensus()?.recover().await?;
        self.learn_members();
        Ok(epoch)
    }

    /// Every later change of a member's health as gossip sees it (`None` without networking).
    pub(crate) fn subscribe_health(
        &self,
    ) -> Option<tokio::sync::broadcast::Receiver<crate::net::gossip::HealthChange>> {
        self.net().map(Net::subscribe_health)
    }

    /// Gossip datagrams dropped so far, by reason.
    pub fn gossip_dropped(&self) -> Vec<(&'static str, u64)> {
        self.net().map(Net::gossip_dropped).unwrap_or_default()
    }

    /// Anti-entropy exchanges this node asked for (each repaired a gap live sync left open).
    pub fn entropy_exchanges(&self) -> u64 {
        self.net().map_or(0, Net::entropy_exchanges)
    }

    /// Every member, connected or not, with its traffic, what it lacks of ours (as it
    /// confirmed), and whether we are in sync.
    pub fn peers(&self) -> Vec<PeerStatus> {
        let mut peers: std::collections::BTreeMap<NodeId, PeerStatus> = self
            .net()
            .map(Net::statuses)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| Some((p.id?, p)))
            .collect();
        for m in self.members() {
            peers.entry(m.id).or_insert_with(|| PeerStatus {
                id: Some(m.id),
                ..PeerStatus::default()
            });
        }
        // Judged against the committed clock now: a write since the peer confirmed (or since
        // it left) is something it lacks.
        let ours = self.clock();
        let health = self.net().map(Net::health).unwrap_or_default();
        for (id, p) in peers.iter_mut() {
            if let Some((h, since)) = health.get(id) {
                p.health = Some(h);
                p.health_since = Some(*since);
            }
            p.lacks = p.held.as_ref().map(|h| h.missing_count(&ours));
            p.in_sync = p.connected
                && p.held
                    .as_ref()
                    .is_some_and(|h| h.compare(&ours) == tandem_crdt::Causality::Equal);
        }
        peers.into_values().collect()
    }
}

/// The node as the network layer sees it. Holds the node weakly: the node owns the network,
/// not the other way round, and a call after the node is gone fails softly.
pub(crate) struct NodeLink {
    inner: Weak<Inner>,
    id: NodeId,
    name: String,
    prefer_voter: bool,
}

impl NodeLink {
    pub(crate) fn new(node: &Node, prefer_voter: bool) -> Self {
        Self {
            inner: Arc::downgrade(&node.inner),
            id: node.id(),
            name: node.name().to_string(),
            prefer_voter,
        }
    }

    fn node(&self) -> Option<Node> {
        self.inner.upgrade().map(|inner| Node { inner })
    }
}

impl NetHost for NodeLink {
    fn id(&self) -> NodeId {
        self.id
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn incarnation(&self) -> u64 {
        self.node().map_or(0, |n| n.incarnation())
    }

    fn clock(&self) -> VersionVector {
        self.node().map(|n| n.clock()).unwrap_or_default()
    }

    fn subscribe_commits(&self) -> broadcast::Receiver<Commit> {
        match self.node() {
            Some(n) => n.subscribe_commits(),
            None => broadcast::channel(1).1,
        }
    }

    fn load(&self, req: LoadRequest) -> Result<(CatchUp, Option<Vec<Delta>>), String> {
        let node = self.node().ok_or("the node is closed")?;
        // The engine lock only while planning; each later batch is a store read alone.
        req.run_with(|known| node.engine().catch_up(known), &node.inner.store)
            .map_err(|e| {
                // Damage is never served: quarantined, fetched again once sessions restart.
                node.noticed(&e);
                e.to_string()
            })
    }

    fn apply_remote(
        &self,
        from: NodeId,
        deltas: Vec<Delta>,
        parsed: Vec<Option<Box<automerge::Change>>>,
        live: bool,
    ) -> BoxFuture<BoxFuture<Result<(), StoreFailure>>> {
        let node = self.node();
        // It resolves to the wait for the commit, on purpose (see `NetHost::apply_remote`).
        #[allow(clippy::async_yields_async)]
        Box::pin(async move {
            let Some(node) = node else {
                let closed: BoxFuture<_> =
                    Box::pin(async { Err(StoreFailure::Failed("the node is closed".into())) });
                return closed;
            };
            let received = node.queue_remote(from, deltas, parsed, live).await;
            let wait: BoxFuture<_> = Box::pin(async move {
                match received.wait().await {
                    Ok(()) => Ok(()),
                    Err(Error::Doc(DocError::InvalidDelta(why))) => Err(StoreFailure::Invalid(why)),
                    Err(e) => Err(StoreFailure::Failed(e.to_string())),
                }
            });
            wait
        })
    }

    fn is_member(&self, id: &NodeId) -> bool {
        self.node().is_some_and(|n| n.members_ref().is_member(id))
    }

    fn members(&self) -> Vec<Member> {
        self.node().map(|n| n.members()).unwrap_or_default()
    }

    fn prefer_voter(&self) -> bool {
        self.prefer_voter
    }

    fn peer_seen_at(&self, id: NodeId, addr: SocketAddr) -> BoxFuture<()> {
        let node = self.node();
        Box::pin(async move {
            if let Some(n) = node {
                n.note_member_addr(id, addr).await;
            }
        })
    }

    fn redeem_invite(&self, req: Redeem) -> BoxFuture<Result<(u64, MemberList), String>> {
        let node = self.node();
        Box::pin(async move {
            let node = node.ok_or("the node is closed")?;
            node.redeem_invite(req).await.map_err(|e| e.to_string())
        })
    }

    fn raft(&self, from: NodeId, msg: RaftMsg) -> BoxFuture<RaftMsg> {
        let node = self.node();
        Box::pin(async move {
            match node.as_ref().and_then(|n| n.members_ref().consensus()) {
                Some(c) => c.serve(from, msg).await,
                None => RaftMsg::Refused {
                    reason: "the node is closed".into(),
                },
            }
        })
    }

    fn told_removed(&self, by: NodeId) -> BoxFuture<()> {
        let node = self.node();
        Box::pin(async move {
            if let Some(c) = node.as_ref().and_then(|n| n.members_ref().consensus()) {
                c.told_removed(by).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;
    use crate::node::Config;

    /// This node's addresses as its member list has them.
    fn listed_addrs(node: &Node) -> Option<Vec<String>> {
        let c = node.members_ref().consensus()?;
        Some(c.list().members.get(&node.id())?.addrs.clone())
    }

    /// A node that founded its cluster without a network (offline, or before its network was
    /// up) lists its addresses once it has them: a joiner reads where to dial it there.
    #[tokio::test]
    async fn a_founder_listed_without_addresses_lists_them_once_online() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(Config::new(dir.path())).await.unwrap();
        let mut waited = 0;
        while listed_addrs(&node).is_none() {
            assert!(waited < 500, "the cluster was never founded");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        assert_eq!(listed_addrs(&node), Some(Vec::new()));
        node.close().await.unwrap();
        drop(node);

        let mut cfg = Config::new(dir.path());
        cfg.net = Some(crate::NetConfig::loopback());
        let node = Node::open(cfg).await.unwrap();
        let addrs = node.addrs();
        assert!(!addrs.is_empty());
        let mut waited = 0;
        while listed_addrs(&node).as_ref() != Some(&addrs) {
            assert!(waited < 500, "listed: {:?}", listed_addrs(&node));
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
    }
}
