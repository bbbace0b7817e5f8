//! `GET /metrics`: the node's counters in the Prometheus text exposition format (0.0.4).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::store::COMMIT_BUCKETS_MICROS;
use crate::{Error, Node};

/// The metrics page for `node`.
pub async fn render(node: &Node) -> Result<String, Error> {
    let (stats, loaded) = node.stats().await?;
    let peers = node.peers();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "tandem_documents",
        "Documents held (not deleted).",
        stats.documents,
    );
    gauge("tandem_deltas", "Deltas stored.", stats.deltas);
    gauge(
        "tandem_documents_loaded",
        "Documents loaded in memory.",
        loaded as u64,
    );
    gauge(
        "tandem_members",
        "Members of the group other than this node.",
        node.members().len() as u64,
    );
    gauge(
        "tandem_peers_connected",
        "Peers with an open sync session.",
        peers.iter().filter(|p| p.connected).count() as u64,
    );

    type PeerField = fn(&crate::PeerStatus) -> u64;
    let per_peer: [(&str, &str, &str, PeerField); 5] = [
        (
            "tandem_peer_bytes_sent_total",
            "counter",
            "Bytes sent to a peer.",
            |p| p.bytes_sent,
        ),
        (
            "tandem_peer_bytes_received_total",
            "counter",
            "Bytes received from a peer.",
            |p| p.bytes_received,
        ),
        (
            "tandem_peer_deltas_sent_total",
            "counter",
            "Deltas sent to a peer.",
            |p| p.deltas_sent,
        ),
        (
            "tandem_peer_deltas_received_total",
            "counter",
            "Deltas received from a peer.",
            |p| p.deltas_received,
        ),
        (
            "tandem_peer_in_sync",
            "gauge",
            "1 if our clocks are equal as far as we know.",
            |p| u64::from(p.in_sync),
        ),
    ];
    for (name, kind, help, field) in per_peer {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in &peers {
            if let Some(id) = p.id {
                let _ = writeln!(out, "{name}{{peer=\"{id}\"}} {}", field(p));
            }
        }
    }

    let w = node.writer_stats();
    let name = "tandem_commit_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to commit one group of writes (SQL and fsync).\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (i, bound) in COMMIT_BUCKETS_MICROS.iter().enumerate() {
        cumulative += w.commit_histogram[i].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    // From the buckets rather than `commits`, so the counts agree even while commits land.
    let commits = cumulative + w.commit_histogram[COMMIT_BUCKETS_MICROS.len()].load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {commits}");
    let _ = writeln!(
        out,
        "{name}_sum {}",
        w.commit_micros.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "{name}_count {commits}");
    let name = "tandem_commit_writes_total";
    let _ = writeln!(
        out,
        "# HELP {name} Write requests answered by commits (group commit folds many into one).\n# TYPE {name} counter\n{name} {}",
        w.writes.load(Relaxed)
    );
    Ok(out)
}
