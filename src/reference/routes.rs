//! HTTP for the reference server: one fallback handler splits and percent-decodes the raw path
//! itself, so record IDs such as `a/b` (`%2F`), `.` (`%2E`) or `100%` reach the store exactly.

use std::borrow::Cow;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use ciborium::Value;
use percent_encoding::percent_decode_str;

use super::fault::{self, RecordFault};
use super::store::{attachment_link, CollectionId, Edit, LoggedRequest, Store};
use super::{debug, value, StopSignal};

/// Larger write bodies are refused; the reference server keeps everything in memory.
const MAX_WRITE_BODY: usize = 64 << 20;
/// Larger attachments are refused, for the same reason.
const MAX_ATTACHMENT: usize = 256 << 20;
const CBOR: &str = "application/cbor";
const JSON: &str = "application/json";
const X_VERSION: HeaderName = HeaderName::from_static("x-version");

/// What every request needs: the data, and the stop signal that ends hanging fault bodies.
#[derive(Clone)]
struct App {
    /// The data every route reads and writes.
    store: Store,
    /// Ends hanging fault bodies and delayed answers when the server stops.
    stop: StopSignal,
}

/// The whole HTTP surface: a router with nothing but a fallback, so axum never matches (or
/// rewrites) paths and this module sees every request's path as it arrived.
pub(super) fn router(store: Store, stop: StopSignal) -> Router {
    Router::new().fallback(handle).with_state(App { store, stop })
}

async fn handle(State(app): State<App>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    app.store.log_request(LoggedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
    });
    route(&app, &parts, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn route(app: &App, parts: &Parts, body: Body) -> Result<Response, RouteError> {
    if parts.uri.path().starts_with("/debug/echo") {
        return debug::echo(parts, body).await;
    }
    let segments = decode_segments(parts.uri.path())?;
    let segments: Vec<&str> = segments.iter().map(|segment| segment.as_ref()).collect();
    match segments.as_slice() {
        ["attachments"] => {
            allow(parts, &[Method::POST])?;
            add_attachment(app, parts, body).await
        }
        ["attachments", hex] => {
            allow(parts, &[Method::GET, Method::HEAD])?;
            attachment(app, hex)
        }
        ["debug", "status", code] => debug::status(code),
        ["debug", "bytes", n] => {
            allow(parts, &[Method::GET, Method::HEAD])?;
            debug::bytes(n)
        }
        [realm, collection, rest @ ..] => {
            let c = parse_collection(realm, collection)?;
            authorize(&app.store, &c, &parts.headers)?;
            collection_route(app, parts, body, &c, rest).await
        }
        _ => Err(RouteError::NotFound("no such path".into())),
    }
}

/// Everything under `/{realm}/{user}:{name}/`; access has been checked.
async fn collection_route(
    app: &App,
    parts: &Parts,
    body: Body,
    c: &CollectionId,
    rest: &[&str],
) -> Result<Response, RouteError> {
    let method = &parts.method;
    match rest {
        ["records", ""] => match *method {
            Method::GET | Method::HEAD => {
                if let Some(delay) = app.store.listing_delay(c) {
                    wait_unless_stopping(delay, &app.stop).await?;
                }
                match app.store.listing_fault(c) {
                    Some(fault) => faulty_listing(app, c, fault).await,
                    None => listing(&app.store, c, &parts.headers),
                }
            }
            Method::POST => write_map(&app.store, c, parts, body, false).await,
            Method::PUT => write_map(&app.store, c, parts, body, true).await,
            _ => Err(RouteError::MethodNotAllowed(method.clone())),
        },
        ["records", id] => match *method {
            Method::GET | Method::HEAD => record(app, c, id, &parts.headers).await,
            Method::PUT => put_record(&app.store, c, id, parts, body).await,
            Method::DELETE => {
                let version = app.store.delete_record(c, id).ok_or_else(|| no_record(c, id))?;
                Ok(version_response(version))
            }
            _ => Err(RouteError::MethodNotAllowed(method.clone())),
        },
        [""] if *method == Method::DELETE => match app.store.delete_collection(c) {
            true => Ok(StatusCode::NO_CONTENT.into_response()),
            false => Err(no_collection(c)),
        },
        [""] => Err(RouteError::MethodNotAllowed(method.clone())),
        _ => Err(RouteError::NotFound(format!("no such path under {c}"))),
    }
}

/// U1: recordID → `{"version": n}`, with `X-Version` and an `ETag` honoured by `If-None-Match`.
fn listing(store: &Store, c: &CollectionId, headers: &HeaderMap) -> Result<Response, RouteError> {
    let (version, records) = store.listing(c).ok_or_else(|| no_collection(c))?;
    let etag = format!("\"{version}\"");
    let head = [(header::ETAG, etag.clone()), (X_VERSION, version.to_string())];
    if etag_matches(headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, head).into_response());
    }
    Ok((head, negotiated(headers, listing_value(records))).into_response())
}

