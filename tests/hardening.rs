//! Hostile and broken input, end to end: bad paths, upstream faults, load and clients that
//! leave, and probes of the public listener (internal endpoints, credentials, smuggling).

mod common;

use ciborium::Value;
use common::{cbor, collection, error_body, metric, numbered, start_with_config, Sidecar, Stack};
use export_sidecar::reference::{attachment_link, RecordFault, ReferenceConfig, ReferenceServer};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The upstream paths requested while `work` ran.
async fn upstream_paths<F: std::future::Future<Output = T>, T>(stack: &Stack, work: F) -> (T, Vec<String>) {
    let before = stack.store().request_log().len();
    let result = work.await;
    let paths = stack.store().request_log()[before..].iter().map(|r| r.path.clone()).collect();
    (result, paths)
}

/// One response as read off a raw connection.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Asserts the SPEC's JSON error body and returns its code.
    fn error_code(&self, what: &str) -> String {
        assert_eq!(self.header("content-type"), Some("application/json"), "{what}: {self:?}");
        let body: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON error body");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
        body["error"].as_str().expect("an error code").to_owned()
    }
}

/// Writes `request` as is on a fresh connection and reads every response until the server
/// closes or stays silent for `quiet`. Also says whether the server closed the connection.
async fn raw_exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> (Vec<RawResponse>, bool) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.write_all(request).await.expect("send");
    let mut received = Vec::new();
    let mut closed = false;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match tokio::time::timeout(quiet, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (parse_responses(&received), closed)
}

/// Splits what a server sent into responses (Content-Length, chunked, or to the end).
fn parse_responses(mut data: &[u8]) -> Vec<RawResponse> {
    let mut responses = Vec::new();
    while let Some(end) = find(data, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&data[..end]).into_owned();
        data = &data[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let value = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        let body = if let Some(length) = value("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let body = data[..length.min(data.len())].to_vec();
            data = &data[length.min(data.len())..];
            body
        } else if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            dechunk(&mut data)
        } else if status == 304 || status == 204 || status == 101 {
            Vec::new()
        } else {
            std::mem::take(&mut data).to_vec()
        };
        responses.push(RawResponse { status, headers, body });
    }
    responses
}

/// Reads a chunked body off the front of `data` (as much as there is).
fn dechunk(data: &mut &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(line_end) = find(data, b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16).unwrap_or(0);
        *data = &data[line_end + 2..];
        if size == 0 {
            *data = &data[find(data, b"\r\n").map_or(data.len(), |i| i + 2)..];
            break;
        }
        let size = size.min(data.len());
        body.extend_from_slice(&data[..size]);
        *data = &data[(size + 2).min(data.len())..];
    }
    body
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A plain GET of `target` (sent byte for byte) and its one response.
async fn raw_get(addr: SocketAddr, target: &str) -> RawResponse {
    let request = format!("GET {target} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n");
    let (mut responses, _) = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(responses.len(), 1, "{target}: one response");
    responses.remove(0)
}

/// Export paths that must be refused, or must reach exactly one upstream listing path.
/// Each `{}` is replaced by an endpoint's suffix (`?encoding=json`, `/zip`, `/event-stream`).
fn bad_collections() -> Vec<(String, u16, Option<&'static str>)> {
    let long = format!("/export/datasets/a:{}{{}}", "x".repeat(9000));
    let cases: [(&str, u16, Option<&str>); 19] = [
        ("/export/datasets/ab{}", 400, None),
        ("/export/datasets/a:b%ZZ{}", 400, None),
        ("/export/datasets/a:b%{}", 400, None),
        ("/export/datasets/a%2:b{}", 400, None),
        ("/export/datasets/a:b%00{}", 400, None),
        ("/export/datasets/a%00:b{}", 400, None),
        ("/export/datasets/a:%C3%28{}", 400, None),
        ("/export/datasets/:b{}", 400, None),
        ("/export/datasets/a:{}", 400, None),
        ("/export/datasets%2F..%2Flenses/a:b{}", 404, None),
        ("/export/../a:b{}", 404, None),
        ("/export/%2E%2E/a:b{}", 404, None),
        ("/export/datasets/../lenses/a:b{}", 404, None),
        ("/export/datasets/..:..{}", 404, Some("/datasets/%2E%2E:%2E%2E/records/")),
        ("/export/datasets/%2E%2E:x{}", 404, Some("/datasets/%2E%2E:x/records/")),
        (
            "/export/datasets/a%2F..%2F..%2Fattachments:b{}",
            404,
            Some("/datasets/a%2F..%2F..%2Fattachments:b/records/"),
        ),
        ("/export/datasets/a:b%2F..%2F..%2Fc:d{}", 404, Some("/datasets/a:b%2F..%2F..%2Fc%3Ad/records/")),
        ("/export/lenses/a%3Ab:c{}", 404, Some("/lenses/a%3Ab:c/records/")),
        ("/export/datasets/a:b%2Frecords%2F{}", 404, Some("/datasets/a:b%2Frecords%2F/records/")),
    ];
    let mut cases: Vec<_> = cases.into_iter().map(|(p, s, u)| (p.to_owned(), s, u)).collect();
    cases.push((long, 414, None));
    cases
}

