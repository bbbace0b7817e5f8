//! A tiny to-do app on `tandem::Node`.
//!
//! ```text
//! cargo run -p tandem --example todo -- add "buy milk"
//! cargo run -p tandem --example todo -- done 0
//! cargo run -p tandem --example todo -- list
//! ```
//!
//! The list lives in one document whose id is kept in `<data dir>/todo-doc`. Data dir:
//! `$TODO_DIR`, default `./todo-data`.

use anyhow::{Context as _, bail};
use serde_json::json;
use tandem::{Config, DocId, Node};

async fn todo_doc(node: &Node) -> anyhow::Result<DocId> {
    let path = node.data_dir().join("todo-doc");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse()?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let doc = node.create(Some(json!({"items": []}))).await?;
            std::fs::write(&path, doc.to_string())?;
            Ok(doc)
        }
        Err(e) => Err(e.into()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::var("TODO_DIR").unwrap_or_else(|_| "todo-data".into());
    let node = Node::open(Config::new(dir)).await?;
    let doc = todo_doc(&node).await?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["add", title] => {
            node.insert(doc, "/items/-", json!({"title": title, "done": false}))
                .await?;
        }
        ["done", n] => {
            let n: usize = n.parse().context("item number")?;
            node.put(doc, &format!("/items/{n}/done"), json!(true))
                .await?;
        }
        ["rm", n] => {
            let n: usize = n.parse().context("item number")?;
            node.delete_at(doc, &format!("/items/{n}")).await?;
        }
        ["list"] | [] => {}
        _ => bail!("usage: todo [add TITLE | done N | rm N | list]"),
    }
    let items = node.get(doc, "/items").await?;
    for (i, item) in items.as_array().into_iter().flatten().enumerate() {
        let mark = if item["done"] == json!(true) {
            "x"
        } else {
            " "
        };
        println!("{i:>3} [{mark}] {}", item["title"].as_str().unwrap_or(""));
    }
    node.close().await?;
    Ok(())
}
