//! A client of a running `tandemd`: the documents of [`crate::Node`], with the same method
//! names and the same typed [`Error`]s, over the daemon's local HTTP API.
//!
//! An app that embeds a [`crate::Node`] needs a data dir of its own (the daemon's is locked),
//! so it becomes another member to pair. An app that uses a [`Daemon`] works on the daemon's
//! own documents instead, and they sync through it.
//!
//! ```no_run
//! # async fn run() -> Result<(), tandem::Error> {
//! use serde_json::json;
//! use tandem::client::Daemon;
//!
//! // The daemon the CLI would talk to (`Daemon::find(dir)` for another data dir).
//! let daemon = Daemon::local()?;
//! let doc = daemon.create(Some(json!({"title": "groceries", "items": []}))).await?;
//! daemon.insert(doc, "/items/-", json!("milk")).await?;
//! assert_eq!(daemon.get(doc, "/items").await?, json!(["milk"]));
//! # Ok(()) }
//! ```
//!
//! It runs on the caller's Tokio runtime (a task per open connection). The daemon is found the
//! way the CLI finds it: `api.json` and `api-token` in its data dir.
//! When a request cannot connect, those files are read again, so a daemon that restarted on a
//! new port is followed. A request is never sent twice unless it surely did not arrive.

mod events;
mod http;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value as Json, json};
use tandem_crdt::{DocId, NodeId, Pointer};

pub use events::{Change, DaemonEvent, EventStream, MemberHealth, Subscribe};

use crate::api::{API_FILE, HEADS_HEADER, TOKEN_FILE, errors::error_from_reply};
use crate::error::DocError;
use crate::{DocInfo, Error, HistoryEntry};
use http::{Endpoint, SendError};

/// Largest reply read whole (an export of a large document); a bigger one is refused, not
/// buffered without end.
const MAX_REPLY: usize = 1 << 30;

/// Failures of the client itself, or replies with no typed twin in [`Error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No daemon answers for this data dir (`api.json` is missing, or names a listener that
    /// is gone).
    #[error(
        "tandemd is not running for {}\nhint: start it with `tandemd --data-dir {}`",
        dir.display(),
        dir.display()
    )]
    NotRunning { dir: PathBuf },
    /// The daemon's address did not answer, or the connection failed mid-request.
    #[error("cannot reach tandemd at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    /// The daemon refused the request with an error [`Error`] has no variant for (a bad
    /// token, a malformed request): its status, stable code and message.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The daemon's reply was not what its API promises.
    #[error("bad reply from tandemd: {0}")]
    BadReply(String),
    /// A file the client reads to find the daemon.
    #[error("{}: {why}", path.display())]
    File { path: PathBuf, why: String },
    /// The config file that names the data dir is broken.
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    /// The daemon was not there (as opposed to it answering with an error).
    pub fn is_not_running(&self) -> bool {
        matches!(
            self,
            ClientError::NotRunning { .. } | ClientError::Unreachable { .. }
        )
    }
}

/// A running tandemd, reached through its local API.
#[derive(Clone)]
pub struct Daemon {
    inner: Arc<Inner>,
}

struct Inner {
    /// The data dir it was found through (`None` for [`Daemon::connect`]).
    dir: Option<PathBuf>,
    endpoint: Mutex<Arc<Endpoint>>,
}

/// A request body.
enum Body {
    None,
    Json(Json),
    Bytes(Bytes),
}

impl Daemon {
    /// The daemon of the data dir tandemd and the CLI use when given none:
    /// `$TANDEM_DATA_DIR`, else the config file's `data_dir`, else the default.
    pub fn local() -> Result<Daemon, Error> {
        let file = crate::config::find(None).map_err(|e| ClientError::Config(e.to_string()))?;
        Daemon::find(crate::config::data_dir(None, &file))
    }

    /// The daemon running on data dir `dir`, from the `api.json` and `api-token` it wrote there.
    pub fn find(dir: impl Into<PathBuf>) -> Result<Daemon, Error> {
        let dir = dir.into();
        let endpoint = read_endpoint(&dir)?;
        Ok(Daemon {
            inner: Arc::new(Inner {
                dir: Some(dir),
                endpoint: Mutex::new(Arc::new(endpoint)),
            }),
        })
    }

    /// The daemon whose API listens at `addr` (`127.0.0.1:7374`, or a URL `http://...`),
    /// with bearer token `token`.
    pub fn connect(addr: &str, token: &str) -> Daemon {
        let addr = addr.trim_end_matches('/');
        let addr = addr.strip_prefix("http://").unwrap_or(addr);
        Daemon {
            inner: Arc::new(Inner {
                dir: None,
                endpoint: Mutex::new(Arc::new(Endpoint::new(
                    addr.to_string(),
                    token.trim().to_string(),
                ))),
            }),
        }
    }

