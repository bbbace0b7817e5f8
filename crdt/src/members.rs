//! Membership rules as pure state: who is a member, and the one-time invites that admit new
//! ones, checked against a `now` the caller passes in. No storage: the daemon persists what
//! changes, and a replicated member list can take the storage's place without touching callers.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::{NodeId, base32};

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

    /// Whether it has expired at `now` (Unix ms).
    pub fn expired(&self, now: i64) -> bool {
        now > self.expires_at
    }
}

/// The stored form of an invite secret: only its hash is kept.
pub fn secret_hash(secret: &[u8; 32]) -> Vec<u8> {
    Sha256::digest(secret).to_vec()
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

/// An invite this node made, by the hash of its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInvite {
    pub expires_at: i64,
    pub used: bool,
}

/// The member list and pending invites of one node.
#[derive(Debug, Clone)]
pub struct Roster {
    me: NodeId,
    members: BTreeMap<NodeId, Member>,
    removed: BTreeMap<NodeId, i64>,
    invites: HashMap<Vec<u8>, PendingInvite>,
}

impl Roster {
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            members: BTreeMap::new(),
            removed: BTreeMap::new(),
            invites: HashMap::new(),
        }
    }

    /// Restores a member or a removal from storage.
    pub fn restore_member(&mut self, member: Member, removed: bool) {
        if removed {
            self.removed.insert(member.id, member.added_at);
        } else {
            self.members.insert(member.id, member);
        }
    }

    /// Restores an invite from storage.
    pub fn restore_invite(&mut self, hash: Vec<u8>, invite: PendingInvite) {
        self.invites.insert(hash, invite);
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Whether `id` may sync with us. A node is always a member of its own cluster.
    pub fn is_member(&self, id: &NodeId) -> bool {
        *id == self.me || self.members.contains_key(id)
    }

    /// Current members other than this node.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn get(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }

    /// Adds a member, or refreshes its addresses (empty `addrs` keeps the old ones); keeps its
    /// name and when it was first added. Returns the member as stored, or `None` for ourself.
    pub fn add(&mut self, id: NodeId, addrs: Vec<String>, now: i64) -> Option<&Member> {
        if id == self.me {
            return None;
        }
        self.removed.remove(&id);
        let m = self.members.entry(id).or_insert_with(|| Member {
            id,
            name: String::new(),
            addrs: Vec::new(),
            added_at: now,
        });
        if !addrs.is_empty() {
            m.addrs = addrs;
        }
        Some(m)
    }

    /// Records what a member calls itself (cleaned with [`clean_name`]). Returns the cleaned
    /// name if it changed, `None` if it is not a member or the name is unchanged.
    pub fn set_name(&mut self, id: &NodeId, name: &str) -> Option<String> {
        let name = clean_name(name);
        let m = self.members.get_mut(id)?;
        if m.name == name {
            return None;
        }
        m.name = name.clone();
        Some(name)
    }

    /// Removes a member; returns whether it was one.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        match self.members.remove(id) {
            Some(m) => {
                self.removed.insert(*id, m.added_at);
                true
            }
            None => false,
        }
    }

    /// Makes a one-time invite with `secret` (random, from the caller), valid until
    /// `expires_at`, reachable at `addrs`. Returns the invite and the hash to store.
    pub fn new_invite(
        &mut self,
        secret: [u8; 32],
        addrs: Vec<String>,
        expires_at: i64,
    ) -> (Invite, Vec<u8>) {
        let h = secret_hash(&secret);
        self.invites.insert(
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
        (invite, h)
    }

    /// Redeems an invite secret at `now`: valid once, before it expires. Returns the hash of
    /// the secret, to record its use.
    pub fn redeem(&mut self, secret: &[u8; 32], now: i64) -> Result<Vec<u8>, InviteError> {
        let h = secret_hash(secret);
        let inv = self.invites.get_mut(&h).ok_or(InviteError::Unknown)?;
        if inv.used {
            return Err(InviteError::Used);
        }
        if now > inv.expires_at {
            return Err(InviteError::Expired);
        }
        inv.used = true;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    #[test]
    fn names_are_cleaned_and_kept_across_address_updates() {
        let mut m = Roster::new(n(1));
        assert!(m.set_name(&n(2), "x").is_none(), "not a member");
        m.add(n(2), vec!["127.0.0.1:1".into()], 5);
        assert!(m.set_name(&n(2), " bad\u{1b}[31m\nname ").is_some());
        assert_eq!(m.get(&n(2)).unwrap().name, "bad[31mname");
        assert!(m.set_name(&n(2), "bad[31mname").is_none(), "unchanged");
        m.add(n(2), vec!["127.0.0.1:2".into()], 9);
        let got = m.get(&n(2)).unwrap();
        assert_eq!((got.name.as_str(), got.added_at), ("bad[31mname", 5));
        m.add(n(2), vec![], 10);
        assert_eq!(m.get(&n(2)).unwrap().addrs, vec!["127.0.0.1:2"]);
        assert_eq!(clean_name(&"é".repeat(100)).chars().count(), MAX_NAME);
    }

    #[test]
    fn invites_are_one_time_and_expire() {
        let mut m = Roster::new(n(1));
        let (inv, _) = m.new_invite([1; 32], vec!["127.0.0.1:1".into()], 1_000);
        assert_eq!(Invite::parse(&inv.to_token()).unwrap(), inv);
        assert!(!inv.expired(1_000) && inv.expired(1_001));
        assert!(m.redeem(&inv.secret, 500).is_ok());
        assert_eq!(m.redeem(&inv.secret, 500).unwrap_err(), InviteError::Used);
        let (late, _) = m.new_invite([2; 32], vec![], 1_000);
        assert_eq!(
            m.redeem(&late.secret, 2_000).unwrap_err(),
            InviteError::Expired
        );
        assert_eq!(m.redeem(&[9; 32], 0).unwrap_err(), InviteError::Unknown);
    }

    #[test]
    fn bad_tokens_are_errors() {
        for t in ["", "tandem1", "tandem1!!", "nope", &"tandem1a".repeat(1000)] {
            assert!(Invite::parse(t).is_err(), "{t:.20}");
        }
    }

    #[test]
    fn members_add_and_remove() {
        let mut m = Roster::new(n(1));
        assert!(m.is_member(&n(1)), "self");
        assert!(m.add(n(1), vec![], 0).is_none(), "never a member of itself");
        assert!(!m.is_member(&n(2)));
        assert!(m.add(n(2), vec![], 0).is_some());
        assert!(m.is_member(&n(2)));
        assert!(m.remove(&n(2)));
        assert!(!m.is_member(&n(2)));
        assert!(!m.remove(&n(2)));
    }
}
