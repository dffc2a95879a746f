//! The change feed's fan-out: one watcher per collection with subscribers, which turns each new
//! version into one shared event, and one mailbox per subscriber, where unread events merge.

use crate::codec::json::write_json_string;
use crate::collection::Collection;
use crate::journal::{JournalError, Seq, VersionJournal};
use crate::metrics;
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::Notify;

/// Subscribers that may be between connecting and joining at once. Each holds its listing
/// meanwhile; 10,000 connecting together (a reconnect storm) without this limit peaked at
/// 565 MB and stayed at 23 KB a subscriber once idle, with it at 87 MB and 6.6 KB, all
/// joined within 2.4 s (`bench events`, 1,000 records).
const JOINING_AT_ONCE: usize = 64;

/// All watchers. Cheap to clone; clones share the watchers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    journal: Arc<VersionJournal>,
    /// Subscribers between connecting and joining, each holding its listing in memory.
    joining: tokio::sync::Semaphore,
    watchers: Mutex<HashMap<Collection, Arc<Watcher>>>,
    /// Open event streams, for the connection cap.
    connections: AtomicUsize,
    next_subscriber: AtomicU64,
}

/// A collection's state as the feed last published it.
#[derive(Clone, Debug)]
pub struct FeedState {
    pub seq: Seq,
    pub version: String,
    /// Every current recordID, sorted.
    pub ids: Arc<Vec<String>>,
    /// The full event of this state (every id changed), built once for every new subscriber
    /// that has no resume point: thousands may connect at once.
    full_event: Arc<OnceLock<Bytes>>,
}

impl FeedState {
    pub fn new(seq: Seq, version: String, ids: Vec<String>) -> FeedState {
        FeedState { seq, version, ids: Arc::new(ids), full_event: Arc::new(OnceLock::new()) }
    }

    /// The re-sync event: id = this version, `recordIDs` and `changed` = every id.
    pub fn full_event(&self) -> Bytes {
        let bytes = self.full_event.get_or_init(|| serialize(&self.version, &self.ids, self.ids.iter()));
        bytes.clone()
    }
}

/// One collection's watcher: its last published state and its subscribers' mailboxes.
struct Watcher {
    /// Held while a version is compared, diffed and published, so publishes are in order.
    state: tokio::sync::Mutex<Option<FeedState>>,
    mailboxes: Mutex<HashMap<u64, Arc<Mailbox>>>,
}

/// An event as published: serialized once, shared by every subscriber that is keeping up.
#[derive(Debug)]
pub struct Event {
    pub version: String,
    pub record_ids: Arc<Vec<String>>,
    pub changed: Vec<String>,
    pub bytes: Bytes,
    /// When the change was announced (webhook or poll), for the delivery latency metric.
    pub noticed: Instant,
}

impl Event {
    pub fn new(
        version: String,
        record_ids: Arc<Vec<String>>,
        changed: Vec<String>,
        noticed: Instant,
    ) -> Event {
        let bytes = serialize(&version, &record_ids, changed.iter());
        Event { version, record_ids, changed, bytes, noticed }
    }
}

/// The SSE frame of an event: `id:` and one `data:` line of JSON.
fn serialize<'a>(version: &str, record_ids: &[String], changed: impl Iterator<Item = &'a String>) -> Bytes {
    let mut out = Vec::with_capacity(64 + record_ids.len() * 16);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(b"\ndata: {\"version\":");
    write_json_string(version, &mut out);
    out.extend_from_slice(b",\"recordIDs\":");
    write_list(record_ids.iter(), &mut out);
    out.extend_from_slice(b",\"changed\":");
    write_list(changed, &mut out);
    out.extend_from_slice(b"}\n\n");
    Bytes::from(out)
}

fn write_list<'a>(ids: impl Iterator<Item = &'a String>, out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, id) in ids.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(id, out);
    }
    out.push(b']');
}

/// What one subscriber has not read yet: nothing, one shared event, or several merged into one
/// (union of `changed`, latest ids and version), so memory stays bounded however far behind.
pub struct Mailbox {
    pending: Mutex<Option<Pending>>,
    notify: Notify,
    /// Events merged into another because this subscriber was behind (for metrics and tests).
    merges: AtomicU64,
}

enum Pending {
    One(Arc<Event>),
    /// `noticed` is the earliest announcement folded in: the latency the subscriber saw.
    Merged {
        version: String,
        record_ids: Arc<Vec<String>>,
        changed: BTreeSet<String>,
        noticed: Instant,
    },
}

impl Mailbox {
    fn new() -> Mailbox {
        Mailbox { pending: Mutex::new(None), notify: Notify::new(), merges: AtomicU64::new(0) }
    }