/// Whole paths under a real collection that name no export.
const BAD_TAILS: [(&str, u16); 10] = [
    ("/export/datasets/a:b/..", 404),
    ("/export/datasets/a:b/%2E%2E", 404),
    ("/export/datasets/a:b/zip/..", 404),
    ("/export/datasets/a:b/../../datasets/a:b/records/", 404),
    ("/export/datasets/a:b/zip%00", 400),
    ("/export/datasets/a:b/event-stream%2F..", 404),
    ("/export/datasets/a:b/zip%2F..%2F..%2Fx", 404),
    ("/export/", 404),
    ("/export", 404),
    ("/export//a:b", 404),
];

#[tokio::test]
async fn bad_export_requests_get_json_errors_and_reach_no_other_upstream_path() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "b"), numbered(3));
    let addr = stack.sidecar.public;
    for (template, status, upstream) in bad_collections() {
        for suffix in ["?encoding=json", "/zip", "/event-stream"] {
            let target = template.replace("{}", suffix);
            let (response, paths) = upstream_paths(&stack, raw_get(addr, &target)).await;
            let what = &target[..target.len().min(120)];
            assert_eq!(response.status, status, "{what}: {response:?}");
            response.error_code(what);
            assert!(
                paths.iter().all(|p| Some(p.as_str()) == upstream) && paths.len() <= 1,
                "{what} reached {paths:?}, not only {upstream:?}"
            );
            assert_eq!(paths.len(), usize::from(upstream.is_some()), "{what}: {paths:?}");
        }
    }
    for (target, status) in BAD_TAILS {
        let (response, paths) = upstream_paths(&stack, raw_get(addr, target)).await;
        assert_eq!(response.status, status, "{target}: {response:?}");
        response.error_code(target);
        assert_eq!(paths, Vec::<String>::new(), "{target} must not reach the dataset server");
    }
}

#[tokio::test]
async fn names_with_dots_slashes_and_colons_export_exactly_their_own_collection() {
    let stack = Stack::start().await;
    let tricky = collection("datasets", "../x", "y/../z:w");
    stack.store().write(&tricky, numbered(2));
    stack.store().write(&collection("datasets", "x", "z:w"), numbered(5));
    let target = "/export/datasets/..%2Fx:y%2F..%2Fz%3Aw?encoding=json-lines";
    let (response, mut paths) = upstream_paths(&stack, raw_get(stack.sidecar.public, target)).await;
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(String::from_utf8_lossy(&response.body).lines().count(), 2, "its own two records");
    paths.sort();
    let base = "/datasets/..%2Fx:y%2F..%2Fz%3Aw/records/";
    assert_eq!(paths, [base.to_owned(), format!("{base}r00000"), format!("{base}r00001")]);
}

#[tokio::test]
async fn pass_through_paths_reach_the_upstream_exactly_as_sent() {
    let stack = Stack::start().await;
    let long = format!("/debug/echo/{}", "l".repeat(10_000));
    let targets = [
        "/debug/echo/../../datasets/a:b/records/",
        "/debug/echo/./x/%2E%2E/y/.",
        "/debug/echo//double//slash/",
        "/debug/echo/%2F%00%ZZ%",
        "/debug/echo/a%3Ab/%252F?q=%2F..&r=..%00&&s",
        "/datasets/a:b/records/%2E%2E",
        "/datasets/a:b/records/..%2F..%2Fattachments",
        "/Export/datasets/a:b?encoding=json",
        "//export/datasets/a:b?encoding=json",
        "/%65xport/datasets/a:b?encoding=json",
        "/exports/x",
        long.as_str(),
    ];
    for target in targets {
        let (response, seen) = upstream_paths(&stack, raw_get(stack.sidecar.public, target)).await;
        let what = &target[..target.len().min(80)];
        assert_ne!(response.status, 502, "{what}: {response:?}");
        let sent_path = target.split_once('?').map_or(target, |(p, _)| p);
        assert_eq!(seen, [sent_path.to_owned()], "{what}: the upstream saw another path");
        if target.starts_with("/debug/echo") {
            let echo: serde_json::Value = serde_json::from_slice(&response.body).expect("echo JSON");
            assert_eq!(echo["query"].as_str(), target.split_once('?').map(|(_, q)| q), "{what}");
        }
    }
}

