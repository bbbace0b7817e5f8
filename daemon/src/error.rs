//! The library's errors, typed by layer: documents ([`DocError`]), membership
//! ([`MembershipError`]), the network ([`NetError`]), the store ([`StoreError`]) and the data
//! dir ([`DataDirError`]), gathered in [`Error`]. Every enum is `#[non_exhaustive]`; the HTTP
//! API maps each variant explicitly, so a new one cannot silently become a 500.

use std::path::{Path, PathBuf};

use tandem_crdt::{DocId, IdError, InviteError, PathError};

use crate::net::JoinError;
pub use crate::net::NetError;
pub use crate::store::StoreError;

/// Errors from [`crate::Node`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Doc(#[from] DocError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// An error raised by the caller's own closure in [`crate::Node::change`].
    #[error("{0}")]
    App(Box<dyn std::error::Error + Send + Sync>),
    #[error("the node is closed")]
    Closed,
    /// From [`crate::client::Daemon`]: the daemon could not be reached, or answered with an
    /// error that has no variant above.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

/// What went wrong with a document or an edit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    #[error("document {0} not found")]
    NotFound(DocId),
    #[error("document {0} has been deleted")]
    Deleted(DocId),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("a document's root must be a JSON object, not a JSON {0}")]
    NotAnObject(&'static str),
    #[error("import refused, nothing was written: {0}")]
    CorruptImport(String),
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("stored document {doc} cannot be loaded: {why}")]
    Corrupt { doc: DocId, why: String },
    #[error(
        "document {doc} has {deltas} damaged change(s) on this node's disk; they are being fetched \
         again from members and the document is served again once they arrive (see `tandem status`)"
    )]
    Damaged { doc: DocId, deltas: u64 },
    #[error("the base heads are not in this document: {0}")]
    BadBase(String),
    #[error(
        "the text at {0} was replaced or removed since the edit began; the edit was not applied"
    )]
    TextReplaced(String),
    #[error("a peer sent an invalid delta: {0}")]
    InvalidDelta(String),
    #[error("an app sent a sync message that cannot be used: {0}")]
    BadSyncMessage(String),
}

/// What went wrong with the member list or an invite.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    #[error(transparent)]
    Invite(#[from] InviteError),
    #[error("this invite was made by this node; run `tandem join` with it on the other device")]
    OwnInvite,
    /// A change to the member list needs a majority of the voters, and they are not reachable.
    #[error("membership changes are not possible now: {0}")]
    NoQuorum(String),
    #[error(
        "this node was removed from its cluster{0}; it keeps its data but syncs with no one until it is invited again"
    )]
    Removed(String),
    #[error(
        "this node already belongs to a cluster of {0} members; a node joins another cluster only while it is alone"
    )]
    AlreadyInCluster(usize),
    #[error("a node cannot remove itself; remove it from another member")]
    RemoveSelf,
    #[error("membership: {0}")]
    Consensus(String),
}

impl From<crate::raft::ConsensusError> for MembershipError {
    fn from(e: crate::raft::ConsensusError) -> Self {
        use crate::raft::ConsensusError as C;
        match e {
            C::NoQuorum(why) => Self::NoQuorum(why),
            C::Removed => Self::Removed(String::new()),
            C::Failed(why) => Self::Consensus(why),
        }
    }
}

impl From<crate::raft::ConsensusError> for Error {
    fn from(e: crate::raft::ConsensusError) -> Self {
        Self::Membership(e.into())
    }
}

/// What went wrong with the data dir.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    #[error(
        "data dir {dir} is in use by another process{holder}; stop it or use another --data-dir"
    )]
    Locked { dir: PathBuf, holder: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity key {path}: {why}")]
    Identity { path: PathBuf, why: String },
    #[error(
        "{path} is {state}, but this data dir has a node identity: the database was lost or \
         truncated. Restore it from a backup (docs/operations.md), or, to start this node \
         over empty, move identity.key away as well"
    )]
    LostDatabase { path: PathBuf, state: &'static str },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataDirError::Io {
            path: path.to_path_buf(),
            source,
        }
        .into()
    }

    /// Wraps any error from application code.
    pub fn app(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::App(e.into())
    }
}

impl From<PathError> for Error {
    fn from(e: PathError) -> Self {
        DocError::Path(e).into()
    }
}

impl From<IdError> for Error {
    fn from(e: IdError) -> Self {
        DocError::Id(e).into()
    }
}

impl From<automerge::AutomergeError> for Error {
    fn from(e: automerge::AutomergeError) -> Self {
        DocError::Automerge(e).into()
    }
}

impl From<InviteError> for Error {
    fn from(e: InviteError) -> Self {
        MembershipError::Invite(e).into()
    }
}

impl From<JoinError> for Error {
    fn from(e: JoinError) -> Self {
        match e {
            JoinError::Invite(e) => e.into(),
            JoinError::Net(e) => e.into(),
        }
    }
}
