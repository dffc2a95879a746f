//! Attachments of a zip export: finding `hash://sha256/…` links in records, and downloading each
//! blob from U3 ahead of the archive writer into a few hashed, self-removing spool files.

use super::zipfile::Method;
use crate::codec::cbor::{self, CborError, Item, Slot, Str, Visitor};
use crate::collection::Collection;
use crate::upstream::{AttachmentBody, Credentials, Upstream, UpstreamError};
use bytes::Bytes;
use flate2::write::DeflateEncoder;
use flate2::{Compression, Crc};
use futures::stream::{self, Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use tempfile::TempPath;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// What every attachment link starts with; the 64 hex digits of the blob's sha256 follow.
const LINK_PREFIX: &[u8] = b"hash://sha256/";
/// Spool files one export holds at most (downloading, waiting, or being written): this bounds
/// its temporary disk to the size of that many attachments.
const SPOOL_FILES: usize = 4;
/// Attachment downloads in flight per export, so the next ones arrive while one is written.
const DOWNLOADS: usize = 3;
/// Body pieces queued between a download and its spool writer thread.
const SPOOL_QUEUE: usize = 8;
/// The first bytes of a blob decide whether it is deflated; enough to see through headers.
const SAMPLE_BYTES: usize = 64 * 1024;
/// Buffer of a spool file's writer: few large writes instead of one per body piece.
const SPOOL_BUFFER: usize = 256 * 1024;

/// Parses a whole text as an attachment link: `hash://sha256/` + 64 hex digits (either case),
/// optionally `?` and a query. Returns the lower-case hex, the blob's name in U3 and the archive.
pub fn parse_link(text: &[u8]) -> Option<String> {
    let rest = text.strip_prefix(LINK_PREFIX)?;
    let (hex, query) = rest.split_at_checked(64)?;
    let well_formed = hex.iter().all(u8::is_ascii_hexdigit) && query.first().is_none_or(|&b| b == b'?');
    well_formed.then(|| hex.iter().map(|b| char::from(b.to_ascii_lowercase())).collect())
}

/// The distinct attachment hashes one record links, from any text in it: values, map keys,
/// nested or tagged. `record` must be valid CBOR (it is walked with the same strict reader).
pub fn find_links(record: &[u8]) -> Result<Vec<String>, CborError> {
    let mut finder = LinkFinder { links: Vec::new(), joined: Vec::new() };
    cbor::walk(record, &mut finder, &mut Vec::new())?;
    let mut links = finder.links;
    links.sort_unstable();
    links.dedup();
    Ok(links)
}

/// A `Visitor` that looks at every text string and keeps those that are attachment links.
struct LinkFinder {
    links: Vec<String>,
    /// Joins the chunks of an indefinite-length text, kept for its allocation.
    joined: Vec<u8>,
}

impl<'a> Visitor<'a> for LinkFinder {
    type Frame = ();

    fn tag(&mut self, _tag: u64) {}

    fn item(&mut self, _slot: Slot<'_, ()>, item: Item<'a>) -> Result<(), CborError> {
        let Item::Text(text) = item else {
            return Ok(());
        };
        let whole = match text {
            Str::Whole(bytes) => bytes,
            Str::Chunked(_) => {
                self.joined.clear();
                text.into_iter().for_each(|chunk| self.joined.extend_from_slice(chunk));
                &self.joined
            }
        };
        self.links.extend(parse_link(whole));
        Ok(())
    }

    fn open(&mut self, _slot: Slot<'_, ()>, _map: bool) -> Result<(), CborError> {
        Ok(())
    }

    fn close(&mut self, _frame: (), _empty: bool) {}
}

/// Where attachments come from and where they are spooled; shared by one export's downloads.
pub struct AttachmentSource {
    pub upstream: Upstream,
    /// The client's, so the dataset server decides whether it may read each blob.
    pub credentials: Credentials,
    /// For log lines only.
    pub collection: Collection,
    pub spool_dir: PathBuf,
}

/// One attachment as the archive writer receives it, in the order it was requested.
pub struct Fetched {
    /// Lower-case sha256 hex.
    pub hex: String,
    pub outcome: Result<Spool, Missing>,
}

/// A downloaded attachment whose hash matched, waiting in its spool file to be written.
pub struct Spool {
    pub method: Method,
    pub crc32: u32,
    /// Bytes of the blob.
    pub size: u64,
    /// Bytes in the spool file (deflated, or the blob itself when stored).
    pub compressed_size: u64,
    /// The spool file, positioned at its start.
    pub file: tokio::fs::File,
    /// Removes the file when the spool is dropped: written, or abandoned by an aborted export.
    _path: TempPath,
    /// Frees a spool slot for the next download when dropped.
    _permit: OwnedSemaphorePermit,
}

/// Why an attachment is left out of the archive (and listed in `missing-attachments.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// U3 answered 404.
    NotFound,
    /// The bytes U3 sent do not have the sha256 the link names.
    HashMismatch { actual: String },
    /// U3 failed (after one retry, unless it refused: 401, 403).
    Upstream(String),
    /// The sidecar could not write the spool file (disk full, temp dir gone).
    Spool(String),
}

