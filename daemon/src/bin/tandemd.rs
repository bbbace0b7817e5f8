//! `tandemd`: runs a tandem node until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use std::net::SocketAddr;

use tandem::config::{self, parse_peer};
use tandem::{Config, NetConfig, Node, NodeId};

/// The tandem sync daemon.
///
/// Settings come from flags, then the config file, then defaults.
#[derive(Parser, Debug)]
#[command(name = "tandemd", version = tandem::VERSION, about)]
struct Args {
    /// Data dir (identity, database, lock). Default: $TANDEM_DATA_DIR, else the config file's
    /// `data_dir`, else $XDG_DATA_HOME/tandem.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC listen address. Default: 0.0.0.0 on port 7373, or any free port if that is taken.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// A member to dial at a fixed address, as NODEID@HOST:PORT (repeatable; adds to the
    /// config file's `peers`).
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
    #[arg(long, value_name = "ADDR")]
    api: Option<SocketAddr>,
    /// Config file (TOML). Default: $XDG_CONFIG_HOME/tandem/config.toml, if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A web page origin allowed to open the automerge-repo socket, e.g.
    /// http://localhost:5173 (repeatable; adds to the config file's `app_origins`).
    #[arg(long, value_name = "ORIGIN")]
    app_origin: Vec<String>,
    /// Log format: `human` (default) or `json`.
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Human,
    Json,
}

fn init_logs(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default_filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
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

/// The default log filter. Automerge reports every refused input as an ERROR with a debug
/// dump of its options (a bad import is the user's mistake, answered with a 400, not the
/// daemon's error); openraft logs every vote at INFO and an offline member as an ERROR twice a
/// second. tandem reports what matters of both itself (refused inputs; leader and role
/// changes, storage failures).
const DEFAULT_LOG: &str = "info,automerge=off,openraft=off";

fn main() {
    // Timers are put on the runtime's timer wheel's boundaries (fewer wake-ups when idle):
    // say when it starts.
    tandem::wheel::set_origin(std::time::Instant::now());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandemd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // An error is a message for the user, not a backtrace (even with RUST_BACKTRACE set).
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("tandemd: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = match config::find(args.config.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tandemd: {e:#}");
            std::process::exit(2);
        }
    };
    let log_format = args.log_format.unwrap_or(match file.log_format.as_deref() {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Human,
    });
    init_logs(log_format, file.log.as_deref().unwrap_or(DEFAULT_LOG));
    let dir = config::data_dir(args.data_dir.as_deref(), &file);
    let api = args
        .api
        .or(file.api)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    if !api.ip().is_loopback() {
        // A bad value is a usage error, from a flag as from the config file: exit 2.
        eprintln!(
            "tandemd: --api {api} is not a loopback address; the local API serves this machine only"
        );
        std::process::exit(2);
    }
    let mut config = Config::new(&dir);
    if let Some(name) = &file.name {
        config.name = name.clone();
    }
    config.prefer_voter = file.prefer_voter.unwrap_or(false);
    if !(args.offline || file.offline == Some(true)) {
        let mut net = NetConfig::default();
        if let Some(listen) = args.listen.or(file.listen) {
            net.listen = listen;
            net.preferred_port = None;
        }
        net.peers = file.peers.clone();
        net.peers.extend(args.peer.iter().copied());
        net.mdns = !args.no_mdns && file.mdns.unwrap_or(true);
        net.interfaces = file.interfaces.clone();
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
    let token = tandem::api::load_or_create_token(&dir)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut app_origins = file.app_origins.clone();
    app_origins.extend(args.app_origin.iter().cloned());
    let (api_addr, api_task) = tandem::api::serve(node.clone(), api, token, app_origins, async {
        let _ = stop_rx.await;
    })
    .await
    .with_context(|| format!("cannot serve the local API on {}", api))?;
    tandem::api::write_api_file(&dir, api_addr)?;
    tracing::info!(api = %api_addr, "local API listening");
    match node.listen_addr() {
        Some(addr) => println!(
            "node {} ready, listening on {addr}, api on {api_addr}, data in {}",
            node.id(),
            dir.display()
        ),
        None => println!(
            "node {} ready (offline), api on {api_addr}, data in {}",
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
