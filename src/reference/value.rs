//! Values in and out of the reference server: one CBOR item checked and decoded, and the plain
//! CBOR↔JSON mapping its JSON request bodies and JSON debug views use.

use bytes::Bytes;
use ciborium::Value;

/// Why a body is not one usable value.
#[derive(Debug, thiserror::Error)]
pub(super) enum ValueError {
    #[error("not valid CBOR: {0}")]
    Cbor(String),
    #[error("bytes left over after one CBOR item")]
    TrailingBytes,
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decodes exactly one CBOR item (ciborium's nesting limit of 256 applies).
pub(super) fn decode_cbor(bytes: &[u8]) -> Result<Value, ValueError> {
    let mut rest = bytes;
    let value: Value = ciborium::from_reader(&mut rest).map_err(|err| ValueError::Cbor(err.to_string()))?;
    if !rest.is_empty() {
        return Err(ValueError::TrailingBytes);
    }
    Ok(value)
}

/// Encodes a value; ciborium re-encodes with definite lengths and the shortest exact floats.
pub(super) fn encode_cbor(value: &Value) -> Bytes {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("a ciborium Value always encodes into a Vec");
    out.into()
}

/// Whether a request body is JSON (`application/json` or any `+json` type); else it is CBOR.
pub(super) fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| ct.contains("json"))
}

/// Decodes a request body as [`is_json`] says.
pub(super) fn decode_body(content_type: Option<&str>, body: &[u8]) -> Result<Value, ValueError> {
    if is_json(content_type) {
        Ok(json_to_cbor(serde_json::from_slice(body)?))
    } else {
        decode_cbor(body)
    }
}

/// JSON to CBOR, plainly: objects become text-keyed maps, numbers integers where they are.
fn json_to_cbor(json: serde_json::Value) -> Value {
    use serde_json::Value as Json;
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(b),
        Json::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Value::Integer(u.into()),
            (None, Some(i)) => Value::Integer(i.into()),
            (None, None) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Text(s),
        Json::Array(items) => Value::Array(items.into_iter().map(json_to_cbor).collect()),
        Json::Object(map) => {
            Value::Map(map.into_iter().map(|(k, v)| (Value::Text(k), json_to_cbor(v))).collect())
        }
    }
}

/// CBOR to JSON for the debug views (U1/U2 with a JSON `Accept`). Plain, not the export
/// mapping: byte strings become `{"type":"Buffer"}` objects, tags are dropped, maps with
/// non-text keys become `{"type":"Map","data":[[k,v],…]}`, non-finite floats become null.
pub(super) fn cbor_to_json(value: Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match value {
        Value::Integer(i) => integer_to_json(i128::from(i)),
        Value::Float(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
        Value::Bytes(b) => serde_json::json!({ "type": "Buffer", "data": b }),
        Value::Text(s) => Json::String(s),
        Value::Bool(b) => Json::Bool(b),
        Value::Tag(_, inner) => cbor_to_json(*inner),
        Value::Array(items) => Json::Array(items.into_iter().map(cbor_to_json).collect()),
        Value::Map(entries) => map_to_json(entries),
        _ => Json::Null,
    }
}

/// A JSON number when it fits one, else the decimal digits as a string.
fn integer_to_json(i: i128) -> serde_json::Value {
    if let Ok(small) = i64::try_from(i) {
        small.into()
    } else if let Ok(large) = u64::try_from(i) {
        large.into()
    } else {
        i.to_string().into()
    }
}

fn map_to_json(entries: Vec<(Value, Value)>) -> serde_json::Value {
    if entries.iter().all(|(k, _)| k.is_text()) {
        let object = entries.into_iter().filter_map(|(k, v)| match k {
            Value::Text(k) => Some((k, cbor_to_json(v))),
            _ => None,
        });
        serde_json::Value::Object(object.collect())
    } else {
        let pairs = entries.into_iter().map(|(k, v)| serde_json::json!([cbor_to_json(k), cbor_to_json(v)]));
        serde_json::json!({ "type": "Map", "data": pairs.collect::<Vec<_>>() })
    }
}
