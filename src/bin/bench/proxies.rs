//! The proxies pass-through is compared with, each a process of its own so that its CPU time
//! can be read: nginx as a plain reverse proxy, and a bare pingora proxy (the framework's floor).

use crate::harness::{free_port, process_tree_cpu_seconds};
use async_trait::async_trait;
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A proxy process in front of the upstream; stopped (with its workers) when dropped.
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // SIGTERM lets nginx's master take its workers down; SIGKILL would orphan them.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl ProxyProcess {
    /// CPU time of the process and its workers so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        process_tree_cpu_seconds(self.child.id())
    }

    /// nginx in front of `upstream`, or why it cannot run (not installed, say).
    pub async fn nginx(upstream: SocketAddr) -> Result<ProxyProcess, String> {
        let binary = find_nginx().ok_or("nginx is not installed (apt-get install nginx-light)")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let addr = free_port()?;
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, nginx_config(dir.path(), addr, upstream)).map_err(|e| e.to_string())?;
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
        ProxyProcess { child, addr, _dir: Some(dir) }.listening().await
    }

    /// `bench pingora-floor` in front of `upstream` with `threads` threads, as the sidecar's.
    pub async fn pingora_floor(upstream: SocketAddr, threads: usize) -> Result<ProxyProcess, String> {
        let addr = free_port()?;
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let child = Command::new(me)
            .args(["pingora-floor", "--listen", &addr.to_string(), "--upstream", &upstream.to_string()])
            .args(["--threads", &threads.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the bare pingora proxy: {e}"))?;
        ProxyProcess { child, addr, _dir: None }.listening().await
    }

    async fn listening(self) -> Result<ProxyProcess, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            if Instant::now() > deadline {
                return Err(format!("the proxy on {} did not start listening", self.addr));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(self)
    }
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).map(|d| d.join("nginx")).collect();
    candidates.push(PathBuf::from("/usr/sbin/nginx"));
    candidates.into_iter().find(|p| p.is_file())
}

/// A plain reverse proxy with upstream keep-alive, one worker per core like the sidecar's threads.
fn nginx_config(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
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

/// pingora's HTTP proxy with nothing of the sidecar's own: every request to one upstream,
/// with the same modules (none) and peer settings as the sidecar's pass-through.
struct BareProxy {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

/// Runs the bare pingora proxy until killed.
pub fn run_pingora_floor(listen: SocketAddr, upstream: SocketAddr, threads: usize) -> ! {
    // SIGTERM stops it at once: it has no requests worth waiting for.
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, BareProxy { upstream });
    service.add_tcp(&listen.to_string());
    server.add_service(service);
    server.run_forever()
}
