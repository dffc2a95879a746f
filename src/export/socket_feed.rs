//! Event streams served straight on a connection's socket, without pingora's HTTP session:
//! an idle subscriber then costs a few KB instead of the session's 25 or so.

use super::events::{deliver, finish, preamble, FeedOutput, Opening};
use super::{ExportLog, Exporter};
use crate::collection::Collection;
use crate::error::ApiError;
use bytes::{Buf, Bytes};
use pingora::http::RequestHeader;
use std::fmt::Write as _;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

impl Exporter {
    /// Answers the event-stream `request`, the first request read from `stream`, and closes
    /// the connection when the stream ends. Returns the body bytes sent, for the log line.
    pub async fn serve_feed_on_socket(
        &self,
        stream: TcpStream,
        request: RequestHeader,
        collection: Collection,
        log: &mut ExportLog,
    ) -> usize {
        log.collection = Some(collection.clone());
        let write_timeout = Duration::from_secs(self.events.write_timeout_seconds);
        let mut output = SocketOutput { stream, write_timeout, sent: 0 };
        // The stream's future lives as long as the subscriber and is as large as its largest
        // step: the steps before delivery (listing read, journal write, head) are boxed so
        // their memory is freed once they are done.
        let opened = Box::pin(self.open_feed(&request, log, &collection)).await;
        drop(request);
        match opened {
            Opening::Refused(error) => {
                log.status = error.status;
                log.outcome = "rejected";
                let _ = Box::pin(output.write(error_response(&error))).await;
            }
            Opening::AtCapacity => {
                let _ = Box::pin(output.start(&preamble(&self.events), None)).await;
                let _ = Box::pin(output.write(&b"0\r\n\r\n"[..])).await;
            }
            Opening::Joined { subscription, first } => {
                log.status = 200;
                let started = Box::pin(output.start(&preamble(&self.events), first)).await;
                let ended = match started {
                    Ok(()) => deliver(&mut output, &subscription, &self.events, &self.draining).await,
                    Err(reason) => Err(reason),
                };
                if finish(log, ended).is_ok() {
                    let _ = Box::pin(output.write(&b"0\r\n\r\n"[..])).await;
                }
            }
        }
        let _ = output.stream.shutdown().await;
        output.sent
    }
}

/// The socket of an event stream: a chunked body, and the connection closed after it.
struct SocketOutput {
    stream: TcpStream,
    write_timeout: Duration,
    /// Body bytes sent, without the chunk framing.
    sent: usize,
}

impl SocketOutput {
    async fn write(&mut self, bytes: impl Buf) -> Result<(), &'static str> {
        let mut bytes = bytes;
        let stream = &mut self.stream;
        let written = async {
            stream.write_all_buf(&mut bytes).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.write_timeout, written).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("client_gone"),
            Err(_) => Err("write_timeout"),
        }
    }

    /// The 200 head, the preamble and the first event, in one write; the event's bytes are
    /// the ones every new subscriber shares, not a copy.
    async fn start(&mut self, preamble: &[u8], first: Option<Bytes>) -> Result<(), &'static str> {
        let mut head = String::from("HTTP/1.1 200 OK\r\n");
        head.push_str("content-type: text/event-stream\r\n");
        head.push_str("cache-control: no-cache, no-store, no-transform\r\n");
        head.push_str("x-accel-buffering: no\r\n");
        head.push_str("transfer-encoding: chunked\r\n");
        end_head(&mut head);
        let _ = write!(head, "{:x}\r\n", preamble.len());
        let mut head = head.into_bytes();
        head.extend_from_slice(preamble);
        head.extend_from_slice(b"\r\n");
        self.sent += preamble.len();
        let Some(first) = first else { return self.write(Bytes::from(head)).await };
        self.sent += first.len();
        head.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
        self.write(Bytes::from(head).chain(first).chain(&b"\r\n"[..])).await
    }
}

impl FeedOutput for SocketOutput {
    async fn send(&mut self, data: Bytes) -> Result<(), &'static str> {
        self.sent += data.len();
        let size = Bytes::from(format!("{:x}\r\n", data.len()));
        self.write(size.chain(data).chain(&b"\r\n"[..])).await
    }

    async fn closed(&mut self) {
        // Anything the client sends after its request is of no use to an event stream.
        let mut scrap = [0u8; 64];
        while let Ok(read) = self.stream.read(&mut scrap).await {
            if read == 0 {
                return;
            }
        }
    }
}

/// A complete JSON error response, as `send_error` writes it on pingora's session.
fn error_response(error: &ApiError) -> Bytes {
    let body = error.body();
    let reason = http::StatusCode::from_u16(error.status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("");
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", error.status);
    head.push_str("content-type: application/json\r\n");
    let _ = write!(head, "content-length: {}\r\n", body.len());
    head.push_str("cache-control: no-store\r\n");
    // Header values come from `HeaderValue`s, which cannot hold CR or LF; checked again here
    // because this head is written by hand.
    for (name, value) in error.headers.iter().filter(|(_, v)| !v.contains(['\r', '\n'])) {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    end_head(&mut head);
    let mut response = head.into_bytes();
    response.extend_from_slice(&body);
    Bytes::from(response)
}

/// The headers every response on this path ends with: the date, and the connection closing
/// after it (the socket is never handed back to the HTTP session).
fn end_head(head: &mut String) {
    let _ = write!(head, "date: {}\r\nconnection: close\r\n\r\n", http_date(std::time::SystemTime::now()));
}

fn http_date(now: std::time::SystemTime) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from(now).format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdate() {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(at), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn an_error_is_a_complete_json_response_that_closes_the_connection() {
        let error = ApiError::new(503, "journal_unavailable", "try again").with_header("retry-after", "1");
        let response = error_response(&error);
        let text = std::str::from_utf8(&response).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())), "{head}");
        assert!(head.contains("retry-after: 1\r\n") && head.ends_with("connection: close"), "{head}");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).expect("json")["error"],
            "journal_unavailable"
        );
    }
}
