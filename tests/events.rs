//! End-to-end change feed: `GET /export/{realm}/{user}:{name}/event-stream` (SPEC §4) read by a
//! real Server-Sent Events parser, against the reference server with webhooks, polling, resume
//! points, credentials, slow and stalled subscribers, heartbeats and the connection cap.

mod common;

use bytes::Bytes;
use ciborium::Value;
use common::{cbor, collection, error_body, metric, Sidecar, Stack};
use eventsource_stream::{Event, EventStreamError, Eventsource};
use export_sidecar::reference::{CollectionId, ReferenceConfig, ReferenceServer};
use futures::{Stream, StreamExt};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

/// How long any single wait on the network may take before the test fails.
const WAIT: Duration = Duration::from_secs(5);

/// The latency a webhook-triggered event must beat (it is expected within a second; the margin
/// is for busy machines).
const PROMPT: Duration = Duration::from_secs(3);

fn feed(name: &str) -> String {
    format!("/export/datasets/u:{name}/event-stream")
}

fn ids(list: &[&str]) -> Vec<String> {
    list.iter().map(|id| id.to_string()).collect()
}

/// Text values by recordID; `None` deletes.
type Edit<'a> = &'a [(&'a str, Option<&'a str>)];

/// Writes text values (`None` deletes) as one upstream write; returns the new version.
fn write(stack: &Stack, c: &CollectionId, changes: Edit) -> String {
    let changes = changes
        .iter()
        .map(|(id, value)| (id.to_string(), value.map(|v| cbor(&Value::Text(v.into())))))
        .collect();
    stack.store().write(c, changes).to_string()
}

/// An unsigned change webhook (the sidecars here have no secret), answered 202.
async fn announce(sidecar: &Sidecar, c: &CollectionId) {
    let body = serde_json::json!({"realm": c.realm, "user": c.user, "name": c.name}).to_string();
    let request = common::client()
        .post(sidecar.internal_url("/hooks/changes"))
        .header("content-type", "application/json")
        .body(body)
        .send();
    let response = timeout(WAIT, request).await.expect("webhook answered in time").expect("webhook sent");
    assert_eq!(response.status(), 202, "webhook accepted");
}

/// One event as the contract defines it, checked on arrival (see `EventReader::check`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    id: String,
    /// The `data:` text exactly as sent, to compare what different subscribers got.
    data: String,
    record_ids: Vec<String>,
    changed: Vec<String>,
}

#[derive(serde::Deserialize)]
struct ChangeData {
    version: String,
    #[serde(rename = "recordIDs")]
    record_ids: Vec<String>,
    changed: Vec<String>,
}

enum Next {
    Event(Change),
    /// Nothing arrived within the wait.
    Quiet,
    /// The body ended or failed; the reason.
    Ended(String),
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;
type Events = Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<String>>> + Send>>;

/// An event-stream body: parsed events, plus every raw byte read so far for the parts of the
/// contract that are about bytes (comments, `retry:`, heartbeats).
struct EventReader {
    events: Events,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl EventReader {
    fn new(body: ByteStream) -> EventReader {
        let raw = Arc::new(Mutex::new(Vec::new()));
        let log = raw.clone();
        let teed = body.inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                log.lock().expect("raw log").extend_from_slice(bytes);
            }
        });
        EventReader { events: Box::pin(teed.eventsource()), raw }
    }

    /// Checks a 200 `text/event-stream` head and reads its body.
    fn accept(response: reqwest::Response) -> EventReader {
        assert_eq!(response.status(), 200, "event-stream status");
        assert_eq!(media_type(response.headers()), "text/event-stream");
        let body = response.bytes_stream().map(|chunk| chunk.map_err(|e| e.to_string()));
        EventReader::new(Box::pin(body))
    }

    async fn next_within(&mut self, wait: Duration) -> Next {
        match timeout(wait, self.events.next()).await {
            Err(_) => Next::Quiet,
            Ok(None) => Next::Ended("the body ended".into()),
            Ok(Some(Err(e))) => Next::Ended(format!("the body failed: {e}")),
            Ok(Some(Ok(event))) => Next::Event(check(event)),
        }
    }

    /// The next event, which must arrive within `wait`.
    async fn event_within(&mut self, wait: Duration, what: &str) -> Change {
        match self.next_within(wait).await {
            Next::Event(change) => change,
            Next::Quiet => panic!("{what}: no event within {wait:?}; raw body so far: {}", self.raw_tail()),
            Next::Ended(reason) => panic!("{what}: {reason} before an event; raw body: {}", self.raw_tail()),
        }
    }

    async fn event(&mut self, what: &str) -> Change {
        self.event_within(WAIT, what).await
    }

    /// Asserts that no event arrives (and the stream stays open) for `wait`.
    async fn quiet_for(&mut self, wait: Duration, what: &str) {
        match self.next_within(wait).await {
            Next::Quiet => {}
            Next::Event(change) => panic!("{what}: expected no event for {wait:?}, got {change:?}"),
            Next::Ended(reason) => panic!("{what}: expected an open, quiet stream: {reason}"),
        }
    }

    /// Everything read so far (a character split across reads shows as U+FFFD until completed).
    fn raw_text(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().expect("raw log")).into_owned()
    }

    fn raw_tail(&self) -> String {
        let text = self.raw_text();
        let start = text.char_indices().rev().nth(600).map_or(0, |(i, _)| i);
        format!("{:?}", &text[start..])
    }

    /// Comment lines read so far.
    fn comments(&self) -> usize {
        sse_lines(&self.raw_text()).iter().filter(|line| line.starts_with(':')).count()
    }

    /// Keeps reading until at least `count` comment lines have been read, failing on any event.
    async fn wait_for_comments(&mut self, count: usize, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        while self.comments() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what}: fewer than {count} comment lines; raw: {}", self.raw_tail());
            match self.next_within(left.min(Duration::from_millis(50))).await {
                Next::Quiet => {}
                Next::Event(change) => panic!("{what}: unexpected event {change:?}"),
                Next::Ended(reason) => panic!("{what}: {reason}"),
            }
        }
    }
}

