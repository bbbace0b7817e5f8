//! Helpers shared by the library's integration tests.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use tandem::{Config, Node};

/// A node on `dir` with the default configuration.
pub async fn open(dir: &std::path::Path) -> Node {
    Node::open(Config::new(dir)).await.unwrap()
}

/// Waits (up to 3 s) for the compactor to have made at least `n` snapshots; returns how many
/// there are.
pub async fn snapshots_reach(node: &Node, n: u64) -> u64 {
    for _ in 0..300 {
        let made = node.stats().await.unwrap().0.snapshots;
        if made >= n {
            return made;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.stats().await.unwrap().0.snapshots
}
