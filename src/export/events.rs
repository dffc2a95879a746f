//! The change feed, `GET /export/{realm}/{user}:{name}/event-stream`: Server-Sent Events, one
//! per new version with the ids that changed, resumable with `Last-Event-ID`.

use super::response::streaming_head;
use super::{reject, ExportLog, Exporter};
use crate::changes::hub::{union, Event, FeedState, Subscription};
use crate::collection::Collection;
use crate::config::EventsConfig;
use crate::error::ApiError;
use crate::journal::{record_listing, JournalError, VersionJournal};
use crate::metrics;
use crate::shutdown::Draining;
use crate::upstream::Credentials;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Exporter {
    /// Opens an event stream: the subscriber's own listing read first (so access errors are
    /// statuses), then the first event, then one event per new version until it ends.
    pub(super) async fn events(
        &self,
        session: &mut Session,
        log: &mut ExportLog,
        collection: Collection,
    ) -> pingora::Result<()> {
        log.encoding = "event-stream";
        let Some(slot) = self.hub.reserve(self.events.max_connections) else {
            log.outcome = "over_capacity";
            return at_capacity(session, &self.events).await;
        };
        let credentials = Credentials::from_headers(&session.req_header().headers);
        let Some(listing) = self.listing(session, log, &collection, &credentials).await? else {
            return Ok(());
        };
        let (seq, listing) = match record_listing(&self.journal, &collection, listing).await {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::error!(collection = %collection, error = %e, "version journal failed");
                let error = ApiError::new(
                    503,
                    "journal_unavailable",
                    "the version journal cannot be used; try again",
                );
                return reject(session, log, &error).await;
            }
        };
        let ids = listing.entries.into_iter().map(|e| e.id).collect();
        let seen = FeedState::new(seq, listing.version, ids);
        let (subscription, current) = self.hub.join(slot, &collection, seen).await;
        let resume = resume_point(session);
        let first = first_event(&self.journal, &collection, resume.as_deref(), &current).await;

        log.status = 200;
        session.write_response_header(Box::new(stream_head(session)?), false).await?;
        if session.req_header().method == http::Method::HEAD {
            log.outcome = "complete";
            return session.write_response_body(None, true).await;
        }
        session.set_write_timeout(Some(Duration::from_secs(self.events.write_timeout_seconds)));
        let mut opening = preamble(&self.events);
        if let Some(event) = first {
            opening.extend_from_slice(&event);
        }
        session.write_response_body(Some(Bytes::from(opening)), false).await?;
        let ended = deliver(session, &subscription, &self.events, &self.draining).await;
        log.outcome = match &ended {
            Ok(reason) => reason,
            // Blocked past the write timeout; any other failed write means the client left.
            Err(e) if matches!(e.etype(), pingora::ErrorType::WriteTimedout) => "write_timeout",
            Err(_) => "client_gone",
        };
        metrics::get().disconnects.with_label_values(&[log.outcome]).inc();
        ended?;
        session.write_response_body(None, true).await
    }
}

/// The resume point: `Last-Event-ID`, or `last_event_id` in the query (browsers cannot set
/// the header on a first connection).
fn resume_point(session: &Session) -> Option<String> {
    let header = session.req_header().headers.get("last-event-id").and_then(|v| v.to_str().ok());
    if let Some(id) = header.filter(|id| !id.is_empty()) {
        return Some(id.to_owned());
    }
    let query = session.req_header().uri.query()?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, value)| key == "last_event_id" && !value.is_empty())
        .map(|(_, value)| value.into_owned())
}

/// What a new subscriber gets at once: a full event when it has no (known) resume point, a
/// catch-up event when it is behind, nothing when it is current.
async fn first_event(
    journal: &Arc<VersionJournal>,
    collection: &Collection,
    resume: Option<&str>,
    current: &FeedState,
) -> Option<Bytes> {
    let event =
        |changed| Event::new(current.version.clone(), Arc::clone(&current.ids), changed, Instant::now());
    let full = || Some(event(current.ids.to_vec()).bytes);
    let Some(resume) = resume else { return full() };
    match catch_up(journal, collection, resume, current.seq).await {
        Ok(CatchUp::Current) => None,
        Ok(CatchUp::Changed(changed)) => Some(event(changed).bytes),
        Ok(CatchUp::Unknown) => full(),
        Err(e) => {
            tracing::warn!(collection = %collection, error = %e, "cannot compute a catch-up event");
            full()
        }
    }
}

