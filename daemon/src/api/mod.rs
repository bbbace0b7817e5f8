//! The local HTTP API: JSON over HTTP on 127.0.0.1, a bearer token from a 0600 file on every
//! route but `/v1/health` and `/v1/openapi.json`. Bad requests get a JSON body `{"code", "message"}` with a stable
//! code and a 4xx status, never a 500 for user input. The routes are described by the OpenAPI
//! document served at `/v1/openapi.json` (`openapi.json` beside this file).

pub mod errors;
pub mod events;
pub mod metrics;
pub mod repo;
mod server;
pub mod ui;

pub use errors::ApiError;
pub use server::{HEADER_TIMEOUT, MAX_CONNECTIONS, REQUEST_TIMEOUT};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_crdt::{DocId, NodeId};

use crate::{Error, Node};

/// How long an invite made through the API may be valid, in seconds: 1 minute to 30 days.
pub const INVITE_TTL: std::ops::RangeInclusive<u64> = 60..=30 * 24 * 3600;

/// Largest request body accepted (an import of a large document).
pub const MAX_BODY: usize = 64 << 20;

type ApiResult<T> = Result<T, ApiError>;

#[derive(Clone)]
struct Api {
    node: Node,
    token: String,
    journal: Arc<events::Journal>,
    ui: Arc<ui::Ui>,
    hub: Arc<repo::Hub>,
}

/// The bearer token, or else the status page's session cookie (which may only read, and only
/// from this listener's own origin).
async fn auth(State(api): State<Api>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        if constant_time_eq(t.as_bytes(), api.token.as_bytes()) {
            return next.run(req).await;
        }
    } else {
        let now = api.node.time();
        match api.ui.check(req.method(), &headers, now) {
            Ok(()) => return next.run(req).await,
            Err(ui::Refusal::NoSession) => {}
            Err(ui::Refusal::Foreign(what)) => return foreign(what).into_response(),
            Err(ui::Refusal::ReadOnly) => {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "read_only",
                    "the status page may only read; use the CLI or the bearer token to change",
                )
                .into_response();
            }
        }
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong bearer token",
    )
    .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn doc_id(s: &str) -> ApiResult<DocId> {
    s.parse().map_err(|e: tandem_crdt::IdError| {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_id", e.to_string())
    })
}

fn json_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))
}

#[derive(Deserialize)]
struct PathQuery {
    #[serde(default)]
    path: String,
}

async fn health() -> Json<Value> {
    Json(json!({"ok": true}))
}

async fn status(State(api): State<Api>) -> ApiResult<Json<Value>> {
    let n = &api.node;
    let (stats, loaded) = n.stats().await?;
    let clock = n.clock();
    let damaged = n.damaged().await?;
    Ok(Json(json!({
        "id": n.id(),
        "name": n.name(),
        "listen": n.listen_addr(),
        "addrs": n.addrs(),
        "documents": stats.documents,
        "deltas": stats.deltas,
        "loaded": loaded,
        "clock": {"origins": clock.iter().count(), "deltas": clock.count(), "digest": hex(&clock.digest())},
        "members": n.members().len(),
        "membership": n.membership_status().await?,
        "connected": n.peers().iter().filter(|p| p.connected).count(),
        "disk_full": n.disk_full(),
        "damaged_count": damaged.len(),
        "damaged": damaged.iter().take(100).map(|d| json!({
            "doc": d.doc,
            "origin": d.id.origin,
            "seq": d.id.seq,
            "found_at": d.found_at,
            "why": d.why,
        })).collect::<Vec<_>>(),
    })))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn list_docs(State(api): State<Api>) -> ApiResult<Json<Value>> {
    let docs = api.node.list().await?;
    Ok(Json(json!(
        docs.iter()
            .map(|d| json!({
                "id": d.id,
                "heads": d.heads,
                "size": d.size,
                "updated_at": d.updated_at,
            }))
            .collect::<Vec<_>>()
    )))
}

async fn create_doc(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    let initial = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(json_body(Ok(bytes))?)
    };
    let id = api.node.create(initial).await?;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))))
}

/// Response header with the document's heads (comma-separated) that a read saw; send them
/// back as `base` to edit text against that state (`PUT /v1/docs/{id}/text`).
pub const HEADS_HEADER: &str = "tandem-heads";

