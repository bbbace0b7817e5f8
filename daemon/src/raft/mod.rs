//! Agreed membership: openraft replicates the member list, and only it. Data never waits for
//! a quorum; authorisation reads the list this node applied (a learner cut off keeps syncing
//! with the members it knows).
//!
//! - `storage`: the log, vote and state machine in SQLite, through the writer thread.
//! - `network`: Raft RPCs as [`RaftMsg`] envelopes (cluster, epoch) over member connections.
//! - here: the running consensus ([`Consensus`]): founding a one-member cluster on first
//!   start, proposals (forwarded to the leader), starting over as a joiner or in a new epoch,
//!   the leader's reconciliation of Raft's configuration with the list (new members become
//!   learners, removed ones leave, voters follow [`choose_voters`]), leadership driven by
//!   gossip instead of Raft's heartbeat timers ([`LeaderWatch`]), and the status.

mod network;
mod storage;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Config, Raft, ServerState};
use serde::Serialize;
use tandem_crdt::NodeId;
use tandem_crdt::members::{Applied, Candidate, Command, MemberList, Removal, choose_voters};
use tandem_crdt::proto::RaftMsg;
use tokio::sync::watch;

use network::{CallError, Network, Rpc, RpcReply};

use crate::clock::Clock;
use crate::net::RaftLink;
use crate::store::{StoreError, Writer};

openraft::declare_raft_types!(
    /// Raft over the member list: entries are member-list [`Command`]s.
    pub TypeConfig:
        D = Command,
        R = Applied,
);

/// How long a proposal waits for a commit before it is reported as impossible now (it
/// covers an election after the leader is lost: see `LeaderWatch`).
pub(crate) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(12);
/// How long one forwarded proposal waits for the leader before asking again.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(1500);
/// A member disconnected for less than this still counts as online for the voter policy
/// (a laptop's short network blip does not move the voters).
const ONLINE_GRACE: Duration = Duration::from_secs(30);

/// Why a membership change cannot be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsensusError {
    #[error("membership changes are not possible now: {0}")]
    NoQuorum(String),
    #[error("this node was removed from the cluster")]
    Removed,
    #[error("membership: {0}")]
    Failed(String),
}

/// What `tandem status` shows about membership.
#[derive(Debug, Clone, Serialize)]
pub struct ConsensusStatus {
    pub raft_id: u64,
    /// `leader`, `voter`, `learner`, `candidate`, `removed`, or `starting`.
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    /// The last member-list log entry committed and applied here.
    pub applied_index: Option<u64>,
    /// The last entry in this node's log (committed or not).
    pub last_log_index: Option<u64>,
    pub epoch: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// A change of voters is under way (Raft's joint consensus): until it completes, a
    /// change (and an election) needs a majority of the old voters and of the new ones.
    pub joint: bool,
    pub reachable_voters: usize,
    /// Whether a membership change could commit now, and if not, why.
    pub changes_possible: bool,
    pub why_not: Option<String>,
    pub removed: Option<Removal>,
    /// Log entries refused because they arrived out of log order (must stay 0).
    pub out_of_order_applies: u64,
}

impl ConsensusStatus {
    /// A majority of the voters is reachable from here (a change can commit once a leader
    /// is elected, if there is none now).
    pub fn quorum_reachable(&self) -> bool {
        majority(self.reachable_voters, self.voters.len())
    }
}

/// Whether `reachable` of `voters` voters are a majority (none of none is not).
fn majority(reachable: usize, voters: usize) -> bool {
    voters > 0 && reachable > voters / 2
}

/// What is shared by the consensus handle, its network and its tasks.
pub(crate) struct Shared {
    me: NodeId,
    name: String,
    addrs: Mutex<Vec<String>>,
    prefer_voter: bool,
    clock: Arc<dyn Clock>,
    writer: Writer,
    raft: Mutex<Option<Raft<TypeConfig>>>,
    raft_id: AtomicU64,
    /// The list authorisation reads: the applied one once founded, or the one trusted at a
    /// join or an epoch change until the new log catches up.
    list: watch::Sender<Arc<MemberList>>,
    link: OnceLock<Arc<dyn RaftLink>>,
    /// This node was removed (from the applied list, or as a member told it on closing).
    removed: Mutex<Option<Removal>>,
    /// One start-over at a time.
    resetting: tokio::sync::Mutex<()>,
    /// Bumped by every start-over: what a Raft instance left behind applies no more.
    generation: AtomicU64,
    /// Entries refused because they came out of log order (must stay 0).
    out_of_order: Arc<AtomicU64>,
}

/// The running consensus of one node.
pub(crate) struct Consensus {
    shared: Arc<Shared>,
}

