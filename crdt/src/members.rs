//! Membership as pure state: the replicated member list (the Raft state machine: [`MemberList`]
//! and the [`Command`]s that change it), the voter policy, and the one-time invites that admit new
//! members, checked against a `now` the caller passes in. No storage, no Raft: the daemon
//! persists what changes and runs the consensus.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::id::{NodeId, base32};

/// A member as the replicated member list holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    /// What it calls itself (cleaned with [`clean_name`]); empty if it never said.
    pub name: String,
    /// Addresses it can be reached at, `host:port`, most recent first. The replicated list
    /// holds what the member said; the node puts where it last reached it in front.
    pub addrs: Vec<String>,
    /// Unix milliseconds when it was admitted.
    pub added_at: i64,
    /// Its Raft node id: fresh for every admission, never reused (a re-invited device gets a
    /// new one).
    pub raft_id: u64,
    /// Who admitted it (`None` for the founder).
    pub admitted_by: Option<NodeId>,
    /// It asked to be a voter whenever possible (a home server: `voter = "prefer"`).
    pub prefer_voter: bool,
}

/// A member that was removed: by whom and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    pub id: NodeId,
    pub raft_id: u64,
    pub by: NodeId,
    /// Unix milliseconds.
    pub at: i64,
}

/// A change to the replicated member list: what a Raft log entry carries. Each carries the
/// time and the author the proposer saw, so applying it is deterministic on every member.
/// New variants are only ever appended (the log is stored and replicated in this encoding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The first entry of a new cluster: its id and its founder.
    Found {
        cluster: [u8; 16],
        founder: NodeId,
        name: String,
        addrs: Vec<String>,
        prefer_voter: bool,
        at: i64,
    },
    /// Admit `id` (from a redeemed invite). Admitting a current member again is a no-op that
    /// answers with its Raft id, so a retried admission succeeds.
    Admit {
        id: NodeId,
        name: String,
        addrs: Vec<String>,
        prefer_voter: bool,
        by: NodeId,
        at: i64,
    },
    Remove {
        id: NodeId,
        by: NodeId,
        at: i64,
    },
    Rename {
        id: NodeId,
        name: String,
    },
    SetAddrs {
        id: NodeId,
        addrs: Vec<String>,
    },
    /// Recovery: the whole list again, in a new epoch (see `MemberList::recovered`).
    Restore {
        list: MemberList,
    },
}

/// What applying a [`Command`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// `id` is a member with this Raft id (newly admitted or already).
    Admitted {
        raft_id: u64,
    },
    /// Removed, or `false`: it was not a member.
    Removed(bool),
    Done,
    /// Refused without change, with why (e.g. renaming a non-member, founding twice).
    Refused(String),
}

/// The replicated member list: Raft's state machine. Pure: the daemon persists it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberList {
    /// Random at founding; zero until then. Raft traffic from another cluster is refused.
    pub cluster: [u8; 16],
    /// Bumped by recovery; a member seeing a higher epoch adopts it.
    pub epoch: u64,
    /// The next Raft id to hand out.
    pub next_raft_id: u64,
    pub members: BTreeMap<NodeId, Member>,
    pub removed: BTreeMap<NodeId, Removal>,
}

/// Longest address list kept per member.
pub const MAX_ADDRS: usize = 8;

fn clean_addrs(addrs: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in addrs {
        let a: String = a.chars().filter(|c| !c.is_control()).take(128).collect();
        if !a.is_empty() && !out.contains(&a) && out.len() < MAX_ADDRS {
            out.push(a);
        }
    }
    out
}

impl MemberList {
    /// Whether the list has been founded (it has a cluster id).
    pub fn founded(&self) -> bool {
        self.cluster != [0; 16]
    }

    pub fn is_member(&self, id: &NodeId) -> bool {
        self.members.contains_key(id)
    }

    pub fn get(&self, id: &NodeId) -> Option<&Member> {
        self.members.get(id)
    }

    pub fn by_raft_id(&self, raft_id: u64) -> Option<&Member> {
        self.members.values().find(|m| m.raft_id == raft_id)
    }

    pub fn removal(&self, id: &NodeId) -> Option<&Removal> {
        self.removed.get(id)
    }

    /// The list a recovery starts its new epoch with: the same members, epoch + 1.
    pub fn recovered(&self) -> MemberList {
        MemberList {
            epoch: self.epoch + 1,
            ..self.clone()
        }
    }

