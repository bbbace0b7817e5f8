//! `GET /v1/events`: the node's change events as Server-Sent Events.
//!
//! A [`Journal`] keeps the most recent events in a numbered ring. Every event gets an id
//! `<epoch>-<n>` (the epoch is the node's incarnation, so ids from before a restart are told
//! apart). A client that reconnects with `Last-Event-ID` gets everything after that id that the
//! ring still holds; if the ring has moved past it, or the daemon restarted, it first gets a
//! `lagged` event saying so, never a silent gap (after a restart, then every event since the
//! restart that the ring holds). Slow clients read from the shared ring at
//! their own pace, so one slow client holds no one else up.
//!
//! `?patches=true` adds each change's patches (automerge-js's format, `tandem_crdt::json::
//! patch_to_json`), so an app can update its view without re-reading. They are journaled
//! only while such a stream is open, and the ring keeps at most [`PATCH_BUDGET`] bytes of
//! them (the oldest lose theirs first): an event whose patches are unknown says
//! `"patches": null`, and the app re-reads that document.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use automerge::{PatchAction, Prop};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tandem_crdt::{DocId, Source};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{Event, Node, SubscriptionError};

/// Events the ring holds by default.
pub const JOURNAL_EVENTS: usize = 10_000;
/// Paths listed per event at most; more are summarised by `"more": true`.
const MAX_PATHS: usize = 64;
/// Bytes of patch JSON the ring keeps at most.
pub const PATCH_BUDGET: usize = 8 << 20;

enum Entry {
    /// What the stream sends for an event, made once when it is journaled: the ring holds
    /// paths and heads, not the event's patches (a bulk import's patch lists kept memory
    /// growing with every document); their JSON, while a stream wants it, within the budget.
    Change(Arc<Sent>, Option<Arc<String>>),
    /// The journal itself fell behind the node and lost this many events.
    Gap(u64),
    /// A member's health changed: (event name, its JSON).
    Member(&'static str, Arc<String>),
}

struct Ring {
    /// The id of `entries[0]`.
    first: u64,
    entries: VecDeque<Entry>,
    cap: usize,
    /// Bytes of patch JSON held, and the id before which no entry holds any.
    patch_bytes: usize,
    patched_from: u64,
}

impl Ring {
    /// The id the next entry will get.
    fn end(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    fn push(&mut self, entry: Entry) {
        if self.entries.len() == self.cap {
            if let Some(Entry::Change(_, Some(p))) = self.entries.pop_front() {
                self.patch_bytes -= p.len();
            }
            self.first += 1;
        }
        if let Entry::Change(_, Some(p)) = &entry {
            self.patch_bytes += p.len();
        }
        self.entries.push_back(entry);
        // Over the budget: the oldest entries lose their patches first.
        while self.patch_bytes > PATCH_BUDGET {
            self.patched_from = self.patched_from.max(self.first);
            let at = (self.patched_from - self.first) as usize;
            let Some(entry) = self.entries.get_mut(at) else {
                break;
            };
            if let Entry::Change(_, p @ Some(_)) = entry
                && let Some(p) = p.take()
            {
                self.patch_bytes -= p.len();
            }
            self.patched_from += 1;
        }
    }
}

/// The numbered ring of recent events behind `/v1/events`.
pub struct Journal {
    epoch: u64,
    ring: Mutex<Ring>,
    /// The ring's end, bumped on every append; `None` once the journal is closed.
    tick: watch::Sender<Option<u64>>,
    /// Streams open that want patches (patches are journaled only while there are any).
    patch_streams: Arc<AtomicUsize>,
}

/// Counts a stream that wants patches while it lives.
struct PatchStream(Arc<AtomicUsize>);

impl Drop for PatchStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Journal {
    /// A journal of `node`'s events, fed by a task until the node closes or [`Journal::close`].
    pub fn start(node: &Node, cap: usize) -> Result<Arc<Journal>, crate::Error> {
        let journal = Arc::new(Journal {
            epoch: node.incarnation(),
            ring: Mutex::new(Ring {
                first: 1,
                entries: VecDeque::new(),
                cap: cap.max(1),
                patch_bytes: 0,
                patched_from: 1,
            }),
            tick: watch::channel(Some(1)).0,
            patch_streams: Arc::new(AtomicUsize::new(0)),
        });
        let wanted = journal.patch_streams.clone();
        let mut sub = node.subscribe(None)?;
        let mut health = node.subscribe_health();
        let weak = Arc::downgrade(&journal);
        tokio::spawn(async move {
            loop {
                let member = async {
                    match health.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let entry = tokio::select! {
                    got = sub.recv() => match got {
                        Ok(e) => {
                            let patches = (e.patched && wanted.load(Ordering::Relaxed) > 0)
                                .then(|| Arc::new(patches_json(&e)));
                            Entry::Change(Arc::new(Sent::of(&e)), patches)
                        }
                        Err(SubscriptionError::Lagged(n)) => Entry::Gap(n),
                        // A node's own subscription is never `Restarted`.
                        Err(SubscriptionError::Closed | SubscriptionError::Restarted) => break,
                    },
                    got = member => match got {
                        Ok(c) => member_entry(&c),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => Entry::Gap(n),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            health = None;
                            continue;
                        }
                    },
                };
                let Some(j) = weak.upgrade() else { return };
                j.push(entry);
            }
            if let Some(j) = weak.upgrade() {
                j.close();
            }
        });
        Ok(journal)
    }