    /// The API's address now (`host:port`).
    pub fn addr(&self) -> String {
        self.endpoint().addr.clone()
    }

    /// The data dir this client found the daemon through, if any.
    pub fn data_dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    fn endpoint(&self) -> Arc<Endpoint> {
        self.inner
            .endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the data dir's files again; `true` if they name another listener or token.
    fn reload(&self, old: &Endpoint) -> bool {
        let Some(dir) = &self.inner.dir else {
            return false;
        };
        let Ok(found) = read_endpoint(dir) else {
            return false;
        };
        if found.addr == old.addr && found.token == old.token {
            return false;
        }
        tracing::debug!(from = %old.addr, to = %found.addr, "tandemd moved");
        *self
            .inner
            .endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(found);
        true
    }

    /// Sends a request and returns the response, following a restarted daemon to its new
    /// address when the old one refuses connections.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Body,
    ) -> Result<Reply, Error> {
        let bytes = match body {
            Body::None => Bytes::new(),
            Body::Json(v) => Bytes::from(v.to_string()),
            Body::Bytes(b) => b.clone(),
        };
        let mut endpoint = self.endpoint();
        loop {
            match endpoint.send(&method, path, headers, &bytes).await {
                Ok((resp, conn)) => {
                    return Ok(Reply {
                        resp,
                        conn: Some(conn),
                        endpoint,
                    });
                }
                Err(SendError::Connect(why)) => {
                    if self.reload(&endpoint) {
                        endpoint = self.endpoint();
                        continue;
                    }
                    return Err(match &self.inner.dir {
                        Some(dir) => ClientError::NotRunning { dir: dir.clone() },
                        None => ClientError::Unreachable {
                            addr: endpoint.addr.clone(),
                            why,
                        },
                    }
                    .into());
                }
                Err(SendError::Failed(why)) => {
                    return Err(ClientError::Unreachable {
                        addr: endpoint.addr.clone(),
                        why,
                    }
                    .into());
                }
            }
        }
    }

    /// A request whose reply is read whole: its body and headers, or the typed error the
    /// daemon answered with.
    async fn call(&self, method: Method, path: &str, body: Body) -> Result<Read, Error> {
        let reply = self.send(method, path, &[], &body).await?;
        reply.read().await
    }

    async fn json(&self, method: Method, path: &str, body: Body) -> Result<Json, Error> {
        let read = self.call(method, path, body).await?;
        read.json()
    }

    // Documents, as on `Node`.

    /// Creates a document, from a JSON object if given; returns its id.
    pub async fn create(&self, initial: Option<Json>) -> Result<DocId, Error> {
        if let Some(v) = &initial
            && !v.is_object()
        {
            return Err(DocError::NotAnObject(tandem_crdt::json::json_type(v)).into());
        }
        let body = initial.map_or(Body::None, Body::Json);
        let v = self.json(Method::POST, "/v1/docs", body).await?;
        parse_field(&v, "id")
    }

    /// The documents, as [`crate::Node::list`] lists them (deleted ones left out).
    pub async fn list(&self) -> Result<Vec<DocInfo>, Error> {
        let v = self.json(Method::GET, "/v1/docs", Body::None).await?;
        let items = v
            .as_array()
            .ok_or_else(|| bad_reply("the document list is not an array"))?;
        items
            .iter()
            .map(|d| {
                Ok(DocInfo {
                    id: parse_field(d, "id")?,
                    heads: parse_field(d, "heads")?,
                    size: parse_field(d, "size")?,
                    updated_at: parse_field(d, "updated_at")?,
                    deleted: false,
                })
            })
            .collect()
    }

    /// Deletes a document.
    pub async fn delete(&self, doc: DocId) -> Result<(), Error> {
        self.call(Method::DELETE, &doc_route(doc, ""), Body::None)
            .await
            .map(drop)
    }

    /// The JSON at `path` (`""`: the whole document).
    pub async fn get(&self, doc: DocId, path: &str) -> Result<Json, Error> {
        Ok(self.get_with_heads(doc, path).await?.0)
    }

