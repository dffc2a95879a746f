//! The dataset-server client: the listing (U1), one record (U2), one attachment (U3).
//! One pooled HTTP client; the caller's credentials are forwarded on every request.

use crate::collection::Collection;
use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::metrics;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod listing;
pub use listing::parse_listing;

const CBOR: &str = "application/cbor";

/// The caller's credentials, forwarded untouched so the dataset server alone decides access.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub authorization: Option<HeaderValue>,
    pub cookie: Option<HeaderValue>,
}

impl Credentials {
    pub fn from_headers(headers: &HeaderMap) -> Credentials {
        Credentials {
            authorization: headers.get(http::header::AUTHORIZATION).cloned(),
            cookie: joined_cookies(headers),
        }
    }

    fn apply(&self, headers: &mut HeaderMap) {
        if let Some(value) = &self.authorization {
            headers.insert(http::header::AUTHORIZATION, value.clone());
        }
        if let Some(value) = &self.cookie {
            headers.insert(http::header::COOKIE, value.clone());
        }
    }
}

/// Every `Cookie` line of the request as one header (RFC 6265 §5.4): HTTP/2 front ends split
/// cookies into several lines, and the session cookie may be in any of them.
fn joined_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = headers.get_all(http::header::COOKIE).iter();
    let first = lines.next()?;
    let mut joined = first.as_bytes().to_vec();
    for line in lines {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// One record as the listing names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListingEntry {
    pub id: String,
    /// The record's version, as text (an integer version is written in decimal).
    pub version: String,
}

/// A record as U2 sent it.
#[derive(Clone, Debug)]
pub struct Record {
    /// One CBOR item, not yet validated.
    pub value: Bytes,
    /// The record's version, when the server sends it (`X-Version`).
    pub version: Option<String>,
}

/// A collection's listing: its version and its records in recordID byte order.
#[derive(Clone, Debug)]
pub struct Listing {
    pub version: String,
    pub entries: Vec<ListingEntry>,
    /// U1's `ETag`, if it sent one: a later poll sends it back so an unchanged collection
    /// costs a 304.
    pub etag: Option<String>,
}

/// Why the upstream could not answer; each becomes a client-facing status in one place.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No answer: the connection could not be made, or broke before a response head.
    #[error("the connection to the dataset server failed: {0}")]
    Connect(String),
    #[error("the dataset server did not answer within {}", .0.setting())]
    Timeout(Deadline),
    #[error("the dataset server answered {status}")]
    Status { status: StatusCode, www_authenticate: Option<String> },
    #[error("the dataset server sent an unusable answer: {0}")]
    Protocol(String),
    /// A record over `upstream.max_record_bytes`: refused rather than held in memory.
    #[error("the record is larger than upstream.max_record_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
}

/// Which configured wait ran out, so the log and the metrics name the setting to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// The TCP connection was not made in time.
    Connect,
    /// The connection was made but the response head did not come in time.
    FirstByte,
    /// The body stopped arriving.
    Idle,
}

impl Deadline {
    fn setting(self) -> &'static str {
        match self {
            Deadline::Connect => "upstream.connect_timeout_ms",
            Deadline::FirstByte => "upstream.first_byte_timeout_ms",
            Deadline::Idle => "upstream.idle_timeout_ms",
        }
    }
}

