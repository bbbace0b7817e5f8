//! Membership and peers as the node offers them (invites, joining, members, removal, peer
//! status), and [`NodeLink`]: the node seen through the network layer's narrow door
//! ([`NetHost`]).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tandem_crdt::session::{LoadRequest, StoreFailure};
use tandem_crdt::{CatchUp, Delta, Invite, Member, NodeId, VersionVector};
use tokio::sync::broadcast;

use super::{Inner, Node};
use crate::Error;
use crate::error::{DocError, MembershipError};
use crate::members::Membership;
use crate::net::BoxFuture;
use crate::net::{Commit, MemberAddrs, Net, NetError, NetHost, PeerStatus};

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

    /// Makes a one-time invite token valid for `ttl`.
    pub async fn invite(&self, ttl: Duration) -> Result<String, Error> {
        let net = self.net().ok_or(NetError::Disabled)?;
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128) as i64;
        let expires_at = self.inner.clock.wall_ms().saturating_add(ttl_ms);
        let secret: [u8; 32] = rand::random();
        let (invite, write) =
            self.members_ref()
                .new_invite(secret, net.advertised_addrs(), expires_at);
        self.inner.store.write(write).await?;
        Ok(invite.to_token())
    }

    /// Joins the cluster of whoever made `token`: proves the secret to the inviter, and records
    /// the inviter and its members as members here.
    pub async fn join(&self, token: &str) -> Result<(), Error> {
        let invite = Invite::parse(token)?;
        if invite.inviter == self.id() {
            return Err(MembershipError::OwnInvite.into());
        }
        let net = self.net().ok_or(NetError::Disabled)?;
        let members = net.join(&invite).await?;
        let all = std::iter::once((invite.inviter, invite.addrs.clone())).chain(members);
        for (id, addrs) in all {
            if id == self.id() {
                continue;
            }
            self.add_member(id, addrs).await?;
        }
        Ok(())
    }

    async fn add_member(&self, id: NodeId, addrs: Vec<String>) -> Result<(), Error> {
        let parsed: Vec<SocketAddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
        if let Some(w) = self
            .members_ref()
            .add(id, addrs, self.inner.clock.wall_ms())
        {
            self.inner.store.write(w).await?;
        }
        if let Some(net) = self.net() {
            net.learn(id, &parsed);
        }
        Ok(())
    }

    /// Inviter side of a join: checks the secret and records the new member. Returns our
    /// member list for the joiner.
    async fn redeem_invite(
        &self,
        secret: &[u8; 32],
        by: NodeId,
        addrs: Vec<String>,
    ) -> Result<MemberAddrs, Error> {
        if by == self.id() {
            return Err(MembershipError::OwnInvite.into());
        }
        let write = self
            .members_ref()
            .redeem(secret, by, self.inner.clock.wall_ms())?;
        self.inner.store.write(write).await?;
        self.add_member(by, addrs).await?;
        Ok(self
            .members()
            .into_iter()
            .filter(|m| m.id != by)
            .map(|m| (m.id, m.addrs))
            .collect())
    }

    /// Nodes seen on the LAN (members or not): id, addresses, when (unix ms).
    pub fn nearby(&self) -> Vec<(NodeId, Vec<SocketAddr>, i64)> {
        self.net().map(Net::nearby).unwrap_or_default()
    }

    /// The nodes this node syncs with.
    pub fn members(&self) -> Vec<Member> {
        self.members_ref().members()
    }

    /// Records where a member was just reached, first among its addresses (at most 4 kept),
    /// so the next dial finds it even after both restarted on new ports. A failed write only
    /// loses the address.
    async fn note_member_addr(&self, id: NodeId, addr: SocketAddr) {
        let Some(m) = self.members().into_iter().find(|m| m.id == id) else {
            return;
        };
        let addr = addr.to_string();
        if m.addrs.first() == Some(&addr) {
            return;
        }
        let rest = m.addrs.into_iter().filter(|a| *a != addr).take(3);
        let addrs: Vec<String> = std::iter::once(addr.clone()).chain(rest).collect();
        if let Some(w) = self
            .members_ref()
            .add(id, addrs, self.inner.clock.wall_ms())
            && let Err(e) = self.inner.store.write(w).await
        {
            tracing::warn!(peer = %id.short(), error = %e, "could not record a member's address");
        }
    }

    /// Records the name a member gave in its Hello (a failed write only loses the name).
    async fn note_member_name(&self, id: NodeId, name: &str) {
        if let Some(write) = self.members_ref().set_name(&id, name)
            && let Err(e) = self.inner.store.write(write).await
        {
            tracing::warn!(peer = %id.short(), error = %e, "could not record a member's name");
        }
    }

    /// Removes a member: it is disconnected at once and refused from then on. Returns whether
    /// it was a member.
    pub async fn remove_member(&self, id: NodeId) -> Result<bool, Error> {
        let Some(write) = self.members_ref().remove(&id) else {
            return Ok(false);
        };
        self.inner.store.write(write).await?;
        if let Some(net) = self.net() {
            net.remove(id);
        }
        tracing::info!(peer = %id.short(), "member removed");
        Ok(true)
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
        for p in peers.values_mut() {
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
}

impl NodeLink {
    pub(crate) fn new(node: &Node) -> Self {
        Self {
            inner: Arc::downgrade(&node.inner),
            id: node.id(),
            name: node.name().to_string(),
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
    ) -> BoxFuture<Result<(), StoreFailure>> {
        let node = self.node();
        Box::pin(async move {
            let node = node.ok_or_else(|| StoreFailure::Failed("the node is closed".into()))?;
            match node.apply_remote(from, deltas).await {
                Ok(()) => Ok(()),
                Err(Error::Doc(DocError::InvalidDelta(why))) => Err(StoreFailure::Invalid(why)),
                Err(e) => Err(StoreFailure::Failed(e.to_string())),
            }
        })
    }

    fn is_member(&self, id: &NodeId) -> bool {
        self.node().is_some_and(|n| n.members_ref().is_member(id))
    }

    fn members(&self) -> Vec<Member> {
        self.node().map(|n| n.members()).unwrap_or_default()
    }

    fn peer_seen_at(&self, id: NodeId, addr: SocketAddr) -> BoxFuture<()> {
        let node = self.node();
        Box::pin(async move {
            if let Some(n) = node {
                n.note_member_addr(id, addr).await;
            }
        })
    }

    fn peer_named(&self, id: NodeId, name: String) -> BoxFuture<()> {
        let node = self.node();
        Box::pin(async move {
            if let Some(n) = node {
                n.note_member_name(id, &name).await;
            }
        })
    }

    fn redeem_invite(
        &self,
        secret: [u8; 32],
        by: NodeId,
        addrs: Vec<String>,
    ) -> BoxFuture<Result<MemberAddrs, String>> {
        let node = self.node();
        Box::pin(async move {
            let node = node.ok_or("the node is closed")?;
            node.redeem_invite(&secret, by, addrs)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
