//! `tandem doc ...`: documents, their history, watching them change, and editing text in
//! `$EDITOR`.

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::{Body, Client, Failure, Res, enc};
use crate::progress::Progress;
use crate::{flag, print, short, strs, utc};

const DOC: &str = "The document: its id, or any unique prefix of it (as `doc ls` shows)";
const PATH: &str =
    "A JSON Pointer into the document, e.g. /items/0 or /title (\"\" is the whole document)";

#[derive(Subcommand, Debug)]
pub enum DocAction {
    /// Create a document (from a JSON object); prints its id.
    New {
        /// The initial content: a JSON object, e.g. '{"title":"groceries","items":[]}'.
        #[arg(value_name = "JSON")]
        value: Option<String>,
    },
    /// List documents.
    Ls,
    /// Print a document, or the value at a JSON Pointer PATH.
    Get {
        #[arg(help = DOC)]
        doc: String,
        #[arg(help = PATH)]
        path: Option<String>,
    },
    /// Set the value at PATH (`-` at the end of an array path appends).
    Put {
        #[arg(help = DOC)]
        doc: String,
        #[arg(help = PATH)]
        path: String,
        /// A JSON value: 42, true, null, {"a":1}, [1,2]; a string needs JSON quotes: '"milk"'.
        #[arg(value_name = "JSON")]
        value: String,
    },
    /// Delete the key or element at PATH.
    Rm {
        #[arg(help = DOC)]
        doc: String,
        #[arg(help = PATH)]
        path: String,
    },
    /// Delete the document.
    Del {
        #[arg(help = DOC)]
        doc: String,
    },
    /// Print one line per change, to one document or all, until Ctrl-C.
    Watch {
        #[arg(help = DOC)]
        doc: Option<String>,
    },
    /// Edit the text at PATH in $VISUAL or $EDITOR; saved as a text diff, merged with what
    /// others changed meanwhile.
    Edit {
        #[arg(help = DOC)]
        doc: String,
        #[arg(help = PATH)]
        path: String,
    },
    /// The document's changes: hash, origin, time.
    History {
        #[arg(help = DOC)]
        doc: String,
    },
    /// Write the document as .automerge bytes (to stdout or FILE).
    Export {
        #[arg(help = DOC)]
        doc: String,
        #[arg(short, long)]
        /// Write to this file instead of stdout.
        output: Option<PathBuf>,
    },
    /// Import .automerge files (or stdin); prints each new id on its own line.
    Import {
        /// .automerge files; none reads one from stdin.
        files: Vec<PathBuf>,
    },
}

fn doc_path(doc: &str, path: &str) -> String {
    format!("/v1/docs/{}?path={}", enc(doc), enc(path))
}

fn parse_json(s: &str) -> Res<Value> {
    serde_json::from_str(s).map_err(|e| {
        Failure::error(format!(
            "not JSON ({e}): values are JSON, so a string needs quotes, e.g. '\"milk\"'"
        ))
    })
}

/// A document id from what the user typed: the whole id, or any unique prefix of one (as
/// `doc ls` and `doc watch` show them).
pub fn resolve_doc(c: &Client, typed: &str) -> Res<String> {
    resolve_id::<tandem::DocId>(c, typed, "/v1/docs", "document")
}

/// An id of type `T` from what the user typed: the whole id, or a unique prefix of one of the
/// ids the list at `route` holds (its items' `id`); an ambiguous prefix lists the candidates.
pub fn resolve_id<T: std::str::FromStr>(
    c: &Client,
    typed: &str,
    route: &str,
    what: &str,
) -> Res<String> {
    if typed.parse::<T>().is_ok() {
        return Ok(typed.to_string());
    }
    let list = c.json("GET", route, None)?;
    let ids = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str());
    let found: Vec<&str> = if typed.is_empty() {
        Vec::new()
    } else {
        ids.filter(|id| id.starts_with(typed)).collect()
    };
    match found[..] {
        [one] => Ok(one.to_string()),
        [] => Err(Failure::error(format!(
            "no {what} id starts with {typed:?}"
        ))),
        _ => Err(Failure::error(format!(
            "{typed:?} is ambiguous; it starts {} {what} ids: {}",
            found.len(),
            found.join(", ")
        ))),
    }
}

