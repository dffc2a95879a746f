//! The record cache: U2 values by (collection, recordID, record version), bounded by bytes.
//! A version's value never changes, so entries are only ever evicted, never invalidated.

use crate::collection::Collection;
use crate::metrics;
use crate::upstream::{Credentials, ListingEntry, Upstream, UpstreamError};
use bytes::Bytes;
use std::sync::Arc;

/// Which value an entry holds. The collection is shared by every key of one export.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RecordKey {
    collection: Arc<str>,
    id: String,
    version: String,
}

/// The process's record cache; cheap to clone. A capacity of 0 turns it off.
#[derive(Clone)]
pub struct RecordCache {
    entries: Option<moka::sync::Cache<RecordKey, Bytes>>,
}

/// What an entry costs besides its value: the key's strings and moka's bookkeeping.
const ENTRY_OVERHEAD: usize = 96;

impl RecordCache {
    pub fn new(max_bytes: u64) -> RecordCache {
        let entries = (max_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weight)
                // moka settles its own size lazily; this gauge follows every insert at once.
                .eviction_listener(|key, value, _| {
                    metrics::get().cache_bytes.sub(i64::from(weight(&key, &value)));
                })
                .build()
        });
        RecordCache { entries }
    }

    /// One record of an export whose listing the caller's own credentials just read: from the
    /// cache when this version is there, otherwise from U2 (and then kept). `None`: deleted
    /// since the listing.
    ///
    /// A U2 answer is kept under the version it reports, which may be newer than the listing's
    /// (the record changed in between); a server that reports none is trusted to have sent the
    /// listed version or a newer one, which an export may serve anyway (SPEC: consistency).
    pub async fn record(
        &self,
        upstream: &Upstream,
        collection: &CacheScope,
        entry: ListingEntry,
        credentials: &Credentials,
    ) -> (String, Result<Option<Bytes>, UpstreamError>) {
        // Every listed record has a version; an empty one would name no value, so it is not cached.
        let Some(entries) = self.entries.as_ref().filter(|_| !entry.version.is_empty()) else {
            let fetched = upstream.record(&collection.collection, &entry.id, credentials).await;
            return (entry.id, fetched.map(|r| r.map(|r| r.value)));
        };
        let mut key =
            RecordKey { collection: Arc::clone(&collection.key), id: entry.id, version: entry.version };
        if let Some(value) = entries.get(&key) {
            metrics::get().cache_hits.inc();
            return (key.id, Ok(Some(value)));
        }
        metrics::get().cache_misses.inc();
        let fetched = match upstream.record(&collection.collection, &key.id, credentials).await {
            Ok(Some(record)) => record,
            other => return (key.id, other.map(|r| r.map(|r| r.value))),
        };
        if let Some(version) = fetched.version {
            key.version = version;
        }
        let id = key.id.clone();
        metrics::get().cache_bytes.add(i64::from(weight(&key, &fetched.value)));
        entries.insert(key, fetched.value.clone());
        (id, Ok(Some(fetched.value)))
    }
}

/// What an entry counts against the cache's capacity.
fn weight(key: &RecordKey, value: &Bytes) -> u32 {
    let size = ENTRY_OVERHEAD + key.collection.len() + key.id.len() + key.version.len() + value.len();
    u32::try_from(size).unwrap_or(u32::MAX)
}

/// One collection as the cache names it, built once per export.
pub struct CacheScope {
    collection: Collection,
    key: Arc<str>,
}

impl CacheScope {
    pub fn new(collection: &Collection) -> CacheScope {
        CacheScope { collection: collection.clone(), key: Arc::from(collection.to_string()) }
    }
}