    fn push(&self, entry: Entry) {
        let end = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.push(entry);
            ring.end()
        };
        self.tick.send_if_modified(|t| {
            if t.is_some() {
                *t = Some(end);
                true
            } else {
                false
            }
        });
    }

    /// Ends every event stream (the daemon is stopping).
    pub fn close(&self) {
        self.tick.send_replace(None);
    }

    /// Parses a `Last-Event-ID` into the id to resume from, or a reason why that is
    /// impossible (the id came from before a restart).
    fn resume_from(&self, last: &str) -> Result<Result<u64, String>, String> {
        let (epoch, n) = last
            .split_once('-')
            .and_then(|(e, n)| Some((e.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("Last-Event-ID {last:?} is not an event id (EPOCH-N)"))?;
        if epoch != self.epoch {
            return Ok(Err(format!(
                "the daemon restarted since event {last}; the events before the restart are gone \
                 (re-read the documents), those since follow"
            )));
        }
        Ok(Ok(n.saturating_add(1)))
    }

    /// The SSE response for one client: events for `doc` (or all) after `last_event_id`, or
    /// from now on; with each change's patches if `patches`.
    pub fn stream(
        self: &Arc<Self>,
        doc: Option<DocId>,
        last_event_id: Option<&str>,
        patches: bool,
    ) -> Result<Response, String> {
        let (first, end) = {
            let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            (ring.first, ring.end())
        };
        let (mut next, notice) = match last_event_id {
            None => (end, None),
            Some(last) => match self.resume_from(last)? {
                Ok(n) => (n.min(end), None),
                // Events from before the restart are gone, but those since are all here
                // (unless the ring has moved on): the client gets them after the notice.
                Err(why) => (first, Some(why)),
            },
        };
        let (tx, rx) = mpsc::channel(64);
        let journal = self.clone();
        let mut tick = self.tick.subscribe();
        let counted = patches.then(|| {
            self.patch_streams.fetch_add(1, Ordering::Relaxed);
            PatchStream(self.patch_streams.clone())
        });
        tokio::spawn(async move {
            let _counted = counted;
            if let Some(why) = notice {
                let item = Item::Lagged {
                    next,
                    missed: None,
                    code: "restarted",
                    why,
                };
                if tx.send(Ok(journal.sse(item, patches))).await.is_err() {
                    return;
                }
            }
            loop {
                let batch = journal.read(&mut next, doc);
                for item in batch {
                    if tx.send(Ok(journal.sse(item, patches))).await.is_err() {
                        return; // the client went away
                    }
                }
                let state = *tick.borrow_and_update();
                match state {
                    None => return, // the daemon is stopping
                    Some(end) if next < end => continue,
                    Some(_) => {
                        if tick.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stream: ReceiverStream<Result<SseEvent, Infallible>> = ReceiverStream::new(rx);
        Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response())
    }

    /// Up to 256 events from `*next` on, advancing `*next`; a `lagged` notice first if the
    /// ring has dropped some of them.
    fn read(&self, next: &mut u64, doc: Option<DocId>) -> Vec<Item> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if *next < ring.first {
            out.push(Item::Lagged {
                next: ring.first,
                missed: Some(ring.first - *next),
                code: "fell_behind",
                why: "this client fell behind and the daemon no longer holds the events it \
                      missed; re-read the documents"
                    .into(),
            });
            *next = ring.first;
        }
        let skip = (*next - ring.first) as usize;
        for entry in ring.entries.iter().skip(skip).take(256) {
            let id = *next;
            *next += 1;
            match entry {
                Entry::Change(e, p) if doc.is_none_or(|d| d == e.doc) => {
                    out.push(Item::Change(id, e.clone(), p.clone()));
                }
                Entry::Change(..) => {}
                Entry::Member(name, data) if doc.is_none() => {
                    out.push(Item::Member(id, name, data.clone()));
                }
                Entry::Member(..) => {}
                Entry::Gap(n) => out.push(Item::Lagged {
                    next: id + 1,
                    missed: Some(*n),
                    code: "fell_behind",
                    why: "the daemon's event feed fell behind and lost events; re-read the \
                          documents"
                        .into(),
                }),
            }
        }
        out
    }

    /// The SSE form of an item (with its patches, `null` if unknown, if `patches`); a
    /// `lagged` event's id makes a reconnect resume where it points.
    fn sse(&self, item: Item, patches: bool) -> SseEvent {
        match item {
            Item::Change(id, sent, p) => {
                let ev = SseEvent::default()
                    .event(if sent.damaged { "damaged" } else { "change" })
                    .id(format!("{}-{id}", self.epoch));
                match sent.data.strip_suffix('}') {
                    Some(open) if patches => {
                        let p = p.as_deref().map_or("null", String::as_str);
                        let comma = if open.ends_with('{') { "" } else { "," };
                        ev.data(format!("{open}{comma}\"patches\":{p}}}"))
                    }
                    _ => ev.data(sent.data.as_str()),
                }
            }
            Item::Member(id, name, data) => SseEvent::default()
                .event(name)
                .id(format!("{}-{id}", self.epoch))
                .data(data.as_str()),
            Item::Lagged {
                next,
                missed,
                code,
                why,
            } => SseEvent::default()
                .event("lagged")
                .id(format!("{}-{}", self.epoch, next.saturating_sub(1)))
                .data(json!({"code": code, "missed": missed, "message": why}).to_string()),
        }
    }
}

/// One journaled event, as the stream sends it.
#[derive(Debug, PartialEq)]
struct Sent {
    doc: DocId,
    damaged: bool,
    /// The event's JSON (see [`event_json`]).
    data: String,
}

impl Sent {
    fn of(e: &Event) -> Sent {
        Sent {
            doc: e.doc,
            damaged: e.damaged.is_some(),
            data: event_json(e).to_string(),
        }
    }
}

/// A health change as the stream sends it: `member_up`, `member_suspect` or `member_down`, with
/// `{"member": id, "health": ..., "at": unix ms}`. Not sent to a stream of one document.
fn member_entry(c: &crate::net::gossip::HealthChange) -> Entry {
    use tandem_crdt::gossip::Health;
    let name = match c.health {
        Health::Alive => "member_up",
        Health::Suspect => "member_suspect",
        Health::Down => "member_down",
    };
    let data = json!({"member": c.member, "health": c.health.as_str(), "at": c.at});
    Entry::Member(name, Arc::new(data.to_string()))
}

/// What a client is sent.
#[derive(Debug, PartialEq)]
enum Item {
    /// An event, its number, and its patches' JSON if journaled.
    Change(u64, Arc<Sent>, Option<Arc<String>>),
    /// A member's health changed: its number, the event name, its JSON.
    Member(u64, &'static str, Arc<String>),
    /// Events were lost to this client (`missed` of them, if known); it resumes at `next`.
    Lagged {
        next: u64,
        missed: Option<u64>,
        /// `fell_behind` or `restarted`.
        code: &'static str,
        why: String,
    },
}

/// An event's patches as a JSON array (automerge-js's patch format).
fn patches_json(e: &Event) -> String {
    Value::Array(
        e.patches
            .iter()
            .map(tandem_crdt::json::patch_to_json)
            .collect(),
    )
    .to_string()
}

/// An event as JSON: the document, where it came from, its heads after, whether it was deleted,
/// and the JSON Pointer paths the change touched.
pub fn event_json(e: &Event) -> Value {
    let source = match e.source {
        Source::Local => json!("local"),
        Source::Remote(id) => json!(id),
    };
    let mut paths: Vec<String> = Vec::new();
    let mut more = false;
    for p in &e.patches {
        let mut path = String::new();
        for (_, prop) in &p.path {
            push_prop(&mut path, prop);
        }
        // A text splice names the text itself here, not the index spliced at.
        if !matches!(p.action, PatchAction::SpliceText { .. })
            && let Some(prop) = tandem_crdt::json::patch_prop(&p.action)
        {
            push_prop(&mut path, &prop);
        }
        if !paths.contains(&path) {
            if paths.len() == MAX_PATHS {
                more = true;
                break;
            }
            paths.push(path);
        }
    }
    json!({
        "doc": e.doc,
        "source": source,
        "heads": e.heads,
        "deleted": e.deleted,
        "paths": paths,
        "more": more,
        "damaged": e.damaged,
    })
}

fn push_prop(path: &mut String, prop: &Prop) {
    path.push('/');
    match prop {
        Prop::Map(k) => path.push_str(&tandem_crdt::pointer::escape_token(k)),
        Prop::Seq(i) => path.push_str(&i.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Config;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn patches_are_journaled_while_a_stream_wants_them_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(Config::new(dir.path())).await.unwrap();
        let journal = Journal::start(&node, 100).unwrap();
        let doc = node.create(None).await.unwrap();
        node.put(doc, "/before", json!(1)).await.unwrap();
        let journaled = |n: u64| {
            let journal = journal.clone();
            async move {
                let start = Instant::now();
                while journal.ring.lock().unwrap().end() < n {
                    assert!(start.elapsed() < Duration::from_secs(5));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        journaled(3).await;
        let stream = journal.stream(None, None, true).unwrap();
        node.put(doc, "/n", json!(5)).await.unwrap();
        journaled(4).await;
        let mut next = 1;
        let patches: Vec<Option<Value>> = journal
            .read(&mut next, Some(doc))
            .into_iter()
            .map(|i| match i {
                Item::Change(_, _, p) => p.map(|p| serde_json::from_str(&p).unwrap()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(patches.len(), 3);
        assert_eq!(patches[..2], [None, None], "nobody wanted them then");
        assert_eq!(
            patches[2],
            Some(json!([{"action": "put", "path": ["n"], "value": 5}]))
        );
        drop(stream);
        // The budget: the oldest entries lose their patches first.
        let mut ring = Ring {
            first: 1,
            entries: VecDeque::new(),
            cap: 100,
            patch_bytes: 0,
            patched_from: 1,
        };
        let sent = Arc::new(Sent {
            doc,
            damaged: false,
            data: "{}".into(),
        });
        let big = Arc::new("x".repeat(PATCH_BUDGET / 3));
        for _ in 0..5 {
            ring.push(Entry::Change(sent.clone(), Some(big.clone())));
        }
        let kept: Vec<bool> = ring
            .entries
            .iter()
            .map(|e| matches!(e, Entry::Change(_, Some(_))))
            .collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert_eq!(ring.patch_bytes, 3 * big.len());
        let item = Item::Change(1, sent.clone(), None);
        let ev = format!("{:?}", journal.sse(item, true));
        assert!(ev.contains(r#"{\"patches\":null}"#), "{ev}");
        node.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_falls_behind_is_told() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(Config::new(dir.path())).await.unwrap();
        let journal = Journal::start(&node, 4).unwrap();
        let doc = node.create(None).await.unwrap();
        for i in 0..9 {
            node.put(doc, "/n", json!(i)).await.unwrap();
        }
        // 10 events (the create and 9 puts): the ring keeps the last 4, ids 7..=10.
        let start = Instant::now();
        while journal.ring.lock().unwrap().end() < 11 {
            assert!(start.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut next = 3; // resuming after event 2
        let items = journal.read(&mut next, None);
        assert!(
            matches!(
                items[0],
                Item::Lagged {
                    next: 7,
                    missed: Some(4),
                    ..
                }
            ),
            "{items:?}"
        );
        let ids: Vec<u64> = items[1..]
            .iter()
            .map(|i| match i {
                Item::Change(id, sent, _) => {
                    assert_eq!(sent.doc, doc);
                    let v: Value = serde_json::from_str(&sent.data).unwrap();
                    assert_eq!(v["doc"], json!(doc));
                    assert_eq!(v["source"], "local");
                    assert_eq!(v["paths"], json!(["/n"]));
                    *id
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [7, 8, 9, 10]);
        assert_eq!(next, 11);
        // Caught up: nothing more, and a filter on another document sees nothing.
        assert!(journal.read(&mut next, None).is_empty());
        let mut from = 7;
        let other = DocId::from_bytes([9; 16]);
        assert!(journal.read(&mut from, Some(other)).is_empty());
        assert_eq!(from, 11);
        // Ids from another epoch (a restart) cannot resume; garbage is an error.
        assert!(journal.resume_from("999-3").unwrap().is_err());
        assert_eq!(
            journal.resume_from(&format!("{}-3", node.incarnation())),
            Ok(Ok(4))
        );
        assert!(journal.resume_from("nope").is_err());
        node.close().await.unwrap();
    }
}