/// What every event must satisfy: type `message`, one JSON `data:` line whose `version` is the
/// event's id, and both id lists sorted by recordID byte order without repeats.
fn check(event: Event) -> Change {
    assert_eq!(event.event, "message", "default event type: {event:?}");
    assert!(!event.id.is_empty(), "every event has an id: {event:?}");
    assert!(!event.id.contains(['\r', '\n', '\0']), "id {:?}", event.id);
    assert!(!event.data.contains('\n'), "data is one line: {:?}", event.data);
    let data: ChangeData = serde_json::from_str(&event.data).expect("data is the change JSON");
    assert_eq!(data.version, event.id, "data.version is the event id");
    for list in [&data.record_ids, &data.changed] {
        assert!(list.windows(2).all(|w| w[0] < w[1]), "sorted by byte order, no repeats: {list:?}");
    }
    Change { id: event.id, data: event.data, record_ids: data.record_ids, changed: data.changed }
}

/// SSE lines: split on CRLF, CR or LF.
fn sse_lines(text: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = text.split('\n').flat_map(|l| l.split('\r')).collect();
    lines.retain(|l| !l.is_empty());
    lines
}

/// A field line's name and value (one leading space removed); `None` for a comment.
fn field(line: &str) -> Option<(&str, &str)> {
    if line.starts_with(':') {
        return None;
    }
    Some(match line.split_once(':') {
        Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
        None => (line, ""),
    })
}

/// The `retry:` value among the lines, checked to be a positive number of milliseconds.
fn retry_ms(lines: &[&str]) -> u64 {
    let values: Vec<&str> =
        lines.iter().filter_map(|l| field(l)).filter(|f| f.0 == "retry").map(|f| f.1).collect();
    assert_eq!(values.len(), 1, "one retry: field in {lines:?}");
    assert!(values[0].bytes().all(|b| b.is_ascii_digit()) && !values[0].is_empty(), "retry {:?}", values[0]);
    let ms: u64 = values[0].parse().expect("retry is a number");
    assert!(ms > 0, "retry is positive");
    ms
}

fn media_type(headers: &reqwest::header::HeaderMap) -> String {
    let value = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    value.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

async fn open(client: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client.get(url).header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    timeout(WAIT, request.send())
        .await
        .expect("event-stream head in time")
        .expect("request reaches the sidecar")
}

/// Subscribes to `datasets/u:{name}`, resuming from `last_id` when given.
async fn subscribe(sidecar: &Sidecar, name: &str, last_id: Option<&str>) -> EventReader {
    let headers: Vec<(&str, &str)> = last_id.map(|id| ("last-event-id", id)).into_iter().collect();
    EventReader::accept(open(&common::client(), &sidecar.url(&feed(name)), &headers).await)
}

/// Subscribes with the resume point in the query, as browsers do on a first connection.
async fn subscribe_by_query(sidecar: &Sidecar, name: &str, last_id: &str) -> EventReader {
    let url = sidecar.url(&format!("{}?last_event_id={last_id}", feed(name)));
    EventReader::accept(open(&common::client(), &url, &[]).await)
}

#[tokio::test]
async fn the_stream_starts_with_headers_a_comment_a_retry_hint_and_a_full_event() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "first");
    let values = ["b", "a", "é", "B", "a/b", "Z", "a b"].map(|id| (id, Some("v")));
    let version = write(&stack, &c, &values);
    let response = open(&stack.client, &stack.url(&feed("first")), &[]).await;
    let headers = response.headers().clone();
    assert_eq!(response.status(), 200);
    assert_eq!(media_type(&headers), "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache, no-store, no-transform");
    assert_eq!(headers["x-accel-buffering"], "no");
    for absent in
        ["content-length", "content-encoding", "keep-alive", "proxy-connection", "upgrade", "trailer"]
    {
        assert!(headers.get(absent).is_none(), "{absent}: {:?}", headers.get(absent));
    }
    let mut reader = EventReader::accept(response);
    let first = reader.event("the full event").await;
    let all = ids(&["B", "Z", "a", "a b", "a/b", "b", "é"]);
    assert_eq!(
        first,
        Change { id: version.clone(), data: first.data.clone(), record_ids: all.clone(), changed: all }
    );

    let raw = reader.raw_text();
    assert!(raw.starts_with(':'), "the body starts with a comment line: {raw:?}");
    let lines = sse_lines(&raw);
    let before_event = lines.iter().position(|l| field(l).is_some_and(|f| f.0 == "id" || f.0 == "data"));
    let prelude = &lines[..before_event.expect("the event's lines")];
    retry_ms(prelude);
    reader.quiet_for(Duration::from_millis(500), "one full event, then nothing until a change").await;

    // An empty collection: a full event with empty lists.
    let empty = collection("datasets", "u", "empty");
    let version = write(&stack, &empty, &[("x", Some("v"))]);
    let version_after = write(&stack, &empty, &[("x", None)]);
    assert_ne!(version, version_after);
    let mut reader = subscribe(&stack.sidecar, "empty", None).await;
    let full = reader.event("the empty collection's full event").await;
    assert_eq!((full.id, full.record_ids, full.changed), (version_after, vec![], vec![]));
}