impl Missing {
    /// The `reason` code in `missing-attachments.json`.
    pub fn code(&self) -> &'static str {
        match self {
            Missing::NotFound => "not_found",
            Missing::HashMismatch { .. } => "hash_mismatch",
            Missing::Upstream(_) => "upstream_error",
            Missing::Spool(_) => "spool_error",
        }
    }

    /// What happened, for people.
    pub fn detail(&self) -> String {
        match self {
            Missing::NotFound => "the dataset server has no attachment with this hash (404)".into(),
            Missing::HashMismatch { actual } => {
                format!("the dataset server sent bytes whose sha256 is {actual}")
            }
            Missing::Upstream(detail) => detail.clone(),
            Missing::Spool(detail) => format!("the sidecar could not spool it: {detail}"),
        }
    }

    fn from_upstream(e: &UpstreamError) -> Missing {
        Missing::Upstream(e.to_string())
    }

    /// Only an upstream fault may go away on a second try; a refusal or bad bytes will not.
    fn worth_retry(&self, refused: bool) -> bool {
        matches!(self, Missing::Upstream(_)) && !refused
    }
}

/// Downloads the attachments an export asks for, in order, a few ahead of the archive writer.
/// Dropping it (the export ended or was aborted) aborts every download and removes every spool.
pub struct Prefetcher {
    /// `None` once every attachment has been requested.
    requests: Option<mpsc::UnboundedSender<String>>,
    results: mpsc::Receiver<Fetched>,
    requested: u64,
    received: u64,
    /// Owns the download task; a `JoinSet` aborts its tasks when dropped.
    _task: JoinSet<()>,
}

impl Prefetcher {
    /// Starts the download task; it idles until the first request.
    pub fn start(source: AttachmentSource) -> Prefetcher {
        let (requests, mut request_rx) = mpsc::unbounded_channel::<String>();
        let (result_tx, results) = mpsc::channel(1);
        let source = Arc::new(source);
        let slots = Arc::new(Semaphore::new(SPOOL_FILES));
        let mut task = JoinSet::new();
        task.spawn(async move {
            // Slots are taken one at a time in request order, so the attachment the writer
            // waits for never waits for a slot held by a later one.
            let downloads = stream::poll_fn(move |cx| request_rx.poll_recv(cx))
                .then(move |hex| {
                    let slots = Arc::clone(&slots);
                    async move { (hex, slots.acquire_owned().await) }
                })
                .map(move |(hex, slot)| {
                    let source = Arc::clone(&source);
                    async move { source.fetch(hex, slot).await }
                })
                .buffered(DOWNLOADS);
            let mut downloads = std::pin::pin!(downloads);
            while let Some(fetched) = downloads.next().await {
                if result_tx.send(fetched).await.is_err() {
                    return;
                }
            }
        });
        Prefetcher { requests: Some(requests), results, requested: 0, received: 0, _task: task }
    }

    /// Queues one attachment; the caller asks for each hash once.
    pub fn request(&mut self, hex: String) {
        self.requested += 1;
        if let Some(requests) = &self.requests {
            // A send fails only if the task died; `complete` then reports the shortfall.
            let _ = requests.send(hex);
        }
    }