pub fn run(c: &Client, action: &DocAction, j: bool) -> Res<()> {
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
                println!("{:<30} {:>10}  UPDATED (UTC)", "ID", "SIZE");
                for d in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<30} {:>10}  {}",
                        d["id"].as_str().unwrap_or(""),
                        d["size"].as_u64().unwrap_or(0),
                        utc(d["updated_at"].as_i64().unwrap_or(0) / 1000)
                    );
                }
            }
        }
        DocAction::Get { doc, path } => {
            let doc = &resolve_doc(c, doc)?;
            let v = c.json("GET", &doc_path(doc, path.as_deref().unwrap_or("")), None)?;
            print(&v, j);
        }
        DocAction::Put { doc, path, value } => {
            let doc = &resolve_doc(c, doc)?;
            let v = parse_json(value)?;
            c.json("PUT", &doc_path(doc, path), Some(Body::Json(v)))?;
        }
        DocAction::Rm { doc, path } => {
            let doc = &resolve_doc(c, doc)?;
            if path.is_empty() {
                return Err(Failure::error(
                    "PATH is empty; use `tandem doc del` to delete the document",
                ));
            }
            c.json("DELETE", &doc_path(doc, path), None)?;
        }
        DocAction::Del { doc } => {
            let doc = &resolve_doc(c, doc)?;
            c.json("DELETE", &format!("/v1/docs/{}", enc(doc)), None)?;
        }
        DocAction::Watch { doc } => {
            let doc = doc.as_deref().map(|d| resolve_doc(c, d)).transpose()?;
            watch(c, doc.as_deref(), j)?
        }
        DocAction::Edit { doc, path } => edit(c, &resolve_doc(c, doc)?, path)?,
        DocAction::History { doc } => {
            let doc = &resolve_doc(c, doc)?;
            let v = c.json("GET", &format!("/v1/docs/{}/history", enc(doc)), None)?;
            if j {
                print(&v, true);
            } else {
                println!(
                    "{:<10} {:<10} {:>5}  {:<19}  DEPS",
                    "CHANGE", "ORIGIN", "SEQ", "TIME (UTC)"
                );
                for ch in v["changes"].as_array().into_iter().flatten() {
                    let deps: Vec<&str> = strs(&ch["deps"]).into_iter().map(short).collect();
                    let origin = match ch["origin"].as_str() {
                        Some(o) => short(o).to_string(),
                        None => format!("actor:{}", short(ch["actor"].as_str().unwrap_or(""))),
                    };
                    let time = match ch["time"].as_i64() {
                        Some(t) if t > 0 => utc(t),
                        _ => "-".into(),
                    };
                    println!(
                        "{:<10} {:<10} {:>5}  {:<19}  {}",
                        short(ch["hash"].as_str().unwrap_or("")),
                        origin,
                        ch["seq"].as_u64().unwrap_or(0),
                        time,
                        deps.join(",")
                    );
                }
            }
        }
        DocAction::Export { doc, output } => {
            let doc = &resolve_doc(c, doc)?;
            let resp = c.call("GET", &format!("/v1/docs/{}/export", enc(doc)), None)?;
            let mut bytes = Vec::new();
            resp.into_reader()
                .read_to_end(&mut bytes)
                .map_err(|e| Failure::error(format!("reading export: {e}")))?;
            match output {
                Some(f) => std::fs::write(f, &bytes)
                    .map_err(|e| Failure::error(format!("{}: {e}", f.display())))?,
                None => std::io::stdout()
                    .write_all(&bytes)
                    .map_err(|e| Failure::error(e.to_string()))?,
            }
        }
        DocAction::Import { files } => import(c, files)?,
    }
    Ok(())
}

/// Imports in flight at once: enough for the daemon's group commit to share fsyncs.
const IMPORTS_IN_FLIGHT: usize = 4;

