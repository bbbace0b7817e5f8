//! The automerge-repo network protocol (version "1"): the messages JavaScript apps'
//! `Repo`s exchange (`WebSocketClientAdapter`), as CBOR maps with a `type` key. This module
//! only encodes and decodes them; no IO. The daemon's `/v1/automerge-repo` endpoint drives
//! the conversation (`daemon/src/api/repo.rs`).
//!
//! Decoding is strict about what tandem reads (a missing or mistyped field is an error naming
//! it) and lenient about what it does not (unknown keys are ignored, as automerge-repo does).
//! ciborium bounds nesting (256 levels), so a deeply nested frame is an error, not a crash.

use ciborium::Value;

use crate::DocId;

/// The protocol version tandem speaks (the only one automerge-repo 1.x and 2.x define).
pub const PROTOCOL_VERSION: &str = "1";

/// One protocol message. Peer ids are the opaque strings each side picks.
#[derive(Debug, Clone, PartialEq)]
pub enum RepoMsg {
    /// Client to server, first: who it is and which versions it speaks.
    Join {
        sender: String,
        versions: Vec<String>,
    },
    /// Server to client, the answer to `Join`.
    Peer {
        sender: String,
        target: String,
        version: String,
    },
    /// "I want this document": an Automerge sync message from a peer that does not have it.
    Request {
        sender: String,
        target: String,
        doc: DocId,
        data: Vec<u8>,
    },
    /// An Automerge sync message for a document.
    Sync {
        sender: String,
        target: String,
        doc: DocId,
        data: Vec<u8>,
    },
    /// The answer to a `Request` for a document the sender does not have.
    Unavailable {
        sender: String,
        target: String,
        doc: DocId,
    },
    /// An app's transient message about a document (presence, cursors): relayed, not stored.
    Ephemeral {
        sender: String,
        target: String,
        doc: DocId,
        count: u64,
        session: String,
        data: Vec<u8>,
    },
    /// Remote-heads gossip (`remote-subscription-change`, `remote-heads-changed`): understood
    /// and not acted on (tandem does not announce other storages' heads).
    HeadsGossip { kind: String, sender: String },
    /// The sender is about to close the connection because of `message`.
    Error {
        sender: String,
        target: String,
        message: String,
    },
}

/// A frame that is not a protocol message.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RepoError {
    #[error("not CBOR: {0}")]
    Cbor(String),
    #[error("a message must be a CBOR map with a `type`")]
    NotAMessage,
    #[error("message `{kind}`: field `{field}` is missing or of the wrong type")]
    Field { kind: String, field: &'static str },
    #[error("message `{kind}`: bad documentId: {why}")]
    DocId { kind: String, why: String },
    #[error("unknown message type `{0}`")]
    UnknownType(String),
}

/// The value under text key `key` of a CBOR map.
fn field<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_text() == Some(key))
        .map(|(_, v)| v)
}

struct Fields<'a> {
    kind: &'a str,
    map: &'a [(Value, Value)],
}

impl Fields<'_> {
    fn missing(&self, field: &'static str) -> RepoError {
        RepoError::Field {
            kind: self.kind.into(),
            field,
        }
    }

    fn text(&self, key: &'static str) -> Result<String, RepoError> {
        field(self.map, key)
            .and_then(Value::as_text)
            .map(str::to_string)
            .ok_or_else(|| self.missing(key))
    }

    fn bytes(&self, key: &'static str) -> Result<Vec<u8>, RepoError> {
        field(self.map, key)
            .and_then(Value::as_bytes)
            .cloned()
            .ok_or_else(|| self.missing(key))
    }

    fn doc(&self) -> Result<DocId, RepoError> {
        self.text("documentId")?
            .parse()
            .map_err(|e: crate::IdError| RepoError::DocId {
                kind: self.kind.into(),
                why: e.to_string(),
            })
    }
}

