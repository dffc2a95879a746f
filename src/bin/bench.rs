//! Benchmark harness: runs the reference server and the real sidecar binary on loopback and
//! prints a table of measurements (also written as JSON). `bench events` measures the feed.

use clap::{Parser, Subcommand};
use export_sidecar::reference::{CollectionId, ReferenceConfig, ReferenceServer};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(name = "bench", about = "Measures export-sidecar against the reference dataset server")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Idle event-stream subscribers: sidecar memory per subscriber and change → delivery latency.
    Events {
        /// Subscribers held open on one collection.
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Records in the collection (every event lists them all).
        #[arg(long, default_value_t = 1_000)]
        records: usize,
        /// Changes to time.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Subscribers connected at a time (each waits for its first event before the next
        /// batch): a burst measures the connect storm, small batches the cost of holding.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-events.json")]
        json: PathBuf,
    },
}

fn main() -> Result<(), String> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    match Cli::parse().command {
        Bench::Events { subscribers, records, rounds, batch, json } => {
            runtime.block_on(events(subscribers, records, rounds, batch.max(1), json))
        }
    }
}

/// The sidecar binary built next to this one.
fn sidecar_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me.with_file_name("export-sidecar");
    path.exists().then_some(path).ok_or_else(|| "build export-sidecar first (cargo build --release)".into())
}

fn free_port() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.local_addr().map_err(|e| e.to_string())
}

/// A sidecar process for the benchmark; killed on drop.
struct SidecarProcess {
    child: Child,
    public: SocketAddr,
    internal: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SidecarProcess {
    async fn start(upstream: &str, extra: &[String]) -> Result<SidecarProcess, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (public, internal) = (free_port()?, free_port()?);
        let child = Command::new(sidecar_binary()?)
            .args(["run", "--upstream", upstream, "--listen", &public.to_string()])
            .args(["--internal-listen", &internal.to_string()])
            .arg("--journal")
            .arg(dir.path().join("journal.sqlite"))
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the sidecar: {e}"))?;
        let process = SidecarProcess { child, public, internal, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(public).await.is_err() {
            if Instant::now() > deadline {
                return Err("the sidecar did not start listening".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(process)
    }

    /// Resident set size in KiB, from /proc.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// Opens one raw event-stream connection and reports the time each `id:` line arrives.
async fn subscriber(addr: SocketAddr, path: String, ids: mpsc::UnboundedSender<(String, Instant)>) {
    let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await else { return };
    let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
    if socket.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut buffer = vec![0u8; 64 * 1024];
    let mut carry = Vec::new();
    while let Ok(n) = socket.read(&mut buffer).await {
        if n == 0 {
            return;
        }
        let at = Instant::now();
        carry.extend_from_slice(&buffer[..n]);
        while let Some(end) = carry.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = carry.drain(..=end).collect();
            if let Some(id) = line.strip_prefix(b"id: ") {
                let id = String::from_utf8_lossy(id).trim().to_owned();
                if ids.send((id, at)).is_err() {
                    return;
                }
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

async fn events(
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
    let sidecar = SidecarProcess::start(&reference.url(), &extra).await?;
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
    std::fs::write(&json, serde_json::to_vec_pretty(&results).map_err(|e| e.to_string())?)
        .map_err(|e| format!("cannot write {}: {e}", json.display()))?;
    println!("(written to {})", json.display());
    Ok(())
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
