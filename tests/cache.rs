//! The record cache, end to end: what a repeated export asks of the dataset server (read from
//! the reference server's request log), and that the cache never lets a caller past U1.

mod common;

use ciborium::Value;
use common::{cbor, collection, error_body, metric, Stack};
use export_sidecar::reference::CollectionId;

const ENCODINGS: [&str; 3] = ["cbor", "json", "json-lines"];

fn seed(stack: &Stack, name: &str, records: usize) -> CollectionId {
    let c = collection("datasets", "u", name);
    let values = (0..records)
        .map(|i| (format!("r{i:03}"), Some(cbor(&Value::Text(format!("value {i}").repeat(1 + i % 7))))))
        .collect();
    stack.store().write(&c, values);
    c
}

/// The upstream paths requested while `work` ran.
async fn upstream_paths<F: std::future::Future<Output = T>, T>(stack: &Stack, work: F) -> (T, Vec<String>) {
    let before = stack.store().request_log().len();
    let result = work.await;
    let paths = stack.store().request_log()[before..].iter().map(|r| r.path.clone()).collect();
    (result, paths)
}

async fn export(stack: &Stack, path: &str) -> bytes::Bytes {
    let response = stack.get(path).await;
    assert_eq!(response.status(), 200, "{path}");
    response.bytes().await.expect("whole body")
}

#[tokio::test]
async fn a_repeated_export_of_an_unchanged_collection_reads_only_the_listing() {
    let stack = Stack::start().await;
    seed(&stack, "same", 40);
    for encoding in ENCODINGS {
        let path = format!("/export/datasets/u:same?encoding={encoding}");
        let (cold, cold_paths) = upstream_paths(&stack, export(&stack, &path)).await;
        let (warm, warm_paths) = upstream_paths(&stack, export(&stack, &path)).await;
        assert_eq!(warm, cold, "{encoding}: the cached export is the same bytes");
        assert_eq!(warm_paths, ["/datasets/u:same/records/"], "{encoding}: only the listing is read");
        // The first encoding fetched every record; the others found them cached.
        let fetched = if encoding == "cbor" { 41 } else { 1 };
        assert_eq!(cold_paths.len(), fetched, "{encoding}");
    }
    let (_, zip_paths) = upstream_paths(&stack, export(&stack, "/export/datasets/u:same/zip")).await;
    assert_eq!(zip_paths, ["/datasets/u:same/records/"], "zip exports use the same cache");
}

#[tokio::test]
async fn after_a_change_only_the_changed_records_are_fetched() {
    let stack = Stack::start().await;
    let c = seed(&stack, "changing", 30);
    let path = "/export/datasets/u:changing?encoding=json";
    export(&stack, path).await;
    stack.store().write(
        &c,
        vec![
            ("r005".into(), Some(cbor(&Value::Text("new five".into())))),
            ("r007".into(), None),
            ("r100".into(), Some(cbor(&Value::Text("added".into())))),
        ],
    );
    let (body, mut paths) = upstream_paths(&stack, export(&stack, path)).await;
    paths.sort();
    assert_eq!(
        paths,
        [
            "/datasets/u:changing/records/",
            "/datasets/u:changing/records/r005",
            "/datasets/u:changing/records/r100"
        ]
    );
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["r005"], "new five", "the new value, not the cached old one");
    assert_eq!(json["r100"], "added");
    assert!(json.get("r007").is_none(), "the deleted record is gone");
    assert_eq!(json.as_object().expect("an object").len(), 30, "30 - r007 + r100");

    // A pull-sync from the first version uses the cache for what did not change too.
    let version = stack.get(path).await.headers()["x-version"].to_str().expect("ascii").to_owned();
    stack.store().write(&c, vec![("r001".into(), Some(cbor(&Value::Text("one".into()))))]);
    let sync = format!("{path}&after={version}");
    let (body, paths) = upstream_paths(&stack, export(&stack, &sync)).await;
    assert_eq!(paths, ["/datasets/u:changing/records/", "/datasets/u:changing/records/r001"]);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&body).expect("JSON"),
        serde_json::json!({"r001": "one"})
    );
}