    /// The JSON at `path` and the document's heads it was read at (the `base` for
    /// [`Daemon::update_text_from`]).
    pub async fn get_with_heads(
        &self,
        doc: DocId,
        path: &str,
    ) -> Result<(Json, Vec<ChangeHash>), Error> {
        Pointer::parse(path)?;
        let read = self
            .call(Method::GET, &doc_path(doc, "", path), Body::None)
            .await?;
        let heads = read
            .heads
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| h.parse().map_err(|e| bad_reply(format!("heads: {e}"))))
            .collect::<Result<Vec<ChangeHash>, Error>>()?;
        Ok((read.json()?, heads))
    }

    /// The document's heads.
    pub async fn heads(&self, doc: DocId) -> Result<Vec<ChangeHash>, Error> {
        let v = self
            .json(Method::GET, &doc_route(doc, "/heads"), Body::None)
            .await?;
        parse_field(&v, "heads")
    }

    /// Sets the value at `path` (see [`crate::Node::put`]).
    pub async fn put(&self, doc: DocId, path: &str, value: Json) -> Result<(), Error> {
        self.edit(Method::PUT, doc, "", path, Body::Json(value))
            .await
    }

    /// Deletes the key or array element at `path`.
    pub async fn delete_at(&self, doc: DocId, path: &str) -> Result<(), Error> {
        if path.is_empty() {
            // The API's DELETE without a path deletes the document; Node's refuses.
            return Err(DocError::Path(tandem_crdt::PathError::root_delete()).into());
        }
        self.edit(Method::DELETE, doc, "", path, Body::None).await
    }

    /// Inserts into an array before the index at the end of `path` (`-` appends).
    pub async fn insert(&self, doc: DocId, path: &str, value: Json) -> Result<(), Error> {
        self.edit(Method::POST, doc, "/insert", path, Body::Json(value))
            .await
    }

    /// Splices the text at `path`: removes `delete` characters at `pos` and inserts `text`
    /// (positions count Unicode code points).
    pub async fn splice_text(
        &self,
        doc: DocId,
        path: &str,
        pos: usize,
        delete: usize,
        text: &str,
    ) -> Result<(), Error> {
        let body = json!({"pos": pos, "delete": delete, "text": text});
        self.edit(Method::POST, doc, "/splice", path, Body::Json(body))
            .await
    }

    /// Replaces the text at `path` with `text` as a minimal diff.
    pub async fn update_text(&self, doc: DocId, path: &str, text: &str) -> Result<(), Error> {
        let body = json!({ "text": text });
        self.edit(Method::PUT, doc, "/text", path, Body::Json(body))
            .await
    }

    /// Replaces the text at `path` with `text` edited from the text at `base` (a three-way
    /// merge: see [`crate::Node::update_text_from`]).
    pub async fn update_text_from(
        &self,
        doc: DocId,
        path: &str,
        base: &[ChangeHash],
        text: &str,
    ) -> Result<(), Error> {
        let body = json!({"text": text, "base": base});
        self.edit(Method::PUT, doc, "/text", path, Body::Json(body))
            .await
    }

    async fn edit(
        &self,
        method: Method,
        doc: DocId,
        route: &str,
        path: &str,
        body: Body,
    ) -> Result<(), Error> {
        Pointer::parse(path)?;
        self.call(method, &doc_path(doc, route, path), body)
            .await
            .map(drop)
    }

    /// The document's changes, oldest first.
    pub async fn history(&self, doc: DocId) -> Result<Vec<HistoryEntry>, Error> {
        let v = self
            .json(Method::GET, &doc_route(doc, "/history"), Body::None)
            .await?;
        parse_field(&v, "changes")
    }

    /// The whole document as Automerge bytes.
    pub async fn export(&self, doc: DocId) -> Result<Vec<u8>, Error> {
        let read = self
            .call(Method::GET, &doc_route(doc, "/export"), Body::None)
            .await?;
        Ok(read.body.to_vec())
    }

    /// Imports a document from Automerge bytes; returns its id.
    pub async fn import(&self, bytes: &[u8]) -> Result<DocId, Error> {
        let v = self
            .json(
                Method::POST,
                "/v1/docs/import",
                Body::Bytes(Bytes::copy_from_slice(bytes)),
            )
            .await?;
        parse_field(&v, "id")
    }

    // The node and its members; these return the API's JSON (see `/v1/openapi.json`).

    /// `GET /v1/status`: the node, its documents and its membership.
    pub async fn status(&self) -> Result<Json, Error> {
        self.json(Method::GET, "/v1/status", Body::None).await
    }

    /// `GET /v1/peers`: every peer this node knows of and how it looks from here.
    pub async fn peers(&self) -> Result<Json, Error> {
        self.json(Method::GET, "/v1/peers", Body::None).await
    }

    /// `GET /v1/members`: the member list with each member's role and health.
    pub async fn members(&self) -> Result<Json, Error> {
        self.json(Method::GET, "/v1/members", Body::None).await
    }

    /// Makes an invite valid for `ttl`; returns its token.
    pub async fn invite(&self, ttl: std::time::Duration) -> Result<String, Error> {
        let v = self
            .json(
                Method::POST,
                "/v1/invite",
                Body::Json(json!({"ttl_secs": ttl.as_secs()})),
            )
            .await?;
        parse_field(&v, "token")
    }

    /// Joins the cluster of the member that made invite `token`.
    pub async fn join(&self, token: &str) -> Result<(), Error> {
        // Parsed here as well, so a malformed token is the same error as `Node::join`'s.
        tandem_crdt::members::Invite::parse(token.trim())?;
        self.call(
            Method::POST,
            "/v1/join",
            Body::Json(json!({"token": token.trim()})),
        )
        .await
        .map(drop)
    }

    /// Removes a member; `false` if it was not one.
    pub async fn remove_member(&self, id: NodeId) -> Result<bool, Error> {
        match self
            .call(Method::DELETE, &format!("/v1/members/{id}"), Body::None)
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Client(ClientError::Api { code, .. })) if code == "not_a_member" => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Starts a new membership epoch with this node as its only voter; returns the epoch.
    pub async fn recover_membership(&self) -> Result<u64, Error> {
        let v = self
            .json(
                Method::POST,
                "/v1/members/recover",
                Body::Json(json!({"confirm": true})),
            )
            .await?;
        parse_field(&v, "epoch")
    }

    /// A one-time login URL for the status page.
    pub async fn login_url(&self) -> Result<String, Error> {
        let v = self.json(Method::POST, "/v1/ui/code", Body::None).await?;
        parse_field(&v, "url")
    }

    /// Change events of one document (or all, with member health), from now on: see
    /// [`Daemon::subscribe_with`].
    pub async fn subscribe(&self, doc: Option<DocId>) -> Result<EventStream, Error> {
        self.subscribe_with(Subscribe {
            doc,
            ..Subscribe::default()
        })
        .await
    }

    /// Change events as [`Subscribe`] asks. The stream reconnects by itself when the daemon
    /// goes away (following it to a new port), resuming with `Last-Event-ID`; events it cannot
    /// replay come as [`crate::SubscriptionError::Lagged`] or `Restarted`, never a silent gap.
    pub async fn subscribe_with(&self, opts: Subscribe) -> Result<EventStream, Error> {
        events::open(self.clone(), opts).await
    }
}

