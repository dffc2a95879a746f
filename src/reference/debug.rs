//! Diagnostic endpoints for the pass-through tests: `/debug/echo…` describes the request it got,
//! `/debug/status/{code}` answers any status, `/debug/bytes/{n}` streams n patterned bytes.

use std::io;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use sha2::{Digest, Sha256};

use super::routes::{json_response, RouteError};

/// `/debug/bytes` sends its body in pieces of this size, never the whole body at once.
const CHUNK: u64 = 64 * 1024;

/// The byte at `offset` of every `/debug/bytes` body, so a test can check what arrived
/// without keeping a copy: `offset % 251` (a prime, so the pattern does not align with chunks).
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// Describes the request: method, raw path, query, headers, body length and sha256. The body is
/// hashed as it arrives, so large uploads are not buffered.
pub(super) async fn echo(parts: &Parts, body: Body) -> Result<Response, RouteError> {
    let mut hasher = Sha256::new();
    let mut body_len: u64 = 0;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|err| RouteError::BadRequest(format!("reading the body: {err}")))?;
        body_len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values = parts.headers.get_all(name).iter();
        let values = values.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        headers.insert(name.as_str().to_owned(), values.collect::<Vec<_>>().into());
    }
    let description = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": body_len,
        "body_sha256": format!("{:x}", hasher.finalize()),
    });
    Ok(json_response(StatusCode::OK, &description))
}

/// Answers with the requested final status (200–999) and a small JSON body where one is allowed.
pub(super) fn status(code: &str) -> Result<Response, RouteError> {
    let status = code
        .parse::<u16>()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|status| !status.is_informational())
        .ok_or_else(|| RouteError::BadRequest(format!("{code:?} is not a final HTTP status")))?;
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(status.into_response());
    }
    Ok(json_response(status, &serde_json::json!({ "status": status.as_u16() })))
}

/// Streams `n` bytes of [`pattern_byte`] in chunks, with a `Content-Length`.
pub(super) fn bytes(n: &str) -> Result<Response, RouteError> {
    let total: u64 = n.parse().map_err(|_| RouteError::BadRequest(format!("{n:?} is not a byte count")))?;
    let chunks = stream::unfold(0u64, move |offset| async move {
        if offset >= total {
            return None;
        }
        let end = total.min(offset + CHUNK);
        let chunk: Bytes = (offset..end).map(pattern_byte).collect::<Vec<u8>>().into();
        Some((Ok::<_, io::Error>(chunk), end))
    });
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::CONTENT_LENGTH, total.to_string()),
    ];
    Ok((headers, Body::from_stream(chunks)).into_response())
}
