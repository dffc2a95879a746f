//! The record export pipeline: fetch records in listing order with bounded concurrency,
//! encode them, code the body and hand it out in chunks. Runs as its own task per export.

use super::body::ContentCoding;
use super::chunks::{spawn_pipeline, BodyEvent, ChunkWriter, ExportSource, Stop};
use super::encoder::RecordEncoder;
use super::plan::ExportItem;
use super::route::Encoding;
use crate::cache::CacheScope;
use crate::upstream::UpstreamError;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// Everything one record export needs, moved into its task.
pub struct RecordExport {
    pub source: ExportSource,
    pub encoding: Encoding,
    pub coding: ContentCoding,
}

impl RecordExport {
    /// Starts the pipeline as its own task (see `spawn_pipeline`).
    pub fn spawn(self) -> (mpsc::Receiver<BodyEvent>, tokio::task::JoinHandle<()>) {
        spawn_pipeline(|tx| self.run(tx))
    }

    async fn run(self, tx: mpsc::Sender<BodyEvent>) -> Result<u64, Stop> {
        let RecordExport { source, encoding, coding } = self;
        let ExportSource { upstream, cache, collection, credentials, items, written, concurrency, config } =
            source;
        let scope = CacheScope::new(&collection);
        let mut out = ChunkWriter::new(tx, coding, &config);
        let mut encoder = RecordEncoder::new(encoding);
        encoder.begin(&mut out.raw);

        let fetches = stream::iter(items).map(|item| {
            let (upstream, cache, scope, credentials) = (&upstream, &cache, &scope, &credentials);
            async move {
                match item {
                    ExportItem::Record(entry) => {
                        let (id, value) = cache.record(upstream, scope, entry, credentials).await;
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
                        return Err(Stop::failed(Some(&id), reason));
                    }
                }
                // Deleted between the listing and its fetch: the listing's version predates
                // the deletion, and the next sync reports it.
                Fetched::Value(Ok(None)) => {}
                Fetched::Value(Err(e)) => {
                    tracing::warn!(collection = %collection, record = %id, error = %e, "record fetch failed");
                    return Err(Stop::failed(Some(&id), e.to_string()));
                }
            }
            written.store(encoder.records_written(), Ordering::Relaxed);
            out.send_if_full().await?;
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