#[tokio::test]
async fn a_webhook_produces_one_event_promptly() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "hooked");
    write(&stack, &c, &[("a", Some("1")), ("b", Some("1"))]);
    let mut reader = subscribe(&stack.sidecar, "hooked", None).await;
    reader.event("full event").await;
    for (round, id) in ["c", "a", "b"].into_iter().enumerate() {
        let version = write(&stack, &c, &[(id, Some(&format!("round {round}")))]);
        let sent = Instant::now();
        announce(&stack.sidecar, &c).await;
        let event = reader.event_within(PROMPT, "the webhook's event").await;
        let latency = sent.elapsed();
        assert!(latency < PROMPT, "round {round}: event after {latency:?}");
        assert_eq!((event.id, event.changed), (version, ids(&[id])), "round {round}");
        assert_eq!(event.record_ids, ids(&["a", "b", "c"]));
    }
    // A webhook without a new version announces nothing.
    announce(&stack.sidecar, &c).await;
    reader.quiet_for(Duration::from_millis(700), "no new version, no event").await;
}

#[tokio::test]
async fn the_reference_servers_own_webhooks_drive_the_feed() {
    let internal = common::free_port();
    let config = ReferenceConfig {
        webhook_url: Some(format!("http://{internal}/hooks/changes")),
        ..Default::default()
    };
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("reference starts");
    let sidecar = Sidecar::start_on(&reference.url(), internal, &[]).await;
    let stack = Stack { reference, sidecar, client: common::client() };
    let c = collection("datasets", "u", "pushed");
    write(&stack, &c, &[("a", Some("1"))]);
    let mut reader = subscribe(&stack.sidecar, "pushed", None).await;
    let full = reader.event("full event").await;
    assert_eq!(full.record_ids, ids(&["a"]));
    let written = Instant::now();
    let v2 = write(&stack, &c, &[("b", Some("1"))]);
    let event = reader.event_within(PROMPT, "event for the upstream's webhook").await;
    assert!(written.elapsed() < PROMPT, "event {:?} after the write", written.elapsed());
    assert_eq!((event.id, event.record_ids, event.changed), (v2, ids(&["a", "b"]), ids(&["b"])));
    let v3 = write(&stack, &c, &[("a", None)]);
    let event = reader.event_within(PROMPT, "event for the deletion's webhook").await;
    assert_eq!((event.id, event.record_ids, event.changed), (v3, ids(&["b"]), ids(&["a"])));
}

