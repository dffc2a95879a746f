//! The settings of a running sidecar: the `proxy.toml` schema, its defaults and validation.
//! A bad key or value stops start-up with a message that names the key and what is allowed.

use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything `proxy.toml` can set. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub upstream: UpstreamConfig,
    pub listen: ListenConfig,
    pub export: ExportConfig,
    pub journal: JournalConfig,
    pub changes: ChangesConfig,
    pub events: EventsConfig,
    pub server: ServerConfig,
    pub log: LogConfig,
    pub cache: CacheConfig,
}

/// Where the dataset server is and how hard to press it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL, `http://` and authority only (`http://127.0.0.1:3000`): a sidecar reaches
    /// its dataset server over the pod's loopback, so TLS is not offered.
    pub url: String,
    /// Most record fetches in flight per export; the ordered output waits on the slowest.
    pub concurrency: usize,
    /// Start each export with a few fetches and keep as many in flight as the dataset server
    /// answers without its latency climbing (up to `concurrency`); false keeps `concurrency`.
    /// See `export::window` for how.
    pub adaptive_concurrency: bool,
    /// Longest wait for a TCP connection to the dataset server.
    pub connect_timeout_ms: u64,
    /// Longest wait from sending a request (connecting included) to its response head: a
    /// server that accepts and then hangs must not hold an export forever.
    pub first_byte_timeout_ms: u64,
    /// Longest silence between body bytes once the head has arrived.
    pub idle_timeout_ms: u64,
    /// A record (U2 body) larger than this fails its export: each of the `concurrency`
    /// fetches holds a whole record in memory, so this bounds an export's memory.
    pub max_record_bytes: usize,
}

/// The two listeners: public traffic and the loopback-only operator endpoints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

/// How export bodies are produced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Output is sent in chunks of about this size, so each record is not its own write.
    pub chunk_bytes: usize,
    /// A partly filled chunk is sent (and the compressor flushed) after this long without one,
    /// so a slow export still shows progress.
    pub flush_interval_ms: u64,
    /// Where zip exports spool attachments while checking their hash; empty means the system
    /// temporary directory. A setting because attachments can be large and `/tmp` small.
    pub temp_dir: PathBuf,
    /// Record and zip exports running at once; one more gets 503 with `Retry-After`. Each
    /// holds `upstream.concurrency` fetches, so this caps the load put on the dataset server.
    /// Event streams have their own cap, `events.max_connections`.
    pub max_concurrent: usize,
}

/// The version journal behind pull-sync: where it lives and how long versions are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    pub path: PathBuf,
    /// Versions older than this many days are forgotten (clients then get 410 and re-sync);
    /// 0 keeps them forever. A collection's newest version is always kept.
    pub max_age_days: u64,
    /// At most this many versions are kept per collection; 0 means no limit.
    pub max_versions: u64,
    /// Seconds between pruning runs.
    pub prune_interval_seconds: u64,
}

/// How the sidecar learns that collections changed: webhooks and polling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChangesConfig {
    /// Standard Webhooks secret (`whsec_…`); empty accepts unsigned webhooks.
    pub webhook_secret: String,
    /// Seconds between listing re-reads for servers that send no webhooks; 0 disables.
    pub poll_interval_seconds: u64,
    /// A collection exported within this many seconds is polled.
    pub poll_recent_seconds: u64,
    /// `Authorization` value for the sidecar's own listing re-reads (webhooks, polls), for
    /// collections the dataset server protects; empty sends none. Never sent for clients.
    pub upstream_authorization: String,
}

/// The change feed (`/event-stream`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Seconds between heartbeat comments, which keep idle connections open through proxies.
    pub heartbeat_seconds: u64,
    /// Open event streams at most; a subscriber over the cap is told to retry later.
    pub max_connections: usize,
    /// Seconds a stream lives at most (each gets 80–100 % of it, so reconnects spread out);
    /// 0 means no limit.
    pub max_lifetime_seconds: u64,
    /// A subscriber whose socket accepts nothing for this many seconds is disconnected; it
    /// resumes with `Last-Event-ID`.
    pub write_timeout_seconds: u64,
    /// The reconnection delay suggested to clients (`retry:`), in milliseconds; each stream
    /// gets a random value between this and twice this.
    pub retry_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            heartbeat_seconds: 15,
            max_connections: 10_000,
            max_lifetime_seconds: 0,
            write_timeout_seconds: 30,
            retry_ms: 3_000,
        }
    }
}