/// The listing body: recordID → `{"version": n}`.
fn listing_value(records: Vec<(String, u64)>) -> Value {
    let version_of = |v: u64| Value::Map(vec![(Value::Text("version".into()), v.into())]);
    Value::Map(records.into_iter().map(|(id, v)| (Value::Text(id), version_of(v))).collect())
}

/// U1 as an injected fault makes it: an error status, other bytes, or a CBOR listing that
/// stops or breaks half-way (always CBOR, so the broken half is the listing's own bytes).
async fn faulty_listing(app: &App, c: &CollectionId, fault: RecordFault) -> Result<Response, RouteError> {
    let (version, records) = app.store.listing(c).ok_or_else(|| no_collection(c))?;
    let bytes = match &fault {
        RecordFault::Status(code) => return Ok(injected_status(*code)),
        RecordFault::Delay(delay) => {
            wait_unless_stopping(*delay, &app.stop).await?;
            value::encode_cbor(&listing_value(records))
        }
        RecordFault::Body(bytes) => bytes.clone(),
        RecordFault::HangAfterHead | RecordFault::ResetMidBody => value::encode_cbor(&listing_value(records)),
    };
    let head = [(header::CONTENT_TYPE, CBOR.to_owned()), (X_VERSION, version.to_string())];
    let length = [(header::CONTENT_LENGTH, bytes.len().to_string())];
    match fault::broken_body(&fault, bytes.clone(), app.stop.clone()) {
        Some(broken) => Ok((head, length, broken).into_response()),
        None => Ok((head, bytes).into_response()),
    }
}

/// U2: the stored bytes verbatim as CBOR (or a JSON view), with the record's `X-Version`;
/// an injected fault for the record changes the answer.
async fn record(app: &App, c: &CollectionId, id: &str, headers: &HeaderMap) -> Result<Response, RouteError> {
    if let Some(capacity) = app.store.capacity() {
        if !capacity.serve(&app.stop).await {
            return Err(RouteError::Stopping);
        }
    }
    let fault = app.store.fault(c, id);
    match fault {
        Some(RecordFault::Status(code)) => return Ok(injected_status(code)),
        Some(RecordFault::Delay(delay)) => wait_unless_stopping(delay, &app.stop).await?,
        _ => {}
    }
    let (version, stored) = app.store.record(c, id).ok_or_else(|| no_record(c, id))?;
    let stored = match &fault {
        Some(RecordFault::Body(bytes)) => bytes.clone(),
        _ => stored,
    };
    let (content_type, bytes) = if wants_cbor(headers) {
        (CBOR, stored)
    } else {
        let value = value::decode_cbor(&stored).map_err(|err| {
            RouteError::Internal(format!("record {id:?} of {c} holds malformed CBOR: {err}"))
        })?;
        (JSON, json_bytes(&value::cbor_to_json(value)))
    };
    let head = [(header::CONTENT_TYPE, content_type.to_owned()), (X_VERSION, version.to_string())];
    let length = [(header::CONTENT_LENGTH, bytes.len().to_string())];
    match fault.and_then(|fault| fault::broken_body(&fault, bytes.clone(), app.stop.clone())) {
        Some(broken) => Ok((head, length, broken).into_response()),
        None => Ok((head, bytes).into_response()),
    }
}

