//! What export pipelines share: the events they send the response writer, how they stop early,
//! and the chunk writer that codes their output and flushes it on schedule.

use super::body::{BodyEncoder, ContentCoding};
use super::ordered::{InOrder, Step};
use super::plan::ExportItem;
use super::window::FetchWindow;
use crate::cache::RecordCache;
use crate::collection::Collection;
use crate::config::ExportConfig;
use crate::upstream::{Credentials, Upstream};
use bytes::Bytes;
use futures::StreamExt;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What a pipeline sends to the response writer.
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

/// What every export pipeline reads from: the records to write and how to fetch them.
pub struct ExportSource {
    /// The export thread the pipeline runs on; `upstream`'s connections live there too.
    pub runtime: tokio::runtime::Handle,
    pub upstream: Upstream,
    /// Where records are looked up before they are fetched.
    pub cache: RecordCache,
    pub collection: Collection,
    /// The caller's, forwarded on every fetch the export makes.
    pub credentials: Credentials,
    /// What to write, in recordID order.
    pub items: Vec<ExportItem>,
    /// Records written so far, for the export's log line.
    pub written: Arc<AtomicU64>,
    /// Record fetches in flight, adapted to the dataset server's latency as the export runs.
    pub window: FetchWindow,
    pub config: ExportConfig,
}

/// How a pipeline ends early.
pub enum Stop {
    Failed(ExportFailure),
    /// The response writer dropped its receiver: nobody is reading any more.
    ClientGone,
}

impl Stop {
    pub fn failed(record: Option<&str>, reason: impl Into<String>) -> Stop {
        Stop::Failed(ExportFailure { record: record.map(str::to_owned), reason: reason.into() })
    }
}

/// Chunks in flight between a pipeline and a slow client; with the fetch window this bounds
/// an export's memory whatever the collection's size.
const CHANNEL_CHUNKS: usize = 4;

/// Runs a pipeline as its own task on `runtime`. Dropping the returned receiver stops it at its
/// next send; aborting the task cancels whatever it has in flight.
pub fn spawn_pipeline<F, Fut>(
    runtime: &tokio::runtime::Handle,
    run: F,
) -> (mpsc::Receiver<BodyEvent>, tokio::task::JoinHandle<()>)
where
    F: FnOnce(mpsc::Sender<BodyEvent>) -> Fut,
    Fut: Future<Output = Result<u64, Stop>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    let work = run(tx.clone());
    let task = runtime.spawn(async move {
        let event = match work.await {
            Ok(records) => BodyEvent::Done { records },
            Err(Stop::Failed(failure)) => BodyEvent::Failed(failure),
            Err(Stop::ClientGone) => return,
        };
        let _ = tx.send(event).await;
    });
    (rx, task)
}

/// Accumulates output and sends it in chunks: when a chunk is full, and when data has waited
/// `flush_interval` (so a slow export still shows progress, compressed or not).
pub struct ChunkWriter {
    tx: mpsc::Sender<BodyEvent>,
    body: BodyEncoder,
    /// Output not yet coded and sent; pipelines write into it directly.
    pub raw: Vec<u8>,
    chunk_bytes: usize,
    flush_interval: Duration,
    last_send: Instant,
}

impl ChunkWriter {
    pub fn new(tx: mpsc::Sender<BodyEvent>, coding: ContentCoding, config: &ExportConfig) -> ChunkWriter {
        ChunkWriter {
            tx,
            body: BodyEncoder::new(coding),
            raw: Vec::with_capacity(config.chunk_bytes + config.chunk_bytes / 4),
            chunk_bytes: config.chunk_bytes,
            flush_interval: Duration::from_millis(config.flush_interval_ms),
            last_send: Instant::now(),
        }
    }

    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    fn has_pending(&self) -> bool {
        !self.raw.is_empty() || self.body.has_pending()
    }

    /// The next item of the plan in order: at once when it needs no fetch and nothing is
    /// queued ahead of it, otherwise as `next_or_flush` waits for it; `None` at the plan's end.
    pub async fn next_item<T: Unpin, F: Future<Output = T>>(
        &mut self,
        fetches: &mut InOrder<T, F>,
        next: impl FnMut() -> Option<Step<T, F>>,
    ) -> Result<Option<T>, Stop> {
        match fetches.fill(next) {
            Some(item) => Ok(Some(item)),
            None => self.next_or_flush(fetches).await,
        }
    }

    /// The next item of `items`; while waiting for it, pending output is flushed on schedule.
    pub async fn next_or_flush<S>(&mut self, items: &mut S) -> Result<Option<S::Item>, Stop>
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

    /// Sends what is buffered once it fills a chunk.
    pub async fn send_if_full(&mut self) -> Result<(), Stop> {
        if self.raw.len() >= self.chunk_bytes {
            self.send_raw().await?;
        }
        Ok(())
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

    /// Sends the rest and ends the coding (gzip trailer, zstd epilogue).
    pub async fn finish(&mut self) -> Result<(), Stop> {
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
    Stop::failed(None, format!("compression failed: {e}"))
}
