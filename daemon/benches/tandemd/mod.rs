//! A real `tandemd` process for the benchmarks that measure what users run.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How the benches profile a daemon (the output file follows).
const PERF_RECORD: [&str; 6] = ["record", "--call-graph", "dwarf", "-F", "499", "-o"];

/// A real tandemd (this build's, or `BENCH_TANDEMD`), loopback only, stopped with SIGTERM on
/// drop.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub base: String,
    pub token: String,
    /// One HTTP client, keeping its connections alive, as an app's would.
    agent: ureq::Agent,
}

impl Daemon {
    pub fn start(dir: PathBuf, perf: Option<&str>) -> Daemon {
        std::fs::create_dir_all(&dir).unwrap();
        let bin = std::env::var("BENCH_TANDEMD")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_tandemd").to_string());
        let mut cmd = match perf {
            Some(out) => {
                let mut c = Command::new("perf");
                c.args(PERF_RECORD).args([out, "--"]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["--data-dir", dir.to_str().unwrap()])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--no-mdns",
            ])
            .env("XDG_CONFIG_HOME", dir.join("no-config"))
            .stdout(Stdio::null())
            // `BENCH_LOG=DIR`: each daemon's log in `DIR/<its data dir's name>.log` (filter
            // with `RUST_LOG`).
            .stderr(match std::env::var_os("BENCH_LOG") {
                Some(logs) => {
                    let name = dir.file_name().unwrap().to_string_lossy().to_string();
                    std::fs::create_dir_all(&logs).unwrap();
                    let path = std::path::Path::new(&logs).join(format!("{name}.log"));
                    Stdio::from(std::fs::File::create(path).unwrap())
                }
                None => Stdio::null(),
            })
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !dir.join("api.json").exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "tandemd did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let api: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("api.json")).unwrap()).unwrap();
        let token = std::fs::read_to_string(dir.join("api-token")).unwrap();
        Daemon {
            child,
            base: format!("http://{}", api["addr"].as_str().unwrap()),
            token: token.trim().to_string(),
            dir,
            agent: ureq::AgentBuilder::new()
                .max_idle_connections_per_host(8)
                .build(),
        }
    }

    pub fn req(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    /// `GET path`, its body read to the end as a client does (a response dropped unread also
    /// costs its connection: ureq cannot reuse it, and the next request connects again).
    pub fn get(&self, path: &str) -> String {
        self.req("GET", path).call().unwrap().into_string().unwrap()
    }

    pub fn json(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self.req(method, path);
        let resp = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        }
        .unwrap();
        if resp.status() == 204 {
            Value::Null
        } else {
            resp.into_json().unwrap()
        }
    }

    pub fn digest(&self) -> String {
        self.json("GET", "/v1/status", None)["clock"]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Joins `inviter`'s cluster and waits until this node's clock digest is `target`;
    /// returns the time from the join.
    pub fn join_until(&self, inviter: &Daemon, target: &str) -> Duration {
        let token = inviter.json("POST", "/v1/invite", None)["token"].clone();
        let start = Instant::now();
        self.json(
            "POST",
            "/v1/join",
            Some(serde_json::json!({ "token": token })),
        );
        while self.digest() != target {
            assert!(
                start.elapsed() < Duration::from_secs(1800),
                "sync timed out"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        start.elapsed()
    }

    /// Starts `perf record` (DWARF call graphs) on this running daemon, writing `out`; stop it
    /// with [`stop_perf`] to profile only what happened in between.
    pub fn perf_attach(&self, out: &str) -> Child {
        let c = Command::new("perf")
            .args(PERF_RECORD)
            .args([out, "-p"])
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // perf needs a moment to attach.
        std::thread::sleep(Duration::from_millis(500));
        c
    }

    /// CPU seconds used so far, and peak RSS in MB.
    pub fn usage(&self) -> (f64, f64) {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let hwm = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .unwrap_or(0.0);
        (ticks / 100.0, hwm / 1024.0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// One document as automerge-repo's benchmarks make them: an `items` list filled in 10
/// changes, saved as `.automerge` bytes.
pub fn make_doc(i: usize) -> Vec<u8> {
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ObjType, ROOT};
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let items = tx.put_object(ROOT, "items", ObjType::List).unwrap();
    tx.put(ROOT, "title", format!("doc {i}")).unwrap();
    tx.commit();
    for c in 0..9 {
        let mut tx = doc.transaction();
        tx.insert(&items, c, format!("item {c} of {i}")).unwrap();
        tx.commit();
    }
    doc.save()
}

/// Imports `files` into `d` four at a time (as `tandem doc import FILES...` does); returns
/// the new ids in file order.
pub fn import_all(d: &Daemon, files: &[Vec<u8>]) -> Vec<String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut ids: Vec<(usize, String)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(f) = files.get(i) else { break got };
                        let v: Value = d
                            .req("POST", "/v1/docs/import")
                            .send_bytes(f)
                            .unwrap()
                            .into_json()
                            .unwrap();
                        got.push((i, v["id"].as_str().unwrap().to_string()));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// Stops a `perf record` started by [`Daemon::perf_attach`] and waits for it to write its file.
pub fn stop_perf(mut perf: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
}
