//! Listing re-reads after a collection may have changed (a webhook, a poll), each recorded in
//! the journal. A burst for one collection causes at most one read in flight plus one queued.

use super::hub::{FeedState, Hub};
use crate::collection::Collection;
use crate::journal::{record_listing, VersionJournal};
use crate::upstream::{Credentials, Upstream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Schedules re-reads. Cheap to clone; clones share the schedule.
#[derive(Clone)]
pub struct Refresher {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    journal: Arc<VersionJournal>,
    /// Hears of every version recorded, for the change feed's subscribers.
    hub: Hub,
    /// The sidecar's own credentials (`changes.upstream_authorization`), never a client's.
    credentials: Credentials,
    /// Collections with a read in flight, and when the first request queued behind it came
    /// (the queued read serves every request since; its events are timed from the first).
    in_flight: Mutex<HashMap<Collection, Option<Instant>>>,
    /// The last `ETag` each collection's listing carried, sent back as `If-None-Match`.
    etags: Mutex<HashMap<Collection, String>>,
}

impl Refresher {
    pub fn new(
        upstream: Upstream,
        journal: Arc<VersionJournal>,
        hub: Hub,
        credentials: Credentials,
    ) -> Refresher {
        let inner = Inner {
            upstream,
            journal,
            hub,
            credentials,
            in_flight: Mutex::new(HashMap::new()),
            etags: Mutex::new(HashMap::new()),
        };
        Refresher { inner: Arc::new(inner) }
    }

    /// Asks for a re-read of `collection`; returns at once. Must be called within a runtime.
    pub fn request(&self, collection: Collection) {
        {
            let mut in_flight = self.inner.in_flight.lock().expect("refresh schedule lock");
            if let Some(queued) = in_flight.get_mut(&collection) {
                // One read is running; one more after it sees every change up to then.
                queued.get_or_insert_with(Instant::now);
                return;
            }
            in_flight.insert(collection.clone(), None);
        }
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move { inner.run(collection, Instant::now()).await });
    }

    /// True while a re-read of `collection` is running or queued (for tests and metrics).
    pub fn is_busy(&self, collection: &Collection) -> bool {
        self.inner.in_flight.lock().expect("refresh schedule lock").contains_key(collection)
    }
}

impl Inner {
    async fn run(&self, collection: Collection, mut noticed: Instant) {
        loop {
            self.read_once(&collection, noticed).await;
            let mut in_flight = self.in_flight.lock().expect("refresh schedule lock");
            match in_flight.get_mut(&collection).and_then(Option::take) {
                Some(queued_at) => noticed = queued_at,
                None => {
                    in_flight.remove(&collection);
                    return;
                }
            }
        }
    }

    /// One listing read, recorded and published; `noticed` is when the change was announced.
    async fn read_once(&self, collection: &Collection, noticed: Instant) {
        let etag = self.etags.lock().expect("etag lock").get(collection).cloned();
        let listing =
            match self.upstream.listing_if_changed(collection, &self.credentials, etag.as_deref()).await {
                Ok(Some(listing)) => listing,
                Ok(None) => {
                    tracing::debug!(collection = %collection, "listing unchanged");
                    return;
                }
                Err(e) if e.is_refusal() => {
                    let hint = "set changes.upstream_authorization if the collection is protected";
                    tracing::warn!(collection = %collection, error = %e, hint, "listing re-read refused");
                    return;
                }
                Err(e) => {
                    tracing::warn!(collection = %collection, error = %e, "listing re-read failed");
                    return;
                }
            };
        if let Some(etag) = &listing.etag {
            self.etags.lock().expect("etag lock").insert(collection.clone(), etag.clone());
        }
        match record_listing(&self.journal, collection, listing).await {
            Ok((seq, listing)) => {
                tracing::debug!(collection = %collection, version = listing.version, "recorded version");
                let ids = listing.entries.into_iter().map(|e| e.id).collect();
                let state = FeedState::new(seq, listing.version, ids);
                self.hub.publish(collection, state, noticed).await;
            }
            Err(e) => tracing::error!(collection = %collection, error = %e, "cannot record version"),
        }
    }
}
