//! `bench events`: idle event-stream subscribers on one collection; sidecar memory per
//! subscriber and webhook → delivery latency.

use crate::harness::{percentile, write_json, SidecarProcess};
use export_sidecar::reference::{CollectionId, ReferenceConfig, ReferenceServer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
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

    let path = "/export/datasets/bench:feed/event-stream";
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opened = Instant::now();
    let held = connect(sidecar.public, path, subscribers, batch, &tx, &mut rx).await?;
    let connect_seconds = opened.elapsed().as_secs_f64();
    let rss_connected = sidecar.rss_kib();
    // Idle worker threads of the connect burst retire after about 10 s; what stays is the
    // cost of holding the subscribers.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let rss_idle = sidecar.rss_kib();

    let client = reqwest::Client::new();
    let hook = format!("http://{}/hooks/changes", sidecar.internal);
    let (every, last) = deliveries(&mut rx, subscribers, rounds, |round| {
        let (id, value) = (format!("r{:06}", round % records), value(records + round));
        let (client, hook, store, collection) = (&client, &hook, reference.store(), &collection);
        async move {
            let value = value.map_err(|e| e.to_string())?;
            let version = store.write(collection, vec![(id, Some(value))]);
            let sent = Instant::now();
            let body = r#"{"realm":"datasets","user":"bench","name":"feed"}"#;
            client.post(hook).body(body).send().await.map_err(|e| e.to_string())?;
            Ok((version.to_string(), sent))
        }
    })
    .await?;
    held.iter().for_each(tokio::task::JoinHandle::abort);
    drop(sidecar);

    let (floor_every, floor_last) = floor(subscribers, records, rounds, batch).await?;
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
        "floor_delivery_p50_ms": percentile(&floor_every, 0.5) * 1e3,
        "floor_delivery_p99_ms": percentile(&floor_every, 0.99) * 1e3,
        "floor_last_delivery_p50_ms": percentile(&floor_last, 0.5) * 1e3,
        "floor_last_delivery_p99_ms": percentile(&floor_last, 0.99) * 1e3,
    });
    print_table(&results);
    write_json(&json, &results)
}

type Deliveries = mpsc::UnboundedReceiver<(String, Instant)>;

/// Connects `subscribers` to `addr`, `batch` at a time, and waits for each one's first event.
/// Returns their tasks, which hold the connections.
async fn connect(
    addr: SocketAddr,
    path: &str,
    subscribers: usize,
    batch: usize,
    tx: &mpsc::UnboundedSender<(String, Instant)>,
    rx: &mut Deliveries,
) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
    let mut held = Vec::with_capacity(subscribers);
    while held.len() < subscribers {
        let this_batch = batch.min(subscribers - held.len());
        for _ in 0..this_batch {
            held.push(tokio::spawn(subscriber(addr, path.to_owned(), tx.clone())));
        }
        for _ in 0..this_batch {
            if !matches!(tokio::time::timeout(Duration::from_secs(60), rx.recv()).await, Ok(Some(_))) {
                return Err(format!("only some of {subscribers} subscribers got their first event"));
            }
        }
    }
    Ok(held)
}

/// Times `rounds` changes, each made by `change(round)`, which returns the event id it will
/// produce and when it was made: the latency of every delivery, and of each round's last.
async fn deliveries<F, Fut>(
    rx: &mut Deliveries,
    subscribers: usize,
    rounds: usize,
    mut change: F,
) -> Result<(Vec<f64>, Vec<f64>), String>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(String, Instant), String>>,
{
    let (mut every, mut last) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (version, sent) = change(round).await?;
        let mut delivered = 0;
        let mut latest = 0.0f64;
        while delivered < subscribers {
            let Ok(Some((event, at))) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await else {
                return Err(format!("round {round}: {delivered} of {subscribers} deliveries"));
            };
            if event == version {
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
    Ok((every, last))
}

/// The same fan-out without the sidecar: a bare server (`floor-server`, a process of its own
/// like the sidecar) writes each event, the same size as the sidecar's, to every subscriber:
/// what this machine and this load generator allow.
async fn floor(
    subscribers: usize,
    records: usize,
    rounds: usize,
    batch: usize,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut server = tokio::process::Command::new(me)
        .args(["floor-server", "--records", &records.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the floor server: {e}"))?;
    let (Some(control), Some(out)) = (server.stdin.take(), server.stdout.take()) else {
        return Err("the floor server has no stdin or stdout".into());
    };
    let mut addr = String::new();
    tokio::io::BufReader::new(out).read_line(&mut addr).await.map_err(|e| e.to_string())?;
    let addr: SocketAddr = addr.trim().parse().map_err(|e| format!("floor server address: {e}"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let held = connect(addr, "/", subscribers, batch, &tx, &mut rx).await?;
    let control = std::sync::Arc::new(tokio::sync::Mutex::new(control));
    let measured = deliveries(&mut rx, subscribers, rounds, |round| {
        let version = format!("floor-{round}");
        let control = std::sync::Arc::clone(&control);
        async move {
            let sent = Instant::now();
            control
                .lock()
                .await
                .write_all(format!("{version}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            Ok((version, sent))
        }
    })
    .await;
    held.iter().for_each(tokio::task::JoinHandle::abort);
    measured
}

/// `floor-server`: serves `GET`s of anything as an event stream and, for each version read
/// from stdin, sends every connection one event listing `records` ids.
pub async fn floor_server(records: usize) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    println!("{}", listener.local_addr().map_err(|e| e.to_string())?);
    let (events, _) = tokio::sync::watch::channel(bytes::Bytes::from_static(b"id: first\n\n"));
    let sender = events.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(floor_connection(socket, sender.subscribe()));
        }
    });
    let ids: Vec<String> = (0..records).map(|i| format!("\"r{i:06}\"")).collect();
    let ids = ids.join(",");
    let mut versions = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(version) = versions.next_line().await.map_err(|e| e.to_string())? {
        let data = format!("{{\"version\":\"{version}\",\"recordIDs\":[{ids}],\"changed\":[\"r000000\"]}}");
        events.send_replace(bytes::Bytes::from(format!("id: {version}\ndata: {data}\n\n")));
    }
    Ok(())
}

async fn floor_connection(
    mut socket: tokio::net::TcpStream,
    mut events: tokio::sync::watch::Receiver<bytes::Bytes>,
) {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    let first = events.borrow_and_update().clone();
    let start = [&b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"[..], &first].concat();
    if socket.write_all(&start).await.is_err() {
        return;
    }
    while events.changed().await.is_ok() {
        let event = events.borrow_and_update().clone();
        if socket.write_all(&event).await.is_err() {
            return;
        }
    }
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
