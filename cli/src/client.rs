//! The HTTP client of tandemd's local API: finds the daemon, sends requests, and turns every
//! failure into a [`Failure`] that maps to an exit code.

use std::path::Path;

use serde_json::Value;

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

/// A request body.
pub enum Body {
    Json(Value),
    Bytes(Vec<u8>),
}

/// Where the daemon's API is and the token to use it.
#[derive(Clone)]
pub struct Client {
    pub base: String,
    token: String,
    /// The data dir it was found through (`None` with `--api`): a restarted daemon may listen
    /// elsewhere, and [`Client::reload`] finds it again.
    dir: Option<std::path::PathBuf>,
}

impl Client {
    /// `--api URL --token-file F` if given, else what the daemon running on `dir` wrote there.
    pub fn find(api: Option<&str>, token_file: Option<&Path>, dir: &Path) -> Res<Client> {
        if let (Some(api), Some(tf)) = (api, token_file) {
            let token = std::fs::read_to_string(tf).map_err(|e| {
                Failure::error(format!("cannot read token file {}: {e}", tf.display()))
            })?;
            // `127.0.0.1:7374` means http://127.0.0.1:7374 (the API is plain HTTP on loopback).
            let api = api.trim_end_matches('/');
            let base = if api.contains("://") {
                api.to_string()
            } else {
                format!("http://{api}")
            };
            return Ok(Client {
                base,
                token: token.trim().to_string(),
                dir: None,
            });
        }
        let hint = || {
            Failure::NotRunning(format!(
                "tandemd is not running for {}\nhint: start it with `tandemd --data-dir {}`",
                dir.display(),
                dir.display()
            ))
        };
        let api: Value = std::fs::read_to_string(dir.join(tandem::api::API_FILE))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .ok_or_else(hint)?;
        let addr = api["addr"].as_str().ok_or_else(hint)?;
        let token = std::fs::read_to_string(dir.join(tandem::api::TOKEN_FILE))
            .map_err(|e| Failure::error(format!("cannot read the API token: {e}")))?;
        Ok(Client {
            base: format!("http://{addr}"),
            token: token.trim().to_string(),
            dir: Some(dir.to_path_buf()),
        })
    }

    /// Finds the daemon again through the data dir (after a restart it may have a new port
    /// and token); `None` if this client was given `--api` or the daemon is not up yet.
    pub fn reload(&self) -> Option<Client> {
        let dir = self.dir.as_deref()?;
        Client::find(None, None, dir).ok()
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        ureq::request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
    }

    /// Sends a request; an error status becomes the daemon's message, a transport error
    /// "not running".
    pub fn call(&self, method: &str, path: &str, body: Option<Body>) -> Res<ureq::Response> {
        let req = self.request(method, path);
        self.check(match body {
            None => req.call(),
            Some(Body::Json(v)) => req.send_json(v),
            Some(Body::Bytes(b)) => req.send_bytes(&b),
        })
    }

    /// A GET with extra headers, for streams (`Last-Event-ID`).
    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Res<ureq::Response> {
        let mut req = self.request("GET", path);
        for (k, v) in headers {
            req = req.set(k, v);
        }
        self.check(req.call())
    }

    fn check(&self, r: Result<ureq::Response, ureq::Error>) -> Res<ureq::Response> {
        match r {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(_, resp)) => {
                let v: Value = resp.into_json().unwrap_or(Value::Null);
                let msg = v["message"].as_str().unwrap_or("request failed");
                let hint = match v["code"].as_str() {
                    Some("disk_full") => {
                        "\nhint: free space on the disk that holds the data dir (`df -h`); \
                         tandemd resumes writing by itself, no restart needed"
                    }
                    Some("damaged") => {
                        "\nhint: `tandem status` lists the damaged changes; they heal when a \
                         member that holds them is online"
                    }
                    _ => "",
                };
                Err(Failure::error(format!("{msg}{hint}")))
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::NotRunning(format!(
                "cannot reach tandemd at {}: {t}\nhint: start it with `tandemd`",
                self.base
            ))),
        }
    }

    /// Sends a request and parses the JSON reply (`null` for 204).
    pub fn json(&self, method: &str, path: &str, body: Option<Body>) -> Res<Value> {
        let resp = self.call(method, path, body)?;
        if resp.status() == 204 {
            return Ok(Value::Null);
        }
        resp.into_json()
            .map_err(|e| Failure::error(format!("bad reply from tandemd: {e}")))
    }
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