/// The record cache, which lets a repeated export of an unchanged collection fetch only its
/// listing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes of record values kept at most (least recently used go first); 0 turns it off.
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_bytes: 256 * 1024 * 1024 }
    }
}

/// Process-level settings of the proxy server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads of the public listener; 0 means one per CPU.
    pub threads: usize,
    /// Seconds running requests get to finish after SIGTERM.
    pub grace_period_seconds: u64,
    /// Seconds between SIGTERM and closing the listeners, while `/readyz` already answers 503:
    /// Kubernetes keeps routing to a pod for a few seconds after it is told to stop.
    pub drain_delay_seconds: u64,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `export_sidecar=debug,info`; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: "http://127.0.0.1:3000".into(),
            concurrency: 32,
            adaptive_concurrency: true,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 30_000,
            idle_timeout_ms: 30_000,
            max_record_bytes: 16 << 20,
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            public: SocketAddr::from(([0, 0, 0, 0], 8080)),
            internal: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            chunk_bytes: 256 * 1024,
            flush_interval_ms: 200,
            temp_dir: PathBuf::new(),
            max_concurrent: 32,
        }
    }
}

impl ExportConfig {
    /// The directory attachment spool files go to.
    pub fn spool_dir(&self) -> PathBuf {
        if self.temp_dir.as_os_str().is_empty() {
            std::env::temp_dir()
        } else {
            self.temp_dir.clone()
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            path: PathBuf::from("export-sidecar-journal.sqlite"),
            max_age_days: 30,
            max_versions: 0,
            prune_interval_seconds: 3600,
        }
    }
}