#[tokio::test]
async fn resume_points_give_no_event_a_catch_up_or_a_full_event() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "resume");
    let never_seen = write(&stack, &c, &[("a", Some("1")), ("b", Some("1")), ("c", Some("1"))]);
    let exported = write(&stack, &c, &[("d", Some("1"))]);
    let response = stack.get("/export/datasets/u:resume?encoding=json-lines").await;
    assert_eq!(response.headers()["x-version"], exported.as_str());
    response.bytes().await.expect("export body");
    let current = write(&stack, &c, &[("a", Some("2")), ("b", None), ("e", Some("1"))]);
    let now = ids(&["a", "c", "d", "e"]);

    let mut live = subscribe(&stack.sidecar, "resume", None).await;
    let full = live.event("full event").await;
    assert_eq!((&full.id, &full.record_ids, &full.changed), (&current, &now, &now));

    // At the current version: nothing to say.
    let mut up_to_date = subscribe(&stack.sidecar, "resume", Some(&current)).await;
    up_to_date.quiet_for(Duration::from_millis(700), "Last-Event-ID is the current version").await;

    // From an export's X-Version, by header and by query: one catch-up event.
    let expected_catch_up = (current.clone(), now.clone(), ids(&["a", "b", "e"]));
    let mut by_header = subscribe(&stack.sidecar, "resume", Some(&exported)).await;
    let catch_up = by_header.event("catch-up from an X-Version").await;
    assert_eq!((catch_up.id, catch_up.record_ids, catch_up.changed), expected_catch_up.clone());
    let mut by_query = subscribe_by_query(&stack.sidecar, "resume", &exported).await;
    let catch_up = by_query.event("catch-up from ?last_event_id").await;
    assert_eq!((catch_up.id, catch_up.record_ids, catch_up.changed), expected_catch_up);
    let mut current_by_query = subscribe_by_query(&stack.sidecar, "resume", &current).await;
    current_by_query.quiet_for(Duration::from_millis(300), "?last_event_id= the current version").await;

    // Versions the sidecar never handed out: the full event, the re-sync signal.
    for unknown in [never_seen.as_str(), "nonsense", "999999"] {
        let mut reader = subscribe(&stack.sidecar, "resume", Some(unknown)).await;
        let full = reader.event("full event for an unknown id").await;
        assert_eq!((&full.id, &full.record_ids, &full.changed), (&current, &now, &now), "{unknown}");
    }

    // The next version reaches everyone as exactly one event, changed since their last one.
    let next = write(&stack, &c, &[("c", Some("2"))]);
    announce(&stack.sidecar, &c).await;
    for (reader, what) in [
        (&mut live, "no resume point"),
        (&mut up_to_date, "resumed at the current version"),
        (&mut by_header, "caught up by header"),
        (&mut by_query, "caught up by query"),
        (&mut current_by_query, "resumed at the current version by query"),
    ] {
        let event = reader.event(what).await;
        assert_eq!((&event.id, &event.record_ids, &event.changed), (&next, &now, &ids(&["c"])), "{what}");
    }
    up_to_date.quiet_for(Duration::from_millis(300), "exactly one event per version").await;

    // An earlier event id is a known version too.
    let mut from_event = subscribe(&stack.sidecar, "resume", Some(&current)).await;
    let catch_up = from_event.event("catch-up from an event id").await;
    assert_eq!((catch_up.id, catch_up.record_ids, catch_up.changed), (next, now, ids(&["c"])));
}

#[tokio::test]
async fn deletions_are_changed_and_leave_record_ids() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "deleting");
    write(&stack, &c, &[("a", Some("1")), ("b", Some("1")), ("c", Some("1"))]);
    let mut reader = subscribe(&stack.sidecar, "deleting", None).await;
    reader.event("full event").await;

    let steps: [(Edit, &[&str], &[&str]); 3] = [
        (&[("b", None)], &["a", "c"], &["b"]),
        (&[("a", None), ("d", Some("1"))], &["c", "d"], &["a", "d"]),
        (&[("c", None), ("d", None)], &[], &["c", "d"]),
    ];
    for (changes, record_ids, changed) in steps {
        let version = write(&stack, &c, changes);
        announce(&stack.sidecar, &c).await;
        let event = reader.event("event for a deletion").await;
        assert_eq!((event.id, event.record_ids, event.changed), (version, ids(record_ids), ids(changed)));
    }
}

#[tokio::test]
async fn without_webhooks_subscribed_collections_are_polled() {
    let stack = Stack::start_with(&["--poll-interval", "1"]).await;
    let c = collection("datasets", "u", "polled");
    write(&stack, &c, &[("a", Some("1"))]);
    let mut reader = subscribe(&stack.sidecar, "polled", None).await;
    reader.event("full event").await;
    let v2 = write(&stack, &c, &[("b", Some("1"))]);
    let event = reader.event("event found by polling").await;
    assert_eq!((event.id, event.record_ids, event.changed), (v2, ids(&["a", "b"]), ids(&["b"])));
    let v3 = write(&stack, &c, &[("a", None)]);
    let event = reader.event("second event found by polling").await;
    assert_eq!((event.id, event.record_ids, event.changed), (v3, ids(&["b"]), ids(&["a"])));
    reader.quiet_for(Duration::from_millis(2500), "unchanged polls announce nothing").await;
}

/// The soft open-files limit of this process (inherited by the sidecar it starts).
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line");
    let soft = line["Max open files".len()..].split_whitespace().next().expect("soft limit");
    if soft == "unlimited" {
        u64::MAX
    } else {
        soft.parse().expect("a number")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_get_the_same_next_event() {
    const SUBSCRIBERS: usize = 1000;
    let limit = open_files_limit();
    assert!(
        limit >= 3 * SUBSCRIBERS as u64,
        "open files limit {limit} is too low: run `ulimit -n 8192` first"
    );
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "crowd");
    let v1 = write(&stack, &c, &[("a", Some("1")), ("b", Some("1"))]);
    let client = common::client();
    let url = stack.url(&feed("crowd"));
    let started = Instant::now();
    let mut subscribers: Vec<(EventReader, Change)> = futures::stream::iter(0..SUBSCRIBERS)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let mut reader = EventReader::accept(open(&client, &url, &[]).await);
                let first = reader.event_within(Duration::from_secs(30), "a subscriber's full event").await;
                (reader, first)
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    assert_eq!(subscribers.len(), SUBSCRIBERS);
    assert!(started.elapsed() < Duration::from_secs(60), "subscribing took {:?}", started.elapsed());
    let first_data = subscribers[0].1.data.clone();
    assert!(subscribers.iter().all(|(_, first)| first.id == v1 && first.data == first_data));

    let v2 = write(&stack, &c, &[("c", Some("1"))]);
    announce(&stack.sidecar, &c).await;
    let nexts = futures::future::join_all(
        subscribers
            .iter_mut()
            .map(|(reader, _)| reader.event_within(Duration::from_secs(30), "the shared next event")),
    )
    .await;
    assert_eq!(nexts.len(), SUBSCRIBERS);
    let expected = &nexts[0];
    assert_eq!(
        (&expected.id, &expected.record_ids, &expected.changed),
        (&v2, &ids(&["a", "b", "c"]), &ids(&["c"]))
    );
    let differing =
        nexts.iter().filter(|next| (&next.id, &next.data) != (&expected.id, &expected.data)).count();
    assert_eq!(differing, 0, "every subscriber gets the same id and data");
}

