//! # tandem
//!
//! An offline-first sync daemon and embeddable library for JSON-like documents. Every document
//! is an Automerge CRDT: apps read and write at local speed, online or not, and nodes converge
//! without conflicts whenever they can reach each other.
//!
//! This crate is both the library ([`Node`]) and the `tandemd` daemon.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use serde_json::json;
//! use tandem::{Config, Node};
//!
//! let dir = tempfile::tempdir()?;
//! let node = Node::open(Config::new(dir.path())).await?;
//!
//! // Create a document from JSON, then edit it by JSON Pointer.
//! let doc = node.create(Some(json!({"title": "groceries", "items": []}))).await?;
//! node.insert(doc, "/items/-", json!("milk")).await?;
//! node.splice_text(doc, "/title", 0, 0, "weekly ").await?;
//! assert_eq!(node.get(doc, "").await?, json!({"title": "weekly groceries", "items": ["milk"]}));
//!
//! // Or edit through an Automerge transaction.
//! use automerge::transaction::Transactable;
//! node.change(doc, |tx| {
//!     tx.put(automerge::ROOT, "done", false)?;
//!     Ok(())
//! }).await?;
//! assert_eq!(node.get(doc, "/done").await?, json!(false));
//!
//! // Every call above returned only after its change was durable on disk.
//! node.close().await?;
//! # Ok(()) }
//! ```

pub mod api;
mod cache;
pub mod client;
pub mod clock;
pub mod config;
mod error;
mod identity;
pub mod members;
pub mod net;
mod node;
mod raft;
pub mod store;
pub mod wheel;

pub use automerge;
pub use error::{DataDirError, DocError, Error, MembershipError};
pub use identity::Identity;
pub use members::{Member, Removal};
pub use net::{NetConfig, PeerStatus};
pub use node::{Config, Event, HistoryEntry, Node, Subscription, SubscriptionError};
pub use raft::ConsensusStatus;
pub use store::{DocInfo, Durability, StoreStats};
pub use tandem_crdt as crdt;

/// What `--version` prints for tandemd and the CLI alike: the release, the wire protocol and
/// the local API version.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (wire protocol 5, API v1)");

pub use tandem_crdt::{DocId, NodeId, Source};

#[cfg(test)]
mod version_tests {
    #[test]
    fn the_version_line_names_the_protocol_this_build_speaks() {
        let want = format!("wire protocol {}", tandem_crdt::proto::PROTOCOL_VERSION);
        assert!(super::VERSION.contains(&want), "{}", super::VERSION);
    }
}
