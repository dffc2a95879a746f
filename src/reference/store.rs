//! The reference server's state: collections of versioned CBOR records, attachments, access
//! tokens, injected faults and the request log, shared by the HTTP routes and by tests.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;

use super::capacity::Capacity;
use super::fault::RecordFault;
use super::value;
use super::webhook::ChangeNotice;

/// Names a collection the way its URL does (`/{realm}/{user}:{name}/`), so tests and routes
/// address the same thing.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CollectionId {
    /// `datasets` or `lenses` over HTTP; the store itself accepts any realm.
    pub realm: String,
    /// The owner's user name.
    pub user: String,
    /// The collection's name within the owner's realm.
    pub name: String,
}

impl CollectionId {
    /// Saves the caller three `to_string()`s.
    pub fn new(realm: impl Into<String>, user: impl Into<String>, name: impl Into<String>) -> Self {
        CollectionId { realm: realm.into(), user: user.into(), name: name.into() }
    }
}

impl fmt::Display for CollectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.realm, self.user, self.name)
    }
}

/// One request as the server received it, so tests can check exactly what the sidecar sent
/// upstream (the path is raw, still percent-encoded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    /// The HTTP method, e.g. `GET`.
    pub method: String,
    /// The path exactly as received, without the query.
    pub path: String,
    /// The query string without its `?`, if there was one.
    pub query: Option<String>,
}

/// Oldest requests are dropped beyond this, so a long-running demo does not grow forever.
const REQUEST_LOG_LIMIT: usize = 100_000;

/// The characters JavaScript's `encodeURIComponent` leaves alone; everything else is escaped.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// The link form the dataset server hands out for an attachment, and that records embed:
/// `hash://sha256/<hex>?type=<content type, URI-component encoded>`.
pub fn attachment_link(hex: &str, content_type: &str) -> String {
    format!("hash://sha256/{hex}?type={}", utf8_percent_encode(content_type, URI_COMPONENT))
}

/// The whole in-memory dataset server; cheap to clone (an `Arc`), so the routes, the demo and
/// the tests all hold the same one.
#[derive(Clone)]
pub struct Store {
    /// Shared by every clone.
    inner: Arc<Inner>,
}

/// Behind the `Arc`. Plain `std` mutexes: every critical section is a few map operations and
/// never awaits, so an async mutex would only add cost.
struct Inner {
    /// Collections, attachments, tokens and faults, under one lock so a write is atomic.
    state: Mutex<State>,
    /// Separate from `state` so logging a request never waits on a bulk write.
    log: Mutex<VecDeque<LoggedRequest>>,
    /// Where changes are announced for webhook delivery; `None` when no webhook is configured.
    notices: Option<UnboundedSender<ChangeNotice>>,
}

#[derive(Default)]
struct State {
    /// Every collection ever written, including deleted ones (see `Collection`).
    collections: HashMap<CollectionId, Collection>,
    /// Keyed by lower-case sha256 hex: attachments are content-addressed.
    attachments: HashMap<String, Attachment>,
    /// Collections that need a bearer token or session cookie, and the token that opens them.
    tokens: HashMap<CollectionId, String>,
    /// Test hooks: records whose U2 misbehaves on purpose.
    faults: HashMap<(CollectionId, String), RecordFault>,
    /// Test hooks: collections whose U1 misbehaves on purpose.
    listing_faults: HashMap<CollectionId, RecordFault>,
    /// Slots every record answer queues for, when the server's capacity is limited.
    capacity: Option<Arc<Capacity>>,
    /// Test hooks: collections whose U1 is delayed on purpose.
    listing_delays: HashMap<CollectionId, std::time::Duration>,
}

/// A collection's records and version. Kept (with `live` false) after the collection is
/// deleted, so a re-created collection continues its version count and never reuses a version.
#[derive(Default)]
struct Collection {
    /// The version of the last write that changed something.
    version: u64,
    /// False before the first write and after a deletion: the collection does not exist then.
    live: bool,
    /// A `BTreeMap` so listings come out in recordID byte order without sorting.
    records: BTreeMap<String, StoredRecord>,
}

