//! tandemd's config file: TOML, format version 1, read from `--config FILE` or
//! `$XDG_CONFIG_HOME/tandem/config.toml`. Every key is optional; command-line flags win over
//! the file. An unknown key or a bad value is an error that names the key and the file.
//!
//! ```toml
//! version = 1                       # the format version; only 1 exists
//! data_dir = "~/.local/share/tandem"
//! listen = "0.0.0.0:7373"           # QUIC; port 0 picks one
//! api = "127.0.0.1:0"               # local HTTP API, loopback only
//! peers = ["NODEID@192.168.1.20:7373"]
//! mdns = true
//! interfaces = ["eth0"]             # mDNS only on these (names or addresses)
//! offline = false
//! log_format = "human"              # or "json"
//! log = "info"                      # a tracing filter; RUST_LOG wins over it
//! name = "work laptop"              # shown to peers; default: the host name
//! voter = "prefer"                  # or "auto": prefer this node as a member-list voter
//! app_origins = ["http://localhost:5173"]  # web pages that may open the automerge-repo socket
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use tandem_crdt::NodeId;

/// The only config format version so far.
pub const CONFIG_VERSION: i64 = 1;

/// What a config file says; `None` where it is silent.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub api: Option<SocketAddr>,
    pub peers: Vec<(NodeId, SocketAddr)>,
    pub mdns: Option<bool>,
    pub interfaces: Vec<String>,
    pub offline: Option<bool>,
    pub log_format: Option<String>,
    pub log: Option<String>,
    pub name: Option<String>,
    /// `"prefer"`: ask to be a voter of the member list whenever possible (a home server).
    pub prefer_voter: Option<bool>,
    /// Origins (`scheme://host[:port]`) of web pages that may open `/v1/automerge-repo`.
    pub app_origins: Vec<String>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: not valid TOML: {why}")]
    Syntax { path: PathBuf, why: String },
    #[error("config {path}: unknown key `{key}` (known keys: {known})")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("config {path}: key `{key}`: {why}")]
    BadValue {
        path: PathBuf,
        key: String,
        why: String,
    },
}

const KEYS: [&str; 13] = [
    "app_origins",
    "name",
    "voter",
    "version",
    "data_dir",
    "listen",
    "api",
    "peers",
    "mdns",
    "interfaces",
    "offline",
    "log_format",
    "log",
];

/// Whether `o` is a web origin: `http://` or `https://`, a host, an optional port, no path.
fn origin_ok(o: &str) -> bool {
    let rest = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let r = r.trim_end_matches('/');
        !r.is_empty() && !r.contains(['/', '?', '#', '@', ' '])
    })
}

/// The default config file: `$XDG_CONFIG_HOME/tandem/config.toml` (or the platform's
/// equivalent).
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("tandem").join("config.toml"))
}

/// The config file tandemd and the CLI both read: `named` (from `--config`, which must exist),
/// else the default one if it exists, else none.
pub fn find(named: Option<&Path>) -> Result<FileConfig, ConfigError> {
    match (named, default_path()) {
        (Some(path), _) => load(path, true),
        (None, Some(path)) => load(&path, false),
        (None, None) => Ok(FileConfig::default()),
    }
}

/// The environment variable naming the data dir (after `--data-dir`, before the config file).
pub const DATA_DIR_ENV: &str = "TANDEM_DATA_DIR";

/// The data dir, found the same way by tandemd and the CLI: the `--data-dir` flag, else
/// `$TANDEM_DATA_DIR`, else the config file's `data_dir`, else the default
/// (`$XDG_DATA_HOME/tandem`).
pub fn data_dir(flag: Option<&Path>, file: &FileConfig) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(DATA_DIR_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| file.data_dir.clone())
        .unwrap_or_else(crate::Config::default_data_dir)
}