    /// No more requests: the results end after the last one requested.
    pub fn close(&mut self) {
        self.requests = None;
    }

    /// The results, in request order.
    pub fn results(&mut self) -> impl Stream<Item = Fetched> + Unpin + '_ {
        stream::poll_fn(move |cx| {
            let polled = self.results.poll_recv(cx);
            if let std::task::Poll::Ready(Some(_)) = &polled {
                self.received += 1;
            }
            polled
        })
    }

    /// True when every requested attachment came back (the download task did not die).
    pub fn complete(&self) -> bool {
        self.received == self.requested
    }
}

impl AttachmentSource {
    /// Downloads one attachment, once more after an upstream failure, and logs a missing one.
    async fn fetch(
        &self,
        hex: String,
        slot: Result<OwnedSemaphorePermit, tokio::sync::AcquireError>,
    ) -> Fetched {
        let outcome = match slot {
            Ok(slot) => self.fetch_with_retry(&hex).await.map(|spooled| spooled.into_spool(slot)),
            Err(e) => Err(Missing::Spool(format!("no spool slot: {e}"))),
        };
        if let Err(missing) = &outcome {
            tracing::warn!(collection = %self.collection, attachment = %hex, reason = missing.code(),
                detail = %missing.detail(), "attachment left out of the zip export");
        }
        Fetched { hex, outcome }
    }

    async fn fetch_with_retry(&self, hex: &str) -> Result<Spooled, Missing> {
        match self.download(hex).await {
            Err((missing, refused)) if missing.worth_retry(refused) => {
                tracing::info!(collection = %self.collection, attachment = %hex, detail = %missing.detail(),
                    "attachment download failed; trying once more");
                self.download(hex).await.map_err(|(missing, _)| missing)
            }
            other => other.map_err(|(missing, _)| missing),
        }
    }

    /// One download into a fresh spool file. The error says whether the server refused access.
    async fn download(&self, hex: &str) -> Result<Spooled, (Missing, bool)> {
        let mut body = match self.upstream.attachment(hex, &self.credentials).await {
            Ok(Some(body)) => body,
            Ok(None) => return Err((Missing::NotFound, false)),
            Err(e) => return Err((Missing::from_upstream(&e), e.is_refusal())),
        };
        let spool_error = |e: io::Error| (Missing::Spool(e.to_string()), false);
        let file = tempfile::Builder::new()
            .prefix("export-sidecar-spool-")
            .tempfile_in(&self.spool_dir)
            .map_err(spool_error)?;
        let (file, path) = file.into_parts();
        let (tx, rx) = mpsc::channel(SPOOL_QUEUE);
        let content_type = body.content_type.clone();
        let writer = tokio::task::spawn_blocking(move || spool(file, content_type, rx));
        forward(&mut body, &tx).await.map_err(|e| (Missing::from_upstream(&e), false))?;
        drop(tx);
        let written = writer.await.map_err(|e| spool_error(io::Error::other(e)))?.map_err(spool_error)?;
        if written.sha256 != hex {
            return Err((Missing::HashMismatch { actual: written.sha256 }, false));
        }
        Ok(Spooled { written, path })
    }
}

/// A verified spool file before it is given a slot to count against.
struct Spooled {
    written: Written,
    path: TempPath,
}

impl Spooled {
    fn into_spool(self, slot: OwnedSemaphorePermit) -> Spool {
        let Written { file, method, crc32, size, compressed_size, .. } = self.written;
        let file = tokio::fs::File::from_std(file);
        Spool { method, crc32, size, compressed_size, file, _path: self.path, _permit: slot }
    }
}

/// What flows from a download to its spool writer thread.
enum SpoolMessage {
    Data(Bytes),
    /// The body ended normally. A channel closed without it means the download failed.
    End,
}