/// An HTTP/1.1 response body read straight off a socket (chunked or close-delimited), so a
/// test decides exactly when bytes leave the kernel's buffers.
struct RawBody {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    framing: Framing,
}

enum Framing {
    Chunked(ChunkState),
    UntilClose,
}

#[derive(Clone, Copy)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Done,
}

enum Step {
    Yield(Bytes),
    NeedMore,
    End,
    Bad(String),
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl RawBody {
    fn decode(&mut self) -> Step {
        let state = match &mut self.framing {
            Framing::UntilClose if self.buf.is_empty() => return Step::NeedMore,
            Framing::UntilClose => return Step::Yield(Bytes::from(std::mem::take(&mut self.buf))),
            Framing::Chunked(state) => state,
        };
        loop {
            match *state {
                ChunkState::Size => {
                    let Some(end) = find(&self.buf, b"\r\n") else { return Step::NeedMore };
                    let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                    self.buf.drain(..end + 2);
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let Ok(size) = usize::from_str_radix(hex, 16) else {
                        return Step::Bad(format!("bad chunk size line {line:?}"));
                    };
                    *state = if size == 0 { ChunkState::Done } else { ChunkState::Data(size) };
                }
                ChunkState::Data(left) => {
                    if self.buf.is_empty() {
                        return Step::NeedMore;
                    }
                    let n = left.min(self.buf.len());
                    let piece: Vec<u8> = self.buf.drain(..n).collect();
                    *state = if n == left { ChunkState::DataEnd } else { ChunkState::Data(left - n) };
                    return Step::Yield(Bytes::from(piece));
                }
                ChunkState::DataEnd => {
                    if self.buf.len() < 2 {
                        return Step::NeedMore;
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Step::Bad("a chunk is not followed by CRLF".into());
                    }
                    self.buf.drain(..2);
                    *state = ChunkState::Size;
                }
                ChunkState::Done => return Step::End,
            }
        }
    }

    /// The next piece of the body; `None` at its clean end.
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            match self.decode() {
                Step::Yield(bytes) => return Some(Ok(bytes)),
                Step::End => return None,
                Step::Bad(reason) => return Some(Err(reason)),
                Step::NeedMore => {}
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk).await {
                Ok(0) if matches!(self.framing, Framing::UntilClose) => return None,
                Ok(0) => return Some(Err("the connection closed before the last chunk".into())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Some(Err(format!("read failed: {e}"))),
            }
        }
    }

    fn into_stream(self) -> ByteStream {
        Box::pin(futures::stream::unfold(Some(self), |body| async move {
            let mut body = body?;
            let item = body.next().await?;
            let rest = item.is_ok().then_some(body);
            Some((item, rest))
        }))
    }
}

/// Subscribes over a bare socket whose receive buffer is `receive_buffer` bytes: the body is
/// read only as far as the returned reader is polled, so not polling it stalls the connection.
async fn raw_subscribe(addr: SocketAddr, path: &str, receive_buffer: u32) -> EventReader {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(receive_buffer).expect("SO_RCVBUF");
    let stream = timeout(WAIT, socket.connect(addr)).await.expect("connect in time").expect("connect");
    subscribe_on(stream, addr, path).await
}

