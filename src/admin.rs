//! The internal listener: endpoints that must never be reachable from the public one —
//! change webhooks, `/healthz` (process alive), `/readyz` (able to serve), `/metrics`.

use crate::changes::refresh::Refresher;
use crate::changes::webhook::{Accepted, WebhookVerifier, MAX_BODY};
use crate::journal::VersionJournal;
use crate::metrics;
use crate::readiness::Readiness;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;
use std::time::SystemTime;

/// Answers the internal listener's requests.
pub struct Admin {
    pub readiness: Readiness,
    /// Its file size is read at each scrape, so the gauge is never stale.
    pub journal: Arc<VersionJournal>,
    pub verifier: WebhookVerifier,
    /// Re-reads a collection's listing after a webhook says it changed.
    pub refresher: Refresher,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        match path.as_str() {
            "/healthz" => json(StatusCode::OK, r#"{"status":"alive"}"#),
            "/readyz" => self.readiness().await,
            "/hooks/changes" => self.webhook(session).await,
            "/metrics" => self.metrics(),
            _ => json(
                StatusCode::NOT_FOUND,
                r#"{"error":"not_found","message":"internal endpoints are POST /hooks/changes, /healthz, /readyz and /metrics"}"#,
            ),
        }
    }
}

impl Admin {
    /// `POST /hooks/changes`: verified, acknowledged at once, and the re-read left to run.
    async fn webhook(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if session.req_header().method != http::Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                r#"{"error":"method_not_allowed","message":"send webhooks with POST"}"#,
            );
        }
        let Some(body) = read_limited(session, MAX_BODY).await else {
            metrics::get().webhooks.with_label_values(&["too_large"]).inc();
            tracing::warn!(reason = "too_large", "webhook refused: body unreadable or over 64 KiB");
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"body_unreadable","message":"the body could not be read or is over 64 KiB"}"#,
            );
        };
        match self.verifier.check(&session.req_header().headers, &body, SystemTime::now()) {
            Ok(Accepted::Notice(notice)) => {
                metrics::get().webhooks.with_label_values(&["accepted"]).inc();
                tracing::debug!(collection = %notice.collection, version = ?notice.version, "webhook accepted");
                self.refresher.request(notice.collection);
                json(StatusCode::ACCEPTED, r#"{"status":"accepted"}"#)
            }
            Ok(Accepted::Replay) => {
                metrics::get().webhooks.with_label_values(&["duplicate"]).inc();
                json(StatusCode::ACCEPTED, r#"{"status":"duplicate"}"#)
            }
            Err(rejection) => {
                metrics::get().webhooks.with_label_values(&[rejection.reason()]).inc();
                tracing::warn!(reason = rejection.reason(), detail = %rejection, "webhook refused");
                let body = serde_json::json!({"error": rejection.reason(), "message": rejection.to_string()});
                let status = StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
                json(status, &body.to_string())
            }
        }
    }

    async fn readiness(&self) -> Response<Vec<u8>> {
        let report = self.readiness.check().await;
        let status = if report.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        json(status, &report.to_json().to_string())
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        // Two `stat` calls: cheap enough to run on the listener's thread.
        match self.journal.size_bytes() {
            Ok(bytes) => metrics::get().journal_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX)),
            Err(e) => tracing::warn!(error = %e, "cannot read the journal's size for /metrics"),
        }
        let mut response = Response::new(metrics::get().render());
        response
            .headers_mut()
            .insert("content-type", http::HeaderValue::from_static("text/plain; version=0.0.4"));
        response
    }
}

/// The request body, or `None` if it cannot be read or is longer than `limit`.
async fn read_limited(session: &mut ServerSession, limit: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= limit => body.extend_from_slice(&chunk),
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) => return Some(body),
        }
    }
}

fn json(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    let mut response = Response::new(body.as_bytes().to_vec());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", http::HeaderValue::from_static("application/json"));
    headers.insert("content-length", http::HeaderValue::from(body.len()));
    headers.insert("cache-control", http::HeaderValue::from_static("no-store"));
    response
}
