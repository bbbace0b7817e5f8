//! # tandem-crdt
//!
//! The IO-free core of tandem: node and document identities ([`NodeId`], [`DocId`]), the unit
//! of replication ([`Delta`]), the node clock ([`VersionVector`]), the sync [`Engine`], and the
//! protocol as sans-IO state machines: the wire messages ([`proto`]), one sync [`Session`] per
//! peer, the [`Dialer`] and the membership rules ([`members`]); plus the JSON view of Automerge
//! documents ([`json`], [`pointer`]).
//!
//! Nothing here does IO: no sockets, no files, no clock reads, no threads, no ambient
//! randomness. Time (`now`) and an rng are inputs. The daemon crate carries out what these
//! state machines ask for; the simulator (`crates/sim`) steps the very same code.

pub mod clock;
pub mod delta;
pub mod dialer;
pub mod engine;
pub mod entropy;
pub mod gossip;
pub mod id;
pub mod json;
pub mod members;
pub mod peer;
pub mod pointer;
pub mod proto;
pub mod repo;
pub mod rng;
pub mod session;
pub mod sign;
pub mod typed;

pub use automerge;
pub use clock::{Causality, LamportClock, VersionVector};
pub use delta::{Delta, DeltaBody, DeltaError};
pub use dialer::{Admit, ConnId, Dial, DialState, Dialer, DialerConfig};
pub use engine::{Action, CatchUp, DeltaStore, Engine, Input, MemStore, Source};
pub use id::{DeltaId, DocId, IdError, NodeId};
pub use members::{Command as MemberCommand, Invite, InviteError, Member, MemberList};
pub use peer::PeerSync;
pub use pointer::{PathError, Pointer};
pub use session::{Session, SessionConfig};
pub use sign::{Auth, Signer};

/// The Automerge actor id for `node` in its `incarnation`-th process start. Actors are never
/// reused across processes, so two runs of one node can never make two different changes with
/// the same actor and sequence number.
pub fn actor_id(node: &NodeId, incarnation: u64) -> automerge::ActorId {
    let mut bytes = Vec::with_capacity(40);
    bytes.extend_from_slice(node.as_bytes());
    bytes.extend_from_slice(&incarnation.to_be_bytes());
    automerge::ActorId::from(bytes)
}