impl Default for ChangesConfig {
    fn default() -> Self {
        ChangesConfig {
            webhook_secret: String::new(),
            poll_interval_seconds: 0,
            poll_recent_seconds: 600,
            upstream_authorization: String::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { threads: 0, grace_period_seconds: 30, drain_delay_seconds: 0 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

/// A setting that cannot be used, with the key it belongs to.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config =
            Config::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        Ok(config)
    }

    /// Parses TOML text; the error names the offending key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks what the types alone cannot; call after applying command-line overrides.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.upstream.target()?;
        check_range("upstream.concurrency", self.upstream.concurrency, 1, 4096)?;
        check_range("upstream.connect_timeout_ms", self.upstream.connect_timeout_ms, 1, 600_000)?;
        check_range("upstream.first_byte_timeout_ms", self.upstream.first_byte_timeout_ms, 1, 3_600_000)?;
        check_range("upstream.idle_timeout_ms", self.upstream.idle_timeout_ms, 1, 3_600_000)?;
        check_range("upstream.max_record_bytes", self.upstream.max_record_bytes, 1, 1 << 30)?;
        check_range("export.chunk_bytes", self.export.chunk_bytes, 512, 16 << 20)?;
        check_range("export.flush_interval_ms", self.export.flush_interval_ms, 1, 60_000)?;
        check_range("export.max_concurrent", self.export.max_concurrent, 1, 100_000)?;
        if !self.export.spool_dir().is_dir() {
            return Err(invalid(
                "export.temp_dir",
                format!("{} is not a directory", self.export.spool_dir().display()),
            ));
        }
        check_range("server.threads", self.server.threads, 0, 1024)?;
        check_range("events.heartbeat_seconds", self.events.heartbeat_seconds, 1, 3_600)?;
        check_range("events.max_connections", self.events.max_connections, 0, 10_000_000)?;
        check_range("events.max_lifetime_seconds", self.events.max_lifetime_seconds, 0, 604_800)?;
        check_range("events.write_timeout_seconds", self.events.write_timeout_seconds, 1, 3_600)?;
        check_range("events.retry_ms", self.events.retry_ms, 100, 3_600_000)?;
        check_range("server.grace_period_seconds", self.server.grace_period_seconds, 0, 86_400)?;
        check_range("cache.max_bytes", self.cache.max_bytes, 0, 1 << 40)?;
        check_range("server.drain_delay_seconds", self.server.drain_delay_seconds, 0, 3_600)?;
        if self.listen.public == self.listen.internal {
            return Err(invalid("listen.internal", "must differ from listen.public"));
        }
        if self.journal.path.as_os_str().is_empty() {
            return Err(invalid("journal.path", "must name a file"));
        }
        check_range("journal.max_age_days", self.journal.max_age_days, 0, 36_500)?;
        check_range("journal.prune_interval_seconds", self.journal.prune_interval_seconds, 1, 604_800)?;
        check_range("changes.poll_interval_seconds", self.changes.poll_interval_seconds, 0, 86_400)?;
        check_range("changes.poll_recent_seconds", self.changes.poll_recent_seconds, 1, 604_800)?;
        if http::HeaderValue::from_str(&self.changes.upstream_authorization).is_err() {
            return Err(invalid("changes.upstream_authorization", "is not a valid header value"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("not a log filter: {e}")))?;
        Ok(())
    }

    /// How long journal versions are kept.
    pub fn retention(&self) -> crate::journal::Retention {
        let days = self.journal.max_age_days;
        crate::journal::Retention {
            max_age: (days > 0).then(|| Duration::from_secs(days * 86_400)),
            max_versions: (self.journal.max_versions > 0).then_some(self.journal.max_versions as usize),
        }
    }

    pub fn threads(&self) -> usize {
        match self.server.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// The upstream as the two clients need it: a base URL for reqwest, an address for pingora.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// `scheme://host:port` without a trailing slash; paths are appended to it.
    pub base: String,
    pub addr: SocketAddr,
    pub host: String,
}

impl UpstreamConfig {
    /// Parses and resolves `upstream.url`. Resolution happens once, at start-up.
    pub fn target(&self) -> Result<UpstreamTarget, ConfigError> {
        let url = url::Url::parse(&self.url)
            .map_err(|e| invalid("upstream.url", format!("`{}` is not a URL: {e}", self.url)))?;
        if url.scheme() != "http" {
            return Err(invalid(
                "upstream.url",
                format!(
                    "scheme `{}` is not supported: the dataset server is reached over plain http",
                    url.scheme()
                ),
            ));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("upstream.url", "must be scheme://host[:port] with no path or query"));
        }
        // Credentials here would be logged with the URL, and are never what requests carry:
        // each caller's own go upstream, and the sidecar's reads use its own setting.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "upstream.url",
                "must not hold a user or password: callers' credentials are forwarded, and \
                 changes.upstream_authorization is what the sidecar's own reads send",
            ));
        }
        let host = url.host_str().ok_or_else(|| invalid("upstream.url", "has no host"))?.to_owned();
        let port = url.port_or_known_default().unwrap_or(80);
        let addr = (host.trim_matches(|c| c == '[' || c == ']'), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .ok_or_else(|| invalid("upstream.url", format!("cannot resolve host `{host}`")))?;
        let base = format!("{}://{}", url.scheme(), url.authority());
        Ok(UpstreamTarget { base, addr, host })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_millis(self.first_byte_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(key, format!("{value} is outside {min}..={max}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse("").expect("empty config parses");
        assert_eq!(config.upstream.concurrency, 32);
        assert_eq!(config.listen.internal.to_string(), "127.0.0.1:9090");
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[upstream]\nconcurency = 3\n").unwrap_err();
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let mut config = Config::default();
        config.upstream.concurrency = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("upstream.concurrency"), "{err}");
        config.upstream.concurrency = 4;
        config.upstream.url = "http://127.0.0.1:3000/base".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("upstream.url"), "{err}");
    }

    #[test]
    fn upstream_url_holds_no_credentials_fragment_or_path() {
        for url in ["http://u:p@127.0.0.1:3000", "http://u@127.0.0.1:3000", "http://127.0.0.1:3000/#x"] {
            let upstream = UpstreamConfig { url: url.into(), ..UpstreamConfig::default() };
            let err = upstream.target().unwrap_err().to_string();
            assert!(err.contains("upstream.url"), "{url}: {err}");
            assert!(!err.contains(":p@"), "{url}: the password is not echoed: {err}");
        }
        let upstream = UpstreamConfig { url: "http://127.0.0.1:3000".into(), ..UpstreamConfig::default() };
        assert_eq!(upstream.target().expect("valid").base, "http://127.0.0.1:3000");
    }

    #[test]
    fn temp_dir_must_be_a_directory() {
        let mut config = Config::default();
        config.export.temp_dir = PathBuf::from("/nonexistent/export-sidecar-spool");
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("export.temp_dir"), "{err}");
    }

    #[test]
    fn the_documented_file_is_the_default() {
        let documented = Config::parse(include_str!("../proxy.toml")).expect("proxy.toml parses");
        assert_eq!(format!("{documented:?}"), format!("{:?}", Config::default()));
    }
}
