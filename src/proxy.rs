//! The pingora `ProxyHttp` of the public listener: `/export/...` is answered by the exporter,
//! every other request is passed to the dataset server unchanged.

use crate::config::UpstreamTarget;
use crate::error::ApiError;
use crate::export::response::send_error;
use crate::export::route::{self, is_export_path};
use crate::export::{ExportLog, Exporter};
use crate::metrics;
use crate::shutdown::{InFlight, InFlightGuard};
use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use std::sync::Arc;
use std::time::Duration;

/// The public listener's behaviour. Built once; shared by every request.
pub struct Sidecar {
    pub exporter: Arc<Exporter>,
    pub target: UpstreamTarget,
    /// `upstream.connect_timeout_ms`, for pass-through too. No read timeout there: upgraded
    /// connections and long polls may rightly stay quiet for long.
    pub connect_timeout: Duration,
    /// Counts requests so a SIGTERM exits as soon as the last one is done.
    pub in_flight: InFlight,
}

/// Per-request state: the in-flight count it holds, and for exports the log line's facts.
pub struct RequestCtx {
    _in_flight: InFlightGuard,
    export: Option<ExportLog>,
}

#[async_trait]
impl ProxyHttp for Sidecar {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx { _in_flight: self.in_flight.enter(), export: None }
    }

    /// No response compression module: pingora's would hold back streamed bodies until their
    /// end; exports compress themselves, pass-through keeps the upstream's coding.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if !is_export_path(session.req_header().uri.path()) {
            return Ok(false);
        }
        let log = ctx.export.insert(ExportLog::new());
        self.exporter.serve(session, log).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.target.addr, false, self.target.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        Ok(Box::new(peer))
    }

    /// Pass-through failures get a JSON body like every other error the sidecar answers.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut RequestCtx) -> FailToProxy {
        let error = pass_through_error(e);
        if let Some(error) = &error {
            if session.response_written().is_none() {
                // The connection is not reused after a failed proxy attempt: say so in the head.
                session.set_keepalive(None);
                if let Err(write_error) = send_error(session, error).await {
                    tracing::debug!(error = %write_error, "could not send the error response");
                }
            }
        }
        FailToProxy { error_code: error.map_or(0, |e| e.status), can_reuse_downstream: false }
    }

    /// Export failures are logged once, by `logging`, with the collection and record; pingora's
    /// own line would report a 500 the client never saw.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, _error: &Error) -> bool {
        ctx.export.is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        count_request(session.req_header().uri.path(), session.response_written().map(|head| head.status));
        if let Some(log) = &ctx.export {
            let error = e.map(|e| e.to_string()).unwrap_or_default();
            log_export(log, session.body_bytes_sent(), &error);
        }
    }
}

/// `requests_total` by route and the status sent (`none` when no head went out).
pub fn count_request(path: &str, status: Option<http::StatusCode>) {
    let status = status.as_ref().map_or("none", |s| s.as_str());
    metrics::get().requests.with_label_values(&[route::label(path), status]).inc();
}

/// The log line and metrics of one export that has ended.
pub fn log_export(log: &ExportLog, bytes: usize, error: &str) {
    let collection = log.collection.as_ref().map(|c| c.to_string()).unwrap_or_default();
    let records = log.records.load(std::sync::atomic::Ordering::Relaxed);
    count_export(log, records, bytes);
    let duration_ms = log.started.elapsed().as_millis() as u64;
    // One line per export, with every field named; only failures are warnings: a client
    // leaving is not the operator's concern.
    macro_rules! export_line {
        ($level:ident) => {
            tracing::$level!(
                collection,
                encoding = log.encoding,
                status = log.status,
                records,
                bytes,
                duration_ms,
                outcome = log.outcome,
                error,
                "export"
            )
        };
    }
    if log.outcome == "failed" {
        export_line!(warn);
    } else {
        export_line!(info);
    }
}

/// The export metrics. Records, bytes and duration count only exports that sent a body:
/// a refusal or a 304 says nothing about export cost, and an event stream's duration is
/// its client's choice.
fn count_export(log: &ExportLog, records: u64, bytes: usize) {
    let metrics = metrics::get();
    let kind = if log.encoding.is_empty() { "unknown" } else { log.encoding };
    metrics.exports.with_label_values(&[kind, log.outcome]).inc();
    if log.status != 200 || kind == "event-stream" {
        return;
    }
    metrics.export_records.with_label_values(&[kind]).inc_by(records);
    metrics.export_bytes.with_label_values(&[kind]).inc_by(bytes as u64);
    metrics.export_duration.with_label_values(&[kind]).observe(log.started.elapsed().as_secs_f64());
}

/// The client-facing error for a failed pass-through, or `None` when the client is gone.
fn pass_through_error(e: &Error) -> Option<ApiError> {
    if let ErrorType::HTTPStatus(code) = e.etype() {
        return Some(ApiError::new(*code, "error", e.to_string()));
    }
    match e.esource() {
        ErrorSource::Upstream => Some(match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                ApiError::new(504, "upstream_timeout", "the dataset server did not answer in time")
            }
            _ => ApiError::new(502, "upstream_unavailable", "the dataset server cannot be reached"),
        }),
        ErrorSource::Downstream => match e.etype() {
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => None,
            _ => Some(ApiError::bad_request("the request could not be read")),
        },
        ErrorSource::Internal | ErrorSource::Unset => {
            Some(ApiError::new(500, "internal_error", "the sidecar failed; see its log"))
        }
    }
}
