//! Helper for the crash test: works through `tandem::Node` from several tasks until it is
//! killed, printing each acknowledgement as it comes:
//! - `ack <doc> <n>`: key `k<n>` of `doc` was written (4 writer tasks);
//! - `imported <doc>`: an `.automerge` file was imported as `doc` (1 task);
//! - `ingested <origin> <seq>`: a catch-up batch from another node was stored, up to `seq`
//!   of `origin` (1 task; only with a source data dir, whose deltas it catches up on).

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::json;

type Out = Arc<Mutex<std::io::Stdout>>;

fn say(out: &Out, line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut o = out
        .lock()
        .map_err(|_| anyhow::anyhow!("stdout lock poisoned"))?;
    o.write_fmt(line)?;
    writeln!(o)?;
    o.flush()?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .context("usage: crash-writer DATA_DIR [SOURCE_DATA_DIR]")?;
    let source = args.next();
    let node = tandem::Node::open(tandem::Config::new(dir)).await?;
    let out: Out = Arc::new(Mutex::new(std::io::stdout()));
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
                say(&out, format_args!("ack {doc} {n}"))?;
            }
            anyhow::Ok(())
        }));
    }
    if let Some(source) = source {
        let src = tandem::Node::open(tandem::Config::new(source)).await?;
        // Imports: a copy of one of the source's documents, again and again.
        let docs = src.list().await?;
        let file = src.export(docs.first().context("empty source")?.id).await?;
        let (n, o) = (node.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let doc = n.import(&file).await?;
                say(&o, format_args!("imported {doc}"))?;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }));
        // Catch-up: what the source holds and this node lacks, in batches, as a session
        // stores them.
        let missing = src.deltas_missing_from(&node.clock()).await?;
        let from = src.id();
        src.close().await?;
        let (n, o) = (node.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            // Small batches, paced as a network would, so kills land mid catch-up in many rounds.
            for batch in missing.chunks(5) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                n.ingest(from, batch.to_vec()).await?;
                if let Some(last) = batch.last() {
                    say(
                        &o,
                        format_args!("ingested {} {}", last.id.origin, last.id.seq),
                    )?;
                }
            }
            // Caught up: stay alive like the writers.
            std::future::pending::<()>().await;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
