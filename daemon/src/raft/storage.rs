//! Raft's storage in the node's SQLite database: the log (`raft_log`), the vote, the state
//! machine (the replicated [`MemberList`]) and its snapshot (`raft_state`). Everything is
//! kept in memory as well (the member list is small) and written through the store's writer
//! thread; openraft is told a write is durable only after its commit (fsynced under
//! `Durability::Full`). Every applied state is published on a watch channel, which is how the
//! node learns of admissions and removals.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership, Vote,
};
use rusqlite::Connection;
use rusqlite::types::Value;
use serde::{Deserialize, Serialize};
use tandem_crdt::members::{Applied, MemberList};
use tokio::sync::watch;

use super::TypeConfig;
use crate::store::{StoreError, Write, Writer};

type Id = u64;
type Node = openraft::BasicNode;
type Membership = StoredMembership<Id, Node>;

/// Raft's persistent state as loaded at start.
#[derive(Default)]
pub(crate) struct Loaded {
    vote: Option<Vote<Id>>,
    committed: Option<LogId<Id>>,
    purged: Option<LogId<Id>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
    sm: SmState,
    snapshot: Option<Stored>,
    /// This node's Raft id, once it has one.
    pub(crate) raft_id: Option<u64>,
    /// The list trusted until the log's state machine is founded (see [`wipe`]).
    pub(crate) trusted: Option<MemberList>,
}

impl Loaded {
    /// The member list as last applied (what authorisation reads at start).
    pub(crate) fn list(&self) -> &MemberList {
        &self.sm.list
    }

    /// Whether any Raft state exists (a vote or a log): `initialize` is for pristine nodes.
    pub(crate) fn pristine(&self) -> bool {
        self.vote.is_none() && self.log.is_empty() && self.sm.applied.is_none()
    }
}

/// The state machine: what was applied up to where.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmState {
    applied: Option<LogId<Id>>,
    membership: Membership,
    list: MemberList,
}

fn corrupt(why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table: "raft_state",
        why: why.to_string(),
    }
}

fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(corrupt)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Plain owned data into a Vec: cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

/// Reads Raft's state from the database.
pub(crate) fn load(conn: &Connection) -> Result<Loaded, StoreError> {
    let mut out = Loaded::default();
    let mut stmt = conn.prepare("SELECT key, value FROM raft_state")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let key: String = r.get(0)?;
        let value: Vec<u8> = r.get(1)?;
        match key.as_str() {
            "vote" => out.vote = Some(decode(&value)?),
            "committed" => out.committed = decode(&value)?,
            "purged" => out.purged = decode(&value)?,
            "sm" => out.sm = decode(&value)?,
            "snapshot" => out.snapshot = Some(decode(&value)?),
            "raft_id" => out.raft_id = Some(decode(&value)?),
            "trusted" => out.trusted = Some(decode(&value)?),
            _ => {}
        }
    }
    let mut stmt = conn.prepare("SELECT idx, entry FROM raft_log ORDER BY idx")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let idx: i64 = r.get(0)?;
        let entry: Entry<TypeConfig> =
            decode(&r.get::<_, Vec<u8>>(1)?).map_err(|_| StoreError::Corrupt {
                table: "raft_log",
                why: format!("entry {idx} undecodable"),
            })?;
        out.log.insert(idx as u64, entry);
    }
    Ok(out)
}

/// The write that forgets all Raft state (a join, an adopted epoch, a recovery) and starts
/// again as `raft_id`, trusting `list` (the member list known so far) until the new log's
/// state machine holds a founded list.
pub(crate) fn wipe(raft_id: u64, list: &MemberList) -> Write {
    Write::Batch(vec![
        ("DELETE FROM raft_log", vec![]),
        ("DELETE FROM raft_state", vec![]),
        put_state("raft_id", encode(&raft_id)),
        put_state("trusted", encode(list)),
    ])
}

