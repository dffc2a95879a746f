//! End-to-end failure handling: upstream down, malformed records, clients that leave,
//! streaming before the last record, and credentials.

mod common;

use ciborium::Value;
use common::{cbor, collection, dead_address, error_body, metric, start_with_config, Sidecar, Stack};
use export_sidecar::reference::{Capacity, CapacityStats, RecordFault};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn numbered(n: usize) -> Vec<(String, Option<bytes::Bytes>)> {
    (0..n)
        .map(|i| (format!("r{i:05}"), Some(cbor(&Value::Text(format!("value {i} {}", "x".repeat(200)))))))
        .collect()
}

#[tokio::test]
async fn upstream_down_gives_502_json_and_the_sidecar_keeps_serving() {
    let (dead, _held) = dead_address();
    let sidecar = Sidecar::start(&format!("http://{dead}")).await;
    let client = common::client();
    for _ in 0..2 {
        let export =
            client.get(sidecar.url("/export/datasets/a:b?encoding=json")).send().await.expect("answered");
        let (status, code, _) = error_body(export).await;
        assert_eq!((status, code.as_str()), (502, "upstream_unavailable"));
        let passed = client.get(sidecar.url("/datasets/a:b/records/")).send().await.expect("answered");
        assert_eq!(error_body(passed).await.0, 502);
    }
    let health = client.get(sidecar.internal_url("/healthz")).send().await.expect("answered");
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn malformed_record_aborts_the_body_and_is_logged() {
    let stack = Stack::start().await;
    let c = collection("datasets", "a", "broken");
    stack.store().write(&c, numbered(50));
    stack.store().put_raw(&c, "r00025", bytes::Bytes::from_static(&[0x82, 0x01]));
    for encoding in ["cbor", "json", "json-lines"] {
        let response = stack.get(&format!("/export/datasets/a:broken?encoding={encoding}")).await;
        assert_eq!(response.status(), 200, "the head left before the bad record was reached");
        assert!(response.bytes().await.is_err(), "{encoding}: the body must be aborted, not ended cleanly");
    }
    assert!(stack.sidecar.wait_for_log("r00025").await, "the log names the record: {}", stack.sidecar.log());
    assert!(stack.sidecar.log().contains("datasets/a:broken"), "the log names the collection");
    // Still serving.
    assert_eq!(stack.get("/export/datasets/a:broken?encoding=json&x=1").await.status(), 200);
}

#[tokio::test]
async fn upstream_failure_mid_export_aborts_the_body() {
    let stack = Stack::start().await;
    let c = collection("datasets", "a", "flaky");
    stack.store().write(&c, numbered(40));
    stack.store().set_fault(&c, "r00030", Some(RecordFault::Status(500)));
    let response = stack.get("/export/datasets/a:flaky?encoding=json-lines").await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "a 500 on a record aborts the download");
    assert!(stack.sidecar.wait_for_log("r00030").await, "{}", stack.sidecar.log());
}

fn u2_requests(stack: &Stack, name: &str) -> usize {
    let prefix = format!("/datasets/a:{name}/records/");
    stack
        .store()
        .request_log()
        .iter()
        .filter(|r| r.path.starts_with(&prefix) && r.path.len() > prefix.len())
        .count()
}

#[tokio::test]
async fn a_client_that_leaves_stops_the_fetches() {
    let stack = Stack::start().await;
    let c = collection("datasets", "a", "slow");
    let records = numbered(3000);
    let ids: Vec<String> = records.iter().map(|(id, _)| id.clone()).collect();
    stack.store().write(&c, records);
    for id in &ids {
        stack.store().set_fault(&c, id, Some(RecordFault::Delay(Duration::from_millis(20))));
    }
    let response = stack.get("/export/datasets/a:slow?encoding=json-lines").await;
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("readable");
    assert!(!first.is_empty());
    drop(body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_leaving = u2_requests(&stack, "slow");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = u2_requests(&stack, "slow");
    assert!(later < 3000, "fetching went on to the end ({later})");
    assert!(
        later <= after_leaving + 1,
        "fetches continued after the client left: {after_leaving} then {later}"
    );
    assert!(stack.sidecar.wait_for_log("client_gone").await, "{}", stack.sidecar.log());
    let line = stack.sidecar.log().lines().find(|l| l.contains("client_gone")).map(str::to_owned);
    let line = line.expect("the export's log line");
    assert!(!line.contains("records=0"), "the log line counts the records sent before leaving: {line}");
}

#[tokio::test]
async fn http_1_0_exports_are_refused_since_truncation_would_look_complete() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "old"), numbered(3));
    let mut socket = tokio::net::TcpStream::connect(stack.sidecar.public).await.expect("connect");
    socket
        .write_all(b"GET /export/datasets/a:old?encoding=json HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut answer = String::new();
    socket.read_to_string(&mut answer).await.expect("read until close");
    assert!(answer.starts_with("HTTP/1.1 505") || answer.starts_with("HTTP/1.0 505"), "{answer}");
    assert!(answer.contains("\"error\":\"http_version_not_supported\""), "{answer}");
}