async fn get_doc(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<Response> {
    let ptr = tandem_crdt::Pointer::parse(&q.path).map_err(Error::from)?;
    let (value, heads) = api
        .node
        .read(doc_id(&id)?, |am| {
            let value = tandem_crdt::pointer::get(am, &ptr)?;
            Ok((value, am.get_heads()))
        })
        .await?;
    let heads = heads
        .iter()
        .map(|h| h.to_string())
        .collect::<Vec<_>>()
        .join(",");
    Ok(([(HEADS_HEADER, heads)], Json(value)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextEdit {
    text: String,
    /// Heads the edit started from; omitted: the current heads (a plain diff).
    #[serde(default)]
    base: Option<Vec<String>>,
}

async fn put_text(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let edit: TextEdit = serde_json::from_value(json_body(body)?)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))?;
    let doc = doc_id(&id)?;
    match edit.base {
        None => api.node.update_text(doc, &q.path, &edit.text).await?,
        Some(base) => {
            let base = base
                .iter()
                .map(|h| h.parse::<automerge::ChangeHash>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, "bad_base", format!("base: {e}"))
                })?;
            api.node
                .update_text_from(doc, &q.path, &base, &edit.text)
                .await?
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn insert(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let value = json_body(body)?;
    api.node.insert(doc_id(&id)?, &q.path, value).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Splice {
    pos: usize,
    #[serde(default)]
    delete: usize,
    #[serde(default)]
    text: String,
}

async fn splice(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let s: Splice = serde_json::from_value(json_body(body)?)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))?;
    api.node
        .splice_text(doc_id(&id)?, &q.path, s.pos, s.delete, &s.text)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn heads(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let heads = api.node.heads(doc_id(&id)?).await?;
    Ok(Json(json!({
        "heads": heads,
    })))
}

async fn history(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let doc = doc_id(&id)?;
    let changes = api.node.history(doc).await?;
    let heads = api.node.heads(doc).await?;
    Ok(Json(json!({
        "heads": heads,
        "changes": changes,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    doc: Option<String>,
    /// Include each change's patches.
    #[serde(default)]
    patches: bool,
}

async fn events(
    State(api): State<Api>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let doc = q.doc.as_deref().map(doc_id).transpose()?;
    if let Some(doc) = doc {
        // An unknown or deleted document is an error now, not a stream that never speaks.
        api.node.heads(doc).await?;
    }
    let last = headers
        .get("last-event-id")
        .map(|v| v.to_str())
        .transpose()
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_event_id",
                "Last-Event-ID is not text",
            )
        })?;
    let sse = api
        .journal
        .stream(doc, last, q.patches)
        .map_err(|why| ApiError::new(StatusCode::BAD_REQUEST, "bad_event_id", why))?;
    Ok(sse)
}

async fn metrics_page(State(api): State<Api>) -> ApiResult<Response> {
    let text = metrics::render(&api.node).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// The OpenAPI 3.1 description of these routes.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn put_doc(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let value = json_body(body)?;
    api.node.put(doc_id(&id)?, &q.path, value).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_doc(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> ApiResult<StatusCode> {
    let doc = doc_id(&id)?;
    if q.path.is_empty() {
        api.node.delete(doc).await?;
    } else {
        api.node.delete_at(doc, &q.path).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn export_doc(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Response> {
    let bytes = api.node.export(doc_id(&id)?).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn import_doc(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    let id = api.node.import(&bytes).await?;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))))
}

async fn peers(State(api): State<Api>) -> Json<Value> {
    Json(json!(api.node.peers()))
}

async fn members(State(api): State<Api>) -> ApiResult<Json<Value>> {
    let peers = api.node.peers();
    let raft = api.node.membership_status().await?;
    let role = |id: &crate::NodeId| {
        if raft.leader == Some(*id) {
            "leader"
        } else if raft.voters.contains(id) {
            "voter"
        } else if raft.learners.contains(id) {
            "learner"
        } else {
            "joining"
        }
    };
    Ok(Json(json!(
        api.node
            .members()
            .iter()
            .map(|m| {
                let p = peers.iter().find(|p| p.id == Some(m.id));
                json!({
                    "id": m.id,
                    "name": m.name,
                    "addrs": m.addrs,
                    "added_at": m.added_at,
                    "admitted_by": m.admitted_by,
                    "raft_id": m.raft_id,
                    "role": role(&m.id),
                    "prefer_voter": m.prefer_voter,
                    "connected": p.is_some_and(|p| p.connected),
                    "connecting": p.is_some_and(|p| p.connecting),
                    "last_seen": p.and_then(|p| p.last_seen),
                    "in_sync": p.is_some_and(|p| p.in_sync),
                    "health": p.and_then(|p| p.health),
                    "health_since": p.and_then(|p| p.health_since),
                })
            })
            .collect::<Vec<_>>()
    )))
}

/// `POST /v1/members/recover` with `{"confirm": true}`: a new membership epoch with this node
/// as its only voter (when voters are lost for good).
async fn recover_members(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let v = json_body(body)?;
    if v["confirm"] != json!(true) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "confirm",
            "recovery starts a new membership epoch with this node as its only voter; send {\"confirm\": true}",
        ));
    }
    let epoch = api.node.recover_membership().await?;
    Ok(Json(json!({"epoch": epoch})))
}

#[derive(Deserialize)]
struct InviteReq {
    #[serde(default = "default_ttl")]
    ttl_secs: u64,
}

fn default_ttl() -> u64 {
    600
}

async fn invite(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), "bad_body", e.body_text()))?;
    let req: InviteReq = if bytes.iter().all(u8::is_ascii_whitespace) {
        InviteReq {
            ttl_secs: default_ttl(),
        }
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_json", e.to_string()))?
    };
    if !INVITE_TTL.contains(&req.ttl_secs) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_ttl",
            format!(
                "an invite must be valid for at least 1 minute and at most 30 days, not {} s",
                req.ttl_secs
            ),
        ));
    }
    let token = api.node.invite(Duration::from_secs(req.ttl_secs)).await?;
    Ok(Json(json!({"token": token})))
}