#[tokio::test]
async fn a_warm_cache_does_not_let_a_caller_past_the_listing() {
    let stack = Stack::start().await;
    let c = seed(&stack, "private", 10);
    stack.store().protect(&c, Some("token".into()));
    let path = "/export/datasets/u:private?encoding=json";
    let allowed = stack.client.get(stack.url(path)).bearer_auth("token").send().await.expect("sent");
    assert_eq!(allowed.status(), 200);
    allowed.bytes().await.expect("body");

    let anonymous = stack.get(path).await;
    let (status, error, _) = error_body(anonymous).await;
    assert_eq!((status, error.as_str()), (401, "unauthorized"));
    let wrong = stack.client.get(stack.url(path)).bearer_auth("guess").send().await.expect("sent");
    assert!(matches!(wrong.status().as_u16(), 401 | 403), "{}", wrong.status());
    assert!(!wrong.text().await.expect("body").contains("value"), "no record leaks into the error");
}

#[tokio::test]
async fn a_cache_of_zero_bytes_fetches_every_time() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, "[cache]\nmax_bytes = 0\n").expect("write the config");
    let stack = Stack::start_with(&["--config", config.to_str().expect("a UTF-8 path")]).await;
    seed(&stack, "uncached", 12);
    let path = "/export/datasets/u:uncached?encoding=cbor";
    export(&stack, path).await;
    let (_, paths) = upstream_paths(&stack, export(&stack, path)).await;
    assert_eq!(paths.len(), 13, "the listing and every record: {paths:?}");
}

#[tokio::test]
async fn cache_figures_are_on_the_metrics_endpoint() {
    let stack = Stack::start().await;
    seed(&stack, "counted", 20);
    let path = "/export/datasets/u:counted?encoding=cbor";
    export(&stack, path).await;
    export(&stack, path).await;
    let value = |name: &'static str| metric(&stack.sidecar, name);
    assert_eq!(value("export_sidecar_cache_misses_total").await, Some(20.0));
    assert_eq!(value("export_sidecar_cache_hits_total").await, Some(20.0));
    assert!(value("export_sidecar_cache_bytes").await > Some(0.0));
}

/// The first JSON export of a record keeps its JSON form beside its CBOR; later exports in any
/// encoding keep nothing more and are the same bytes.
#[tokio::test]
async fn a_json_export_keeps_each_records_json_form_once() {
    let stack = Stack::start().await;
    seed(&stack, "twice", 25);
    let held = || metric(&stack.sidecar, "export_sidecar_cache_bytes");
    export(&stack, "/export/datasets/u:twice?encoding=cbor").await;
    let cbor_only = held().await.expect("cache bytes");
    let path = "/export/datasets/u:twice?encoding=json";
    let (first, paths) = upstream_paths(&stack, export(&stack, path)).await;
    assert_eq!(paths, ["/datasets/u:twice/records/"], "only the listing");
    let values: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&first).expect("an object");
    let json_forms: usize = values.values().map(|v| v.to_string().len()).sum();
    let with_json = cbor_only + json_forms as f64;
    assert_eq!(held().await, Some(with_json), "the JSON forms were kept");
    let lines = export(&stack, "/export/datasets/u:twice?encoding=json-lines").await;
    let again = export(&stack, path).await;
    assert_eq!(held().await, Some(with_json), "nothing more to keep");
    assert_eq!(again, first);
    assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 25);
}

#[tokio::test]
async fn a_value_that_fails_its_check_is_not_kept() {
    let stack = Stack::start().await;
    let c = seed(&stack, "broken", 5);
    stack.store().put_raw(&c, "r002", bytes::Bytes::from_static(&[0x82, 0x01]));
    for encoding in ENCODINGS {
        let path = format!("/export/datasets/u:broken?encoding={encoding}");
        let (body, paths) = upstream_paths(&stack, async { stack.get(&path).await.bytes().await }).await;
        assert!(body.is_err(), "{encoding}: malformed CBOR breaks the download");
        assert!(
            paths.contains(&"/datasets/u:broken/records/r002".to_owned()),
            "{encoding}: fetched again: {paths:?}"
        );
    }
}
