//! JSON Pointer (RFC 6901) paths into Automerge documents, and the edits a path can name: put,
//! delete, insert into a list, splice and update text. Every edit checks the path and the types
//! along it first and fails with a [`PathError`] before it writes anything.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ROOT, ReadDoc, Value};
use serde_json::Value as Json;

use crate::json::{
    MAX_DEPTH, WriteError, insert_json, json_depth, json_type, object_to_json, put_json,
    scalar_to_json, update_map,
};

/// Why a path or an edit at a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("bad path {path:?}: {why}")]
    Syntax { path: String, why: &'static str },
    #[error("nothing at {path:?}")]
    NotFound { path: String },
    #[error("wrong type at {path:?}: expected {expected}, found {found}")]
    TypeMismatch {
        path: String,
        expected: String,
        found: String,
    },
    #[error("index {index} out of range at {path:?} (length {len})")]
    OutOfRange {
        path: String,
        index: usize,
        len: usize,
    },
    #[error("automerge refused the edit at {path:?}: {why}")]
    Automerge { path: String, why: String },
    /// A typed value that is not of its type (`{"$timestamp": "yesterday"}`).
    #[error("bad value at {path:?}: {why}")]
    BadValue { path: String, why: String },
    #[error(
        "{path:?} would nest deeper than {limit} objects and arrays (the limit for a document)"
    )]
    TooDeep { path: String, limit: usize },
}

impl PathError {
    /// Deleting at `""`: the document root cannot be deleted.
    pub fn root_delete() -> PathError {
        PathError::Syntax {
            path: String::new(),
            why: "the document root cannot be deleted (delete the document instead)",
        }
    }
}

/// A parsed JSON Pointer: `""` is the whole document, `"/a/0/b~1c"` is `["a", "0", "b/c"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// Parses RFC 6901 text.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let syntax = |why| PathError::Syntax {
            path: text.to_string(),
            why,
        };
        if text.is_empty() {
            return Ok(Self::root());
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(syntax("a JSON Pointer is empty or starts with '/'"));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut tok = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => tok.push('~'),
                        Some('1') => tok.push('/'),
                        _ => return Err(syntax("'~' must be followed by '0' or '1'")),
                    }
                } else {
                    tok.push(c);
                }
            }
            tokens.push(tok);
        }
        Ok(Self {
            text: text.to_string(),
            tokens,
        })
    }

    /// The whole document.
    pub fn root() -> Self {
        Self {
            text: String::new(),
            tokens: Vec::new(),
        }
    }

    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn split_last(&self) -> Option<(&[String], &str)> {
        self.tokens
            .split_last()
            .map(|(last, parent)| (parent, last.as_str()))
    }
}

impl std::fmt::Display for Pointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// What a path resolved to.
enum Target {
    Object(ObjId, ObjType),
    Scalar(automerge::ScalarValue),
}

fn type_name(t: &Target) -> &'static str {
    match t {
        Target::Object(_, ObjType::Map | ObjType::Table) => "object",
        Target::Object(_, ObjType::List) => "array",
        Target::Object(_, ObjType::Text) => "text",
        Target::Scalar(automerge::ScalarValue::Str(_)) => "string scalar",
        Target::Scalar(automerge::ScalarValue::Null) => "null",
        Target::Scalar(automerge::ScalarValue::Boolean(_)) => "boolean",
        Target::Scalar(_) => "number",
    }
}

/// One reference token as it appears in a pointer's text (`~` and `/` escaped).
pub fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn prefix_text(tokens: &[String]) -> String {
    tokens
        .iter()
        .map(|t| format!("/{}", escape_token(t)))
        .collect()
}

fn parse_index(path: &[String], tok: &str) -> Result<usize, PathError> {
    let bad = || PathError::Syntax {
        path: prefix_text(path),
        why: "array index must be a non-negative integer without leading zeros",
    };
    if tok.is_empty() || (tok.len() > 1 && tok.starts_with('0')) {
        return Err(bad());
    }
    tok.parse().map_err(|_| bad())
}

