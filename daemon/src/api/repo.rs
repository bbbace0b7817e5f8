//! `GET /v1/automerge-repo`: a WebSocket that speaks automerge-repo's network protocol
//! (`tandem_crdt::repo`), so a JavaScript app's `Repo` with a `WebSocketClientAdapter` syncs its
//! documents with this node, and through it with every member.
//!
//! - One Automerge sync state per (socket, document) (`node::repo::AppSync`); an app's
//!   changes become this node's deltas. After the first exchange about a document, every later
//!   change to it (from the CLI, the API, a peer) is pushed to the app.
//! - A `request` for a document this node lacks is answered `doc-unavailable`; if it arrives
//!   later (from a member), the app is sent it then.
//! - `ephemeral` messages (presence, cursors) are relayed to this daemon's other app sockets
//!   that have the document open; not to other members (they would need a new stream kind, and
//!   presence is mostly wanted between windows on one machine).
//! - A browser lets any web page open a WebSocket to 127.0.0.1, so the socket needs the API
//!   token (in the query, `?token=`, or as a subprotocol `tandem-token.<token>`: browsers cannot
//!   set `Authorization` on a WebSocket), `Host` must name this listener (DNS rebinding), and an
//!   `Origin`, when sent, must be this listener's own or one in the configured allow-list.
//! - A frame that is not a protocol message closes that socket with the reason; the daemon
//!   and other sockets carry on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tandem_crdt::DocId;
use tandem_crdt::repo::{PROTOCOL_VERSION, RepoMsg};
use tokio::sync::{Semaphore, broadcast};

use super::{Api, ApiError, MAX_BODY, constant_time_eq, foreign};
use crate::error::DocError;
use crate::node::{AppSync, SubscriptionError};
use crate::{Error, Node};

/// App sockets open at once.
pub const MAX_SOCKETS: usize = 64;

/// Documents one socket may follow or ask for (each costs a sync state, and an empty
/// stand-in for one this node lacks): an app that names more is closed, not served forever.
pub const MAX_DOCS: usize = 100_000;

/// The largest `ephemeral` payload relayed (presence and cursors are a few hundred bytes;
/// each relayed copy is held until every socket has read it).
pub const MAX_EPHEMERAL: usize = 64 << 10;

/// The subprotocol prefix that carries the token from a browser.
pub const TOKEN_PROTOCOL: &str = "tandem-token.";

/// An ephemeral message on its way to this daemon's other sockets.
#[derive(Clone, Debug)]
struct Relay {
    from: u64,
    sender: String,
    doc: DocId,
    count: u64,
    session: String,
    data: Arc<Vec<u8>>,
}

/// What the app sockets share.
pub struct Hub {
    /// Origins (besides this listener's own) whose pages may connect, e.g.
    /// `http://localhost:5173`.
    origins: Vec<String>,
    relay: broadcast::Sender<Relay>,
    sockets: Arc<Semaphore>,
    next: AtomicU64,
}

impl Hub {
    pub fn new(origins: Vec<String>) -> Self {
        Self {
            origins: origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            relay: broadcast::channel(256).0,
            sockets: Arc::new(Semaphore::new(MAX_SOCKETS)),
            next: AtomicU64::new(0),
        }
    }
}

#[derive(Deserialize)]
pub(super) struct SocketQuery {
    token: Option<String>,
}

/// The upgrade: token, `Host` and `Origin` checked before anything else.
pub(super) async fn upgrade(
    State(api): State<Api>,
    Query(q): Query<SocketQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if !api.ui.host_ok(&headers) {
        return foreign("Host").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("").to_ascii_lowercase();
        if !api.ui.origin_is_ours(&origin) && !api.hub.origins.contains(&origin) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "foreign_origin",
                format!(
                    "Origin {origin} may not connect; add it to `app_origins` in tandemd's config"
                ),
            )
            .into_response();
        }
    }
    let ok = |t: &str| constant_time_eq(t.as_bytes(), api.token.as_bytes());
    let protocol = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.strip_prefix(TOKEN_PROTOCOL).is_some_and(ok))
        .map(str::to_string);
    if !(q.token.as_deref().is_some_and(ok) || protocol.is_some()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong token: pass ?token= (the API token) or the subprotocol tandem-token.<token>",
        )
        .into_response();
    }
    let mut ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return ApiError::new(e.status(), "not_a_websocket", e.body_text()).into_response();
        }
    };
    let Ok(permit) = api.hub.sockets.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_sockets",
            format!("at most {MAX_SOCKETS} app sockets at once"),
        )
        .into_response();
    };
    if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
        ws.set_selected_protocol(p);
    }
    ws.max_message_size(MAX_BODY)
        .max_frame_size(MAX_BODY)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            let id = api.hub.next.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(socket = id, "app socket opened");
            let why = Conversation::new(&api, id).run(socket).await;
            tracing::debug!(socket = id, why, "app socket closed");
        })
}