fn put_state(key: &'static str, value: Vec<u8>) -> (&'static str, Vec<Value>) {
    (
        "INSERT INTO raft_state (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = ?2",
        vec![Value::Text(key.into()), Value::Blob(value)],
    )
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn fail(subject: ErrorSubject<Id>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError<Id> {
    StorageError::from_io_error(subject, verb, io_err(e))
}

struct LogData {
    vote: Option<Vote<Id>>,
    committed: Option<LogId<Id>>,
    purged: Option<LogId<Id>>,
    log: BTreeMap<u64, Entry<TypeConfig>>,
}

/// The Raft log and vote.
#[derive(Clone)]
pub(crate) struct LogStore {
    data: Arc<Mutex<LogData>>,
    writer: Writer,
}

/// The state machine and its snapshot.
pub(crate) struct StateMachine {
    sm: SmState,
    /// Entries that arrived out of log order (refused); shared with the status.
    out_of_order: Arc<std::sync::atomic::AtomicU64>,
    /// The current snapshot, shared with the builders (which replace it).
    snapshot: Arc<Mutex<Option<Stored>>>,
    writer: Writer,
    applied: watch::Sender<Arc<MemberList>>,
}

/// Splits what was loaded into the two halves openraft takes; `applied` publishes each newly
/// applied member list.
pub(crate) fn open(
    loaded: Loaded,
    writer: Writer,
    applied: watch::Sender<Arc<MemberList>>,
    out_of_order: Arc<std::sync::atomic::AtomicU64>,
) -> (LogStore, StateMachine) {
    let log = LogStore {
        data: Arc::new(Mutex::new(LogData {
            vote: loaded.vote,
            committed: loaded.committed,
            purged: loaded.purged,
            log: loaded.log,
        })),
        writer: writer.clone(),
    };
    let sm = StateMachine {
        sm: loaded.sm,
        out_of_order,
        snapshot: Arc::new(Mutex::new(loaded.snapshot)),
        writer,
        applied,
    };
    (log, sm)
}

impl LogStore {
    fn data(&self) -> std::sync::MutexGuard<'_, LogData> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<Id>> {
        Ok(self
            .data()
            .log
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<Id>> {
        let d = self.data();
        let last = d.log.values().next_back().map(|e| e.log_id).or(d.purged);
        Ok(LogState {
            last_purged_log_id: d.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<Id>) -> Result<(), StorageError<Id>> {
        self.writer
            .write(Write::Batch(vec![put_state("vote", encode(vote))]))
            .await
            .map_err(|e| fail(ErrorSubject::Vote, ErrorVerb::Write, e))?;
        self.data().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<Id>>, StorageError<Id>> {
        Ok(self.data().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<Id>>,
    ) -> Result<(), StorageError<Id>> {
        // Not needed for safety (openraft learns it again from the leader): a failed write
        // only costs re-applying nothing, since the state machine records what it applied.
        let _ = self
            .writer
            .write(Write::Batch(vec![put_state(
                "committed",
                encode(&committed),
            )]))
            .await;
        self.data().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<Id>>, StorageError<Id>> {
        Ok(self.data().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<Id>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let stmts = entries
            .iter()
            .map(|e| {
                (
                    "INSERT INTO raft_log (idx, entry) VALUES (?1, ?2)
                     ON CONFLICT (idx) DO UPDATE SET entry = ?2",
                    vec![
                        Value::Integer(e.log_id.index as i64),
                        Value::Blob(encode(e)),
                    ],
                )
            })
            .collect();
        let result = self.writer.write(Write::Batch(stmts)).await;
        match result {
            Ok(()) => {
                let mut d = self.data();
                for e in entries {
                    d.log.insert(e.log_id.index, e);
                }
                drop(d);
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(io_err(&msg)));
                Err(fail(ErrorSubject::Logs, ErrorVerb::Write, msg))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<Id>) -> Result<(), StorageError<Id>> {
        self.writer
            .write(Write::Batch(vec![(
                "DELETE FROM raft_log WHERE idx >= ?1",
                vec![Value::Integer(log_id.index as i64)],
            )]))
            .await
            .map_err(|e| fail(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        self.data().log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<Id>) -> Result<(), StorageError<Id>> {
        self.writer
            .write(Write::Batch(vec![
                (
                    "DELETE FROM raft_log WHERE idx <= ?1",
                    vec![Value::Integer(log_id.index as i64)],
                ),
                put_state("purged", encode(&Some(log_id))),
            ]))
            .await
            .map_err(|e| fail(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        let mut d = self.data();
        d.purged = Some(log_id);
        d.log = d.log.split_off(&(log_id.index + 1));
        Ok(())
    }
}

/// A snapshot: its meta and bytes (the encoded state machine).
type Stored = (SnapshotMeta<Id, Node>, Vec<u8>);

/// The snapshot of `sm` as it is.
fn snapshot_of(sm: &SmState) -> Stored {
    let meta = SnapshotMeta {
        last_log_id: sm.applied,
        last_membership: sm.membership.clone(),
        snapshot_id: format!(
            "{}-{}",
            sm.applied.map(|l| l.index).unwrap_or(0),
            sm.list.epoch
        ),
    };
    (meta, encode(sm))
}

fn to_snapshot((meta, data): Stored) -> Snapshot<TypeConfig> {
    Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data)),
    }
}

impl StateMachine {
    async fn persist(&self, snapshot: bool) -> Result<(), StoreError> {
        let mut stmts = vec![put_state("sm", encode(&self.sm))];
        if snapshot && let Some(s) = &*self.snapshot() {
            stmts.push(put_state("snapshot", encode(s)));
        }
        self.writer.write(Write::Batch(stmts)).await
    }

    fn publish(&self) {
        self.applied.send_replace(Arc::new(self.sm.list.clone()));
    }

    fn snapshot(&self) -> std::sync::MutexGuard<'_, Option<Stored>> {
        self.snapshot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds a snapshot from a copy of the state machine taken when asked, and makes it the
/// current one (what a lagging follower is sent).
pub(crate) struct Builder {
    sm: SmState,
    writer: Writer,
    current: Arc<Mutex<Option<Stored>>>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<Id>> {
        let (meta, data) = snapshot_of(&self.sm);
        self.writer
            .write(Write::Batch(vec![put_state(
                "snapshot",
                encode(&(meta.clone(), data.clone())),
            )]))
            .await
            .map_err(|e| {
                fail(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Write,
                    e,
                )
            })?;
        let built = (meta, data);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(built.clone());
        Ok(to_snapshot(built))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<Id>>, Membership), StorageError<Id>> {
        Ok((self.sm.applied, self.sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<Id>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            // Entries apply in log order, each exactly once: anything else is a bug in the
            // consensus or in this storage, and must stop it rather than diverge.
            let expected = self.sm.applied.map_or(0, |l| l.index + 1);
            if e.log_id.index != expected {
                self.out_of_order
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    index = e.log_id.index,
                    expected,
                    "raft: entry applied out of log order"
                );
                return Err(fail(
                    ErrorSubject::StateMachine,
                    ErrorVerb::Write,
                    format!(
                        "entry {} applied out of order (expected {expected})",
                        e.log_id.index
                    ),
                ));
            }
            self.sm.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Applied::Done),
                EntryPayload::Normal(cmd) => {
                    let r = self.sm.list.apply(cmd);
                    tracing::debug!(index = e.log_id.index, ?r, "raft: applied a command");
                    out.push(r)
                }
                EntryPayload::Membership(m) => {
                    self.sm.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Applied::Done);
                }
            }
        }
        self.persist(false)
            .await
            .map_err(|e| fail(ErrorSubject::StateMachine, ErrorVerb::Write, e))?;
        self.publish();
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        Builder {
            sm: self.sm.clone(),
            writer: self.writer.clone(),
            current: self.snapshot.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<Id>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<Id, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<Id>> {
        let data = snapshot.into_inner();
        let sm: SmState = postcard::from_bytes(&data).map_err(|e| {
            fail(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        self.sm = SmState {
            applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            list: sm.list,
        };
        *self.snapshot() = Some((meta.clone(), data));
        self.persist(true).await.map_err(|e| {
            fail(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<Id>> {
        let mut current = self.snapshot();
        if current.is_none() && self.sm.applied.is_some() {
            *current = Some(snapshot_of(&self.sm));
        }
        Ok(current.clone().map(to_snapshot))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicU64, Ordering};

    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    use tandem_crdt::members::Command;
    use tandem_crdt::sign::Signer;

    use super::*;
    use crate::store::{Store, StoreOptions};

    fn entry(index: u64, cmd: Option<Command>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: cmd.map_or(EntryPayload::Blank, EntryPayload::Normal),
        }
    }

    #[tokio::test]
    async fn entries_apply_in_log_order_only_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::from_seed([1; 32]);
        let path = dir.path().join("t.db");
        let (store, _) = Store::open(&path, &signer, StoreOptions::default()).unwrap();
        let (tx, rx) = watch::channel(Arc::new(MemberList::default()));
        let bad = Arc::new(AtomicU64::new(0));
        let (_, mut sm) = open(Loaded::default(), store.writer(), tx, bad.clone());
        let found = Command::Found {
            cluster: [3; 16],
            founder: signer.id(),
            name: "a".into(),
            addrs: vec![],
            prefer_voter: false,
            at: 1,
        };
        sm.apply([entry(0, None), entry(1, Some(found))])
            .await
            .unwrap();
        assert!(rx.borrow().founded(), "the applied list is published");
        // A gap, then a replay of an applied entry: both refused, nothing applied.
        assert!(sm.apply([entry(3, None)]).await.is_err());
        assert!(sm.apply([entry(1, None)]).await.is_err());
        assert_eq!(bad.load(Ordering::Relaxed), 2);
        assert_eq!(sm.applied_state().await.unwrap().0.unwrap().index, 1);
        sm.apply([entry(2, None)]).await.unwrap();
        store.close();
        drop(store);
        let (store, _) = Store::open(&path, &signer, StoreOptions::default()).unwrap();
        let loaded = store.read_blocking(load).unwrap();
        assert!(loaded.list().founded());
        assert_eq!(loaded.sm.applied.unwrap().index, 2);
    }
}
