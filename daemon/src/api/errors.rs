//! Errors across the local API, both ways: [`ApiError`] is how the daemon reports an [`Error`]
//! (a status, a stable code, the message, and in `detail` the variant's data), and
//! [`error_from_reply`] is how [`crate::client::Daemon`] turns that reply back into the same
//! typed [`Error`] a [`crate::Node`] returns. Both directions live here so they cannot drift;
//! a round-trip test covers every variant that travels.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tandem_crdt::{DocId, PathError};

use crate::Error;
use crate::client::ClientError;
use crate::error::{DataDirError, DocError, MembershipError, NetError, StoreError};
use crate::members::InviteError;

/// An error as the API reports it: `{"code", "message", "detail"?}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The variant's data (the document, the path, the reason), so a client can rebuild it.
    pub detail: Option<Value>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(d) = self.detail {
            body["detail"] = d;
        }
        (self.status, Json(body)).into_response()
    }
}

fn why(w: &str) -> Option<Value> {
    Some(json!({ "why": w }))
}

fn path_detail(p: &PathError) -> Value {
    match p {
        PathError::Syntax { path, .. } | PathError::NotFound { path } => json!({"path": path}),
        PathError::TypeMismatch {
            path,
            expected,
            found,
        } => json!({"path": path, "expected": expected, "found": found}),
        PathError::OutOfRange { path, index, len } => {
            json!({"path": path, "index": index, "len": len})
        }
        PathError::Automerge { path, why } | PathError::BadValue { path, why } => {
            json!({"path": path, "why": why})
        }
        PathError::TooDeep { path, limit } => json!({"path": path, "limit": limit}),
    }
}

impl From<Error> for ApiError {
    /// Every variant is named: a new one is a compile error here, never a silent 500.
    fn from(e: Error) -> Self {
        use StatusCode as S;
        let (status, code, detail) = match &e {
            Error::Doc(d) => match d {
                DocError::NotFound(doc) => {
                    (S::NOT_FOUND, "doc_not_found", Some(json!({"doc": doc})))
                }
                DocError::Deleted(doc) => (S::GONE, "doc_deleted", Some(json!({"doc": doc}))),
                DocError::Path(p) => {
                    let (status, code) = match p {
                        PathError::Syntax { .. } => (S::BAD_REQUEST, "bad_path"),
                        PathError::NotFound { .. } => (S::NOT_FOUND, "path_not_found"),
                        PathError::TypeMismatch { .. } => (S::CONFLICT, "type_mismatch"),
                        PathError::OutOfRange { .. } => (S::BAD_REQUEST, "out_of_range"),
                        PathError::Automerge { .. } => (S::BAD_REQUEST, "bad_edit"),
                        PathError::BadValue { .. } => (S::BAD_REQUEST, "bad_value"),
                        PathError::TooDeep { .. } => (S::UNPROCESSABLE_ENTITY, "too_deep"),
                    };
                    (status, code, Some(path_detail(p)))
                }
                DocError::Id(_) => (S::BAD_REQUEST, "bad_id", None),
                DocError::NotAnObject(_) => (S::BAD_REQUEST, "not_an_object", None),
                DocError::CorruptImport(w) => (S::BAD_REQUEST, "corrupt_import", why(w)),
                DocError::BadBase(w) => (S::CONFLICT, "bad_base", why(w)),
                DocError::TextReplaced(path) => {
                    (S::CONFLICT, "text_replaced", Some(json!({"path": path})))
                }
                DocError::InvalidDelta(w) => (S::BAD_REQUEST, "invalid_delta", why(w)),
                DocError::BadSyncMessage(w) => (S::BAD_REQUEST, "bad_sync_message", why(w)),
                // A stored document that cannot be loaded, or Automerge refusing a change we
                // made: damage on this node, not a fault of the request.
                DocError::Corrupt { doc, why } => (
                    S::INTERNAL_SERVER_ERROR,
                    "corrupt_doc",
                    Some(json!({"doc": doc, "why": why})),
                ),
                // Being healed from members: try again later.
                DocError::Damaged { doc, deltas } => (
                    S::SERVICE_UNAVAILABLE,
                    "damaged",
                    Some(json!({"doc": doc, "deltas": deltas})),
                ),
                DocError::Automerge(_) => (S::INTERNAL_SERVER_ERROR, "automerge", None),
            },
            Error::Membership(m) => match m {
                MembershipError::OwnInvite => (S::BAD_REQUEST, "own_invite", None),
                MembershipError::NoQuorum(w) => (S::SERVICE_UNAVAILABLE, "no_quorum", why(w)),
                MembershipError::Removed(w) => (S::FORBIDDEN, "removed", why(w)),
                MembershipError::AlreadyInCluster(n) => (
                    S::CONFLICT,
                    "already_in_cluster",
                    Some(json!({"members": n})),
                ),
                MembershipError::RemoveSelf => (S::BAD_REQUEST, "remove_self", None),
                MembershipError::Consensus(w) => (S::INTERNAL_SERVER_ERROR, "membership", why(w)),
                MembershipError::Invite(i) => {
                    let refused = |what| {
                        (
                            S::FORBIDDEN,
                            "invite_refused",
                            Some(json!({"invite": what})),
                        )
                    };
                    match i {
                        InviteError::Malformed(_) => (S::BAD_REQUEST, "bad_invite", None),
                        InviteError::Unknown => refused("unknown"),
                        InviteError::Expired => refused("expired"),
                        InviteError::Used => refused("used"),
                    }
                }
            },
            Error::Net(n) => match n {
                NetError::Refused(w) => {
                    (S::FORBIDDEN, "invite_refused", Some(json!({"refused": w})))
                }
                NetError::Unreachable(w) => (S::BAD_GATEWAY, "unreachable", why(w)),
                NetError::Protocol(w) => (S::BAD_GATEWAY, "peer_protocol", why(w)),
                NetError::Disabled => (S::CONFLICT, "offline", None),
                NetError::Tls(_) | NetError::Bind { .. } => {
                    (S::INTERNAL_SERVER_ERROR, "network", None)
                }
            },
            Error::Store(st) => match st {
                StoreError::Closed => (S::SERVICE_UNAVAILABLE, "closed", None),
                StoreError::DiskFull => (S::INSUFFICIENT_STORAGE, "disk_full", None),
                StoreError::Damaged(_) => (S::SERVICE_UNAVAILABLE, "damaged", None),
                StoreError::Sqlite(_)
                | StoreError::TooNew { .. }
                | StoreError::IdentityMismatch { .. }
                | StoreError::CommitFailed(_)
                | StoreError::Corrupt { .. } => (S::INTERNAL_SERVER_ERROR, "store", None),
            },
            Error::DataDir(d) => match d {
                DataDirError::Locked { .. } => (S::CONFLICT, "locked", None),
                DataDirError::Io { .. }
                | DataDirError::Identity { .. }
                | DataDirError::LostDatabase { .. } => (S::INTERNAL_SERVER_ERROR, "data_dir", None),
            },
            Error::App(_) => (S::BAD_REQUEST, "app", None),
            Error::Closed => (S::SERVICE_UNAVAILABLE, "closed", None),
            // Only a client of another daemon raises these; relayed, they are that daemon's fault.
            Error::Client(_) => (S::BAD_GATEWAY, "client", None),
        };
        ApiError {
            detail,
            ..ApiError::new(status, code, e.to_string())
        }
    }
}