/// Moves the body to the spool writer. A writer that stopped early is not an upstream error:
/// its own error comes from awaiting it.
async fn forward(body: &mut AttachmentBody, tx: &mpsc::Sender<SpoolMessage>) -> Result<(), UpstreamError> {
    loop {
        let message = match body.chunk().await? {
            Some(data) => SpoolMessage::Data(data),
            None => SpoolMessage::End,
        };
        let end = matches!(message, SpoolMessage::End);
        if tx.send(message).await.is_err() || end {
            return Ok(());
        }
    }
}

/// A finished spool file and what the archive needs to know about it.
struct Written {
    file: File,
    /// Lower-case hex of the blob's sha256.
    sha256: String,
    method: Method,
    crc32: u32,
    size: u64,
    compressed_size: u64,
}

/// Runs on a blocking thread: hashing and compressing a large blob is CPU work that must not
/// hold up the async workers, and `std::fs` writes need no runtime round trip per piece.
fn spool(
    file: File,
    content_type: Option<String>,
    mut rx: mpsc::Receiver<SpoolMessage>,
) -> io::Result<Written> {
    let mut sink = SpoolSink::new(file, content_type);
    loop {
        match rx.blocking_recv() {
            Some(SpoolMessage::Data(data)) => sink.write(&data)?,
            Some(SpoolMessage::End) => return sink.finish(),
            None => return Err(io::Error::other("the download stopped before the end of the attachment")),
        }
    }
}

/// Checksums a blob and writes it to its spool file, deflated if that is worth it. The first
/// `SAMPLE_BYTES` are held back until that is decided.
struct SpoolSink {
    sha256: Sha256,
    crc: Crc,
    /// Bytes of the blob so far (`Crc::amount` is only 32 bits).
    size: u64,
    content_type: Option<String>,
    /// The file until the method is chosen; then `out` owns it.
    file: Option<File>,
    sample: Vec<u8>,
    out: Option<SpoolOut>,
}

enum SpoolOut {
    Stored(BufWriter<File>),
    Deflated(DeflateEncoder<BufWriter<File>>),
}

impl SpoolSink {
    fn new(file: File, content_type: Option<String>) -> SpoolSink {
        SpoolSink {
            sha256: Sha256::new(),
            crc: Crc::new(),
            size: 0,
            content_type,
            file: Some(file),
            sample: Vec::new(),
            out: None,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.sha256.update(data);
        self.crc.update(data);
        self.size += data.len() as u64;
        match &mut self.out {
            Some(SpoolOut::Stored(out)) => out.write_all(data),
            Some(SpoolOut::Deflated(out)) => out.write_all(data),
            None => {
                self.sample.extend_from_slice(data);
                if self.sample.len() >= SAMPLE_BYTES {
                    self.choose()?;
                }
                Ok(())
            }
        }
    }

    /// Chooses the method from the sample and writes the sample out.
    fn choose(&mut self) -> io::Result<()> {
        let file = self.file.take().ok_or_else(|| io::Error::other("spool method chosen twice"))?;
        let writer = BufWriter::with_capacity(SPOOL_BUFFER, file);
        let sample = std::mem::take(&mut self.sample);
        let mut out = match choose_method(self.content_type.as_deref(), &sample) {
            Method::Stored => SpoolOut::Stored(writer),
            Method::Deflated => SpoolOut::Deflated(DeflateEncoder::new(writer, Compression::default())),
        };
        match &mut out {
            SpoolOut::Stored(w) => w.write_all(&sample)?,
            SpoolOut::Deflated(w) => w.write_all(&sample)?,
        }
        self.out = Some(out);
        Ok(())
    }

    fn finish(mut self) -> io::Result<Written> {
        if self.out.is_none() {
            self.choose()?;
        }
        let (writer, method) = match self.out {
            Some(SpoolOut::Stored(w)) => (w, Method::Stored),
            Some(SpoolOut::Deflated(w)) => (w.finish()?, Method::Deflated),
            None => return Err(io::Error::other("spool method never chosen")),
        };
        let mut file = writer.into_inner().map_err(|e| e.into_error())?;
        let compressed_size = file.stream_position()?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Written {
            file,
            sha256: format!("{:x}", self.sha256.finalize()),
            method,
            crc32: self.crc.sum(),
            size: self.size,
            compressed_size,
        })
    }
}

