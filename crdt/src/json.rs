//! The JSON view of an Automerge document: reading any object as a `serde_json::Value`, and
//! writing JSON values as Automerge objects. JSON strings become Automerge text objects (as in
//! automerge-js), so they can be spliced and merged character by character.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Number, Value as Json};

/// The deepest nesting of objects and arrays a document may have, its root included. Writes
/// that would go deeper are refused; a document that arrives deeper (from a peer) cannot be
/// read as JSON (an error for that document, never a crash: every walk here is bounded).
pub const MAX_DEPTH: usize = 100;

/// A value or document nested deeper than [`MAX_DEPTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nested deeper than {MAX_DEPTH} objects and arrays")]
pub struct TooDeep;

/// Reads the object `obj` (or the scalar at it) as JSON; `TooDeep` if it nests deeper than
/// [`MAX_DEPTH`] below `obj`.
pub fn object_to_json<R: ReadDoc>(doc: &R, obj: &ObjId) -> Result<Json, TooDeep> {
    object_at(doc, obj, 1)
}

fn object_at<R: ReadDoc>(doc: &R, obj: &ObjId, depth: usize) -> Result<Json, TooDeep> {
    let nested = |depth: usize| {
        if depth > MAX_DEPTH {
            Err(TooDeep)
        } else {
            Ok(())
        }
    };
    Ok(match doc.object_type(obj) {
        Ok(ObjType::Map) | Ok(ObjType::Table) => {
            nested(depth)?;
            let mut map = Map::new();
            for item in doc.map_range(obj, ..) {
                let id = item.id();
                map.insert(item.key.to_string(), value_at(doc, item.value, &id, depth)?);
            }
            Json::Object(map)
        }
        Ok(ObjType::List) => {
            nested(depth)?;
            let mut items = Vec::new();
            for item in doc.list_range(obj, ..) {
                let id = item.id();
                items.push(value_at(doc, item.value, &id, depth)?);
            }
            Json::Array(items)
        }
        Ok(ObjType::Text) => Json::String(doc.text(obj).unwrap_or_default()),
        Err(_) => Json::Null,
    })
}

/// Converts one value read from a document; `id` is its object id when it is an object.
pub fn value_to_json<R: ReadDoc>(
    doc: &R,
    value: automerge::ValueRef<'_>,
    id: &ObjId,
) -> Result<Json, TooDeep> {
    value_at(doc, value, id, 0)
}

fn value_at<R: ReadDoc>(
    doc: &R,
    value: automerge::ValueRef<'_>,
    id: &ObjId,
    depth: usize,
) -> Result<Json, TooDeep> {
    match value.into_value() {
        Value::Object(_) => object_at(doc, id, depth + 1),
        Value::Scalar(s) => Ok(scalar_to_json(&s)),
    }
}

/// How deeply `value` nests objects and arrays (a scalar or string: 0). Iterative, so a
/// hostile value cannot exhaust the stack.
pub fn json_depth(value: &Json) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Json>> = match v {
            Json::Array(items) => Box::new(items.iter()),
            Json::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        deepest = deepest.max(d + 1);
        stack.extend(children.map(|c| (c, d + 1)));
    }
    deepest
}

/// Converts a scalar. Counters and timestamps become numbers, bytes an array of numbers,
/// non-finite floats and values from future versions `null`.
pub fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::Number((*x).into())).collect()),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// The JSON type name of a value, for error messages.
pub fn json_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn scalar_of(value: &Json) -> Option<ScalarValue> {
    Some(match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(_) | Json::Array(_) | Json::Object(_) => return None,
    })
}

fn obj_type_of(value: &Json) -> Option<ObjType> {
    match value {
        Json::String(_) => Some(ObjType::Text),
        Json::Array(_) => Some(ObjType::List),
        Json::Object(_) => Some(ObjType::Map),
        _ => None,
    }
}

/// Writes `value` at `prop` of `parent` (a map key, or an existing list index to overwrite).
pub fn put_json<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    prop: Prop,
    value: &Json,
) -> Result<(), automerge::AutomergeError> {
    match obj_type_of(value) {
        None => tx.put(parent, prop, scalar_of(value).unwrap_or(ScalarValue::Null)),
        Some(t) => {
            let obj = tx.put_object(parent, prop, t)?;
            fill(tx, &obj, value)
        }
    }
}

/// Inserts `value` into the list `list` at `index`.
pub fn insert_json<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    index: usize,
    value: &Json,
) -> Result<(), automerge::AutomergeError> {
    match obj_type_of(value) {
        None => tx.insert(list, index, scalar_of(value).unwrap_or(ScalarValue::Null)),
        Some(t) => {
            let obj = tx.insert_object(list, index, t)?;
            fill(tx, &obj, value)
        }
    }
}

/// Fills a freshly made object with the contents of a JSON string, array or object.
fn fill<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    value: &Json,
) -> Result<(), automerge::AutomergeError> {
    match value {
        Json::String(s) => tx.splice_text(obj, 0, 0, s),
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                insert_json(tx, obj, i, item)?;
            }
            Ok(())
        }
        Json::Object(map) => {
            for (k, v) in map {
                put_json(tx, obj, Prop::Map(k.clone()), v)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{Automerge, ROOT};
    use serde_json::json;

    #[test]
    fn json_round_trips_through_a_document() {
        let value = json!({
            "title": "groceries",
            "n": -3, "big": u64::MAX, "pi": 1.5, "ok": true, "none": null,
            "items": ["milk", {"qty": 2}, [1, 2]],
            "nested": {"empty": {}, "list": []}
        });
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            for (k, v) in value.as_object().unwrap() {
                put_json(tx, &ROOT, Prop::Map(k.clone()), v)?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(object_to_json(&doc, &ROOT).unwrap(), value);
        let title = doc.get(ROOT, "title").unwrap().unwrap();
        assert!(matches!(title.0, Value::Object(ObjType::Text)));
    }
}
