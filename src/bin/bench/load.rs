//! Pass-through load: keep-alive connections each sending one small GET after another for a
//! fixed time, against the sidecar, the upstream directly, and nginx as a plain reverse proxy.

use crate::harness::{free_port, percentile};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What one target sustained.
pub struct LoadResult {
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs `connections` clients against `addr` for `seconds` (after a short warm-up) and reports
/// throughput and latency. A non-200 answer is an error: a proxy that fails fast is not fast.
pub async fn run(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    seconds: f64,
) -> Result<LoadResult, String> {
    drive(addr, path, connections, Duration::from_millis(500)).await?;
    let measured = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut latencies = drive(addr, path, connections, measured).await?;
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok(LoadResult {
        requests_per_second: latencies.len() as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.5) * 1e3,
        p99_ms: percentile(&latencies, 0.99) * 1e3,
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

async fn connect(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("{addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

/// nginx as a plain reverse proxy with upstream keep-alive, one worker per core like the
/// sidecar's threads; stopped (master and workers) when dropped.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master take its workers down; SIGKILL would orphan them.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts nginx in front of `upstream`, or says why it cannot (not installed, say).
    pub async fn start(upstream: SocketAddr) -> Result<Nginx, String> {
        let binary = find_nginx().ok_or("nginx is not installed (apt-get install nginx-light)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let addr = free_port()?;
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, config_text(dir.path(), addr, upstream)).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        let nginx = Nginx { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                return Err("nginx did not start listening".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(nginx)
    }
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).map(|d| d.join("nginx")).collect();
    candidates.push(PathBuf::from("/usr/sbin/nginx"));
    candidates.into_iter().find(|p| p.is_file())
}

fn config_text(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream dataset {{ server {upstream}; keepalive 64; }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://dataset;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}
