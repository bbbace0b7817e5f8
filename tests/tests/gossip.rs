//! Member health by gossip (SWIM over QUIC datagrams) with real `tandemd` processes: a member
//! that stops answering (SIGSTOP, a frozen laptop) is seen suspect, then down, by the others
//! (`tandem peers`, `tandem members`, `/metrics`, `member_down` on the event stream), and alive
//! again within seconds of SIGCONT (`member_up`).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::Daemon;

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// How `d` sees member `who` (`tandem peers --json`).
fn health(d: &Daemon, who: &str) -> Option<String> {
    json(&d.ok(&["peers", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"].as_str() == Some(who))
        .and_then(|p| p["health"].as_str().map(str::to_string))
}

/// Waits until `f` holds, at most `secs`; returns how long it took.
fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn signal(d: &Daemon, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &d.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[test]
fn a_stopped_member_is_suspect_then_down_and_alive_again_after_it_resumes() {
    let a = Daemon::start();
    let b = Daemon::start();
    let c = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    c.ok(&["join", &a.ok(&["invite"])]);
    let c_id = c.ok(&["id"]);
    for d in [&a, &b] {
        until("C alive as gossip sees it", 30, || {
            health(d, &c_id).as_deref() == Some("alive")
        });
    }
    // A's event stream names the member events (`tandem doc watch` shows them too).
    let events = a.watch(&["--json"]);
    signal(&c, "-STOP");
    for d in [&a, &b] {
        until("C suspect", 15, || {
            health(d, &c_id).as_deref() != Some("alive")
        });
    }
    for d in [&a, &b] {
        until("C down", 30, || health(d, &c_id).as_deref() == Some("down"));
    }
    let members = a.ok(&["members"]);
    assert!(members.contains("down"), "{members}");
    let (base, token) = a.api();
    let metrics = ureq::get(&format!("{base}/metrics"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("tandem_members_health{state=\"down\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ntandem_entropy_exchanges_total "),
        "{metrics}"
    );
    let down = events.until(30, |l| l.contains("member_down") && l.contains(&c_id));
    assert!(down.contains("\"health\":\"down\""), "{down}");
    signal(&c, "-CONT");
    for d in [&a, &b] {
        let took = until("C alive again", 20, || {
            health(d, &c_id).as_deref() == Some("alive")
        });
        assert!(took < Duration::from_secs(10), "alive again after {took:?}");
    }
    events.until(20, |l| l.contains("member_up") && l.contains(&c_id));
    // And it syncs: a write made on A meanwhile reaches C.
    let doc = a.ok(&["doc", "new", r#"{"after":"cont"}"#]);
    until("C to get A's write", 30, || {
        c.tandem(&["doc", "get", &doc]).status.success()
    });
}

/// The `addr` `d` shows for connected member `who`, if connected.
fn connected_at(d: &Daemon, who: &str) -> Option<String> {
    json(&d.ok(&["peers", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"].as_str() == Some(who) && p["connected"] == true)
        .and_then(|p| p["addr"].as_str().map(str::to_string))
}

/// The QUIC port `d` listens on now.
fn quic_port(d: &Daemon) -> String {
    let status = json(&d.ok(&["status", "--json"]));
    let addrs = status["addrs"].as_array().unwrap();
    let a = addrs[0].as_str().unwrap();
    a.rsplit(':').next().unwrap().to_string()
}

#[test]
fn members_that_moved_find_each_other_through_gossiped_addresses() {
    let a = Daemon::start();
    let mut b = Daemon::start();
    let mut c = Daemon::start();
    b.ok(&["join", &a.ok(&["invite"])]);
    c.ok(&["join", &a.ok(&["invite"])]);
    let (b_id, c_id) = (b.ok(&["id"]), c.ok(&["id"]));
    until("B and C connected", 30, || {
        connected_at(&b, &c_id).is_some()
    });
    // Both move: restarted, each on a new port. mDNS is off and no one is told the new
    // addresses; B and C know each other only at the old ones. A stays where it was, and both
    // reconnect to it; only what A gossips can bring B and C together again.
    let (b_old, c_old) = (quic_port(&b), quic_port(&c));
    b.stop();
    c.stop();
    b.restart();
    c.restart();
    let (b_new, c_new) = (quic_port(&b), quic_port(&c));
    assert!(b_new != b_old && c_new != c_old, "new ports");
    let took = until("B to reach C at its new address", 60, || {
        connected_at(&b, &c_id).is_some_and(|addr| addr.ends_with(&format!(":{c_new}")))
    });
    until("C to see B", 10, || {
        connected_at(&c, &b_id).is_some_and(|addr| addr.ends_with(&format!(":{b_new}")))
    });
    eprintln!("moved members reconnected through gossip after {took:?}");
    // And they sync directly: a write on C reaches B.
    let doc = c.ok(&["doc", "new", r#"{"moved":true}"#]);
    until("B to get C's write", 30, || {
        b.tandem(&["doc", "get", &doc]).status.success()
    });
}