impl UpstreamError {
    /// A request that got no response head failed on its connection (refused, reset, or a
    /// pooled keep-alive connection the server had closed), whatever hyper calls it; the
    /// connector reports its own timeout as an `io::Error` somewhere in the chain.
    fn from_client(e: hyper_util::client::legacy::Error) -> UpstreamError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        while let Some(cause) = source {
            if cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                return UpstreamError::Timeout(Deadline::Connect);
            }
            source = cause.source();
        }
        UpstreamError::Connect(error_chain(&e))
    }

    /// The `kind` label of `upstream_errors_total`.
    fn metric_kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout(Deadline::Connect) => "connect_timeout",
            UpstreamError::Timeout(Deadline::FirstByte) => "first_byte_timeout",
            UpstreamError::Timeout(Deadline::Idle) => "idle_timeout",
            UpstreamError::Status { .. } => "status",
            UpstreamError::Protocol(_) => "protocol",
            UpstreamError::TooLarge { .. } => "too_large",
        }
    }

    /// Worth one more try at the record level: the server failed, not the request. Connection
    /// failures were already retried by `get`; a timeout is not retried, which would double
    /// the longest wait the operator configured.
    fn is_transient(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if status.is_server_error())
    }

    /// The dataset server said no (401, 403, 404): the client's business, not a fault.
    pub fn is_refusal(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if matches!(status.as_u16(), 401 | 403 | 404))
    }

    /// The answer a client gets when this happens before the response head.
    pub fn to_api_error(&self, what: &str) -> ApiError {
        match self {
            UpstreamError::Status { status, www_authenticate } => {
                let (code, advice) = match status.as_u16() {
                    401 => ("unauthorized", "send credentials the dataset server accepts"),
                    403 => ("forbidden", "these credentials may not read it"),
                    404 => ("not_found", "check the realm, user and name"),
                    _ => ("upstream_error", "try again later"),
                };
                let client_status = match status.as_u16() {
                    s @ (401 | 403 | 404) => s,
                    _ => 502,
                };
                let e = ApiError::new(
                    client_status,
                    code,
                    format!("the dataset server answered {status} for {what}: {advice}"),
                );
                match www_authenticate {
                    Some(value) => e.with_header("www-authenticate", value.clone()),
                    None => e,
                }
            }
            UpstreamError::Timeout(_) => ApiError::new(
                504,
                "upstream_timeout",
                format!("the dataset server did not answer in time for {what}; try again later"),
            ),
            UpstreamError::TooLarge { limit } => ApiError::new(
                502,
                "record_too_large",
                format!("{what} holds a record larger than the sidecar's limit of {limit} bytes"),
            ),
            UpstreamError::Connect(_) => ApiError::new(
                502,
                "upstream_unavailable",
                format!("the dataset server cannot be reached for {what}; try again later"),
            ),
            UpstreamError::Protocol(detail) => ApiError::new(
                502,
                "upstream_invalid",
                format!("the dataset server sent an unusable answer for {what}: {detail}"),
            ),
        }
    }
}

/// The client's top-level message hides the cause ("client error (Connect)"); operators need it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A pooled client. Cheap to clone; clones share its connection pool, whose connections are
/// driven on the runtime that opened them.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Empty<Bytes>>,
    /// `http://host:port`, prefixed to every path.
    base: Arc<str>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    /// The largest record body read; see `upstream.max_record_bytes`.
    max_record_bytes: usize,
}

