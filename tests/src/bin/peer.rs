//! Helper for end-to-end tests: one tandem node in its own process, driven by line commands on
//! stdin, answering one line each on stdout.
//!
//! `peer DATA_DIR LISTEN_ADDR [--mdns IFACE]` prints `ready <node id> <addr>`, then serves:
//! `invite`, `join TOKEN`, `create JSON`, `put DOC PATH JSON`, `get DOC PATH`,
//! `wait DOC PATH JSON SECONDS`, `nearby`, `connected NODE_ID` (the address it is connected at,
//! or `no`), `quit`.

use std::io::{BufRead as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tandem::{Config, DocId, NetConfig, Node};

async fn serve(node: &Node, line: &str) -> anyhow::Result<String> {
    let mut words = line.splitn(2, ' ');
    let cmd = words.next().unwrap_or_default();
    let rest = words.next().unwrap_or_default();
    Ok(match cmd {
        "invite" => node.invite(Duration::from_secs(600)).await?,
        "join" => {
            node.join(rest).await?;
            "ok".into()
        }
        "create" => node
            .create(Some(serde_json::from_str(rest)?))
            .await?
            .to_string(),
        "put" => {
            let mut p = rest.splitn(3, ' ');
            let (doc, path, value) = (p.next(), p.next(), p.next());
            let (Some(doc), Some(path), Some(value)) = (doc, path, value) else {
                bail!("put DOC PATH JSON")
            };
            node.put(doc.parse()?, path, serde_json::from_str(value)?)
                .await?;
            "ok".into()
        }
        "get" => {
            let mut p = rest.splitn(2, ' ');
            let doc: DocId = p.next().context("get DOC PATH")?.parse()?;
            node.get(doc, p.next().unwrap_or_default())
                .await?
                .to_string()
        }
        "wait" => {
            let mut p = rest.splitn(4, ' ');
            let (Some(doc), Some(path), Some(want), Some(secs)) =
                (p.next(), p.next(), p.next(), p.next())
            else {
                bail!("wait DOC PATH JSON SECONDS")
            };
            let doc: DocId = doc.parse()?;
            let want: serde_json::Value = serde_json::from_str(want)?;
            let deadline = Instant::now() + Duration::from_secs(secs.parse()?);
            loop {
                if node.get(doc, path).await.ok().as_ref() == Some(&want) {
                    break "ok".into();
                }
                if Instant::now() > deadline {
                    break "timeout".into();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        "nearby" => node
            .nearby()
            .iter()
            .map(|(id, _, _)| id.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        "connected" => node
            .peers()
            .into_iter()
            .find(|p| p.connected && p.id.is_some_and(|id| id.to_string() == rest.trim()))
            .and_then(|p| p.addr)
            .map_or_else(|| "no".to_string(), |a| a.to_string()),
        other => bail!("unknown command {other:?}"),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(listen)) = (args.get(1), args.get(2)) else {
        bail!("usage: peer DATA_DIR LISTEN_ADDR [--mdns IFACE]");
    };
    let mdns = args
        .iter()
        .position(|a| a == "--mdns")
        .and_then(|i| args.get(i + 1));
    let mut cfg = Config::new(dir);
    cfg.net = Some(NetConfig {
        listen: listen.parse()?,
        peers: Vec::new(),
        mdns: mdns.is_some(),
        interfaces: mdns.into_iter().cloned().collect(),
        preferred_port: None,
    });
    let node = Node::open(cfg).await?;
    let addr = node.listen_addr().context("no listen address")?;
    println!("ready {} {addr}", node.id());
    std::io::stdout().flush()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        if line.trim() == "quit" {
            break;
        }
        let reply = match serve(&node, line.trim()).await {
            Ok(r) => r,
            Err(e) => format!("err {e:#}"),
        };
        println!("{reply}");
        std::io::stdout().flush()?;
    }
    node.close().await?;
    Ok(())
}
