//! The data dir: created private (0700), locked against a second process, and the host name
//! a node goes by unless configured.

use std::fs;
use std::path::Path;

use crate::Error;
use crate::error::DataDirError;

/// The host name: from the kernel on Linux, else `$HOSTNAME`, else empty.
pub(super) fn host_name() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    crate::members::clean_name(&raw)
}

const LOCK_FILE: &str = "LOCK";

pub(super) const DB_FILE: &str = "tandem.db";

pub(super) fn lock_data_dir(dir: &Path) -> Result<fs::File, Error> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let mut opts = fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&path).map_err(|e| Error::io(&path, e))?;
    crate::identity::make_private(&path, 0o600)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(Error::DataDir(DataDirError::Locked {
                dir: dir.to_path_buf(),
                holder: if holder.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {holder})")
                },
            }));
        }
        Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    f.set_len(0).map_err(|e| Error::io(&path, e))?;
    f.rewind().map_err(|e| Error::io(&path, e))?;
    write!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

/// Creates the data dir (0700), or makes an existing one private.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), Error> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| Error::io(dir, e))?;
    crate::identity::make_private(dir, 0o700)?;
    Ok(())
}

/// A data dir with an identity but no database (or an empty one) lost its data: refuse to
/// start rather than come up as an empty node without a word.
pub(super) fn check_database_present(dir: &Path) -> Result<(), Error> {
    if !dir.join(crate::identity::KEY_FILE).exists() {
        return Ok(()); // a new node
    }
    let db = dir.join(DB_FILE);
    let state = match fs::metadata(&db) {
        Ok(m) if m.len() > 0 => return Ok(()),
        Ok(_) => "empty",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "missing",
        Err(e) => return Err(Error::io(&db, e)),
    };
    tracing::error!(path = %db.display(), state, "the database is gone but the identity is not");
    Err(DataDirError::LostDatabase { path: db, state }.into())
}

/// The database and its WAL and shared-memory files are private: existing ones are made
/// 0600, and a new database is created 0600 before SQLite opens it (SQLite gives its WAL and
/// shared-memory files the database file's mode).
pub(super) fn private_db_files(dir: &Path) -> Result<(), Error> {
    let db = dir.join(DB_FILE);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(&db).map_err(|e| Error::io(&db, e))?;
    for suffix in ["", "-wal", "-shm"] {
        let path = dir.join(format!("{DB_FILE}{suffix}"));
        crate::identity::make_private(&path, 0o600)?;
    }
    Ok(())
}

/// Space kept in reserve in the data dir, so that a node stopped on a full disk can start
/// again: a start that finds no room releases it.
pub(super) const RESERVE_FILE: &str = "reserve";
pub(super) const RESERVE_BYTES: usize = 8 << 20;

/// Makes the reserve if it is missing or short. Real blocks (zeros written, not a sparse
/// file), else it would reserve nothing. Best effort: on a disk without room it warns.
pub(super) fn keep_reserve(dir: &Path) {
    let path = dir.join(RESERVE_FILE);
    if fs::metadata(&path).is_ok_and(|m| m.len() as usize >= RESERVE_BYTES) {
        let _ = crate::identity::make_private(&path, 0o600);
        return;
    }
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path)?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..RESERVE_BYTES / chunk.len() {
            f.write_all(&chunk)?;
        }
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&path);
        tracing::warn!(error = %e, "no room for the {} MiB disk reserve in the data dir", RESERVE_BYTES >> 20);
    }
}

/// Frees the reserve (the disk is full and the node must start); says so.
pub(super) fn release_reserve(dir: &Path) -> bool {
    let released = fs::remove_file(dir.join(RESERVE_FILE)).is_ok();
    if released {
        tracing::warn!(
            "the disk is full: released the {} MiB reserve to start; free some space",
            RESERVE_BYTES >> 20
        );
    }
    released
}
