//! `tandemd`: runs a tandem node until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use std::net::{SocketAddr, ToSocketAddrs};

use tandem::{Config, NetConfig, Node, NodeId};

fn parse_peer(s: &str) -> Result<(NodeId, SocketAddr), String> {
    let (id, addr) = s.split_once('@').ok_or("expected NODEID@HOST:PORT")?;
    let id: NodeId = id.parse().map_err(|e| format!("{e}"))?;
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    Ok((id, addr))
}

/// The tandem sync daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Data dir (identity, database, lock). Default: $XDG_DATA_HOME/tandem.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC listen address. Default: 0.0.0.0 on port 7373, or any free port if that is taken.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A member to dial at a fixed address, as NODEID@HOST:PORT (repeatable).
    #[arg(long, value_name = "NODEID@HOST:PORT", value_parser = parse_peer)]
    peer: Vec<(NodeId, SocketAddr)>,
    /// Do not advertise or browse on the LAN with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Run without any networking (no sockets at all).
    #[arg(long)]
    offline: bool,
    /// Local API address (HTTP, loopback only). Default: 127.0.0.1 on any free port; the
    /// chosen address is written to `<data dir>/api.json` for the CLI.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    api: SocketAddr,
    /// Log format: `human` (default) or `json`.
    #[arg(long, value_name = "FORMAT", default_value = "human")]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Human,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => { r.context("waiting for SIGINT")?; Ok("SIGINT") }
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        Ok("Ctrl-C")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logs(args.log_format);
    let dir = args.data_dir.unwrap_or_else(Config::default_data_dir);
    let mut config = Config::new(&dir);
    if !args.offline {
        let mut net = NetConfig::default();
        if let Some(listen) = args.listen {
            net.listen = listen;
            net.preferred_port = None;
        }
        net.peers = args.peer.clone();
        net.mdns = !args.no_mdns;
        config.net = Some(net);
    }
    let node = Node::open(config)
        .await
        .with_context(|| format!("cannot open node in {}", dir.display()))?;
    let (stats, _) = node.stats().await?;
    tracing::info!(
        node = %node.id(),
        data_dir = %dir.display(),
        documents = stats.documents,
        deltas = stats.deltas,
        "tandemd running; Ctrl-C to stop"
    );
    if !args.api.ip().is_loopback() {
        anyhow::bail!(
            "--api {} is not a loopback address; the local API serves this machine only",
            args.api
        );
    }
    let token = tandem::api::load_or_create_token(&dir)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (api_addr, api_task) = tandem::api::serve(node.clone(), args.api, token, async {
        let _ = stop_rx.await;
    })
    .await
    .with_context(|| format!("cannot serve the local API on {}", args.api))?;
    tandem::api::write_api_file(&dir, api_addr)?;
    tracing::info!(api = %api_addr, "local API listening");
    match node.listen_addr() {
        Some(addr) => println!(
            "node {} ready, listening on {addr}, data in {}",
            node.id(),
            dir.display()
        ),
        None => println!(
            "node {} ready (offline), data in {}",
            node.id(),
            dir.display()
        ),
    }
    let why = shutdown_signal().await?;
    tracing::info!(signal = why, "stopping: finishing in-flight commits");
    let _ = stop_tx.send(());
    let _ = api_task.await;
    let _ = std::fs::remove_file(dir.join(tandem::api::API_FILE));
    node.close().await?;
    tracing::info!("stopped");
    Ok(())
}
