//! One listed record of an export: from the record cache when this version is there, otherwise
//! from U2 with the caller's credentials. Both record and zip pipelines read records this way.

use crate::cache::{CacheScope, CachedRecord, RecordCache, RecordKey};
use crate::collection::Collection;
use crate::upstream::{Credentials, ListingEntry, Record, Upstream, UpstreamError};

/// A record once looked up. Only `Fetched` values still need checking before they are used.
pub enum Fetched {
    Cached(RecordKey, CachedRecord),
    /// U2's answer; `Ok(None)` when the record was deleted since the listing.
    Fetched(RecordKey, Result<Option<Record>, UpstreamError>),
}

/// Where a pipeline's records come from; borrowed by every fetch of one export.
pub struct RecordSource<'a> {
    pub upstream: &'a Upstream,
    pub cache: &'a RecordCache,
    pub scope: &'a CacheScope,
    pub collection: &'a Collection,
    pub credentials: &'a Credentials,
}

impl RecordSource<'_> {
    pub async fn fetch(&self, entry: ListingEntry) -> Fetched {
        let key = self.scope.key(entry);
        if let Some(cached) = self.cache.get(&key) {
            return Fetched::Cached(key, cached);
        }
        let answer = self.upstream.record(self.collection, &key.id, self.credentials).await;
        Fetched::Fetched(key, answer)
    }
}