fn raft_config() -> Result<Arc<Config>, ConsensusError> {
    let cfg = Config {
        cluster_name: "tandem".into(),
        // No timer-driven heartbeats or elections: an idle cluster sends nothing for Raft.
        // Gossip tells whether the leader lives ([`LeaderWatch`]); the leader catches up a
        // lagging member when it needs to. What `heartbeat_interval` still sets: the timeout of
        // one append, and openraft's tick (1.5x: a wake-up of its core, now for little but a
        // removed leader stepping down). The election timeout is the leader lease a vote
        // respects after an append (its maximum), and must exceed the heartbeat.
        enable_heartbeat: false,
        enable_elect: false,
        heartbeat_interval: 2000,
        election_timeout_min: 2500,
        election_timeout_max: 3000,
        install_snapshot_timeout: 3000,
        max_in_snapshot_log_to_keep: 100,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
        ..Default::default()
    };
    cfg.validate()
        .map(Arc::new)
        .map_err(|e| ConsensusError::Failed(e.to_string()))
}

impl Consensus {
    /// Loads Raft's state (blocking: reads SQLite).
    pub(crate) fn load(conn: &rusqlite::Connection) -> Result<LoadedState, StoreError> {
        storage::load(conn).map(LoadedState)
    }

    /// Starts the consensus from what was loaded. A node with no Raft state founds a cluster
    /// of its own (Raft id 1, the only voter); it leaves it when it joins another.
    pub(crate) async fn start(
        loaded: LoadedState,
        me: NodeId,
        name: String,
        prefer_voter: bool,
        clock: Arc<dyn Clock>,
        writer: Writer,
    ) -> Result<Consensus, ConsensusError> {
        let loaded = loaded.0;
        let trusted = if loaded.list().founded() {
            loaded.list().clone()
        } else {
            loaded.trusted.clone().unwrap_or_default()
        };
        let removed = trusted.removal(&me).cloned();
        let (list, _) = watch::channel(Arc::new(trusted));
        let pristine = loaded.raft_id.is_none() && loaded.pristine();
        let raft_id = loaded.raft_id.unwrap_or(1);
        let shared = Arc::new(Shared {
            me,
            name,
            addrs: Mutex::new(Vec::new()),
            prefer_voter,
            clock,
            writer: writer.clone(),
            raft: Mutex::new(None),
            raft_id: AtomicU64::new(raft_id),
            list,
            link: OnceLock::new(),
            removed: Mutex::new(removed),
            resetting: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            out_of_order: Arc::default(),
        });
        if pristine {
            writer
                .write(storage::wipe(1, &MemberList::default()))
                .await
                .map_err(|e| ConsensusError::Failed(e.to_string()))?;
        }
        let raft = shared.new_raft(raft_id, loaded).await?;
        if pristine {
            let mut nodes = BTreeMap::new();
            nodes.insert(1u64, BasicNode::new(me));
            raft.initialize(nodes)
                .await
                .map_err(|e| ConsensusError::Failed(e.to_string()))?;
            tracing::info!("founded a new cluster (this node alone)");
        }
        if shared.removed().is_some() {
            let _ = raft.shutdown().await;
        } else {
            *shared.raft.lock().unwrap_or_else(|p| p.into_inner()) = Some(raft);
        }
        tokio::spawn(upkeep(Arc::downgrade(&shared)));
        Ok(Consensus { shared })
    }

    /// Connects the consensus to the network.
    pub(crate) fn set_link(&self, link: Arc<dyn RaftLink>) {
        let _ = self.shared.link.set(link);
    }

    /// Where this node can be reached (what the `Found` entry and the voter admission carry).
    pub(crate) fn set_addrs(&self, addrs: Vec<String>) {
        *self.shared.addrs.lock().unwrap_or_else(|p| p.into_inner()) = addrs;
        self.shared.clone().list_own_addrs();
    }

