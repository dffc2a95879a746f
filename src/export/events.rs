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
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a subscriber's request was settled before any head went out.
pub(crate) enum Opening {
    /// Answered with this error (401/403/404 as the dataset server gave them, 502/503/504).
    Refused(ApiError),
    /// Over the connection cap: a 200 with only the retry hint, then the end.
    AtCapacity,
    /// Joined the feed; `first` goes out right after the preamble.
    Joined { subscription: Subscription, first: Option<Bytes> },
}

/// Where an event stream's body goes once the head is out: pingora's session, or a socket
/// served directly (see `socket_feed`).
pub(crate) trait FeedOutput {
    /// Writes and flushes one piece of the body; `Err` is the reason the stream must end.
    async fn send(&mut self, data: Bytes) -> Result<(), &'static str>;
    /// Resolves once the client has closed the connection; stays pending if that cannot be
    /// known any more.
    async fn closed(&mut self);
}

impl Exporter {
    /// Opens an event stream on pingora's session: the subscriber's own listing read first
    /// (so access errors are statuses), then the first event, then one event per new version.
    pub(super) async fn events(
        &self,
        session: &mut Session,
        log: &mut ExportLog,
        collection: Collection,
    ) -> pingora::Result<()> {
        let (subscription, first) = match self.open_feed(session.req_header(), log, &collection).await {
            Opening::Refused(error) => return reject(session, log, &error).await,
            Opening::AtCapacity => return at_capacity(session, &self.events).await,
            Opening::Joined { subscription, first } => (subscription, first),
        };
        log.status = 200;
        if session.req_header().version == http::Version::HTTP_10 {
            // Its body ends only when the connection closes (no chunked framing in HTTP/1.0).
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(stream_head(session)?), false).await?;
        if session.req_header().method == http::Method::HEAD {
            log.outcome = "complete";
            return session.write_response_body(None, true).await;
        }
        session.set_write_timeout(Some(Duration::from_secs(self.events.write_timeout_seconds)));
        session.write_response_body(Some(opening(&self.events, first)), false).await?;
        let mut output = SessionOutput { session, watch_client: true };
        let ended = deliver(&mut output, &subscription, &self.events, &self.draining).await;
        if let Err(reason) = finish(log, ended) {
            return Err(pingora::Error::explain(pingora::ErrorType::WriteError, reason));
        }
        session.write_response_body(None, true).await
    }

    /// Everything before the head: a connection slot, the listing read with the subscriber's
    /// credentials and recorded in the journal, the feed joined, the first event chosen.
    pub(crate) async fn open_feed(
        &self,
        request: &RequestHeader,
        log: &mut ExportLog,
        collection: &Collection,
    ) -> Opening {
        log.encoding = "event-stream";
        let Some(slot) = self.hub.reserve(self.events.max_connections) else {
            log.status = 200;
            log.outcome = "over_capacity";
            return Opening::AtCapacity;
        };
        let _turn = self.hub.joining_turn().await;
        let credentials = Credentials::from_headers(&request.headers);
        let listing = match self.fetch_listing(collection, &credentials).await {
            Ok(listing) => listing,
            Err(error) => return Opening::Refused(error),
        };
        let (seq, listing) = match record_listing(&self.journal, collection, listing).await {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::error!(collection = %collection, error = %e, "version journal failed");
                return Opening::Refused(super::plan::journal_unavailable());
            }
        };
        let ids = listing.entries.into_iter().map(|e| e.id).collect();
        let seen = FeedState::new(seq, listing.version, ids);
        let (subscription, current) = self.hub.join(slot, collection, seen).await;
        let resume = resume_point(request);
        let first = first_event(&self.journal, collection, resume.as_deref(), &current).await;
        Opening::Joined { subscription, first }
    }
}

/// Records how a delivered stream ended; `Err` carries the reason when it must be aborted
/// rather than ended cleanly.
pub(crate) fn finish(
    log: &mut ExportLog,
    ended: Result<&'static str, &'static str>,
) -> Result<(), &'static str> {
    let reason = ended.unwrap_or_else(|reason| reason);
    log.outcome = reason;
    metrics::get().disconnects.with_label_values(&[reason]).inc();
    ended.map(drop)
}

/// pingora's session as a feed output.
struct SessionOutput<'a> {
    session: &'a mut Session,
    watch_client: bool,
}

impl FeedOutput for SessionOutput<'_> {
    async fn send(&mut self, data: Bytes) -> Result<(), &'static str> {
        self.session.write_response_body(Some(data), false).await.map_err(|e| {
            // Blocked past the write timeout; any other failed write means the client left.
            match e.etype() {
                pingora::ErrorType::WriteTimedout => "write_timeout",
                _ => "client_gone",
            }
        })
    }

    async fn closed(&mut self) {
        while self.watch_client {
            match self.session.read_body_or_idle(false).await {
                Err(_) => return,
                // A half-closed client may still read; stop watching rather than spin.
                Ok(None) => self.watch_client = false,
                Ok(Some(_)) => {}
            }
        }
        std::future::pending::<()>().await;
    }
}

/// The resume point: `Last-Event-ID`, or `last_event_id` in the query (browsers cannot set
/// the header on a first connection).
fn resume_point(request: &RequestHeader) -> Option<String> {
    let header = request.headers.get("last-event-id").and_then(|v| v.to_str().ok());
    if let Some(id) = header.filter(|id| !id.is_empty()) {
        return Some(id.to_owned());
    }
    let query = request.uri.query()?;
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
pub(crate) fn preamble(config: &EventsConfig) -> Vec<u8> {
    let retry = rand::rng().random_range(config.retry_ms..config.retry_ms * 2);
    format!(": export-sidecar change feed\nretry: {retry}\n\n").into_bytes()
}

/// The first body bytes of a joined stream: the preamble and the first event, if any.
pub(crate) fn opening(config: &EventsConfig, first: Option<Bytes>) -> Bytes {
    let mut opening = preamble(config);
    if let Some(event) = first {
        opening.extend_from_slice(&event);
    }
    Bytes::from(opening)
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

/// Delivers events and heartbeats until the stream ends; `Ok` is a reason to end it cleanly,
/// `Err` one to drop the connection (the client left or took no write within the timeout).
pub(crate) async fn deliver(
    output: &mut impl FeedOutput,
    subscription: &Subscription,
    config: &EventsConfig,
    draining: &Draining,
) -> Result<&'static str, &'static str> {
    let heartbeat_every = Duration::from_secs(config.heartbeat_seconds);
    let mut heartbeat =
        tokio::time::interval_at(tokio::time::Instant::now() + heartbeat_every, heartbeat_every);
    let closed = draining.closed();
    tokio::pin!(closed);
    let lifetime = lifetime(config);
    let ends = tokio::time::sleep(lifetime.unwrap_or(Duration::MAX / 4));
    tokio::pin!(ends);
    loop {
        tokio::select! {
            _ = subscription.mailbox.ready() => {
                if let Some((event, noticed)) = subscription.mailbox.take() {
                    output.send(event).await?;
                    heartbeat.reset();
                    let metrics = metrics::get();
                    metrics.events_delivered.inc();
                    metrics.delivery_latency.observe(noticed.elapsed().as_secs_f64());
                }
            }
            _ = heartbeat.tick() => output.send(Bytes::from_static(b": heartbeat\n\n")).await?,
            _ = &mut ends, if lifetime.is_some() => return Ok("lifetime"),
            () = &mut closed => return Ok("shutdown"),
            () = output.closed() => return Err("client_gone"),
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
