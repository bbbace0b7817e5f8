//! The CLI's door to tandemd: [`tandem::client::Daemon`] (the same client apps use), driven
//! from synchronous code, with every failure turned into a [`Failure`] that maps to an exit
//! code.

use std::future::Future;
use std::path::Path;

use tandem::client::Daemon;

/// Why a command failed, by exit code.
pub enum Failure {
    /// Exit 1: an error.
    Error(String),
    /// Exit 3: the daemon is not running.
    NotRunning(String),
}

pub type Res<T> = Result<T, Failure>;

impl Failure {
    pub fn error(msg: impl Into<String>) -> Failure {
        Failure::Error(msg.into())
    }
}

impl From<tandem::Error> for Failure {
    fn from(e: tandem::Error) -> Failure {
        use tandem::store::StoreError;
        use tandem::{DocError, Error};
        let hint = match &e {
            Error::Client(c) if c.is_not_running() => {
                let hint = match c {
                    tandem::client::ClientError::NotRunning { .. } => "",
                    _ => "\nhint: start it with `tandemd`",
                };
                return Failure::NotRunning(format!("{e}{hint}"));
            }
            Error::Store(StoreError::DiskFull) => {
                "\nhint: free space on the disk that holds the data dir (`df -h`); tandemd \
                 resumes writing by itself, no restart needed"
            }
            Error::Doc(DocError::Damaged { .. }) => {
                "\nhint: `tandem status` lists the damaged changes; they heal when a member \
                 that holds them is online"
            }
            _ => "",
        };
        Failure::Error(format!("{e}{hint}"))
    }
}

/// The daemon, and a runtime to wait on it.
pub struct Client {
    daemon: Daemon,
    rt: tokio::runtime::Runtime,
}

impl Client {
    /// `--api URL --token-file F` if given, else the daemon running on `dir`.
    pub fn find(api: Option<&str>, token_file: Option<&Path>, dir: &Path) -> Res<Client> {
        let daemon = match (api, token_file) {
            (Some(api), Some(tf)) => {
                let token = std::fs::read_to_string(tf).map_err(|e| {
                    Failure::error(format!("cannot read token file {}: {e}", tf.display()))
                })?;
                Daemon::connect(api, &token)
            }
            _ => Daemon::find(dir)?,
        };
        // One worker runs the connections; commands wait on it from their own threads (a few
        // imports at once, see `doc import`).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Failure::error(format!("cannot start the client runtime: {e}")))?;
        Ok(Client { daemon, rt })
    }

    /// The daemon, for [`Client::run`]: `c.run(c.d().status())`.
    pub fn d(&self) -> &Daemon {
        &self.daemon
    }

    /// Runs one call of the daemon client to completion.
    pub fn run<T>(&self, call: impl Future<Output = Result<T, tandem::Error>>) -> Res<T> {
        Ok(self.rt.block_on(call)?)
    }

    /// Waits for a future that is not a daemon call (the next event of a stream).
    pub fn wait<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt.block_on(f)
    }
}
