//! Membership storage: the member list and invites (SQLite tables `members`, `invites`) kept
//! in memory as a [`Roster`] (the rules, pure, in `tandem-crdt`) and persisted through the
//! writer. Callers see one narrow interface (`is_member`, `members`, `add`, `set_name`,
//! `remove`, invites), so a Raft-replicated list can replace the storage and keep them.

use std::sync::Mutex;

use rusqlite::Connection;
use rusqlite::types::Value;
use tandem_crdt::NodeId;
pub use tandem_crdt::members::{Invite, InviteError, MAX_NAME, Member, clean_name};
use tandem_crdt::members::{PendingInvite, Roster};

use crate::store::{StoreError, Write};

/// The member list and invites of one node.
pub struct Membership {
    roster: Mutex<Roster>,
}

impl Membership {
    /// Loads from the store.
    pub fn load(me: NodeId, conn: &Connection) -> Result<Self, StoreError> {
        let mut roster = Roster::new(me);
        let mut stmt = conn.prepare("SELECT node, addrs, added_at, removed, name FROM members")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let node: Vec<u8> = r.get(0)?;
            let Ok(bytes) = <[u8; 32]>::try_from(node.as_slice()) else {
                return Err(StoreError::Corrupt {
                    table: "members",
                    why: "node id not 32 bytes".into(),
                });
            };
            let addrs: String = r.get(1)?;
            let member = Member {
                id: NodeId::from_bytes(bytes),
                name: r.get(4)?,
                addrs: addrs.split_whitespace().map(str::to_string).collect(),
                added_at: r.get(2)?,
            };
            roster.restore_member(member, r.get::<_, bool>(3)?);
        }
        let mut stmt = conn.prepare("SELECT secret_hash, expires_at, used_by FROM invites")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let used: Option<Vec<u8>> = r.get(2)?;
            roster.restore_invite(
                r.get(0)?,
                PendingInvite {
                    expires_at: r.get(1)?,
                    used: used.is_some(),
                },
            );
        }
        Ok(Self {
            roster: Mutex::new(roster),
        })
    }

    fn roster(&self) -> std::sync::MutexGuard<'_, Roster> {
        self.roster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` may sync with us. A node is always a member of its own cluster.
    pub fn is_member(&self, id: &NodeId) -> bool {
        self.roster().is_member(id)
    }

    /// Current members other than this node.
    pub fn members(&self) -> Vec<Member> {
        self.roster().members().cloned().collect()
    }

    /// Adds (or refreshes the addresses of) a member at `now` (Unix ms); returns the write
    /// that persists it.
    pub fn add(&self, id: NodeId, addrs: Vec<String>, now: i64) -> Option<Write> {
        let mut roster = self.roster();
        let m = roster.add(id, addrs, now)?;
        Some(Write::Exec {
            sql: "INSERT INTO members (node, addrs, added_at, removed) VALUES (?1, ?2, ?3, 0)
                  ON CONFLICT (node) DO UPDATE SET addrs = ?2, removed = 0",
            params: vec![
                Value::Blob(id.as_bytes().to_vec()),
                Value::Text(m.addrs.join(" ")),
                Value::Integer(m.added_at),
            ],
        })
    }

    /// Records what a member calls itself; returns the write that persists it, or `None` if
    /// it is not a member or the name is unchanged. The name comes from the peer: it is cut to
    /// [`MAX_NAME`] characters and control characters are dropped.
    pub fn set_name(&self, id: &NodeId, name: &str) -> Option<Write> {
        let name = self.roster().set_name(id, name)?;
        Some(Write::Exec {
            sql: "UPDATE members SET name = ?2 WHERE node = ?1",
            params: vec![Value::Blob(id.as_bytes().to_vec()), Value::Text(name)],
        })
    }

    /// Removes a member; returns the write that persists it, or `None` if it was not one.
    pub fn remove(&self, id: &NodeId) -> Option<Write> {
        self.roster().remove(id).then(|| Write::Exec {
            sql: "UPDATE members SET removed = 1 WHERE node = ?1",
            params: vec![Value::Blob(id.as_bytes().to_vec())],
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
        let (invite, h) = self.roster().new_invite(secret, addrs, expires_at);
        let write = Write::Exec {
            sql: "INSERT INTO invites (secret_hash, expires_at) VALUES (?1, ?2)",
            params: vec![Value::Blob(h), Value::Integer(expires_at)],
        };
        (invite, write)
    }

    /// Redeems an invite secret for `by` at `now`: valid once, before it expires. Returns the
    /// write that records the use.
    pub fn redeem(&self, secret: &[u8; 32], by: NodeId, now: i64) -> Result<Write, InviteError> {
        let h = self.roster().redeem(secret, now)?;
        Ok(Write::Exec {
            sql: "UPDATE invites SET used_by = ?2 WHERE secret_hash = ?1",
            params: vec![Value::Blob(h), Value::Blob(by.as_bytes().to_vec())],
        })
    }
}
