//! Membership as the node uses it: the replicated member list (run by [`Consensus`], Raft),
//! this node's pending invites (table `invites`: only the inviter can check a secret), and
//! where members were last reached (table `peer_addrs`: a local dialing hint, not trust).
//! Callers see one narrow interface: `is_member`, `members`, invites, and the consensus.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use rusqlite::Connection;
use rusqlite::types::Value;
use tandem_crdt::NodeId;
pub use tandem_crdt::members::{Invite, InviteError, MAX_NAME, Member, Removal, clean_name};
use tandem_crdt::members::{Invites, PendingInvite};

use crate::raft::Consensus;
use crate::store::{StoreError, Write};

/// Most addresses remembered per member.
const MAX_HINTS: usize = 4;

/// The membership of one node.
pub struct Membership {
    me: NodeId,
    invites: Mutex<Invites>,
    hints: Mutex<BTreeMap<NodeId, Vec<String>>>,
    consensus: OnceLock<Consensus>,
}

impl Membership {
    /// Loads invites and address hints from the store; the consensus is attached once started.
    pub fn load(me: NodeId, conn: &Connection) -> Result<Self, StoreError> {
        let mut hints = BTreeMap::new();
        let mut stmt = conn.prepare("SELECT node, addrs FROM peer_addrs")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let node: Vec<u8> = r.get(0)?;
            let Ok(bytes) = <[u8; 32]>::try_from(node.as_slice()) else {
                return Err(StoreError::Corrupt {
                    table: "peer_addrs",
                    why: "node id not 32 bytes".into(),
                });
            };
            let addrs: String = r.get(1)?;
            hints.insert(
                NodeId::from_bytes(bytes),
                addrs.split_whitespace().map(str::to_string).collect(),
            );
        }
        let mut invites = Invites::default();
        let mut stmt = conn.prepare("SELECT secret_hash, expires_at, used_by FROM invites")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let used: Option<Vec<u8>> = r.get(2)?;
            invites.restore(
                r.get(0)?,
                PendingInvite {
                    expires_at: r.get(1)?,
                    used: used.is_some(),
                },
            );
        }
        Ok(Self {
            me,
            invites: Mutex::new(invites),
            hints: Mutex::new(hints),
            consensus: OnceLock::new(),
        })
    }

    pub(crate) fn attach(&self, consensus: Consensus) {
        let _ = self.consensus.set(consensus);
    }

    /// The consensus, once started (it is, for every node past `Node::open`).
    pub(crate) fn consensus(&self) -> Option<&Consensus> {
        self.consensus.get()
    }

    fn invites(&self) -> std::sync::MutexGuard<'_, Invites> {
        self.invites.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` may sync with us: a member of the list this node applied. A node is
    /// always a member of its own cluster; a removed node syncs with no one.
    pub fn is_member(&self, id: &NodeId) -> bool {
        if *id == self.me {
            return true;
        }
        let Some(c) = self.consensus() else {
            return false;
        };
        c.removed().is_none() && c.list().is_member(id)
    }

    /// Current members other than this node; addresses where each was last reached first.
    /// None once this node was removed: it syncs with no one.
    pub fn members(&self) -> Vec<Member> {
        let Some(c) = self.consensus().filter(|c| c.removed().is_none()) else {
            return Vec::new();
        };
        let list = c.list();
        let hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        list.members
            .values()
            .filter(|m| m.id != self.me)
            .map(|m| {
                let mut m = m.clone();
                if let Some(h) = hints.get(&m.id) {
                    let rest: Vec<String> =
                        m.addrs.into_iter().filter(|a| !h.contains(a)).collect();
                    m.addrs = h.iter().cloned().chain(rest).collect();
                }
                m
            })
            .collect()
    }

    /// Records where a member was just reached, first among its hints (at most 4 kept);
    /// returns the write that persists it, or `None` if nothing changed.
    pub fn reached_at(&self, id: NodeId, addr: String) -> Option<Write> {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        let h = hints.entry(id).or_default();
        if h.first() == Some(&addr) {
            return None;
        }
        h.retain(|a| *a != addr);
        h.insert(0, addr);
        h.truncate(MAX_HINTS);
        Some(Write::Exec {
            sql: "INSERT INTO peer_addrs (node, addrs) VALUES (?1, ?2)
                  ON CONFLICT (node) DO UPDATE SET addrs = ?2",
            params: vec![
                Value::Blob(id.as_bytes().to_vec()),
                Value::Text(h.join(" ")),
            ],
        })
    }

    /// Makes a one-time invite with `secret`, valid until `expires_at`; returns it and the
    /// write to persist.
    pub fn new_invite(
        &self,
        secret: [u8; 32],
        addrs: Vec<String>,
        expires_at: i64,
    ) -> (Invite, Write) {
        let (invite, h) = self.invites().create(self.me, secret, addrs, expires_at);
        let write = Write::Exec {
            sql: "INSERT INTO invites (secret_hash, expires_at) VALUES (?1, ?2)",
            params: vec![Value::Blob(h), Value::Integer(expires_at)],
        };
        (invite, write)
    }

    /// Takes an invite secret for one admission attempt (see [`Invites::reserve`]); returns
    /// its hash for [`Membership::release`] or [`Membership::used`].
    pub fn reserve(&self, secret: &[u8; 32], now: i64) -> Result<Vec<u8>, InviteError> {
        self.invites().reserve(secret, now)
    }

    /// Gives back an invite whose admission failed.
    pub fn release(&self, hash: &[u8]) {
        self.invites().release(hash);
    }

    /// The write that records an invite as used by `by` (its admission committed).
    pub fn used(hash: Vec<u8>, by: NodeId) -> Write {
        Write::Exec {
            sql: "UPDATE invites SET used_by = ?2 WHERE secret_hash = ?1",
            params: vec![Value::Blob(hash), Value::Blob(by.as_bytes().to_vec())],
        }
    }
}