async fn join(
    State(api): State<Api>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let v = json_body(body)?;
    let token = v["token"].as_str().ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "expected {\"token\": \"...\"}",
        )
    })?;
    api.node.join(token).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    let id: NodeId = id.parse().map_err(|e: tandem_crdt::IdError| {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_id", e.to_string())
    })?;
    if api.node.remove_member(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_a_member",
            format!("{id} is not a member"),
        ))
    }
}

/// A request naming another site in `Host` or `Origin` (cross-site, or DNS rebinding).
fn foreign(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "foreign_origin",
        format!("{what} is not this tandemd's own address"),
    )
}

/// A one-time login code for the status page (what `tandem open` prints).
async fn ui_code(State(api): State<Api>) -> Json<Value> {
    let code = api.ui.new_code(api.node.time());
    Json(json!({"code": code, "url": api.ui.login_url(&code)}))
}

#[derive(Deserialize)]
struct LoginQuery {
    code: String,
}

/// Redeems a login code: sets the session cookie and goes to the page.
async fn ui_login(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> ApiResult<Response> {
    if !api.ui.host_ok(&headers) {
        return Err(foreign("Host"));
    }
    let session = api.ui.redeem(&q.code, api.node.time()).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_code",
            "unknown, used or expired login code: run `tandem open` again",
        )
    })?;
    Ok((
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, ui::Ui::cookie(&session)),
            (header::LOCATION, "/ui/".to_string()),
        ],
    )
        .into_response())
}

