//! The public listener's connections: an event stream asked for by a connection's first
//! request is served straight on the socket; everything else goes to pingora's HTTP proxy.

use crate::collection::Collection;
use crate::export::route::{self, ExportKind};
use crate::export::{ExportLog, Exporter};
use crate::proxy::{count_request, log_export, Sidecar};
use crate::shutdown::{InFlight, InFlightGuard};
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::http::RequestHeader;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Request heads larger than this are left to pingora, which has the limits and errors for them.
const HEAD_LIMIT: usize = 8 * 1024;

/// How long a new connection may take to send its first request head before it is handed to
/// pingora as it is (which then applies its own rules).
const HEAD_WAIT: Duration = Duration::from_secs(60);

/// The public listener's application.
///
/// An idle event-stream subscriber on pingora's session held about 34 KB (its proxy task,
/// 4 KB read buffer, response heads; `bench events`); served on its own socket and task it
/// holds about 6.5 KB in all.
pub struct PublicListener {
    pub proxy: Arc<HttpProxy<Sidecar>>,
    pub exporter: Arc<Exporter>,
    pub in_flight: InFlight,
}

#[async_trait]
impl ServerApp for PublicListener {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let mut stream = stream;
        let mut head = Vec::with_capacity(1024);
        let mut stopping = shutdown.clone();
        tokio::select! {
            read = tokio::time::timeout(HEAD_WAIT, read_head(&mut stream, &mut head)) => {
                if matches!(read, Ok(Err(_))) || head.is_empty() {
                    return None;
                }
            }
            _ = stopping.changed() => return None,
        }
        let mut tcp = into_tcp(stream)?;
        if let Some((request, collection)) = feed_request(&head) {
            match detach(tcp) {
                Ok(socket) => {
                    // A task of its own: pingora's task for this connection, and this future,
                    // would otherwise stay allocated for as long as the subscriber stays.
                    let (listener, in_flight) = (Arc::clone(self), self.in_flight.enter());
                    tokio::spawn(
                        async move { listener.serve_feed(socket, request, collection, in_flight).await },
                    );
                    return None;
                }
                Err(kept) => tcp = kept,
            }
        }
        tcp.rewind(&head);
        let stream: Stream = tcp;
        drop(head);
        self.proxy.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.proxy.cleanup().await;
    }
}

impl PublicListener {
    async fn serve_feed(
        &self,
        stream: tokio::net::TcpStream,
        request: RequestHeader,
        collection: Collection,
        _in_flight: InFlightGuard,
    ) {
        let path = request.uri.path().to_owned();
        let mut log = ExportLog::new();
        let sent = self.exporter.serve_feed_on_socket(stream, request, collection, &mut log).await;
        count_request(&path, http::StatusCode::from_u16(log.status).ok());
        log_export(&log, sent, "");
    }
}

/// Reads until `head` holds a complete request head, a malformed one, `HEAD_LIMIT` bytes or
/// everything the client sent before closing.
async fn read_head(stream: &mut Stream, head: &mut Vec<u8>) -> std::io::Result<()> {
    while is_partial(head) && head.len() < HEAD_LIMIT {
        head.reserve(1024);
        if stream.read_buf(head).await? == 0 {
            break;
        }
    }
    Ok(())
}

/// Whether `head` is the start of a request head that has not ended yet. Its own function so
/// the parser's header array (2 KB) is not kept in the connection's future across reads.
fn is_partial(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    matches!(httparse::Request::new(&mut headers).parse(head), Ok(httparse::Status::Partial))
}

