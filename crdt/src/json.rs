//! The JSON view of an Automerge document: reading any object as a `serde_json::Value`, and
//! writing JSON values as Automerge objects. JSON strings become Automerge text objects (as in
//! automerge-js), so they can be spliced and merged character by character.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Number, Value as Json};

use crate::typed;

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

/// Converts a scalar. Timestamps become ISO 8601 text as automerge-js's JSON shows a `Date`
/// (a number outside JavaScript's date range), counters numbers, bytes an array of numbers,
/// non-finite floats and values from future versions `null`.
pub fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Timestamp(ms) => {
            typed::format_timestamp(*ms).map_or(Json::Number((*ms).into()), Json::String)
        }
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::Number((*x).into())).collect()),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// The key or index a patch's action names below its path: the key put or deleted, the index
/// put, inserted, deleted or spliced at, the counter incremented. `None` for marks (they name
/// the text itself).
pub fn patch_prop(action: &automerge::PatchAction) -> Option<Prop> {
    use automerge::PatchAction as A;
    match action {
        A::PutMap { key, .. } | A::DeleteMap { key } => Some(Prop::Map(key.clone())),
        A::PutSeq { index, .. }
        | A::Insert { index, .. }
        | A::DeleteSeq { index, .. }
        | A::SpliceText { index, .. } => Some(Prop::Seq(*index)),
        A::Increment { prop, .. } | A::Conflict { prop } => Some(prop.clone()),
        A::Mark { .. } => None,
    }
}

/// A patch as JSON, in automerge-js's patch format: `{"action", "path", ...}` with `action`
/// one of `put`, `insert`, `splice`, `inc`, `del`, `mark`, `conflict`, and `path` the keys
/// and indexes down to what changed. A new object is shown empty (`{}`, `[]`, or `""` for
/// text); the patches that fill it follow.
pub fn patch_to_json(patch: &automerge::Patch) -> Json {
    use automerge::PatchAction as A;
    let prop = |p: &Prop| match p {
        Prop::Map(k) => Json::String(k.clone()),
        Prop::Seq(i) => Json::Number((*i as u64).into()),
    };
    let mut path: Vec<Json> = patch.path.iter().map(|(_, p)| prop(p)).collect();
    let value = |v: &Value<'_>| match v {
        Value::Object(ObjType::Map | ObjType::Table) => Json::Object(Map::new()),
        Value::Object(ObjType::List) => Json::Array(Vec::new()),
        Value::Object(ObjType::Text) => Json::String(String::new()),
        Value::Scalar(s) => scalar_to_json(s),
    };
    path.extend(patch_prop(&patch.action).as_ref().map(prop));
    let mut out = Map::new();
    let action = match &patch.action {
        A::PutMap { value: v, .. } | A::PutSeq { value: v, .. } => {
            out.insert("value".into(), value(&v.0));
            "put"
        }
        A::Insert { values, .. } => {
            let vals = values.iter().map(|(v, _, _)| value(v)).collect();
            out.insert("values".into(), Json::Array(vals));
            "insert"
        }
        A::SpliceText { value: v, .. } => {
            out.insert("value".into(), Json::String(v.make_string()));
            "splice"
        }
        A::Increment { value: n, .. } => {
            out.insert("value".into(), Json::Number((*n).into()));
            "inc"
        }
        A::Conflict { .. } => "conflict",
        A::DeleteMap { .. } => "del",
        A::DeleteSeq { length, .. } => {
            if *length > 1 {
                out.insert("length".into(), Json::Number((*length as u64).into()));
            }
            "del"
        }
        A::Mark { marks } => {
            let marks = marks
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "name": m.name(),
                        "value": scalar_to_json(m.value()),
                        "start": m.start,
                        "end": m.end,
                    })
                })
                .collect();
            out.insert("marks".into(), Json::Array(marks));
            "mark"
        }
    };
    out.insert("action".into(), Json::String(action.into()));
    out.insert("path".into(), Json::Array(path));
    Json::Object(out)
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