impl RepoMsg {
    /// Decodes one WebSocket frame.
    pub fn decode(bytes: &[u8]) -> Result<RepoMsg, RepoError> {
        let value: Value =
            ciborium::from_reader(bytes).map_err(|e| RepoError::Cbor(e.to_string()))?;
        let Value::Map(map) = value else {
            return Err(RepoError::NotAMessage);
        };
        let kind = field(&map, "type")
            .and_then(Value::as_text)
            .ok_or(RepoError::NotAMessage)?;
        let f = Fields { kind, map: &map };
        Ok(match kind {
            "join" => RepoMsg::Join {
                sender: f.text("senderId")?,
                versions: match field(&map, "supportedProtocolVersions") {
                    // automerge-repo 1.0 sent none: it means version 1.
                    None => vec![PROTOCOL_VERSION.to_string()],
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(Value::as_text)
                        .map(str::to_string)
                        .collect(),
                    Some(_) => return Err(f.missing("supportedProtocolVersions")),
                },
            },
            "peer" => RepoMsg::Peer {
                sender: f.text("senderId")?,
                target: f.text("targetId")?,
                version: f.text("selectedProtocolVersion")?,
            },
            "request" | "sync" => {
                let (sender, target, doc, data) = (
                    f.text("senderId")?,
                    f.text("targetId")?,
                    f.doc()?,
                    f.bytes("data")?,
                );
                if kind == "request" {
                    RepoMsg::Request {
                        sender,
                        target,
                        doc,
                        data,
                    }
                } else {
                    RepoMsg::Sync {
                        sender,
                        target,
                        doc,
                        data,
                    }
                }
            }
            "doc-unavailable" => RepoMsg::Unavailable {
                sender: f.text("senderId")?,
                target: f.text("targetId")?,
                doc: f.doc()?,
            },
            "ephemeral" => RepoMsg::Ephemeral {
                sender: f.text("senderId")?,
                target: f.text("targetId")?,
                doc: f.doc()?,
                count: field(&map, "count")
                    .and_then(|v| v.as_integer())
                    .and_then(|i| u64::try_from(i).ok())
                    .ok_or_else(|| f.missing("count"))?,
                session: f.text("sessionId")?,
                data: f.bytes("data")?,
            },
            "remote-subscription-change" | "remote-heads-changed" => RepoMsg::HeadsGossip {
                kind: kind.to_string(),
                sender: f.text("senderId")?,
            },
            "error" => RepoMsg::Error {
                sender: f.text("senderId").unwrap_or_default(),
                target: f.text("targetId").unwrap_or_default(),
                message: f.text("message")?,
            },
            other => return Err(RepoError::UnknownType(other.chars().take(64).collect())),
        })
    }

