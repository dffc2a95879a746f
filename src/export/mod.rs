//! The `/export/...` API: routing an export request, reading the listing, and streaming the
//! body from a per-export pipeline task to the client.

pub mod attachments;
pub mod body;
pub mod chunks;
pub mod encoder;
pub mod etag;
pub mod events;
pub mod fetch;
pub mod limit;
pub mod ordered;
pub mod plan;
pub mod records;
pub mod response;
pub mod route;
pub mod socket_feed;
pub mod window;
pub mod workers;
pub mod zip;
pub mod zipfile;

use crate::cache::RecordCache;
use crate::changes::hub::Hub;
use crate::changes::poller::RecentExports;
use crate::collection::Collection;
use crate::config::{EventsConfig, ExportConfig};
use crate::error::ApiError;
use crate::journal::VersionJournal;
use crate::shutdown::Draining;
use crate::upstream::{Credentials, Listing, Upstream};
use body::ContentCoding;
use chunks::BodyEvent;
use etag::ExportTag;
use limit::{ExportSlot, ExportSlots};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use records::RecordExport;
use response::{pump, send_error, streaming_head, PumpEnd};
use route::{Encoding, ExportKind, Since};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use window::FetchWindow;

/// What the log line of one export reports; filled in as the export goes.
#[derive(Debug)]
pub struct ExportLog {
    pub collection: Option<Collection>,
    pub encoding: &'static str,
    /// Records written so far, shared with the pipeline so an export that does not finish
    /// still logs how far it got.
    pub records: Arc<AtomicU64>,
    pub started: Instant,
    pub outcome: &'static str,
    pub status: u16,
}

impl ExportLog {
    pub fn new() -> ExportLog {
        ExportLog {
            collection: None,
            encoding: "",
            records: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            outcome: "failed",
            status: 0,
        }
    }
}

impl Default for ExportLog {
    fn default() -> Self {
        ExportLog::new()
    }
}

/// Serves export requests. One per process, shared by every request.
pub struct Exporter {
    pub upstream: Upstream,
    /// Every listing an export reads is recorded here before its version is handed out.
    pub journal: Arc<VersionJournal>,
    /// Collections exported lately, which the poller keeps re-reading.
    pub recent: Arc<RecentExports>,
    /// The change feed's watchers and subscribers.
    pub hub: Hub,
    pub events: EventsConfig,
    pub config: ExportConfig,
    /// The fetch window every record and zip export starts from.
    pub window: FetchWindow,
    pub cache: RecordCache,
    /// Record and zip exports running at once; event streams are capped by the hub instead.
    pub slots: ExportSlots,
    /// Tells event streams when the process shuts down.
    pub draining: Draining,
    /// Where record and zip pipelines run, each with its own upstream client.
    pub workers: workers::ExportWorkers,
}

/// Aborts a pipeline task when the request handling that started it ends, however it ends,
/// so a client that leaves stops every fetch it caused.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Exporter {
    /// Answers one `/export/...` request completely. `Err` means the response was started and
    /// must be aborted.
    pub async fn serve(&self, session: &mut Session, log: &mut ExportLog) -> pingora::Result<()> {
        let method = &session.req_header().method;
        if method != http::Method::GET && method != http::Method::HEAD {
            let error = ApiError::new(405, "method_not_allowed", "exports are read with GET or HEAD")
                .with_header("allow", "GET, HEAD");
            return reject(session, log, &error).await;
        }
        let uri = &session.req_header().uri;
        let request = match route::parse(uri.path(), uri.query()) {
            Ok(request) => request,
            Err(error) => return reject(session, log, &error).await,
        };
        log.collection = Some(request.collection.clone());
        match request.kind {
            ExportKind::Records { encoding, since } => {
                self.records(session, log, request.collection, encoding, since).await
            }
            ExportKind::EventStream => self.events(session, log, request.collection).await,
            ExportKind::Zip { attachments } => self.zip(session, log, request.collection, attachments).await,
        }
    }

    async fn records(
        &self,
        session: &mut Session,
        log: &mut ExportLog,
        collection: Collection,
        encoding: Encoding,
        since: Option<Since>,
    ) -> pingora::Result<()> {
        log.encoding = encoding.as_str();
        if let Some(error) = needs_chunked_framing(session) {
            return reject(session, log, &error).await;
        }
        let Some(_slot) = self.take_slot(session, log).await? else {
            return Ok(());
        };
        let credentials = Credentials::from_headers(&session.req_header().headers);
        let Some(listing) = self.listing(session, log, &collection, &credentials).await? else {
            return Ok(());
        };
        let version = listing.version.clone();
        let accept = session.req_header().headers.get("accept-encoding");
        let coding = ContentCoding::negotiate(accept.and_then(|v| v.to_str().ok()));
        let tag = ExportTag::new(&collection, &version, encoding, since.as_ref(), coding);
        let items = match plan::plan(&self.journal, &collection, listing, since).await {
            Ok(items) => items,
            Err(error) => return reject(session, log, &error).await,
        };
        let if_none_match = session.req_header().headers.get("if-none-match");
        if tag.matches(if_none_match.and_then(|v| v.to_str().ok())) {
            log.status = 304;
            log.outcome = "not_modified";
            let head = export_head(session, 304, encoding, &version, &tag, coding)?;
            return session.write_response_header(Box::new(head), true).await;
        }
        let head = export_head(session, 200, encoding, &version, &tag, coding)?;
        let source = self.source(collection, credentials, items, log);
        let export = RecordExport { source, encoding, coding };
        respond_streamed(session, log, head, || export.spawn()).await
    }
}

