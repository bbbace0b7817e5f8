//! The checkpointer thread: copies committed pages from the write-ahead log into the database
//! file, off the writer's path. Left to itself, SQLite checkpoints inside the commit that takes
//! the log past 1,000 pages, on the committing thread: during a long catch-up that was a fifth
//! of the writer's time, plus the fsyncs of the database file, with every later commit waiting
//! behind it. Here the writer's WAL hook only asks this thread for a checkpoint; past a
//! backstop the writer still checkpoints itself, so the log stays bounded even if this thread
//! falls behind (or cannot run).

use std::ffi::c_int;
use std::path::Path;
use std::sync::mpsc;

use rusqlite::Connection;

use super::StoreError;

/// Log size (pages) at which a checkpoint is asked for: SQLite's own default.
const CHECKPOINT_PAGES: c_int = 1000;
/// Log size (pages) at which the writer checkpoints itself (64 MiB of 4 KiB pages).
const BACKSTOP_PAGES: c_int = 16 * 1024;

/// Installs the WAL hook on the writer's connection `conn` (replacing SQLite's
/// autocheckpoint) and starts the checkpointer on a connection of its own to `path`, synced
/// as `synchronous` says. The thread ends once `conn` is closed.
pub(super) fn start(
    conn: &mut Connection,
    path: &Path,
    synchronous: &str,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let own = Connection::open(path)?;
    own.busy_timeout(std::time::Duration::from_secs(10))?;
    own.pragma_update(None, "synchronous", synchronous)?;
    // One request waiting is enough: a checkpoint copies everything committed before it.
    let (ask, asked) = mpsc::sync_channel::<()>(1);
    conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: c_int| {
        if pages >= BACKSTOP_PAGES {
            // The commit is durable whatever happens here: never report an error for it.
            if let Err(e) = wal.checkpoint() {
                tracing::debug!(error = %e, pages, "backstop checkpoint failed");
            }
        } else if pages >= CHECKPOINT_PAGES {
            let _ = ask.try_send(());
        }
        Ok(())
    }))?;
    std::thread::Builder::new()
        .name("tandem-checkpoint".into())
        .spawn(move || {
            while asked.recv().is_ok() {
                let done = own.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                match done {
                    Ok((log, copied)) => tracing::trace!(log, copied, "checkpointed"),
                    Err(e) => tracing::debug!(error = %e, "checkpoint failed; retried later"),
                }
            }
        })
        .map_err(|e| StoreError::CommitFailed(format!("cannot start checkpoint thread: {e}")))
}