struct StoredRecord {
    /// The collection version of this record's last change.
    version: u64,
    /// One CBOR item (or, after `put_raw`, anything).
    value: Bytes,
}

/// A stored blob and the content type it is served with.
#[derive(Clone)]
pub(super) struct Attachment {
    pub(super) bytes: Bytes,
    pub(super) content_type: String,
}

/// What one write request does to a collection; values are already checked.
pub(super) enum Edit {
    /// Set each `Some`, delete each `None`; other records stay.
    Merge(Vec<(String, Option<Bytes>)>),
    /// The collection afterwards holds exactly these records.
    Replace(Vec<(String, Bytes)>),
}

impl Collection {
    /// Applies an edit; returns the collection's version afterwards and whether anything
    /// changed. A request that changes nothing (and creates nothing) keeps the version.
    fn apply(&mut self, edit: Edit) -> (u64, bool) {
        let next = self.version + 1;
        let mut changed = !self.live;
        match edit {
            Edit::Merge(changes) => {
                for (id, value) in changes {
                    changed |= self.set(id, value, next);
                }
            }
            Edit::Replace(records) => {
                let listed: HashSet<&str> = records.iter().map(|(id, _)| id.as_str()).collect();
                let before = self.records.len();
                self.records.retain(|id, _| listed.contains(id.as_str()));
                changed |= self.records.len() != before;
                for (id, value) in records {
                    changed |= self.set(id, Some(value), next);
                }
            }
        }
        self.live = true;
        if changed {
            self.version = next;
        }
        (self.version, changed)
    }

    /// Sets or deletes one record; true if that changed it.
    fn set(&mut self, id: String, value: Option<Bytes>, version: u64) -> bool {
        let Some(value) = value else {
            return self.records.remove(&id).is_some();
        };
        if self.records.get(&id).is_some_and(|record| record.value == value) {
            return false;
        }
        self.records.insert(id, StoredRecord { version, value });
        true
    }
}

impl Store {
    /// An empty store; `notices` receives one message per change when webhooks are configured.
    pub(super) fn new(notices: Option<UnboundedSender<ChangeNotice>>) -> Store {
        let inner = Inner { state: Mutex::default(), log: Mutex::default(), notices };
        Store { inner: Arc::new(inner) }
    }

    /// Merges changes into a collection (creating it) as one write, the in-process twin of
    /// `POST .../records/`: `None`, or a value that is CBOR null/undefined, deletes.
    /// Returns the collection's version afterwards; sends the webhook if anything changed.
    ///
    /// # Panics
    /// If an ID is empty or a value is not exactly one well-formed CBOR item: that is a bug in
    /// the calling test or seed (use [`Store::put_raw`] to store malformed bytes on purpose).
    pub fn write(&self, c: &CollectionId, changes: Vec<(String, Option<bytes::Bytes>)>) -> u64 {
        let changes = changes
            .into_iter()
            .map(|(id, value)| {
                let value = value.and_then(|bytes| checked_value(&id, bytes));
                (id, value)
            })
            .collect();
        self.apply(c, Edit::Merge(changes))
    }

    /// Replaces a collection's records as one write (unlisted IDs are deleted), the twin of
    /// `PUT .../records/`. Null values are left out. Panics like [`Store::write`].
    pub fn replace(&self, c: &CollectionId, records: Vec<(String, bytes::Bytes)>) -> u64 {
        let records = records
            .into_iter()
            .filter_map(|(id, bytes)| checked_value(&id, bytes).map(|value| (id, value)))
            .collect();
        self.apply(c, Edit::Replace(records))
    }

    /// Test hook: stores bytes without checking that they are CBOR, as a write, so U2 can be
    /// made to serve malformed values, or to hold an empty recordID as some other server might.
    pub fn put_raw(&self, c: &CollectionId, id: &str, bytes: bytes::Bytes) -> u64 {
        self.apply(c, Edit::Merge(vec![(id.to_owned(), Some(bytes))]))
    }

