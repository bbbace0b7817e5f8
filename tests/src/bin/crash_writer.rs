//! Helper for the crash test: writes through `tandem::Node` in a loop from several tasks and
//! prints `ack <doc> <n>` after each write is acknowledged, until it is killed.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: crash-writer DATA_DIR")?;
    let node = tandem::Node::open(tandem::Config::new(dir)).await?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let node = node.clone();
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            let doc = node.create(Some(json!({"text": ""}))).await?;
            for n in 0u64.. {
                node.put(doc, &format!("/k{n}"), json!(n)).await?;
                if n % 3 == 0 {
                    node.splice_text(doc, "/text", 0, 0, "x").await?;
                }
                let mut o = out
                    .lock()
                    .map_err(|_| anyhow::anyhow!("stdout lock poisoned"))?;
                writeln!(o, "ack {doc} {n}")?;
                o.flush()?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
