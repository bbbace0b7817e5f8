//! Membership: who may sync with this node, and the invites that let a new node join. One
//! narrow interface (`is_member`, `members`, `add`, `remove`, invites) over SQLite-backed state,
//! so a later Raft-replicated member list can replace the storage and keep the callers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use rusqlite::Connection;
use rusqlite::types::Value;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_crdt::NodeId;
use tandem_crdt::id::base32;

use crate::store::{StoreError, Write, now_ms};

/// A member as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: NodeId,
    /// What it calls itself (its host name unless configured), as it said when it last
    /// connected; empty until then.
    pub name: String,
    /// Addresses it was last reachable at, `host:port`.
    pub addrs: Vec<String>,
    /// Unix milliseconds when it was added.
    pub added_at: i64,
}

/// Why an invite token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("not an invite token: {0}")]
    Malformed(&'static str),
    #[error("the invite is unknown to the inviter")]
    Unknown,
    #[error("the invite has expired")]
    Expired,
    #[error("the invite has already been used")]
    Used,
}

/// What an invite token carries. Text form: `tandem1` + base32 of its postcard encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub inviter: NodeId,
    pub addrs: Vec<String>,
    pub secret: [u8; 32],
    /// Unix milliseconds.
    pub expires_at: i64,
}

const TOKEN_PREFIX: &str = "tandem1";
const MAX_TOKEN_LEN: usize = 4096;

impl Invite {
    pub fn to_token(&self) -> String {
        // Serialising plain owned data into a Vec cannot fail.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", base32::encode(&bytes))
    }

    pub fn parse(token: &str) -> Result<Self, InviteError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(InviteError::Malformed("too long"));
        }
        let body = token
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(InviteError::Malformed("it does not start with 'tandem1'"))?;
        let bytes = base32::decode(body).ok_or(InviteError::Malformed("not base32"))?;
        postcard::from_bytes(&bytes).map_err(|_| InviteError::Malformed("undecodable"))
    }
}

fn hash(secret: &[u8; 32]) -> Vec<u8> {
    Sha256::digest(secret).to_vec()
}

struct PendingInvite {
    expires_at: i64,
    used: bool,
}

#[derive(Default)]
struct State {
    members: BTreeMap<NodeId, Member>,
    removed: BTreeMap<NodeId, i64>,
    invites: HashMap<Vec<u8>, PendingInvite>,
}

/// Longest name kept, in characters.
pub const MAX_NAME: usize = 64;

/// A name fit to show: no control characters, at most [`MAX_NAME`] characters, trimmed.
pub fn clean_name(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME)
        .collect::<String>()
        .trim()
        .to_string()
}

/// The member list and invites of one node.
pub struct Membership {
    me: NodeId,
    state: Mutex<State>,
}

