//! The daemon's change events (`GET /v1/events`, Server-Sent Events) as a [`Stream`] that
//! outlives the connection: when the daemon goes away the stream reconnects (following it to a
//! new port) and resumes with `Last-Event-ID`; what the daemon could not replay arrives as
//! [`SubscriptionError::Lagged`] or [`SubscriptionError::Restarted`], never as a silent gap.
//!
//! [`Stream`]: futures_core::Stream

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use automerge::ChangeHash;
use http_body_util::BodyExt as _;
use hyper::Method;
use serde_json::Value as Json;
use tandem_crdt::{DocId, NodeId, Source};
use tokio::sync::mpsc;

use super::{Daemon, bad_reply};
use crate::{Error, SubscriptionError};

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest line (and event) accepted from the stream: an event with patches can be large,
/// but not unbounded.
const MAX_EVENT: usize = 64 << 20;

/// What to subscribe to.
#[derive(Debug, Clone, Default)]
pub struct Subscribe {
    /// One document's events; `None`: every document's, and member health.
    pub doc: Option<DocId>,
    /// Include each change's patches ([`Change::patches`]).
    pub patches: bool,
    /// Resume after this event id (one an earlier stream gave: [`EventStream::last_event_id`]).
    pub after: Option<String>,
}

/// One change to one document, as the daemon reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The event's id (`EPOCH-N`), for resuming.
    pub id: String,
    pub doc: DocId,
    /// Made on the daemon's node, or received from this member.
    pub source: Source,
    /// The document's heads after the change.
    pub heads: Vec<ChangeHash>,
    /// JSON Pointers of what changed (at most 64; `more_paths` says there were more).
    pub paths: Vec<String>,
    pub more_paths: bool,
    /// The change's patches in automerge-js's format, when subscribed with `patches` and the
    /// daemon knows them; `None`: re-read the document.
    pub patches: Option<Vec<Json>>,
    pub deleted: bool,
    /// Damage found in the stored document, and why.
    pub damaged: Option<String>,
}

/// A member's health changed.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberHealth {
    pub id: String,
    pub member: NodeId,
    /// `alive`, `suspect` or `down`.
    pub health: String,
    /// Unix milliseconds.
    pub at: i64,
}

/// An event of the daemon: a change, or (when subscribed to every document) a member's health.
#[derive(Debug, Clone, PartialEq)]
pub enum DaemonEvent {
    Change(Change),
    Member(MemberHealth),
}

impl DaemonEvent {
    /// The event's id, for `Last-Event-ID`.
    pub fn id(&self) -> &str {
        match self {
            DaemonEvent::Change(c) => &c.id,
            DaemonEvent::Member(m) => &m.id,
        }
    }
}

type Item = Result<DaemonEvent, SubscriptionError>;

/// Change events from a [`Daemon`]; ends only when dropped, or with
/// [`SubscriptionError::Closed`] if the daemon refuses to resume it (the document was deleted,
/// the token changed).
pub struct EventStream {
    rx: mpsc::Receiver<Item>,
    last: Arc<Mutex<Option<String>>>,
    /// The reconnecting reader; stopped when the stream is dropped.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EventStream {
    /// The next event, in commit order.
    pub async fn recv(&mut self) -> Item {
        self.rx
            .recv()
            .await
            .unwrap_or(Err(SubscriptionError::Closed))
    }

