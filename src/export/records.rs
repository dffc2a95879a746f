//! The record export pipeline: fetch records in listing order within the fetch window,
//! encode them, code the body and hand it out in chunks. Runs as its own task per export.

use super::body::ContentCoding;
use super::chunks::{spawn_pipeline, BodyEvent, ChunkWriter, ExportSource, Stop};
use super::encoder::RecordEncoder;
use super::fetch::{Fetched, RecordSource};
use super::ordered::{InOrder, Step};
use super::plan::ExportItem;
use super::route::Encoding;
use crate::cache::{CacheScope, RecordCache, RecordKey};
use crate::collection::Collection;
use bytes::Bytes;
use futures::FutureExt;
use std::future::Future;
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
        let runtime = self.source.runtime.clone();
        spawn_pipeline(&runtime, |tx| self.run(tx))
    }

    async fn run(self, tx: mpsc::Sender<BodyEvent>) -> Result<u64, Stop> {
        let RecordExport { source, encoding, coding } = self;
        let ExportSource { upstream, cache, collection, credentials, items, written, window, config, .. } =
            source;
        let scope = CacheScope::new(&collection);
        let records = RecordSource {
            upstream: &upstream,
            cache: &cache,
            scope: &scope,
            collection: &collection,
            credentials: &credentials,
        };
        let mut out = ChunkWriter::new(tx, coding, &config);
        let mut writer = Writer {
            encoder: RecordEncoder::new(encoding),
            encoding,
            cache: &cache,
            collection: &collection,
        };
        writer.encoder.begin(&mut out.raw);

        let mut steps = RecordSteps { items: items.into_iter(), records: &records };
        let mut fetches = InOrder::new(window);
        while let Some(item) = out.next_item(&mut fetches, || steps.next_step()).await? {
            match item {
                Item::Tombstone(id) => writer.encoder.tombstone(&id, &mut out.raw),
                Item::Record(fetched) => writer.write(fetched, &mut out.raw)?,
            }
            written.store(writer.encoder.records_written(), Ordering::Relaxed);
            out.send_if_full().await?;
        }
        writer.encoder.end(&mut out.raw);
        out.finish().await?;
        Ok(writer.encoder.records_written())
    }
}

/// The plan's items as steps: cache hits and tombstones at once, the rest fetched.
struct RecordSteps<'a> {
    items: std::vec::IntoIter<ExportItem>,
    records: &'a RecordSource<'a>,
}

impl<'a> RecordSteps<'a> {
    fn next_step(&mut self) -> Option<Step<Item, impl Future<Output = Item> + Send + 'a>> {
        Some(match self.items.next()? {
            ExportItem::Tombstone(id) => Step::Ready(Item::Tombstone(id)),
            ExportItem::Record(entry) => match self.records.cached(entry) {
                Ok(hit) => Step::Ready(Item::Record(hit)),
                Err(key) => Step::Fetch(self.records.from_upstream(key).map(Item::Record)),
            },
        })
    }
}

/// One export item once its fetch (if any) is done.
enum Item {
    Record(Fetched),
    Tombstone(String),
}

/// Encodes records into the output, and keeps what it checked or converted in the cache.
struct Writer<'a> {
    encoder: RecordEncoder,
    encoding: Encoding,
    cache: &'a RecordCache,
    collection: &'a Collection,
}

impl Writer<'_> {
    fn write(&mut self, fetched: Fetched, out: &mut Vec<u8>) -> Result<(), Stop> {
        match fetched {
            Fetched::Cached(key, cached) => match (self.encoding, cached.json) {
                (Encoding::Cbor, _) => self.encoder.encoded(&key.id, &cached.cbor, out),
                (_, Some(json)) => self.encoder.encoded(&key.id, &json, out),
                (_, None) => self.encode_and_keep(key, cached.cbor, out)?,
            },
            Fetched::Fetched(mut key, Ok(Some(record))) => {
                key.answered_as(record.version);
                self.encode_and_keep(key, record.value, out)?;
            }
            // Deleted between the listing and its fetch: the listing's version predates
            // the deletion, and the next sync reports it.
            Fetched::Fetched(_, Ok(None)) => {}
            Fetched::Fetched(key, Err(e)) => {
                tracing::warn!(collection = %self.collection, record = %key.id, error = %e, "record fetch failed");
                return Err(Stop::failed(Some(&key.id), e.to_string()));
            }
        }
        Ok(())
    }

    /// Checks and encodes U2's CBOR, then caches it with its JSON form when one was made.
    fn encode_and_keep(&mut self, key: RecordKey, cbor: Bytes, out: &mut Vec<u8>) -> Result<(), Stop> {
        let range = match self.encoder.record(&key.id, &cbor, out) {
            Ok(range) => range,
            Err(e) => {
                tracing::warn!(collection = %self.collection, record = %key.id, error = %e, "record is not valid CBOR");
                let reason = format!("the stored value is not valid CBOR: {e}");
                return Err(Stop::failed(Some(&key.id), reason));
            }
        };
        let is_json = self.encoding != Encoding::Cbor;
        self.cache.insert(key, cbor, || is_json.then(|| Bytes::copy_from_slice(&out[range])));
        Ok(())
    }
}
