//! `tandem`: the command-line tool. For now it reads a node's identity from its data dir; the
//! commands that talk to a running `tandemd` arrive with its local API.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Command-line tool for tandem, the offline-first sync daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The node's data dir. Default: $XDG_DATA_HOME/tandem.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print this node's id (its public key, base32).
    Id {
        /// Print only the 8-character short form.
        #[arg(long)]
        short: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let dir = cli
        .data_dir
        .unwrap_or_else(tandem::Config::default_data_dir);
    match cli.command {
        Command::Id { short } => match tandem::Identity::read_id(&dir) {
            Ok(id) if short => println!("{}", id.short()),
            Ok(id) => println!("{id}"),
            Err(e) => {
                eprintln!(
                    "error: {e}\nhint: start `tandemd --data-dir {}` once to create the identity",
                    dir.display()
                );
                return std::process::ExitCode::from(1);
            }
        },
    }
    std::process::ExitCode::SUCCESS
}