/// Why a JSON value could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Automerge(#[from] automerge::AutomergeError),
    /// A typed value (`{"$timestamp": ...}`) whose value is not one of its type.
    #[error("{0}")]
    BadValue(String),
    /// `{"$increment": n}` where no counter is.
    #[error("only a counter can be incremented; this is {0}")]
    NotCounter(&'static str),
}

/// A value JSON has no type for, written as an object with one `$` key:
/// `{"$timestamp": "2026-12-06T05:17:45.123Z"}` (or unix milliseconds), `{"$counter": 0}`,
/// `{"$bytes": "aGkh"}` (base64), and `{"$increment": 1}` to add to the counter already there.
/// Any other object, `$` keys or not, is an ordinary map.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Scalar(ScalarValue),
    Increment(i64),
}

fn typed(value: &Json) -> Result<Option<Typed>, WriteError> {
    let Json::Object(map) = value else {
        return Ok(None);
    };
    let Some((key, v)) = map.iter().next().filter(|_| map.len() == 1) else {
        return Ok(None);
    };
    let bad = |want: &str| WriteError::BadValue(format!("{key}: expected {want}, found {v}"));
    let int = || v.as_i64().ok_or_else(|| bad("an integer"));
    Ok(Some(match key.as_str() {
        "$timestamp" => Typed::Scalar(ScalarValue::Timestamp(match v {
            Json::String(t) => typed::parse_timestamp(t)
                .ok_or_else(|| bad("an ISO 8601 date-time such as 2026-12-06T05:17:45.123Z"))?,
            _ => v
                .as_i64()
                .ok_or_else(|| bad("ISO 8601 text or unix milliseconds"))?,
        })),
        "$counter" => Typed::Scalar(ScalarValue::counter(int()?)),
        "$bytes" => Typed::Scalar(ScalarValue::Bytes(
            v.as_str()
                .and_then(typed::decode_base64)
                .ok_or_else(|| bad("base64 text"))?,
        )),
        "$increment" => Typed::Increment(int()?),
        _ => return Ok(None),
    }))
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

/// The name of what a value read from a document is, for errors.
fn kind_of(value: &Value<'_>) -> &'static str {
    match value {
        Value::Object(ObjType::Map | ObjType::Table) => "an object",
        Value::Object(ObjType::List) => "an array",
        Value::Object(ObjType::Text) => "text",
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Timestamp(_) => "a timestamp",
            ScalarValue::Bytes(_) => "bytes",
            ScalarValue::Null => "null",
            ScalarValue::Boolean(_) => "a boolean",
            ScalarValue::Str(_) => "a string",
            _ => "a number",
        },
    }
}

/// The scalar a plain JSON value means where a timestamp or bytes already is (so a
/// read-modify-write keeps the type): ISO 8601 text or milliseconds for a timestamp, an array
/// of byte values for bytes. (A counter is moved by an increment instead: [`put_json`].)
fn keep_type(old: &ScalarValue, value: &Json) -> Option<ScalarValue> {
    match (old, value) {
        (ScalarValue::Timestamp(_), Json::String(t)) => {
            typed::parse_timestamp(t).map(ScalarValue::Timestamp)
        }
        (ScalarValue::Timestamp(_), Json::Number(n)) => n.as_i64().map(ScalarValue::Timestamp),
        (ScalarValue::Bytes(_), Json::Array(items)) => items
            .iter()
            .map(|i| i.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect::<Option<Vec<u8>>>()
            .map(ScalarValue::Bytes),
        _ => None,
    }
}

/// Writes `value` at `prop` of `parent` (a map key, or an existing list index to overwrite).
///
/// What is there already is updated in place where the shapes agree, so writing back what was
/// read changes nothing, and concurrent edits inside merge: an object's keys are written one
/// by one (keys the value lacks are deleted), an array's items index by index; text that
/// differs is replaced by a new text object (as a string assignment in automerge-js; to merge
/// an edit into text, use the text edits), text that is the same is left alone. A timestamp
/// or bytes keeps its type when written as JSON reads it ([`keep_type`]); a counter written a
/// new integer is incremented by the difference, so concurrent increments add up. Typed
/// values (`{"$counter": 0}`, see [`Typed`]) write those types explicitly.
pub fn put_json<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    prop: Prop,
    value: &Json,
) -> Result<(), WriteError> {
    let Some((old, obj)) = tx.get(parent, prop.clone())? else {
        return put_new(tx, parent, prop, value);
    };
    match (typed(value)?, old, value) {
        (Some(Typed::Increment(by)), Value::Scalar(s), _)
            if matches!(s.as_ref(), ScalarValue::Counter(_)) =>
        {
            Ok(tx.increment(parent, prop, by)?)
        }
        (Some(Typed::Increment(_)), old, _) => Err(WriteError::NotCounter(kind_of(&old))),
        (Some(Typed::Scalar(s)), _, _) => Ok(tx.put(parent, prop, s)?),
        (None, Value::Object(ObjType::Map | ObjType::Table), Json::Object(map)) => {
            update_map(tx, &obj, map)
        }
        (None, Value::Object(ObjType::List), Json::Array(items)) => update_list(tx, &obj, items),
        // Text is replaced by a new text object, as assigning a string does in automerge-js
        // (edits merge through the text edits instead), unless it is unchanged.
        (None, Value::Object(ObjType::Text), Json::String(new)) if tx.text(&obj)? == *new => Ok(()),
        (None, Value::Scalar(old), _) => {
            if let (ScalarValue::Counter(c), Some(new)) = (old.as_ref(), value.as_i64()) {
                let by = new.wrapping_sub(i64::from(c));
                if by != 0 {
                    tx.increment(parent, prop, by)?;
                }
                return Ok(());
            }
            match keep_type(&old, value) {
                Some(s) => Ok(tx.put(parent, prop, s)?),
                None => put_fresh(tx, parent, prop, value),
            }
        }
        (None, _, _) => put_fresh(tx, parent, prop, value),
    }
}

/// Writes `value` where nothing is (a new key, a fresh object's contents): nothing to keep,
/// nothing to increment.
fn put_new<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    prop: Prop,
    value: &Json,
) -> Result<(), WriteError> {
    match typed(value)? {
        Some(Typed::Scalar(s)) => Ok(tx.put(parent, prop, s)?),
        Some(Typed::Increment(_)) => Err(WriteError::NotCounter("nothing")),
        None => put_fresh(tx, parent, prop, value),
    }
}

