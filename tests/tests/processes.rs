//! Nodes as separate processes (the `peer` helper) on real sockets: two processes on loopback
//! pair and sync; and, as root, network namespaces: two joined by a veth pair where members
//! whose stored addresses went stale find each other again over mDNS, and three on a bridge
//! where two members that moved to new addresses find each other through gossip alone.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    id: String,
}

impl Peer {
    fn start(prefix: &[&str], dir: &std::path::Path, listen: &str, mdns: Option<&str>) -> Peer {
        let exe = env!("CARGO_BIN_EXE_peer");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg(dir).arg(listen);
        if let Some(i) = mdns {
            cmd.args(["--mdns", i]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("ready"), "peer said {line:?}");
        let id = parts.next().unwrap().to_string();
        Peer {
            child,
            stdin,
            stdout,
            id,
        }
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    fn quit(mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

#[test]
fn two_processes_pair_and_sync() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Peer::start(&[], da.path(), "127.0.0.1:0", None);
    let mut b = Peer::start(&[], db.path(), "127.0.0.1:0", None);
    let token = a.ask("invite");
    assert!(token.starts_with("tandem1"), "{token}");
    assert_eq!(b.ask(&format!("join {token}")), "ok");
    let doc = a.ask(r#"create {"hello":"world"}"#);
    assert_eq!(b.ask(&format!(r#"wait {doc} /hello "world" 10"#)), "ok");
    assert_eq!(b.ask(&format!("put {doc} /from \"b\"")), "ok");
    assert_eq!(a.ask(&format!(r#"wait {doc} /from "b" 10"#)), "ok");
    assert!(a.ask("get nonsense /x").starts_with("err"));
    a.quit();
    b.quit();
}

#[test]
fn a_peer_killed_and_restarted_is_back_in_sync_within_seconds() {
    // B dies without closing its connection (SIGKILL), so A's side of it looks alive until
    // QUIC's idle timeout (30 s). B's new connection must replace it, not wait for that.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Peer::start(&[], da.path(), "127.0.0.1:0", None);
    let mut b = Peer::start(&[], db.path(), "127.0.0.1:0", None);
    let token = a.ask("invite");
    assert_eq!(b.ask(&format!("join {token}")), "ok");
    let doc = a.ask(r#"create {"n":0}"#);
    assert_eq!(b.ask(&format!("wait {doc} /n 0 10")), "ok");
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    assert_eq!(a.ask(&format!("put {doc} /n 1")), "ok");
    let start = std::time::Instant::now();
    let mut b = Peer::start(&[], db.path(), "127.0.0.1:0", None);
    assert_eq!(
        b.ask(&format!("wait {doc} /n 1 10")),
        "ok",
        "B was not back in sync within 10 s of its restart"
    );
    eprintln!("back in sync {:?} after the restart", start.elapsed());
    assert_eq!(b.ask(&format!("put {doc} /n 2")), "ok");
    assert_eq!(a.ask(&format!("wait {doc} /n 2 10")), "ok");
    a.quit();
    b.quit();
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            sh(&["ip", "netns", "del", ns]);
        }
    }
}

#[test]
fn mdns_across_network_namespaces() {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.ok().as_deref() != Some("0") || !sh(&["ip", "netns", "list"]) {
        eprintln!(
            "SKIPPED mdns_across_network_namespaces: needs root and iproute2 (`ip netns`); CI runs it"
        );
        return;
    }
    let tag = std::process::id() % 100_000;
    let (na, nb) = (format!("tdma{tag}"), format!("tdmb{tag}"));
    let _cleanup = Netns(vec![na.clone(), nb.clone()]);
    let (va, vb) = (format!("tva{tag}"), format!("tvb{tag}"));
    for cmd in [
        vec!["ip", "netns", "add", &na],
        vec!["ip", "netns", "add", &nb],
        vec![
            "ip", "link", "add", &va, "netns", &na, "type", "veth", "peer", "name", &vb, "netns",
            &nb,
        ],
        vec!["ip", "-n", &na, "addr", "add", "10.231.0.1/24", "dev", &va],
        vec!["ip", "-n", &nb, "addr", "add", "10.231.0.2/24", "dev", &vb],
        vec!["ip", "-n", &na, "link", "set", &va, "up"],
        vec!["ip", "-n", &nb, "link", "set", &vb, "up"],
        vec!["ip", "-n", &na, "link", "set", "lo", "up"],
        vec!["ip", "-n", &nb, "link", "set", "lo", "up"],
    ] {
        assert!(sh(&cmd), "setup failed: {cmd:?}");
    }
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let in_a = ["ip", "netns", "exec", na.as_str()];
    let in_b = ["ip", "netns", "exec", nb.as_str()];

    // Pair them (the invite carries A's address), then restart both on new ports: the
    // addresses each stored for the other are stale, so only mDNS can bring them together.
    let mut a = Peer::start(&in_a, da.path(), "10.231.0.1:0", None);
    let mut b = Peer::start(&in_b, db.path(), "10.231.0.2:0", None);
    let token = a.ask("invite");
    assert_eq!(b.ask(&format!("join {token}")), "ok");
    let (a_id, b_id) = (a.id.clone(), b.id.clone());
    a.quit();
    b.quit();

    let mut a = Peer::start(&in_a, da.path(), "0.0.0.0:0", Some(&va));
    let mut b = Peer::start(&in_b, db.path(), "0.0.0.0:0", Some(&vb));
    let doc = a.ask(r#"create {"via":"mdns"}"#);
    assert_eq!(
        b.ask(&format!(r#"wait {doc} /via "mdns" 30"#)),
        "ok",
        "B found A over mDNS"
    );
    // Each hears the other's announcements in its own time: B may have reached A at A's old
    // port (a restarted node takes its previous port again when it is free) before either
    // heard the other on mDNS.
    for (peer, other, what) in [(&mut b, &a_id, "B to see A"), (&mut a, &b_id, "A to see B")] {
        let start = std::time::Instant::now();
        while !peer.ask("nearby").contains(other.as_str()) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(30),
                "mDNS: {what} within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    a.quit();
    b.quit();
}

fn is_root_with_netns(test: &str) -> bool {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.ok().as_deref() != Some("0") || !sh(&["ip", "netns", "list"]) {
        eprintln!("SKIPPED {test}: needs root and iproute2 (`ip netns`); CI runs it");
        return false;
    }
    true
}

/// Three hosts (network namespaces on a bridge in a fourth), mDNS off. B and C move: each is
/// restarted on a new IP address and a new port. Each still knows A's address and reconnects
/// to it; nobody tells B or C where the other went. Only the addresses A gossips can bring them
/// together again, and they must.
#[test]
fn members_that_moved_to_new_addresses_find_each_other_through_gossip() {
    if !is_root_with_netns("members_that_moved_to_new_addresses_find_each_other_through_gossip") {
        return;
    }
    let tag = std::process::id() % 100_000;
    let ns: Vec<String> = ["a", "b", "c", "s"]
        .iter()
        .map(|n| format!("tdg{n}{tag}"))
        .collect();
    let _cleanup = Netns(ns.clone());
    let sw = &ns[3];
    let br = format!("tbr{tag}");
    let mut setup: Vec<Vec<String>> = vec![
        vec!["ip", "netns", "add", sw],
        vec!["ip", "-n", sw, "link", "add", &br, "type", "bridge"],
        vec!["ip", "-n", sw, "link", "set", &br, "up"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for (i, host) in ns[..3].iter().enumerate() {
        let (inner, outer) = (format!("tg{i}{tag}"), format!("tq{i}{tag}"));
        for cmd in [
            vec!["ip", "netns", "add", host],
            vec![
                "ip", "link", "add", &inner, "netns", host, "type", "veth", "peer", "name", &outer,
                "netns", sw,
            ],
            vec!["ip", "-n", sw, "link", "set", &outer, "master", &br],
            vec!["ip", "-n", sw, "link", "set", &outer, "up"],
            vec![
                "ip",
                "-n",
                host,
                "addr",
                "add",
                &format!("10.232.0.{}/24", i + 1),
                "dev",
                &inner,
            ],
            vec!["ip", "-n", host, "link", "set", &inner, "up"],
            vec!["ip", "-n", host, "link", "set", "lo", "up"],
        ] {
            setup.push(cmd.into_iter().map(String::from).collect());
        }
    }
    for cmd in &setup {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        assert!(sh(&args), "setup failed: {cmd:?}");
    }
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let prefix = |i: usize| ["ip", "netns", "exec", ns[i].as_str()];
    let start =
        |i: usize, ip: &str| Peer::start(&prefix(i), dirs[i].path(), &format!("{ip}:0"), None);

    let mut a = start(0, "10.232.0.1");
    let mut b = start(1, "10.232.0.2");
    let mut c = start(2, "10.232.0.3");
    assert_eq!(b.ask(&format!("join {}", a.ask("invite"))), "ok");
    assert_eq!(c.ask(&format!("join {}", a.ask("invite"))), "ok");
    let (b_id, c_id) = (b.id.clone(), c.id.clone());
    let until = |what: &str, f: &mut dyn FnMut() -> bool| {
        let t = std::time::Instant::now();
        while !f() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(60),
                "timed out: {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        t.elapsed()
    };
    until("B and C connected", &mut || {
        b.ask(&format!("connected {c_id}")) != "no"
    });
    b.quit();
    c.quit();
    // Both move to another address (as a laptop does on another network), and a new port.
    for (i, old, new) in [
        (1, "10.232.0.2", "10.232.0.12"),
        (2, "10.232.0.3", "10.232.0.13"),
    ] {
        let dev = format!("tg{i}{tag}");
        assert!(sh(&[
            "ip",
            "-n",
            &ns[i],
            "addr",
            "del",
            &format!("{old}/24"),
            "dev",
            &dev
        ]));
        assert!(sh(&[
            "ip",
            "-n",
            &ns[i],
            "addr",
            "add",
            &format!("{new}/24"),
            "dev",
            &dev
        ]));
    }
    let mut b = start(1, "10.232.0.12");
    let mut c = start(2, "10.232.0.13");
    let took = until("B to reach C at its new address", &mut || {
        b.ask(&format!("connected {c_id}"))
            .starts_with("10.232.0.13:")
    });
    until("C to see B at its new address", &mut || {
        c.ask(&format!("connected {b_id}"))
            .starts_with("10.232.0.12:")
    });
    eprintln!("members on new addresses reconnected through gossip after {took:?}");
    let doc = c.ask(r#"create {"moved":"address"}"#);
    assert_eq!(b.ask(&format!(r#"wait {doc} /moved "address" 30"#)), "ok");
    a.quit();
    b.quit();
    c.quit();
}
