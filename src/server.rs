//! Assembles and runs the pingora server: the public proxy listener and the internal listener.
//! `run` blocks until a shutdown signal, as pingora's server owns its own runtimes.

use crate::admin::Admin;
use crate::config::{Config, ConfigError};
use crate::export::Exporter;
use crate::proxy::Sidecar;
use crate::upstream::Upstream;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;

/// Builds the server from a validated config; nothing listens until `run`.
pub fn build(config: &Config) -> Result<Server, ConfigError> {
    let target = config.upstream.target()?;
    let exporter = Exporter {
        upstream: Upstream::new(&config.upstream)?,
        config: config.export.clone(),
        concurrency: config.upstream.concurrency,
    };
    let conf = ServerConf {
        threads: config.threads(),
        grace_period_seconds: Some(config.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Sidecar { exporter, target },
        "public",
    );
    proxy.add_tcp(&config.listen.public.to_string());

    let mut admin = Service::new(
        "internal".to_owned(),
        Admin {
            public: config.listen.public,
        },
    );
    admin.threads = Some(1);
    admin.add_tcp(&config.listen.internal.to_string());

    server.add_service(proxy);
    server.add_service(admin);
    Ok(server)
}

/// Runs until SIGTERM (graceful) or SIGINT (immediate).
pub fn run(config: &Config) -> Result<(), ConfigError> {
    let server = build(config)?;
    tracing::info!(
        public = %config.listen.public,
        internal = %config.listen.internal,
        upstream = %config.upstream.url,
        "export-sidecar listening"
    );
    server.run(RunArgs::default());
    Ok(())
}