    /// The member list authorisation reads, and its changes.
    pub(crate) fn list(&self) -> Arc<MemberList> {
        self.shared.trusted_list()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<MemberList>> {
        self.shared.list.subscribe()
    }

    pub(crate) fn removed(&self) -> Option<Removal> {
        self.shared.removed()
    }

    /// A member closed our connection saying we were removed: believe it (it is a member,
    /// authenticated), stop taking part, and say so in the status.
    pub(crate) async fn told_removed(&self, by: NodeId) {
        let removal = Removal {
            id: self.shared.me,
            raft_id: self.shared.raft_id.load(Ordering::SeqCst),
            by,
            at: self.shared.clock.wall_ms(),
        };
        self.shared.mark_removed(removal).await;
    }

    /// Commits `cmd` (forwarded to the leader if this node is not it).
    pub(crate) async fn propose(&self, cmd: Command) -> Result<Applied, ConsensusError> {
        self.shared.propose(cmd).await
    }

    /// Starts over as `raft_id` in another cluster (a join), trusting `list` until the
    /// leader's log reaches this node.
    pub(crate) async fn restart_as(
        &self,
        raft_id: u64,
        list: MemberList,
    ) -> Result<(), ConsensusError> {
        self.shared.start_over(raft_id, list, false).await
    }

    /// Recovery: a new epoch of the same cluster in which this node is the only voter, with
    /// the list as it is here; the leader then admits the other members back as they come
    /// (as learners, then voters by the policy). Members adopt the higher epoch when they
    /// next talk to a member that has it.
    pub(crate) async fn recover(&self) -> Result<u64, ConsensusError> {
        let s = &self.shared;
        if s.removed().is_some() {
            return Err(ConsensusError::Removed);
        }
        let next = s.trusted_list().recovered();
        let epoch = next.epoch;
        let raft_id = s.raft_id.load(Ordering::SeqCst);
        s.start_over(raft_id, next.clone(), true).await?;
        s.propose(Command::Restore { list: next }).await?;
        tracing::warn!(
            epoch,
            "membership recovered: a new epoch with this node as its voter"
        );
        Ok(epoch)
    }

    /// Serves one Raft RPC from member `from`.
    pub(crate) async fn serve(&self, from: NodeId, msg: RaftMsg) -> RaftMsg {
        self.shared.serve(from, msg).await
    }

    /// Well-formed requests a member could send (a vote, entries with commands, a proposal),
    /// for the fuzzer to start from: a member can lie, and nothing it sends may crash the node.
    pub(crate) fn sample_requests(&self, from_raft_id: u64, from: NodeId) -> Vec<RaftMsg> {
        use openraft::raft::{AppendEntriesRequest, VoteRequest};
        use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
        let list = self.shared.trusted_list();
        let log_id = |term, index| LogId::new(CommittedLeaderId::new(term, from_raft_id), index);
        let cmd = Command::Remove {
            id: self.shared.me,
            by: from,
            at: 1,
        };
        let rpcs = [
            Rpc::Vote(VoteRequest {
                vote: Vote::new(9, from_raft_id),
                last_log_id: Some(log_id(8, 50)),
            }),
            Rpc::Append(AppendEntriesRequest {
                vote: Vote::new_committed(9, from_raft_id),
                prev_log_id: Some(log_id(1, 2)),
                entries: vec![Entry {
                    log_id: log_id(9, 3),
                    payload: EntryPayload::Normal(cmd.clone()),
                }],
                leader_commit: Some(log_id(9, 3)),
            }),
            Rpc::Propose(cmd),
        ];
        rpcs.iter()
            .filter_map(|r| postcard::to_allocvec(r).ok())
            .map(|rpc| RaftMsg::Request {
                cluster: list.cluster,
                epoch: list.epoch,
                rpc,
            })
            .collect()
    }

    pub(crate) async fn status(&self) -> ConsensusStatus {
        self.shared.status()
    }

    pub(crate) async fn shutdown(&self) {
        let raft = self
            .shared
            .raft
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(r) = raft {
            let _ = r.shutdown().await;
        }
    }
}

/// Raft's state as loaded from the store (opaque outside this module).
pub(crate) struct LoadedState(storage::Loaded);

impl Shared {
    fn removed(&self) -> Option<Removal> {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn raft(&self) -> Option<Raft<TypeConfig>> {
        self.raft.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn trusted_list(&self) -> Arc<MemberList> {
        self.list.borrow().clone()
    }

    async fn new_raft(
        self: &Arc<Self>,
        raft_id: u64,
        loaded: storage::Loaded,
    ) -> Result<Raft<TypeConfig>, ConsensusError> {
        let (applied, mut rx) = watch::channel(Arc::new(loaded.list().clone()));
        let (log, sm) = storage::open(
            loaded,
            self.writer.clone(),
            applied,
            self.out_of_order.clone(),
        );
        // Applied lists become the trusted list once founded (a joiner's log starts empty).
        let weak = Arc::downgrade(self);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let list = rx.borrow_and_update().clone();
                let Some(s) = weak.upgrade() else { break };
                if s.generation.load(Ordering::SeqCst) != generation {
                    break;
                }
                if list.founded() {
                    s.adopt_applied(list).await;
                }
            }
        });
        let network = Network {
            shared: self.clone(),
        };
        Raft::new(raft_id, raft_config()?, network, log, sm)
            .await
            .map_err(|e| ConsensusError::Failed(e.to_string()))
    }

    async fn adopt_applied(&self, list: Arc<MemberList>) {
        if let Some(r) = list.removal(&self.me).cloned() {
            self.list.send_replace(list);
            self.mark_removed(r).await;
            return;
        }
        self.list.send_replace(list);
    }