/// Reads a config file. `required`: a missing file is an error (it was named on the command
/// line); otherwise a missing file means an empty config.
pub fn load(path: &Path, required: bool) -> Result<FileConfig, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            Ok(FileConfig::default())
        }
        Err(source) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Parses config text; `path` is for messages.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| ConfigError::Syntax {
                path: path.to_path_buf(),
                why: e.to_string().trim().replace('\n', " "),
            })?;
    let bad = |key: &str, why: String| ConfigError::BadValue {
        path: path.to_path_buf(),
        key: key.to_string(),
        why,
    };
    let mut cfg = FileConfig::default();
    for (key, item) in doc.iter() {
        let value = item
            .as_value()
            .ok_or_else(|| bad(key, "expected a value, not a table".into()))?;
        let string = || {
            value
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(key, format!("expected a string, got {}", value.type_name())))
        };
        let boolean = || {
            value.as_bool().ok_or_else(|| {
                bad(
                    key,
                    format!("expected true or false, got {}", value.type_name()),
                )
            })
        };
        let strings = || -> Result<Vec<String>, ConfigError> {
            let arr = value.as_array().ok_or_else(|| {
                bad(
                    key,
                    format!("expected an array of strings, got {}", value.type_name()),
                )
            })?;
            arr.iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        bad(
                            key,
                            format!("expected strings in the array, got {}", v.type_name()),
                        )
                    })
                })
                .collect()
        };
        let addr = || -> Result<SocketAddr, ConfigError> {
            let s = string()?;
            s.parse().map_err(|e| {
                bad(
                    key,
                    format!("{s:?} is not an address like 127.0.0.1:7373: {e}"),
                )
            })
        };
        match key {
            "version" => match value.as_integer() {
                Some(CONFIG_VERSION) => {}
                Some(v) => {
                    return Err(bad(
                        key,
                        format!(
                            "format version {v} is not supported (this tandemd reads {CONFIG_VERSION})"
                        ),
                    ));
                }
                None => {
                    return Err(bad(
                        key,
                        format!("expected an integer, got {}", value.type_name()),
                    ));
                }
            },
            "data_dir" => cfg.data_dir = Some(expand_home(&string()?)),
            "listen" => cfg.listen = Some(addr()?),
            "api" => {
                let a = addr()?;
                if !a.ip().is_loopback() {
                    return Err(bad(
                        key,
                        format!(
                            "{a} is not a loopback address; the local API serves this machine only"
                        ),
                    ));
                }
                cfg.api = Some(a);
            }
            "peers" => {
                cfg.peers = strings()?
                    .iter()
                    .map(|p| parse_peer(p).map_err(|why| bad(key, format!("{p:?}: {why}"))))
                    .collect::<Result<_, _>>()?;
            }
            "mdns" => cfg.mdns = Some(boolean()?),
            "interfaces" => cfg.interfaces = strings()?,
            "offline" => cfg.offline = Some(boolean()?),
            "log_format" => {
                let f = string()?;
                if f != "human" && f != "json" {
                    return Err(bad(
                        key,
                        format!("expected \"human\" or \"json\", got {f:?}"),
                    ));
                }
                cfg.log_format = Some(f);
            }
            "log" => {
                let f = string()?;
                tracing_subscriber::EnvFilter::try_new(&f)
                    .map_err(|e| bad(key, format!("{f:?} is not a log filter: {e}")))?;
                cfg.log = Some(f);
            }
            "name" => cfg.name = Some(string()?),
            "app_origins" => {
                cfg.app_origins = strings()?;
                if let Some(o) = cfg.app_origins.iter().find(|o| !origin_ok(o)) {
                    return Err(bad(
                        key,
                        format!(
                            "{o:?} is not an origin like \"http://localhost:5173\" (scheme, host, optional port; no path)"
                        ),
                    ));
                }
            }
            "voter" => {
                cfg.prefer_voter = Some(match string()?.as_str() {
                    "prefer" => true,
                    "auto" => false,
                    other => {
                        return Err(bad(
                            key,
                            format!("expected \"prefer\" or \"auto\", got {other:?}"),
                        ));
                    }
                })
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    path: path.to_path_buf(),
                    key: key.to_string(),
                    known: KEYS.join(", "),
                });
            }
        }
    }
    Ok(cfg)
}

