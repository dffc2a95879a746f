//! The reference dataset server: a small, real, in-memory implementation of the upstream
//! contract (U1–U4) that `export-sidecar demo` and the end-to-end tests put behind the sidecar.
//!
//! # Layout
//! - `store`: collections, versions, records, attachments, tokens, faults, the request log.
//! - `routes`: the HTTP surface (one fallback handler that parses raw paths itself).
//! - `value`: CBOR checking and the plain CBOR↔JSON mapping of request bodies and debug views.
//! - `fault`: injected U2 failures for tests.
//! - `debug`: `/debug/echo…`, `/debug/status/{code}`, `/debug/bytes/{n}` for pass-through tests.
//! - `webhook`: outgoing, optionally signed change webhooks.
//! - `seed`: the deterministic demo data.

mod capacity;
mod debug;
mod fault;
mod routes;
mod seed;
mod store;
mod value;
mod webhook;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use capacity::{Capacity, CapacityStats};
pub use debug::pattern_byte;
pub use fault::RecordFault;
pub use seed::{seed_demo, SplitMix64, DEMO_TOKEN};
pub use store::{attachment_link, CollectionId, LoggedRequest, Store};
pub use webhook::{sign, SignError};

/// How long `shutdown` lets open requests finish before it drops the server task.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Where the reference server sends its change webhooks; both unset means no webhooks, as with
/// a dataset server the sidecar has to poll.
#[derive(Clone, Debug, Default)]
pub struct ReferenceConfig {
    /// Full URL to POST change notices to, e.g. the sidecar's `http://127.0.0.1:9090/hooks/changes`.
    pub webhook_url: Option<String>,
    /// Standard Webhooks secret (`whsec_` + base64); when set, every webhook is signed.
    pub webhook_secret: Option<String>,
}

/// A running reference server on a real socket, served from tokio tasks of the caller's runtime.
/// Dropping it stops the server too; `shutdown` also waits for it.
pub struct ReferenceServer {
    /// The bound address (with the real port when port 0 was asked for).
    addr: SocketAddr,
    /// Shared with the routes: what tests change here, HTTP clients see at once.
    store: Store,
    /// Sending `true` (or dropping it) stops the listener, hanging fault bodies and webhooks.
    stop: watch::Sender<bool>,
    /// The axum server task, awaited (then aborted if need be) by `shutdown`.
    server: JoinHandle<()>,
    /// The webhook dispatcher task, when a webhook URL is configured.
    webhooks: Option<JoinHandle<()>>,
}

impl ReferenceServer {
    /// Binds `listen` (port 0 picks a free port) and starts serving an empty store. Fails if
    /// the address cannot be bound or the webhook secret is not valid base64.
    pub async fn start(listen: SocketAddr, config: ReferenceConfig) -> io::Result<ReferenceServer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let stop_signal = StopSignal(stop_rx);
        let (notices, webhooks) = match config.webhook_url {
            Some(url) => {
                let target = webhook::WebhookTarget::new(url, config.webhook_secret)?;
                let (notices, receiver) = mpsc::unbounded_channel();
                let task = webhook::dispatch(target, receiver, stop_signal.clone());
                (Some(notices), Some(tokio::spawn(task)))
            }
            None => (None, None),
        };
        let store = Store::new(notices);
        let app = routes::router(store.clone(), stop_signal.clone());
        let server = tokio::spawn(async move {
            let serving = axum::serve(listener, app).with_graceful_shutdown(stop_signal.wait());
            if let Err(err) = serving.await {
                tracing::error!(%err, "reference server failed");
            }
        });
        Ok(ReferenceServer { addr, store, stop, server, webhooks })
    }

    /// The bound address, with the real port when 0 was asked for.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to reach the server, e.g. `http://127.0.0.1:PORT`; a wildcard bind address
    /// is replaced by loopback so the URL is usable as is.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The server's data, for seeding, test hooks and assertions.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops accepting, ends hanging fault bodies and webhook deliveries, and waits up to a few
    /// seconds for open requests before dropping the server task.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let mut server = self.server;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
            tracing::warn!("reference server: requests still open after the grace period");
            server.abort();
        }
        if let Some(webhooks) = self.webhooks {
            let _ = webhooks.await;
        }
    }
}

/// The server's stop signal as seen by its tasks: the listener, hanging fault bodies, delayed
/// answers and the webhook dispatcher all wait on it.
#[derive(Clone)]
struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Resolves once the server is told to stop, or once the `ReferenceServer` is dropped.
    async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