    fn post(&self, event: &Arc<Event>) {
        let mut pending = self.pending.lock().expect("mailbox lock");
        *pending = Some(match pending.take() {
            None => Pending::One(Arc::clone(event)),
            Some(earlier) => {
                self.merges.fetch_add(1, Ordering::Relaxed);
                metrics::get().pending_merges.inc();
                let (mut changed, noticed) = match earlier {
                    Pending::One(e) => (e.changed.iter().cloned().collect::<BTreeSet<_>>(), e.noticed),
                    Pending::Merged { changed, noticed, .. } => (changed, noticed),
                };
                changed.extend(event.changed.iter().cloned());
                Pending::Merged {
                    version: event.version.clone(),
                    record_ids: Arc::clone(&event.record_ids),
                    changed,
                    noticed,
                }
            }
        });
        drop(pending);
        self.notify.notify_one();
    }

    /// Waits until something is pending.
    pub async fn ready(&self) {
        self.notify.notified().await;
    }

    /// The pending event's bytes and when its change was announced, if any; a merged event is
    /// serialized here, for this subscriber alone.
    pub fn take(&self) -> Option<(Bytes, Instant)> {
        let pending = self.pending.lock().expect("mailbox lock").take()?;
        Some(match pending {
            Pending::One(event) => (event.bytes.clone(), event.noticed),
            Pending::Merged { version, record_ids, changed, noticed } => {
                (serialize(&version, &record_ids, changed.iter()), noticed)
            }
        })
    }

    pub fn merges(&self) -> u64 {
        self.merges.load(Ordering::Relaxed)
    }
}

/// A subscriber's place in the feed; leaving (drop) removes it, and the watcher with the last.
pub struct Subscription {
    hub: Arc<HubInner>,
    collection: Collection,
    watcher: Arc<Watcher>,
    id: u64,
    pub mailbox: Arc<Mailbox>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.connections.fetch_sub(1, Ordering::Relaxed);
        metrics::get().subscribers.dec();
        let mut watchers = self.hub.watchers.lock().expect("watchers lock");
        let mut mailboxes = self.watcher.mailboxes.lock().expect("mailboxes lock");
        mailboxes.remove(&self.id);
        let is_current = watchers.get(&self.collection).is_some_and(|w| Arc::ptr_eq(w, &self.watcher));
        if mailboxes.is_empty() && is_current {
            watchers.remove(&self.collection);
        }
    }
}