/// The event-stream request `head` holds, if it is one this listener serves itself: a plain
/// HTTP/1.1 GET of a valid event-stream path, without a body, an upgrade or anything after it.
/// Everything else, malformed requests included, goes to pingora unchanged.
fn feed_request(head: &[u8]) -> Option<(RequestHeader, Collection)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(length) = parsed.parse(head).ok()? else { return None };
    if length != head.len() || parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let target = parsed.path?;
    if !route::is_export_path(target) {
        return None;
    }
    let uri: http::Uri = target.parse().ok()?;
    let request = route::parse(uri.path(), uri.query()).ok()?;
    if !matches!(request.kind, ExportKind::EventStream) {
        return None;
    }
    let framed = ["content-length", "transfer-encoding", "upgrade", "expect"];
    if parsed.headers.iter().any(|h| framed.iter().any(|name| h.name.eq_ignore_ascii_case(name))) {
        return None;
    }
    let mut header =
        RequestHeader::build_no_case("GET", target.as_bytes(), Some(parsed.headers.len())).ok()?;
    for h in parsed.headers.iter() {
        header.append_header(h.name.to_owned(), h.value).ok()?;
    }
    Some((header, request.collection))
}

/// The public listener is plain TCP; any other stream is a wiring mistake.
fn into_tcp(stream: Stream) -> Option<Box<TcpStream>> {
    let tcp = stream.into_any().downcast::<TcpStream>().ok();
    if tcp.is_none() {
        tracing::error!("the public listener got a connection that is not TCP; closing it");
    }
    tcp
}

/// The connection's socket on its own, without pingora's stream around it (its write buffer,
/// digests and registration: about 2 KB an idle subscriber would hold for nothing). Only
/// called with nothing buffered: the head was read unbuffered and nothing was written. If the
/// descriptor cannot be duplicated (no descriptors left), the stream is handed back.
fn detach(tcp: Box<TcpStream>) -> Result<tokio::net::TcpStream, Box<TcpStream>> {
    // SAFETY: the descriptor is open and owned by `tcp`, which outlives this borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(tcp.as_raw_fd()) };
    let Ok(owned) = borrowed.try_clone_to_owned() else { return Err(tcp) };
    let Ok(socket) = tokio::net::TcpStream::from_std(std::net::TcpStream::from(owned)) else {
        return Err(tcp);
    };
    // Closing pingora's descriptor leaves the connection open on the duplicate, which shares
    // its non-blocking mode.
    drop(tcp);
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(head: &str) -> Option<String> {
        feed_request(head.as_bytes()).map(|(_, collection)| collection.to_string())
    }

    #[test]
    fn only_plain_event_stream_gets_are_served_on_the_socket() {
        let get = "GET /export/datasets/u:n/event-stream HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(decide(get).is_some());
        let with_query = "GET /export/datasets/u:n/event-stream?last_event_id=3 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(decide(with_query).is_some());
        for head in [
            "HEAD /export/datasets/u:n/event-stream HTTP/1.1\r\n\r\n",
            "GET /export/datasets/u:n/event-stream HTTP/1.0\r\n\r\n",
            "GET /export/datasets/u:n HTTP/1.1\r\n\r\n",
            "GET /export/datasets/u:n/zip HTTP/1.1\r\n\r\n",
            "GET /datasets/u:n/event-stream HTTP/1.1\r\n\r\n",
            "GET /export/datasets/u:n/event-stream HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET /export/datasets/u:n/event-stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /export/datasets/u:n/event-stream HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /export/datasets/u:n/event-stream HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "GET /export/datasets/u:n/event-stream HTTP/1.1\r\nHost: x\r\n",
            "GET /export/datasets/u%zz:n/event-stream HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(decide(head), None, "{head:?}");
        }
    }

    #[test]
    fn the_request_keeps_its_headers_and_query() {
        let head = "GET /export/datasets/u:n/event-stream?last_event_id=7 HTTP/1.1\r\n\
                    Authorization: Bearer t\r\nLast-Event-ID: 5\r\n\r\n";
        let (request, _) = feed_request(head.as_bytes()).expect("served here");
        assert_eq!(request.headers.get("authorization").map(|v| v.as_bytes()), Some(&b"Bearer t"[..]));
        assert_eq!(request.headers.get("last-event-id").map(|v| v.as_bytes()), Some(&b"5"[..]));
        assert_eq!(request.uri.query(), Some("last_event_id=7"));
    }
}