/// A response whose head has arrived; its body is read with the idle timeout.
struct Answer {
    head: http::response::Parts,
    body: Incoming,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, crate::config::ConfigError> {
        let target = config.target()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout()));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.concurrency * 2)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Upstream {
            client,
            base: Arc::from(target.base),
            first_byte_timeout: config.first_byte_timeout(),
            idle_timeout: config.idle_timeout(),
            max_record_bytes: config.max_record_bytes,
        })
    }

    /// Sends a GET for `path` (already escaped) and waits for the response head;
    /// `request_kind` names it in the latency metric.
    async fn get(
        &self,
        request_kind: &'static str,
        path: &str,
        credentials: &Credentials,
        extra: HeaderMap,
    ) -> Result<Answer, UpstreamError> {
        let uri: http::Uri = format!("{}{}", self.base, path)
            .parse()
            .map_err(|e| UpstreamError::Protocol(format!("cannot build the URL of {path}: {e}")))?;
        let build = || {
            let mut request = http::Request::new(Empty::new());
            *request.uri_mut() = uri.clone();
            let headers = request.headers_mut();
            headers.insert(http::header::ACCEPT, HeaderValue::from_static(CBOR));
            headers.extend(extra.iter().map(|(name, value)| (name.clone(), value.clone())));
            credentials.apply(headers);
            request
        };
        let started = Instant::now();
        // A connection that breaks before any answer is tried once more: after the dataset
        // server restarts, the pool's first connections are stale.
        let response = match self.send(build()).await {
            Err(UpstreamError::Connect(_)) => self.send(build()).await?,
            other => other?,
        };
        metrics::get()
            .upstream_latency
            .with_label_values(&[request_kind])
            .observe(started.elapsed().as_secs_f64());
        let (head, body) = response.into_parts();
        Ok(Answer { head, body })
    }

    /// One attempt, bounded by the first-byte timeout; the connector bounds the connect
    /// inside it by the (usually shorter) connect timeout.
    async fn send(
        &self,
        request: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<Incoming>, UpstreamError> {
        tokio::time::timeout(self.first_byte_timeout, self.client.request(request))
            .await
            .map_err(|_| UpstreamError::Timeout(Deadline::FirstByte))?
            .map_err(UpstreamError::from_client)
    }

    /// Reads a whole body, allowing at most the idle timeout between frames and at most
    /// `limit` bytes in all (a listing has no limit: its size is the collection's).
    async fn read_body(&self, mut body: Incoming, limit: Option<usize>) -> Result<Bytes, UpstreamError> {
        // Copied into an allocation of its own: a frame shares hyper's read buffer, which a
        // cached value would otherwise keep alive.
        let mut collected = BytesMut::new();
        loop {
            let frame = tokio::time::timeout(self.idle_timeout, body.frame())
                .await
                .map_err(|_| UpstreamError::Timeout(Deadline::Idle))?;
            let data = match frame {
                None => return Ok(collected.freeze()),
                Some(Err(e)) => return Err(UpstreamError::Protocol(error_chain(&e))),
                Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
            };
            if let Some(limit) = limit.filter(|limit| collected.len() + data.len() > *limit) {
                return Err(UpstreamError::TooLarge { limit });
            }
            collected.extend_from_slice(&data);
        }
    }

    /// U1: the listing, sorted by recordID. 401/403/404 come back as `Status`.
    pub async fn listing(
        &self,
        collection: &Collection,
        credentials: &Credentials,
    ) -> Result<Listing, UpstreamError> {
        self.listing_if_changed(collection, credentials, None)
            .await?
            .ok_or_else(|| UpstreamError::Protocol("a 304 answered an unconditional listing".into()))
    }

    /// U1 with `If-None-Match: etag`: `None` when the server says the listing is unchanged.
    pub async fn listing_if_changed(
        &self,
        collection: &Collection,
        credentials: &Credentials,
        etag: Option<&str>,
    ) -> Result<Option<Listing>, UpstreamError> {
        counted("listing", self.read_listing(collection, credentials, etag).await)
    }

    async fn read_listing(
        &self,
        collection: &Collection,
        credentials: &Credentials,
        etag: Option<&str>,
    ) -> Result<Option<Listing>, UpstreamError> {
        let mut extra = HeaderMap::new();
        if let Some(value) = etag.and_then(|e| HeaderValue::from_str(e).ok()) {
            extra.insert(http::header::IF_NONE_MATCH, value);
        }
        let answer = self.get("listing", &collection.listing_path(), credentials, extra).await?;
        if answer.head.status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let answer = check_status(answer)?;
        let version = header_text(&answer.head.headers, "x-version").ok_or_else(|| {
            UpstreamError::Protocol("the listing has no X-Version header, or one that is not ASCII".into())
        })?;
        let is_json = header_text(&answer.head.headers, "content-type")
            .is_some_and(|t| t.starts_with("application/json"));
        let etag = header_text(&answer.head.headers, "etag");
        let body = self.read_body(answer.body, None).await?;
        let entries = parse_listing(&body, is_json)?;
        Ok(Some(Listing { version, entries, etag }))
    }

    /// U2: one record, or `None` when the record is gone (404).
    /// A 5xx is tried once more: one bad moment of the server should not abort a long export.
    pub async fn record(
        &self,
        collection: &Collection,
        id: &str,
        credentials: &Credentials,
    ) -> Result<Option<Record>, UpstreamError> {
        match self.record_once(collection, id, credentials).await {
            Err(e) if e.is_transient() => self.record_once(collection, id, credentials).await,
            other => other,
        }
    }

    async fn record_once(
        &self,
        collection: &Collection,
        id: &str,
        credentials: &Credentials,
    ) -> Result<Option<Record>, UpstreamError> {
        counted("record", self.read_record(collection, id, credentials).await)
    }

    async fn read_record(
        &self,
        collection: &Collection,
        id: &str,
        credentials: &Credentials,
    ) -> Result<Option<Record>, UpstreamError> {
        let answer = self.get("record", &collection.record_path(id), credentials, HeaderMap::new()).await?;
        if answer.head.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let answer = check_status(answer)?;
        let limit = self.max_record_bytes;
        // A declared length over the limit fails before any of the body is read.
        if content_length(&answer.head.headers).is_some_and(|length| length > limit as u64) {
            return Err(UpstreamError::TooLarge { limit });
        }
        let version = header_text(&answer.head.headers, "x-version");
        let value = self.read_body(answer.body, Some(limit)).await?;
        Ok(Some(Record { value, version }))
    }

    /// U3: one attachment as a stream, or `None` when the dataset server has no such blob (404).
    /// Not retried here: a retry must restart the whole download, which only the caller can do.
    pub async fn attachment(
        &self,
        hex: &str,
        credentials: &Credentials,
    ) -> Result<Option<AttachmentBody>, UpstreamError> {
        counted("attachment", self.open_attachment(hex, credentials).await)
    }

    async fn open_attachment(
        &self,
        hex: &str,
        credentials: &Credentials,
    ) -> Result<Option<AttachmentBody>, UpstreamError> {
        let mut extra = HeaderMap::new();
        extra.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        let answer = self.get("attachment", &format!("/attachments/{hex}"), credentials, extra).await?;
        if answer.head.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let answer = check_status(answer)?;
        let content_type = header_text(&answer.head.headers, "content-type");
        Ok(Some(AttachmentBody { content_type, body: answer.body, idle_timeout: self.idle_timeout }))
    }
}