/// Deflate only what is likely to shrink: not media that is compressed already (by its content
/// type), and not a blob whose first bytes deflate by less than 10 % (random or packed data).
fn choose_method(content_type: Option<&str>, sample: &[u8]) -> Method {
    if sample.is_empty() || content_type.is_some_and(is_compressed_media) {
        return Method::Stored;
    }
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::fast());
    let deflated = encoder.write_all(sample).and_then(|()| encoder.finish());
    match deflated {
        Ok(deflated) if deflated.len() * 10 <= sample.len() * 9 => Method::Deflated,
        _ => Method::Stored,
    }
}

/// Content types whose bytes are compressed already, so DEFLATE would only cost time.
fn is_compressed_media(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    match kind {
        "image" => {
            !matches!(subtype, "svg+xml" | "bmp" | "x-ms-bmp" | "tiff" | "x-icon" | "vnd.microsoft.icon")
        }
        "video" => true,
        "audio" => !matches!(subtype, "wav" | "x-wav" | "wave" | "aiff" | "x-aiff" | "basic"),
        "application" => {
            matches!(
                subtype,
                "zip"
                    | "gzip"
                    | "x-gzip"
                    | "zstd"
                    | "x-xz"
                    | "x-bzip2"
                    | "x-7z-compressed"
                    | "vnd.rar"
                    | "pdf"
            ) || subtype.ends_with("+zip")
                || subtype.starts_with("vnd.openxmlformats-officedocument.")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Realm;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};

    const HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn cbor(value: &ciborium::Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).expect("encode");
        out
    }

    #[test]
    fn links_are_whole_strings_with_64_hex_digits() {
        let link = |s: &str| parse_link(s.as_bytes());
        assert_eq!(link(&format!("hash://sha256/{HEX}")).as_deref(), Some(HEX));
        assert_eq!(link(&format!("hash://sha256/{HEX}?type=image%2Fpng")).as_deref(), Some(HEX));
        assert_eq!(link(&format!("hash://sha256/{}", HEX.to_uppercase())).as_deref(), Some(HEX));
        assert_eq!(link(&format!("hash://sha256/{HEX}?")).as_deref(), Some(HEX));
        assert_eq!(link(&format!("hash://sha256/{HEX}0")), None, "65 digits");
        assert_eq!(link(&format!("hash://sha256/{}", &HEX[1..])), None, "63 digits");
        assert_eq!(link(&format!("see hash://sha256/{HEX}")), None, "not the whole string");
        assert_eq!(link(&format!("hash://sha256/{}g", &HEX[1..])), None, "not hex");
        assert_eq!(link(&format!("hash://sha256/{HEX}#x")), None);
        assert_eq!(link(&format!("HASH://sha256/{HEX}")), None);
    }

    #[test]
    fn links_are_found_in_keys_nested_values_and_tags_once_each() {
        use ciborium::Value;
        let other = "a".repeat(64);
        let value = Value::Map(vec![
            (Value::Text(format!("hash://sha256/{HEX}")), Value::Integer(1.into())),
            ("list".into(), Value::Array(vec![Value::Text(format!("hash://sha256/{other}?type=x"))])),
            ("tagged".into(), Value::Tag(32, Box::new(Value::Text(format!("hash://sha256/{HEX}"))))),
            ("bytes".into(), Value::Bytes(format!("hash://sha256/{}", "b".repeat(64)).into_bytes())),
        ]);
        assert_eq!(find_links(&cbor(&value)).expect("valid"), vec![HEX.to_owned(), other]);
    }

    #[test]
    fn chunked_text_is_joined_before_it_is_checked() {
        let link = format!("hash://sha256/{HEX}");
        let (a, b) = link.split_at(20);
        let mut bytes = vec![0x7f];
        for part in [a, b] {
            bytes.push(0x78);
            bytes.push(part.len() as u8);
            bytes.extend_from_slice(part.as_bytes());
        }
        bytes.push(0xff);
        assert_eq!(find_links(&bytes).expect("valid"), vec![HEX.to_owned()]);
    }

    #[test]
    fn media_and_random_bytes_are_stored_text_is_deflated() {
        let text = b"the same words again and again, ".repeat(100);
        assert_eq!(choose_method(Some("text/plain"), &text), Method::Deflated);
        assert_eq!(choose_method(Some("image/png"), &text), Method::Stored);
        assert_eq!(choose_method(Some("Video/MP4; codecs=avc1"), &text), Method::Stored);
        assert_eq!(choose_method(Some("image/svg+xml"), &text), Method::Deflated);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert_eq!(choose_method(None, &noise), Method::Stored);
        assert_eq!(choose_method(None, b""), Method::Stored);
    }

    #[test]
    fn spool_sink_checksums_and_deflates() {
        use std::io::Read;
        let blob = b"spooled text, spooled text, spooled text. ".repeat(5000);
        let file = tempfile::tempfile().expect("temp file");
        let mut sink = SpoolSink::new(file, Some("text/plain".into()));
        for piece in blob.chunks(10_000) {
            sink.write(piece).expect("written");
        }
        let mut written = sink.finish().expect("finished");
        assert_eq!(written.sha256, format!("{:x}", Sha256::digest(&blob)));
        assert_eq!(written.method, Method::Deflated);
        assert_eq!(written.size, blob.len() as u64);
        let mut deflated = Vec::new();
        written.file.read_to_end(&mut deflated).expect("read back");
        assert_eq!(deflated.len() as u64, written.compressed_size);
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&deflated[..]).read_to_end(&mut inflated).expect("inflates");
        assert_eq!(inflated, blob);
        let mut crc = Crc::new();
        crc.update(&blob);
        assert_eq!(written.crc32, crc.sum());
    }

    /// A U3 stand-in that answers the n-th request with `statuses[n]` (200 past the end) and
    /// `blob` as the body; returns its URL and how many requests it saw.
    async fn scripted_server(statuses: Vec<u16>, blob: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        let app = axum::Router::new().fallback(move || {
            let n = counter.fetch_add(1, AtomicOrdering::SeqCst);
            let status = statuses.get(n).copied().unwrap_or(200);
            async move { (http::StatusCode::from_u16(status).expect("a status"), blob) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    fn source(url: String, spool_dir: &std::path::Path) -> AttachmentSource {
        let config = crate::config::UpstreamConfig { url, ..Default::default() };
        AttachmentSource {
            upstream: Upstream::new(&config).expect("upstream"),
            credentials: Credentials::default(),
            collection: Collection { realm: Realm::Datasets, user: "u".into(), name: "n".into() },
            spool_dir: spool_dir.to_path_buf(),
        }
    }

    #[tokio::test]
    async fn an_upstream_failure_is_retried_once_and_nothing_else_is() {
        const BLOB: &[u8] = b"the attachment's bytes";
        let hex = format!("{:x}", Sha256::digest(BLOB));
        let dir = tempfile::tempdir().expect("spool dir");
        let attempt = |statuses: Vec<u16>| {
            let (dir, hex) = (dir.path().to_path_buf(), hex.clone());
            async move {
                let (url, seen) = scripted_server(statuses, BLOB).await;
                let outcome = source(url, &dir).fetch_with_retry(&hex).await.map(|s| s.written.size);
                (outcome, seen.load(AtomicOrdering::SeqCst))
            }
        };
        assert_eq!(attempt(vec![500]).await, (Ok(BLOB.len() as u64), 2), "a 500, then the blob");
        let (outcome, seen) = attempt(vec![500, 503]).await;
        assert!(matches!(outcome, Err(Missing::Upstream(_))) && seen == 2, "{outcome:?} after {seen}");
        let (outcome, seen) = attempt(vec![403]).await;
        assert!(matches!(outcome, Err(Missing::Upstream(_))) && seen == 1, "a refusal is final");
        assert_eq!(attempt(vec![404]).await, (Err(Missing::NotFound), 1));

        let (url, _) = scripted_server(vec![], b"other bytes").await;
        let outcome = source(url, dir.path()).fetch_with_retry(&hex).await.map(|s| s.written.size);
        assert!(matches!(outcome, Err(Missing::HashMismatch { .. })), "{outcome:?}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("spool dir").count(), 0, "no spool file is left");
    }
}