/// Sends the event-stream request for `path` on an open connection and checks the head.
async fn subscribe_on(mut stream: tokio::net::TcpStream, addr: SocketAddr, path: &str) -> EventReader {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request sent");
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, stream.read(&mut chunk)).await.expect("head in time").expect("read the head");
        assert!(n > 0, "the connection closed before the head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("an ASCII head").to_ascii_lowercase();
    let body = buf.split_off(head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    assert!(status_line.starts_with("http/1.1 200"), "status line {status_line:?}");
    let header = |name: &str| {
        let prefix = format!("{name}:");
        head.split("\r\n").find_map(|l| l.strip_prefix(&prefix).map(str::trim)).map(str::to_owned)
    };
    assert!(header("content-type").is_some_and(|t| t.starts_with("text/event-stream")), "{head}");
    let framing = match header("transfer-encoding") {
        Some(coding) if coding.contains("chunked") => Framing::Chunked(ChunkState::Size),
        _ => Framing::UntilClose,
    };
    EventReader::new(RawBody { stream, buf: body, framing }.into_stream())
}

/// Reads from `stream` until what has arrived satisfies `done`; fails if it closes first.
async fn read_until(stream: &mut tokio::net::TcpStream, done: impl Fn(&[u8]) -> bool, what: &str) -> Vec<u8> {
    let mut answer = Vec::new();
    while !done(&answer) {
        let mut chunk = [0u8; 4096];
        let n = timeout(WAIT, stream.read(&mut chunk)).await.expect("in time").expect("read");
        assert!(n > 0, "the connection closed before {what}");
        answer.extend_from_slice(&chunk[..n]);
    }
    answer
}

/// A subscription that is not a connection's first request (browsers reuse keep-alive
/// connections) is served like any other.
#[tokio::test]
async fn a_subscription_on_a_reused_connection_gets_the_same_stream() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "reused");
    let version = write(&stack, &c, &[("a", Some("v")), ("b", Some("v"))]);
    let addr = stack.sidecar.public;
    let mut stream =
        timeout(WAIT, tokio::net::TcpStream::connect(addr)).await.expect("in time").expect("connect");
    let request = format!("GET /export/datasets/u:absent?encoding=json HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("first request sent");
    let complete = |answer: &[u8]| {
        let end = find(answer, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
        let length: usize =
            head.split("\r\n").find_map(|l| l.strip_prefix("content-length:"))?.trim().parse().ok()?;
        (answer.len() >= end + length).then_some(head)
    };
    let answer = read_until(&mut stream, |answer| complete(answer).is_some(), "the first answer").await;
    let head = complete(&answer).unwrap_or_default();
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(!head.contains("connection: close"), "the first answer keeps the connection: {head}");

    let mut reader = subscribe_on(stream, addr, &feed("reused")).await;
    let first = reader.event("the full event on the reused connection").await;
    assert_eq!((first.id, first.record_ids), (version, ids(&["a", "b"])));
    let next = write(&stack, &c, &[("c", Some("v"))]);
    announce(&stack.sidecar, &c).await;
    let change = reader.event("the change on the reused connection").await;
    assert_eq!((change.id, change.changed), (next, ids(&["c"])));
}

/// HTTP/1.0 has no chunked framing: the stream's body ends with the connection, so the head
/// must not promise to keep it, whatever the client asked for.
#[tokio::test]
async fn an_http_1_0_stream_says_the_connection_closes() {
    let stack = Stack::start().await;
    write(&stack, &collection("datasets", "u", "old"), &[("a", Some("v"))]);
    let addr = stack.sidecar.public;
    let mut stream =
        timeout(WAIT, tokio::net::TcpStream::connect(addr)).await.expect("in time").expect("connect");
    let request = format!("GET {} HTTP/1.0\r\nHost: {addr}\r\nConnection: keep-alive\r\n\r\n", feed("old"));
    stream.write_all(request.as_bytes()).await.expect("request sent");
    let answer = read_until(&mut stream, |answer| find(answer, b"\r\n\r\n").is_some(), "the head").await;
    let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let head = head.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    assert!(head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(!head.contains("keep-alive") && !head.contains("transfer-encoding"), "{head}");
}

/// Writes 5,000 versions in batches with a webhook after each while one subscriber reads along
/// and another has stopped reading; then the stalled one resumes (reconnecting from its last
/// event id if the sidecar dropped it) and must learn of every id written.
async fn stalled_subscriber_case(stack: &Stack) {
    const BATCHES: usize = 100;
    const PER_BATCH: usize = 50;
    // Long ids make the events big (~10 MB in all, each listing every id), far more than the
    // socket buffers hold, so the stalled subscriber really stops the sidecar's writes.
    const PADDING: &str = "padding-to-make-events-big";
    let c = collection("datasets", "u", "stall");
    write(stack, &c, &[("seed", Some("0"))]);
    let mut reader = subscribe(&stack.sidecar, "stall", None).await;
    let first = reader.event("the reading subscriber's full event").await;
    let mut stalled = raw_subscribe(stack.sidecar.public, &feed("stall"), 4096).await;
    let stalled_first = stalled.event("the stalled subscriber's full event").await;
    assert_eq!(stalled_first.id, first.id);
    let mut stalled_seen: BTreeSet<String> = stalled_first.changed.into_iter().collect();
    let mut stalled_last = stalled_first.id;
    let stall_began = Instant::now();

    let mut written = BTreeSet::new();
    let mut slowest = Duration::ZERO;
    for batch in 0..BATCHES {
        let batch_ids: Vec<String> =
            (0..PER_BATCH).map(|i| format!("record-{:05}-{PADDING}", batch * PER_BATCH + i)).collect();
        let mut version = 0;
        for id in &batch_ids {
            let value = cbor(&Value::Text(format!("batch {batch} {}", "x".repeat(40))));
            version = stack.store().write(&c, vec![(id.clone(), Some(value))]);
        }
        let sent = Instant::now();
        announce(&stack.sidecar, &c).await;
        let event =
            reader.event_within(PROMPT, &format!("batch {batch}'s event for the reading subscriber")).await;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(event.id, version.to_string(), "batch {batch}");
        assert_eq!(event.changed, batch_ids, "batch {batch}: changed since the last event");
        written.extend(batch_ids);
    }
    assert!(slowest < PROMPT, "the reading subscriber waited up to {slowest:?} for an event");
    let mut all = written.clone();
    all.insert("seed".into());
    let all: Vec<String> = all.into_iter().collect();
    let last_version = stack.store().version(&c).expect("the collection exists").to_string();
    let stalled_for = stall_began.elapsed();

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut reconnects = 0;
    let mut resumed_events = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stalled.next_within(left).await {
            Next::Event(event) => {
                resumed_events += 1;
                stalled_seen.extend(event.changed);
                stalled_last = event.id;
                if stalled_last == last_version {
                    assert_eq!(event.record_ids, all, "the last event lists every current id");
                    break;
                }
            }
            Next::Quiet => panic!(
                "the stalled subscriber (stalled {stalled_for:?}, {reconnects} reconnects) never got \
                 version {last_version}; last {stalled_last}"
            ),
            Next::Ended(reason) => {
                reconnects += 1;
                assert!(reconnects <= 3, "reconnected {reconnects} times; last: {reason}");
                stalled = subscribe(&stack.sidecar, "stall", Some(&stalled_last)).await;
            }
        }
    }
    let missing: Vec<&String> = written.difference(&stalled_seen).collect();
    assert!(
        missing.is_empty(),
        "the stalled subscriber never heard of {} ids, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(stalled_seen.len(), all.len(), "only ids that exist or existed");
    // Had every event reached the stalled subscriber one by one, it never stalled the sidecar,
    // or the sidecar queued without merging: either way the merge path went untested.
    assert!(
        resumed_events < BATCHES || reconnects > 0,
        "{resumed_events} events after resuming, {reconnects} reconnects: nothing was merged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_holds_up_no_one_and_loses_nothing() {
    let stack = Stack::start().await;
    timeout(Duration::from_secs(90), stalled_subscriber_case(&stack))
        .await
        .expect("the test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_dropped_for_a_write_timeout_resumes_from_its_last_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[events]\nwrite_timeout_seconds = 1\n").expect("write the config");
    let stack = Stack::start_with(&["--config", config.to_str().expect("a UTF-8 path")]).await;
    timeout(Duration::from_secs(90), stalled_subscriber_case(&stack))
        .await
        .expect("the test finished in time");
}

#[tokio::test]
async fn idle_streams_carry_heartbeat_comments() {
    let stack = Stack::start_with(&["--sse-heartbeat", "1"]).await;
    let c = collection("datasets", "u", "quiet");
    write(&stack, &c, &[("a", Some("1"))]);
    let mut reader = subscribe(&stack.sidecar, "quiet", None).await;
    reader.event("full event").await;
    let comments = reader.comments();
    reader.wait_for_comments(comments + 1, Duration::from_millis(2500), "first heartbeat").await;
    reader.wait_for_comments(comments + 2, Duration::from_millis(2500), "second heartbeat").await;
    // Heartbeats do not disturb events.
    let version = write(&stack, &c, &[("b", Some("1"))]);
    announce(&stack.sidecar, &c).await;
    let event = reader.event("event between heartbeats").await;
    assert_eq!((event.id, event.changed), (version, ids(&["b"])));
}

#[tokio::test]
async fn the_subscribers_credentials_decide_before_the_stream_starts() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "private");
    write(&stack, &c, &[("secret", Some("1"))]);
    stack.store().protect(&c, Some("token".into()));
    let url = stack.url(&feed("private"));

    let (status, _, _) = error_body(open(&stack.client, &url, &[]).await).await;
    assert_eq!(status, 401, "no credentials");
    let (status, _, _) =
        error_body(open(&stack.client, &url, &[("authorization", "Bearer wrong")]).await).await;
    assert_eq!(status, 403, "wrong credentials");
    let missing = stack.url(&feed("no-such-collection"));
    let (status, _, _) = error_body(open(&stack.client, &missing, &[]).await).await;
    assert_eq!(status, 404, "no such collection");

    for credentials in [("authorization", "Bearer token"), ("cookie", "session=token")] {
        let mut reader = EventReader::accept(open(&stack.client, &url, &[credentials]).await);
        let full = reader.event("full event with credentials").await;
        assert_eq!(full.record_ids, ids(&["secret"]), "{credentials:?}");
    }
}

#[tokio::test]
async fn over_the_connection_cap_a_subscriber_gets_a_retry_hint_and_a_close() {
    let stack = Stack::start_with(&["--sse-max-connections", "2", "--sse-heartbeat", "1"]).await;
    let c = collection("datasets", "u", "capped");
    write(&stack, &c, &[("a", Some("1"))]);
    let mut one = subscribe(&stack.sidecar, "capped", None).await;
    one.event("first subscriber's full event").await;
    let mut two = subscribe(&stack.sidecar, "capped", None).await;
    two.event("second subscriber's full event").await;

    let url = stack.url(&feed("capped"));
    let third = open(&stack.client, &url, &[]).await;
    assert_eq!(third.status(), 200, "any other status makes browsers give up");
    assert_eq!(media_type(third.headers()), "text/event-stream");
    let body = timeout(WAIT, third.bytes()).await.expect("the body ends at once").expect("a clean end");
    let text = String::from_utf8(body.to_vec()).expect("UTF-8");
    let lines = sse_lines(&text);
    retry_ms(&lines);
    assert!(lines.iter().filter_map(|l| field(l)).all(|f| f.0 == "retry"), "no event fields: {text:?}");
    let parsed: Vec<_> =
        futures::stream::iter([Ok::<_, String>(body)]).eventsource().collect::<Vec<_>>().await;
    assert!(parsed.is_empty(), "no events: {parsed:?}");
    // Counted as the 200 it was, not as a request that sent no head.
    let counted = |status: &'static str| {
        let sample = format!("export_sidecar_requests_total{{route=\"export-events\",status=\"{status}\"}}");
        let sidecar = &stack.sidecar;
        async move { metric(sidecar, &sample).await }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted("200").await != Some(1.0) {
        assert!(Instant::now() < deadline, "the refused stream counted as 200");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted("none").await, None);

    // The two admitted subscribers are served as usual.
    let version = write(&stack, &c, &[("b", Some("1"))]);
    announce(&stack.sidecar, &c).await;
    for reader in [&mut one, &mut two] {
        let event = reader.event("event at the cap").await;
        assert_eq!((&event.id, &event.changed), (&version, &ids(&["b"])));
    }

    // A subscriber that leaves frees its place.
    drop(two);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut reader = EventReader::accept(open(&stack.client, &url, &[]).await);
        match reader.next_within(WAIT).await {
            Next::Event(full) => {
                assert_eq!(full.id, version);
                break;
            }
            Next::Ended(_) => {
                assert!(Instant::now() < deadline, "the place of a closed stream was never freed")
            }
            Next::Quiet => panic!("a stream must either start with the full event or close"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_stream_is_never_compressed() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "plain");
    let version = write(&stack, &c, &[("a", Some("1"))]);
    let url = stack.url(&feed("plain"));
    let response = open(&stack.client, &url, &[("accept-encoding", "gzip, deflate, br, zstd")]).await;
    assert!(response.headers().get("content-encoding").is_none(), "{:?}", response.headers());
    let mut reader = EventReader::accept(response);
    let full = reader.event("full event despite Accept-Encoding").await;
    assert_eq!(full.id, version);
    let raw = reader.raw_text();
    assert!(raw.starts_with(':'), "plain text, not a compressed body: {raw:?}");
    let next = write(&stack, &c, &[("b", Some("1"))]);
    announce(&stack.sidecar, &c).await;
    let event = reader.event("event on a stream that asked for gzip").await;
    assert_eq!((event.id, event.changed), (next, ids(&["b"])));
}

/// Reads a response body to its end; `Ok` only if it ended cleanly (terminating chunk).
async fn read_to_clean_end(response: reqwest::Response, limit: Duration) -> Result<Vec<u8>, String> {
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, body.next()).await {
            Err(_) => return Err("the stream did not end in time".into()),
            Ok(None) => return Ok(seen),
            Ok(Some(Ok(chunk))) => seen.extend_from_slice(&chunk),
            Ok(Some(Err(e))) => return Err(format!("the stream broke instead of ending: {e}")),
        }
    }
}