fn import(c: &Client, files: &[PathBuf]) -> Res<()> {
    if files.is_empty() {
        let mut b = Vec::new();
        std::io::stdin()
            .read_to_end(&mut b)
            .map_err(|e| Failure::error(e.to_string()))?;
        let v = c.json("POST", "/v1/docs/import", Some(Body::Bytes(b)))?;
        println!("{}", v["id"].as_str().unwrap_or(""));
        return Ok(());
    }
    let bar = Progress::new(files.len() as u64, "importing");
    // Each file is imported on its own: one bad file fails the command (exit 1) after the
    // others, and the ids already printed stay valid. A few are in flight at once, so the
    // daemon commits them in groups (one fsync for several) instead of one at a time; ids are
    // still printed in the order of the files.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Res<Value>)>();
    let mut failed = Vec::new();
    let mut not_running = None;
    std::thread::scope(|scope| {
        for _ in 0..IMPORTS_IN_FLIGHT.min(files.len()) {
            let (tx, next) = (tx.clone(), &next);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(f) = files.get(i) else { break };
                    let result = std::fs::read(f)
                        .map_err(|e| Failure::error(e.to_string()))
                        .and_then(|b| c.json("POST", "/v1/docs/import", Some(Body::Bytes(b))));
                    let stop = matches!(result, Err(Failure::NotRunning(_)));
                    if tx.send((i, result)).is_err() || stop {
                        // Not running: the others will find the same; stop taking files.
                        next.store(files.len(), std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut done = std::collections::BTreeMap::new();
        let mut printed = 0;
        for (i, result) in rx {
            done.insert(i, result);
            while let Some(result) = done.remove(&printed) {
                let f = &files[printed];
                match result {
                    Ok(v) => println!("{}", v["id"].as_str().unwrap_or("")),
                    Err(Failure::NotRunning(m)) => not_running = Some(m),
                    Err(Failure::Error(m)) => failed.push(format!("{}: {m}", f.display())),
                }
                printed += 1;
                bar.draw(printed as u64, &f.display().to_string());
            }
        }
    });
    if let Some(m) = not_running {
        bar.finish();
        return Err(Failure::NotRunning(m));
    }
    bar.finish();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::error(format!(
            "{} of {} files not imported:\n  {}",
            failed.len(),
            files.len(),
            failed.join("\n  ")
        )))
    }
}

/// One Server-Sent Event.
#[derive(Default)]
struct Sse {
    event: String,
    id: Option<String>,
    data: String,
}

/// Follows `/v1/events` until Ctrl-C; reconnects with `Last-Event-ID` if the daemon goes away,
/// so a restart shows up as a `lagged` notice rather than a silent gap.
fn watch(c: &Client, doc: Option<&str>, j: bool) -> Res<()> {
    let path = match doc {
        Some(d) => format!("/v1/events?doc={}", enc(d)),
        None => "/v1/events".to_string(),
    };
    let mut last: Option<String> = None;
    let mut connected = false;
    let mut c = c.clone();
    loop {
        let headers: Vec<(&str, &str)> = last
            .as_deref()
            .map(|l| vec![("Last-Event-ID", l)])
            .unwrap_or_default();
        let resp = match c.get_with(&path, &headers) {
            Ok(r) => r,
            Err(Failure::NotRunning(_)) if connected => {
                // The daemon restarted (or is restarting): it may listen on a new port.
                std::thread::sleep(Duration::from_secs(1));
                if let Some(found) = c.reload() {
                    c = found;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if !connected && !j {
            eprintln!(
                "watching {} (times in UTC); Ctrl-C to stop",
                doc.unwrap_or("all documents")
            );
        }
        connected = true;
        let mut ev = Sse::default();
        for line in std::io::BufReader::new(resp.into_reader()).lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                if let Some(id) = &ev.id {
                    last = Some(id.clone());
                }
                show_event(&std::mem::take(&mut ev), j);
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => ev.event = value.to_string(),
                "id" => ev.id = Some(value.to_string()),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                }
                _ => {} // a comment (keep-alive) or an unknown field
            }
        }
        eprintln!("lost the connection to tandemd; reconnecting");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn show_event(ev: &Sse, j: bool) {
    if ev.data.is_empty() {
        return;
    }
    let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::String(ev.data.clone()));
    match ev.event.as_str() {
        "lagged" => {
            if j {
                println!("{}", json!({"event": "lagged", "id": ev.id, "data": data}));
            }
            eprintln!(
                "warning: {}",
                data["message"].as_str().unwrap_or("events were missed")
            );
        }
        _ if j => println!("{}", json!({"event": ev.event, "id": ev.id, "data": data})),
        name if name.starts_with("member_") => {
            let at = data["at"].as_i64().unwrap_or(0) / 1000;
            println!(
                "{}  member {} is {}",
                &utc(at)[11..],
                short(data["member"].as_str().unwrap_or("")),
                data["health"].as_str().unwrap_or("?")
            );
        }
        _ => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let source = match data["source"].as_str() {
                Some("local") | None => "local".to_string(),
                Some(id) => short(id).to_string(),
            };
            let what = if flag(&data, "deleted") {
                "deleted".to_string()
            } else {
                let paths: Vec<&str> = strs(&data["paths"])
                    .into_iter()
                    .map(|p| if p.is_empty() { "/" } else { p })
                    .collect();
                if paths.is_empty() {
                    "changed".to_string()
                } else if flag(&data, "more") {
                    format!("{} ...", paths.join(" "))
                } else {
                    paths.join(" ")
                }
            };
            println!(
                "{}  {}  {:<8}  {what}",
                &utc(now)[11..],
                data["doc"].as_str().unwrap_or(""),
                source
            );
        }
    }
}

/// Opens the text at `path` in the user's editor and saves the result as a diff against the
/// text it started from.
fn edit(c: &Client, doc: &str, path: &str) -> Res<()> {
    let resp = c.call("GET", &doc_path(doc, path), None)?;
    let heads: Vec<String> = resp
        .header(tandem::api::HEADS_HEADER)
        .unwrap_or("")
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    let value: Value = resp
        .into_json()
        .map_err(|e| Failure::error(format!("bad reply from tandemd: {e}")))?;
    let Value::String(before) = value else {
        return Err(Failure::error(format!(
            "{path} holds a JSON {}, not text; `doc edit` edits text (use `doc put` for other values)",
            tandem::crdt::json::json_type(&value)
        )));
    };
    let file = temp_file(doc)?;
    let result = (|| {
        std::fs::write(&file, &before)
            .map_err(|e| (Failure::error(format!("{}: {e}", file.display())), false))?;
        run_editor(&file).map_err(|e| (e, false))?;
        let mut after = std::fs::read_to_string(&file)
            .map_err(|e| (Failure::error(format!("{}: {e}", file.display())), false))?;
        // Editors add a final newline; keep the text's own ending.
        if !before.ends_with('\n') && after.ends_with('\n') {
            after.pop();
            if after.ends_with('\r') {
                after.pop();
            }
        }
        if after == before {
            eprintln!("no change");
            return Ok(());
        }
        if let Err(e) = c.json(
            "PUT",
            &format!("/v1/docs/{}/text?path={}", enc(doc), enc(path)),
            Some(Body::Json(json!({"text": after, "base": heads}))),
        ) {
            // Never lose what the user typed: leave it where they can find it.
            let kept = match e {
                Failure::Error(m) => {
                    Failure::Error(format!("{m}\nyour text is kept in {}", file.display()))
                }
                Failure::NotRunning(m) => {
                    Failure::NotRunning(format!("{m}\nyour text is kept in {}", file.display()))
                }
            };
            return Err((kept, true));
        }
        eprintln!("saved");
        Ok(())
    })();
    match result {
        Ok(()) => {
            let _ = std::fs::remove_file(&file);
            Ok(())
        }
        Err((e, keep)) => {
            if !keep {
                let _ = std::fs::remove_file(&file);
            }
            Err(e)
        }
    }
}

fn temp_file(doc: &str) -> Res<PathBuf> {
    let name = format!(
        "tandem-edit-{}-{}-{}.txt",
        short(doc),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    );
    let path = std::env::temp_dir().join(name);
    // create_new: never follow or overwrite someone else's file in a shared temp dir.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Failure::error(format!("{}: {e}", path.display())))?;
    Ok(path)
}

/// Runs `$VISUAL`, else `$EDITOR`, else `vi` on `file` (the variable may carry arguments, as in
/// `code --wait`).
fn run_editor(file: &Path) -> Res<()> {
    let editor = std::env::var("VISUAL")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| {
            std::env::var("EDITOR")
                .ok()
                .filter(|e| !e.trim().is_empty())
        })
        .unwrap_or_else(|| "vi".to_string());
    let mut words = editor.split_whitespace();
    let program = words.next().unwrap_or("vi");
    let status = std::process::Command::new(program)
        .args(words)
        .arg(file)
        .status()
        .map_err(|e| Failure::error(format!("cannot run editor {editor:?}: {e}")))?;
    if !status.success() {
        return Err(Failure::error(format!(
            "editor {editor:?} exited with {status}; nothing saved"
        )));
    }
    Ok(())
}
