//! Running it in production: the export cap, upstream timeouts and the record size limit,
//! environment overrides, readiness (dataset server, journal, draining) and the metrics.

mod common;

use ciborium::Value;
use common::{
    cbor, collection, config_file, dead_address, error_body, free_port, metric, numbered, start_with_config,
    Sidecar, Stack,
};
use export_sidecar::reference::{RecordFault, ReferenceConfig, ReferenceServer};
use futures::StreamExt;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// `/readyz`'s status and JSON report.
async fn readyz(sidecar: &Sidecar) -> (u16, serde_json::Value) {
    let response = common::client().get(sidecar.internal_url("/readyz")).send().await.expect("answered");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).expect("readyz answers JSON"))
}

/// Polls `/readyz` until its status is `status`; the report that had it.
async fn readyz_becomes(sidecar: &Sidecar, status: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (seen, report) = readyz(sidecar).await;
        if seen == status {
            return report;
        }
        assert!(Instant::now() < deadline, "readyz stayed {seen}, not {status}: {report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `sample` has `value`: request metrics are counted after the response is sent.
async fn metric_reaches(sidecar: &Sidecar, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = metric(sidecar, sample).await;
        if seen == Some(value) {
            return;
        }
        assert!(Instant::now() < deadline, "{sample} is {seen:?}, not {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn exports_over_max_concurrent_get_503_with_retry_after_but_event_streams_do_not() {
    let (_dir, stack) = start_with_config("[export]\nmax_concurrent = 1\n").await;
    let slow = collection("datasets", "a", "slow");
    stack.store().write(&slow, numbered(5));
    stack.store().set_listing_delay(&slow, Some(Duration::from_millis(1500)));
    stack.store().write(&collection("datasets", "a", "quick"), numbered(3));

    let first = tokio::spawn(stack.client.get(stack.url("/export/datasets/a:slow?encoding=json")).send());
    tokio::time::sleep(Duration::from_millis(400)).await;
    for path in ["/export/datasets/a:quick?encoding=json-lines", "/export/datasets/a:quick/zip"] {
        let refused = stack.get(path).await;
        let retry_after = refused.headers().get("retry-after").map(|v| v.to_str().expect("ascii").to_owned());
        let (status, code, _) = error_body(refused).await;
        assert_eq!((status, code.as_str()), (503, "too_busy"), "{path}");
        assert!(retry_after.is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n > 0)), "{path}: Retry-After");
    }
    let events = stack.get("/export/datasets/a:quick/event-stream").await;
    assert_eq!(events.status(), 200);
    let mut feed = events.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("\nid: ") {
        let chunk =
            tokio::time::timeout(Duration::from_secs(5), feed.next()).await.expect("an event in time");
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("open").expect("readable")));
    }

    let first = first.await.expect("joined").expect("answered");
    assert_eq!(first.status(), 200);
    assert_eq!(common::object_entries(&first.text().await.expect("body")).len(), 5);
    let again = stack.get("/export/datasets/a:quick?encoding=json-lines").await;
    assert_eq!(again.status(), 200, "the slot is free once the first export ended");
    let busy = r#"export_sidecar_requests_total{route="export-records",status="503"}"#;
    metric_reaches(&stack.sidecar, busy, 1.0).await;
}

#[tokio::test]
async fn environment_overrides_the_config_file_and_flags_override_the_environment() {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .expect("reference starts");
    reference.store().write(&collection("datasets", "a", "env"), numbered(4));
    let (dead, _held) = dead_address();
    let (from_file, from_env) = ((free_port(), free_port()), (free_port(), free_port()));
    let (config_dir, path) = config_file(&format!(
        "[upstream]\nurl = \"http://{dead}\"\n[listen]\npublic = \"{}\"\ninternal = \"{}\"\n",
        from_file.0, from_file.1
    ));
    let journal = config_dir.path().join("from-env.sqlite");
    let command = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_export-sidecar"));
        command
            .arg("run")
            .args(extra)
            .env("EXPORT_SIDECAR_CONFIG", &path)
            .env("EXPORT_SIDECAR_UPSTREAM", reference.url())
            .env("EXPORT_SIDECAR_LISTEN", from_env.0.to_string())
            .env("EXPORT_SIDECAR_INTERNAL_LISTEN", from_env.1.to_string())
            .env("EXPORT_SIDECAR_JOURNAL", &journal);
        command
    };
    let sidecar = Sidecar::spawn(command(&[]), tempfile::tempdir().expect("tempdir"), from_env.0, from_env.1)
        .await
        .expect("starts from the environment");
    let export = common::client().get(sidecar.url("/export/datasets/a:env?encoding=json")).send().await;
    let export = export.expect("the environment's listen address is used");
    assert_eq!(export.status(), 200, "the environment's upstream beats the file's");
    assert_eq!(common::object_entries(&export.text().await.expect("body")).len(), 4);
    assert!(journal.exists(), "the journal is where EXPORT_SIDECAR_JOURNAL says");
    assert!(std::net::TcpStream::connect(from_file.0).is_err(), "the file's listen address is not used");
    drop(sidecar);

    let flagged = command(&["--upstream", &format!("http://{dead}")]);
    let sidecar = Sidecar::spawn(flagged, tempfile::tempdir().expect("tempdir"), from_env.0, from_env.1)
        .await
        .expect("starts");
    let export = common::client().get(sidecar.url("/export/datasets/a:env?encoding=json")).send().await;
    assert_eq!(
        error_body(export.expect("answered")).await.0,
        502,
        "the flag's upstream beats the environment's"
    );
}

