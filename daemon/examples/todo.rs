//! A tiny to-do app, on an embedded `tandem::Node` or on the running `tandemd`.
//!
//! ```text
//! cargo run -p tandem --example todo -- add "buy milk"
//! cargo run -p tandem --example todo -- done 0
//! cargo run -p tandem --example todo -- list
//! cargo run -p tandem --example todo -- --daemon add "call mum"
//! ```
//!
//! Embedded, the app is a node of its own on data dir `$TODO_DIR` (default `./todo-data`).
//! With `--daemon` (or `--daemon=DATA_DIR`) it works on the documents of the tandemd running
//! on the default data dir (or DATA_DIR), and they sync through it. Both ways the list lives
//! in one document whose id is kept in `$TODO_DIR/todo-doc`; the code is the same, since
//! `tandem::client::Daemon` has `Node`'s methods.

use std::path::Path;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tandem::client::Daemon;
use tandem::{Config, DocId, Error, Node};

/// Where the documents are.
enum Store {
    Node(Node),
    Daemon(Daemon),
}

/// Calls the same method on either store.
macro_rules! call {
    ($store:expr, $method:ident($($arg:expr),*)) => {
        match $store {
            Store::Node(n) => n.$method($($arg),*).await,
            Store::Daemon(d) => d.$method($($arg),*).await,
        }
    };
}

async fn todo_doc(store: &Store, state: &Path) -> anyhow::Result<DocId> {
    let path = state.join("todo-doc");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let doc = call!(store, create(Some(json!({"items": []}))))?;
            std::fs::create_dir_all(state)?;
            std::fs::write(&path, doc.to_string())?;
            Ok(doc)
        }
        Err(e) => Err(e.into()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let state =
        std::path::PathBuf::from(std::env::var("TODO_DIR").unwrap_or_else(|_| "todo-data".into()));
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let store = match args.first().map(String::as_str) {
        Some("--daemon") => Store::Daemon(Daemon::local()?),
        Some(a) if a.starts_with("--daemon=") => Store::Daemon(Daemon::find(&a[9..])?),
        _ => Store::Node(Node::open(Config::new(&state)).await?),
    };
    if matches!(store, Store::Daemon(_)) {
        args.remove(0);
    }
    let doc = todo_doc(&store, &state).await?;
    let result: Result<(), Error> = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["add", title] => {
            call!(
                &store,
                insert(doc, "/items/-", json!({"title": title, "done": false}))
            )
        }
        ["done", n] => {
            let n: usize = n.parse().context("item number")?;
            call!(&store, put(doc, &format!("/items/{n}/done"), json!(true)))
        }
        ["rm", n] => {
            let n: usize = n.parse().context("item number")?;
            call!(&store, delete_at(doc, &format!("/items/{n}")))
        }
        ["list"] | [] => Ok(()),
        _ => bail!("usage: todo [--daemon[=DATA_DIR]] [add TITLE | done N | rm N | list]"),
    };
    result?;
    let items: Value = call!(&store, get(doc, "/items"))?;
    for (i, item) in items.as_array().into_iter().flatten().enumerate() {
        let mark = if item["done"] == json!(true) {
            "x"
        } else {
            " "
        };
        println!("{i:>3} [{mark}] {}", item["title"].as_str().unwrap_or(""));
    }
    if let Store::Node(node) = store {
        node.close().await?;
    }
    Ok(())
}