/// Replaces whatever is at `prop` with a new object or scalar made from the plain JSON
/// `value`.
fn put_fresh<T: Transactable>(
    tx: &mut T,
    parent: &ObjId,
    prop: Prop,
    value: &Json,
) -> Result<(), WriteError> {
    match obj_type_of(value) {
        None => Ok(tx.put(parent, prop, scalar_of(value).unwrap_or(ScalarValue::Null))?),
        Some(t) => {
            let obj = tx.put_object(parent, prop, t)?;
            fill(tx, &obj, value)
        }
    }
}

/// Makes the map `obj` hold exactly the keys of `map`, each written with [`put_json`] (the
/// whole document is replaced this way, at the root).
pub fn update_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    map: &Map<String, Json>,
) -> Result<(), WriteError> {
    let old: Vec<String> = tx.keys(obj).collect();
    for k in old.iter().filter(|k| !map.contains_key(*k)) {
        tx.delete(obj, k.as_str())?;
    }
    for (k, v) in map {
        put_json(tx, obj, Prop::Map(k.clone()), v)?;
    }
    Ok(())
}

/// Makes the list `obj` hold `items`: updated index by index, the rest inserted or deleted at
/// the end.
fn update_list<T: Transactable>(tx: &mut T, obj: &ObjId, items: &[Json]) -> Result<(), WriteError> {
    let len = tx.length(obj);
    for (i, item) in items.iter().enumerate() {
        if i < len {
            put_json(tx, obj, Prop::Seq(i), item)?;
        } else {
            insert_json(tx, obj, i, item)?;
        }
    }
    for i in (items.len()..len).rev() {
        tx.delete(obj, i)?;
    }
    Ok(())
}