/// `POST` (merge) or `PUT` (replace) of `.../records/`: a map recordID → value, null deletes.
/// Values are stored re-encoded by ciborium (a single-record `PUT` keeps the bytes verbatim).
async fn write_map(
    store: &Store,
    c: &CollectionId,
    parts: &Parts,
    body: Body,
    replace: bool,
) -> Result<Response, RouteError> {
    let body = read_body(body, MAX_WRITE_BODY).await?;
    let value = value::decode_body(content_type(parts), &body).map_err(bad_value)?;
    let Value::Map(entries) = value else {
        return Err(RouteError::BadRequest("the body must be a map of recordID → value".into()));
    };
    let changes: Vec<(String, Option<Bytes>)> = entries.into_iter().map(change).collect::<Result<_, _>>()?;
    let edit = if replace {
        Edit::Replace(changes.into_iter().filter_map(|(id, v)| Some((id, v?))).collect())
    } else {
        Edit::Merge(changes)
    };
    Ok(version_response(store.apply(c, edit)))
}

/// One entry of a bulk write: a non-empty text ID and the value to store (`None` deletes).
fn change((key, value): (Value, Value)) -> Result<(String, Option<Bytes>), RouteError> {
    match key {
        Value::Text(id) if !id.is_empty() => Ok((id, (!value.is_null()).then(|| value::encode_cbor(&value)))),
        Value::Text(_) => Err(RouteError::BadRequest(
            "an empty record ID cannot be stored: its URL would be the listing's".into(),
        )),
        _ => Err(RouteError::BadRequest("record IDs must be text".into())),
    }
}

/// `PUT .../records/{id}`: one value; null or undefined deletes.
async fn put_record(
    store: &Store,
    c: &CollectionId,
    id: &str,
    parts: &Parts,
    body: Body,
) -> Result<Response, RouteError> {
    let body = read_body(body, MAX_WRITE_BODY).await?;
    let content_type = content_type(parts);
    let value = value::decode_body(content_type, &body).map_err(bad_value)?;
    let stored = if value.is_null() {
        None
    } else if value::is_json(content_type) {
        Some(value::encode_cbor(&value))
    } else {
        Some(body)
    };
    Ok(version_response(store.apply(c, Edit::Merge(vec![(id.to_owned(), stored)]))))
}

/// `POST /attachments`: stores any body under its sha256 with the request's content type.
async fn add_attachment(app: &App, parts: &Parts, body: Body) -> Result<Response, RouteError> {
    let body = read_body(body, MAX_ATTACHMENT).await?;
    let content_type = content_type(parts).unwrap_or("application/octet-stream");
    let hash = app.store.add_attachment(body, content_type);
    let link = attachment_link(&hash, content_type);
    Ok(json_response(StatusCode::CREATED, &serde_json::json!({ "hash": hash, "link": link })))
}

/// U3: an attachment's bytes with its stored content type.
fn attachment(app: &App, hex: &str) -> Result<Response, RouteError> {
    let found = app.store.attachment(hex);
    let found = found.ok_or_else(|| RouteError::NotFound(format!("no attachment {hex}")))?;
    Ok(([(header::CONTENT_TYPE, found.content_type)], found.bytes).into_response())
}

/// Checks a protected collection's token: none presented is 401, a wrong one 403.
fn authorize(store: &Store, c: &CollectionId, headers: &HeaderMap) -> Result<(), RouteError> {
    let Some(expected) = store.token(c) else {
        return Ok(());
    };
    let presented = presented_tokens(headers);
    if presented.is_empty() {
        Err(RouteError::Unauthorized)
    } else if presented.contains(&expected.as_str()) {
        Ok(())
    } else {
        Err(RouteError::Forbidden)
    }
}

/// Tokens from `Authorization: Bearer …` and from `session=…` cookies.
fn presented_tokens(headers: &HeaderMap) -> Vec<&str> {
    let texts = |name| headers.get_all(name).into_iter().filter_map(|v| v.to_str().ok());
    let bearer = texts(header::AUTHORIZATION)
        .filter_map(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let cookies = texts(header::COOKIE)
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix("session="));
    bearer.chain(cookies).collect()
}

/// `{realm}` and `{user}:{name}` (split at the first `:`) as a collection; 404 otherwise.
fn parse_collection(realm: &str, collection: &str) -> Result<CollectionId, RouteError> {
    let known_realm = realm == "datasets" || realm == "lenses";
    match collection.split_once(':') {
        Some((user, name)) if known_realm && !user.is_empty() && !name.is_empty() => {
            Ok(CollectionId::new(realm, user, name))
        }
        _ => Err(RouteError::NotFound("no such path".into())),
    }
}

