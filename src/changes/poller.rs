//! Background upkeep: polling listings for dataset servers that send no webhooks, and pruning
//! the journal. Polls cover collections with event-stream subscribers or exported lately.

use super::hub::Hub;
use super::refresh::Refresher;
use crate::collection::Collection;
use crate::journal::{Retention, VersionJournal};
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// When each collection was last exported, so the poller knows which ones clients care about.
#[derive(Default)]
pub struct RecentExports {
    seen: Mutex<HashMap<Collection, Instant>>,
}

impl RecentExports {
    pub fn touch(&self, collection: &Collection) {
        let mut seen = self.seen.lock().expect("recent exports lock");
        match seen.get_mut(collection) {
            Some(at) => *at = Instant::now(),
            None => {
                seen.insert(collection.clone(), Instant::now());
            }
        }
    }

    /// Collections exported within `window`; older entries are forgotten.
    pub fn within(&self, window: Duration) -> Vec<Collection> {
        let mut seen = self.seen.lock().expect("recent exports lock");
        seen.retain(|_, at| at.elapsed() <= window);
        seen.keys().cloned().collect()
    }
}

/// The background service that polls and prunes until shutdown.
pub struct Upkeep {
    pub refresher: Refresher,
    pub recent: Arc<RecentExports>,
    /// Its watched collections are polled too.
    pub hub: Hub,
    pub journal: Arc<VersionJournal>,
    pub retention: Retention,
    /// `None` disables polling.
    pub poll_interval: Option<Duration>,
    pub poll_window: Duration,
    pub prune_interval: Duration,
}

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // A disabled poll still needs a timer to select on; it just never does anything.
        let mut poll = tokio::time::interval(self.poll_interval.unwrap_or(Duration::from_secs(3600)));
        let mut prune = tokio::time::interval(self.prune_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = poll.tick(), if self.poll_interval.is_some() => self.poll(),
                _ = prune.tick() => self.prune().await,
            }
        }
    }
}

impl Upkeep {
    fn poll(&self) {
        let mut collections = self.recent.within(self.poll_window);
        collections.extend(self.hub.watched());
        collections.sort_by_key(|c| c.to_string());
        collections.dedup();
        for collection in collections {
            self.refresher.request(collection);
        }
    }

    async fn prune(&self) {
        let journal = Arc::clone(&self.journal);
        let retention = self.retention.clone();
        let outcome = tokio::task::spawn_blocking(move || journal.prune(&retention, SystemTime::now())).await;
        match outcome {
            Ok(Ok(stats)) if stats.versions > 0 || stats.records > 0 => {
                tracing::info!(versions = stats.versions, records = stats.records, "pruned the journal")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "journal pruning failed"),
            Err(e) => tracing::error!(error = %e, "journal pruning task failed"),
        }
    }
}
