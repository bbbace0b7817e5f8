//! `tandem doc ...`: documents, their history, watching them change, and editing text in
//! `$EDITOR`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::{Value, json};

use tandem::client::DaemonEvent;
use tandem::{DocId, Source, SubscriptionError};

use crate::client::{Client, Failure, Res};
use crate::progress::Progress;
use crate::{print, short, utc};

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

fn parse_json(s: &str) -> Res<Value> {
    serde_json::from_str(s).map_err(|e| {
        Failure::error(format!(
            "not JSON ({e}): values are JSON, so a string needs quotes, e.g. '\"milk\"'"
        ))
    })
}

/// A document id from what the user typed: the whole id, or any unique prefix of one (as
/// `doc ls` and `doc watch` show them).
pub fn resolve_doc(c: &Client, typed: &str) -> Res<DocId> {
    if let Ok(id) = typed.parse() {
        return Ok(id);
    }
    let docs = c.run(c.d().list())?;
    let ids: Vec<Value> = docs.iter().map(|d| json!({"id": d.id})).collect();
    resolve_id(&Value::Array(ids), typed, "document")
}

/// An id of type `T` from what the user typed: the whole id, or a unique prefix of one of the
/// ids in `list` (its items' `id`); an ambiguous prefix lists the candidates.
pub fn resolve_id<T: std::str::FromStr>(list: &Value, typed: &str, what: &str) -> Res<T>
where
    T::Err: std::fmt::Display,
{
    let parse = |s: &str| s.parse::<T>().map_err(|e| Failure::error(e.to_string()));
    if let Ok(id) = typed.parse::<T>() {
        return Ok(id);
    }
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
        [one] => parse(one),
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
            let initial = value.as_deref().map(parse_json).transpose()?;
            println!("{}", c.run(c.d().create(initial))?);
        }
        DocAction::Ls => {
            let docs = c.run(c.d().list())?;
            if j {
                let v: Vec<Value> = docs
                    .iter()
                    .map(|d| {
                        json!({"id": d.id, "heads": d.heads, "size": d.size, "updated_at": d.updated_at})
                    })
                    .collect();
                print(&Value::Array(v), true);
            } else {
                println!("{:<30} {:>10}  UPDATED (UTC)", "ID", "SIZE");
                for d in docs {
                    println!(
                        "{:<30} {:>10}  {}",
                        d.id.to_string(),
                        d.size,
                        utc(d.updated_at / 1000)
                    );
                }
            }
        }
        DocAction::Get { doc, path } => {
            let doc = resolve_doc(c, doc)?;
            let v = c.run(c.d().get(doc, path.as_deref().unwrap_or("")))?;
            print(&v, j);
        }
        DocAction::Put { doc, path, value } => {
            let doc = resolve_doc(c, doc)?;
            let v = parse_json(value)?;
            c.run(c.d().put(doc, path, v))?;
        }
        DocAction::Rm { doc, path } => {
            let doc = resolve_doc(c, doc)?;
            if path.is_empty() {
                return Err(Failure::error(
                    "PATH is empty; use `tandem doc del` to delete the document",
                ));
            }
            c.run(c.d().delete_at(doc, path))?;
        }
        DocAction::Del { doc } => {
            let doc = resolve_doc(c, doc)?;
            c.run(c.d().delete(doc))?;
        }
        DocAction::Watch { doc } => {
            let doc = doc.as_deref().map(|d| resolve_doc(c, d)).transpose()?;
            watch(c, doc, j)?
        }
        DocAction::Edit { doc, path } => edit(c, resolve_doc(c, doc)?, path)?,
        DocAction::History { doc } => {
            let doc = resolve_doc(c, doc)?;
            let changes = c.run(c.d().history(doc))?;
            if j {
                let heads = c.run(c.d().heads(doc))?;
                print(&json!({"heads": heads, "changes": changes}), true);
            } else {
                println!(
                    "{:<10} {:<10} {:>5}  {:<19}  DEPS",
                    "CHANGE", "ORIGIN", "SEQ", "TIME (UTC)"
                );
                for ch in changes {
                    let deps: Vec<String> = ch
                        .deps
                        .iter()
                        .map(|d| short(&d.to_string()).to_string())
                        .collect();
                    let origin = match ch.origin {
                        Some(o) => o.short(),
                        None => format!("actor:{}", short(&ch.actor)),
                    };
                    let time = if ch.time > 0 {
                        utc(ch.time)
                    } else {
                        "-".into()
                    };
                    println!(
                        "{:<10} {:<10} {:>5}  {:<19}  {}",
                        short(&ch.hash.to_string()),
                        origin,
                        ch.seq,
                        time,
                        deps.join(",")
                    );
                }
            }
        }
        DocAction::Export { doc, output } => {
            let doc = resolve_doc(c, doc)?;
            let bytes = c.run(c.d().export(doc))?;
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
        println!("{}", c.run(c.d().import(&b))?);
        return Ok(());
    }
    let bar = Progress::new(files.len() as u64, "importing");
    // Each file is imported on its own: one bad file fails the command (exit 1) after the
    // others, and the ids already printed stay valid. A few are in flight at once, so the
    // daemon commits them in groups (one fsync for several) instead of one at a time; ids are
    // still printed in the order of the files.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Res<tandem::DocId>)>();
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
                        .and_then(|b| c.run(c.d().import(&b)));
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
                    Ok(id) => println!("{id}"),
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

