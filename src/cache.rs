//! The record cache: checked record values by (collection, recordID, record version), with their
//! compact JSON once converted, bounded by bytes. A version never changes, so entries only age out.

use crate::collection::Collection;
use crate::metrics;
use crate::upstream::ListingEntry;
use bytes::Bytes;
use std::sync::Arc;

/// Names one version of one record. The collection is shared by every key of one export.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RecordKey {
    collection: Arc<str>,
    pub id: String,
    version: String,
}

impl RecordKey {
    /// U2 may answer with a newer version than the listing named (the record changed in
    /// between); the value is then kept under the version it is. A server that reports no
    /// version is trusted to have sent the listed one or a newer one, which an export may
    /// serve anyway (SPEC: consistency).
    pub fn answered_as(&mut self, version: Option<String>) {
        if let Some(version) = version {
            self.version = version;
        }
    }
}

/// A cached record: U2's CBOR, already checked by an export's encoder, and its compact JSON
/// once an export has converted it.
#[derive(Clone, Debug)]
pub struct CachedRecord {
    pub cbor: Bytes,
    pub json: Option<Bytes>,
}

/// The process's record cache; cheap to clone. A capacity of 0 turns it off.
#[derive(Clone)]
pub struct RecordCache {
    entries: Option<Arc<quick_cache::sync::Cache<RecordKey, CachedRecord, Weight>>>,
}

/// Charges each entry what it holds, so the capacity is in bytes.
#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<RecordKey, CachedRecord> for Weight {
    fn weight(&self, key: &RecordKey, record: &CachedRecord) -> u64 {
        let values = record.cbor.len() + record.json.as_ref().map_or(0, Bytes::len);
        (ENTRY_OVERHEAD + key.collection.len() + key.id.len() + key.version.len() + values) as u64
    }
}

/// Entries are sized for this many bytes each when the table is first laid out.
const TYPICAL_ENTRY: u64 = 2048;

/// What an entry costs besides its values: the key's strings and the cache's bookkeeping.
const ENTRY_OVERHEAD: usize = 96;

impl RecordCache {
    pub fn new(max_bytes: u64) -> RecordCache {
        let entries = (max_bytes > 0).then(|| {
            let items = usize::try_from(max_bytes / TYPICAL_ENTRY).unwrap_or(usize::MAX).max(64);
            Arc::new(quick_cache::sync::Cache::with_weighter(items, max_bytes, Weight))
        });
        RecordCache { entries }
    }

    /// The record, if this version of it is cached. Callers look up only records of a listing
    /// the request's own credentials just read.
    pub fn get(&self, key: &RecordKey) -> Option<CachedRecord> {
        // Every listed record has a version; an empty one would name no value.
        let entries = self.entries.as_ref().filter(|_| !key.version.is_empty())?;
        let found = entries.get(key);
        let counter = if found.is_some() { &metrics::get().cache_hits } else { &metrics::get().cache_misses };
        counter.inc();
        found
    }

    /// Keeps a record whose CBOR an encoder has accepted. `json` is built only when the cache
    /// is on, since it copies the converted value out of the output buffer.
    pub fn insert(&self, key: RecordKey, cbor: Bytes, json: impl FnOnce() -> Option<Bytes>) {
        let Some(entries) = self.entries.as_ref().filter(|_| !key.version.is_empty()) else {
            return;
        };
        entries.insert(key, CachedRecord { cbor, json: json() });
        metrics::get().cache_bytes.set(i64::try_from(entries.weight()).unwrap_or(i64::MAX));
    }
}

/// One collection as the cache names it, built once per export.
pub struct CacheScope {
    key: Arc<str>,
}

impl CacheScope {
    pub fn new(collection: &Collection) -> CacheScope {
        CacheScope { key: Arc::from(collection.to_string()) }
    }

    /// The key of a listed record, taking the entry's strings rather than copying them.
    pub fn key(&self, entry: ListingEntry) -> RecordKey {
        RecordKey { collection: Arc::clone(&self.key), id: entry.id, version: entry.version }
    }
}
