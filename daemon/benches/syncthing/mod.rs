//! Syncthing as the reference for what an idle cluster should cost: three real `syncthing`
//! processes on loopback sharing one folder (file watcher on, as installed; discovery, relays,
//! NAT and upgrades off), the same shape of cluster the tandem benches start.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `syncthing` binary: `BENCH_SYNCTHING`, else `syncthing` on the PATH; `None` when there
/// is none (or `BENCH_SYNCTHING=0`).
pub fn binary() -> Option<String> {
    let bin = std::env::var("BENCH_SYNCTHING").unwrap_or_else(|_| "syncthing".into());
    if bin == "0" {
        return None;
    }
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bin)
}

/// Three paired Syncthing instances, stopped on drop.
pub struct Cluster {
    pub children: Vec<Child>,
    pub data: Vec<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

impl Cluster {
    /// Generates keys, writes each config, puts `files` (name, bytes) in the first instance's
    /// folder and starts all three.
    pub fn start(bin: &str, dir: &Path, files: &[(String, Vec<u8>)]) -> Cluster {
        let names = ["a", "b", "c"];
        let mut ids = Vec::new();
        for n in names {
            let out = Command::new(bin)
                .args(["generate", "--no-default-folder"])
                .arg(format!("--home={}", dir.join(n).display()))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            let id = text
                .lines()
                .find_map(|l| l.split("Device ID: ").nth(1))
                .expect("syncthing generate printed no device id")
                .trim()
                .to_string();
            ids.push(id);
        }
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let data: Vec<PathBuf> = names
            .iter()
            .map(|n| dir.join(format!("{n}-data")))
            .collect();
        for (i, n) in names.iter().enumerate() {
            std::fs::create_dir_all(&data[i]).unwrap();
            let devices: String = names
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    let addr = if i == j {
                        "dynamic".to_string()
                    } else {
                        format!("tcp://127.0.0.1:{}", ports[j])
                    };
                    format!(
                        r#"<device id="{}" name="{m}" compression="metadata"><address>{addr}</address></device>"#,
                        ids[j]
                    )
                })
                .collect();
            let members: String = ids
                .iter()
                .map(|id| format!(r#"<device id="{id}"></device>"#))
                .collect();
            let config = format!(
                r#"<configuration version="36">
<folder id="bench" label="bench" path="{path}" type="sendreceive" rescanIntervalS="3600" fsWatcherEnabled="true" fsWatcherDelayS="10"><filesystemType>basic</filesystemType>{members}</folder>
{devices}
<gui enabled="true" tls="false"><address>127.0.0.1:{gui}</address></gui>
<options><listenAddress>tcp://127.0.0.1:{port}</listenAddress><globalAnnounceEnabled>false</globalAnnounceEnabled><localAnnounceEnabled>false</localAnnounceEnabled><relaysEnabled>false</relaysEnabled><natEnabled>false</natEnabled><startBrowser>false</startBrowser><urAccepted>-1</urAccepted><crashReportingEnabled>false</crashReportingEnabled><autoUpgradeIntervalH>0</autoUpgradeIntervalH></options>
</configuration>
"#,
                path = data[i].display(),
                gui = free_port(),
                port = ports[i],
            );
            std::fs::write(dir.join(n).join("config.xml"), config).unwrap();
        }
        for (name, bytes) in files {
            std::fs::write(data[0].join(name), bytes).unwrap();
        }
        let children = names
            .iter()
            .map(|n| {
                Command::new(bin)
                    .args(["serve", "--no-browser", "--no-restart"])
                    .arg(format!("--home={}", dir.join(n).display()))
                    .env("STNOUPGRADE", "1")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        Cluster { children, data }
    }

    /// Waits until every instance's folder holds `n` files (`false` after `limit`).
    pub fn wait_synced(&self, n: usize, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            let all = self.data.iter().all(|d| {
                std::fs::read_dir(d).map_or(0, |r| {
                    r.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .count()
                }) >= n
            });
            if all {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
