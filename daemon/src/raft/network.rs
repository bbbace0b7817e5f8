//! Raft RPCs over member connections: openraft's network traits on one side, the RPC
//! envelope ([`RaftMsg`]) on the other, carried by the network layer's [`crate::net::RaftLink`]
//! (one bi stream of kind `Raft` per RPC, on the connection to that member).

use std::sync::Arc;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tandem_crdt::NodeId;
use tandem_crdt::members::{Applied, Command};
use tandem_crdt::proto::RaftMsg;

use super::{Shared, TypeConfig};

/// One RPC, inside [`RaftMsg::Request`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Rpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command for the leader to commit (a non-leader forwards proposals).
    Propose(Command),
}

/// A reply, inside [`RaftMsg::Reply`]; errors as text.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RpcReply {
    Append(Result<AppendEntriesResponse<u64>, String>),
    Vote(Result<VoteResponse<u64>, String>),
    Snapshot(Result<InstallSnapshotResponse<u64>, String>),
    Proposed(Result<Applied, String>),
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

fn unreachable<E: std::error::Error>(why: impl Into<String>) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&Failure(why.into())))
}

fn network<E: std::error::Error>(why: impl Into<String>) -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&Failure(why.into())))
}

/// Makes a client per target; the target's NodeId is its node data.
#[derive(Clone)]
pub(crate) struct Network {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Client {
    shared: Arc<Shared>,
    target: Option<NodeId>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Client;

    async fn new_client(&mut self, _target: u64, node: &BasicNode) -> Client {
        Client {
            shared: self.shared.clone(),
            target: node.addr.parse().ok(),
        }
    }
}

impl Client {
    async fn call<E: std::error::Error>(
        &self,
        rpc: Rpc,
    ) -> Result<RpcReply, RPCError<u64, BasicNode, E>> {
        let Some(to) = self.target else {
            return Err(unreachable("the member's node data is not a NodeId"));
        };
        self.shared.call(to, &rpc).await.map_err(|e| match e {
            CallError::Unreachable(why) => unreachable(why),
            CallError::Failed(why) => network(why),
        })
    }
}

/// Why an RPC got no reply.
#[derive(Debug)]
pub(crate) enum CallError {
    /// No connection, or it broke: back off.
    Unreachable(String),
    /// The peer answered with a refusal or garbage.
    Failed(String),
}

impl Shared {
    /// One RPC to `to`: wraps it in this node's cluster and epoch, unwraps the reply. A reply
    /// saying `to` is in a later epoch makes this node adopt it.
    pub(crate) async fn call(
        self: &Arc<Self>,
        to: NodeId,
        rpc: &Rpc,
    ) -> Result<RpcReply, CallError> {
        let Some(link) = self.link.get() else {
            return Err(CallError::Unreachable("networking is off".into()));
        };
        let list = self.trusted_list();
        let msg = RaftMsg::Request {
            cluster: list.cluster,
            epoch: list.epoch,
            rpc: postcard::to_allocvec(rpc).map_err(|e| CallError::Failed(e.to_string()))?,
        };
        match link.call(to, msg).await {
            Err(why) => Err(CallError::Unreachable(why)),
            Ok(RaftMsg::Reply { rpc }) => {
                postcard::from_bytes(&rpc).map_err(|e| CallError::Failed(e.to_string()))
            }
            Ok(RaftMsg::StaleEpoch { epoch }) => {
                self.stale_epoch(to, epoch);
                Err(CallError::Failed(format!(
                    "{} is in epoch {epoch}",
                    to.short()
                )))
            }
            Ok(RaftMsg::Refused { reason }) => Err(CallError::Failed(reason)),
            Ok(RaftMsg::Request { .. }) => Err(CallError::Failed("a request as a reply".into())),
        }
    }
}

impl RaftNetwork<TypeConfig> for Client {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(Rpc::Append(rpc)).await? {
            RpcReply::Append(Ok(r)) => Ok(r),
            RpcReply::Append(Err(e)) => Err(network(e)),
            _ => Err(network("wrong reply")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self.call(Rpc::Snapshot(rpc)).await? {
            RpcReply::Snapshot(Ok(r)) => Ok(r),
            RpcReply::Snapshot(Err(e)) => Err(network(e)),
            _ => Err(network("wrong reply")),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(Rpc::Vote(rpc)).await? {
            RpcReply::Vote(Ok(r)) => Ok(r),
            RpcReply::Vote(Err(e)) => Err(network(e)),
            _ => Err(network("wrong reply")),
        }
    }
}
