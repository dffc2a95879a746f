//! `bench events`: idle event-stream subscribers on one collection; sidecar memory per
//! subscriber and webhook → delivery latency.

use crate::harness::{percentile, write_json, SidecarProcess};
use export_sidecar::reference::{CollectionId, ReferenceConfig, ReferenceServer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Opens one raw event-stream connection and reports the time each `id:` line arrives.
async fn subscriber(addr: SocketAddr, path: String, ids: mpsc::UnboundedSender<(String, Instant)>) {
    let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else { return };
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
    if socket.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut buffer = vec![0u8; 64 * 1024];
    // The first bytes of the line being read: enough to see an `id:` line, without copying
    // the long `data:` lines (the load generator shares the machine with the sidecar).
    let mut line = Vec::with_capacity(LINE_PREFIX);
    while let Ok(n) = socket.read(&mut buffer).await {
        if n == 0 {
            return;
        }
        let at = Instant::now();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', &buffer[..n]) {
            keep_prefix(&mut line, &buffer[start..end]);
            if let Some(id) = line.strip_prefix(b"id: ") {
                let id = String::from_utf8_lossy(id).trim().to_owned();
                if ids.send((id, at)).is_err() {
                    return;
                }
            }
            line.clear();
            start = end + 1;
        }
        keep_prefix(&mut line, &buffer[start..n]);
    }
}

/// How much of a line `subscriber` keeps: more than any event id it is sent.
const LINE_PREFIX: usize = 64;

fn keep_prefix(line: &mut Vec<u8>, more: &[u8]) {
    let room = LINE_PREFIX.saturating_sub(line.len());
    line.extend_from_slice(&more[..more.len().min(room)]);
}

pub async fn events(
    subscribers: usize,
    records: usize,
    rounds: usize,
    batch: usize,
    json: PathBuf,
) -> Result<(), String> {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    let collection = CollectionId::new("datasets", "bench", "feed");
    let value = |i: usize| {
        let mut out = Vec::new();
        let record = ciborium::Value::Text(format!("record {i}"));
        ciborium::into_writer(&record, &mut out).map(|_| bytes::Bytes::from(out))
    };
    let seed: Result<Vec<_>, _> =
        (0..records).map(|i| value(i).map(|v| (format!("r{i:06}"), Some(v)))).collect();
    reference.store().write(&collection, seed.map_err(|e| e.to_string())?);

    let extra = vec!["--sse-max-connections".to_owned(), (subscribers + 100).to_string()];
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let sidecar = SidecarProcess::start(&reference.url(), &dir.path().join("journal.sqlite"), &extra).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = sidecar.rss_kib();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let path = "/export/datasets/bench:feed/event-stream".to_owned();
    let opened = Instant::now();
    let mut first_events = 0;
    while first_events < subscribers {
        let this_batch = batch.min(subscribers - first_events);
        for _ in 0..this_batch {
            tokio::spawn(subscriber(sidecar.public, path.clone(), tx.clone()));
        }
        for _ in 0..this_batch {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(_)) => first_events += 1,
                _ => {
                    return Err(format!(
                        "only {first_events} of {subscribers} subscribers got their first event"
                    ))
                }
            }
        }
    }
    let connect_seconds = opened.elapsed().as_secs_f64();
    let rss_connected = sidecar.rss_kib();
    // Idle worker threads of the connect burst retire after about 10 s; what stays is the
    // cost of holding the subscribers.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss_idle = sidecar.rss_kib();

    let client = reqwest::Client::new();
    let hook = format!("http://{}/hooks/changes", sidecar.internal);
    let (mut every, mut last) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let id = format!("r{:06}", round % records);
        let version = reference
            .store()
            .write(&collection, vec![(id, Some(value(records + round).map_err(|e| e.to_string())?))]);
        let sent = Instant::now();
        client
            .post(&hook)
            .body(r#"{"realm":"datasets","user":"bench","name":"feed"}"#)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let mut delivered = 0;
        let mut latest = 0.0f64;
        while delivered < subscribers {
            let Ok(Some((event, at))) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await else {
                return Err(format!("round {round}: {delivered} of {subscribers} deliveries"));
            };
            if event == version.to_string() {
                let latency = at.saturating_duration_since(sent).as_secs_f64();
                every.push(latency);
                latest = latest.max(latency);
                delivered += 1;
            }
        }
        last.push(latest);
    }
    every.sort_by(f64::total_cmp);
    last.sort_by(f64::total_cmp);
    let per_subscriber = (rss_idle.saturating_sub(rss_before) as f64 * 1024.0) / subscribers as f64;
    let results = serde_json::json!({
        "subscribers": subscribers,
        "records": records,
        "rounds": rounds,
        "connect_batch": batch,
        "connect_seconds": connect_seconds,
        "rss_before_kib": rss_before,
        "rss_after_connecting_kib": rss_connected,
        "rss_idle_kib": rss_idle,
        "bytes_per_idle_subscriber": per_subscriber,
        "delivery_p50_ms": percentile(&every, 0.5) * 1e3,
        "delivery_p99_ms": percentile(&every, 0.99) * 1e3,
        "last_delivery_p50_ms": percentile(&last, 0.5) * 1e3,
        "last_delivery_p99_ms": percentile(&last, 0.99) * 1e3,
    });
    print_table(&results);
    write_json(&json, &results)
}

fn print_table(results: &serde_json::Value) {
    println!("{:<36} {:>14}", "measure", "value");
    let Some(rows) = results.as_object() else { return };
    for (name, value) in rows {
        let shown = match value.as_f64() {
            Some(v) if v.fract() != 0.0 => format!("{v:.2}"),
            _ => value.to_string(),
        };
        println!("{name:<36} {shown:>14}");
    }
}
