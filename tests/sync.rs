//! End-to-end pull-sync: after= / at= with tombstones against a model of the upstream, 410 for
//! versions the journal does not hold, ETag/304, webhooks, polling, retention and restarts.

mod common;

use ciborium::Value;
use common::{cbor, collection, error_body, expected_json, Sidecar, Stack};
use export_sidecar::reference::{self, CollectionId, ReferenceConfig, ReferenceServer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn text(s: &str) -> Option<bytes::Bytes> {
    Some(cbor(&Value::Text(s.into())))
}

/// An export's parsed json-lines body: recordID → value (JSON null for a tombstone), in order.
async fn json_lines(stack: &Stack, path: &str) -> (String, Vec<(String, serde_json::Value)>) {
    let response = stack.get(path).await;
    assert_eq!(response.status(), 200, "{path}");
    let version = response.headers()["x-version"].to_str().expect("ascii").to_owned();
    let body = response.text().await.expect("complete body");
    let rows = body
        .lines()
        .map(|line| {
            let row: (String, serde_json::Value) = serde_json::from_str(line).expect("a [id, value] line");
            row
        })
        .collect();
    (version, rows)
}

async fn export_version(stack: &Stack, name: &str) -> String {
    json_lines(stack, &format!("/export/datasets/u:{name}?encoding=json-lines")).await.0
}

#[tokio::test]
async fn after_and_at_report_changes_and_tombstones() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "sync");
    stack
        .store()
        .write(&c, vec![("a".into(), text("a1")), ("b".into(), text("b1")), ("c".into(), text("c1"))]);
    let v1 = export_version(&stack, "sync").await;
    stack.store().write(&c, vec![("b".into(), text("b2")), ("c".into(), None), ("d".into(), text("d1"))]);
    // Created and deleted after v1: never mentioned.
    stack.store().write(&c, vec![("e".into(), text("e1"))]);
    stack.store().write(&c, vec![("e".into(), None)]);
    let (v2, rows) =
        json_lines(&stack, &format!("/export/datasets/u:sync?encoding=json-lines&after={v1}")).await;
    assert_ne!(v1, v2);
    let expected =
        [("b", serde_json::json!("b2")), ("c", serde_json::Value::Null), ("d", serde_json::json!("d1"))];
    assert_eq!(rows, expected.map(|(id, v)| (id.to_owned(), v)));

    // The same in CBOR: a tombstone is `undefined`.
    let body = stack
        .get(&format!("/export/datasets/u:sync?encoding=cbor&after={v1}"))
        .await
        .bytes()
        .await
        .expect("body");
    let mut reader = &body[..];
    let mut seen = Vec::new();
    while !reader.is_empty() {
        let item: Value = ciborium::from_reader(&mut reader).expect("item");
        seen.push(item);
    }
    assert_eq!(seen[1], Value::Array(vec!["c".into(), Value::Null]), "ciborium reads undefined as Null");
    assert!(body.windows(4).any(|w| w == [0x82, 0x61, b'c', 0xf7]), "tombstone is CBOR undefined (0xf7)");

    // And in JSON: null.
    let json = stack
        .get(&format!("/export/datasets/u:sync?encoding=json&after={v1}"))
        .await
        .text()
        .await
        .expect("body");
    assert_eq!(json, "{\"b\":\"b2\",\"c\":null,\"d\":\"d1\"}\n");

    // after= the current version: nothing.
    let (_, rows) =
        json_lines(&stack, &format!("/export/datasets/u:sync?encoding=json-lines&after={v2}")).await;
    assert!(rows.is_empty());
    // at= the current version: what changed in it (since v1, the version before it).
    let (_, rows) = json_lines(&stack, &format!("/export/datasets/u:sync?encoding=json-lines&at={v2}")).await;
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["b", "c", "d"]);
    // at= the first version the sidecar saw: what changed in it is unknown.
    let (status, code, message) =
        error_body(stack.get(&format!("/export/datasets/u:sync?encoding=json&at={v1}")).await).await;
    assert_eq!((status, code.as_str()), (410, "version_unknown"));
    assert!(message.contains("no version before this one"), "the 410 says why: {message}");
}