/// Parses `NODEID@HOST:PORT` (the host may be a name; the first address it resolves to wins).
pub fn parse_peer(s: &str) -> Result<(NodeId, SocketAddr), String> {
    let (id, addr) = s.split_once('@').ok_or("expected NODEID@HOST:PORT")?;
    let id: NodeId = id.parse().map_err(|e| format!("{e}"))?;
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    Ok((id, addr))
}

fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), dirs::home_dir()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<FileConfig, ConfigError> {
        parse(Path::new("t.toml"), text)
    }

    #[test]
    fn every_key() {
        let id = NodeId::from_bytes([7; 32]);
        let cfg = p(&format!(
            "version = 1\ndata_dir = \"/d\"\nlisten = \"127.0.0.1:0\"\napi = \"127.0.0.1:9\"\n\
             peers = [\"{id}@127.0.0.1:7373\"]\nmdns = false\ninterfaces = [\"lo\"]\n\
             offline = true\nlog_format = \"json\"\nlog = \"debug\"\n\
             app_origins = [\"http://localhost:5173\", \"https://app.example\"]\n"
        ))
        .unwrap();
        assert_eq!(cfg.data_dir, Some(PathBuf::from("/d")));
        assert_eq!(cfg.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(cfg.api, Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(cfg.peers, vec![(id, "127.0.0.1:7373".parse().unwrap())]);
        assert_eq!(cfg.mdns, Some(false));
        assert_eq!(cfg.interfaces, vec!["lo".to_string()]);
        assert_eq!(cfg.offline, Some(true));
        assert_eq!(cfg.log_format.as_deref(), Some("json"));
        assert_eq!(cfg.log.as_deref(), Some("debug"));
        assert_eq!(
            cfg.app_origins,
            vec!["http://localhost:5173", "https://app.example"]
        );
        assert_eq!(p("").unwrap(), FileConfig::default());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("listn = \"127.0.0.1:0\"", "unknown key `listn`"),
            (
                "listen = 7373",
                "key `listen`: expected a string, got integer",
            ),
            (
                "listen = \"nowhere\"",
                "key `listen`: \"nowhere\" is not an address",
            ),
            (
                "api = \"0.0.0.0:1\"",
                "key `api`: 0.0.0.0:1 is not a loopback",
            ),
            ("mdns = \"yes\"", "key `mdns`: expected true or false"),
            (
                "peers = [\"bad\"]",
                "key `peers`: \"bad\": expected NODEID@HOST:PORT",
            ),
            ("peers = \"x\"", "key `peers`: expected an array"),
            (
                "version = 2",
                "key `version`: format version 2 is not supported",
            ),
            (
                "log_format = \"xml\"",
                "key `log_format`: expected \"human\" or \"json\"",
            ),
            (
                "[net]\nlisten = 1",
                "key `net`: expected a value, not a table",
            ),
            ("listen = ", "not valid TOML"),
            (
                "log = \"tandem=loud\"",
                "key `log`: \"tandem=loud\" is not a log filter",
            ),
            ("name = 5", "key `name`: expected a string"),
            (
                "app_origins = [\"localhost:5173\"]",
                "key `app_origins`: \"localhost:5173\" is not an origin",
            ),
            (
                "app_origins = [\"http://a.example/path\"]",
                "is not an origin",
            ),
        ];
        for (text, want) in cases {
            let err = p(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.starts_with("config t.toml"), "{err}");
        }
    }

    #[test]
    fn missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.toml");
        assert_eq!(load(&path, false).unwrap(), FileConfig::default());
        assert!(matches!(load(&path, true), Err(ConfigError::Read { .. })));
    }
}