#[tokio::test]
async fn readyz_follows_the_dataset_server() {
    let upstream = free_port();
    let sidecar = Sidecar::start(&format!("http://{upstream}")).await;
    let report = readyz_becomes(&sidecar, 503).await;
    assert_eq!(report["error"], "not_ready");
    assert!(report["checks"]["upstream"].as_str().is_some_and(|s| s.contains("connect")), "{report}");
    assert_eq!(report["checks"]["journal"], "ok", "{report}");
    assert!(report["message"].as_str().is_some_and(|m| m.starts_with("upstream:")), "{report}");
    let health = common::client().get(sidecar.internal_url("/healthz")).send().await.expect("answered");
    assert_eq!(health.status(), 200, "alive, only not ready");

    let reference =
        ReferenceServer::start(upstream, ReferenceConfig::default()).await.expect("reference starts");
    let report = readyz_becomes(&sidecar, 200).await;
    assert_eq!(report["status"], "ready");
    reference.shutdown().await;
    readyz_becomes(&sidecar, 503).await;
}

#[tokio::test]
async fn readyz_fails_while_the_journal_cannot_be_written() {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .expect("reference starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.sqlite");
    let sidecar = Sidecar::start_with_journal(&reference.url(), Some(&path), &[]).await;
    readyz_becomes(&sidecar, 200).await;

    // Another process holding the write lock: a second sidecar on the same volume, say.
    let other = rusqlite::Connection::open(&path).expect("open the journal");
    other.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let report = readyz_becomes(&sidecar, 503).await;
    assert!(report["checks"]["journal"].as_str().is_some_and(|s| s.contains("write lock")), "{report}");
    assert_eq!(report["checks"]["upstream"], "ok");
    // Exports and event streams that need a new version are told to come back.
    reference.store().write(&collection("datasets", "a", "locked"), numbered(2));
    let client = common::client();
    let export = client.get(sidecar.url("/export/datasets/a:locked?encoding=json")).send();
    let stream = client.get(sidecar.url("/export/datasets/a:locked/event-stream")).send();
    let (export, stream) = tokio::join!(export, stream);
    for refused in [export, stream] {
        let refused = refused.expect("answered");
        let retry_after = refused.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(retry_after.as_deref(), Some("5"), "{:?}", refused.url().path());
        let (status, code, _) = error_body(refused).await;
        assert_eq!((status, code.as_str()), (503, "journal_unavailable"));
    }
    other.execute_batch("ROLLBACK").expect("release it");
    readyz_becomes(&sidecar, 200).await;

    // The file moved away underneath (a temp directory cleaner): writes would be lost.
    let moved = dir.path().join("moved.sqlite");
    std::fs::rename(&path, &moved).expect("move the journal");
    let report = readyz_becomes(&sidecar, 503).await;
    assert!(report["checks"]["journal"].as_str().is_some_and(|s| s.contains("no longer")), "{report}");
    std::fs::rename(&moved, &path).expect("move it back");
    readyz_becomes(&sidecar, 200).await;
}

#[tokio::test]
async fn sigterm_fails_readyz_for_the_drain_delay_while_exports_go_on() {
    let (_dir, mut stack) = start_with_config("[server]\ndrain_delay_seconds = 3\n").await;
    stack.store().write(&collection("datasets", "a", "drain"), numbered(3));
    readyz_becomes(&stack.sidecar, 200).await;
    let terminated = Instant::now();
    let pid = stack.sidecar.pid().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());

    let report = readyz_becomes(&stack.sidecar, 503).await;
    assert!(report["checks"]["shutdown"].as_str().is_some_and(|s| s.contains("draining")), "{report}");
    let export = stack.get("/export/datasets/a:drain?encoding=json").await;
    assert_eq!(export.status(), 200, "still serving during the drain delay");
    assert!(terminated.elapsed() < Duration::from_secs(3), "the checks ran within the delay");
    let exit = stack.sidecar.wait_exit(Duration::from_secs(15)).await.expect("exits after the delay");
    assert!(exit.success(), "{exit:?}");
    assert!(terminated.elapsed() >= Duration::from_secs(3), "the listeners stayed open for the delay");
}