/// Resolves `tokens` from the root.
fn resolve<R: ReadDoc>(doc: &R, tokens: &[String]) -> Result<Target, PathError> {
    let mut cur = Target::Object(ROOT, ObjType::Map);
    for (i, tok) in tokens.iter().enumerate() {
        let here = &tokens[..=i];
        let Target::Object(obj, ty) = &cur else {
            return Err(PathError::TypeMismatch {
                path: prefix_text(&tokens[..i]),
                expected: "object or array".into(),
                found: type_name(&cur).into(),
            });
        };
        let prop: Prop = match ty {
            ObjType::Map | ObjType::Table => Prop::Map(tok.clone()),
            ObjType::List => {
                let idx = parse_index(here, tok)?;
                let len = doc.length(obj);
                if idx >= len {
                    return Err(PathError::NotFound {
                        path: prefix_text(here),
                    });
                }
                Prop::Seq(idx)
            }
            ObjType::Text => {
                return Err(PathError::TypeMismatch {
                    path: prefix_text(&tokens[..i]),
                    expected: "object or array".into(),
                    found: "text".into(),
                });
            }
        };
        let got = doc.get(obj, prop).map_err(|e| PathError::Automerge {
            path: prefix_text(here),
            why: e.to_string(),
        })?;
        cur = match got {
            None => {
                return Err(PathError::NotFound {
                    path: prefix_text(here),
                });
            }
            Some((value, id)) => match value {
                Value::Object(t) => Target::Object(id, t),
                Value::Scalar(s) => Target::Scalar(s.into_owned()),
            },
        };
    }
    Ok(cur)
}

/// Reads the value at `path` as JSON. A document nested deeper than [`MAX_DEPTH`] (which
/// only a peer could have made) is an error, not a crash.
pub fn get<R: ReadDoc>(doc: &R, path: &Pointer) -> Result<Json, PathError> {
    Ok(match resolve(doc, &path.tokens)? {
        Target::Object(id, _) => object_to_json(doc, &id).map_err(|_| PathError::TooDeep {
            path: path.text.clone(),
            limit: MAX_DEPTH,
        })?,
        Target::Scalar(s) => scalar_to_json(&s),
    })
}

/// Refuses to write `value` at `path` if the document would nest deeper than [`MAX_DEPTH`]:
/// the root is level 1, each token of the path one more, then the value's own nesting.
fn check_depth(path: &Pointer, value: &Json) -> Result<(), PathError> {
    if path.tokens.len() + json_depth(value) > MAX_DEPTH {
        return Err(PathError::TooDeep {
            path: path.text.clone(),
            limit: MAX_DEPTH,
        });
    }
    Ok(())
}

/// The container at `parent` and the type it must be for the last token.
fn container<R: ReadDoc>(doc: &R, parent: &[String]) -> Result<(ObjId, ObjType), PathError> {
    match resolve(doc, parent)? {
        Target::Object(id, t @ (ObjType::Map | ObjType::Table | ObjType::List)) => Ok((id, t)),
        other => Err(PathError::TypeMismatch {
            path: prefix_text(parent),
            expected: "object or array".into(),
            found: type_name(&other).into(),
        }),
    }
}

fn am_err(path: &Pointer) -> impl Fn(automerge::AutomergeError) -> PathError + '_ {
    move |e| PathError::Automerge {
        path: path.text.clone(),
        why: e.to_string(),
    }
}

fn write_err(path: &Pointer) -> impl Fn(WriteError) -> PathError + '_ {
    move |e| match e {
        WriteError::Automerge(e) => am_err(path)(e),
        WriteError::BadValue(why) => PathError::BadValue {
            path: path.text.clone(),
            why,
        },
        WriteError::NotCounter(found) => PathError::TypeMismatch {
            path: path.text.clone(),
            expected: "counter".into(),
            found: found.into(),
        },
    }
}

/// Sets the value at `path`: a map key is created or replaced; an array index is replaced, and
/// `-` (or the array's length) appends. The root can only be replaced by an object. What is
/// there is updated in place where the shapes agree, and typed values (`{"$timestamp": ..}`,
/// `{"$counter": n}`, `{"$bytes": ..}`, `{"$increment": n}`) write the types JSON lacks: see
/// [`put_json`].
pub fn put<T: Transactable + ReadDoc>(
    tx: &mut T,
    path: &Pointer,
    value: &Json,
) -> Result<(), PathError> {
    check_depth(path, value)?;
    let Some((parent, last)) = path.split_last() else {
        let Json::Object(map) = value else {
            return Err(PathError::TypeMismatch {
                path: String::new(),
                expected: "object".into(),
                found: json_type(value).into(),
            });
        };
        return update_map(tx, &ROOT, map).map_err(write_err(path));
    };
    let (obj, ty) = container(tx, parent)?;
    match ty {
        ObjType::List => {
            let len = tx.length(&obj);
            let idx = if last == "-" {
                len
            } else {
                parse_index(&path.tokens, last)?
            };
            if idx == len {
                insert_json(tx, &obj, idx, value)
            } else if idx < len {
                put_json(tx, &obj, Prop::Seq(idx), value)
            } else {
                return Err(PathError::OutOfRange {
                    path: path.text.clone(),
                    index: idx,
                    len,
                });
            }
        }
        _ => put_json(tx, &obj, Prop::Map(last.to_string()), value),
    }
    .map_err(write_err(path))
}