/// An attachment's body as it arrives: blobs can be far larger than memory, so it is handed
/// out piece by piece instead of collected.
pub struct AttachmentBody {
    /// U3's `Content-Type`, which tells whether the blob is worth compressing.
    pub content_type: Option<String>,
    body: Incoming,
    idle_timeout: Duration,
}

impl AttachmentBody {
    /// The next piece of the body, `None` at its end; at most the idle timeout passes between pieces.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        counted("attachment", self.next_data().await)
    }

    async fn next_data(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let frame = tokio::time::timeout(self.idle_timeout, self.body.frame())
                .await
                .map_err(|_| UpstreamError::Timeout(Deadline::Idle))?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(UpstreamError::Protocol(error_chain(&e))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// A bodiless GET can be sent again as it was.
/// Counts a failed request in `upstream_errors_total`; refusals (401, 403, 404) are the
/// client's business, not a fault of the dataset server.
fn counted<T>(request: &'static str, result: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
    if let Err(e) = &result {
        if !e.is_refusal() {
            metrics::get().upstream_errors.with_label_values(&[request, e.metric_kind()]).inc();
        }
    }
    result
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn check_status(answer: Answer) -> Result<Answer, UpstreamError> {
    let status = answer.head.status;
    if status.is_success() {
        return Ok(answer);
    }
    let www_authenticate = header_text(&answer.head.headers, "www-authenticate");
    Err(UpstreamError::Status { status, www_authenticate })
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_lines_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append(http::header::COOKIE, HeaderValue::from_static("x=1"));
        headers.append(http::header::COOKIE, HeaderValue::from_static("session=t"));
        let credentials = Credentials::from_headers(&headers);
        assert_eq!(credentials.cookie, Some(HeaderValue::from_static("x=1; session=t")));
    }
}

#[cfg(test)]
mod connection_tests {
    use super::*;
    use crate::collection::Realm;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Reads one request head; false if the peer closed first.
    async fn read_head(socket: &mut tokio::net::TcpStream) -> bool {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    const LISTING: &[u8] =
        b"HTTP/1.1 200 OK\r\nX-Version: 1\r\nContent-Type: application/cbor\r\nContent-Length: 1\r\n\r\n\xa0";

    /// A server that answers once per connection, then drops the connection on its next
    /// request unanswered: what a pooled keep-alive connection looks like after the dataset
    /// server restarted.
    async fn forgetful_server() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if read_head(&mut socket).await && socket.write_all(LISTING).await.is_ok() {
                        read_head(&mut socket).await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_stale_pooled_connection_is_retried_on_a_fresh_one() {
        let addr = forgetful_server().await;
        let config = UpstreamConfig { url: format!("http://{addr}"), ..UpstreamConfig::default() };
        let upstream = Upstream::new(&config).expect("client");
        let collection = Collection { realm: Realm::Datasets, user: "u".into(), name: "n".into() };
        let credentials = Credentials::default();
        for attempt in 0..3 {
            let listing = upstream.listing(&collection, &credentials).await;
            assert!(listing.is_ok(), "listing {attempt}: {:?}", listing.err());
        }
    }

    /// A server that answers every request on its connection with `answer`, then keeps the
    /// connection open (`None`: reads the request and never answers).
    async fn scripted_server(answer: Option<&'static [u8]>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    while read_head(&mut socket).await {
                        if let Some(answer) = answer {
                            let _ = socket.write_all(answer).await;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn fetch_record(
        addr: std::net::SocketAddr,
        config: UpstreamConfig,
    ) -> Result<Option<Bytes>, UpstreamError> {
        let config = UpstreamConfig { url: format!("http://{addr}"), ..config };
        let upstream = Upstream::new(&config).expect("client");
        let collection = Collection { realm: Realm::Datasets, user: "u".into(), name: "n".into() };
        upstream.record(&collection, "r", &Credentials::default()).await.map(|r| r.map(|r| r.value))
    }

    #[tokio::test]
    async fn records_over_the_limit_fail_whether_declared_or_streamed() {
        let declared = scripted_server(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n123456789")).await;
        let streamed = scripted_server(Some(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n4\r\n6789\r\n0\r\n\r\n",
        ))
        .await;
        for addr in [declared, streamed] {
            let small = UpstreamConfig { max_record_bytes: 8, ..UpstreamConfig::default() };
            let result = fetch_record(addr, small).await;
            assert!(matches!(result, Err(UpstreamError::TooLarge { limit: 8 })), "{result:?}");
            let exact = UpstreamConfig { max_record_bytes: 9, ..UpstreamConfig::default() };
            let value = fetch_record(addr, exact).await.expect("at the limit is allowed");
            assert_eq!(value.as_deref(), Some(&b"123456789"[..]));
        }
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out_on_the_first_byte() {
        let silent = scripted_server(None).await;
        let config = UpstreamConfig { first_byte_timeout_ms: 200, ..UpstreamConfig::default() };
        let started = std::time::Instant::now();
        let result = fetch_record(silent, config).await;
        assert!(matches!(result, Err(UpstreamError::Timeout(Deadline::FirstByte))), "{result:?}");
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(2), "the idle timeout (30 s) was not the one used: {waited:?}");
    }

    #[test]
    fn only_server_errors_are_retried_per_record() {
        let status = |code| UpstreamError::Status {
            status: StatusCode::from_u16(code).expect("code"),
            www_authenticate: None,
        };
        assert!(status(503).is_transient());
        assert!(!status(404).is_transient());
        let timeout = UpstreamError::Timeout(Deadline::FirstByte);
        assert!(!timeout.is_transient(), "a retried timeout would double the configured wait");
    }
}