#[tokio::test]
async fn a_record_over_max_record_bytes_fails_its_export_and_is_logged() {
    let (_dir, stack) = start_with_config("[upstream]\nmax_record_bytes = 1024\n").await;
    let c = collection("datasets", "a", "big");
    let mut records = numbered(30);
    records[20].1 = Some(cbor(&Value::Bytes(vec![7; 5000])));
    stack.store().write(&c, records);
    for path in ["/export/datasets/a:big?encoding=json-lines", "/export/datasets/a:big/zip"] {
        let response = stack.get(path).await;
        assert_eq!(response.status(), 200, "{path}: the head left before the big record");
        assert!(response.bytes().await.is_err(), "{path}: the body must be aborted");
    }
    assert!(stack.sidecar.wait_for_log("max_record_bytes").await, "{}", stack.sidecar.log());
    let line = stack.sidecar.log().lines().find(|l| l.contains("max_record_bytes")).map(str::to_owned);
    let line = line.expect("the failure's log line");
    assert!(
        line.contains("r00020") && line.contains("datasets/a:big"),
        "names record and collection: {line}"
    );
    let too_large = r#"export_sidecar_upstream_errors_total{kind="too_large",request="record"}"#;
    metric_reaches(&stack.sidecar, too_large, 2.0).await;
    let small = stack.get("/export/datasets/a:big?encoding=json-lines&x=1").await;
    assert_eq!(small.status(), 200, "still serving");
}

#[tokio::test]
async fn a_silent_dataset_server_hits_the_first_byte_timeout() {
    let (_dir, stack) = start_with_config("[upstream]\nfirst_byte_timeout_ms = 500\n").await;
    let listing = collection("datasets", "a", "hanging-listing");
    stack.store().write(&listing, numbered(2));
    stack.store().set_listing_delay(&listing, Some(Duration::from_secs(5)));
    let started = Instant::now();
    let (status, code, _) =
        error_body(stack.get("/export/datasets/a:hanging-listing?encoding=json").await).await;
    assert_eq!((status, code.as_str()), (504, "upstream_timeout"), "before the head: a JSON 504");
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());

    let record = collection("datasets", "a", "hanging-record");
    stack.store().write(&record, numbered(10));
    stack.store().set_fault(&record, "r00005", Some(RecordFault::Delay(Duration::from_secs(5))));
    let started = Instant::now();
    let response = stack.get("/export/datasets/a:hanging-record?encoding=cbor").await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "after the head: an aborted body");
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());
    assert!(stack.sidecar.wait_for_log("first_byte_timeout_ms").await, "{}", stack.sidecar.log());
    let timeouts = r#"export_sidecar_upstream_errors_total{kind="first_byte_timeout",request="record"}"#;
    metric_reaches(&stack.sidecar, timeouts, 1.0).await;
}

#[tokio::test]
async fn a_body_that_stops_hits_the_idle_timeout() {
    let (_dir, stack) = start_with_config("[upstream]\nidle_timeout_ms = 500\n").await;
    let c = collection("datasets", "a", "stalls");
    stack.store().write(&c, numbered(10));
    stack.store().set_fault(&c, "r00003", Some(RecordFault::HangAfterHead));
    let started = Instant::now();
    let response = stack.get("/export/datasets/a:stalls?encoding=json").await;
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.is_err(), "an aborted body");
    assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());
    assert!(stack.sidecar.wait_for_log("idle_timeout_ms").await, "{}", stack.sidecar.log());
}

#[tokio::test]
async fn metrics_cover_requests_exports_the_dataset_server_and_the_journal() {
    let stack = Stack::start().await;
    stack.store().write(&collection("datasets", "a", "counted"), numbered(7));
    let export = stack.get("/export/datasets/a:counted?encoding=json").await;
    let sent = export.bytes().await.expect("complete").len() as f64;
    let passed = stack.get("/datasets/a:counted/records/").await;
    assert_eq!(passed.status(), 200);
    assert_eq!(stack.get("/export/nowhere/a:b/zip").await.status(), 404);

    let sidecar = &stack.sidecar;
    let expect = [
        (r#"export_sidecar_requests_total{route="export-records",status="200"}"#, 1.0),
        (r#"export_sidecar_requests_total{route="passthrough",status="200"}"#, 1.0),
        (r#"export_sidecar_requests_total{route="export-zip",status="404"}"#, 1.0),
        (r#"export_sidecar_export_records_total{kind="json"}"#, 7.0),
        (r#"export_sidecar_export_bytes_total{kind="json"}"#, sent),
        (r#"export_sidecar_export_duration_seconds_count{kind="json"}"#, 1.0),
        (r#"export_sidecar_upstream_latency_seconds_count{request="listing"}"#, 1.0),
        (r#"export_sidecar_upstream_latency_seconds_count{request="record"}"#, 7.0),
        ("export_sidecar_exports_running", 0.0),
    ];
    for (sample, value) in expect {
        metric_reaches(sidecar, sample, value).await;
    }
    let journal = metric(sidecar, "export_sidecar_journal_bytes").await.expect("journal size");
    assert!(journal > 0.0, "the journal has a size: {journal}");
}