/// Inserts `value` into the list `list` at `index`.
pub fn insert_json<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    index: usize,
    value: &Json,
) -> Result<(), WriteError> {
    match typed(value)? {
        Some(Typed::Scalar(s)) => return Ok(tx.insert(list, index, s)?),
        Some(Typed::Increment(_)) => return Err(WriteError::NotCounter("nothing")),
        None => {}
    }
    match obj_type_of(value) {
        None => Ok(tx.insert(list, index, scalar_of(value).unwrap_or(ScalarValue::Null))?),
        Some(t) => {
            let obj = tx.insert_object(list, index, t)?;
            fill(tx, &obj, value)
        }
    }
}

/// Fills a freshly made object with the contents of a JSON string, array or object.
fn fill<T: Transactable>(tx: &mut T, obj: &ObjId, value: &Json) -> Result<(), WriteError> {
    match value {
        Json::String(s) => Ok(tx.splice_text(obj, 0, 0, s)?),
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                insert_json(tx, obj, i, item)?;
            }
            Ok(())
        }
        Json::Object(map) => {
            for (k, v) in map {
                put_new(tx, obj, Prop::Map(k.clone()), v)?;
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
    fn patches_read_as_automerge_js_shows_them() {
        use automerge::transaction::Transactable as _;
        let mut doc = Automerge::new();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            let items = tx.put_object(ROOT, "items", ObjType::List)?;
            tx.insert(&items, 0, "a")?;
            tx.put_object(ROOT, "title", ObjType::Text)?;
            tx.put(ROOT, "n", ScalarValue::counter(1))?;
            Ok(())
        })
        .unwrap();
        let before = doc.get_heads();
        let items = doc.get(ROOT, "items").unwrap().unwrap().1;
        let title = doc.get(ROOT, "title").unwrap().unwrap().1;
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            tx.insert(&items, 1, "b")?;
            tx.delete(&items, 0)?;
            tx.splice_text(&title, 0, 0, "hi")?;
            tx.increment(ROOT, "n", 4)?;
            tx.put(ROOT, "when", ScalarValue::Timestamp(0))?;
            tx.put_object(ROOT, "meta", ObjType::Map)?;
            Ok(())
        })
        .unwrap();
        let after = doc.get_heads();
        let patches: Vec<Json> = doc
            .diff(&before, &after)
            .iter()
            .map(patch_to_json)
            .collect();
        for want in [
            json!({"action": "del", "path": ["items", 0]}),
            json!({"action": "insert", "path": ["items", 0], "values": ["b"]}),
            json!({"action": "splice", "path": ["title", 0], "value": "hi"}),
            json!({"action": "inc", "path": ["n"], "value": 4}),
            json!({"action": "put", "path": ["when"], "value": "1970-01-01T00:00:00.000Z"}),
            json!({"action": "put", "path": ["meta"], "value": {}}),
        ] {
            assert!(patches.contains(&want), "{want} not in {patches:?}");
        }
    }

    #[test]
    fn json_round_trips_through_a_document() {
        let value = json!({
            "title": "groceries",
            "n": -3, "big": u64::MAX, "pi": 1.5, "ok": true, "none": null,
            "items": ["milk", {"qty": 2}, [1, 2]],
            "nested": {"empty": {}, "list": []}
        });
        let mut doc = Automerge::new();
        doc.transact::<_, _, WriteError>(|tx| {
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

    fn put_at(doc: &mut Automerge, key: &str, value: Json) -> Result<(), WriteError> {
        let mut tx = doc.transaction();
        put_json(&mut tx, &ROOT, Prop::Map(key.into()), &value)?;
        tx.commit();
        Ok(())
    }

    #[test]
    fn typed_values_write_automerge_types_and_read_as_automerge_js_shows_them() {
        let mut doc = Automerge::new();
        put_at(
            &mut doc,
            "t",
            json!({"at": {"$timestamp": "2026-12-06T06:17:45.123+01:00"},
                   "ms": {"$timestamp": 0},
                   "likes": {"$counter": 5},
                   "raw": {"$bytes": "aGkh"},
                   "list": [{"$timestamp": 1000}],
                   "plain": {"$other": 1}}),
        )
        .unwrap();
        let t = doc.get(ROOT, "t").unwrap().unwrap().1;
        let scalar = |key: &str| match doc.get(&t, key).unwrap().unwrap().0 {
            Value::Scalar(s) => s.into_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(scalar("at"), ScalarValue::Timestamp(1_796_534_265_123));
        assert_eq!(scalar("likes"), ScalarValue::counter(5));
        assert_eq!(scalar("raw"), ScalarValue::Bytes(b"hi!".to_vec()));
        assert_eq!(
            object_to_json(&doc, &t).unwrap(),
            json!({"at": "2026-12-06T05:17:45.123Z", "ms": "1970-01-01T00:00:00.000Z",
                   "likes": 5, "raw": [104, 105, 33], "list": ["1970-01-01T00:00:01.000Z"],
                   "plain": {"$other": 1}})
        );
        // Bad typed values are refused, naming what was wrong.
        for bad in [
            json!({"$timestamp": "yesterday"}),
            json!({"$timestamp": true}),
            json!({"$counter": 1.5}),
            json!({"$bytes": "not base64!"}),
        ] {
            let e = put_at(&mut doc, "x", bad.clone()).unwrap_err();
            assert!(matches!(e, WriteError::BadValue(_)), "{bad}: {e}");
        }
        assert!(matches!(
            put_at(&mut doc, "t", json!({"$increment": 1})),
            Err(WriteError::NotCounter("an object"))
        ));
    }

    #[test]
    fn writing_back_what_was_read_keeps_types_and_changes_nothing() {
        let mut doc = Automerge::new();
        put_at(
            &mut doc,
            "d",
            json!({"at": {"$timestamp": 5}, "n": {"$counter": 1}, "b": {"$bytes": "AAE="},
                   "s": "text", "items": [1, {"k": "v"}]}),
        )
        .unwrap();
        let read = object_to_json(&doc, &ROOT).unwrap();
        let heads = doc.get_heads();
        put_at(&mut doc, "d", read["d"].clone()).unwrap();
        assert_eq!(
            doc.get_heads(),
            heads,
            "writing the same JSON back is no change"
        );
        // A read-modify-write: new time, counter to 4, one more item; types kept.
        let mut edited = read["d"].clone();
        edited["at"] = json!("2000-01-01T00:00:00.000Z");
        edited["n"] = json!(4);
        edited["items"] = json!([1, {"k": "w"}, 3]);
        put_at(&mut doc, "d", edited.clone()).unwrap();
        assert_eq!(object_to_json(&doc, &ROOT).unwrap()["d"], edited);
        let d = doc.get(ROOT, "d").unwrap().unwrap().1;
        let at = doc.get(&d, "at").unwrap().unwrap().0;
        assert!(
            matches!(at, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Timestamp(946_684_800_000)))
        );
        // The counter moved by an increment, so a concurrent one adds up.
        let mut other = doc.fork();
        put_at(&mut other, "d", json!({"$increment": 10}))
            .expect_err("d is an object, not a counter");
        let mut tx = other.transaction();
        put_json(
            &mut tx,
            &d,
            Prop::Map("n".into()),
            &json!({"$increment": 10}),
        )
        .unwrap();
        tx.commit();
        let mut edited2 = edited.clone();
        edited2["n"] = json!(6);
        put_at(&mut doc, "d", edited2).unwrap();
        doc.merge(&mut other).unwrap();
        assert_eq!(object_to_json(&doc, &d).unwrap()["n"], json!(16));
    }
}