    /// The id of the last event received (or skipped over by a `lagged` notice): give it as
    /// [`Subscribe::after`] to resume in a later stream.
    pub fn last_event_id(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl futures_core::Stream for EventStream {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.rx.poll_recv(cx)
    }
}

/// Opens the stream: the first request is made here, so a daemon that is not running or an
/// unknown document is an error now, not a stream that never speaks.
pub(super) async fn open(daemon: Daemon, opts: Subscribe) -> Result<EventStream, Error> {
    let mut query = Vec::new();
    if let Some(doc) = opts.doc {
        query.push(format!("doc={doc}"));
    }
    if opts.patches {
        query.push("patches=true".to_string());
    }
    let route = if query.is_empty() {
        "/v1/events".to_string()
    } else {
        format!("/v1/events?{}", query.join("&"))
    };
    let body = connect(&daemon, &route, opts.after.as_deref()).await?;
    let last = Arc::new(Mutex::new(opts.after));
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(follow(daemon, route, body, tx, last.clone()));
    Ok(EventStream { rx, last, task })
}

/// The body of an event stream, and the connection it comes on (kept open while it is read).
type Body = (hyper::body::Incoming, super::Connection);

/// One `GET /v1/events` request; its body streams the events.
async fn connect(daemon: &Daemon, route: &str, after: Option<&str>) -> Result<Body, Error> {
    let headers: Vec<(&str, &str)> = after.map(|a| ("Last-Event-ID", a)).into_iter().collect();
    let reply = daemon
        .send(Method::GET, route, &headers, &super::Body::None)
        .await?;
    if !reply.resp.status().is_success() {
        reply.read().await?;
        return Err(bad_reply("the event stream was refused without an error"));
    }
    let conn = reply.conn.ok_or_else(|| bad_reply("no connection"))?;
    Ok((reply.resp.into_body(), conn))
}

/// Reads events into `tx` until it is dropped, reconnecting whenever the body ends.
async fn follow(
    daemon: Daemon,
    route: String,
    mut body: Body,
    tx: mpsc::Sender<Item>,
    last: Arc<Mutex<Option<String>>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut parser = Parser::default();
        loop {
            let frame = tokio::select! {
                f = body.0.frame() => f,
                () = tx.closed() => return,
            };
            let Some(Ok(frame)) = frame else { break };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            backoff = Duration::from_millis(100);
            for raw in parser.push(&data) {
                if let Some(id) = &raw.id {
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.clone());
                }
                let Some(item) = raw.into_item() else {
                    continue;
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            if parser.overflowed() {
                // Resuming would fetch the same event again.
                tracing::warn!("an event from tandemd was larger than {MAX_EVENT} bytes");
                let _ = tx.send(Err(SubscriptionError::Closed)).await;
                return;
            }
        }
        tracing::debug!("the event stream ended; reconnecting");
        body = loop {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = tx.closed() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let after = last.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match connect(&daemon, &route, after.as_deref()).await {
                Ok(b) => break b,
                Err(Error::Client(e)) if e.is_not_running() => continue,
                Err(e) => {
                    // Refused for good (the document is gone, the token changed).
                    tracing::debug!(error = %e, "the event stream cannot resume");
                    let _ = tx.send(Err(SubscriptionError::Closed)).await;
                    return;
                }
            }
        };
    }
}

/// One event as it came off the wire.
#[derive(Debug, Default, PartialEq)]
struct RawEvent {
    event: String,
    id: Option<String>,
    data: String,
}

impl RawEvent {
    /// What the stream yields for it; `None` for events it does not know.
    fn into_item(self) -> Option<Item> {
        let data: Json = serde_json::from_str(&self.data).ok()?;
        let id = self.id.unwrap_or_default();
        match self.event.as_str() {
            "change" | "damaged" => Some(Ok(DaemonEvent::Change(change(id, &data)?))),
            name if name.starts_with("member_") => Some(Ok(DaemonEvent::Member(MemberHealth {
                id,
                member: data["member"].as_str()?.parse().ok()?,
                health: data["health"].as_str()?.to_string(),
                at: data["at"].as_i64()?,
            }))),
            "lagged" => Some(Err(match data["code"].as_str() {
                Some("restarted") => SubscriptionError::Restarted,
                _ => SubscriptionError::Lagged(data["missed"].as_u64().unwrap_or(0)),
            })),
            _ => None,
        }
    }
}

fn change(id: String, d: &Json) -> Option<Change> {
    let strings = |v: &Json| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let source = match d["source"].as_str()? {
        "local" => Source::Local,
        id => Source::Remote(id.parse().ok()?),
    };
    Some(Change {
        id,
        doc: d["doc"].as_str()?.parse().ok()?,
        source,
        heads: strings(&d["heads"])?
            .iter()
            .map(|h| h.parse().ok())
            .collect::<Option<_>>()?,
        paths: strings(&d["paths"]).unwrap_or_default(),
        more_paths: d["more"].as_bool().unwrap_or(false),
        patches: d["patches"].as_array().cloned(),
        deleted: d["deleted"].as_bool().unwrap_or(false),
        damaged: d["damaged"].as_str().map(str::to_string),
    })
}

/// Server-Sent Events, parsed as bytes arrive (lines end in `\n`, `\r\n` or `\r`... the daemon
/// sends `\n`; a trailing `\r` is dropped).
#[derive(Default)]
struct Parser {
    line: Vec<u8>,
    event: RawEvent,
    size: usize,
    overflow: bool,
}

impl Parser {
    fn push(&mut self, bytes: &[u8]) -> Vec<RawEvent> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                if self.size == MAX_EVENT {
                    self.overflow = true;
                    return out;
                }
                self.line.push(b);
                self.size += 1;
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                self.size = 0;
                let ev = std::mem::take(&mut self.event);
                if !ev.data.is_empty() || ev.id.is_some() {
                    out.push(ev);
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event.event = value.to_string(),
                "id" => self.event.id = Some(value.to_string()),
                "data" => {
                    if !self.event.data.is_empty() {
                        self.event.data.push('\n');
                    }
                    self.event.data.push_str(value);
                }
                _ => {} // a comment (keep-alive) or a field this client does not use
            }
        }
        out
    }

    fn overflowed(&self) -> bool {
        self.overflow
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn events_split_anywhere_across_frames_parse_the_same() {
        let wire = "event: change\nid: 7-1\ndata: {\"doc\":\"x\"}\n\n:keep-alive\n\nevent: lagged\r\nid: 7-5\r\ndata: {\"code\":\"fell_behind\",\"missed\":3}\r\n\r\n";
        let whole = Parser::default().push(wire.as_bytes());
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].event, "change");
        assert_eq!(whole[0].id.as_deref(), Some("7-1"));
        assert_eq!(whole[1].data, "{\"code\":\"fell_behind\",\"missed\":3}");
        for cut in 1..wire.len() {
            let mut p = Parser::default();
            let mut got = p.push(&wire.as_bytes()[..cut]);
            got.extend(p.push(&wire.as_bytes()[cut..]));
            assert_eq!(got, whole, "cut at {cut}");
        }
        assert!(matches!(
            whole.into_iter().nth(1).unwrap().into_item(),
            Some(Err(SubscriptionError::Lagged(3)))
        ));
    }

    #[test]
    fn an_endless_line_is_refused_not_buffered() {
        let mut p = Parser::default();
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..65 {
            p.push(&chunk);
        }
        assert!(p.overflowed());
        assert!(p.line.len() <= MAX_EVENT);
    }

    #[test]
    fn a_change_event_reads_into_its_fields_and_garbage_is_skipped() {
        let doc = DocId::from_bytes([3; 16]);
        let data = serde_json::json!({"doc": doc, "source": "local", "heads": [], "deleted": false,
            "paths": ["/a"], "more": false, "damaged": null, "patches": [{"action": "put"}]});
        let raw = RawEvent {
            event: "change".into(),
            id: Some("1-2".into()),
            data: data.to_string(),
        };
        let Some(Ok(DaemonEvent::Change(c))) = raw.into_item() else {
            panic!()
        };
        assert_eq!(
            (c.doc, c.source, c.paths),
            (doc, Source::Local, vec!["/a".to_string()])
        );
        assert_eq!(c.patches.map(|p| p.len()), Some(1));
        let junk = RawEvent {
            event: "change".into(),
            id: None,
            data: "{\"doc\": 5}".into(),
        };
        assert!(junk.into_item().is_none());
    }
}
