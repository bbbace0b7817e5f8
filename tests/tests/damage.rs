//! Hardening with real daemons: a node whose stored change was flipped on disk reports it and
//! heals from its member over QUIC without a restart; a full disk is its own error (507, a CLI
//! message that says what to do), and writing resumes when space returns; a delta forged by a
//! member in another's name is refused, naming the sender.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::Daemon;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Flips three bytes inside this node's own change `seq`; SQLite's checks still pass.
fn flip_own_change(db: &Path, seq: i64) {
    let db = rusqlite::Connection::open(db).unwrap();
    let (rowid, mut change): (i64, Vec<u8>) = db
        .query_row(
            "SELECT rowid, change FROM deltas WHERE seq = ?1
             AND origin = (SELECT value FROM meta WHERE key = 'node_id')",
            [seq],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mid = change.len() / 2;
    for b in &mut change[mid..mid + 3] {
        *b ^= 0x5a;
    }
    db.execute(
        "UPDATE deltas SET change = ?2 WHERE rowid = ?1",
        rusqlite::params![rowid, change],
    )
    .unwrap();
}

#[test]
fn a_damaged_change_is_reported_and_healed_from_a_member_over_quic() {
    let mut a = Daemon::start();
    let b = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    let doc = a.ok(&["doc", "new", r#"{"k0":0}"#]);
    for i in 1..5 {
        a.ok(&["doc", "put", &doc, &format!("/k{i}"), &i.to_string()]);
    }
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    let want = a.ok(&["doc", "get", &doc]);
    a.stop();
    flip_own_change(&a.dir.path().join("tandem.db"), 3);
    a.restart();

    // Never served without its keys: a clear error, and the status says what is healing.
    let out = a.tandem(&["doc", "get", &doc]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "damaged doc served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains("damaged") && err.contains("hint"), "{err}");

    // B sends the good copy once the sessions restart: healed, no restart, no operator.
    let started = Instant::now();
    let healed = loop {
        let out = a.tandem(&["doc", "get", &doc]);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap().trim().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not healed within 20 s: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("healed in {:?}", started.elapsed());
    assert_eq!(healed, want);
    let status = json(&a.ok(&["status", "--json"]));
    assert_eq!(status["damaged_count"], 0, "{status}");
    let metrics = ureq::get(&format!("{}/metrics", a.api().0))
        .set("Authorization", &format!("Bearer {}", a.api().1))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("tandem_damage_found_total 1"), "{metrics}");
    // Both ends settle: equal clocks, in sync.
    a.ok(&["sync", "wait", "--timeout", "20s"]);
    b.ok(&["sync", "wait", "--timeout", "20s"]);
}

/// Mounts a small tmpfs (root only) for a data dir that can fill up.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tandem-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_is_its_own_error_and_writing_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount(16) else {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs this as root)");
        return;
    };
    let mut a = Daemon::start_in(&disk.dir.path().join("data"));
    let doc = a.ok(&["doc", "new", r#"{"n":0}"#]);
    // Fill the disk to the last byte.
    let filler = disk.dir.path().join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let big = "x".repeat(100_000);
    let out = a.tandem(&["doc", "put", &doc, "/big", &format!("\"{big}\"")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("disk") && err.contains("full") && err.contains("free"),
        "{err}"
    );
    // Every write while the disk is full says so (SQLite reports a full disk as SQLITE_FULL
    // on some paths and as an I/O error on others; both are a full disk here).
    let (url, token) = a.api();
    for i in 0..5 {
        let resp = ureq::put(&format!("{url}/v1/docs/{doc}?path=/n{i}"))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", "application/json")
            .send_string(&format!("\"{big}\""));
        match resp {
            Err(ureq::Error::Status(507, r)) => {
                let v: serde_json::Value = r.into_json().unwrap();
                assert_eq!(v["code"], "disk_full");
            }
            Err(ureq::Error::Status(code, r)) => panic!(
                "write {i}: want 507 disk_full, got {code}: {}",
                r.into_string().unwrap_or_default()
            ),
            other => panic!("write {i}: want 507 disk_full, got {other:?}"),
        }
    }
    assert_eq!(json(&a.ok(&["status", "--json"]))["disk_full"], true);
    // Reads still work, and nothing acknowledged was lost.
    assert_eq!(a.ok(&["doc", "get", &doc, "/n"]), "0");

    // Space returns: the next write lands, no restart.
    std::fs::remove_file(&filler).unwrap();
    a.ok(&["doc", "put", &doc, "/n", "1"]);
    assert_eq!(json(&a.ok(&["status", "--json"]))["disk_full"], false);

    // Full again, then a restart on the full disk still succeeds (the reserve).
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    a.stop();
    a.restart();
    assert_eq!(a.ok(&["doc", "get", &doc, "/n"]), "1");
    std::fs::remove_file(&filler).unwrap();
    a.ok(&["doc", "put", &doc, "/n", "2"]);
    a.stop();
    a.restart();
    assert_eq!(a.ok(&["doc", "get", &doc, "/n"]), "2");
}

/// A member (H, a raw QUIC client with a member's key) sends a real tandemd A a delta in B's
/// name before B ever wrote: A refuses it and names H in `tandem peers`; B's genuine first
/// delta then reaches A.
#[test]
fn a_forged_delta_is_refused_by_a_real_daemon_naming_the_sender() {
    use tandem::net::tls;
    let a = Daemon::start();
    let b = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let h_dir = tempfile::tempdir().unwrap();
    let token = a.ok(&["invite"]);
    let h_id = rt.block_on(async {
        let mut cfg = tandem::Config::new(h_dir.path());
        cfg.net = Some(tandem::NetConfig::loopback());
        let h = tandem::Node::open(cfg).await.unwrap();
        h.join(&token).await.unwrap();
        let id = h.id();
        h.close().await.unwrap();
        id
    });
    let identity = tandem::Identity::load_or_create(h_dir.path()).unwrap();
    let b_id: tandem::NodeId = b.ok(&["id"]).parse().unwrap();
    let a_status = json(&a.ok(&["status", "--json"]));
    let a_id: tandem::NodeId = a_status["id"].as_str().unwrap().parse().unwrap();
    let a_addr: std::net::SocketAddr = a_status["listen"].as_str().unwrap().parse().unwrap();
    let change = {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        automerge::transaction::Transactable::put(&mut tx, automerge::ROOT, "owned", true).unwrap();
        tx.commit();
        doc.get_last_local_change().unwrap().raw_bytes().to_vec()
    };
    let b_first = tandem::crdt::DeltaId {
        origin: b_id,
        seq: 1,
    };
    let mut forged = tandem::crdt::Delta {
        id: b_first,
        doc: tandem::DocId::from_bytes([9; 16]),
        body: tandem::crdt::DeltaBody::Change(change),
        auth: Default::default(),
    };
    identity.signer().sign(&mut forged, [0; 32]);
    let reason = rt.block_on(async {
        let endpoint =
            quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let cfg = tls::client_config(&identity, tls::ALPN_SYNC).unwrap();
        let conn = endpoint
            .connect_with(cfg, a_addr, &tls::server_name(&a_id))
            .unwrap()
            .await
            .unwrap();
        support::send_batch(&conn, h_id, vec![forged]).await
    });
    assert!(
        reason.to_string().contains("not signed by its origin"),
        "{reason}"
    );
    // A names H, and stored nothing of it.
    let started = Instant::now();
    loop {
        let peers = json(&a.ok(&["peers", "--json"]));
        let named = peers.as_array().unwrap().iter().any(|p| {
            p["id"].as_str() == Some(h_id.to_string().as_str())
                && p["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("not signed by its origin"))
        });
        if named {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{peers}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !a.tandem(&[
            "doc",
            "get",
            &tandem::DocId::from_bytes([9; 16]).to_string()
        ])
        .status
        .success()
    );
    // B's genuine first delta is not taken for a duplicate of the forged one.
    let doc = b.ok(&["doc", "new", r#"{"genuine":true}"#]);
    let started = Instant::now();
    while !a.tandem(&["doc", "get", &doc, "/genuine"]).status.success() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "B's genuine write never reached A: {}",
            b.ok(&["peers", "--json"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.ok(&["doc", "get", &doc, "/genuine"]), "true");
}