/// Follows the daemon's events until Ctrl-C. The stream reconnects by itself if the daemon
/// goes away (following it to a new port), so a restart shows up as a `lagged` notice rather
/// than a silent gap.
fn watch(c: &Client, doc: Option<DocId>, j: bool) -> Res<()> {
    let mut events = c.run(c.d().subscribe(doc))?;
    if !j {
        eprintln!(
            "watching {} (times in UTC); Ctrl-C to stop",
            doc.map_or("all documents".to_string(), |d| d.to_string())
        );
    }
    loop {
        match c.wait(events.recv()) {
            Ok(ev) => show_event(&ev, j),
            Err(SubscriptionError::Closed) => {
                return Err(Failure::error("tandemd ended the event stream"));
            }
            Err(lag) => {
                let (code, missed) = match lag {
                    SubscriptionError::Lagged(n) => ("fell_behind", Some(n)),
                    _ => ("restarted", None),
                };
                let message = format!("{lag}; re-read the documents");
                if j {
                    let data = json!({"code": code, "missed": missed, "message": message});
                    let id = events.last_event_id();
                    println!("{}", json!({"event": "lagged", "id": id, "data": data}));
                }
                eprintln!("warning: {message}");
            }
        }
    }
}

fn show_event(ev: &DaemonEvent, j: bool) {
    match ev {
        DaemonEvent::Member(m) => {
            if j {
                let name = format!(
                    "member_{}",
                    if m.health == "alive" { "up" } else { &m.health }
                );
                let data = json!({"member": m.member, "health": m.health, "at": m.at});
                println!("{}", json!({"event": name, "id": m.id, "data": data}));
            } else {
                println!(
                    "{}  member {} is {}",
                    &utc(m.at / 1000)[11..],
                    m.member.short(),
                    m.health
                );
            }
        }
        DaemonEvent::Change(ch) if j => {
            let source = match ch.source {
                Source::Local => json!("local"),
                Source::Remote(id) => json!(id),
            };
            let data = json!({
                "doc": ch.doc,
                "source": source,
                "heads": ch.heads,
                "deleted": ch.deleted,
                "paths": ch.paths,
                "more": ch.more_paths,
                "damaged": ch.damaged,
            });
            let name = if ch.damaged.is_some() {
                "damaged"
            } else {
                "change"
            };
            println!("{}", json!({"event": name, "id": ch.id, "data": data}));
        }
        DaemonEvent::Change(ch) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let source = match ch.source {
                Source::Local => "local".to_string(),
                Source::Remote(id) => id.short(),
            };
            let what = if ch.deleted {
                "deleted".to_string()
            } else if let Some(why) = &ch.damaged {
                format!("DAMAGED: {why}")
            } else {
                let paths: Vec<&str> = ch
                    .paths
                    .iter()
                    .map(|p| if p.is_empty() { "/" } else { p.as_str() })
                    .collect();
                if paths.is_empty() {
                    "changed".to_string()
                } else if ch.more_paths {
                    format!("{} ...", paths.join(" "))
                } else {
                    paths.join(" ")
                }
            };
            println!("{}  {}  {:<8}  {what}", &utc(now)[11..], ch.doc, source);
        }
    }
}

/// Opens the text at `path` in the user's editor and saves the result as a diff against the
/// text it started from.
fn edit(c: &Client, doc: DocId, path: &str) -> Res<()> {
    let (value, heads) = c.run(c.d().get_with_heads(doc, path))?;
    let Value::String(before) = value else {
        return Err(Failure::error(format!(
            "{path} holds a JSON {}, not text; `doc edit` edits text (use `doc put` for other values)",
            tandem::crdt::json::json_type(&value)
        )));
    };
    let file = temp_file(&doc.to_string())?;
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
        if let Err(e) = c.run(c.d().update_text_from(doc, path, &heads, &after)) {
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