/// A connection slot; at the cap none is given.
pub struct Slot {
    hub: Arc<HubInner>,
    taken: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.taken {
            self.hub.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Hub {
    pub fn new(journal: Arc<VersionJournal>) -> Hub {
        let inner = HubInner {
            journal,
            joining: tokio::sync::Semaphore::new(JOINING_AT_ONCE),
            watchers: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            next_subscriber: AtomicU64::new(0),
        };
        Hub { inner: Arc::new(inner) }
    }

    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Waits for a turn to join: at most `JOINING_AT_ONCE` subscribers read their listing and
    /// join at a time, whatever the size of a reconnect storm.
    pub async fn joining_turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        // The semaphore is never closed.
        self.inner.joining.acquire().await.expect("the joining semaphore is never closed")
    }

    /// Reserves one of `max` connections, or `None` at the cap.
    pub fn reserve(&self, max: usize) -> Option<Slot> {
        let taken = self.inner.connections.fetch_add(1, Ordering::Relaxed);
        let slot = Slot { hub: Arc::clone(&self.inner), taken: false };
        (taken < max).then_some(slot)
    }

    /// Collections with subscribers (the poller re-reads them).
    pub fn watched(&self) -> Vec<Collection> {
        self.inner.watchers.lock().expect("watchers lock").keys().cloned().collect()
    }

    /// Joins the feed of `collection`, whose listing the subscriber just read as `seen`.
    /// Returns the state the subscriber's mailbox continues from.
    pub async fn join(
        &self,
        mut slot: Slot,
        collection: &Collection,
        seen: FeedState,
    ) -> (Subscription, FeedState) {
        let id = self.inner.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let mailbox = Arc::new(Mailbox::new());
        // The mailbox joins under the watchers lock, so the last subscriber leaving cannot drop
        // the watcher between our lookup and our joining.
        let watcher = {
            let mut watchers = self.inner.watchers.lock().expect("watchers lock");
            let watcher = watchers.entry(collection.clone()).or_insert_with(|| {
                Arc::new(Watcher {
                    state: tokio::sync::Mutex::new(None),
                    mailboxes: Mutex::new(HashMap::new()),
                })
            });
            watcher.mailboxes.lock().expect("mailboxes lock").insert(id, Arc::clone(&mailbox));
            Arc::clone(watcher)
        };
        let mut state = watcher.state.lock().await;
        self.advance(&watcher, &mut state, collection, seen.clone(), Instant::now()).await;
        // The state returned supersedes whatever was posted before it.
        mailbox.take();
        let current = state.clone().unwrap_or(seen);
        drop(state);
        slot.taken = true;
        metrics::get().subscribers.inc();
        let subscription = Subscription {
            hub: Arc::clone(&self.inner),
            collection: collection.clone(),
            watcher,
            id,
            mailbox,
        };
        (subscription, current)
    }

    /// A new version of `collection` was recorded; publishes it to subscribers, if any.
    pub async fn publish(&self, collection: &Collection, recorded: FeedState, noticed: Instant) {
        let watcher = self.inner.watchers.lock().expect("watchers lock").get(collection).cloned();
        let Some(watcher) = watcher else { return };
        let mut state = watcher.state.lock().await;
        self.advance(&watcher, &mut state, collection, recorded, noticed).await;
    }

    /// Moves the watcher to `newer` if it is newer, publishing one event for the step.
    async fn advance(
        &self,
        watcher: &Watcher,
        state: &mut Option<FeedState>,
        collection: &Collection,
        newer: FeedState,
        noticed: Instant,
    ) {
        let Some(current) = state.as_ref() else {
            *state = Some(newer);
            return;
        };
        if newer.seq <= current.seq {
            return;
        }
        if newer.version.contains(['\r', '\n', '\0']) {
            tracing::error!(collection = %collection, version = ?newer.version, "version cannot be an event id");
            return;
        }
        let changed = match self.changed_between(collection, current, &newer).await {
            Ok(changed) => changed,
            Err(e) => {
                tracing::error!(collection = %collection, error = %e, "cannot diff versions for the feed");
                return;
            }
        };
        let event = Arc::new(Event::new(newer.version.clone(), Arc::clone(&newer.ids), changed, noticed));
        metrics::get().events_published.inc();
        for mailbox in watcher.mailboxes.lock().expect("mailboxes lock").values() {
            mailbox.post(&event);
        }
        *state = Some(newer);
    }

    /// Ids changed or deleted from `from` to `to`. If `from` was pruned meanwhile, every id
    /// of both states counts as changed: over-reporting is safe, missing a change is not.
    async fn changed_between(
        &self,
        collection: &Collection,
        from: &FeedState,
        to: &FeedState,
    ) -> Result<Vec<String>, String> {
        let journal = Arc::clone(&self.inner.journal);
        let (c, from_seq, to_seq) = (collection.clone(), from.seq, to.seq);
        let diff = tokio::task::spawn_blocking(move || journal.diff(&c, Some(from_seq), to_seq))
            .await
            .map_err(|e| e.to_string())?;
        match diff {
            Ok(diff) => Ok(union(diff.changed, diff.deleted)),
            Err(JournalError::NotKept { .. }) => {
                Ok(union(from.ids.as_ref().clone(), to.ids.as_ref().clone()))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The sorted union of two sorted, duplicate-free lists.
pub fn union(a: Vec<String>, b: Vec<String>) -> Vec<String> {
    let mut all: Vec<String> = a.into_iter().chain(b).collect();
    all.sort_unstable();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(version: &str, ids: &[&str], changed: &[&str]) -> Arc<Event> {
        let ids = Arc::new(ids.iter().map(|s| s.to_string()).collect());
        let changed = changed.iter().map(|s| s.to_string()).collect();
        Arc::new(Event::new(version.into(), ids, changed, Instant::now()))
    }

    #[test]
    fn an_event_is_one_sse_frame() {
        let e = event("7", &["a", "b\u{2028}"], &["b\u{2028}"]);
        assert_eq!(
            std::str::from_utf8(&e.bytes).expect("utf-8"),
            "id: 7\ndata: {\"version\":\"7\",\"recordIDs\":[\"a\",\"b\\u2028\"],\"changed\":[\"b\\u2028\"]}\n\n"
        );
    }

    #[test]
    fn unread_events_merge_into_one() {
        let mailbox = Mailbox::new();
        let first = event("1", &["a", "b"], &["a"]);
        mailbox.post(&first);
        assert_eq!(mailbox.take().map(|t| t.0), Some(first.bytes.clone()), "a lone event is shared");
        mailbox.post(&event("2", &["a", "b"], &["b"]));
        mailbox.post(&event("3", &["b", "c"], &["a", "c"]));
        let (merged, _) = mailbox.take().expect("pending");
        assert_eq!(
            std::str::from_utf8(&merged).expect("utf-8"),
            "id: 3\ndata: {\"version\":\"3\",\"recordIDs\":[\"b\",\"c\"],\"changed\":[\"a\",\"b\",\"c\"]}\n\n"
        );
        assert_eq!(mailbox.merges(), 1);
        assert!(mailbox.take().is_none());
    }
}