#[tokio::test]
async fn raw_bytes_the_request_line_cannot_hold_are_escaped_or_refused() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "b"), numbered(1));
    let addr = stack.sidecar.public;
    // A raw NUL or space is escaped before routing (%00, %20): the export refuses the NUL
    // like its escaped form, and the pass-through forwards the escaped form.
    let send = |target: &[u8]| {
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(target);
        request.extend_from_slice(b" HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n");
        request
    };
    let nul = send(b"/export/datasets/a:b\x00?encoding=json");
    let ((mut responses, _), paths) =
        upstream_paths(&stack, raw_exchange(addr, &nul, Duration::from_secs(5))).await;
    assert_eq!(responses.len(), 1);
    let response = responses.remove(0);
    assert_eq!((response.status, response.error_code("raw NUL").as_str()), (400, "bad_request"));
    assert!(paths.is_empty(), "{paths:?}");
    for (target, upstream) in
        [(&b"/debug/echo/\x00x"[..], "/debug/echo/%00x"), (b"/debug/echo/a b", "/debug/echo/a%20b")]
    {
        let (_, paths) =
            upstream_paths(&stack, raw_exchange(addr, &send(target), Duration::from_secs(5))).await;
        assert_eq!(paths, [upstream]);
    }
    // A head over pingora's 1 MiB limit is refused before any routing, for both kinds of path.
    for prefix in ["/export/datasets/a:b?encoding=json&x=", "/debug/echo/"] {
        let huge = send(format!("{prefix}{}", "y".repeat(1 << 20)).as_bytes());
        let ((responses, _), paths) =
            upstream_paths(&stack, raw_exchange(addr, &huge, Duration::from_secs(5))).await;
        assert_eq!(responses.iter().map(|r| r.status).collect::<Vec<_>>(), [400], "{prefix}");
        assert!(paths.is_empty(), "{paths:?}");
    }
}

