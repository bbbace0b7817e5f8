//! `tandem`: the command-line client of a running `tandemd`, through its local HTTP API.
//! Finds the daemon from its data dir (`api.json`, `api-token`), or `--api URL --token-file F`.
//! Exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

/// Command-line tool for tandem, the offline-first sync daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The node's data dir. Default: $XDG_DATA_HOME/tandem.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
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
        /// How long it stays valid, e.g. 10m, 1h, 30s.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: u64,
    },
    /// Join the cluster of whoever made TOKEN.
    Join { token: String },
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
}

#[derive(Subcommand, Debug)]
enum MembersAction {
    /// Remove a member: it is cut off at once.
    Rm { id: String },
}

#[derive(Subcommand, Debug)]
enum DocAction {
    /// Create a document (from a JSON object); prints its id.
    New {
        #[arg(value_name = "JSON")]
        value: Option<String>,
    },
    /// List documents.
    Ls,
    /// Print a document, or the value at a JSON Pointer PATH.
    Get { doc: String, path: Option<String> },
    /// Set the value at PATH.
    Put {
        doc: String,
        path: String,
        #[arg(value_name = "JSON")]
        value: String,
    },
    /// Delete the key or element at PATH.
    Rm { doc: String, path: String },
    /// Delete the document.
    Del { doc: String },
    /// Write the document as .automerge bytes (to stdout or FILE).
    Export {
        doc: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Import .automerge bytes (from FILE or stdin); prints the new id.
    Import { file: Option<PathBuf> },
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

enum Failure {
    /// exit 1
    Error(String),
    /// exit 3
    NotRunning(String),
}

type Res<T> = Result<T, Failure>;

struct Client {
    base: String,
    token: String,
}

impl Client {
    fn find(cli: &Cli, dir: &std::path::Path) -> Res<Client> {
        let hint = || {
            format!(
                "tandemd is not running for {}\nhint: start it with `tandemd --data-dir {}`",
                dir.display(),
                dir.display()
            )
        };
        if let (Some(api), Some(tf)) = (&cli.api, &cli.token_file) {
            let token = std::fs::read_to_string(tf).map_err(|e| {
                Failure::Error(format!("cannot read token file {}: {e}", tf.display()))
            })?;
            return Ok(Client {
                base: api.trim_end_matches('/').to_string(),
                token: token.trim().to_string(),
            });
        }
        let api: Value = std::fs::read_to_string(dir.join("api.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(|| Failure::NotRunning(hint()))?;
        let addr = api["addr"]
            .as_str()
            .ok_or_else(|| Failure::NotRunning(hint()))?;
        let token = std::fs::read_to_string(dir.join("api-token"))
            .map_err(|e| Failure::Error(format!("cannot read the API token: {e}")))?;
        Ok(Client {
            base: format!("http://{addr}"),
            token: token.trim().to_string(),
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Body>) -> Res<ureq::Response> {
        let req = ureq::request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let r = match body {
            None => req.call(),
            Some(Body::Json(v)) => req.send_json(v),
            Some(Body::Bytes(b)) => req.send_bytes(&b),
        };
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(_, resp)) => {
                let v: Value = resp.into_json().unwrap_or(Value::Null);
                let msg = v["message"].as_str().unwrap_or("request failed");
                Err(Failure::Error(msg.to_string()))
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::NotRunning(format!(
                "cannot reach tandemd at {}: {t}\nhint: start it with `tandemd`",
                self.base
            ))),
        }
    }

    fn json(&self, method: &str, path: &str, body: Option<Body>) -> Res<Value> {
        let resp = self.call(method, path, body)?;
        if resp.status() == 204 {
            return Ok(Value::Null);
        }
        resp.into_json()
            .map_err(|e| Failure::Error(format!("bad reply from tandemd: {e}")))
    }
}

enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

fn parse_json(s: &str) -> Res<Value> {
    serde_json::from_str(s).map_err(|e| Failure::Error(format!("not JSON: {e}")))
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print(v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn run(cli: &Cli) -> Res<()> {
    let dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(tandem::Config::default_data_dir);
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
    let c = Client::find(cli, &dir)?;
    let j = cli.json;
    match &cli.command {
        Command::Id { .. } => {}
        Command::Status => {
            let v = c.json("GET", "/v1/status", None)?;
            if j {
                print(&v, true);
            } else {
                println!("node        {}", v["id"].as_str().unwrap_or(""));
                println!("listening   {}", v["listen"].as_str().unwrap_or("offline"));
                println!("documents   {}", v["documents"]);
                println!("deltas      {}", v["deltas"]);
                println!(
                    "members     {} ({} connected)",
                    v["members"], v["connected"]
                );
                println!(
                    "clock       {} origins, digest {}",
                    v["clock"]["origins"],
                    v["clock"]["digest"].as_str().unwrap_or("")
                );
            }
        }
        Command::Invite { ttl } => {
            let v = c.json(
                "POST",
                "/v1/invite",
                Some(Body::Json(json!({"ttl_secs": ttl}))),
            )?;
            println!("{}", v["token"].as_str().unwrap_or(""));
        }
        Command::Join { token } => {
            c.json(
                "POST",
                "/v1/join",
                Some(Body::Json(json!({"token": token}))),
            )?;
            if !j {
                eprintln!("joined");
            }
        }
        Command::Members {
            action: Some(MembersAction::Rm { id }),
        } => {
            c.json("DELETE", &format!("/v1/members/{}", enc(id)), None)?;
        }
        Command::Members { action: None } => {
            let v = c.json("GET", "/v1/members", None)?;
            if j {
                print(&v, true);
            } else {
                println!("{:<10} {:<10} {:<8} ADDRESSES", "ID", "STATE", "IN SYNC");
                for m in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<10} {:<8} {}",
                        short(m["id"].as_str().unwrap_or("")),
                        if m["connected"] == json!(true) {
                            "connected"
                        } else {
                            "offline"
                        },
                        if m["in_sync"] == json!(true) {
                            "yes"
                        } else {
                            "no"
                        },
                        m["addrs"]
                            .as_array()
                            .map(|a| a
                                .iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(" "))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Command::Peers => {
            let v = c.json("GET", "/v1/peers", None)?;
            if j {
                print(&v, true);
            } else {
                println!(
                    "{:<10} {:<10} {:>10} {:>10} {:<8}",
                    "ID", "STATE", "SENT", "RECEIVED", "IN SYNC"
                );
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<10} {:>10} {:>10} {:<8}",
                        short(p["id"].as_str().unwrap_or("")),
                        if p["connected"] == json!(true) {
                            "connected"
                        } else {
                            "offline"
                        },
                        p["bytes_sent"].as_u64().unwrap_or(0),
                        p["bytes_received"].as_u64().unwrap_or(0),
                        if p["in_sync"] == json!(true) {
                            "yes"
                        } else {
                            "no"
                        }
                    );
                }
            }
        }
        Command::Doc { action } => doc(&c, action, j)?,
    }
    Ok(())
}

fn doc(c: &Client, action: &DocAction, j: bool) -> Res<()> {
    match action {
        DocAction::New { value } => {
            let body = match value {
                Some(s) => Body::Json(parse_json(s)?),
                None => Body::Bytes(Vec::new()),
            };
            let v = c.json("POST", "/v1/docs", Some(body))?;
            println!("{}", v["id"].as_str().unwrap_or(""));
        }
        DocAction::Ls => {
            let v = c.json("GET", "/v1/docs", None)?;
            if j {
                print(&v, true);
            } else {
                println!("{:<30} {:>10} UPDATED (unix ms)", "ID", "SIZE");
                for d in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<30} {:>10} {}",
                        d["id"].as_str().unwrap_or(""),
                        d["size"],
                        d["updated_at"]
                    );
                }
            }
        }
        DocAction::Get { doc, path } => {
            let p = path.as_deref().unwrap_or("");
            let v = c.json(
                "GET",
                &format!("/v1/docs/{}?path={}", enc(doc), enc(p)),
                None,
            )?;
            print(&v, j);
        }
        DocAction::Put { doc, path, value } => {
            let v = parse_json(value)?;
            c.json(
                "PUT",
                &format!("/v1/docs/{}?path={}", enc(doc), enc(path)),
                Some(Body::Json(v)),
            )?;
        }
        DocAction::Rm { doc, path } => {
            if path.is_empty() {
                return Err(Failure::Error(
                    "PATH is empty; use `tandem doc del` to delete the document".into(),
                ));
            }
            c.json(
                "DELETE",
                &format!("/v1/docs/{}?path={}", enc(doc), enc(path)),
                None,
            )?;
        }
        DocAction::Del { doc } => {
            c.json("DELETE", &format!("/v1/docs/{}", enc(doc)), None)?;
        }
        DocAction::Export { doc, output } => {
            let resp = c.call("GET", &format!("/v1/docs/{}/export", enc(doc)), None)?;
            let mut bytes = Vec::new();
            resp.into_reader()
                .read_to_end(&mut bytes)
                .map_err(|e| Failure::Error(format!("reading export: {e}")))?;
            match output {
                Some(f) => std::fs::write(f, &bytes)
                    .map_err(|e| Failure::Error(format!("{}: {e}", f.display())))?,
                None => std::io::stdout()
                    .write_all(&bytes)
                    .map_err(|e| Failure::Error(e.to_string()))?,
            }
        }
        DocAction::Import { file } => {
            let bytes = match file {
                Some(f) => {
                    std::fs::read(f).map_err(|e| Failure::Error(format!("{}: {e}", f.display())))?
                }
                None => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .map_err(|e| Failure::Error(e.to_string()))?;
                    b
                }
            };
            let v = c.json("POST", "/v1/docs/import", Some(Body::Bytes(bytes)))?;
            println!("{}", v["id"].as_str().unwrap_or(""));
        }
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
