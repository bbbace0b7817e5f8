//! `tandem`: the command-line client of a running `tandemd`, through its local HTTP API.
//! Finds the daemon from its data dir (`api.json`, `api-token`), or `--api URL --token-file F`.
//! Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running.

mod client;
mod doc;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory as _, Parser, Subcommand};
use serde_json::{Value, json};

use client::{Client, Failure, Res};
use doc::DocAction;
use progress::Progress;

/// Command-line tool for tandem, the offline-first sync daemon.
#[derive(Parser, Debug)]
#[command(name = "tandem", version = tandem::VERSION, about)]
struct Cli {
    /// The node's data dir. Default: $TANDEM_DATA_DIR, else `data_dir` from the config file
    /// (as tandemd reads it), else $XDG_DATA_HOME/tandem.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// tandemd's config file, for its `data_dir`. Default: $XDG_CONFIG_HOME/tandem/config.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    /// The daemon's API base URL (instead of finding it from the data dir).
    #[arg(long, global = true, value_name = "URL", requires = "token_file")]
    api: Option<String>,
    /// File holding the API token (with --api).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// This node's id, counts and clock summary.
    Status,
    /// Print this node's id (reads the data dir; the daemon need not run).
    Id {
        /// Only the 8-character short form.
        #[arg(long)]
        short: bool,
    },
    /// Make a one-time invite token.
    Invite {
        /// How long it stays valid, from 1m to 30d, e.g. 10m, 1h, 2d.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: u64,
    },
    /// Join the cluster of whoever made TOKEN.
    Join {
        /// The token `tandem invite` printed on a member (starts with tandem1).
        token: String,
    },
    /// List members, or remove one.
    Members {
        #[command(subcommand)]
        action: Option<MembersAction>,
    },
    /// Peers: connection, traffic, in-sync.
    Peers,
    /// Documents.
    Doc {
        #[command(subcommand)]
        action: DocAction,
    },
    /// Wait for sync.
    Sync {
        #[command(subcommand)]
        action: SyncAction,
    },
    /// Print the status page's one-time login URL (valid 2 minutes).
    Open {
        /// Also open it in a browser ($BROWSER, xdg-open or open).
        #[arg(long)]
        browser: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum SyncAction {
    /// Block until every member holds everything this node holds, as each confirmed storing
    /// it (a member that is off lacks what was written since it left). A progress bar on a
    /// terminal; on timeout, exit 1 naming who lacks what.
    Wait {
        /// Give up after this long (exit 1), e.g. 30s, 2m.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: u64,
        /// Done as soon as one other member holds everything ("my writes are safe on another
        /// device").
        #[arg(long)]
        any: bool,
    },
}

#[derive(Subcommand, Debug)]
enum MembersAction {
    /// Remove a member: a change to the replicated member list (needs a majority of the
    /// voters); once committed every member cuts it off.
    Rm {
        /// Its NodeId, or any unique prefix of it (the short id `members` shows).
        id: String,
    },
    /// When voters are lost for good: start a new membership epoch with this node as its only
    /// voter. Run it on one survivor only.
    Recover {
        /// Confirm: this overrides the lost voters' say over the member list.
        #[arg(long)]
        yes: bool,
    },
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .map_err(|_| format!("not a duration: {s:?} (try 30s, 10m, 1h)"))
}

fn print(v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

/// The short form of an id or hash for tables: its first 8 characters.
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Whether `v[key]` is `true`.
fn flag(v: &Value, key: &str) -> bool {
    v[key] == json!(true)
}

/// The strings in a JSON array (nothing for anything else).
fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// A peer's or member's state: connected, connecting or offline.
fn state(p: &Value) -> &'static str {
    if flag(p, "connected") {
        "connected"
    } else if flag(p, "connecting") {
        "connecting"
    } else {
        "offline"
    }
}

/// Gossip's view of a member: `alive`, `suspect 4s`, `down 2m` (how long it has been so), or
/// `-` when gossip has not said.
fn health(p: &Value) -> String {
    match (p["health"].as_str(), p["health_since"].as_i64()) {
        (Some("alive"), _) => "alive".into(),
        (Some(h), since) => format!("{h} {}", ago(since).trim_end_matches(" ago")),
        (None, _) => "-".into(),
    }
}

/// Unix milliseconds as a time before now: `3s ago`, `5m ago`, or `never`.
fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = tandem::crdt::typed::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Polls the peers until every connected one is in sync and none is still connecting, or
/// `timeout` passes.
fn sync_wait(c: &Client, timeout: Duration, any: bool, j: bool) -> Res<()> {
    let start = Instant::now();
    let mut bar = Progress::new(0, "syncing");
    let mut most_lacking = 0;
    loop {
        let peers = c.run(c.d().peers())?;
        let members: Vec<&Value> = peers
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["id"].is_string())
            .collect();
        // A member holds everything once it confirmed storing all we hold.
        let holds = |p: &Value| p["lacks"].as_u64() == Some(0);
        let holding = members.iter().filter(|p| holds(p)).count();
        let done = if any {
            members.is_empty() || holding > 0
        } else {
            holding == members.len()
        };
        let lacking: u64 = members.iter().filter_map(|p| p["lacks"].as_u64()).sum();
        most_lacking = most_lacking.max(lacking);
        bar.set_total(most_lacking);
        bar.draw(most_lacking - lacking, "deltas confirmed by members");
        if done {
            bar.finish();
            if j {
                println!(
                    "{}",
                    json!({"in_sync": true, "peers": members.len(), "holding": holding})
                );
            } else if members.is_empty() {
                eprintln!("no other members: nothing to wait for");
            } else {
                let n = members.len();
                eprintln!(
                    "{holding} of {n} member{} hold{} everything this node holds",
                    if n == 1 { "" } else { "s" },
                    if holding == 1 { "s" } else { "" }
                );
            }
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bar.finish();
            let behind: Vec<Value> = members
                .iter()
                .filter(|p| !holds(p))
                .map(|p| {
                    json!({
                        "id": p["id"],
                        "lacks": p["lacks"],
                        "connected": flag(p, "connected"),
                    })
                })
                .collect();
            if j {
                println!(
                    "{}",
                    json!({"in_sync": false, "peers": members.len(), "holding": holding, "behind": behind})
                );
            }
            let why: Vec<String> = behind
                .iter()
                .map(|b| {
                    let id = short(b["id"].as_str().unwrap_or("?"));
                    let state = if b["connected"] == json!(true) {
                        "connected"
                    } else {
                        "unreachable"
                    };
                    match b["lacks"].as_u64() {
                        Some(n) => format!("{id} lacks {n} deltas ({state})"),
                        None => format!("{id} not seen since this node started ({state})"),
                    }
                })
                .collect();
            return Err(Failure::error(format!(
                "not in sync after {}s: {}",
                timeout.as_secs(),
                why.join("; ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens `url` in the user's browser.
fn open_browser(url: &str) -> Res<()> {
    let candidates: Vec<String> = std::env::var("BROWSER")
        .ok()
        .into_iter()
        .chain(["xdg-open".to_string(), "open".to_string()])
        .collect();
    for cmd in &candidates {
        if std::process::Command::new(cmd)
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .is_ok()
        {
            return Ok(());
        }
    }
    Err(Failure::error(
        "no browser found ($BROWSER, xdg-open, open); open the URL above yourself",
    ))
}

fn run(cli: &Cli) -> Res<()> {
    let dir = if cli.data_dir.is_some() {
        cli.data_dir.clone().unwrap_or_default()
    } else {
        // Only read when needed: a broken config file is tandemd's problem unless we need it.
        let file = tandem::config::find(cli.config.as_deref())
            .map_err(|e| Failure::error(e.to_string()))?;
        tandem::config::data_dir(None, &file)
    };
    if let Command::Id { short: s } = &cli.command {
        let id = tandem::Identity::read_id(&dir).map_err(|e| {
            Failure::Error(format!(
                "{e}\nhint: start `tandemd --data-dir {}` once to create the identity",
                dir.display()
            ))
        })?;
        println!("{}", if *s { id.short() } else { id.to_string() });
        return Ok(());
    }
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "tandem",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    let c = Client::find(cli.api.as_deref(), cli.token_file.as_deref(), &dir)?;
    let j = cli.json;
    match &cli.command {
        Command::Id { .. } | Command::Completions { .. } => {}
        Command::Status => {
            let v = c.run(c.d().status())?;
            if j {
                print(&v, true);
            } else {
                println!("node        {}", v["id"].as_str().unwrap_or(""));
                println!("name        {}", v["name"].as_str().unwrap_or(""));
                println!("listening   {}", v["listen"].as_str().unwrap_or("offline"));
                let addrs = strs(&v["addrs"]);
                if !addrs.is_empty() {
                    println!("reachable   {}", addrs.join(" "));
                }
                println!("documents   {}", v["documents"]);
                println!("deltas      {}", v["deltas"]);
                println!(
                    "members     {} ({} connected)",
                    v["members"], v["connected"]
                );
                let ms = &v["membership"];
                if let Some(r) = ms["removed"].as_object() {
                    println!(
                        "membership  REMOVED by {} (unix ms {}): this node syncs with no one until invited again",
                        short(r.get("by").and_then(|b| b.as_str()).unwrap_or("")),
                        r.get("at").and_then(|a| a.as_i64()).unwrap_or(0)
                    );
                } else {
                    println!(
                        "membership  {}, epoch {}, term {}, leader {}, {} of {} voters reachable",
                        ms["role"].as_str().unwrap_or("-"),
                        ms["epoch"],
                        ms["term"],
                        ms["leader"].as_str().map_or("none", short),
                        ms["reachable_voters"],
                        ms["voters"].as_array().map_or(0, |v| v.len())
                    );
                    if ms["joint"].as_bool() == Some(true) {
                        println!(
                            "voters      changing (until it completes, changes need a majority of the old voters and of the new)"
                        );
                    }
                    match ms["why_not"].as_str() {
                        Some(why) => println!("changes     not possible now: {why}"),
                        None => println!("changes     possible (invite, join, members rm)"),
                    }
                }
                println!(
                    "clock       {} origins, digest {}",
                    v["clock"]["origins"],
                    v["clock"]["digest"].as_str().unwrap_or("")
                );
                if v["disk_full"] == json!(true) {
                    println!(
                        "disk        FULL: writes are refused until space is freed on the disk \
                         holding the data dir; they resume by themselves"
                    );
                }
                if let Some(damaged) = v["damaged"].as_array().filter(|d| !d.is_empty()) {
                    println!(
                        "damaged     {} change(s) found damaged on disk, waiting for a good copy \
                         from a member:",
                        v["damaged_count"]
                    );
                    for d in damaged {
                        println!(
                            "            doc {} (from {} #{}): {}",
                            d["doc"].as_str().unwrap_or(""),
                            d["origin"].as_str().unwrap_or("").get(..8).unwrap_or(""),
                            d["seq"],
                            d["why"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
        Command::Invite { ttl } => {
            let token = c.run(c.d().invite(Duration::from_secs(*ttl)))?;
            println!("{token}");
        }
        Command::Join { token } => {
            c.run(c.d().join(token))?;
            if !j {
                eprintln!("joined");
            }
        }
        Command::Open { browser } => {
            let url = c.run(c.d().login_url())?;
            if j {
                print(&json!({ "url": url }), true);
            } else {
                println!("{url}");
                eprintln!("one-time link to the status page, valid 2 minutes");
            }
            if *browser {
                open_browser(&url)?;
            }
        }
        Command::Members {
            action: Some(MembersAction::Rm { id }),
        } => {
            let members = c.run(c.d().members())?;
            let id: tandem::NodeId = doc::resolve_id(&members, id, "member")?;
            if !c.run(c.d().remove_member(id))? {
                return Err(Failure::error(format!("{id} is not a member")));
            }
        }
        Command::Members {
            action: Some(MembersAction::Recover { yes }),
        } => {
            if !yes {
                return Err(Failure::error(
                    "recovery starts a new membership epoch with this node as its only voter, \
                     overriding the voters that are lost; run it on one survivor only, with --yes",
                ));
            }
            let epoch = c.run(c.d().recover_membership())?;
            println!(
                "membership recovered: epoch {epoch}; this node is the voter, members rejoin as they connect"
            );
        }
        Command::Members { action: None } => {
            let v = c.run(c.d().members())?;
            if j {
                print(&v, true);
            } else {
                println!(
                    "{:<10} {:<16} {:<8} {:<10} {:<16} {:<14} {:<8} ADDRESSES",
                    "ID", "NAME", "ROLE", "STATE", "HEALTH", "LAST SEEN", "IN SYNC"
                );
                for m in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<16} {:<8} {:<10} {:<16} {:<14} {:<8} {}",
                        short(m["id"].as_str().unwrap_or("")),
                        m["name"]
                            .as_str()
                            .filter(|n| !n.is_empty())
                            .map_or("-".to_string(), |n| n.chars().take(16).collect()),
                        m["role"].as_str().unwrap_or("-"),
                        state(m),
                        health(m),
                        ago(m["last_seen"].as_i64()),
                        yes_no(flag(m, "in_sync")),
                        strs(&m["addrs"]).join(" ")
                    );
                }
            }
        }
        Command::Peers => {
            let v = c.run(c.d().peers())?;
            if j {
                print(&v, true);
            } else {
                println!(
                    "{:<10} {:<10} {:<16} {:>10} {:>10} IN SYNC",
                    "ID", "STATE", "HEALTH", "SENT", "RECEIVED"
                );
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<10} {:<16} {:>10} {:>10} {}",
                        short(p["id"].as_str().unwrap_or("")),
                        state(p),
                        health(p),
                        p["bytes_sent"].as_u64().unwrap_or(0),
                        p["bytes_received"].as_u64().unwrap_or(0),
                        yes_no(flag(p, "in_sync"))
                    );
                }
            }
        }
        Command::Doc { action } => doc::run(&c, action, j)?,
        Command::Sync {
            action: SyncAction::Wait { timeout, any },
        } => sync_wait(&c, Duration::from_secs(*timeout), *any, j)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Error(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(Failure::NotRunning(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(3)
        }
    }
}