    /// Test hook: makes U2 of one record misbehave (`None` clears the fault). The record need
    /// not exist; `Status` and `Delay` apply even when it does not.
    pub fn set_fault(&self, c: &CollectionId, id: &str, fault: Option<RecordFault>) {
        let key = (c.clone(), id.to_owned());
        let mut state = self.lock();
        match fault {
            Some(fault) => state.faults.insert(key, fault),
            None => state.faults.remove(&key),
        };
    }

    /// Test hook: delays every U1 of the collection (`None` removes the delay), so tests can
    /// hold a listing read in flight.
    pub fn set_listing_delay(&self, c: &CollectionId, delay: Option<std::time::Duration>) {
        let mut state = self.lock();
        match delay {
            Some(delay) => state.listing_delays.insert(c.clone(), delay),
            None => state.listing_delays.remove(c),
        };
    }

    /// Test hook: every record answer (U2) from now on queues for one of `capacity`'s slots
    /// (`None` lifts the limit); keep the `Arc` to read its queue's stats.
    pub fn limit_capacity(&self, capacity: Option<Arc<Capacity>>) {
        self.lock().capacity = capacity;
    }

    pub(super) fn capacity(&self) -> Option<Arc<Capacity>> {
        self.lock().capacity.clone()
    }

    /// Test hook: makes every U1 of the collection misbehave (`None` clears the fault), so tests
    /// see how the sidecar copes with a listing that fails, breaks off or is not a map.
    pub fn set_listing_fault(&self, c: &CollectionId, fault: Option<RecordFault>) {
        let mut state = self.lock();
        match fault {
            Some(fault) => state.listing_faults.insert(c.clone(), fault),
            None => state.listing_faults.remove(c),
        };
    }

    pub(super) fn listing_fault(&self, c: &CollectionId) -> Option<RecordFault> {
        self.lock().listing_faults.get(c).cloned()
    }

    pub(super) fn listing_delay(&self, c: &CollectionId) -> Option<std::time::Duration> {
        self.lock().listing_delays.get(c).copied()
    }

    /// Requires `Authorization: Bearer <token>` or cookie `session=<token>` for every read and
    /// write of the collection (`None` opens it again). Works before the collection exists.
    pub fn protect(&self, c: &CollectionId, token: Option<String>) {
        let mut state = self.lock();
        match token {
            Some(token) => state.tokens.insert(c.clone(), token),
            None => state.tokens.remove(c),
        };
    }

    /// Stores a blob under its sha256 and returns the lower-case hex, as `POST /attachments` does.
    pub fn add_attachment(&self, bytes: bytes::Bytes, content_type: &str) -> String {
        let hex = format!("{:x}", Sha256::digest(&bytes));
        let attachment = Attachment { bytes, content_type: content_type.to_owned() };
        self.lock().attachments.insert(hex.clone(), attachment);
        hex
    }

    /// Test hook: stores a blob under a hash of the caller's choosing (lower-cased), so U3 can
    /// serve bytes that do not match their name, as a corrupted store would.
    pub fn add_attachment_as(&self, hex: &str, bytes: bytes::Bytes, content_type: &str) {
        let attachment = Attachment { bytes, content_type: content_type.to_owned() };
        self.lock().attachments.insert(hex.to_ascii_lowercase(), attachment);
    }

    /// The collection's current version, `None` if it does not exist (never written, or deleted).
    pub fn version(&self, c: &CollectionId) -> Option<u64> {
        self.lock().collections.get(c).filter(|col| col.live).map(|col| col.version)
    }

    /// Every record as (id, record version, value), sorted by id; empty if no such collection.
    pub fn records(&self, c: &CollectionId) -> Vec<(String, u64, bytes::Bytes)> {
        let state = self.lock();
        let Some(collection) = state.collections.get(c).filter(|col| col.live) else {
            return Vec::new();
        };
        let records = collection.records.iter();
        records.map(|(id, r)| (id.clone(), r.version, r.value.clone())).collect()
    }

