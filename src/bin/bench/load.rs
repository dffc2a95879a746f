//! Pass-through load: keep-alive connections each sending one small GET after another for a
//! fixed time, against one target (the upstream, the sidecar or another proxy).

use crate::harness::percentile;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What one target sustained.
#[derive(Clone, Copy)]
pub struct LoadResult {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU time the target's processes spent per request, when they run apart from the load.
    pub cpu_us_per_request: Option<f64>,
}

/// Runs `connections` clients against `addr` for `seconds` (after a short warm-up) and reports
/// throughput and latency. A non-200 answer is an error: a proxy that fails fast is not fast.
/// `cpu_seconds` reads the target's CPU time so far (`None` when it shares this process).
pub async fn run(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    seconds: f64,
    cpu_seconds: &dyn Fn() -> Option<f64>,
) -> Result<LoadResult, String> {
    drive(addr, path, connections, Duration::from_millis(500)).await?;
    let measured = Duration::from_secs_f64(seconds);
    let (started, cpu_before) = (Instant::now(), cpu_seconds());
    let mut latencies = drive(addr, path, connections, measured).await?;
    let (elapsed, cpu_after) = (started.elapsed().as_secs_f64(), cpu_seconds());
    latencies.sort_by(f64::total_cmp);
    let requests = latencies.len() as f64;
    Ok(LoadResult {
        requests_per_second: requests / elapsed,
        p50_ms: percentile(&latencies, 0.5) * 1e3,
        p99_ms: percentile(&latencies, 0.99) * 1e3,
        cpu_us_per_request: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| (after - before) / requests * 1e6),
    })
}

async fn drive(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    length: Duration,
) -> Result<Vec<f64>, String> {
    let until = Instant::now() + length;
    let clients: Vec<_> =
        (0..connections).map(|_| tokio::spawn(client(addr, path.to_owned(), until))).collect();
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.map_err(|e| e.to_string())??);
    }
    Ok(latencies)
}

/// One keep-alive connection sending requests back to back until `until`.
async fn client(addr: SocketAddr, path: String, until: Instant) -> Result<Vec<f64>, String> {
    let mut sender = connect(addr).await?;
    let mut latencies = Vec::new();
    while Instant::now() < until {
        // nginx closes a keep-alive connection after 1,000 requests (keepalive_requests); a
        // client opens a new one, as browsers and load generators do.
        if sender.ready().await.is_err() {
            sender = connect(addr).await?;
        }
        let request = http::Request::get(path.as_str())
            .header(http::header::HOST, "bench")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let sent = Instant::now();
        let response = sender.send_request(request).await.map_err(|e| format!("{addr}: {e}"))?;
        let status = response.status();
        response.into_body().collect().await.map_err(|e| e.to_string())?;
        if status != http::StatusCode::OK {
            return Err(format!("{addr}{path} answered {status}"));
        }
        latencies.push(sent.elapsed().as_secs_f64());
    }
    Ok(latencies)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let (sender, connection) = handshake(&addr.to_string()).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// An HTTP/1.1 client connection to `authority` (`host:port`); the caller drives the
/// connection half, on a task of its own or beside the requests.
pub async fn handshake(
    authority: &str,
) -> Result<(SendRequest<Empty<Bytes>>, Connection<TokioIo<tokio::net::TcpStream>, Empty<Bytes>>), String> {
    let stream = tokio::net::TcpStream::connect(authority).await.map_err(|e| format!("{authority}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{authority}: {e}"))
}
