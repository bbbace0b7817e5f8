//! Helpers shared by the end-to-end tests that run the real binaries.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn bin(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; the workspace's binaries one level up.
    let dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build --workspace` first",
        path.display()
    );
    path
}

pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(&[], &[])
    }

    /// A daemon on a fresh data dir, loopback only, with extra flags and environment. Its
    /// config dir is an empty temp dir so the user's own config cannot leak in.
    pub fn start_with(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let child = spawn_tandemd(dir.path(), extra, env);
        Daemon { child, dir }
    }

    /// A daemon whose data dir is made inside `parent` (a small disk, say).
    pub fn start_in(parent: &Path) -> Daemon {
        std::fs::create_dir_all(parent).unwrap();
        let dir = tempfile::tempdir_in(parent).unwrap();
        let child = spawn_tandemd(dir.path(), &[], &[]);
        Daemon { child, dir }
    }

    /// Starts tandemd again on this daemon's data dir (after [`Daemon::stop`]).
    pub fn restart(&mut self) {
        // After a kill -9 the old api.json is still there; wait for the new one.
        let _ = std::fs::remove_file(self.dir.path().join("api.json"));
        self.child = spawn_tandemd(self.dir.path(), &[], &[]);
    }

    pub fn tandem(&self, args: &[&str]) -> Output {
        tandem(self.dir.path(), args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.tandem(args);
        assert!(
            out.status.success(),
            "tandem {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn api(&self) -> (String, String) {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.path().join("api.json")).unwrap(),
        )
        .unwrap();
        let token = std::fs::read_to_string(self.dir.path().join("api-token")).unwrap();
        (
            format!("http://{}", v["addr"].as_str().unwrap()),
            token.trim().to_string(),
        )
    }

    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "tandemd did not stop within 15 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "tandemd exits 0 on SIGTERM: {status}");
        assert!(
            !self.dir.path().join("api.json").exists(),
            "api.json removed on exit"
        );
    }
}

/// tandemd on `dir`, loopback only, API and QUIC on free ports, no mDNS, its config dir an
/// empty temp dir (so the user's own config cannot leak in); returns once it is ready.
fn spawn_tandemd(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let child = Command::new(bin("tandemd"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--no-mdns",
        ])
        .args(extra)
        .env("XDG_CONFIG_HOME", dir.join("no-config"))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        // Kept beside the data dir (appended across restarts) for a failing test to show.
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.with_extension("log"))
                .map(std::process::Stdio::from)
                .unwrap_or_else(|_| std::process::Stdio::null()),
        )
        .spawn()
        .unwrap();
    wait_for_file(&dir.join("api.json"));
    child
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon running (it would also hold the test's pipes).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "tandemd did not start ({} missing)",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn tandem(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("tandem"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

impl Daemon {
    /// Runs `tandem` on this daemon with extra environment; returns the output.
    pub fn tandem_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(bin("tandem"))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// Starts `tandem doc watch` (with `args` after it) on this daemon.
    pub fn watch(&self, args: &[&str]) -> Lines {
        Lines::spawn(
            Command::new(bin("tandem"))
                .arg("--data-dir")
                .arg(self.dir.path())
                .args(["doc", "watch"])
                .args(args),
        )
    }
}

/// A running process whose stdout arrives line by line; killed on drop.
pub struct Lines {
    child: std::sync::Mutex<Child>,
    rx: std::sync::mpsc::Receiver<String>,
    /// What the process wrote to stderr, for a failing test to show.
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Lines {
    pub fn spawn(cmd: &mut Command) -> Lines {
        use std::io::BufRead as _;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            child: std::sync::Mutex::new(child),
            rx,
            stderr,
        }
    }

    /// Panics saying what was awaited, whether the process still runs, and its stderr.
    fn timed_out(&self, secs: u64) -> ! {
        let status = self.child.lock().unwrap().try_wait();
        panic!(
            "no matching line within {secs}s; process: {status:?} (None: still running); stderr:\n{}",
            self.stderr.lock().unwrap()
        );
    }

    /// The next line within `secs` seconds.
    pub fn next(&self, secs: u64) -> Option<String> {
        self.rx.recv_timeout(Duration::from_secs(secs)).ok()
    }

    /// Reads lines until one satisfies `f` (panics after `secs` seconds).
    pub fn until(&self, secs: u64, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if f(&line) => return line,
                Ok(_) => {}
                Err(_) => self.timed_out(secs),
            }
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Writes an executable shell script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

impl Lines {
    /// Calls `poke` (which should cause a line) every second until a line satisfies `f`: a
    /// watcher started a moment ago may not be listening yet, so one poke could go unseen.
    pub fn poke_until(&self, secs: u64, poke: impl Fn(), f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            poke();
            while let Some(line) = self.next(1) {
                if f(&line) {
                    return line;
                }
            }
        }
        self.timed_out(secs);
    }
}

/// As member `me` on `conn`: opens the sync stream, sends Hello (an empty clock) and one batch
/// of `deltas`, and returns how the peer closed the connection (it must within 10 s).
pub async fn send_batch(
    conn: &quinn::Connection,
    me: tandem::NodeId,
    deltas: Vec<tandem::crdt::Delta>,
) -> quinn::ConnectionError {
    use tandem::net::wire;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[wire::StreamKind::Sync.byte()])
        .await
        .unwrap();
    let mut bytes = wire::encode(&wire::SyncMsg::Hello {
        version: wire::PROTOCOL_VERSION,
        node: me,
        name: "h".into(),
        clock: tandem::crdt::VersionVector::new(),
    })
    .unwrap();
    bytes.extend(wire::encode(&wire::SyncMsg::Batch { seq: 1, deltas }).unwrap());
    send.write_all(&bytes).await.unwrap();
    let _ = wire::read::<wire::SyncMsg>(&mut recv).await;
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .unwrap()
}

/// A library node on `dir`, networking on loopback only (no mDNS).
pub async fn open_loopback(dir: &Path) -> tandem::Node {
    // RUST_LOG=tandem=debug shows what the nodes do.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = tandem::Config::new(dir);
    cfg.net = Some(tandem::NetConfig::loopback());
    tandem::Node::open(cfg).await.unwrap()
}

/// Waits until `f` holds, or fails after 30 s with `what`.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    // Generous: debug builds on a loaded 2-core machine run many nodes at once.
    while start.elapsed() < Duration::from_secs(30) {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after 30 s waiting for {what}");
}
