//! Nodes as separate processes (the `peer` helper) on real sockets: two processes on loopback
//! pair and sync; and, as root, two network namespaces joined by a veth pair where members whose
//! stored addresses went stale find each other again over mDNS.

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
    assert!(b.ask("nearby").contains(&a_id));
    assert!(a.ask("nearby").contains(&b_id));
    a.quit();
    b.quit();
}