/// A reason to end a socket, sent to the app in an `error` message and the close frame.
struct Closing(String);

/// One app socket's conversation.
struct Conversation {
    node: Node,
    id: u64,
    /// This daemon's peer id.
    me: String,
    /// The app's peer id, once it joined.
    app: Option<String>,
    docs: HashMap<DocId, AppSync>,
    /// Documents the app asked for that this node lacks: sent when they arrive.
    wanted: HashSet<DocId>,
    relay: broadcast::Sender<Relay>,
}

impl Conversation {
    fn new(api: &Api, id: u64) -> Self {
        Self {
            node: api.node.clone(),
            id,
            me: format!("tandemd-{}", api.node.id()),
            app: None,
            docs: HashMap::new(),
            wanted: HashSet::new(),
            relay: api.hub.relay.clone(),
        }
    }

    async fn run(mut self, mut socket: WebSocket) -> String {
        let (mut events, mut relayed) = match self.node.subscribe(None) {
            Ok(s) => (s, self.relay.subscribe()),
            Err(e) => return e.to_string(),
        };
        let outcome: Result<String, Closing> = loop {
            let step = tokio::select! {
                frame = socket.recv() => match frame {
                    None => break Ok("the app went away".into()),
                    Some(Err(e)) => break Err(Closing(format!("bad frame: {e}"))),
                    Some(Ok(Message::Binary(bytes))) => self.receive(&bytes).await,
                    Some(Ok(Message::Text(_))) => {
                        Err(Closing("text frame: automerge-repo sends CBOR in binary frames".into()))
                    }
                    Some(Ok(Message::Close(_))) => break Ok("the app closed".into()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(Vec::new()),
                },
                ev = events.recv() => match ev {
                    Ok(ev) => self.changed(ev.doc).await,
                    Err(SubscriptionError::Lagged(n)) => {
                        tracing::debug!(socket = self.id, n, "app socket fell behind the events; resyncing its documents");
                        self.resync().await
                    }
                    Err(SubscriptionError::Closed) => break Ok("the node is closing".into()),
                    // Only a client of a daemon sees this; resyncing would be right anyway.
                    Err(SubscriptionError::Restarted) => self.resync().await,
                },
                r = relayed.recv() => match r {
                    Ok(r) => Ok(self.relayed(r)),
                    Err(broadcast::error::RecvError::Lagged(_)) => Ok(Vec::new()),
                    Err(broadcast::error::RecvError::Closed) => Ok(Vec::new()),
                },
            };
            match step {
                Ok(out) => {
                    for m in out {
                        if socket
                            .send(Message::Binary(m.encode().into()))
                            .await
                            .is_err()
                        {
                            return "the app went away".into();
                        }
                    }
                }
                Err(c) => break Err(c),
            }
        };
        match outcome {
            Ok(why) => why,
            Err(Closing(why)) => {
                if let Some(app) = &self.app {
                    let msg = RepoMsg::Error {
                        sender: self.me.clone(),
                        target: app.clone(),
                        message: why.clone(),
                    };
                    let _ = socket.send(Message::Binary(msg.encode().into())).await;
                }
                // A close reason is at most 123 bytes.
                let mut reason: String = why.chars().take(120).collect();
                while reason.len() > 123 {
                    reason.pop();
                }
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: axum::extract::ws::close_code::POLICY,
                        reason: reason.into(),
                    })))
                    .await;
                why
            }
        }
    }

    /// One frame from the app; what to send back.
    async fn receive(&mut self, frame: &[u8]) -> Result<Vec<RepoMsg>, Closing> {
        let msg = RepoMsg::decode(frame).map_err(|e| Closing(e.to_string()))?;
        tracing::trace!(socket = self.id, ?msg, "from app");
        let Some(app) = self.app.clone() else {
            let RepoMsg::Join { sender, versions } = msg else {
                return Err(Closing("the first message must be `join`".into()));
            };
            if !versions.iter().any(|v| v == PROTOCOL_VERSION) {
                return Err(Closing(format!(
                    "no protocol version in common: this daemon speaks {PROTOCOL_VERSION}, the app {versions:?}"
                )));
            }
            self.app = Some(sender.clone());
            return Ok(vec![RepoMsg::Peer {
                sender: self.me.clone(),
                target: sender,
                version: PROTOCOL_VERSION.into(),
            }]);
        };
        match msg {
            RepoMsg::Request { doc, data, .. } => {
                self.room_for(doc)?;
                if !self.docs.contains_key(&doc) && !self.node.has(doc).await.map_err(closing)? {
                    self.wanted.insert(doc);
                    return Ok(vec![self.unavailable(&app, doc)]);
                }
                self.sync(&app, doc, &data).await
            }
            RepoMsg::Sync { doc, data, .. } => {
                self.room_for(doc)?;
                self.sync(&app, doc, &data).await
            }
            RepoMsg::Ephemeral {
                doc,
                count,
                session,
                data,
                ..
            } => {
                if data.len() > MAX_EPHEMERAL {
                    return Err(Closing(format!(
                        "ephemeral message of {} bytes (at most {MAX_EPHEMERAL})",
                        data.len()
                    )));
                }
                // Relayed under the app's own peer id, as automerge-repo's server does.
                let _ = self.relay.send(Relay {
                    from: self.id,
                    sender: app,
                    doc,
                    count,
                    session,
                    data: Arc::new(data),
                });
                Ok(Vec::new())
            }
            RepoMsg::Unavailable { doc, .. } => {
                self.docs.remove(&doc);
                Ok(Vec::new())
            }
            RepoMsg::HeadsGossip { .. } => Ok(Vec::new()),
            RepoMsg::Error { message, .. } => Err(Closing(format!("the app said: {message}"))),
            RepoMsg::Join { .. } | RepoMsg::Peer { .. } => {
                Err(Closing("`join` or `peer` after the handshake".into()))
            }
        }
    }

    /// Refuses a document beyond [`MAX_DOCS`] for this socket.
    fn room_for(&self, doc: DocId) -> Result<(), Closing> {
        let known = self.docs.contains_key(&doc) || self.wanted.contains(&doc);
        if !known && self.docs.len() + self.wanted.len() >= MAX_DOCS {
            return Err(Closing(format!(
                "more than {MAX_DOCS} documents on one socket"
            )));
        }
        Ok(())
    }

    fn unavailable(&self, app: &str, doc: DocId) -> RepoMsg {
        RepoMsg::Unavailable {
            sender: self.me.clone(),
            target: app.to_string(),
            doc,
        }
    }

    /// A sync message from the app about `doc`, and the answer.
    async fn sync(&mut self, app: &str, doc: DocId, data: &[u8]) -> Result<Vec<RepoMsg>, Closing> {
        let sync = self.docs.entry(doc).or_default();
        match self.node.receive_app_sync(doc, sync, data).await {
            Ok(_) => {}
            Err(Error::Doc(DocError::Deleted(_) | DocError::Damaged { .. })) => {
                self.docs.remove(&doc);
                return Ok(vec![self.unavailable(app, doc)]);
            }
            Err(e) => return Err(closing(e)),
        }
        self.wanted.remove(&doc);
        self.answer(doc).await
    }

    /// What this node has for the app about `doc` now (nothing if it is up to date).
    async fn answer(&mut self, doc: DocId) -> Result<Vec<RepoMsg>, Closing> {
        let Some(app) = self.app.clone() else {
            return Ok(Vec::new());
        };
        let Some(sync) = self.docs.get_mut(&doc) else {
            return Ok(Vec::new());
        };
        match self.node.app_sync_message(doc, sync).await {
            Ok(Some(data)) => Ok(vec![RepoMsg::Sync {
                sender: self.me.clone(),
                target: app,
                doc,
                data,
            }]),
            Ok(None) => Ok(Vec::new()),
            Err(Error::Doc(DocError::Deleted(_) | DocError::NotFound(_))) => {
                self.docs.remove(&doc);
                Ok(Vec::new())
            }
            Err(e) => Err(closing(e)),
        }
    }

    /// A document changed on this node: tell the app if it follows it or asked for it.
    async fn changed(&mut self, doc: DocId) -> Result<Vec<RepoMsg>, Closing> {
        if self.wanted.remove(&doc) {
            self.docs.entry(doc).or_default();
        }
        if self
            .docs
            .get(&doc)
            .is_some_and(|s| !s.waiting_for_changes())
        {
            return self.answer(doc).await;
        }
        Ok(Vec::new())
    }

    /// Events were missed: whatever the app lacks of every document it follows.
    async fn resync(&mut self) -> Result<Vec<RepoMsg>, Closing> {
        let mut out = Vec::new();
        for doc in self.docs.keys().copied().collect::<Vec<_>>() {
            out.extend(self.answer(doc).await?);
        }
        Ok(out)
    }

    /// Another socket's ephemeral message, for this app if it has the document open.
    fn relayed(&self, r: Relay) -> Vec<RepoMsg> {
        match &self.app {
            Some(app) if r.from != self.id && self.docs.contains_key(&r.doc) => {
                vec![RepoMsg::Ephemeral {
                    sender: r.sender,
                    target: app.clone(),
                    doc: r.doc,
                    count: r.count,
                    session: r.session,
                    data: r.data.to_vec(),
                }]
            }
            _ => Vec::new(),
        }
    }
}

fn closing(e: Error) -> Closing {
    Closing(e.to_string())
}