/// Sends a 200 head and, unless the request is HEAD, the body a pipeline started by `start`
/// produces; the pipeline is aborted when this returns, however it returns.
async fn respond_streamed(
    session: &mut Session,
    log: &mut ExportLog,
    head: ResponseHeader,
    start: impl FnOnce() -> (mpsc::Receiver<BodyEvent>, tokio::task::JoinHandle<()>),
) -> pingora::Result<()> {
    log.status = 200;
    if session.req_header().method == http::Method::HEAD {
        log.outcome = "complete";
        return session.write_response_header(Box::new(head), true).await;
    }
    session.write_response_header(Box::new(head), false).await?;
    let (rx, task) = start();
    let _guard = AbortOnDrop(task);
    match pump(session, rx).await? {
        PumpEnd::Complete { records } => {
            log.records.store(records, std::sync::atomic::Ordering::Relaxed);
            log.outcome = "complete";
        }
        PumpEnd::ClientGone => log.outcome = "client_gone",
    }
    Ok(())
}

/// An HTTP/1.0 client cannot be sent chunked framing, and a close-delimited body that is cut
/// short looks complete: such a client could keep a truncated export without knowing.
fn needs_chunked_framing(session: &Session) -> Option<ApiError> {
    let head = session.req_header();
    (head.version == http::Version::HTTP_10 && head.method == http::Method::GET).then(|| {
        ApiError::new(
            505,
            "http_version_not_supported",
            "exports need HTTP/1.1 or later, so that a broken download is recognisable as broken",
        )
    })
}

impl Exporter {
    /// A slot for one more record or zip export, or `None` when the client has been told to
    /// come back later.
    async fn take_slot(
        &self,
        session: &mut Session,
        log: &mut ExportLog,
    ) -> pingora::Result<Option<ExportSlot>> {
        match self.slots.try_take() {
            Ok(slot) => Ok(Some(slot)),
            Err(error) => {
                reject(session, log, &error).await?;
                log.outcome = "too_busy";
                Ok(None)
            }
        }
    }

    /// What a pipeline needs to write `items` of `collection` for this request.
    fn source(
        &self,
        collection: Collection,
        credentials: Credentials,
        items: Vec<plan::ExportItem>,
        log: &ExportLog,
    ) -> chunks::ExportSource {
        let worker = self.workers.next();
        chunks::ExportSource {
            runtime: worker.runtime,
            upstream: worker.upstream,
            cache: self.cache.clone(),
            collection,
            credentials,
            items,
            written: Arc::clone(&log.records),
            window: self.window.clone(),
            config: self.config.clone(),
        }
    }

    /// The collection's listing read with the client's credentials, or `None` when the client
    /// has been answered with the failure.
    async fn listing(
        &self,
        session: &mut Session,
        log: &mut ExportLog,
        collection: &Collection,
        credentials: &Credentials,
    ) -> pingora::Result<Option<Listing>> {
        match self.fetch_listing(collection, credentials).await {
            Ok(listing) => Ok(Some(listing)),
            Err(error) => reject(session, log, &error).await.map(|()| None),
        }
    }

    /// The collection's listing read with the client's credentials, or the error to answer
    /// with: 401/403/404 as they came, 502/504 for faults.
    async fn fetch_listing(
        &self,
        collection: &Collection,
        credentials: &Credentials,
    ) -> Result<Listing, ApiError> {
        match self.upstream.listing(collection, credentials).await {
            Ok(listing) => {
                self.recent.touch(collection);
                Ok(listing)
            }
            Err(e) => {
                if e.is_refusal() {
                    tracing::info!(collection = %collection, error = %e, "listing refused");
                } else {
                    tracing::warn!(collection = %collection, error = %e, "listing failed");
                }
                Err(e.to_api_error(&format!("the listing of {collection}")))
            }
        }
    }
}

/// Answers with a client-facing error and records it for the log line.
async fn reject(session: &mut Session, log: &mut ExportLog, error: &ApiError) -> pingora::Result<()> {
    log.status = error.status;
    log.outcome = "rejected";
    send_error(session, error).await
}

/// The head of an export: 200 with a streamed body, or 304 with the same validators.
fn export_head(
    session: &Session,
    status: u16,
    encoding: Encoding,
    version: &str,
    tag: &ExportTag,
    coding: ContentCoding,
) -> pingora::Result<pingora::http::ResponseHeader> {
    let mut head = streaming_head(session, status, encoding.content_type())?;
    head.insert_header("x-version", version)?;
    head.insert_header("etag", tag.header_value())?;
    head.insert_header("vary", "accept-encoding")?;
    head.insert_header("cache-control", "no-cache")?;
    if let Some(value) = coding.header_value() {
        head.insert_header("content-encoding", value)?;
    }
    Ok(head)
}