    /// Every request received so far (the most recent 100,000), oldest first.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.inner.log.lock().expect("request log lock poisoned").iter().cloned().collect()
    }

    /// Applies an already checked edit as one write and announces it if it changed anything.
    pub(super) fn apply(&self, c: &CollectionId, edit: Edit) -> u64 {
        let outcome = self.lock().collections.entry(c.clone()).or_default().apply(edit);
        self.announce(c, outcome)
    }

    /// Deletes one record as a write; `None` if the collection or record does not exist.
    pub(super) fn delete_record(&self, c: &CollectionId, id: &str) -> Option<u64> {
        let outcome = {
            let mut state = self.lock();
            let collection = state.collections.get_mut(c)?;
            if !collection.live || !collection.records.contains_key(id) {
                return None;
            }
            collection.apply(Edit::Merge(vec![(id.to_owned(), None)]))
        };
        Some(self.announce(c, outcome))
    }

    /// Deletes a whole collection; false if it did not exist. Announced without a version.
    pub(super) fn delete_collection(&self, c: &CollectionId) -> bool {
        {
            let mut state = self.lock();
            let Some(collection) = state.collections.get_mut(c).filter(|col| col.live) else {
                return false;
            };
            collection.live = false;
            collection.records.clear();
        }
        self.notify(c, None);
        true
    }

    /// The listing U1 serves: collection version and (id, record version) in id order.
    pub(super) fn listing(&self, c: &CollectionId) -> Option<(u64, Vec<(String, u64)>)> {
        let state = self.lock();
        let collection = state.collections.get(c).filter(|col| col.live)?;
        let records = collection.records.iter().map(|(id, r)| (id.clone(), r.version)).collect();
        Some((collection.version, records))
    }

    /// One record's version and value, as U2 serves it.
    pub(super) fn record(&self, c: &CollectionId, id: &str) -> Option<(u64, Bytes)> {
        let state = self.lock();
        let collection = state.collections.get(c).filter(|col| col.live)?;
        collection.records.get(id).map(|r| (r.version, r.value.clone()))
    }

    /// The token that opens a protected collection.
    pub(super) fn token(&self, c: &CollectionId) -> Option<String> {
        self.lock().tokens.get(c).cloned()
    }

    /// The fault injected for one record, if any.
    pub(super) fn fault(&self, c: &CollectionId, id: &str) -> Option<RecordFault> {
        self.lock().faults.get(&(c.clone(), id.to_owned())).cloned()
    }

    /// An attachment by its hex hash, either case.
    pub(super) fn attachment(&self, hex: &str) -> Option<Attachment> {
        self.lock().attachments.get(&hex.to_ascii_lowercase()).cloned()
    }

    /// Appends to the request log, dropping the oldest entry beyond the limit.
    pub(super) fn log_request(&self, request: LoggedRequest) {
        let mut log = self.inner.log.lock().expect("request log lock poisoned");
        if log.len() == REQUEST_LOG_LIMIT {
            log.pop_front();
        }
        log.push_back(request);
    }

    fn announce(&self, c: &CollectionId, (version, changed): (u64, bool)) -> u64 {
        if changed {
            self.notify(c, Some(version));
        }
        version
    }

    /// Queues a webhook; a closed channel means the server is stopping, so the loss is fine.
    fn notify(&self, c: &CollectionId, version: Option<u64>) {
        if let Some(notices) = &self.inner.notices {
            let _ = notices.send(ChangeNotice { collection: c.clone(), version });
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().expect("reference store lock poisoned")
    }
}

/// Checks a value handed to `write`/`replace`; `None` if it is null/undefined (a delete).
fn checked_value(id: &str, bytes: Bytes) -> Option<Bytes> {
    checked_id(id);
    match value::decode_cbor(&bytes) {
        Ok(ciborium::Value::Null) => None,
        Ok(_) => Some(bytes),
        Err(err) => panic!("record {id:?} is not one CBOR item ({err}); use Store::put_raw"),
    }
}

fn checked_id(id: &str) {
    assert!(!id.is_empty(), "record IDs must not be empty: U2 of \"\" would be U1's URL");
}
