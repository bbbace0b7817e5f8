//! `tandemd`: runs a tandem node until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use tandem::{Config, Node};

/// The tandem sync daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Data dir (identity, database, lock). Default: $XDG_DATA_HOME/tandem.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
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
    let node = Node::open(Config::new(&dir))
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
    println!("node {} ready, data in {}", node.id(), dir.display());
    let why = shutdown_signal().await?;
    tracing::info!(signal = why, "stopping: finishing in-flight commits");
    node.close().await?;
    tracing::info!("stopped");
    Ok(())
}