/// An open HTTP/1.1 connection to the daemon.
type Connection = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

/// A response whose body has not been read yet.
struct Reply {
    resp: hyper::Response<hyper::body::Incoming>,
    conn: Option<Connection>,
    endpoint: Arc<Endpoint>,
}

/// A response read whole.
struct Read {
    status: StatusCode,
    body: Bytes,
    /// The `tandem-heads` header.
    heads: String,
}

impl Read {
    fn json(&self) -> Result<Json, Error> {
        if self.status == StatusCode::NO_CONTENT || self.body.is_empty() {
            return Ok(Json::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| bad_reply(e.to_string()))
    }
}

impl Reply {
    /// Reads the body; an error status becomes the typed error it stands for.
    async fn read(mut self) -> Result<Read, Error> {
        let status = self.resp.status();
        let heads = self
            .resp
            .headers()
            .get(HEADS_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = http_body_util::Limited::new(self.resp.into_body(), MAX_REPLY)
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable {
                addr: self.endpoint.addr.clone(),
                why: format!("reading the reply: {e}"),
            })?
            .to_bytes();
        if let Some(conn) = self.conn.take() {
            self.endpoint.put_back(conn);
        }
        if status.is_client_error() || status.is_server_error() {
            let v: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
            return Err(error_from_reply(status.as_u16(), &v));
        }
        Ok(Read {
            status,
            body,
            heads,
        })
    }
}

fn bad_reply(why: impl Into<String>) -> Error {
    ClientError::BadReply(why.into()).into()
}

/// Field `key` of a reply, as `T`.
fn parse_field<T: serde::de::DeserializeOwned>(v: &Json, key: &str) -> Result<T, Error> {
    serde_json::from_value(v[key].clone()).map_err(|e| bad_reply(format!("{key}: {e}")))
}

fn doc_route(doc: DocId, route: &str) -> String {
    format!("/v1/docs/{doc}{route}")
}

fn doc_path(doc: DocId, route: &str, path: &str) -> String {
    format!("/v1/docs/{doc}{route}?path={}", encode(path))
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The listener and token a daemon on `dir` wrote.
fn read_endpoint(dir: &Path) -> Result<Endpoint, Error> {
    let not_running = || ClientError::NotRunning {
        dir: dir.to_path_buf(),
    };
    let api: Json = std::fs::read_to_string(dir.join(API_FILE))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(not_running)?;
    let addr = api["addr"].as_str().ok_or_else(not_running)?;
    let path = dir.join(TOKEN_FILE);
    let token = std::fs::read_to_string(&path).map_err(|e| ClientError::File {
        path: path.clone(),
        why: format!("cannot read the API token: {e}"),
    })?;
    Ok(Endpoint::new(addr.to_string(), token.trim().to_string()))
}