#[tokio::test]
async fn unknown_versions_get_410_never_a_full_export() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "gone");
    stack.store().write(&c, vec![("a".into(), text("a"))]);
    stack.store().write(&c, vec![("b".into(), text("b"))]);
    // Version 1 existed upstream but was never read by the sidecar; 2 is read by each export.
    for query in ["after=1", "after=nonsense", "at=1", "at=2"] {
        let response = stack.get(&format!("/export/datasets/u:gone?encoding=json&{query}")).await;
        assert_eq!(response.headers()["cache-control"], "no-store");
        let (status, code, message) = error_body(response).await;
        assert_eq!((status, code.as_str()), (410, "version_unknown"), "{query}");
        assert!(message.contains("full export"), "{message}");
    }
    // Versions of another collection are not this one's.
    let other = collection("datasets", "u", "other");
    stack.store().write(&other, vec![("x".into(), text("x"))]);
    let v = export_version(&stack, "other").await;
    let (status, _, _) =
        error_body(stack.get(&format!("/export/datasets/u:gone?encoding=json&after={v}")).await).await;
    assert_eq!(status, 410);
}

#[tokio::test]
async fn etag_match_answers_304_without_fetching_records() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "tagged");
    stack.store().write(&c, (0..20).map(|i| (format!("r{i}"), text("v"))).collect());
    let path = "/export/datasets/u:tagged?encoding=json";
    let first = stack.get(path).await;
    let etag = first.headers()["etag"].to_str().expect("ascii").to_owned();
    let version = first.headers()["x-version"].clone();
    first.bytes().await.expect("body");
    let fetched_before = stack.store().request_log().len();

    let again = stack.client.get(stack.url(path)).header("if-none-match", &etag).send().await.expect("sent");
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["etag"], etag.as_str());
    assert_eq!(again.headers()["x-version"], version);
    let log = stack.store().request_log();
    let new_requests: Vec<_> = log[fetched_before..].iter().map(|r| r.path.clone()).collect();
    assert_eq!(new_requests, ["/datasets/u:tagged/records/"], "only the listing is read");

    // Other encodings, sync points and codings are other representations.
    for other in ["/export/datasets/u:tagged?encoding=cbor", "/export/datasets/u:tagged?encoding=json-lines"]
    {
        let response =
            stack.client.get(stack.url(other)).header("if-none-match", &etag).send().await.expect("sent");
        assert_eq!(response.status(), 200, "{other}");
        assert_ne!(response.headers()["etag"], etag.as_str());
    }
    // A change upstream changes the tag.
    stack.store().write(&c, vec![("r0".into(), text("changed"))]);
    let changed =
        stack.client.get(stack.url(path)).header("if-none-match", &etag).send().await.expect("sent");
    assert_eq!(changed.status(), 200);
}

const SECRET: &str = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHMtMDEyMzQ1Njc4OQ==";

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

async fn send_webhook(
    sidecar: &Sidecar,
    id: &str,
    timestamp: i64,
    body: &str,
    secret: &str,
) -> reqwest::Response {
    let signature = reference::sign(secret, id, timestamp, body.as_bytes()).expect("sign");
    common::client()
        .post(sidecar.internal_url("/hooks/changes"))
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("sent")
}

