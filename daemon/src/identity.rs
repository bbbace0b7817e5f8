//! The node's identity: an Ed25519 key pair kept as PKCS#8 in `<data dir>/identity.key`, mode
//! 0600, made on first start. The public key is the [`NodeId`].

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use ring::signature::Ed25519KeyPair;
use tandem_crdt::{NodeId, Signer};

use crate::Error;
use crate::error::DataDirError;

/// The file name inside the data dir.
pub const KEY_FILE: &str = "identity.key";

/// A loaded identity: the key's PKCS#8 form (for TLS) and the [`Signer`] it makes (which
/// knows the NodeId).
pub struct Identity {
    pkcs8: Vec<u8>,
    signer: Arc<Signer>,
}

/// Names the node only: the key never reaches a log.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn id(&self) -> NodeId {
        self.signer.id()
    }

    /// The key that signs this node's deltas.
    pub fn signer(&self) -> Arc<Signer> {
        self.signer.clone()
    }

    /// The private key as PKCS#8 DER (for TLS certificates).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    fn from_pkcs8(pkcs8: Vec<u8>, path: &Path) -> Result<Self, Error> {
        let signer = Signer::from_pkcs8(&pkcs8).map_err(|e| {
            Error::DataDir(DataDirError::Identity {
                path: path.to_path_buf(),
                why: format!("{e} (PKCS#8)"),
            })
        })?;
        Ok(Self {
            pkcs8,
            signer: Arc::new(signer),
        })
    }

    /// Loads the key from `dir`, or makes one if there is none.
    pub fn load_or_create(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                make_private(&path, 0o600)?;
                Self::from_pkcs8(bytes, &path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| {
                    Error::DataDir(DataDirError::Identity {
                        path: path.clone(),
                        why: format!("cannot generate a key: {e}"),
                    })
                })?;
                write_private(&path, doc.as_ref())?;
                tracing::info!(path = %path.display(), "created a new node identity");
                Self::from_pkcs8(doc.as_ref().to_vec(), &path)
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Reads the node id from a data dir without taking its lock (the CLI uses this).
    pub fn read_id(dir: &Path) -> Result<NodeId, Error> {
        let path = dir.join(KEY_FILE);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Self::from_pkcs8(bytes, &path)?.id())
    }
}

/// Writes `bytes` to `path` with mode 0600, atomically (temp file, fsync, rename).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Makes `path` (if it exists) private to this user: `mode` (0600 for files, 0700 for
/// dirs) when group or others had any access, with a warning saying so. Returns whether it
/// changed anything.
pub(crate) fn make_private(path: &Path, mode: u32) -> Result<bool, Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(path, e)),
        };
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "was open to other users; making it private ({mode:o})"
            );
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(path, e))?;
            return Ok(true);
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_made_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(Identity::read_id(dir.path()).unwrap(), a.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn garbage_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(KEY_FILE), b"not a key").unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("identity.key"), "{err}");
    }
}