    /// Encodes the message as automerge-repo's `cbor.encode` does (byte strings untagged).
    pub fn encode(&self) -> Vec<u8> {
        let text = |s: &str| Value::Text(s.to_string());
        let pair = |k: &str, v: Value| (text(k), v);
        let map: Vec<(Value, Value)> = match self {
            RepoMsg::Join { sender, versions } => vec![
                pair("type", text("join")),
                pair("senderId", text(sender)),
                pair("peerMetadata", Value::Map(Vec::new())),
                pair(
                    "supportedProtocolVersions",
                    Value::Array(versions.iter().map(|v| text(v)).collect()),
                ),
            ],
            RepoMsg::Peer {
                sender,
                target,
                version,
            } => vec![
                pair("type", text("peer")),
                pair("senderId", text(sender)),
                pair(
                    "peerMetadata",
                    Value::Map(vec![pair("isEphemeral", Value::Bool(false))]),
                ),
                pair("selectedProtocolVersion", text(version)),
                pair("targetId", text(target)),
            ],
            RepoMsg::Request {
                sender,
                target,
                doc,
                data,
            }
            | RepoMsg::Sync {
                sender,
                target,
                doc,
                data,
            } => vec![
                pair(
                    "type",
                    text(if matches!(self, RepoMsg::Request { .. }) {
                        "request"
                    } else {
                        "sync"
                    }),
                ),
                pair("senderId", text(sender)),
                pair("targetId", text(target)),
                pair("documentId", text(&doc.to_string())),
                pair("data", Value::Bytes(data.clone())),
            ],
            RepoMsg::Unavailable {
                sender,
                target,
                doc,
            } => vec![
                pair("type", text("doc-unavailable")),
                pair("senderId", text(sender)),
                pair("targetId", text(target)),
                pair("documentId", text(&doc.to_string())),
            ],
            RepoMsg::Ephemeral {
                sender,
                target,
                doc,
                count,
                session,
                data,
            } => vec![
                pair("type", text("ephemeral")),
                pair("senderId", text(sender)),
                pair("targetId", text(target)),
                pair("count", Value::Integer((*count).into())),
                pair("sessionId", text(session)),
                pair("documentId", text(&doc.to_string())),
                pair("data", Value::Bytes(data.clone())),
            ],
            RepoMsg::HeadsGossip { kind, sender } => {
                vec![pair("type", text(kind)), pair("senderId", text(sender))]
            }
            RepoMsg::Error {
                sender,
                target,
                message,
            } => vec![
                pair("type", text("error")),
                pair("senderId", text(sender)),
                pair("message", text(message)),
                pair("targetId", text(target)),
            ],
        };
        let mut out = Vec::new();
        // Writing to a Vec cannot fail, and every value here is encodable.
        if ciborium::into_writer(&Value::Map(map), &mut out).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn doc() -> DocId {
        DocId::from_bytes([9; 16])
    }

    /// `bytes` with the first `from` replaced by `to` (same length).
    fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
        let mut out = bytes.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            RepoMsg::Join {
                sender: "client".into(),
                versions: vec!["1".into()],
            },
            RepoMsg::Peer {
                sender: "tandem".into(),
                target: "client".into(),
                version: "1".into(),
            },
            RepoMsg::Request {
                sender: "a".into(),
                target: "b".into(),
                doc: doc(),
                data: vec![1, 2, 3],
            },
            RepoMsg::Sync {
                sender: "a".into(),
                target: "b".into(),
                doc: doc(),
                data: vec![0x42],
            },
            RepoMsg::Unavailable {
                sender: "a".into(),
                target: "b".into(),
                doc: doc(),
            },
            RepoMsg::Ephemeral {
                sender: "a".into(),
                target: "b".into(),
                doc: doc(),
                count: 7,
                session: "s".into(),
                data: vec![5],
            },
            RepoMsg::HeadsGossip {
                kind: "remote-heads-changed".into(),
                sender: "a".into(),
            },
            RepoMsg::Error {
                sender: "a".into(),
                target: "b".into(),
                message: "bye".into(),
            },
        ];
        for m in msgs {
            assert_eq!(RepoMsg::decode(&m.encode()).unwrap(), m);
        }
    }

    /// A `sync` frame exactly as automerge-repo 2.5.6's `cbor.encode` (cbor-x) writes it.
    #[test]
    fn reads_what_the_javascript_client_writes() {
        let id = doc().to_string();
        let mut frame = vec![0xa5];
        for (k, v) in [("type", "sync"), ("targetId", "srv"), ("senderId", "cli")] {
            frame.push(0x60 + k.len() as u8);
            frame.extend(k.as_bytes());
            frame.push(0x60 + v.len() as u8);
            frame.extend(v.as_bytes());
        }
        frame.push(0x6a);
        frame.extend(b"documentId");
        frame.push(0x78);
        frame.push(id.len() as u8);
        frame.extend(id.as_bytes());
        frame.push(0x64);
        frame.extend(b"data");
        frame.extend([0x42, 0x42, 0x00]);
        assert_eq!(
            RepoMsg::decode(&frame).unwrap(),
            RepoMsg::Sync {
                sender: "cli".into(),
                target: "srv".into(),
                doc: doc(),
                data: vec![0x42, 0x00],
            }
        );
    }

    #[test]
    fn broken_frames_are_errors_that_say_what_is_wrong() {
        assert!(matches!(
            RepoMsg::decode(b"\xff\x00garbage"),
            Err(RepoError::Cbor(_))
        ));
        assert_eq!(RepoMsg::decode(&[0x01]), Err(RepoError::NotAMessage));
        let no_doc = RepoMsg::Unavailable {
            sender: "a".into(),
            target: "b".into(),
            doc: doc(),
        }
        .encode();
        let unknown = replace(&no_doc, b"doc-unavailable", b"doc-unavailabl3");
        assert!(matches!(
            RepoMsg::decode(&unknown),
            Err(RepoError::UnknownType(_))
        ));
        let mut missing = Vec::new();
        ciborium::into_writer(
            &Value::Map(vec![(
                Value::Text("type".into()),
                Value::Text("sync".into()),
            )]),
            &mut missing,
        )
        .unwrap();
        assert_eq!(
            RepoMsg::decode(&missing),
            Err(RepoError::Field {
                kind: "sync".into(),
                field: "senderId"
            })
        );
        // 100,000 nested arrays: refused by the depth limit, not a stack overflow.
        let mut deep = vec![0x81u8; 100_000];
        deep.push(0x00);
        assert!(matches!(RepoMsg::decode(&deep), Err(RepoError::Cbor(_))));
        let bad_id = RepoMsg::Sync {
            sender: "a".into(),
            target: "b".into(),
            doc: doc(),
            data: vec![],
        }
        .encode();
        let bad_id = replace(&bad_id, &doc().to_string().as_bytes()[..4], b"0OIl");
        assert!(matches!(
            RepoMsg::decode(&bad_id),
            Err(RepoError::DocId { .. })
        ));
    }
}