/// The status page for a logged-in browser; the login form for anyone else.
async fn ui_page(State(api): State<Api>, req: Request) -> Response {
    let page = match api.ui.check(req.method(), req.headers(), api.node.time()) {
        Ok(()) => ui::PAGE,
        Err(ui::Refusal::Foreign(what)) => return foreign(what).into_response(),
        Err(_) => ui::LOGIN,
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route")
}

/// The API's routes for `node`, guarded by `token`, with `journal` behind `/v1/events`;
/// pages from `app_origins` may open the automerge-repo socket.
pub fn router(
    node: Node,
    token: String,
    journal: Arc<events::Journal>,
    addr: SocketAddr,
    app_origins: Vec<String>,
) -> Router {
    let api = Api {
        node,
        token,
        journal,
        ui: Arc::new(ui::Ui::new(addr)),
        hub: Arc::new(repo::Hub::new(app_origins)),
    };
    let guarded = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/metrics", get(metrics_page))
        .route("/v1/docs", get(list_docs).post(create_doc))
        .route("/v1/docs/import", post(import_doc))
        .route(
            "/v1/docs/{id}",
            get(get_doc).put(put_doc).delete(delete_doc),
        )
        .route("/v1/docs/{id}/export", get(export_doc))
        .route("/v1/docs/{id}/history", get(history))
        .route("/v1/docs/{id}/text", put(put_text))
        .route("/v1/docs/{id}/insert", post(insert))
        .route("/v1/docs/{id}/splice", post(splice))
        .route("/v1/docs/{id}/heads", get(heads))
        .route("/v1/peers", get(peers))
        .route("/v1/members", get(members))
        .route("/v1/members/{id}", delete(remove_member))
        .route("/v1/members/recover", post(recover_members))
        .route("/v1/invite", post(invite))
        .route("/v1/join", post(join))
        .route("/v1/ui/code", post(ui_code))
        .route_layer(middleware::from_fn_with_state(api.clone(), auth));
    // Open to any local process: health, and the API's description (it holds no secrets).
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/ui/login", get(ui_login))
        .route("/ui/", get(ui_page))
        // Checks the token itself: a browser cannot send `Authorization` on a WebSocket.
        .route("/v1/automerge-repo", get(repo::upgrade))
        .merge(guarded)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// Serves the API on `addr` until `shutdown` resolves; returns the bound address.
pub async fn serve(
    node: Node,
    addr: SocketAddr,
    token: String,
    app_origins: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let journal = events::Journal::start(&node, events::JOURNAL_EVENTS)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let app = router(node, token, journal.clone(), bound, app_origins);
    let task = tokio::spawn(server::run(listener, app, async move {
        shutdown.await;
        // Event streams never end by themselves; a graceful stop waits for them.
        journal.close();
    }));
    Ok((bound, task))
}

/// File in the data dir holding the running daemon's API address (JSON `{"addr": ...}`).
pub const API_FILE: &str = "api.json";
/// File in the data dir holding the bearer token (mode 0600).
pub const TOKEN_FILE: &str = "api-token";

/// Reads the token, or makes one (32 random bytes, hex) on first use.
pub fn load_or_create_token(dir: &std::path::Path) -> Result<String, Error> {
    let path = dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            // A token restored from a backup may have come back readable by others.
            crate::identity::make_private(&path, 0o600)?;
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&path, e)),
    }
    let token = hex(&rand::random::<[u8; 32]>());
    crate::identity::write_private(&path, token.as_bytes())?;
    Ok(token)
}

/// Records where the API listens, for clients that know only the data dir.
pub fn write_api_file(dir: &std::path::Path, addr: SocketAddr) -> Result<(), Error> {
    let path = dir.join(API_FILE);
    let body = json!({"addr": addr.to_string(), "pid": std::process::id()}).to_string();
    crate::identity::write_private(&path, body.as_bytes())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeSet;

    /// The (method, path) pairs the router declares, read from this file's source.
    fn declared_routes() -> BTreeSet<(String, String)> {
        let src = include_str!("mod.rs");
        let body =
            &src[src.find("pub fn router(").unwrap()..src.find("/// Serves the API").unwrap()];
        let mut out = BTreeSet::new();
        for chunk in body.split(".route(").skip(1) {
            let path = chunk.split('"').nth(1).unwrap().to_string();
            let call = chunk.split(".route").next().unwrap();
            for method in ["get", "post", "put", "delete"] {
                let found = call.match_indices(&format!("{method}(")).any(|(i, _)| {
                    i == 0
                        || !call.as_bytes()[i - 1].is_ascii_alphanumeric()
                            && call.as_bytes()[i - 1] != b'_'
                });
                if found {
                    out.insert((method.to_string(), path.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn openapi_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if method != "parameters" {
                    documented.insert((method.clone(), path.clone()));
                }
            }
        }
        let declared = declared_routes();
        assert!(
            declared.len() > 10,
            "the source scan found too few routes: {declared:?}"
        );
        assert_eq!(documented, declared);
        // Every operation is named once and lists what it can answer.
        let mut ids = BTreeSet::new();
        for (method, path) in &documented {
            let op = &doc["paths"][path][method];
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}"));
            assert!(ids.insert(id.to_string()), "operationId {id} twice");
            let open = op["security"] == serde_json::json!([]);
            assert_eq!(
                open,
                ["/v1/health", "/v1/openapi.json", "/ui/login", "/ui/"].contains(&path.as_str()),
                "{method} {path}"
            );
            let codes = op["responses"].as_object().unwrap();
            if !open {
                for code in ["400", "401", "500", "503"] {
                    assert!(codes.contains_key(code), "{method} {path} lacks {code}");
                }
            }
            if op.get("requestBody").is_some() {
                assert!(codes.contains_key("413"), "{method} {path} lacks 413");
            }
        }
    }
}
