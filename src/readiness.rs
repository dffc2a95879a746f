//! What `/readyz` checks: the public listener accepts, the dataset server is reachable, the
//! version journal can be written, and the process is not draining after SIGTERM.

use crate::journal::VersionJournal;
use crate::shutdown::Draining;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Each check gets this long, and they run side by side: a probe (Kubernetes waits 1 s by
/// default) must get its answer in time, and a check that takes longer has failed anyway.
const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// Everything readiness depends on.
pub struct Readiness {
    /// The public listener: ready means a client can connect now.
    pub public: SocketAddr,
    /// The dataset server, checked with a bare TCP connect: proof that it is up which needs
    /// no credentials and no knowledge of its routes, and costs it no request.
    pub upstream: SocketAddr,
    /// Checked with a write lock taken and given back: exports cannot hand out versions
    /// without recording them first.
    pub journal: Arc<VersionJournal>,
    pub draining: Draining,
}

/// Each check by name, with why it failed.
pub struct Report {
    checks: Vec<(&'static str, Result<(), String>)>,
}

impl Readiness {
    pub async fn check(&self) -> Report {
        let (listener, upstream, journal) = tokio::join!(
            connects(loopback_for(self.public)),
            connects(self.upstream),
            self.journal_writable()
        );
        let shutdown = match self.draining.is_draining() {
            true => Err("SIGTERM received: draining before exit".to_owned()),
            false => Ok(()),
        };
        Report {
            checks: vec![
                ("shutdown", shutdown),
                ("listener", listener),
                ("upstream", upstream),
                ("journal", journal),
            ],
        }
    }

    async fn journal_writable(&self) -> Result<(), String> {
        let journal = Arc::clone(&self.journal);
        let probe = tokio::task::spawn_blocking(move || journal.check_writable());
        match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(format!("the check did not run: {e}")),
            Err(_) => Err(format!("no write lock within {} ms", CHECK_TIMEOUT.as_millis())),
        }
    }
}

impl Report {
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|(_, result)| result.is_ok())
    }

    /// `{"status":"ready","checks":{…}}`, or the error shape every JSON error of the sidecar has,
    /// `{"error":"not_ready","message":…}`, plus the checks; each check is `"ok"` or why not.
    pub fn to_json(&self) -> Value {
        let mut checks = Map::new();
        let mut failed = Vec::new();
        for (name, result) in &self.checks {
            let text = match result {
                Ok(()) => "ok".to_owned(),
                Err(why) => {
                    failed.push(format!("{name}: {why}"));
                    why.clone()
                }
            };
            checks.insert((*name).to_owned(), Value::String(text));
        }
        match failed.is_empty() {
            true => json!({"status": "ready", "checks": checks}),
            false => json!({"error": "not_ready", "message": failed.join("; "), "checks": checks}),
        }
    }
}

async fn connects(addr: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("cannot connect to {addr}: {e}")),
        Err(_) => Err(format!("no connection to {addr} within {} ms", CHECK_TIMEOUT.as_millis())),
    }
}

/// A wildcard listen address cannot be connected to; its loopback twin can.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}