/// Inserts `value` into an array before index `path`'s last token (`-` appends), shifting the
/// rest right.
pub fn insert<T: Transactable + ReadDoc>(
    tx: &mut T,
    path: &Pointer,
    value: &Json,
) -> Result<(), PathError> {
    check_depth(path, value)?;
    let Some((parent, last)) = path.split_last() else {
        return Err(PathError::TypeMismatch {
            path: String::new(),
            expected: "array element".into(),
            found: "object".into(),
        });
    };
    let (obj, ty) = container(tx, parent)?;
    if ty != ObjType::List {
        return Err(PathError::TypeMismatch {
            path: prefix_text(parent),
            expected: "array".into(),
            found: "object".into(),
        });
    }
    let len = tx.length(&obj);
    let idx = if last == "-" {
        len
    } else {
        parse_index(&path.tokens, last)?
    };
    if idx > len {
        return Err(PathError::OutOfRange {
            path: path.text.clone(),
            index: idx,
            len,
        });
    }
    insert_json(tx, &obj, idx, value).map_err(write_err(path))
}

/// Deletes the map key or array element at `path`. The root cannot be deleted.
pub fn delete<T: Transactable + ReadDoc>(tx: &mut T, path: &Pointer) -> Result<(), PathError> {
    let Some((parent, last)) = path.split_last() else {
        return Err(PathError::root_delete());
    };
    // Resolving the full path proves the key or index exists.
    resolve(tx, &path.tokens)?;
    let (obj, ty) = container(tx, parent)?;
    let prop = match ty {
        ObjType::List => Prop::Seq(parse_index(&path.tokens, last)?),
        _ => Prop::Map(last.to_string()),
    };
    tx.delete(&obj, prop).map_err(am_err(path))
}

/// The text object at `path` (an error if there is none, or something else is there).
pub fn text_at<R: ReadDoc>(doc: &R, path: &Pointer) -> Result<ObjId, PathError> {
    match resolve(doc, &path.tokens)? {
        Target::Object(id, ObjType::Text) => Ok(id),
        other => Err(PathError::TypeMismatch {
            path: path.text.clone(),
            expected: "text".into(),
            found: type_name(&other).into(),
        }),
    }
}

/// Splices the text at `path`: deletes `delete` characters at `pos` (Unicode code points) and
/// inserts `insert` there.
pub fn splice_text<T: Transactable + ReadDoc>(
    tx: &mut T,
    path: &Pointer,
    pos: usize,
    delete: usize,
    insert: &str,
) -> Result<(), PathError> {
    let obj = text_at(tx, path)?;
    let len = tx.length(&obj);
    let end = pos.saturating_add(delete);
    if end > len {
        return Err(PathError::OutOfRange {
            path: path.text.clone(),
            index: end,
            len,
        });
    }
    let del = isize::try_from(delete).map_err(|_| PathError::OutOfRange {
        path: path.text.clone(),
        index: end,
        len,
    })?;
    tx.splice_text(&obj, pos, del, insert).map_err(am_err(path))
}

