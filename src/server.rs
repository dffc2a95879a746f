//! Assembles and runs the pingora server: the public proxy listener and the internal listener.
//! `run` blocks until a shutdown signal, as pingora's server owns its own runtimes.

use crate::admin::Admin;
use crate::cache::RecordCache;
use crate::changes::hub::Hub;
use crate::changes::poller::{RecentExports, Upkeep};
use crate::changes::refresh::Refresher;
use crate::changes::webhook::WebhookVerifier;
use crate::config::{Config, ConfigError};
use crate::export::limit::ExportSlots;
use crate::export::window::FetchWindow;
use crate::export::workers::ExportWorkers;
use crate::export::Exporter;
use crate::journal::VersionJournal;
use crate::proxy::Sidecar;
use crate::public::PublicListener;
use crate::readiness::Readiness;
use crate::shutdown::{DrainThenExit, Draining, InFlight};
use crate::upstream::{Credentials, Upstream};
use pingora::listeners::{L4BufferSettings, ListenerConfig, DEFAULT_L4_WRITE_BUFFER_SIZE};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;
use std::time::Duration;

/// Builds the server from a validated config; nothing listens until `run`. `in_flight`
/// counts the public listener's requests; `draining` is set on SIGTERM.
pub fn build(config: &Config, in_flight: &InFlight, draining: &Draining) -> Result<Server, ConfigError> {
    let target = config.upstream.target()?;
    let upstream = Upstream::new(&config.upstream)?;
    let journal = VersionJournal::open(&config.journal.path).map_err(|e| ConfigError::Invalid {
        key: "journal.path",
        message: format!("cannot open {}: {e}", config.journal.path.display()),
    })?;
    let journal = Arc::new(journal);
    let verifier = WebhookVerifier::new(Some(&config.changes.webhook_secret))
        .map_err(|message| ConfigError::Invalid { key: "changes.webhook_secret", message })?;
    let hub = Hub::new(Arc::clone(&journal));
    let refresher =
        Refresher::new(upstream.clone(), Arc::clone(&journal), hub.clone(), service_credentials(config));
    let recent = Arc::new(RecentExports::default());
    let exporter = Arc::new(Exporter {
        upstream,
        journal: Arc::clone(&journal),
        recent: Arc::clone(&recent),
        hub: hub.clone(),
        events: config.events.clone(),
        config: config.export.clone(),
        window: FetchWindow::new(config.upstream.concurrency, config.upstream.adaptive_concurrency),
        cache: RecordCache::new(config.cache.max_bytes),
        slots: ExportSlots::new(config.export.max_concurrent),
        draining: draining.clone(),
        workers: ExportWorkers::start(config.threads(), &config.upstream)?,
    });
    let conf = ServerConf {
        threads: config.threads(),
        grace_period_seconds: Some(config.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let sidecar = Sidecar {
        exporter: Arc::clone(&exporter),
        target: target.clone(),
        connect_timeout: config.upstream.connect_timeout(),
        in_flight: in_flight.clone(),
    };
    let proxy = Arc::new(pingora::proxy::http_proxy(&server.configuration, sidecar));
    let public = PublicListener { proxy, exporter, in_flight: in_flight.clone() };
    let mut proxy = Service::new("public".to_owned(), public);
    // No read buffer: pingora's 64 KiB default only saves syscalls under TLS, and every idle
    // event-stream subscriber would hold one (measured with `bench events`).
    let buffers = L4BufferSettings::new(0, DEFAULT_L4_WRITE_BUFFER_SIZE);
    proxy.add_listener(ListenerConfig::tcp(config.listen.public.to_string()).l4_buffer(buffers));

    let readiness = Readiness {
        public: config.listen.public,
        upstream: target.addr,
        journal: Arc::clone(&journal),
        draining: draining.clone(),
    };
    let admin = Admin { readiness, journal: Arc::clone(&journal), verifier, refresher: refresher.clone() };
    let mut admin = Service::new("internal".to_owned(), admin);
    admin.threads = Some(1);
    admin.add_tcp(&config.listen.internal.to_string());

    let poll = config.changes.poll_interval_seconds;
    let upkeep = Upkeep {
        refresher,
        recent,
        hub,
        journal,
        retention: config.retention(),
        poll_interval: (poll > 0).then(|| Duration::from_secs(poll)),
        poll_window: Duration::from_secs(config.changes.poll_recent_seconds),
        prune_interval: Duration::from_secs(config.journal.prune_interval_seconds),
    };

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(background_service("upkeep", upkeep));
    Ok(server)
}

/// Both listen addresses can be bound now. pingora retries a busy address forever; an operator
/// wants to hear about it at once (and the demo before it prints where to connect).
pub fn check_listeners(config: &Config) -> Result<(), ConfigError> {
    check_free("listen.public", config.listen.public)?;
    check_free("listen.internal", config.listen.internal)
}

fn check_free(key: &'static str, addr: std::net::SocketAddr) -> Result<(), ConfigError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|e| ConfigError::Invalid { key, message: format!("cannot listen on {addr}: {e}") })
}

/// Credentials for the sidecar's own re-reads; clients' credentials are never kept for this.
fn service_credentials(config: &Config) -> Credentials {
    let value = &config.changes.upstream_authorization;
    Credentials {
        authorization: (!value.is_empty()).then(|| http::HeaderValue::from_str(value).ok()).flatten(),
        cookie: None,
    }
}

/// Runs until SIGTERM (graceful) or SIGINT (immediate).
pub fn run(config: &Config) -> Result<(), ConfigError> {
    check_listeners(config)?;
    let (in_flight, draining) = (InFlight::default(), Draining::default());
    let server = build(config, &in_flight, &draining)?;
    tracing::info!(
        public = %config.listen.public,
        internal = %config.listen.internal,
        upstream = %config.upstream.url,
        "export-sidecar listening"
    );
    let delay = Duration::from_secs(config.server.drain_delay_seconds);
    server.run(RunArgs { shutdown_signal: Box::new(DrainThenExit { in_flight, draining, delay }) });
    Ok(())
}