impl Membership {
    /// Loads from the store.
    pub fn load(me: NodeId, conn: &Connection) -> Result<Self, StoreError> {
        let mut state = State::default();
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
            let id = NodeId::from_bytes(bytes);
            let addrs: String = r.get(1)?;
            let added_at: i64 = r.get(2)?;
            if r.get::<_, bool>(3)? {
                state.removed.insert(id, added_at);
            } else {
                state.members.insert(
                    id,
                    Member {
                        id,
                        name: r.get(4)?,
                        addrs: addrs.split_whitespace().map(str::to_string).collect(),
                        added_at,
                    },
                );
            }
        }
        let mut stmt = conn.prepare("SELECT secret_hash, expires_at, used_by FROM invites")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let h: Vec<u8> = r.get(0)?;
            let expires_at: i64 = r.get(1)?;
            let used: Option<Vec<u8>> = r.get(2)?;
            state.invites.insert(
                h,
                PendingInvite {
                    expires_at,
                    used: used.is_some(),
                },
            );
        }
        Ok(Self {
            me,
            state: Mutex::new(state),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` may sync with us. A node is always a member of its own cluster.
    pub fn is_member(&self, id: &NodeId) -> bool {
        *id == self.me || self.state().members.contains_key(id)
    }

    /// Current members other than this node.
    pub fn members(&self) -> Vec<Member> {
        self.state().members.values().cloned().collect()
    }

    /// Adds (or refreshes the addresses of) a member; returns the write that persists it.
    pub fn add(&self, id: NodeId, addrs: Vec<String>) -> Option<Write> {
        if id == self.me {
            return None;
        }
        let mut st = self.state();
        st.removed.remove(&id);
        let added_at = st.members.get(&id).map_or_else(now_ms, |m| m.added_at);
        let addrs = if addrs.is_empty() {
            st.members
                .get(&id)
                .map(|m| m.addrs.clone())
                .unwrap_or_default()
        } else {
            addrs
        };
        let name = st
            .members
            .get(&id)
            .map(|m| m.name.clone())
            .unwrap_or_default();
        st.members.insert(
            id,
            Member {
                id,
                name,
                addrs: addrs.clone(),
                added_at,
            },
        );
        Some(Write::Exec {
            sql: "INSERT INTO members (node, addrs, added_at, removed) VALUES (?1, ?2, ?3, 0)
                  ON CONFLICT (node) DO UPDATE SET addrs = ?2, removed = 0",
            params: vec![
                Value::Blob(id.as_bytes().to_vec()),
                Value::Text(addrs.join(" ")),
                Value::Integer(added_at),
            ],
        })
    }

    /// Records what a member calls itself; returns the write that persists it, or `None` if
    /// it is not a member or the name is unchanged. The name comes from the peer: it is cut to
    /// [`MAX_NAME`] characters and control characters are dropped.
    pub fn set_name(&self, id: &NodeId, name: &str) -> Option<Write> {
        let name = clean_name(name);
        let mut st = self.state();
        let m = st.members.get_mut(id)?;
        if m.name == name {
            return None;
        }
        m.name = name.clone();
        Some(Write::Exec {
            sql: "UPDATE members SET name = ?2 WHERE node = ?1",
            params: vec![Value::Blob(id.as_bytes().to_vec()), Value::Text(name)],
        })
    }

    /// Removes a member; returns the write that persists it, or `None` if it was not one.
    pub fn remove(&self, id: &NodeId) -> Option<Write> {
        let mut st = self.state();
        let m = st.members.remove(id)?;
        st.removed.insert(*id, m.added_at);
        Some(Write::Exec {
            sql: "UPDATE members SET removed = 1 WHERE node = ?1",
            params: vec![Value::Blob(id.as_bytes().to_vec())],
        })
    }

    /// Makes a one-time invite valid until `expires_at`; returns it and the write to persist.
    pub fn new_invite(&self, addrs: Vec<String>, expires_at: i64) -> (Invite, Write) {
        let secret: [u8; 32] = rand::random();
        let h = hash(&secret);
        self.state().invites.insert(
            h.clone(),
            PendingInvite {
                expires_at,
                used: false,
            },
        );
        let invite = Invite {
            inviter: self.me,
            addrs,
            secret,
            expires_at,
        };
        let write = Write::Exec {
            sql: "INSERT INTO invites (secret_hash, expires_at) VALUES (?1, ?2)",
            params: vec![Value::Blob(h), Value::Integer(expires_at)],
        };
        (invite, write)
    }

    /// Redeems an invite secret for `by`: valid once, before it expires. Returns the write that
    /// records the use.
    pub fn redeem(&self, secret: &[u8; 32], by: NodeId, now: i64) -> Result<Write, InviteError> {
        let h = hash(secret);
        let mut st = self.state();
        let inv = st.invites.get_mut(&h).ok_or(InviteError::Unknown)?;
        if inv.used {
            return Err(InviteError::Used);
        }
        if now > inv.expires_at {
            return Err(InviteError::Expired);
        }
        inv.used = true;
        Ok(Write::Exec {
            sql: "UPDATE invites SET used_by = ?2 WHERE secret_hash = ?1",
            params: vec![Value::Blob(h), Value::Blob(by.as_bytes().to_vec())],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn empty(me: NodeId) -> Membership {
        Membership {
            me,
            state: Mutex::new(State::default()),
        }
    }

    #[test]
    fn names_are_cleaned_and_kept_across_address_updates() {
        let m = empty(n(1));
        assert!(m.set_name(&n(2), "x").is_none(), "not a member");
        m.add(n(2), vec!["127.0.0.1:1".into()]);
        assert!(m.set_name(&n(2), " bad\u{1b}[31m\nname ").is_some());
        assert_eq!(m.members()[0].name, "bad[31mname");
        assert!(
            m.set_name(&n(2), "bad[31mname").is_none(),
            "unchanged: no write"
        );
        m.add(n(2), vec!["127.0.0.1:2".into()]);
        assert_eq!(m.members()[0].name, "bad[31mname");
        assert_eq!(clean_name(&"é".repeat(100)).chars().count(), MAX_NAME);
    }

    #[test]
    fn invites_are_one_time_and_expire() {
        let m = empty(n(1));
        let (inv, _) = m.new_invite(vec!["127.0.0.1:1".into()], 1_000);
        let parsed = Invite::parse(&inv.to_token()).unwrap();
        assert_eq!(parsed, inv);
        assert!(m.redeem(&inv.secret, n(2), 500).is_ok());
        assert_eq!(
            m.redeem(&inv.secret, n(3), 500).unwrap_err(),
            InviteError::Used
        );
        let (late, _) = m.new_invite(vec![], 1_000);
        assert_eq!(
            m.redeem(&late.secret, n(2), 2_000).unwrap_err(),
            InviteError::Expired
        );
        assert_eq!(
            m.redeem(&[9; 32], n(2), 0).unwrap_err(),
            InviteError::Unknown
        );
    }

    #[test]
    fn bad_tokens_are_errors() {
        for t in ["", "tandem1", "tandem1!!", "nope", &"tandem1a".repeat(1000)] {
            assert!(Invite::parse(t).is_err(), "{t:.20}");
        }
    }

    #[test]
    fn members_add_and_remove() {
        let m = empty(n(1));
        assert!(m.is_member(&n(1)), "self");
        assert!(!m.is_member(&n(2)));
        assert!(m.add(n(2), vec![]).is_some());
        assert!(m.is_member(&n(2)));
        assert!(m.remove(&n(2)).is_some());
        assert!(!m.is_member(&n(2)));
        assert!(m.remove(&n(2)).is_none());
    }
}
