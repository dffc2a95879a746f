//! The record export pipeline: fetch records in listing order with bounded concurrency,
//! encode them, code the body and hand it out in chunks. Runs as its own task per export.

use super::body::{BodyEncoder, ContentCoding};
use super::encoder::RecordEncoder;
use super::plan::ExportItem;
use super::route::Encoding;
use crate::collection::Collection;
use crate::config::ExportConfig;
use crate::upstream::{Credentials, Upstream, UpstreamError};
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What the pipeline sends to the response writer.
#[derive(Debug)]
pub enum BodyEvent {
    Data(Bytes),
    /// The body is complete; this many records were written.
    Done {
        records: u64,
    },
    /// The body cannot be completed; the response must be aborted.
    Failed(ExportFailure),
}

/// Why an export stopped after its head was sent, naming the record for the log.
#[derive(Debug, Clone)]
pub struct ExportFailure {
    pub record: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for ExportFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.record {
            Some(id) => write!(f, "record {id:?}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// Everything one record export needs, moved into its task.
pub struct RecordExport {
    pub upstream: Upstream,
    pub collection: Collection,
    pub credentials: Credentials,
    /// What to write, in recordID order.
    pub items: Vec<ExportItem>,
    pub encoding: Encoding,
    pub coding: ContentCoding,
    pub concurrency: usize,
    pub config: ExportConfig,
}

/// Chunks in flight between the pipeline and a slow client; with the fetch window this bounds
/// an export's memory whatever the collection's size.
const CHANNEL_CHUNKS: usize = 4;

impl RecordExport {
    /// Starts the pipeline. Dropping the returned receiver stops it at its next send; aborting
    /// the task cancels the record fetches in flight.
    pub fn spawn(self) -> (mpsc::Receiver<BodyEvent>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let task = tokio::spawn(async move {
            let event = match self.run(&tx).await {
                Ok(records) => BodyEvent::Done { records },
                Err(Stop::Failed(failure)) => BodyEvent::Failed(failure),
                Err(Stop::ClientGone) => return,
            };
            let _ = tx.send(event).await;
        });
        (rx, task)
    }

    async fn run(self, tx: &mpsc::Sender<BodyEvent>) -> Result<u64, Stop> {
        let RecordExport { upstream, collection, credentials, items, encoding, coding, concurrency, config } =
            self;
        let mut out = ChunkWriter::new(tx, coding, config.flush_interval_ms);
        let mut encoder = RecordEncoder::new(encoding);
        encoder.begin(&mut out.raw);

        let fetches = stream::iter(items).map(|item| {
            let (upstream, collection, credentials) = (&upstream, &collection, &credentials);
            async move {
                match item {
                    ExportItem::Record(id) => {
                        let value = upstream.record(collection, &id, credentials).await;
                        (id, Fetched::Value(value))
                    }
                    ExportItem::Tombstone(id) => (id, Fetched::Tombstone),
                }
            }
        });
        let mut records = fetches.buffered(concurrency);
        while let Some((id, fetched)) = out.next_or_flush(&mut records).await? {
            match fetched {
                Fetched::Tombstone => encoder.tombstone(&id, &mut out.raw),
                Fetched::Value(Ok(Some(value))) => {
                    if let Err(e) = encoder.record(&id, &value, &mut out.raw) {
                        tracing::warn!(collection = %collection, record = %id, error = %e, "record is not valid CBOR");
                        let reason = format!("the stored value is not valid CBOR: {e}");
                        return Err(Stop::failed(&id, reason));
                    }
                }
                // Deleted between the listing and its fetch: the listing's version predates
                // the deletion, and the next sync reports it.
                Fetched::Value(Ok(None)) => {}
                Fetched::Value(Err(e)) => {
                    tracing::warn!(collection = %collection, record = %id, error = %e, "record fetch failed");
                    return Err(Stop::failed(&id, e.to_string()));
                }
            }
            if out.raw.len() >= config.chunk_bytes {
                out.send_raw().await?;
            }
        }
        encoder.end(&mut out.raw);
        out.finish().await?;
        Ok(encoder.records_written())
    }
}

/// One export item once its fetch (if any) is done.
enum Fetched {
    Value(Result<Option<Bytes>, UpstreamError>),
    Tombstone,
}

/// How a pipeline ends early.
enum Stop {
    Failed(ExportFailure),
    /// The response writer dropped its receiver: nobody is reading any more.
    ClientGone,
}

impl Stop {
    fn failed(record: &str, reason: String) -> Stop {
        Stop::Failed(ExportFailure { record: Some(record.to_owned()), reason })
    }
}

/// Accumulates encoded output and sends it in chunks: when a chunk is full, and when data has
/// waited `flush_interval` (so a slow export still shows progress, compressed or not).
struct ChunkWriter<'a> {
    tx: &'a mpsc::Sender<BodyEvent>,
    body: BodyEncoder,
    /// Encoded but not yet coded output.
    raw: Vec<u8>,
    flush_interval: Duration,
    last_send: Instant,
}

impl<'a> ChunkWriter<'a> {
    fn new(tx: &'a mpsc::Sender<BodyEvent>, coding: ContentCoding, flush_ms: u64) -> Self {
        ChunkWriter {
            tx,
            body: BodyEncoder::new(coding),
            raw: Vec::new(),
            flush_interval: Duration::from_millis(flush_ms),
            last_send: Instant::now(),
        }
    }

    fn has_pending(&self) -> bool {
        !self.raw.is_empty() || self.body.has_pending()
    }

    /// The next item of `items`; while waiting for it, pending output is flushed on schedule.
    async fn next_or_flush<S>(&mut self, items: &mut S) -> Result<Option<S::Item>, Stop>
    where
        S: futures::Stream + Unpin,
    {
        loop {
            if !self.has_pending() {
                return Ok(items.next().await);
            }
            let deadline = self.last_send + self.flush_interval;
            match tokio::time::timeout_at(deadline, items.next()).await {
                Ok(item) => return Ok(item),
                Err(_) => self.flush().await?,
            }
        }
    }

    async fn send_raw(&mut self) -> Result<(), Stop> {
        let capacity = self.raw.capacity();
        let raw = std::mem::replace(&mut self.raw, Vec::with_capacity(capacity));
        let coded = self.body.write(raw).await.map_err(coding_failed)?;
        self.send(coded).await
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        self.send_raw().await?;
        let coded = self.body.flush().await.map_err(coding_failed)?;
        self.send(coded).await
    }

    async fn finish(&mut self) -> Result<(), Stop> {
        self.send_raw().await?;
        let coded = self.body.finish().await.map_err(coding_failed)?;
        self.send(coded).await
    }

    async fn send(&mut self, bytes: Bytes) -> Result<(), Stop> {
        self.last_send = Instant::now();
        if bytes.is_empty() {
            return Ok(());
        }
        self.tx.send(BodyEvent::Data(bytes)).await.map_err(|_| Stop::ClientGone)
    }
}

fn coding_failed(e: std::io::Error) -> Stop {
    Stop::Failed(ExportFailure { record: None, reason: format!("compression failed: {e}") })
}
