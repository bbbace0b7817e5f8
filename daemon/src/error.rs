//! The library's error type: every failure a caller can see, each with a clear message.

use std::path::{Path, PathBuf};

use tandem_crdt::{DocId, IdError, PathError};

use crate::store::StoreError;

/// Errors from [`crate::Node`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {0} not found")]
    DocNotFound(DocId),
    #[error("document {0} has been deleted")]
    DocDeleted(DocId),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("a document's root must be a JSON object, not a JSON {0}")]
    NotAnObject(&'static str),
    #[error("import refused, nothing was written: {0}")]
    CorruptImport(String),
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
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("stored document {doc} cannot be loaded: {why}")]
    CorruptDoc { doc: DocId, why: String },
    /// An error raised by the caller's own closure in [`crate::Node::change`].
    #[error("{0}")]
    App(Box<dyn std::error::Error + Send + Sync>),
    #[error("the node is closed")]
    Closed,
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("the base heads are not in this document: {0}")]
    BadBase(String),
    #[error(
        "the text at {0} was replaced or removed since the edit began; the edit was not applied"
    )]
    TextReplaced(String),
    #[error("a peer sent an invalid delta: {0}")]
    BadDelta(String),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Wraps any error from application code.
    pub fn app(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::App(e.into())
    }
}