    async fn mark_removed(&self, removal: Removal) {
        {
            let mut r = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_some() {
                return;
            }
            tracing::warn!(by = %removal.by.short(), "this node was removed from the cluster");
            *r = Some(removal.clone());
        }
        // Keep what the list says (its removal included), so a restart still knows.
        let mut list = (*self.trusted_list()).clone();
        if let Some(m) = list.members.remove(&self.me) {
            list.removed.insert(
                self.me,
                Removal {
                    raft_id: m.raft_id,
                    ..removal
                },
            );
        }
        self.list.send_replace(Arc::new(list));
        // A removed node stops campaigning (openraft would keep calling elections).
        let raft = self.raft.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = raft {
            let _ = r.shutdown().await;
        }
    }

    /// Forgets Raft's state and starts again as `raft_id`, trusting `list`. With `found`, the
    /// new log is initialised with this node as its only voter (recovery).
    async fn start_over(
        self: &Arc<Self>,
        raft_id: u64,
        list: MemberList,
        found: bool,
    ) -> Result<(), ConsensusError> {
        let _guard = self.resetting.lock().await;
        // The old instance's late applies are ignored from here on.
        self.generation.fetch_add(1, Ordering::SeqCst);
        let old = self.raft.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = old {
            let _ = r.shutdown().await;
        }
        self.writer
            .write(storage::wipe(raft_id, &list))
            .await
            .map_err(|e| ConsensusError::Failed(e.to_string()))?;
        self.raft_id.store(raft_id, Ordering::SeqCst);
        *self.removed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.list.send_replace(Arc::new(list));
        let raft = self.new_raft(raft_id, storage::Loaded::default()).await?;
        if found {
            let mut nodes = BTreeMap::new();
            nodes.insert(raft_id, BasicNode::new(self.me));
            raft.initialize(nodes)
                .await
                .map_err(|e| ConsensusError::Failed(e.to_string()))?;
        }
        *self.raft.lock().unwrap_or_else(|p| p.into_inner()) = Some(raft);
        tracing::info!(raft_id, found, "raft started over");
        Ok(())
    }

    /// A member is in a later epoch: adopt it (start over, same Raft id, same list until the
    /// new leader's log arrives).
    fn stale_epoch(self: &Arc<Self>, from: NodeId, epoch: u64) {
        self.clone().adopt_epoch(from, epoch);
    }

    fn adopt_epoch(self: Arc<Self>, from: NodeId, epoch: u64) {
        if epoch <= self.trusted_list().epoch {
            return;
        }
        tracing::info!(from = %from.short(), epoch, "adopting a later membership epoch");
        let s = self;
        tokio::spawn(async move {
            let mut list = (*s.trusted_list()).clone();
            if list.epoch >= epoch {
                return;
            }
            list.epoch = epoch;
            let id = s.raft_id.load(Ordering::SeqCst);
            if let Err(e) = s.start_over(id, list, false).await {
                tracing::warn!(error = %e, "could not adopt the later epoch");
            }
        });
    }