#[tokio::test]
async fn every_cookie_line_is_forwarded() {
    let stack = Stack::start().await;
    let c = collection("datasets", "carol", "cookies");
    stack.store().write(&c, numbered(2));
    stack.store().protect(&c, Some("s3cret".into()));
    let response = stack
        .client
        .get(stack.url("/export/datasets/carol:cookies?encoding=json"))
        .header("cookie", "theme=dark")
        .header("cookie", "session=s3cret")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200, "the session cookie was on the second line");
}

#[tokio::test]
async fn first_bytes_leave_before_the_last_record_is_fetched() {
    let stack = Stack::start().await;
    let c = collection("datasets", "a", "tail");
    stack.store().write(&c, numbered(100));
    stack.store().set_fault(&c, "r00099", Some(RecordFault::Delay(Duration::from_secs(4))));
    let started = Instant::now();
    let response = stack.get("/export/datasets/a:tail?encoding=json-lines").await;
    let mut body = response.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("readable");
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("[\"r00000\""));
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("complete"));
    }
    let text = String::from_utf8(rest).expect("utf-8");
    assert!(text.contains("\"r00099\""), "the delayed record still arrives");
    assert!(first_at < Duration::from_secs(3), "first chunk waited for the slow record: {first_at:?}");
}

#[tokio::test]
async fn credentials_are_forwarded_and_enforced() {
    let stack = Stack::start().await;
    let c = collection("datasets", "carol", "private");
    stack.store().write(&c, numbered(3));
    stack.store().protect(&c, Some("s3cret".into()));
    let path = "/export/datasets/carol:private?encoding=json";

    let anonymous = stack.get(path).await;
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let (status, code, _) = error_body(anonymous).await;
    assert_eq!((status, code.as_str()), (401, "unauthorized"));

    let wrong = stack.client.get(stack.url(path)).bearer_auth("guess").send().await.expect("sent");
    assert_eq!(error_body(wrong).await.0, 403);

    let bearer = stack.client.get(stack.url(path)).bearer_auth("s3cret").send().await.expect("sent");
    assert_eq!(bearer.status(), 200);
    assert_eq!(common::object_entries(&bearer.text().await.expect("body")).len(), 3);

    let cookie =
        stack.client.get(stack.url(path)).header("cookie", "session=s3cret").send().await.expect("sent");
    assert_eq!(cookie.status(), 200);
    assert_eq!(common::object_entries(&cookie.text().await.expect("body")).len(), 3);
}

/// Exports 300 records, as json-lines and as a zip (the record cache is off, so both fetch
/// them), from a dataset server that works on two records at once for 5 ms each, and returns
/// how its queue for those two slots looked, and the sidecar's mean fetch window.
async fn export_from_a_saturated_server(stack: &Stack) -> (CapacityStats, f64) {
    let c = collection("datasets", "a", "busy");
    stack.store().write(&c, numbered(300));
    let capacity = Arc::new(Capacity::new(2, Duration::from_millis(5)));
    stack.store().limit_capacity(Some(Arc::clone(&capacity)));
    let lines = stack.get("/export/datasets/a:busy?encoding=json-lines").await;
    assert_eq!(lines.status(), 200);
    let text = lines.text().await.expect("the whole export");
    assert_eq!(text.lines().count(), 300);
    assert!(text.lines().last().is_some_and(|line| line.starts_with(r#"["r00299","#)), "{text:.200}");
    let zip = stack.get("/export/datasets/a:busy/zip").await;
    assert_eq!(zip.status(), 200);
    assert!(!zip.bytes().await.expect("the whole archive").is_empty());
    let window = |part: &'static str| metric(&stack.sidecar, part);
    let (sum, count) = (
        window("export_sidecar_export_fetch_window_sum"),
        window("export_sidecar_export_fetch_window_count"),
    );
    let (sum, count) = (sum.await.expect("window sum"), count.await.expect("window count"));
    assert_eq!(count, 600.0, "one window observation per record fetched");
    (capacity.stats(), sum / count)
}

#[tokio::test]
async fn a_saturated_dataset_server_gets_a_short_queue_not_every_fetch_at_once() {
    let (_dir, adaptive) = start_with_config("[cache]\nmax_bytes = 0\n").await;
    let (adaptive, adaptive_window) = export_from_a_saturated_server(&adaptive).await;
    let (_dir, fixed) =
        start_with_config("[cache]\nmax_bytes = 0\n[upstream]\nadaptive_concurrency = false\n").await;
    let (fixed, fixed_window) = export_from_a_saturated_server(&fixed).await;
    assert_eq!((adaptive.served, fixed.served), (600, 600), "every record fetched for both exports");
    assert!(fixed.most_waiting >= 24, "a fixed window queues nearly all 32 fetches: {fixed:?}");
    assert!(adaptive.most_waiting <= 20, "the adaptive window kept the queue short: {adaptive:?}");
    assert!(adaptive.mean_wait < fixed.mean_wait, "shorter waits: {adaptive:?} against {fixed:?}");
    assert_eq!(fixed_window, 32.0, "the fixed window is upstream.concurrency");
    assert!(adaptive_window < 24.0, "/metrics shows the window the server got: {adaptive_window}");
}