/// Waits until the sidecar has read the collection's listing `count` times in all.
async fn wait_for_listing_reads(stack: &Stack, name: &str, count: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if listing_reads(stack, name) >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether the journal holds `version` though it is no longer current: a sync from it works.
async fn journal_knows(stack: &Stack, name: &str, version: u64) -> bool {
    let path = format!("/export/datasets/u:{name}?encoding=json&after={version}");
    stack.get(&path).await.status() == 200
}

async fn signed_stack() -> Stack {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .expect("reference starts");
    let sidecar = Sidecar::start_with(&reference.url(), &["--webhook-secret", SECRET]).await;
    Stack { reference, sidecar, client: common::client() }
}

#[tokio::test]
async fn signed_webhooks_record_versions_and_bad_ones_change_nothing() {
    let stack = signed_stack().await;
    let c = collection("datasets", "u", "hooked");
    let v1 = stack.store().write(&c, vec![("a".into(), text("a"))]);
    let body = r#"{"realm":"datasets","user":"u","name":"hooked","version":"1"}"#;

    let stale = send_webhook(&stack.sidecar, "msg_stale", now_secs() - 600, body, SECRET).await;
    assert_eq!(stale.status(), 401);
    let forged_key = "whsec_d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=";
    let forged = send_webhook(&stack.sidecar, "msg_forged", now_secs(), body, forged_key).await;
    assert_eq!(forged.status(), 401);
    let malformed =
        send_webhook(&stack.sidecar, "msg_bad", now_secs(), r#"{"realm":"datasets"}"#, SECRET).await;
    assert_eq!(malformed.status(), 400);
    let unsigned = common::client()
        .post(stack.sidecar.internal_url("/hooks/changes"))
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(unsigned.status(), 401);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listing_reads(&stack, "hooked"), 0, "refused webhooks cause no re-read");
    assert!(stack.sidecar.log().contains("webhook refused"), "refusals are logged with a reason");
    let huge = "x".repeat(70 * 1024);
    let too_large = send_webhook(&stack.sidecar, "msg_huge", now_secs(), &huge, SECRET).await;
    assert_eq!(too_large.status(), 400);
    assert!(stack.sidecar.wait_for_log("too_large").await, "an oversized webhook is logged too");

    let good = send_webhook(&stack.sidecar, "msg_good", now_secs(), body, SECRET).await;
    assert_eq!(good.status(), 202);
    assert!(wait_for_listing_reads(&stack, "hooked", 1).await, "the webhook caused a re-read");
    let replay = send_webhook(&stack.sidecar, "msg_good", now_secs(), body, SECRET).await;
    assert_eq!(replay.status(), 202, "a replayed id is acknowledged");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(listing_reads(&stack, "hooked"), 1, "a replay is not acted on");
    stack.store().write(&c, vec![("b".into(), text("b"))]);
    assert!(journal_knows(&stack, "hooked", v1).await, "the re-read recorded version {v1}");
}

#[tokio::test]
async fn the_reference_servers_own_webhooks_keep_the_journal_current() {
    let internal = common::free_port();
    let config = ReferenceConfig {
        webhook_url: Some(format!("http://{internal}/hooks/changes")),
        webhook_secret: Some(SECRET.into()),
    };
    let reference =
        ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), config).await.expect("starts");
    let sidecar = Sidecar::start_on(&reference.url(), internal, &["--webhook-secret", SECRET]).await;
    let stack = Stack { reference, sidecar, client: common::client() };
    let c = collection("datasets", "u", "pushed");
    let v1 = stack.store().write(&c, vec![("a".into(), text("a"))]);
    assert!(wait_for_listing_reads(&stack, "pushed", 1).await, "version {v1} announced by webhook");
    let v2 = stack.store().write(&c, vec![("a".into(), None), ("b".into(), text("b"))]);
    assert!(wait_for_listing_reads(&stack, "pushed", 2).await, "version {v2} announced by webhook");
    stack.store().write(&c, vec![("c".into(), text("c"))]);
    assert!(journal_knows(&stack, "pushed", v1).await && journal_knows(&stack, "pushed", v2).await);
    let (_, rows) =
        json_lines(&stack, &format!("/export/datasets/u:pushed?encoding=json-lines&at={v2}")).await;
    // Everything since the version before v2: v2's own changes and the later write.
    let expected =
        [("a", serde_json::Value::Null), ("b", serde_json::json!("b")), ("c", serde_json::json!("c"))];
    assert_eq!(rows, expected.map(|(id, v)| (id.to_owned(), v)));
}

