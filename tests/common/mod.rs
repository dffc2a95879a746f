//! Test harness: the reference dataset server in-process and the real sidecar binary in front
//! of it, each on its own loopback port.

#![allow(dead_code)]

use export_sidecar::reference::{CollectionId, ReferenceConfig, ReferenceServer, Store};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running sidecar process; killed when dropped.
pub struct Sidecar {
    child: Child,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    /// Starts the binary against `upstream` and waits until its public listener accepts.
    pub async fn start(upstream: &str) -> Sidecar {
        Sidecar::start_with(upstream, &[]).await
    }

    pub async fn start_with(upstream: &str, extra: &[&str]) -> Sidecar {
        Sidecar::start_with_journal(upstream, None, extra).await
    }

    /// Starts with its internal listener on `internal`, which an upstream was told to send
    /// webhooks to before the sidecar existed.
    pub async fn start_on(upstream: &str, internal: SocketAddr, extra: &[&str]) -> Sidecar {
        let ports = Ports { internal: Some(internal), journal: None };
        Sidecar::start_with_ports(upstream, ports, extra).await
    }

    /// Starts with a given journal file (to test restarts), or a fresh one in a temp dir.
    pub async fn start_with_journal(upstream: &str, journal: Option<&Path>, extra: &[&str]) -> Sidecar {
        Sidecar::start_with_ports(upstream, Ports { internal: None, journal }, extra).await
    }

    async fn start_with_ports(upstream: &str, ports: Ports<'_>, extra: &[&str]) -> Sidecar {
        let mut last_error = String::new();
        for _ in 0..3 {
            match Sidecar::try_start(upstream, &ports, extra).await {
                Ok(sidecar) => return sidecar,
                Err(e) => last_error = e,
            }
        }
        panic!("sidecar did not start: {last_error}");
    }

    async fn try_start(upstream: &str, ports: &Ports<'_>, extra: &[&str]) -> Result<Sidecar, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let journal = ports.journal.map_or_else(|| dir.path().join("journal.sqlite"), Path::to_path_buf);
        let (public, internal) = (free_port(), ports.internal.unwrap_or_else(free_port));
        let mut command = Command::new(env!("CARGO_BIN_EXE_export-sidecar"));
        command
            .args(["run", "--upstream", upstream])
            .args(["--listen", &public.to_string()])
            .args(["--internal-listen", &internal.to_string()])
            .arg("--journal")
            .arg(&journal)
            .args(extra);
        Sidecar::spawn(command, dir, public, internal).await
    }

    /// Runs `command` (an `export-sidecar run` the caller set up completely, e.g. from the
    /// environment) expecting it to listen on `public` and `internal`; logs go to `dir`.
    pub async fn spawn(
        mut command: Command,
        dir: tempfile::TempDir,
        public: SocketAddr,
        internal: SocketAddr,
    ) -> Result<Sidecar, String> {
        let log_path = dir.path().join("sidecar.log");
        let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let child = command
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut sidecar = Sidecar { child, public, internal, log_path, _dir: dir };
        sidecar.wait_listening().await?;
        Ok(sidecar)
    }

    /// Waits until `/readyz` reports the public listener accepting. The other checks may
    /// fail on purpose (a test's upstream can be down), so the status is not required to be 200.
    async fn wait_listening(&mut self) -> Result<(), String> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if let Ok(report) = client.get(format!("http://{}/readyz", self.internal)).send().await {
                let text = report.text().await.unwrap_or_default();
                let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                if report["checks"]["listener"] == "ok" {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("not listening after 30 s: {}", self.log()))
    }

    /// The sidecar's process id, to read its memory use from `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    /// Waits up to `limit` for the process to exit by itself.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.internal, path)
    }

    /// Everything the sidecar has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (log lines are written after the response).
    pub async fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// What a test fixes about a sidecar; everything else is chosen fresh.
struct Ports<'a> {
    internal: Option<SocketAddr>,
    journal: Option<&'a Path>,
}

/// An address where connections are refused for as long as the returned socket lives: it is
/// bound but not listening, so no other test can take the port in the meantime.
pub fn dead_address() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind an ephemeral port");
    (socket.local_addr().expect("local addr"), socket)
}

/// A port that was free a moment ago (the sidecar binds it next; start-up retries on a race).
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr")
}

/// The reference server plus a sidecar in front of it.
pub struct Stack {
    pub reference: ReferenceServer,
    pub sidecar: Sidecar,
    pub client: reqwest::Client,
}

impl Stack {
    pub async fn start() -> Stack {
        let reference =
            ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
                .await
                .expect("reference server starts");
        let sidecar = Sidecar::start(&reference.url()).await;
        Stack { reference, sidecar, client: client() }
    }