/// The typed error an error reply (`status`, JSON `body`) stands for: the variant [`Node`]
/// would have returned where the reply carries what it needs, else [`ClientError::Api`] with
/// the daemon's code and message.
///
/// [`Node`]: crate::Node
pub(crate) fn error_from_reply(status: u16, body: &Value) -> Error {
    let code = body["code"].as_str().unwrap_or("");
    let message = body["message"]
        .as_str()
        .map_or_else(|| format!("tandemd answered {status}"), str::to_string);
    typed(code, &body["detail"]).unwrap_or_else(|| {
        ClientError::Api {
            status,
            code: code.to_string(),
            message,
        }
        .into()
    })
}

fn typed(code: &str, d: &Value) -> Option<Error> {
    let s = |k: &str| d[k].as_str().map(str::to_string);
    let n = |k: &str| d[k].as_u64();
    let doc = || d["doc"].as_str()?.parse::<DocId>().ok();
    let path = || s("path");
    let e: Error = match code {
        "doc_not_found" => DocError::NotFound(doc()?).into(),
        "doc_deleted" => DocError::Deleted(doc()?).into(),
        "path_not_found" => DocError::Path(PathError::NotFound { path: path()? }).into(),
        "type_mismatch" => DocError::Path(PathError::TypeMismatch {
            path: path()?,
            expected: s("expected")?,
            found: s("found")?,
        })
        .into(),
        "out_of_range" => DocError::Path(PathError::OutOfRange {
            path: path()?,
            index: usize::try_from(n("index")?).ok()?,
            len: usize::try_from(n("len")?).ok()?,
        })
        .into(),
        "bad_edit" => DocError::Path(PathError::Automerge {
            path: path()?,
            why: s("why")?,
        })
        .into(),
        "bad_value" => DocError::Path(PathError::BadValue {
            path: path()?,
            why: s("why")?,
        })
        .into(),
        "too_deep" => DocError::Path(PathError::TooDeep {
            path: path()?,
            limit: usize::try_from(n("limit")?).ok()?,
        })
        .into(),
        "corrupt_import" => DocError::CorruptImport(s("why")?).into(),
        "bad_base" => DocError::BadBase(s("why")?).into(),
        "text_replaced" => DocError::TextReplaced(path()?).into(),
        "invalid_delta" => DocError::InvalidDelta(s("why")?).into(),
        "bad_sync_message" => DocError::BadSyncMessage(s("why")?).into(),
        "corrupt_doc" => DocError::Corrupt {
            doc: doc()?,
            why: s("why")?,
        }
        .into(),
        "damaged" => DocError::Damaged {
            doc: doc()?,
            deltas: n("deltas")?,
        }
        .into(),
        "own_invite" => MembershipError::OwnInvite.into(),
        "no_quorum" => MembershipError::NoQuorum(s("why")?).into(),
        "removed" => MembershipError::Removed(s("why")?).into(),
        "already_in_cluster" => {
            MembershipError::AlreadyInCluster(usize::try_from(n("members")?).ok()?).into()
        }
        "remove_self" => MembershipError::RemoveSelf.into(),
        "membership" => MembershipError::Consensus(s("why")?).into(),
        "invite_refused" => match (s("invite").as_deref(), s("refused")) {
            (Some("unknown"), _) => MembershipError::Invite(InviteError::Unknown).into(),
            (Some("expired"), _) => MembershipError::Invite(InviteError::Expired).into(),
            (Some("used"), _) => MembershipError::Invite(InviteError::Used).into(),
            (_, Some(w)) => NetError::Refused(w).into(),
            _ => return None,
        },
        "unreachable" => NetError::Unreachable(s("why")?).into(),
        "peer_protocol" => NetError::Protocol(s("why")?).into(),
        "offline" => NetError::Disabled.into(),
        "disk_full" => StoreError::DiskFull.into(),
        "closed" => Error::Closed,
        _ => return None,
    };
    Some(e)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round_trip(e: Error) -> Error {
        let api = ApiError::from(e);
        let resp = api.into_response();
        let status = resp.status().as_u16();
        let body = futures_body(resp);
        error_from_reply(status, &body)
    }

    fn futures_body(resp: Response) -> Value {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt
            .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn every_error_a_client_can_meet_comes_back_as_the_same_variant() {
        let doc = DocId::from_bytes([7; 16]);
        let path = |p: PathError| -> Error { DocError::Path(p).into() };
        let cases: Vec<Error> = vec![
            DocError::NotFound(doc).into(),
            DocError::Deleted(doc).into(),
            path(PathError::NotFound { path: "/a".into() }),
            path(PathError::TypeMismatch {
                path: "/a".into(),
                expected: "text".into(),
                found: "object".into(),
            }),
            path(PathError::OutOfRange {
                path: "/a/9".into(),
                index: 9,
                len: 2,
            }),
            path(PathError::Automerge {
                path: "/a".into(),
                why: "no".into(),
            }),
            path(PathError::BadValue {
                path: "/a".into(),
                why: "not a date".into(),
            }),
            path(PathError::TooDeep {
                path: "/a".into(),
                limit: 100,
            }),
            DocError::CorruptImport("bad magic".into()).into(),
            DocError::BadBase("abc".into()).into(),
            DocError::TextReplaced("/t".into()).into(),
            DocError::InvalidDelta("x".into()).into(),
            DocError::BadSyncMessage("x".into()).into(),
            DocError::Corrupt {
                doc,
                why: "x".into(),
            }
            .into(),
            DocError::Damaged { doc, deltas: 3 }.into(),
            MembershipError::OwnInvite.into(),
            MembershipError::NoQuorum("1 of 3".into()).into(),
            MembershipError::Removed(" by x".into()).into(),
            MembershipError::AlreadyInCluster(3).into(),
            MembershipError::RemoveSelf.into(),
            MembershipError::Consensus("x".into()).into(),
            MembershipError::Invite(InviteError::Unknown).into(),
            MembershipError::Invite(InviteError::Expired).into(),
            MembershipError::Invite(InviteError::Used).into(),
            NetError::Refused("no".into()).into(),
            NetError::Unreachable("x".into()).into(),
            NetError::Protocol("x".into()).into(),
            NetError::Disabled.into(),
            StoreError::DiskFull.into(),
            Error::Closed,
        ];
        for e in cases {
            let want = format!("{e:?}");
            let got = round_trip(e);
            assert_eq!(format!("{got:?}"), want);
        }
    }

    #[test]
    fn an_error_without_a_typed_twin_keeps_the_daemons_code_and_message() {
        let got = round_trip(DocError::NotAnObject("array").into());
        match got {
            Error::Client(ClientError::Api {
                status,
                code,
                message,
            }) => {
                assert_eq!((status, code.as_str()), (400, "not_an_object"));
                assert!(message.contains("JSON array"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // A reply that lost its detail (an older daemon) is not guessed at.
        let got = error_from_reply(404, &json!({"code": "doc_not_found", "message": "gone"}));
        assert!(
            matches!(got, Error::Client(ClientError::Api { .. })),
            "{got:?}"
        );
        assert_eq!(got.to_string(), "gone");
    }
}