#[tokio::test]
async fn a_burst_of_webhooks_causes_one_read_in_flight_and_one_queued() {
    let stack = Stack::start().await;
    let c = collection("datasets", "u", "burst");
    stack.store().write(&c, vec![("a".into(), text("a"))]);
    stack.store().set_listing_delay(&c, Some(Duration::from_millis(500)));
    let before = listing_reads(&stack, "burst");
    let client = common::client();
    let hooks = (0..50).map(|_| {
        client
            .post(stack.sidecar.internal_url("/hooks/changes"))
            .body(r#"{"realm":"datasets","user":"u","name":"burst"}"#)
            .send()
    });
    for response in futures::future::join_all(hooks).await {
        assert_eq!(response.expect("sent").status(), 202);
    }
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(listing_reads(&stack, "burst") - before, 2, "50 webhooks, one read in flight plus one queued");
}

fn listing_reads(stack: &Stack, name: &str) -> usize {
    let path = format!("/datasets/u:{name}/records/");
    stack.store().request_log().iter().filter(|r| r.path == path).count()
}

#[tokio::test]
async fn polling_records_new_versions_of_exported_collections() {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .expect("starts");
    let sidecar = Sidecar::start_with(&reference.url(), &["--poll-interval", "1"]).await;
    let stack = Stack { reference, sidecar, client: common::client() };
    let c = collection("datasets", "u", "polled");
    stack.store().write(&c, vec![("a".into(), text("a"))]);
    export_version(&stack, "polled").await;
    let v2 = stack.store().write(&c, vec![("b".into(), text("b"))]);
    assert!(wait_for_listing_reads(&stack, "polled", 2).await, "the poller re-read the listing");
    stack.store().write(&c, vec![("c".into(), text("c"))]);
    assert!(journal_knows(&stack, "polled", v2).await, "the poller recorded version {v2}");
    let unexported = collection("datasets", "u", "never-exported");
    stack.store().write(&unexported, vec![("a".into(), text("a"))]);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(listing_reads(&stack, "never-exported"), 0, "only collections clients use are polled");
}

#[tokio::test]
async fn versions_survive_a_restart() {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .expect("starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("journal.sqlite");
    let c = collection("datasets", "u", "durable");
    reference.store().write(&c, vec![("a".into(), text("a")), ("b".into(), text("b"))]);
    let first = Sidecar::start_with_journal(&reference.url(), Some(&journal), &[]).await;
    let response = common::client()
        .get(first.url("/export/datasets/u:durable?encoding=json"))
        .send()
        .await
        .expect("sent");
    let v1 = response.headers()["x-version"].to_str().expect("ascii").to_owned();
    drop(first);
    reference.store().write(&c, vec![("a".into(), None)]);
    let second = Sidecar::start_with_journal(&reference.url(), Some(&journal), &[]).await;
    let stack = Stack { reference, sidecar: second, client: common::client() };
    let (_, rows) =
        json_lines(&stack, &format!("/export/datasets/u:durable?encoding=json-lines&after={v1}")).await;
    assert_eq!(rows, [("a".to_owned(), serde_json::Value::Null)]);
}

#[tokio::test]
async fn retention_forgets_old_versions() {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .expect("starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[journal]\nmax_versions = 2\nprune_interval_seconds = 1\n")
        .expect("write config");
    let sidecar = Sidecar::start_with(&reference.url(), &["--config", config.to_str().expect("utf-8")]).await;
    let stack = Stack { reference, sidecar, client: common::client() };
    let c = collection("datasets", "u", "kept");
    let mut versions = Vec::new();
    for i in 0..4 {
        stack.store().write(&c, vec![(format!("r{i}"), text("v"))]);
        versions.push(export_version(&stack, "kept").await);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut statuses = Vec::new();
    for version in &versions {
        let path = format!("/export/datasets/u:kept?encoding=json&after={version}");
        statuses.push(stack.get(&path).await.status().as_u16());
    }
    assert_eq!(statuses, [410, 410, 200, 200], "the two newest versions are kept");
}

/// One step of a random history: writes (None deletes) to ids 0..8, then maybe an export.
#[derive(Debug, Clone)]
struct Step {
    writes: Vec<(u8, Option<u8>)>,
    export: bool,
}

fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    use proptest::prelude::*;
    let write = (0u8..8, proptest::option::weighted(0.7, 0u8..4));
    let step = (proptest::collection::vec(write, 0..5), proptest::bool::weighted(0.6))
        .prop_map(|(writes, export)| Step { writes, export });
    proptest::collection::vec(step, 1..10)
}

/// What the upstream held at an exported version: id → (record version, value).
type Snapshot = BTreeMap<String, (u64, bytes::Bytes)>;

fn snapshot(stack: &Stack, c: &CollectionId) -> Snapshot {
    stack.store().records(c).into_iter().map(|(id, v, value)| (id, (v, value))).collect()
}

/// The model's answer to "what changed from `old` to `new`": changed values and tombstones.
fn model_diff(old: &Snapshot, new: &Snapshot) -> Vec<(String, serde_json::Value)> {
    let mut rows: Vec<(String, serde_json::Value)> = new
        .iter()
        .filter(|(id, (v, _))| old.get(*id).map(|(ov, _)| ov) != Some(v))
        .map(|(id, (_, value))| {
            let value: Value = ciborium::from_reader(&value[..]).expect("stored CBOR");
            (id.clone(), expected_json(&value))
        })
        .collect();
    rows.extend(
        old.keys().filter(|id| !new.contains_key(*id)).map(|id| (id.clone(), serde_json::Value::Null)),
    );
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

async fn check_history(stack: &Stack, case: usize, history: Vec<Step>) {
    let name = format!("model-{case}");
    let c = collection("datasets", "u", &name);
    stack.store().write(&c, vec![("seed".into(), text("seed"))]);
    let mut exported: Vec<(String, Snapshot)> =
        vec![(export_version(stack, &name).await, snapshot(stack, &c))];
    for step in history {
        let writes = step
            .writes
            .iter()
            .map(|(id, v)| (format!("id{id}"), v.and_then(|v| text(&format!("value {v}")))))
            .collect();
        stack.store().write(&c, writes);
        if step.export {
            let version = export_version(stack, &name).await;
            exported.push((version, snapshot(stack, &c)));
        }
    }
    let (current_version, current) = (export_version(stack, &name).await, snapshot(stack, &c));
    for (i, (version, old)) in exported.iter().enumerate() {
        let path = format!("/export/datasets/u:{name}?encoding=json-lines&after={version}");
        let (now, rows) = json_lines(stack, &path).await;
        assert_eq!(now, current_version);
        assert_eq!(rows, model_diff(old, &current), "after={version}");
        // at=V measures from the version exported before V (the journal knows no other).
        let earlier = exported[..i].iter().rev().find(|(v, _)| v != version);
        let path = format!("/export/datasets/u:{name}?encoding=json-lines&at={version}");
        match earlier {
            Some((_, before)) => {
                assert_eq!(json_lines(stack, &path).await.1, model_diff(before, &current), "at={version}")
            }
            None => assert_eq!(stack.get(&path).await.status(), 410, "at= the first version"),
        }
    }
}

#[test]
fn after_and_at_match_a_model_over_random_histories() {
    use proptest::test_runner::{Config, TestRunner};
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let stack = runtime.block_on(Stack::start());
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&steps(), |history| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            runtime.block_on(check_history(&stack, n, history));
            Ok(())
        })
        .expect("every random history syncs exactly");
}