    async fn propose(self: &Arc<Self>, cmd: Command) -> Result<Applied, ConsensusError> {
        if self.removed().is_some() {
            return Err(ConsensusError::Removed);
        }
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConsensusError::NoQuorum(self.why_not()));
            }
            let Some(raft) = self.raft() else {
                return Err(ConsensusError::Removed);
            };
            let leader = match tokio::time::timeout(left, raft.client_write(cmd.clone())).await {
                Err(_) => return Err(ConsensusError::NoQuorum(self.why_not())),
                Ok(Ok(resp)) => return Ok(resp.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    f.leader_node.and_then(|n| n.addr.parse::<NodeId>().ok())
                }
                Ok(Err(e)) => return Err(ConsensusError::Failed(e.to_string())),
            };
            if let Some(leader) = leader.filter(|l| *l != self.me) {
                let rpc = Rpc::Propose(cmd.clone());
                // A leader that died without a word (kill -9, a closed lid) keeps its
                // connection open until the idle timeout: ask again soon, by then perhaps of a
                // new leader. Commands are idempotent, so asking twice is safe.
                let attempt = left.min(FORWARD_TIMEOUT);
                match tokio::time::timeout(attempt, self.call(leader, &rpc)).await {
                    Err(_) if attempt < left => {
                        tracing::debug!(leader = %leader.short(), "leader silent; retrying");
                        continue;
                    }
                    Err(_) => return Err(ConsensusError::NoQuorum(self.why_not())),
                    Ok(Ok(RpcReply::Proposed(Ok(applied)))) => return Ok(applied),
                    Ok(Ok(RpcReply::Proposed(Err(e)))) if e.contains("not possible now") => {
                        return Err(ConsensusError::NoQuorum(self.why_not()));
                    }
                    Ok(Ok(RpcReply::Proposed(Err(e)))) => {
                        tracing::debug!(error = %e, "forwarded proposal failed; retrying")
                    }
                    Ok(Ok(_)) => return Err(ConsensusError::Failed("wrong reply".into())),
                    Ok(Err(CallError::Unreachable(e) | CallError::Failed(e))) => {
                        tracing::debug!(error = %e, "leader unreachable; retrying")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn serve(self: &Arc<Self>, from: NodeId, msg: RaftMsg) -> RaftMsg {
        let RaftMsg::Request {
            cluster,
            epoch,
            rpc,
        } = msg
        else {
            return RaftMsg::Refused {
                reason: "expected a request".into(),
            };
        };
        let list = self.trusted_list();
        if list.founded() && cluster != list.cluster {
            return RaftMsg::Refused {
                reason: "another cluster".into(),
            };
        }
        if epoch < list.epoch {
            return RaftMsg::StaleEpoch { epoch: list.epoch };
        }
        if epoch > list.epoch {
            self.stale_epoch(from, epoch);
            return RaftMsg::Refused {
                reason: "adopting the later epoch; retry".into(),
            };
        }
        let rpc: Rpc = match postcard::from_bytes(&rpc) {
            Ok(r) => r,
            Err(e) => {
                return RaftMsg::Refused {
                    reason: format!("undecodable RPC: {e}"),
                };
            }
        };
        let Some(raft) = self.raft() else {
            return RaftMsg::Refused {
                reason: "raft is not running here".into(),
            };
        };
        let reply = match rpc {
            Rpc::Append(r) => RpcReply::Append(raft.append_entries(r).await.map_err(text)),
            Rpc::Vote(r) => RpcReply::Vote(raft.vote(r).await.map_err(text)),
            Rpc::Snapshot(r) => RpcReply::Snapshot(raft.install_snapshot(r).await.map_err(text)),
            Rpc::Propose(cmd) => {
                let r = match tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(cmd)).await {
                    Ok(Ok(resp)) => Ok(resp.data),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(ConsensusError::NoQuorum(self.why_not()).to_string()),
                };
                RpcReply::Proposed(r)
            }
        };
        match postcard::to_allocvec(&reply) {
            Ok(rpc) => RaftMsg::Reply { rpc },
            Err(e) => RaftMsg::Refused {
                reason: e.to_string(),
            },
        }
    }

    fn connected(&self, id: &NodeId) -> bool {
        *id == self.me || self.link.get().is_some_and(|l| l.connected(id))
    }

    /// Voters of the current Raft configuration, as NodeIds.
    fn voters(&self, raft: &Raft<TypeConfig>) -> Vec<NodeId> {
        let m = raft.metrics().borrow().membership_config.clone();
        node_ids(m.membership(), m.membership().voter_ids())
    }

    /// Why a change could not commit now ("1 of 3 voters reachable; need 2: offline: ...").
    fn why_not(&self) -> String {
        let Some(raft) = self.raft() else {
            return "this node was removed from the cluster".into();
        };
        let voters = self.voters(&raft);
        if voters.is_empty() {
            let list = self.trusted_list();
            let others: Vec<String> = list
                .members
                .values()
                .filter(|m| m.id != self.me)
                .map(|m| format!("{} ({})", m.name, m.id.short()))
                .collect();
            return format!(
                "the member list's log has not reached this node yet; bring a member online: {}",
                others.join(", ")
            );
        }
        let reachable: Vec<&NodeId> = voters.iter().filter(|v| self.connected(v)).collect();
        let need = voters.len() / 2 + 1;
        let list = self.trusted_list();
        let offline: Vec<String> = voters
            .iter()
            .filter(|v| !self.connected(v))
            .map(|v| match list.get(v) {
                Some(m) if !m.name.is_empty() => format!("{} ({})", m.name, v.short()),
                _ => v.short(),
            })
            .collect();
        if majority(reachable.len(), voters.len()) {
            format!(
                "{} of {} voters reachable, but no leader answered in time",
                reachable.len(),
                voters.len()
            )
        } else {
            format!(
                "{} of {} voters reachable; need {need}. Bring these voters online: {}",
                reachable.len(),
                voters.len(),
                offline.join(", ")
            )
        }
    }

    fn status(&self) -> ConsensusStatus {
        let list = self.trusted_list();
        let raft_id = self.raft_id.load(Ordering::SeqCst);
        let removed = self.removed();
        let Some(raft) = self.raft() else {
            return ConsensusStatus {
                raft_id,
                role: if removed.is_some() {
                    "removed"
                } else {
                    "starting"
                }
                .into(),
                term: 0,
                leader: None,
                applied_index: None,
                last_log_index: None,
                epoch: list.epoch,
                voters: vec![],
                learners: vec![],
                joint: false,
                reachable_voters: 0,
                changes_possible: false,
                why_not: Some(if removed.is_some() {
                    "this node was removed from the cluster".into()
                } else {
                    "raft is starting".into()
                }),
                removed,
                out_of_order_applies: self.out_of_order.load(Ordering::Relaxed),
            };
        };
        let m = raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters = node_ids(membership, membership.voter_ids());
        let learners = node_ids(membership, membership.learner_ids());
        let leader = node_ids(membership, m.current_leader.into_iter()).pop();
        let reachable = voters.iter().filter(|v| self.connected(v)).count();
        let quorum = majority(reachable, voters.len());
        let leader_reachable = leader.is_some_and(|l| self.connected(&l));
        let changes_possible = quorum && leader_reachable && list.founded();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Candidate => "candidate",
            ServerState::Follower => "voter",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "stopped",
        };
        ConsensusStatus {
            raft_id,
            role: role.into(),
            term: m.current_term,
            leader,
            applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            epoch: list.epoch,
            voters,
            learners,
            joint: membership.get_joint_config().len() > 1,
            reachable_voters: reachable,
            changes_possible,
            why_not: (!changes_possible).then(|| {
                if quorum && !list.founded() {
                    "the member list is being founded".into()
                } else if quorum && !leader_reachable {
                    "no leader elected yet".into()
                } else {
                    self.why_not()
                }
            }),
            removed,
            out_of_order_applies: self.out_of_order.load(Ordering::Relaxed),
        }
    }

    /// One step of the leader's upkeep: at most one configuration change.
    async fn reconcile(&self, seen: &mut HashMap<NodeId, Instant>) {
        let Some(raft) = self.raft() else { return };
        let now = Instant::now();
        let list = self.trusted_list();
        for m in list.members.keys() {
            if self.connected(m) {
                seen.insert(*m, now);
            }
        }
        if raft.metrics().borrow().state != ServerState::Leader || !list.founded() {
            return;
        }
        let m = raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let nodes: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let members: BTreeMap<u64, NodeId> =
            list.members.values().map(|m| (m.raft_id, m.id)).collect();
        let step =
            if let Some((&raft_id, &node)) = members.iter().find(|(id, _)| !nodes.contains(id)) {
                // A new member: a learner first (non-blocking: it may be offline).
                tracing::debug!(raft_id, node = %node.short(), "raft: adding a learner");
                bounded(raft.add_learner(raft_id, BasicNode::new(node), false)).await
            } else if let Some(gone) = nodes.iter().find(|id| !members.contains_key(id)) {
                tracing::debug!(raft_id = gone, "raft: removing a removed member");
                let change = if voters.contains(gone) {
                    ChangeMembers::RemoveVoters([*gone].into())
                } else {
                    ChangeMembers::RemoveNodes([*gone].into())
                };
                bounded(raft.change_membership(change, false)).await
            } else {
                let me = self.raft_id.load(Ordering::SeqCst);
                let cands: Vec<Candidate> = list
                    .members
                    .values()
                    .filter(|m| nodes.contains(&m.raft_id))
                    .map(|m| Candidate {
                        raft_id: m.raft_id,
                        prefer: m.prefer_voter,
                        online: m.id == self.me
                            || seen
                                .get(&m.id)
                                .is_some_and(|t| now.duration_since(*t) < ONLINE_GRACE),
                        voter: voters.contains(&m.raft_id),
                    })
                    .collect();
                let want = choose_voters(&cands, me);
                if want == voters || want.is_empty() {
                    return;
                }
                tracing::info!(?want, was = ?voters, "raft: changing voters");
                bounded(raft.change_membership(ChangeMembers::ReplaceAllVoters(want), true)).await
            };
        if let Err(e) = step {
            tracing::debug!(error = %e, "raft: configuration change not made; retrying");
        }
    }

    /// Records this node's addresses in the member list if it is listed without any: it
    /// founded its cluster before its network was up (founding races the network's start, or
    /// the node was offline then). A joiner would otherwise find nowhere to dial the founder,
    /// and wait for the founder to dial it. Best effort, in a task of its own.
    fn list_own_addrs(self: Arc<Self>) {
        let addrs = self.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let unlisted = self
            .trusted_list()
            .members
            .get(&self.me)
            .is_some_and(|m| m.addrs.is_empty());
        if addrs.is_empty() || !unlisted {
            return;
        }
        tokio::spawn(async move {
            let cmd = Command::SetAddrs { id: self.me, addrs };
            if let Err(e) = self.propose(cmd).await {
                tracing::debug!(error = %e, "could not list this node's addresses yet");
            }
        });
    }

    /// Founds the list of a cluster this node initialised alone, once it leads it.
    async fn found_if_needed(self: &Arc<Self>) {
        if self.trusted_list().founded() || self.removed().is_some() {
            return;
        }
        let Some(raft) = self.raft() else { return };
        if raft.metrics().borrow().state != ServerState::Leader {
            return;
        }
        let addrs = self.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let cmd = Command::Found {
            cluster: rand::random(),
            founder: self.me,
            name: self.name.clone(),
            addrs,
            prefer_voter: self.prefer_voter,
            at: self.clock.wall_ms(),
        };
        if let Err(e) = self.propose(cmd).await {
            tracing::debug!(error = %e, "could not found the member list yet");
        }
        // The addresses may have been given while the founding was under way.
        self.clone().list_own_addrs();
    }
}