enum CatchUp {
    Current,
    Changed(Vec<String>),
    Unknown,
}

async fn catch_up(
    journal: &Arc<VersionJournal>,
    collection: &Collection,
    resume: &str,
    current: i64,
) -> Result<CatchUp, JournalError> {
    let (journal, collection, resume) = (Arc::clone(journal), collection.clone(), resume.to_owned());
    tokio::task::spawn_blocking(move || {
        let Some(from) = journal.seq_of(&collection, &resume)? else { return Ok(CatchUp::Unknown) };
        if from >= current {
            return Ok(CatchUp::Current);
        }
        match journal.diff(&collection, Some(from), current) {
            Ok(diff) => Ok(CatchUp::Changed(union(diff.changed, diff.deleted))),
            Err(JournalError::NotKept { .. }) => Ok(CatchUp::Unknown),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|e| JournalError::Task(e.to_string()))?
}

fn stream_head(session: &Session) -> pingora::Result<ResponseHeader> {
    let mut head = streaming_head(session, 200, "text/event-stream")?;
    head.insert_header("cache-control", "no-cache, no-store, no-transform")?;
    head.insert_header("x-accel-buffering", "no")?;
    Ok(head)
}

/// A comment (so proxies that wait for a first body byte pass the head on) and the reconnection
/// hint, jittered so clients dropped together do not come back together.
fn preamble(config: &EventsConfig) -> Vec<u8> {
    let retry = rand::rng().random_range(config.retry_ms..config.retry_ms * 2);
    format!(": export-sidecar change feed\nretry: {retry}\n\n").into_bytes()
}

/// Over the connection cap: 200 with a retry hint and an immediate end. Any other status makes
/// browsers stop reconnecting for good.
async fn at_capacity(session: &mut Session, config: &EventsConfig) -> pingora::Result<()> {
    let mut head = stream_head(session)?;
    head.insert_header("connection", "close")?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(head), false).await?;
    session.write_response_body(Some(Bytes::from(preamble(config))), true).await
}

/// Delivers events and heartbeats until the stream should end cleanly; returns why it ended.
/// A client that cannot take a write within the write timeout makes this return `Err`, which
/// drops the connection.
async fn deliver(
    session: &mut Session,
    subscription: &Subscription,
    config: &EventsConfig,
    draining: &Draining,
) -> pingora::Result<&'static str> {
    let heartbeat_every = Duration::from_secs(config.heartbeat_seconds);
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + heartbeat_every, heartbeat_every);
    let closed = draining.closed();
    tokio::pin!(closed);
    let lifetime = lifetime(config);
    let ends = tokio::time::sleep(lifetime.unwrap_or(Duration::MAX / 4));
    tokio::pin!(ends);
    let mut watch_client = true;
    loop {
        tokio::select! {
            _ = subscription.mailbox.ready() => {
                if let Some((event, noticed)) = subscription.mailbox.take() {
                    session.write_response_body(Some(event), false).await?;
                    heartbeat.reset();
                    let metrics = metrics::get();
                    metrics.events_delivered.inc();
                    metrics.delivery_latency.observe(noticed.elapsed().as_secs_f64());
                }
            }
            _ = heartbeat.tick() => {
                session.write_response_body(Some(Bytes::from_static(b": heartbeat\n\n")), false).await?;
            }
            _ = &mut ends, if lifetime.is_some() => return Ok("lifetime"),
            () = &mut closed => return Ok("shutdown"),
            read = session.read_body_or_idle(false), if watch_client => match read {
                Err(_) => return Ok("client_gone"),
                Ok(None) => watch_client = false,
                Ok(Some(_)) => {}
            },
        }
    }
}

/// This stream's lifetime: 80–100 % of the configured maximum, or none.
fn lifetime(config: &EventsConfig) -> Option<Duration> {
    if config.max_lifetime_seconds == 0 {
        return None;
    }
    let share = rand::rng().random_range(0.8..=1.0);
    Some(Duration::from_secs(config.max_lifetime_seconds).mul_f64(share))
}
