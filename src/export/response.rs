//! Writing export responses on a pingora session: JSON errors, heads, and the body pump that
//! moves chunks from a pipeline to the client while watching for the client leaving.

use super::chunks::{BodyEvent, ExportFailure};
use crate::error::ApiError;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};
use tokio::sync::mpsc;

/// Sends `error` as a complete JSON response.
pub async fn send_error(session: &mut Session, error: &ApiError) -> Result<()> {
    let body = error.body();
    let mut head = ResponseHeader::build(error.status, Some(4))?;
    head.insert_header("content-type", "application/json")?;
    head.insert_header("content-length", body.len().to_string())?;
    head.insert_header("cache-control", "no-store")?;
    for (name, value) in &error.headers {
        head.insert_header(*name, value.as_str())?;
    }
    let is_head = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(head), is_head).await?;
    if !is_head {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// A head for a streamed body of unknown length. HTTP/1.1 gets chunked encoding, so an
/// aborted body is visibly incomplete; HTTP/1.0 cannot have it and gets a close-delimited body.
/// A 304 has no body and so no framing.
pub fn streaming_head(session: &Session, status: u16, content_type: &str) -> Result<ResponseHeader> {
    let mut head = ResponseHeader::build(status, Some(8))?;
    head.insert_header("content-type", content_type)?;
    if status != 304 && session.req_header().version != http::Version::HTTP_10 {
        head.insert_header("transfer-encoding", "chunked")?;
    }
    Ok(head)
}

/// How a body pump ended.
pub enum PumpEnd {
    /// The whole body was sent and terminated.
    Complete { records: u64 },
    /// The client went away; the pipeline was dropped with the receiver.
    ClientGone,
}

/// Moves the pipeline's chunks to the client until it is done, fails or the client leaves.
/// A failure returns `Err` so pingora drops the connection without the terminating chunk.
pub async fn pump(session: &mut Session, mut rx: mpsc::Receiver<BodyEvent>) -> Result<PumpEnd> {
    let mut watch_client = true;
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(BodyEvent::Data(bytes)) => {
                    // A write fails when the client is gone (or stopped reading past the timeout).
                    if session.write_response_body(Some(bytes), false).await.is_err() {
                        return Ok(PumpEnd::ClientGone);
                    }
                }
                Some(BodyEvent::Done { records }) => {
                    session.write_response_body(Some(Bytes::new()), true).await?;
                    return Ok(PumpEnd::Complete { records });
                }
                Some(BodyEvent::Failed(failure)) => return Err(abort_error(&failure)),
                None => return Err(abort_error(&ExportFailure {
                    record: None,
                    reason: "the export task ended without finishing".into(),
                })),
            },
            read = session.read_body_or_idle(false), if watch_client => match read {
                Err(_) => return Ok(PumpEnd::ClientGone),
                // A half-closed client may still read; stop watching rather than spin.
                Ok(None) => watch_client = false,
                Ok(Some(_)) => {}
            },
        }
    }
}

fn abort_error(failure: &ExportFailure) -> Box<Error> {
    Error::explain(ErrorType::InternalError, format!("export aborted after the head: {failure}"))
}