/// A configuration change, given up after [`PROPOSE_TIMEOUT`]: a leader deposed while it
/// waits may never hear of the commit.
async fn bounded<T, E: std::fmt::Display>(
    change: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(PROPOSE_TIMEOUT, change).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no commit in time".into()),
    }
}

/// The NodeIds of the Raft ids `ids` in `membership`.
fn node_ids(
    membership: &openraft::Membership<u64, BasicNode>,
    ids: impl Iterator<Item = u64>,
) -> Vec<NodeId> {
    ids.filter_map(|id| node_id(membership, id)).collect()
}

/// The NodeId of Raft id `id` in `membership` (a Raft node's data is its NodeId).
fn node_id(membership: &openraft::Membership<u64, BasicNode>, id: u64) -> Option<NodeId> {
    membership.get_node(&id)?.addr.parse().ok()
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// How long Raft's state must stay unchanged before the upkeep slows to [`STEADY_PAUSE`].
const STEADY_AFTER: Duration = Duration::from_secs(10);
/// The upkeep's pause in a steady cluster (it wakes at once when Raft's state changes). A
/// leader lost meanwhile is noticed within it: elections start at most this much later.
/// It ends on a boundary of the timer wheel's 4.096 s slots, where a calm gossip's probes and
/// QUIC's keep-alives fall due too (one wake-up for all), so it lasts 3-7 s.
const STEADY_PAUSE: Duration = Duration::from_secs(3);

/// When to wake `after` from now: on the timer wheel's slot boundaries ([`crate::wheel`]),
/// unless sooner than a slot (an election due, founding); `steady`: on a boundary of its
/// 4.096 s slots.
fn wake_at(after: Duration, steady: bool) -> tokio::time::Instant {
    let now = std::time::Instant::now();
    if steady {
        crate::wheel::round_up(crate::wheel::origin(), now + after, crate::wheel::LEVEL2).into()
    } else {
        crate::wheel::align(now, now + after).into()
    }
}

/// The upkeep task, on one timer (an idle daemon's every wake-up counts): once a second, every
/// [`STEADY_PAUSE`] once Raft's state has not changed for [`STEADY_AFTER`] (and at once when
/// it changes: a commit, a new member, a new term), sooner when an election is due (voters
/// whose timers fell in the same second split their votes again and again) and every 30 ms
/// while founding (an invite waits for it), it logs role changes, runs [`LeaderWatch`], and
/// starts founding and the leader's reconciliation in a task of their own unless the last one
/// is still running. A configuration change can wait for a commit that needs an election, and
/// elections must not wait behind it.
async fn upkeep(shared: std::sync::Weak<Shared>) {
    let mut view: Option<(String, Option<NodeId>, u64)> = None;
    let mut watch = LeaderWatch::default();
    let mut seen = HashMap::new();
    let mut step: Option<tokio::task::JoinHandle<HashMap<NodeId, Instant>>> = None;
    let mut changed_at = Instant::now();
    // Raft's metrics, to wake on their changes (taken again when Raft is replaced).
    let mut metrics = None;
    loop {
        let founding = match shared.upgrade() {
            Some(s) => {
                if metrics.is_none() {
                    metrics = s.raft().map(|r| {
                        let mut m = r.metrics();
                        m.borrow_and_update();
                        m
                    });
                }
                !s.trusted_list().founded() && s.removed().is_none()
            }
            None => break,
        };
        let steady = !founding && watch.elect_at.is_none() && changed_at.elapsed() >= STEADY_AFTER;
        let pause = if founding {
            Duration::from_millis(30)
        } else if steady {
            STEADY_PAUSE
        } else {
            Duration::from_secs(1)
        };
        let until_elect = watch
            .elect_at
            .map(|t| t.saturating_duration_since(Instant::now()));
        // A change of what the upkeep acts on (Raft reports other metrics, such as
        // replication progress, more often).
        let raft_changed = async {
            let Some(m) = metrics.as_mut() else {
                // No Raft yet: the timer alone.
                return std::future::pending().await;
            };
            let key = |m: &openraft::RaftMetrics<u64, BasicNode>| {
                (
                    m.state,
                    m.current_leader,
                    m.current_term,
                    m.last_log_index,
                    m.membership_config.log_id().map(|l| l.index),
                )
            };
            let before = key(&m.borrow());
            loop {
                if m.changed().await.is_err() {
                    return false; // Raft was replaced
                }
                if key(&m.borrow_and_update()) != before {
                    return true;
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep_until(match until_elect {
                Some(t) => wake_at(t.min(pause), false),
                None => wake_at(pause, steady),
            }) => {}
            ok = raft_changed => {
                changed_at = Instant::now();
                if !ok {
                    metrics = None;
                }
            }
        }
        let Some(s) = shared.upgrade() else { break };
        let st = s.status();
        let now = (st.role.clone(), st.leader, st.term);
        if view.as_ref() != Some(&now) {
            changed_at = Instant::now();
            tracing::info!(
                role = %st.role,
                leader = ?st.leader.map(|l| l.short()),
                term = st.term,
                voters = st.voters.len(),
                "membership consensus"
            );
            view = Some(now);
        }
        s.watch_leader(&mut watch).await;
        if step.as_ref().is_none_or(|h| h.is_finished()) {
            if let Some(done) = step.take()
                && let Ok(kept) = done.await
            {
                seen = kept;
            }
            let mut kept = std::mem::take(&mut seen);
            step = Some(tokio::spawn(async move {
                s.found_if_needed().await;
                s.reconcile(&mut kept).await;
                kept
            }));
        }
    }
}

/// Leadership without Raft's timers. Openraft's heartbeats (an append to every member twice a
/// second) were most of what an idle cluster cost, and gossip already knows who is alive:
///
/// - A voter whose leader is unknown, itself (a leader that restarted as a follower), not
///   connected, or suspected by gossip calls an election after a random 0.5-2.5 s, timed to
///   the millisecond (split votes retry the same way). A leader's lease (3 s after its last
///   append) can refuse it; the next try wins. A connected leader gossip holds `down` is not
///   missing: that state outlives a partition's heal, and a dead leader's connection ends.
/// - The leader sends an append (openraft's heartbeat) when a connected member's replication
///   lags its log (one that was away, or a deposed leader back from a partition: the append's
///   higher term makes it step down; openraft also retries entries on its own, with backoff),
///   and every [`SAFETY_BEAT`] anyway, so a member that missed a commit notice learns it.
#[derive(Default)]
struct LeaderWatch {
    /// When this voter calls an election if the leader is still missing.
    elect_at: Option<Instant>,
    /// When the leader last sent appends on its own.
    beat_at: Option<Instant>,
}

/// How often an idle leader sends appends anyway.
const SAFETY_BEAT: Duration = Duration::from_secs(15);

impl Shared {
    async fn watch_leader(&self, w: &mut LeaderWatch) {
        let Some(raft) = self.raft() else { return };
        let m = raft.metrics().borrow().clone();
        let me = self.raft_id.load(Ordering::SeqCst);
        let now = Instant::now();
        if m.state == ServerState::Leader {
            w.elect_at = None;
            // Behind and reachable (openraft retries one that is not on its own).
            let membership = m.membership_config.membership();
            let lagging = m.replication.as_ref().is_some_and(|r| {
                r.iter().any(|(id, matched)| {
                    *id != me
                        && matched.map(|l| l.index) < m.last_log_index
                        && node_id(membership, *id).is_some_and(|n| self.connected(&n))
                })
            });
            let due = w.beat_at.is_none_or(|t| now >= t + SAFETY_BEAT);
            if lagging || due {
                tracing::trace!(lagging, "raft: appends to the members");
                let _ = raft.trigger().heartbeat().await;
                w.beat_at = Some(now);
            }
            return;
        }
        w.beat_at = None;
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me)
        {
            w.elect_at = None;
            return;
        }
        let leader_alive = m
            .current_leader
            .filter(|l| *l != me)
            .and_then(|l| node_id(m.membership_config.membership(), l))
            .is_some_and(|l| self.link.get().is_some_and(|link| link.alive(&l)));
        if leader_alive {
            w.elect_at = None;
            return;
        }
        let jitter = Duration::from_millis(rand::random_range(500..2500));
        let at = *w.elect_at.get_or_insert(now + jitter);
        if now >= at {
            tracing::debug!(term = m.current_term, leader = ?m.current_leader, "raft: the leader is missing; calling an election");
            let _ = raft.trigger().elect().await;
            w.elect_at = Some(now + jitter);
        }
    }
}