    /// Like `start`, with extra `export-sidecar run` arguments (e.g. `--sse-heartbeat 1`).
    pub async fn start_with(extra: &[&str]) -> Stack {
        let reference =
            ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
                .await
                .expect("reference server starts");
        let sidecar = Sidecar::start_with(&reference.url(), extra).await;
        Stack { reference, sidecar, client: client() }
    }

    pub fn store(&self) -> &Store {
        self.reference.store()
    }

    pub fn url(&self, path: &str) -> String {
        self.sidecar.url(path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request reaches the sidecar")
    }
}

/// A client that does not decompress, so tests see exactly what was sent.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

/// One sample of the internal listener's `/metrics`, `name{labels}` exactly as rendered.
pub async fn metric(sidecar: &Sidecar, sample: &str) -> Option<f64> {
    let response = client().get(sidecar.internal_url("/metrics")).send().await.ok()?;
    let text = response.text().await.ok()?;
    text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

pub fn collection(realm: &str, user: &str, name: &str) -> CollectionId {
    CollectionId::new(realm, user, name)
}

/// CBOR bytes of a value.
pub fn cbor(value: &ciborium::Value) -> bytes::Bytes {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("encode");
    bytes::Bytes::from(out)
}

/// The JSON error body every client-facing error carries.
pub async fn error_body(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert_eq!(content_type, "application/json", "error {status} must be JSON");
    let text = response.text().await.expect("error body");
    let body: serde_json::Value = serde_json::from_str(&text).expect("error body is JSON");
    let code = body["error"].as_str().expect("error code").to_owned();
    let message = body["message"].as_str().expect("error message").to_owned();
    assert!(!message.is_empty());
    (status, code, message)
}

/// The SPEC's JSON mapping for the kinds of values these tests write, computed independently
/// of the sidecar's converter (from ciborium's tree).
pub fn expected_json(value: &ciborium::Value) -> serde_json::Value {
    use ciborium::Value as C;
    use serde_json::{json, Value as J};
    match value {
        C::Integer(i) => {
            let n = i128::from(*i);
            serde_json::from_str(&n.to_string()).expect("integer as JSON")
        }
        C::Float(f) if f.is_finite() => json!(f),
        C::Float(f) if f.is_nan() => json!({"type": "constant", "data": "NaN"}),
        C::Float(f) => {
            json!({"type": "constant", "data": if *f > 0.0 { "infinity" } else { "-infinity" }})
        }
        C::Bytes(b) => json!({"type": "Buffer", "data": b}),
        C::Text(t) => J::String(t.clone()),
        C::Bool(b) => J::Bool(*b),
        C::Null => J::Null,
        C::Array(items) => J::Array(items.iter().map(expected_json).collect()),
        C::Map(entries) => {
            let keys: Vec<_> = entries.iter().filter_map(|(k, _)| k.as_text()).collect();
            let distinct = keys.iter().collect::<std::collections::HashSet<_>>().len();
            if keys.len() == entries.len() && distinct == keys.len() {
                let mut object = serde_json::Map::new();
                for (k, v) in entries {
                    object.insert(k.as_text().unwrap_or_default().to_owned(), expected_json(v));
                }
                J::Object(object)
            } else {
                let pairs: Vec<J> =
                    entries.iter().map(|(k, v)| J::Array(vec![expected_json(k), expected_json(v)])).collect();
                json!({"type": "Map", "data": pairs})
            }
        }
        C::Tag(1, inner) => match inner.as_ref() {
            C::Integer(i) => json!({"type": "Date", "data": i128::from(*i) as i64 * 1000}),
            other => panic!("tests only write integer epoch dates, not {other:?}"),
        },
        C::Tag(_, inner) => expected_json(inner),
        other => panic!("tests do not write {other:?}"),
    }
}

/// Reads a JSON object's entries in document order (serde_json's map would sort them).
pub fn object_entries(text: &str) -> Vec<(String, serde_json::Value)> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Entries;
    impl<'de> Visitor<'de> for Entries {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let entries = (&mut de).deserialize_map(Entries).expect("a JSON object");
    de.end().expect("nothing after the object");
    entries
}

/// `n` records `r00000`, `r00001`, … whose values are short texts.
pub fn numbered(n: usize) -> Vec<(String, Option<bytes::Bytes>)> {
    (0..n).map(|i| (format!("r{i:05}"), Some(cbor(&ciborium::Value::Text(format!("value {i}")))))).collect()
}

/// A config file holding `text`, and the directory that keeps it alive.
pub fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.to_str().expect("utf-8 path").to_owned();
    (dir, path)
}

/// The stack with the sidecar reading `text` as its proxy.toml; keep the directory alive.
pub async fn start_with_config(text: &str) -> (tempfile::TempDir, Stack) {
    let (dir, path) = config_file(text);
    let stack = Stack::start_with(&["--config", &path]).await;
    (dir, stack)
}