/// The path's segments, each percent-decoded on its own, so `%2F` stays inside its segment.
fn decode_segments(path: &str) -> Result<Vec<Cow<'_, str>>, RouteError> {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split('/').map(decode_segment).collect()
}

fn decode_segment(segment: &str) -> Result<Cow<'_, str>, RouteError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| RouteError::BadRequest(format!("path segment {segment:?} is not UTF-8 once decoded")))
}

fn allow(parts: &Parts, methods: &[Method]) -> Result<(), RouteError> {
    match methods.contains(&parts.method) {
        true => Ok(()),
        false => Err(RouteError::MethodNotAllowed(parts.method.clone())),
    }
}

/// A `Status` fault's answer; an out-of-range code becomes 500.
fn injected_status(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = format!("injected fault: status {code}");
    json_response(status, &serde_json::json!({ "error": "injected", "message": message }))
}

/// A `Delay` fault's wait, cut short when the server stops.
async fn wait_unless_stopping(delay: Duration, stop: &StopSignal) -> Result<(), RouteError> {
    tokio::select! {
        () = tokio::time::sleep(delay) => Ok(()),
        () = stop.clone().wait() => Err(RouteError::Stopping),
    }
}

fn etag_matches(headers: &HeaderMap, etag: &str) -> bool {
    let tags = headers.get_all(header::IF_NONE_MATCH).into_iter().filter_map(|v| v.to_str().ok());
    let mut tags = tags.flat_map(|v| v.split(',')).map(str::trim);
    tags.any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

fn wants_cbor(headers: &HeaderMap) -> bool {
    let mut accept = headers.get_all(header::ACCEPT).into_iter().filter_map(|v| v.to_str().ok());
    accept.any(|v| v.contains(CBOR))
}

/// A value as CBOR or JSON, whichever `Accept` asks for (JSON unless CBOR is named).
fn negotiated(headers: &HeaderMap, value: Value) -> Response {
    if wants_cbor(headers) {
        ([(header::CONTENT_TYPE, CBOR)], value::encode_cbor(&value)).into_response()
    } else {
        json_response(StatusCode::OK, &value::cbor_to_json(value))
    }
}

fn version_response(version: u64) -> Response {
    json_response(StatusCode::OK, &serde_json::json!({ "version": version }))
}

/// A JSON response; every JSON body of the reference server goes through here.
pub(super) fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, JSON)], json_bytes(body)).into_response()
}

fn json_bytes(body: &serde_json::Value) -> Bytes {
    serde_json::to_vec(body).expect("a serde_json::Value always serializes").into()
}

fn content_type(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, RouteError> {
    let read = axum::body::to_bytes(body, limit).await;
    read.map_err(|err| RouteError::BadRequest(format!("reading the body: {err}")))
}

fn bad_value(err: value::ValueError) -> RouteError {
    RouteError::BadRequest(err.to_string())
}

fn no_collection(c: &CollectionId) -> RouteError {
    RouteError::NotFound(format!("no collection {c}"))
}

fn no_record(c: &CollectionId, id: &str) -> RouteError {
    RouteError::NotFound(format!("no record {id:?} in {c}"))
}

/// Every way a request fails, turned into a status and a JSON body in one place.
#[derive(Debug, thiserror::Error)]
pub(super) enum RouteError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("this collection needs `Authorization: Bearer <token>` or a `session` cookie")]
    Unauthorized,
    #[error("the token given does not open this collection")]
    Forbidden,
    #[error("{0} is not allowed on this path")]
    MethodNotAllowed(Method),
    #[error("{0}")]
    Internal(String),
    #[error("the server is stopping")]
    Stopping,
}

impl RouteError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            RouteError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            RouteError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            RouteError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            RouteError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            RouteError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            RouteError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            RouteError::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        }
    }
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({ "error": code, "message": self.to_string() });
        let mut response = json_response(status, &body);
        if matches!(self, RouteError::Unauthorized) {
            let challenge = HeaderValue::from_static("Bearer");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}