    /// Applies one committed command. Until `Found` (the first), every other command is
    /// refused, so nothing can be admitted into a list that founding would then replace.
    pub fn apply(&mut self, cmd: Command) -> Applied {
        if !self.founded() && !matches!(cmd, Command::Found { .. } | Command::Restore { .. }) {
            return Applied::Refused("the member list is not founded yet".into());
        }
        match cmd {
            Command::Found {
                cluster,
                founder,
                name,
                addrs,
                prefer_voter,
                at,
            } => {
                if self.founded() {
                    return Applied::Refused("the cluster is already founded".into());
                }
                self.cluster = cluster;
                self.epoch = 1;
                self.next_raft_id = 2;
                self.members.insert(
                    founder,
                    Member {
                        id: founder,
                        name: clean_name(&name),
                        addrs: clean_addrs(addrs),
                        added_at: at,
                        raft_id: 1,
                        admitted_by: None,
                        prefer_voter,
                    },
                );
                Applied::Admitted { raft_id: 1 }
            }
            Command::Admit {
                id,
                name,
                addrs,
                prefer_voter,
                by,
                at,
            } => {
                if let Some(m) = self.members.get(&id) {
                    return Applied::Admitted { raft_id: m.raft_id };
                }
                let raft_id = self.next_raft_id.max(2);
                self.next_raft_id = raft_id + 1;
                self.removed.remove(&id);
                self.members.insert(
                    id,
                    Member {
                        id,
                        name: clean_name(&name),
                        addrs: clean_addrs(addrs),
                        added_at: at,
                        raft_id,
                        admitted_by: Some(by),
                        prefer_voter,
                    },
                );
                Applied::Admitted { raft_id }
            }
            // The same removal again (a proposal retried after its first try committed)
            // answers as the first did.
            Command::Remove { id, by, at }
                if self
                    .removed
                    .get(&id)
                    .is_some_and(|r| r.by == by && r.at == at) =>
            {
                Applied::Removed(true)
            }
            Command::Remove { id, by, at } => match self.members.remove(&id) {
                Some(m) => {
                    self.removed.insert(
                        id,
                        Removal {
                            id,
                            raft_id: m.raft_id,
                            by,
                            at,
                        },
                    );
                    Applied::Removed(true)
                }
                None => Applied::Removed(false),
            },
            Command::Rename { id, name } => match self.members.get_mut(&id) {
                Some(m) => {
                    m.name = clean_name(&name);
                    Applied::Done
                }
                None => Applied::Refused("not a member".into()),
            },
            Command::SetAddrs { id, addrs } => match self.members.get_mut(&id) {
                Some(m) => {
                    m.addrs = clean_addrs(addrs);
                    Applied::Done
                }
                None => Applied::Refused("not a member".into()),
            },
            Command::Restore { list } => {
                if self.founded() && list.cluster != self.cluster {
                    return Applied::Refused("a list of another cluster".into());
                }
                *self = list;
                Applied::Done
            }
        }
    }
}