/// Waits until at least `count` log lines contain every one of `needles`.
async fn wait_for_lines(sidecar: &Sidecar, needles: &[&str], count: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let log = sidecar.log();
        if log.lines().filter(|line| needles.iter().all(|n| line.contains(n))).count() >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The whole body of a healthy export: the sidecar still serves after a fault.
async fn still_serving(stack: &Stack, what: &str) {
    let response = stack.get("/export/datasets/a:healthy?encoding=json-lines").await;
    assert_eq!(response.status(), 200, "after {what}");
    let body = response.text().await.unwrap_or_else(|e| panic!("after {what}: {e}"));
    assert_eq!(body.lines().count(), 5, "after {what}");
}

/// CBOR nesting one level deeper than the converter takes.
fn too_deep() -> bytes::Bytes {
    let mut bytes = vec![0x81; export_sidecar::codec::MAX_DEPTH + 1];
    bytes.push(0x01);
    bytes.into()
}

/// Each way a record's U2 can fail, with a word the log line must carry.
fn record_faults() -> Vec<(&'static str, RecordFault, &'static str)> {
    let body = |bytes: &'static [u8]| RecordFault::Body(bytes::Bytes::from_static(bytes));
    vec![
        ("500", RecordFault::Status(500), "500"),
        ("503", RecordFault::Status(503), "503"),
        ("timeout before head", RecordFault::Delay(Duration::from_secs(5)), "first_byte_timeout_ms"),
        ("hang mid-body", RecordFault::HangAfterHead, "idle_timeout_ms"),
        ("reset mid-body", RecordFault::ResetMidBody, "record"),
        ("truncated CBOR", body(&[0x82, 0x01]), "truncated"),
        ("trailing bytes", body(&[0x01, 0x02]), "trailing"),
        ("invalid UTF-8", body(&[0x62, 0xff, 0xfe]), "UTF-8"),
        ("reserved additional info", body(&[0x1c]), "malformed"),
        ("too deep", RecordFault::Body(too_deep()), "deeper"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_faults_abort_the_body_name_the_record_and_the_sidecar_keeps_serving() {
    let (_dir, stack) =
        start_with_config("[upstream]\nfirst_byte_timeout_ms = 1000\nidle_timeout_ms = 1000\n").await;
    stack.store().write(&collection("datasets", "a", "healthy"), numbered(5));
    for (i, (what, fault, word)) in record_faults().into_iter().enumerate() {
        let c = collection("datasets", "a", &format!("fault{i}"));
        stack.store().write(&c, numbered(30));
        stack.store().set_fault(&c, "r00020", Some(fault));
        for (n, suffix) in ["?encoding=cbor", "?encoding=json-lines", "/zip"].into_iter().enumerate() {
            let response = stack.get(&format!("/export/datasets/a:fault{i}{suffix}")).await;
            assert_eq!(response.status(), 200, "{what} {suffix}: the head leaves before record 20");
            assert!(response.bytes().await.is_err(), "{what} {suffix}: the body must be aborted");
            let needles = [c.to_string(), "r00020".to_owned(), word.to_owned()];
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            assert!(
                wait_for_lines(&stack.sidecar, &needles, n + 1).await,
                "{what} {suffix}: no log line names {needles:?}:\n{}",
                stack.sidecar.log()
            );
            still_serving(&stack, what).await;
        }
    }
}

/// Each way a collection's U1 can fail, the status the client gets and the log's word for it.
fn listing_faults() -> Vec<(&'static str, RecordFault, u16, &'static str)> {
    let not_a_map = cbor(&Value::Array(vec![Value::Text("r1".into())]));
    let no_versions = cbor(&Value::Map(vec![(Value::Text("r1".into()), Value::Integer(1.into()))]));
    let body = |bytes: &'static [u8]| RecordFault::Body(bytes::Bytes::from_static(bytes));
    vec![
        ("500", RecordFault::Status(500), 502, "500"),
        ("503", RecordFault::Status(503), 502, "503"),
        ("timeout before head", RecordFault::Delay(Duration::from_secs(5)), 504, "first_byte_timeout_ms"),
        ("hang mid-body", RecordFault::HangAfterHead, 504, "idle_timeout_ms"),
        ("reset mid-body", RecordFault::ResetMidBody, 502, "unusable"),
        ("not a map", RecordFault::Body(not_a_map), 502, "not a map"),
        ("entries without versions", RecordFault::Body(no_versions), 502, "not a map"),
        ("malformed CBOR", body(&[0xa1, 0x61]), 502, "not a map"),
        (
            "a map of 2^64 entries",
            body(&[0xbb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            502,
            "not a map",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_faults_are_a_json_status_before_the_head_and_the_sidecar_keeps_serving() {
    let (_dir, stack) =
        start_with_config("[upstream]\nfirst_byte_timeout_ms = 1000\nidle_timeout_ms = 1000\n").await;
    stack.store().write(&collection("datasets", "a", "healthy"), numbered(5));
    for (i, (what, fault, status, word)) in listing_faults().into_iter().enumerate() {
        let c = collection("datasets", "a", &format!("listing{i}"));
        stack.store().write(&c, numbered(3));
        stack.store().set_listing_fault(&c, Some(fault));
        for (n, suffix) in ["?encoding=json", "/zip", "/event-stream"].into_iter().enumerate() {
            let response = stack.get(&format!("/export/datasets/a:listing{i}{suffix}")).await;
            let (got, _, message) = error_body(response).await;
            assert_eq!(got, status, "{what} {suffix}: {message}");
            let needles = ["listing failed", &c.to_string(), word];
            assert!(
                wait_for_lines(&stack.sidecar, &needles, n + 1).await,
                "{what} {suffix}: no log line names {needles:?}:\n{}",
                stack.sidecar.log()
            );
            still_serving(&stack, what).await;
        }
    }
}

async fn reference_on(addr: SocketAddr) -> ReferenceServer {
    ReferenceServer::start(addr, ReferenceConfig::default()).await.expect("reference server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_502_before_the_head_and_an_aborted_body_after_it() {
    let addr = common::free_port();
    let sidecar = Sidecar::start(&format!("http://{addr}")).await;
    let client = common::client();
    for suffix in ["?encoding=json", "/zip", "/event-stream"] {
        let response = client.get(sidecar.url(&format!("/export/datasets/a:down{suffix}"))).send().await;
        let (status, code, _) = error_body(response.expect("answered")).await;
        assert_eq!((status, code.as_str()), (502, "upstream_unavailable"), "{suffix}");
    }
    let needles = ["listing failed", "datasets/a:down", "connection"];
    assert!(wait_for_lines(&sidecar, &needles, 3).await, "{}", sidecar.log());

    // The dataset server comes up: the same sidecar serves, without a restart.
    let reference = reference_on(addr).await;
    let c = collection("datasets", "a", "down");
    reference.store().write(&c, numbered(100));
    let export = client.get(sidecar.url("/export/datasets/a:down?encoding=json-lines")).send().await;
    assert_eq!(export.expect("answered").text().await.expect("whole body").lines().count(), 100);

    // It goes away mid-export: record 50 is in flight, every later one is refused.
    let c = collection("datasets", "a", "going");
    reference.store().write(&c, numbered(100));
    reference.store().set_fault(&c, "r00050", Some(RecordFault::Delay(Duration::from_secs(30))));
    let mut export = client
        .get(sidecar.url("/export/datasets/a:going?encoding=json-lines"))
        .send()
        .await
        .expect("answered");
    assert_eq!(export.status(), 200);
    assert!(export.chunk().await.expect("a first chunk").is_some_and(|c| c.starts_with(b"[\"r00000\"")));
    reference.shutdown().await;
    let rest = async {
        while export.chunk().await?.is_some() {}
        Ok::<_, reqwest::Error>(())
    };
    assert!(rest.await.is_err(), "the body must be aborted");
    let needles = ["record fetch failed", "datasets/a:going", "r00050"];
    assert!(wait_for_lines(&sidecar, &needles, 1).await, "{}", sidecar.log());

    let reference = reference_on(addr).await;
    reference.store().write(&collection("datasets", "a", "back"), numbered(7));
    let export = client.get(sidecar.url("/export/datasets/a:back?encoding=json-lines")).send().await;
    assert_eq!(export.expect("answered").text().await.expect("whole body").lines().count(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_exports_are_byte_identical_to_a_single_one() {
    let (_dir, stack) = start_with_config("[export]\nmax_concurrent = 128\n").await;
    let c = collection("datasets", "a", "big");
    let records = (0..10_000)
        .map(|i| (format!("r{i:05}"), Some(cbor(&Value::Array(vec![i.into(), format!("v{i}").into()])))))
        .collect();
    stack.store().write(&c, records);
    let path = "/export/datasets/a:big?encoding=cbor";
    let single = stack.get(path).await.bytes().await.expect("a whole single export");
    // 200 records change, so every concurrent export fetches some records, not only the cache.
    let changed =
        (0..10_000).step_by(50).map(|i| (format!("r{i:05}"), Some(cbor(&Value::Text(format!("new {i}"))))));
    stack.store().write(&c, changed.collect());
    let exports = (0..64).map(|_| async {
        let response = stack.get(path).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.expect("a whole export")
    });
    let concurrent = futures::future::join_all(exports).await;
    let after = stack.get(path).await.bytes().await.expect("a whole single export");

    let mut expected = Vec::new();
    for (id, _, value) in stack.store().records(&c) {
        expected.push(0x82);
        ciborium::into_writer(&id, &mut expected).expect("encode the id");
        expected.extend_from_slice(&value);
    }
    assert_eq!(after.as_ref(), expected.as_slice(), "the single export is the collection");
    assert_ne!(single, after, "the change shows");
    for (i, body) in concurrent.iter().enumerate() {
        assert!(body == &after, "export {i} differs: {} bytes, not {}", body.len(), after.len());
    }
}

/// The process's open file descriptors and the inodes of its sockets.
fn descriptors(pid: u32) -> (usize, std::collections::HashSet<u64>) {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/<pid>/fd");
    let targets: Vec<String> = entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .collect();
    let sockets =
        targets.iter().filter_map(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()).collect();
    (targets.len(), sockets)
}

/// ESTABLISHED TCP connections of process `pid` whose local or remote port is `port`.
fn established(pid: u32, local: Option<u16>, remote: Option<u16>) -> usize {
    let (_, sockets) = descriptors(pid);
    let port = |address: &str| address.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(l), Some(r), Some(state), Some(inode)) =
                (fields.get(1), fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let mine = inode.parse().is_ok_and(|inode: u64| sockets.contains(&inode));
            let matches =
                local.is_none_or(|p| port(l) == Some(p)) && remote.is_none_or(|p| port(r) == Some(p));
            count += usize::from(mine && *state == "01" && matches);
        }
    }
    count
}

/// Random bytes (no attachment compresses away).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// A records collection and a zip collection with attachments, both stalling half-way.
fn stalling_collections(stack: &Stack) {
    let slow = collection("datasets", "a", "slow");
    let padded =
        (0..400).map(|i| (format!("r{i:05}"), Some(cbor(&Value::Text(format!("{i} {}", "p".repeat(500)))))));
    stack.store().write(&slow, padded.collect());
    stack.store().set_fault(&slow, "r00200", Some(RecordFault::Delay(Duration::from_secs(60))));
    let films = collection("datasets", "a", "films");
    let linked = (0..40).map(|i| {
        let value = if i < 8 {
            let hex = stack.store().add_attachment(noise(256 << 10, i).into(), "application/octet-stream");
            Value::Text(attachment_link(&hex, "application/octet-stream"))
        } else {
            Value::Integer(i.into())
        };
        (format!("r{i:05}"), Some(cbor(&value)))
    });
    stack.store().write(&films, linked.collect());
    stack.store().set_fault(&films, "r00030", Some(RecordFault::Delay(Duration::from_secs(60))));
}

/// Event streams served on their socket hold a duplicate of pingora's descriptor: when their
/// clients leave, every descriptor and the subscriber count must go back to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_leaving_leave_no_descriptors_behind() {
    let (_dir, stack) = start_with_config("").await;
    stack.store().write(&collection("datasets", "a", "feed"), numbered(5));
    let pid = stack.sidecar.pid();
    let subscribers = "export_sidecar_sse_subscribers";
    let (baseline, _) = descriptors(pid);
    let mut sockets = Vec::new();
    for _ in 0..100 {
        let mut socket = tokio::net::TcpStream::connect(stack.sidecar.public).await.expect("connect");
        let request = "GET /export/datasets/a:feed/event-stream HTTP/1.1\r\nHost: x\r\n\r\n";
        socket.write_all(request.as_bytes()).await.expect("request sent");
        let mut first = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut first)).await;
        let read = read.expect("an answer in time").expect("read");
        assert!(first[..read].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&first[..read]));
        sockets.push(socket);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&stack.sidecar, subscribers).await != Some(100.0) {
        assert!(Instant::now() < deadline, "100 subscribers joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (open, _) = descriptors(pid);
    assert!(open >= baseline + 100, "one descriptor per subscriber: {open} vs {baseline} before");
    assert!(open <= baseline + 100 + 16, "no second descriptor per subscriber: {open} vs {baseline} before");
    drop(sockets);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (open, _) = descriptors(pid);
        let joined = metric(&stack.sidecar, subscribers).await;
        if joined == Some(0.0) && open <= baseline + 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{joined:?} subscribers and {open} descriptors left; {baseline} before"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_leaving_mid_export_leave_nothing_behind() {
    let spool = tempfile::tempdir().expect("spool dir");
    let config = format!(
        "[server]\nthreads = 2\n[export]\nmax_concurrent = 256\ntemp_dir = {:?}\n[upstream]\nconcurrency = 8\n",
        spool.path().to_str().expect("UTF-8 path")
    );
    let (_dir, stack) = start_with_config(&config).await;
    let (pid, public, upstream) =
        (stack.sidecar.pid(), stack.sidecar.public.port(), stack.reference.addr().port());
    stalling_collections(&stack);
    stack.store().write(&collection("datasets", "a", "healthy"), numbered(5));
    still_serving(&stack, "warming up").await;
    // The harness's own client keeps its warm-up connection open.
    let ((baseline, _), connected) = (descriptors(pid), established(pid, Some(public), None));

    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let opened = (0..200).map(|i| {
        let path = if i % 2 == 0 {
            "/export/datasets/a:slow?encoding=json-lines"
        } else {
            "/export/datasets/a:films/zip?attachments=true"
        };
        let request = client.get(stack.url(path));
        async move {
            let mut response = request.send().await.expect("answered");
            assert_eq!(response.status(), 200, "{path}");
            assert!(response.chunk().await.expect("a first chunk").is_some(), "{path}");
            response
        }
    });
    let responses = futures::future::join_all(opened).await;
    assert_eq!(metric(&stack.sidecar, "export_sidecar_exports_running").await, Some(200.0));
    assert!(std::fs::read_dir(spool.path()).expect("spool").count() > 0, "attachments are being spooled");
    assert!(established(pid, Some(public), None) >= 200, "every client is connected");
    drop(responses);

    let deadline = Instant::now() + Duration::from_secs(20);
    let settled = || async {
        let running = metric(&stack.sidecar, "export_sidecar_exports_running").await;
        let spooled = std::fs::read_dir(spool.path()).expect("spool").count();
        let (fds, _) = descriptors(pid);
        let downstream = established(pid, Some(public), None);
        let upstream = established(pid, None, Some(upstream));
        (running, spooled, fds, downstream, upstream)
    };
    let mut state = settled().await;
    // The listings' client and each of the 2 export threads' clients may keep up to
    // 2 × upstream.concurrency idle connections.
    let pooled = 3 * 2 * 8;
    while !(state.0 == Some(0.0)
        && state.1 == 0
        && state.2 <= baseline + pooled + 8
        && state.3 <= connected
        && state.4 <= pooled)
    {
        assert!(
            Instant::now() < deadline,
            "(running, spool files, fds, client connections, upstream connections) = {state:?}; \
             before: {baseline} fds, {connected} client connections"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        state = settled().await;
    }
    still_serving(&stack, "200 clients leaving").await;
}

#[tokio::test]
async fn internal_endpoints_on_the_public_listener_are_only_passed_through() {
    let stack = Stack::start().await;
    let c = collection("datasets", "a", "hooked");
    stack.store().write(&c, numbered(2));
    let notice = r#"{"realm":"datasets","user":"a","name":"hooked"}"#;
    let probes = [
        ("POST", "/hooks/changes"),
        ("GET", "/hooks/changes"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
    ];
    for (method, path) in probes {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{notice}",
            notice.len()
        );
        let ((responses, _), seen) = upstream_paths(
            &stack,
            raw_exchange(stack.sidecar.public, request.as_bytes(), Duration::from_secs(5)),
        )
        .await;
        assert_eq!(seen, [path], "{method} {path} goes to the dataset server, and only there");
        let response = responses.first().expect("a response");
        assert_eq!(response.status, 404, "{method} {path}: the dataset server's answer");
        let body = String::from_utf8_lossy(&response.body);
        assert!(!body.contains("export_sidecar_") && !body.contains("accepted"), "{method} {path}: {body}");
    }
    // Had the sidecar taken the webhook, it would re-read the listing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listing = "/datasets/a:hooked/records/";
    assert!(!stack.store().request_log().iter().any(|r| r.path == listing), "a webhook was acted on");
    let counted = metric(&stack.sidecar, r#"export_sidecar_webhooks_total{outcome="accepted"}"#).await;
    assert!(counted.is_none_or(|n| n == 0.0), "{counted:?}");
}

#[tokio::test]
async fn a_warm_sidecar_gives_an_unauthorised_caller_nothing() {
    let stack = Stack::start().await;
    let c = collection("datasets", "carol", "diary");
    let secret = Value::Text("the secret entry".into());
    stack.store().write(&c, vec![("entry".into(), Some(cbor(&secret)))]);
    stack.store().protect(&c, Some("token".into()));
    let base = "/export/datasets/carol:diary";
    let allowed = |path: &str| stack.client.get(stack.url(path)).bearer_auth("token");

    // The authorised caller warms the cache, the journal and the change feed.
    let export = allowed(&format!("{base}?encoding=json")).send().await.expect("sent");
    let (version, etag) = (export.headers()["x-version"].clone(), export.headers()["etag"].clone());
    assert!(export.text().await.expect("body").contains("the secret entry"));
    allowed(&format!("{base}/zip")).send().await.expect("sent").bytes().await.expect("the archive");
    let mut feed = allowed(&format!("{base}/event-stream")).send().await.expect("sent");
    assert!(feed.chunk().await.expect("the feed opens").is_some());

    let version = version.to_str().expect("ascii");
    let paths = [
        format!("{base}?encoding=json"),
        format!("{base}?encoding=cbor&after={version}"),
        format!("{base}?encoding=json-lines&at={version}"),
        format!("{base}/zip"),
        format!("{base}/event-stream"),
        format!("{base}/event-stream?last_event_id={version}"),
    ];
    for path in &paths {
        for (token, status) in [(None, 401), (Some("guess"), 403)] {
            for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
                let mut request =
                    stack.client.request(method.clone(), stack.url(path)).header("if-none-match", &etag);
                if let Some(token) = token {
                    request = request.bearer_auth(token).header("cookie", "session=guess");
                }
                let response = request.send().await.expect("sent");
                assert_eq!(response.status().as_u16(), status, "{method} {path} as {token:?}");
                let body = response.bytes().await.expect("body");
                assert!(find(&body, b"secret entry").is_none(), "{method} {path} leaked the record");
            }
        }
    }
}

/// Hidden in each probe: an export request, which must never reach the dataset server as
/// such (that would bypass the sidecar's routing), and which the sidecar answers only when
/// the client really sent it as a request of its own.
const SMUGGLED: &str = "GET /export/datasets/a:b?encoding=json HTTP/1.1\r\nHost: sidecar\r\n\r\n";

/// Requests whose framing is ambiguous, each with the headers that make it so.
fn smuggling_probes() -> Vec<(&'static str, String)> {
    let cl_te_body = format!("0\r\n\r\n{SMUGGLED}");
    let te_cl_body = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let post = |headers: &str, body: &str| {
        format!("POST /debug/echo/first HTTP/1.1\r\nHost: sidecar\r\n{headers}\r\n{body}")
    };
    let n = cl_te_body.len();
    vec![
        ("CL.TE", post(&format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"), &cl_te_body)),
        ("TE.CL", post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", &te_cl_body)),
        ("TE before CL", post(&format!("Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("duplicate TE", post(&format!("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("TE list ending in identity", post(&format!("Transfer-Encoding: chunked, identity\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("TE xchunked", post(&format!("Transfer-Encoding: xchunked\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("TE with space before colon", post(&format!("Transfer-Encoding : chunked\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("TE with tab", post(&format!("Transfer-Encoding:\tchunked\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("TE upper case", post(&format!("Transfer-Encoding: CHUNKED\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("CL non-numeric", post("Content-Length: abc\r\n", &cl_te_body)),
        ("CL with plus", post(&format!("Content-Length: +{n}\r\n"), &cl_te_body)),
        ("CL negative", post("Content-Length: -1\r\n", &cl_te_body)),
        ("CL hex", post("Content-Length: 0x5\r\n", &cl_te_body)),
        ("CL conflicting list", post(&format!("Content-Length: 5, {n}\r\n"), &cl_te_body)),
        ("CL conflicting lines", post(&format!("Content-Length: 5\r\nContent-Length: {n}\r\n"), &cl_te_body)),
        ("CL equal lines", post("Content-Length: 5\r\nContent-Length: 5\r\n", &cl_te_body)),
        ("CL overflowing", post("Content-Length: 99999999999999999999999\r\n", &cl_te_body)),
        ("chunk size overflowing", post("Transfer-Encoding: chunked\r\n", &format!("fffffffffffffffffff\r\n{SMUGGLED}\r\n0\r\n\r\n"))),
        ("chunk size with junk", post("Transfer-Encoding: chunked\r\n", &format!("5;x\nzz\r\nhello\r\n0\r\n\r\n{SMUGGLED}"))),
        ("bare LF head", format!("POST /debug/echo/first HTTP/1.1\nHost: sidecar\nContent-Length: {n}\n\n{cl_te_body}")),
        ("HTTP/1.0 with TE", format!("POST /debug/echo/first HTTP/1.0\r\nHost: sidecar\r\nTransfer-Encoding: chunked\r\n\r\n{cl_te_body}")),
    ]
}

/// What the dataset server saw of one probe, and whether that matches what the client saw.
fn check_probe(what: &str, responses: &[RawResponse], closed: bool, seen: &[String]) {
    assert!(!seen.iter().any(|p| p.starts_with("/export")), "{what}: smuggled past the sidecar: {seen:?}");
    let first = responses.first().unwrap_or_else(|| panic!("{what}: no response"));
    if first.status == 400 {
        // Bodies stream through, so a body that turns out malformed may follow a head that
        // was already forwarded; nothing after it may be.
        assert!(
            seen.iter().all(|p| p == "/debug/echo/first"),
            "{what}: refused, yet the dataset server saw {seen:?}"
        );
        return;
    }
    assert_eq!(first.status, 200, "{what}: {first:?}");
    let echo: serde_json::Value = serde_json::from_slice(&first.body).expect("the echo");
    assert_eq!(echo["path"], "/debug/echo/first", "{what}");
    let headers = &echo["headers"];
    let framings = usize::from(headers.get("content-length").is_some())
        + usize::from(headers.get("transfer-encoding").is_some());
    assert!(framings <= 1, "{what}: forwarded with both framings: {headers}");
    // The export behind the body was read as a request only if the client got its answer.
    let exported = seen.iter().any(|p| p.starts_with("/datasets/a:b/"));
    let answered = responses.len() > 1;
    assert_eq!(exported, answered, "{what}: export ran {exported}, answered {answered}: {responses:?}");
    if answered {
        assert!(!closed || responses.len() == 2, "{what}");
    }
}

#[tokio::test]
async fn request_smuggling_probes_are_refused_or_framed_one_way() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "b"), numbered(2));
    for (what, probe) in smuggling_probes() {
        let exchange = raw_exchange(stack.sidecar.public, probe.as_bytes(), Duration::from_millis(1500));
        let ((responses, closed), seen) = upstream_paths(&stack, exchange).await;
        check_probe(what, &responses, closed, &seen);
        if probe.contains("Content-Length") && probe.contains("Transfer-Encoding") {
            // RFC 9112 §6.1: a server MUST close the connection after such a request.
            assert!(closed && responses.len() == 1, "{what}: {responses:?}");
        }
    }
}

#[tokio::test]
async fn an_upgrade_the_dataset_server_refuses_opens_no_tunnel() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "b"), numbered(2));
    let upgrades = [
        ("websocket", "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
        ("h2c", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
    ];
    for (what, headers) in upgrades {
        for first in ["/debug/echo/first", "/export/datasets/a:b?encoding=json"] {
            let probe = format!("GET {first} HTTP/1.1\r\nHost: sidecar\r\n{headers}\r\n{SMUGGLED}");
            let exchange = raw_exchange(stack.sidecar.public, probe.as_bytes(), Duration::from_millis(1500));
            let ((responses, _), seen) = upstream_paths(&stack, exchange).await;
            let what = format!("{what} on {first}");
            assert!(
                !seen.iter().any(|p| p.starts_with("/export")),
                "{what}: tunnelled past the sidecar: {seen:?}"
            );
            assert!(responses.iter().all(|r| r.status != 101), "{what}: {responses:?}");
            let first_status = responses.first().map(|r| r.status);
            assert_eq!(first_status, Some(200), "{what}: {responses:?}");
        }
    }
}

#[tokio::test]
async fn a_body_sent_to_an_export_is_never_read_as_a_request() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "b"), numbered(2));
    let hidden = "GET /debug/echo/smuggled HTTP/1.1\r\nHost: sidecar\r\n\r\n";
    let length = format!("Content-Length: {}\r\n\r\n{hidden}", hidden.len());
    let chunked = format!("Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n", hidden.len());
    let probes = [
        ("GET /export/datasets/a:b?encoding=json", &length, 200),
        ("GET /export/datasets/a:b/zip", &chunked, 200),
        ("POST /export/datasets/a:b?encoding=json", &length, 405),
        ("GET /export/datasets/ab?encoding=json", &length, 400),
        ("HEAD /export/datasets/a:b?encoding=cbor", &chunked, 200),
    ];
    for (line, framing, status) in probes {
        let probe = format!("{line} HTTP/1.1\r\nHost: sidecar\r\n{framing}");
        let exchange = raw_exchange(stack.sidecar.public, probe.as_bytes(), Duration::from_millis(1500));
        let ((responses, _), seen) = upstream_paths(&stack, exchange).await;
        let statuses: Vec<u16> = responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [status], "{line}");
        assert!(!seen.iter().any(|p| p.contains("smuggled")), "{line}: the body was read as a request");
    }
}