/// Replaces the text at `path` with `new_text`, as the smallest set of splices (a diff), so
/// concurrent edits elsewhere in the text survive.
pub fn update_text<T: Transactable + ReadDoc>(
    tx: &mut T,
    path: &Pointer,
    new_text: &str,
) -> Result<(), PathError> {
    let obj = text_at(tx, path)?;
    tx.update_text(&obj, new_text).map_err(am_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::Automerge;
    use serde_json::json;

    fn doc_with(value: Json) -> Automerge {
        let mut doc = Automerge::new();
        doc.transact::<_, _, PathError>(|tx| put(tx, &Pointer::root(), &value))
            .unwrap();
        doc
    }

    fn p(s: &str) -> Pointer {
        Pointer::parse(s).unwrap()
    }

    fn edit(
        doc: &mut Automerge,
        f: impl FnOnce(&mut automerge::transaction::Transaction<'_>) -> Result<(), PathError>,
    ) -> Result<(), PathError> {
        doc.transact(f).map(|_| ()).map_err(|f| f.error)
    }

    #[test]
    fn pointer_syntax() {
        assert_eq!(p("").tokens(), &[] as &[String]);
        assert_eq!(p("/a~1b/~0c/").tokens(), &["a/b", "~c", ""]);
        assert!(Pointer::parse("a").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        assert!(Pointer::parse("/a~").is_err());
    }

    #[test]
    fn get_put_insert_delete() {
        let mut doc = doc_with(json!({"a": {"b": [1, 2, 3]}, "s": "hi"}));
        assert_eq!(get(&doc, &p("/a/b/1")).unwrap(), json!(2));
        assert_eq!(get(&doc, &p("/s")).unwrap(), json!("hi"));
        edit(&mut doc, |tx| put(tx, &p("/a/b/0"), &json!("x"))).unwrap();
        edit(&mut doc, |tx| put(tx, &p("/a/b/-"), &json!(4))).unwrap();
        edit(&mut doc, |tx| insert(tx, &p("/a/b/1"), &json!(null))).unwrap();
        edit(&mut doc, |tx| delete(tx, &p("/a/b/2"))).unwrap();
        edit(&mut doc, |tx| put(tx, &p("/new"), &json!({"k": [true]}))).unwrap();
        assert_eq!(
            get(&doc, &p("")).unwrap(),
            json!({"a": {"b": ["x", null, 3, 4]}, "s": "hi", "new": {"k": [true]}})
        );
    }

    #[test]
    fn text_edits() {
        let mut doc = doc_with(json!({"t": "hello world"}));
        edit(&mut doc, |tx| splice_text(tx, &p("/t"), 0, 5, "goodbye")).unwrap();
        assert_eq!(get(&doc, &p("/t")).unwrap(), json!("goodbye world"));
        edit(&mut doc, |tx| update_text(tx, &p("/t"), "goodbye, world!")).unwrap();
        assert_eq!(get(&doc, &p("/t")).unwrap(), json!("goodbye, world!"));
    }

    #[test]
    fn bad_paths_are_typed_errors_and_write_nothing() {
        let mut doc = doc_with(json!({"n": 1, "l": [1], "t": "abc", "m": {}}));
        let heads = doc.get_heads();
        let cases: Vec<(&str, Result<(), PathError>)> = vec![
            (
                "missing",
                edit(&mut doc, |tx| put(tx, &p("/nope/x"), &json!(1))),
            ),
            (
                "through scalar",
                edit(&mut doc, |tx| put(tx, &p("/n/x"), &json!(1))),
            ),
            (
                "bad index",
                edit(&mut doc, |tx| put(tx, &p("/l/01"), &json!(1))),
            ),
            (
                "out of range",
                edit(&mut doc, |tx| put(tx, &p("/l/5"), &json!(1))),
            ),
            (
                "insert into map",
                edit(&mut doc, |tx| insert(tx, &p("/m/0"), &json!(1))),
            ),
            (
                "splice a number",
                edit(&mut doc, |tx| splice_text(tx, &p("/n"), 0, 0, "x")),
            ),
            (
                "splice past end",
                edit(&mut doc, |tx| splice_text(tx, &p("/t"), 2, 5, "x")),
            ),
            (
                "delete missing",
                edit(&mut doc, |tx| delete(tx, &p("/m/zz"))),
            ),
            ("delete root", edit(&mut doc, |tx| delete(tx, &p("")))),
            (
                "root not object",
                edit(&mut doc, |tx| put(tx, &p(""), &json!([1]))),
            ),
            (
                "into text",
                edit(&mut doc, |tx| put(tx, &p("/t/0"), &json!(1))),
            ),
        ];
        for (name, r) in cases {
            assert!(r.is_err(), "{name} was accepted");
        }
        assert_eq!(doc.get_heads(), heads, "nothing was written");
        assert!(matches!(
            get(&doc, &p("/n/x")),
            Err(PathError::TypeMismatch { .. })
        ));
        assert!(matches!(
            get(&doc, &p("/zz")),
            Err(PathError::NotFound { .. })
        ));
    }
}