/// How many voters a cluster of `members` should have: an odd number, so one offline laptop
/// never blocks a two-voter majority (1 for 1-2 members, 3 for 3-4, 5 from 5 on).
pub fn voter_target(members: usize) -> usize {
    match members {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

/// A member as the voter policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub raft_id: u64,
    /// Configured `voter = "prefer"`.
    pub prefer: bool,
    /// Reachable now (or gone only briefly): only such members are made voters.
    pub online: bool,
    pub voter: bool,
}

/// The voters the cluster should have: [`voter_target`] of them, the `leader` always, then
/// preferred members, online ones, current voters (stability), oldest admissions first. A
/// member that is offline is never made a voter, and an offline voter gives way to an online
/// member; the set is smaller than the target when too few members are online, and always odd.
pub fn choose_voters(cands: &[Candidate], leader: u64) -> std::collections::BTreeSet<u64> {
    let target = voter_target(cands.len());
    let mut ranked: Vec<&Candidate> = cands.iter().collect();
    ranked.sort_by_key(|c| {
        (
            c.raft_id != leader,
            !c.prefer,
            !c.online,
            !c.voter,
            c.raft_id,
        )
    });
    let mut chosen: Vec<u64> = ranked
        .iter()
        .filter(|c| c.online || c.voter || c.raft_id == leader)
        .take(target)
        .map(|c| c.raft_id)
        .collect();
    // An even count tolerates no more failures than one fewer and needs a bigger majority:
    // drop the lowest ranked (never the leader, which ranks first).
    if chosen.len().is_multiple_of(2) {
        chosen.pop();
    }
    chosen.into_iter().collect()
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

/// The invites this node made and has not seen expire: local, not replicated (only the
/// inviter can check a secret; the admission it leads to is replicated).
#[derive(Debug, Clone, Default)]
pub struct Invites {
    invites: HashMap<Vec<u8>, PendingInvite>,
}

impl Invites {
    /// Restores an invite from storage.
    pub fn restore(&mut self, hash: Vec<u8>, invite: PendingInvite) {
        self.invites.insert(hash, invite);
    }

    /// Makes a one-time invite from `inviter` with `secret` (random, from the caller), valid
    /// until `expires_at`, reachable at `addrs`. Returns the invite and the hash to store.
    pub fn create(
        &mut self,
        inviter: NodeId,
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
            inviter,
            addrs,
            secret,
            expires_at,
        };
        (invite, h)
    }

    /// Takes an invite secret at `now` for one admission attempt: known, unused, unexpired.
    /// It is used up here (two joiners cannot race for one invite); [`Invites::release`] gives
    /// it back if the admission fails, so the invite stays usable. Returns the secret's hash.
    pub fn reserve(&mut self, secret: &[u8; 32], now: i64) -> Result<Vec<u8>, InviteError> {
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

    /// Gives back an invite taken by [`Invites::reserve`] whose admission failed.
    pub fn release(&mut self, hash: &[u8]) {
        if let Some(inv) = self.invites.get_mut(hash) {
            inv.used = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn founded() -> MemberList {
        let mut l = MemberList::default();
        let r = l.apply(Command::Found {
            cluster: [7; 16],
            founder: n(1),
            name: "a".into(),
            addrs: vec![],
            prefer_voter: false,
            at: 1,
        });
        assert_eq!(r, Applied::Admitted { raft_id: 1 });
        l
    }

    fn admit(l: &mut MemberList, i: u8) -> Applied {
        l.apply(Command::Admit {
            id: n(i),
            name: format!(" node\u{1b}{i}\n"),
            addrs: vec!["127.0.0.1:1".into(); 20],
            prefer_voter: false,
            by: n(1),
            at: 5,
        })
    }

    #[test]
    fn admissions_get_fresh_raft_ids_never_reused() {
        let mut l = founded();
        assert!(!MemberList::default().founded() && l.founded());
        assert_eq!(admit(&mut l, 2), Applied::Admitted { raft_id: 2 });
        assert_eq!(
            admit(&mut l, 2),
            Applied::Admitted { raft_id: 2 },
            "a retry"
        );
        let m = l.get(&n(2)).unwrap();
        assert_eq!((m.name.as_str(), m.addrs.len()), ("node2", 1), "cleaned");
        assert_eq!(
            l.apply(Command::Remove {
                id: n(2),
                by: n(1),
                at: 9
            }),
            Applied::Removed(true)
        );
        assert!(!l.is_member(&n(2)));
        assert_eq!(l.removal(&n(2)).unwrap().by, n(1));
        assert_eq!(
            l.apply(Command::Remove {
                id: n(2),
                by: n(1),
                at: 9
            }),
            Applied::Removed(true),
            "a retried removal answers as the first did"
        );
        assert_eq!(
            l.apply(Command::Remove {
                id: n(2),
                by: n(3),
                at: 10
            }),
            Applied::Removed(false)
        );
        assert_eq!(admit(&mut l, 3), Applied::Admitted { raft_id: 3 });
        assert_eq!(
            admit(&mut l, 2),
            Applied::Admitted { raft_id: 4 },
            "re-invited"
        );
        assert!(l.removal(&n(2)).is_none());
        assert_eq!(l.by_raft_id(4).unwrap().id, n(2));
        assert!(matches!(
            l.apply(Command::Found {
                cluster: [8; 16],
                founder: n(9),
                name: String::new(),
                addrs: vec![],
                prefer_voter: false,
                at: 0
            }),
            Applied::Refused(_)
        ));
        assert!(matches!(
            l.apply(Command::Rename {
                id: n(9),
                name: "x".into()
            }),
            Applied::Refused(_)
        ));
    }

    #[test]
    fn nothing_is_admitted_before_founding() {
        let mut l = MemberList::default();
        assert!(matches!(admit(&mut l, 2), Applied::Refused(_)));
        assert!(l.members.is_empty());
    }

    #[test]
    fn recovery_keeps_members_in_a_new_epoch_of_the_same_cluster() {
        let mut l = founded();
        admit(&mut l, 2);
        let next = l.recovered();
        assert_eq!((next.epoch, next.members.len()), (2, 2));
        let other = MemberList {
            cluster: [9; 16],
            ..Default::default()
        };
        assert!(matches!(
            l.clone().apply(Command::Restore { list: other }),
            Applied::Refused(_)
        ));
        assert_eq!(
            l.apply(Command::Restore { list: next.clone() }),
            Applied::Done
        );
        assert_eq!(l, next);
    }

    #[test]
    fn voter_policy_is_odd_and_prefers_online_and_preferred_members() {
        let c = |raft_id, prefer, online, voter| Candidate {
            raft_id,
            prefer,
            online,
            voter,
        };
        let ids = |v: std::collections::BTreeSet<u64>| v.into_iter().collect::<Vec<_>>();
        assert_eq!(
            [0, 1, 2, 3, 4, 5, 9].map(voter_target),
            [1, 1, 1, 3, 3, 5, 5]
        );
        // Two members: the leader alone.
        assert_eq!(
            ids(choose_voters(
                &[c(1, false, true, true), c(2, false, true, false)],
                1
            )),
            [1]
        );
        // Three: all online, all voters.
        let three = [
            c(1, false, true, true),
            c(2, false, true, false),
            c(3, false, true, false),
        ];
        assert_eq!(ids(choose_voters(&three, 1)), [1, 2, 3]);
        // Four, one preferred: the preferred one beats an older member.
        let four = [
            c(1, false, true, true),
            c(2, false, true, false),
            c(3, false, true, false),
            c(4, true, true, false),
        ];
        assert_eq!(ids(choose_voters(&four, 1)), [1, 2, 4]);
        // An offline learner is never promoted; an offline voter gives way to an online one.
        let five = [
            c(1, false, true, true),
            c(2, false, false, true),
            c(3, false, true, true),
            c(4, false, false, false),
            c(5, false, true, false),
        ];
        assert_eq!(
            ids(choose_voters(&five, 3)),
            [1, 3, 5],
            "odd: the offline voter goes"
        );
        let four = [
            c(1, false, true, true),
            c(2, false, false, true),
            c(3, false, true, true),
            c(4, false, true, false),
        ];
        assert_eq!(ids(choose_voters(&four, 1)), [1, 3, 4]);
    }

    #[test]
    fn names_are_cleaned() {
        assert_eq!(clean_name(" bad\u{1b}[31m\nname "), "bad[31mname");
        assert_eq!(clean_name(&"é".repeat(100)).chars().count(), MAX_NAME);
    }

    #[test]
    fn invites_are_one_time_expire_and_can_be_given_back() {
        let mut m = Invites::default();
        let (inv, _) = m.create(n(1), [1; 32], vec!["127.0.0.1:1".into()], 1_000);
        assert_eq!(Invite::parse(&inv.to_token()).unwrap(), inv);
        assert!(!inv.expired(1_000) && inv.expired(1_001));
        let h = m.reserve(&inv.secret, 500).unwrap();
        assert_eq!(m.reserve(&inv.secret, 500).unwrap_err(), InviteError::Used);
        m.release(&h);
        assert!(
            m.reserve(&inv.secret, 500).is_ok(),
            "usable again after a failed admission"
        );
        let (late, _) = m.create(n(1), [2; 32], vec![], 1_000);
        assert_eq!(
            m.reserve(&late.secret, 2_000).unwrap_err(),
            InviteError::Expired
        );
        assert_eq!(m.reserve(&[9; 32], 0).unwrap_err(), InviteError::Unknown);
    }

    #[test]
    fn bad_tokens_are_errors() {
        for t in ["", "tandem1", "tandem1!!", "nope", &"tandem1a".repeat(1000)] {
            assert!(Invite::parse(t).is_err(), "{t:.20}");
        }
    }
}