#[tokio::test]
async fn streams_end_cleanly_at_their_jittered_lifetime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[events]\nmax_lifetime_seconds = 2\n").expect("write config");
    let stack = Stack::start_with(&["--config", config.to_str().expect("utf-8")]).await;
    let c = collection("datasets", "u", "short-lived");
    write(&stack, &c, &[("a", Some("1"))]);
    let started = Instant::now();
    let response = open(&stack.client, &stack.url(&feed("short-lived")), &[]).await;
    let body = read_to_clean_end(response, Duration::from_secs(10)).await.expect("a clean end");
    let lived = started.elapsed();
    assert!(lived >= Duration::from_millis(1500), "80-100 % of 2 s, not {lived:?}");
    assert!(String::from_utf8_lossy(&body).contains("id: "), "the first event came before the end");
}

#[tokio::test]
async fn sigterm_ends_streams_cleanly_and_the_process_exits() {
    let mut stack = Stack::start().await;
    let c = collection("datasets", "u", "draining");
    write(&stack, &c, &[("a", Some("1"))]);
    let response = open(&stack.client, &stack.url(&feed("draining")), &[]).await;
    let pid = stack.sidecar.pid().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
    assert!(killed.success());
    read_to_clean_end(response, Duration::from_secs(10)).await.expect("the stream ends cleanly on SIGTERM");
    let exit = stack.sidecar.wait_exit(Duration::from_secs(15)).await.expect("the sidecar exits");
    assert!(exit.success(), "{exit:?}");
}
