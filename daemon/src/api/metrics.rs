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
    let raft = node.membership_status().await?;
    gauge(
        "tandem_raft_term",
        "Raft term of the member list's consensus.",
        raft.term,
    );
    gauge(
        "tandem_raft_is_leader",
        "1 if this node leads the member list's consensus.",
        u64::from(raft.role == "leader"),
    );
    gauge(
        "tandem_raft_leader_known",
        "1 if a leader of the member list is known here.",
        u64::from(raft.leader.is_some()),
    );
    gauge(
        "tandem_raft_commit_index",
        "Last member-list log index committed and applied here.",
        raft.applied_index.unwrap_or(0),
    );
    gauge(
        "tandem_membership_epoch",
        "Epoch of the member list (bumped by a recovery).",
        raft.epoch,
    );
    gauge(
        "tandem_raft_voters",
        "Voters of the member list.",
        raft.voters.len() as u64,
    );
    gauge(
        "tandem_raft_voters_changing",
        "1 while a change of voters is under way (joint consensus: majorities of old and new).",
        u64::from(raft.joint),
    );
    gauge(
        "tandem_raft_voters_reachable",
        "Voters reachable from here (this node counts if it is one).",
        raft.reachable_voters as u64,
    );
    gauge(
        "tandem_raft_out_of_order_applies_total",
        "Member-list log entries refused because they arrived out of log order (always 0).",
        raft.out_of_order_applies,
    );
    gauge(
        "tandem_membership_changes_possible",
        "1 if an admission or removal could commit now (a majority of voters reachable).",
        u64::from(raft.changes_possible),
    );
    gauge(
        "tandem_damaged_deltas",
        "Deltas found damaged on disk and not yet replaced by a good copy from a member.",
        node.damaged().await?.len() as u64,
    );
    gauge(
        "tandem_disk_full",
        "1 while the last commit failed because the disk is full.",
        u64::from(node.disk_full()),
    );
    gauge(
        "tandem_damage_found_total",
        "Damaged deltas and snapshots found since start.",
        node.damage_found(),
    );
    gauge(
        "tandem_commit_failures_total",
        "Commits that failed (a full disk, an IO error) since start; their writes were refused.",
        node.writer_stats().failures.load(Relaxed),
    );
    gauge(
        "tandem_peers_connected",
        "Peers with an open sync session.",
        peers.iter().filter(|p| p.connected).count() as u64,
    );

    type PeerField = fn(&crate::PeerStatus) -> u64;
    let per_peer: [(&str, &str, &str, PeerField); 6] = [
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
            "1 if the peer confirmed holding exactly what we hold.",
            |p| u64::from(p.in_sync),
        ),
        (
            "tandem_peer_lacks_deltas",
            "gauge",
            "Our deltas the peer has not confirmed storing (writes since it left count).",
            |p| p.lacks.unwrap_or(0),
        ),
    ];
    let name = "tandem_members_health";
    let _ = writeln!(
        out,
        "# HELP {name} Members by their health as gossip (SWIM) sees them.\n# TYPE {name} gauge"
    );
    for state in ["alive", "suspect", "down"] {
        let n = peers.iter().filter(|p| p.health == Some(state)).count();
        let _ = writeln!(out, "{name}{{state=\"{state}\"}} {n}");
    }
    let name = "tandem_gossip_dropped_total";
    let _ = writeln!(
        out,
        "# HELP {name} Gossip datagrams dropped: not a member, forged identity, malformed, refused.\n# TYPE {name} counter"
    );
    for (why, n) in node.gossip_dropped() {
        let _ = writeln!(out, "{name}{{reason=\"{why}\"}} {n}");
    }
    let name = "tandem_entropy_exchanges_total";
    let _ = writeln!(
        out,
        "# HELP {name} Anti-entropy exchanges asked for: a gap between this node and a member that live sync did not fill within the grace.\n# TYPE {name} counter\n{name} {}",
        node.entropy_exchanges()
    );
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
    let _ = writeln!(
        out,
        "# HELP tandem_build_info The running build.\n# TYPE tandem_build_info gauge\n\
         tandem_build_info{{version=\"{}\",protocol=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        tandem_crdt::proto::PROTOCOL_VERSION
    );
    process_metrics(&mut out);
    Ok(out)
}

/// The standard `process_*` metrics, read from `/proc/self` (Linux; elsewhere left out).
fn process_metrics(out: &mut String) {
    // utime and stime, fields 14 and 15 of /proc/self/stat, after the parenthesised name.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // Fields counted from the state (field 3) at index 0: utime is 14, stime 15. Linux
    // reports them in USER_HZ, which is 100 on every mainstream architecture.
    if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total User and system CPU time spent.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
            (u + s) as f64 / 100.0
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kb) = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            kb * 1024
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}",
            fds.count()
        );
    }
}
