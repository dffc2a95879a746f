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
    /// The record from the cache, or its key when it has to be fetched.
    pub fn cached(&self, entry: ListingEntry) -> Result<Fetched, RecordKey> {
        let key = self.scope.key(entry);
        match self.cache.get(&key) {
            Some(cached) => Ok(Fetched::Cached(key, cached)),
            None => Err(key),
        }
    }

    /// U2's answer for a record the cache does not hold.
    pub async fn from_upstream(&self, key: RecordKey) -> Fetched {
        let answer = self.upstream.record(self.collection, &key.id, self.credentials).await;
        Fetched::Fetched(key, answer)
    }
}
