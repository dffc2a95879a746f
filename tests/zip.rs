//! End-to-end zip exports: the sidecar binary in front of the reference server, each archive
//! read by Info-ZIP `unzip`, Python `zipfile`, Java `ZipInputStream` and libarchive `bsdtar`.

mod common;

use bytes::Bytes;
use ciborium::Value;
use common::{cbor, collection, error_body, expected_json, Stack};
use export_sidecar::export::zipfile::{EntryMeta, Method, ZipWriter};
use export_sidecar::reference::{attachment_link, RecordFault};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

/// Longest any external reader may take on one archive (the 4 GiB one is the slowest).
const READER_LIMIT: Duration = Duration::from_secs(90);

/// Lists an archive with Python's `zipfile` after `testzip()`; with `hash`, also each entry's sha256.
const PYTHON_LISTING: &str = r#"
import hashlib, json, sys, zipfile
path, want_hash = sys.argv[1], sys.argv[2] == "hash"
with zipfile.ZipFile(path) as z:
    bad = z.testzip()
    if bad is not None:
        sys.exit("bad entry: " + bad)
    entries = []
    for info in z.infolist():
        entry = {"name": info.filename, "size": info.file_size, "compressed": info.compress_size,
                 "method": info.compress_type, "crc": info.CRC, "mode": info.external_attr >> 16,
                 "date": list(info.date_time), "flags": info.flag_bits, "system": info.create_system}
        if want_hash:
            digest = hashlib.sha256()
            with z.open(info) as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            entry["sha256"] = digest.hexdigest()
        entries.append(entry)
    sys.stdout.write(json.dumps(entries))
"#;

/// One entry as Python's `zipfile` sees it.
#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    size: u64,
    method: u32,
    crc: u32,
    mode: u32,
    date: Vec<u32>,
    flags: u32,
    system: u32,
    sha256: Option<String>,
}

/// Runs a reader with a time limit; it must succeed. Returns its standard output.
async fn run(program: &str, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(program);
    command.args(args).kill_on_drop(true);
    let output = tokio::time::timeout(READER_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} took longer than {READER_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("cannot run {program} ({e}); .ci/run installs what the tests need"));
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        stdout.chars().take(2000).collect::<String>()
    );
    stdout
}

/// The compiled `tests/fixtures/ZipCheck.java`, in cargo's temp dir for integration tests,
/// named after the source's hash: compiled once, whatever runs at the same time.
fn java_classes() -> &'static Path {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ZipCheck.java");
        let text = std::fs::read(&source).expect("read ZipCheck.java");
        let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = target_tmp.join(format!("zipcheck-{}", &hex_sha256(&text)[..16]));
        if !dir.join("ZipCheck.class").exists() {
            let staging = tempfile::tempdir_in(target_tmp).expect("staging dir");
            let status = std::process::Command::new("javac")
                .arg("-d")
                .arg(staging.path())
                .arg(&source)
                .status()
                .expect("javac runs (a JDK is needed for the zip tests)");
            assert!(status.success(), "javac ZipCheck.java failed");
            // Another test process may have won the race; its classes are the same.
            let _ = std::fs::rename(staging.path(), &dir);
        }
        dir
    })
}

/// How much of an archive the readers check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Every reader reads every byte; Python also hashes each entry.
    Hashed,
    /// Every reader reads every byte.
    Full,
    /// As `Full`, except that `unzip -t` tests only this entry: Info-ZIP reads at ~150 MB/s,
    /// too slow for 4 GiB (Python and Java still read it all).
    UnzipTests(&'static str),
}

/// Reads the archive at `path` with all four readers; each must accept it and they must agree
/// on the entries (names in order, and sizes and CRCs between Java and Python). Returns
/// Python's view.
async fn read_with_every_reader(path: &Path, depth: Depth) -> Vec<Entry> {
    let archive = path.to_str().expect("UTF-8 temp path");
    match depth {
        Depth::UnzipTests(entry) => run("unzip", &["-tqq", archive, entry]).await,
        Depth::Hashed | Depth::Full => run("unzip", &["-tqq", archive]).await,
    };
    let hash = if depth == Depth::Hashed { "hash" } else { "-" };
    let python = run("python3", &["-c", PYTHON_LISTING, archive, hash]).await;
    let entries: Vec<Entry> = serde_json::from_str(&python).expect("Python's listing is JSON");
    let classes = java_classes().to_str().expect("UTF-8 path");
    let java = run("java", &["-cp", classes, "ZipCheck", archive]).await;
    let java: Vec<(String, u64, u32)> = java
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let size = fields[1].parse().expect("size");
            let crc = u32::from_str_radix(fields[2], 16).expect("crc");
            (fields[0].to_owned(), size, crc)
        })
        .collect();
    let python_view: Vec<(String, u64, u32)> =
        entries.iter().map(|e| (e.name.clone(), e.size, e.crc)).collect();
    assert!(java == python_view, "ZipInputStream and zipfile disagree on {path:?}");
    let bsdtar = run("bsdtar", &["-tf", archive]).await;
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert!(bsdtar.lines().eq(names.iter().copied()), "bsdtar lists other entries");
    entries
}

/// Every entry is a plain 0644 file from Unix, dated 2020-01-01, with a UTF-8 name, and its
/// CRC and sizes in the local header (no data descriptor).
fn assert_fixed_metadata(entries: &[Entry]) {
    for e in entries {
        assert_eq!(e.mode, 0o100644, "{}", e.name);
        assert_eq!(e.date, [2020, 1, 1, 0, 0, 0], "{}", e.name);
        assert_eq!(e.system, 3, "{}: made by Unix", e.name);
        assert_ne!(e.flags & 0x800, 0, "{}: UTF-8 flag", e.name);
        assert_eq!(e.flags & 0x8, 0, "{}: no data descriptor", e.name);
        assert!(e.method == 0 || e.method == 8, "{}", e.name);
    }
}

/// Downloads `path` to `file` chunk by chunk; returns the headers.
async fn download(stack: &Stack, path: &str, file: &Path) -> reqwest::header::HeaderMap {
    let mut response = stack.get(path).await;
    assert_eq!(response.status(), 200, "{path}");
    let headers = response.headers().clone();
    let mut out = tokio::fs::File::create(file).await.expect("create the download file");
    while let Some(chunk) = response.chunk().await.expect("the archive arrives whole") {
        out.write_all(&chunk).await.expect("write the download");
    }
    out.flush().await.expect("flush the download");
    headers
}

/// Runs a test body with a time limit.
async fn within<T>(seconds: u64, test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), test).await.expect("the test finished in time")
}

/// The sidecar's peak resident memory so far, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("VmHWM in kB")
}

/// Deterministic incompressible bytes (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn hex_sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A sidecar whose spool files go to a directory the test can watch.
async fn stack_with_spool_dir() -> (Stack, TempDir, TempDir) {
    let spool = tempfile::tempdir().expect("spool dir");
    let config_dir = tempfile::tempdir().expect("config dir");
    let config = config_dir.path().join("proxy.toml");
    let text = format!("[export]\ntemp_dir = {:?}\n", spool.path().to_str().expect("UTF-8 path"));
    std::fs::write(&config, text).expect("write config");
    let stack = Stack::start_with(&["--config", config.to_str().expect("UTF-8 path")]).await;
    (stack, spool, config_dir)
}

fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).expect("read the spool dir").count()
}

/// Record IDs that would escape, hide or collide as naive file names, and their entry stems.
const TRICKY: [(&str, &str); 12] = [
    ("../../evil", "%2E.%2F..%2Fevil"),
    ("..\\x", "%2E.%5Cx"),
    ("/etc/passwd", "%2Fetc%2Fpasswd"),
    (".", "%2E"),
    ("..", "%2E%2E"),
    ("%2F", "%252F"),
    ("/", "%2F"),
    ("nul\0byte", "nul%00byte"),
    ("日本語", "%E6%97%A5%E6%9C%AC%E8%AA%9E"),
    ("é", "%C3%A9"),
    (".hidden", "%2Ehidden"),
    ("plain-id_1.x", "plain-id_1.x"),
];

fn tricky_value(i: usize, id: &str) -> Value {
    Value::Map(vec![
        ("id".into(), Value::Text(id.to_owned())),
        ("n".into(), Value::Integer((i as i64 * 1_000_003).into())),
        ("big".into(), Value::Integer(u64::MAX.into())),
        ("bytes".into(), Value::Bytes(vec![0, 255, i as u8])),
        ("when".into(), Value::Tag(1, Box::new(Value::Integer(1_700_000_000.into())))),
        ("nested".into(), Value::Array(vec![Value::Bool(true), Value::Null, Value::Float(0.5)])),
    ])
}

/// Every file below `dir`, as paths relative to it with `/` separators.
fn files_below(dir: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).expect("below dir");
                files.insert(relative.to_str().expect("UTF-8 name").to_owned());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_becomes_a_json_and_a_cbor_entry_inside_its_folder() {
    within(120, async {
        let stack = Stack::start().await;
        let c = collection("datasets", "alice", "tricky");
        let values: Vec<(String, Value)> =
            TRICKY.iter().enumerate().map(|(i, (id, _))| (id.to_string(), tricky_value(i, id))).collect();
        stack.store().write(&c, values.iter().map(|(id, v)| (id.clone(), Some(cbor(v)))).collect());
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = dir.path().join("tricky.zip");

        let headers = download(&stack, "/export/datasets/alice:tricky/zip", &archive).await;
        assert_eq!(headers["content-type"], "application/zip");
        assert_eq!(
            headers["content-disposition"],
            "attachment; filename=\"alice-tricky.zip\"; filename*=UTF-8''alice-tricky.zip"
        );
        assert!(headers.get("content-length").is_none(), "streamed: no Content-Length");
        let version = stack.store().version(&c).expect("exists").to_string();
        assert_eq!(headers["x-version"], version.as_str());

        let entries = read_with_every_reader(&archive, Depth::Hashed).await;
        assert_fixed_metadata(&entries);
        let mut by_id: Vec<(&str, &str)> = TRICKY.to_vec();
        by_id.sort_by(|a, b| a.0.cmp(b.0));
        let expected: Vec<String> = by_id
            .iter()
            .flat_map(|(_, stem)| [format!("json/{stem}.json"), format!("cbor/{stem}.cbor")])
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, expected, "json and cbor entries, in recordID order");

        let out = dir.path().join("extracted");
        let out_arg = out.to_str().expect("UTF-8 path");
        run("unzip", &["-qq", archive.to_str().expect("UTF-8 path"), "-d", out_arg]).await;
        assert_eq!(
            files_below(&out),
            expected.iter().cloned().collect(),
            "nothing lands outside json/ and cbor/"
        );
        for ((id, stem), (_, value)) in by_id.iter().zip(values_sorted(&values)) {
            let json = std::fs::read(out.join(format!("json/{stem}.json"))).expect("json entry");
            let parsed: serde_json::Value = serde_json::from_slice(&json).expect("the json entry is JSON");
            assert_eq!(parsed, expected_json(&value), "{id:?}");
            assert!(json.starts_with(b"{\n  \""), "pretty, 2-space indent: {id:?}");
            let stored = std::fs::read(out.join(format!("cbor/{stem}.cbor"))).expect("cbor entry");
            assert_eq!(stored, cbor(&value).to_vec(), "U2's bytes: {id:?}");
        }
    })
    .await;
}

fn values_sorted(values: &[(String, Value)]) -> Vec<(String, Value)> {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted
}

/// Upper-case hex in a link, as some clients write it.
fn upper(link: &str) -> String {
    let (prefix, rest) = link.split_at("hash://sha256/".len());
    let (hex, query) = rest.split_at(64);
    format!("{prefix}{}{query}", hex.to_uppercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_are_checked_included_once_and_the_missing_listed() {
    within(120, async {
        let stack = Stack::start().await;
        let store = stack.store();
        let text = Bytes::from("a caption, said again and again\n".repeat(3000));
        let text_hex = store.add_attachment(text.clone(), "text/plain");
        let png = Bytes::from([b"\x89PNG\r\n\x1a\n".to_vec(), noise(50_000, 7)].concat());
        let png_hex = store.add_attachment(png.clone(), "image/png");
        let corrupt_hex = hex_sha256(b"the bytes the link promises");
        store.add_attachment_as(&corrupt_hex, Bytes::from_static(b"other bytes"), "application/octet-stream");
        let absent_hex = hex_sha256(b"never stored");
        let link = |hex: &str| Value::Text(attachment_link(hex, "application/octet-stream"));
        let png_link = attachment_link(&png_hex, "image/png");
        let a = Value::Map(vec![
            ("still".into(), Value::Text(png_link.clone())),
            ("caption".into(), Value::Text(format!("hash://sha256/{text_hex}"))),
        ]);
        let nested = Value::Array(vec![Value::Map(vec![("x".into(), Value::Text(upper(&png_link)))])]);
        let b =
            Value::Map(vec![("nested".into(), nested), (link(&corrupt_hex), "a link as a map key".into())]);
        let c = Value::Array(vec![link(&absent_hex), link(&corrupt_hex)]);
        let d = Value::Text(format!("not a link: hash://sha256/{text_hex}"));
        let records = [("a", a), ("b", b), ("c", c), ("d", d)];
        let c = collection("datasets", "alice", "media");
        store.write(&c, records.iter().map(|(id, v)| (id.to_string(), Some(cbor(v)))).collect());
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = dir.path().join("media.zip");
        let path = "/export/datasets/alice:media/zip?attachments=true";
        download(&stack, path, &archive).await;

        let entries = read_with_every_reader(&archive, Depth::Hashed).await;
        assert_fixed_metadata(&entries);
        let tail: Vec<&str> = entries.iter().skip(8).map(|e| e.name.as_str()).collect();
        let mut found = [png_hex.clone(), text_hex.clone()];
        found.sort();
        let expected_tail = [
            format!("attachments/{}", found[0]),
            format!("attachments/{}", found[1]),
            "missing-attachments.json".into(),
        ];
        assert_eq!(tail, expected_tail, "each good attachment once, in link order, then the report");
        for e in entries.iter().filter(|e| e.name.starts_with("attachments/")) {
            assert_eq!(Some(e.name["attachments/".len()..].to_owned()), e.sha256, "content matches its hash");
        }
        let method = |hex: &str| entries.iter().find(|e| e.name.ends_with(hex)).map(|e| e.method);
        assert_eq!(method(&text_hex), Some(8), "text is deflated");
        assert_eq!(method(&png_hex), Some(0), "a PNG is stored");

        let report =
            run("unzip", &["-p", archive.to_str().expect("UTF-8"), "missing-attachments.json"]).await;
        let report: serde_json::Value = serde_json::from_str(&report).expect("the report is JSON");
        let summary: Vec<(String, String, serde_json::Value)> = report
            .as_array()
            .expect("a list")
            .iter()
            .map(|m| {
                (
                    m["hash"].as_str().expect("hash").to_owned(),
                    m["reason"].as_str().expect("reason").to_owned(),
                    m["recordIDs"].clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (corrupt_hex.clone(), "hash_mismatch".to_owned(), serde_json::json!(["b", "c"])),
                (absent_hex.clone(), "not_found".to_owned(), serde_json::json!(["c"])),
            ]
        );
        let fetches = |hex: &str| {
            let path = format!("/attachments/{hex}");
            store.request_log().iter().filter(|r| r.path == path).count()
        };
        assert_eq!(
            (fetches(&png_hex), fetches(&corrupt_hex), fetches(&absent_hex)),
            (1, 1, 1),
            "fetched once each"
        );

        let again = dir.path().join("again.zip");
        download(&stack, path, &again).await;
        let (first, second) =
            (std::fs::read(&archive).expect("first"), std::fs::read(&again).expect("second"));
        assert!(first == second, "the same collection version gives the same bytes");
    })
    .await;
}

/// With a content coding, records are stored (the coding compresses across entries): the
/// decoded archive holds the same entries as the identity one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coded_response_carries_the_same_entries_stored() {
    within(60, async {
        let stack = Stack::start().await;
        let c = collection("datasets", "alice", "coded");
        let records = (0..50).map(|i| (format!("r{i}"), Some(cbor(&tricky_value(i, "coded"))))).collect();
        stack.store().write(&c, records);
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = dir.path().join("plain.zip");
        download(&stack, "/export/datasets/alice:coded/zip", &plain).await;
        let plain = read_with_every_reader(&plain, Depth::Hashed).await;
        let json: Vec<&Entry> = plain.iter().filter(|e| e.name.starts_with("json/")).collect();
        assert!(json.len() == 50 && json.iter().all(|e| e.method == 8), "identity: JSON is deflated");

        let url = stack.url("/export/datasets/alice:coded/zip");
        let response = stack.client.get(url).header("accept-encoding", "gzip").send().await.expect("sent");
        assert_eq!(response.headers()["content-encoding"], "gzip");
        assert_eq!(response.headers()["vary"], "accept-encoding");
        let body = response.bytes().await.expect("gzip body");
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut decoded)
            .expect("gunzip");
        let coded = dir.path().join("coded.zip");
        std::fs::write(&coded, decoded).expect("write");
        let coded = read_with_every_reader(&coded, Depth::Hashed).await;
        assert!(coded.iter().all(|e| e.method == 0), "gzip: entries are stored");
        let view = |entries: &[Entry]| -> Vec<(String, Option<String>)> {
            entries.iter().map(|e| (e.name.clone(), e.sha256.clone())).collect()
        };
        assert_eq!(view(&coded), view(&plain));
    })
    .await;
}

#[tokio::test]
async fn errors_before_the_archive_are_json_and_head_has_no_body() {
    within(60, async {
        let stack = Stack::start().await;
        let c = collection("datasets", "alice", "small");
        stack.store().write(&c, vec![("x".into(), Some(cbor(&Value::Integer(1.into()))))]);
        let (status, code, _) =
            error_body(stack.get("/export/datasets/alice:small/zip?attachments=yes").await).await;
        assert_eq!((status, code.as_str()), (400, "bad_request"));
        let (status, code, _) = error_body(stack.get("/export/datasets/nobody:nothing/zip").await).await;
        assert_eq!((status, code.as_str()), (404, "not_found"));

        let private = collection("datasets", "alice", "private");
        stack.store().write(&private, vec![("x".into(), Some(cbor(&Value::Integer(2.into()))))]);
        stack.store().protect(&private, Some("secret".into()));
        let (status, _, _) = error_body(stack.get("/export/datasets/alice:private/zip").await).await;
        assert_eq!(status, 401);
        let allowed = stack
            .client
            .get(stack.url("/export/datasets/alice:private/zip"))
            .header("authorization", "Bearer secret")
            .send()
            .await
            .expect("sent");
        assert_eq!(allowed.status(), 200);
        assert!(allowed.bytes().await.expect("archive").starts_with(b"PK\x03\x04"));

        let head =
            stack.client.head(stack.url("/export/datasets/alice:small/zip")).send().await.expect("sent");
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["content-type"], "application/zip");
        assert!(head.headers().contains_key("x-version"));
        assert!(head.bytes().await.expect("no body").is_empty());
    })
    .await;
}

#[tokio::test]
async fn a_record_failure_breaks_the_download() {
    within(60, async {
        let stack = Stack::start().await;
        let c = collection("datasets", "alice", "broken");
        let good = (0..20).map(|i| (format!("r{i:02}"), Some(cbor(&tricky_value(i, "ok"))))).collect();
        stack.store().write(&c, good);
        stack.store().put_raw(&c, "r10x", Bytes::from_static(&[0x82, 0x01]));
        let response = stack.get("/export/datasets/alice:broken/zip").await;
        assert_eq!(response.status(), 200, "the head leaves before the records are fetched");
        assert!(response.bytes().await.is_err(), "malformed CBOR: no terminating chunk");
        assert!(stack.sidecar.wait_for_log("r10x").await, "the log names the record");

        stack.store().put_raw(&c, "r10x", cbor(&Value::Integer(3.into())));
        // A new version, so the record cache cannot answer for it.
        stack.store().write(&c, vec![("r05".into(), Some(cbor(&tricky_value(5, "new"))))]);
        stack.store().set_fault(&c, "r05", Some(RecordFault::Status(500)));
        let response = stack.get("/export/datasets/alice:broken/zip").await;
        assert_eq!(response.status(), 200);
        assert!(response.bytes().await.is_err(), "U2 500: no terminating chunk");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_records_need_zip64_and_every_reader_reads_them() {
    within(240, async {
        let stack = Stack::start().await;
        let c = collection("datasets", "bulk", "many");
        let records = (0..40_000)
            .map(|i| {
                let value = Value::Map(vec![
                    ("n".into(), Value::Integer(i.into())),
                    ("name".into(), Value::Text(format!("record number {i}"))),
                    ("tags".into(), Value::Array(vec!["alpha".into(), "beta".into()])),
                ]);
                (format!("rec-{i:05}"), Some(cbor(&value)))
            })
            .collect();
        stack.store().write(&c, records);
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = dir.path().join("many.zip");
        let started = Instant::now();
        download(&stack, "/export/datasets/bulk:many/zip", &archive).await;
        let elapsed = started.elapsed();
        let size = std::fs::metadata(&archive).expect("archive").len();
        eprintln!(
            "40,000 records: {size} bytes in {elapsed:.2?} ({:.1} MB/s), sidecar peak RSS {} KiB",
            size as f64 / 1e6 / elapsed.as_secs_f64(),
            peak_rss_kib(stack.sidecar.pid())
        );
        let bytes = std::fs::read(&archive).expect("archive");
        let locator = &bytes[bytes.len() - 42..bytes.len() - 22];
        assert_eq!(&locator[..4], b"PK\x06\x07", "a ZIP64 end record locator before the end record");
        assert_eq!(
            &bytes[bytes.len() - 22 + 10..bytes.len() - 22 + 12],
            [0xFF, 0xFF],
            "entry count sentinel"
        );
        drop(bytes);

        let entries = read_with_every_reader(&archive, Depth::Full).await;
        assert_eq!(entries.len(), 80_000);
        assert_eq!(entries[0].name, "json/rec-00000.json");
        assert_eq!(entries[79_999].name, "cbor/rec-39999.cbor");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300_mb_attachment_streams_in_flat_memory_and_leaves_no_spool() {
    within(240, async {
        let (stack, spool, _config) = stack_with_spool_dir().await;
        let block = noise(1 << 20, 300);
        let mut blob = Vec::with_capacity(300 << 20);
        for i in 0..300u32 {
            blob.extend_from_slice(&i.to_le_bytes());
            blob.extend_from_slice(&block[4..]);
        }
        let hex = stack.store().add_attachment(Bytes::from(blob), "video/mp4");
        let c = collection("datasets", "alice", "film");
        let value = Value::Map(vec![("video".into(), Value::Text(attachment_link(&hex, "video/mp4")))]);
        stack.store().write(&c, vec![("clip".into(), Some(cbor(&value)))]);
        let dir = tempfile::tempdir().expect("temp dir");
        let archive = dir.path().join("film.zip");
        download(&stack, "/export/datasets/alice:film/zip", &archive).await;
        let before = peak_rss_kib(stack.sidecar.pid());

        let started = Instant::now();
        download(&stack, "/export/datasets/alice:film/zip?attachments=true", &archive).await;
        let elapsed = started.elapsed();
        let after = peak_rss_kib(stack.sidecar.pid());
        let size = std::fs::metadata(&archive).expect("archive").len();
        eprintln!(
            "300 MB attachment: {size} bytes in {elapsed:.2?} ({:.1} MB/s), sidecar peak RSS {before} -> {after} KiB",
            size as f64 / 1e6 / elapsed.as_secs_f64()
        );
        assert!(after - before < 64 * 1024, "peak RSS grew by {} KiB for a 300 MB attachment", after - before);
        assert_eq!(spool_files(spool.path()), 0, "the spool file is removed once written");

        let entries = read_with_every_reader(&archive, Depth::Hashed).await;
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        let attachment = format!("attachments/{hex}");
        assert_eq!(names, ["json/clip.json", "cbor/clip.cbor", attachment.as_str(), "missing-attachments.json"]);
        assert_eq!(entries[2].sha256.as_deref(), Some(hex.as_str()));
        assert_eq!((entries[2].size, entries[2].method), (300 << 20, 0), "video is stored");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_archive_leaves_no_spool_files() {
    within(120, async {
        let (stack, spool, _config) = stack_with_spool_dir().await;
        let links: Vec<Value> = (0..3)
            .map(|i| {
                let hex = stack.store().add_attachment(Bytes::from(noise(24 << 20, 40 + i)), "video/mp4");
                Value::Text(attachment_link(&hex, "video/mp4"))
            })
            .collect();
        let c = collection("datasets", "alice", "films");
        stack.store().write(&c, vec![("clips".into(), Some(cbor(&Value::Array(links))))]);

        let mut response = stack.get("/export/datasets/alice:films/zip?attachments=true").await;
        assert_eq!(response.status(), 200);
        let mut received = 0;
        while received < 4 << 20 {
            received += response.chunk().await.expect("body").expect("more body").len();
        }
        assert!(spool_files(spool.path()) > 0, "attachments are spooled while the archive is sent");
        drop(response);

        let deadline = Instant::now() + Duration::from_secs(10);
        while spool_files(spool.path()) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(spool_files(spool.path()), 0, "every spool file is removed when the client leaves");
        assert!(stack.sidecar.wait_for_log("client_gone").await, "{}", stack.sidecar.log());
    })
    .await;
}

/// CRC-32 of `len` zero bytes, by combining the CRCs of doubling blocks (no 4 GiB pass).
fn crc_of_zeros(len: u64) -> u32 {
    let mut power = flate2::Crc::new();
    power.update(&vec![0; 1 << 20]);
    let mut total = flate2::Crc::new();
    let mut mebibytes = len >> 20;
    while mebibytes > 0 {
        if mebibytes & 1 == 1 {
            total.combine(&power);
        }
        let mut doubled = flate2::Crc::new();
        doubled.combine(&power);
        doubled.combine(&power);
        power = doubled;
        mebibytes >>= 1;
    }
    total.update(&vec![0; (len & 0xF_FFFF) as usize]);
    total.sum()
}

/// The ZIP64 sizes and offsets an export reaches only past 4 GiB, written by the export's own
/// writer into a sparse file (the 4 GiB entry is a hole), read by all four readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip64_sizes_and_offsets_past_4_gib_are_read_by_every_reader() {
    within(240, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("big.zip");
        let mut file = std::fs::File::create(&path).expect("create");
        let mut zip = ZipWriter::new();
        let mut out = Vec::new();
        let big = (4 << 30) + 16;
        let meta = EntryMeta {
            name: "big.bin".into(),
            method: Method::Stored,
            crc32: crc_of_zeros(big),
            compressed_size: big,
            size: big,
        };
        zip.begin_entry(meta, &mut out).expect("header");
        file.write_all(&out).expect("write header");
        file.seek(SeekFrom::Current(big as i64)).expect("skip the zeros");
        out.clear();
        let after = b"after 4 GiB\n";
        let mut crc = flate2::Crc::new();
        crc.update(after);
        let meta = EntryMeta {
            name: "after.txt".into(),
            method: Method::Stored,
            crc32: crc.sum(),
            compressed_size: 12,
            size: 12,
        };
        zip.add_entry(meta, after, &mut out).expect("entry");
        zip.finish().write_end(&mut out);
        file.write_all(&out).expect("write the rest");
        drop(file);

        let entries = read_with_every_reader(&path, Depth::UnzipTests("after.txt")).await;
        let view: Vec<(&str, u64)> = entries.iter().map(|e| (e.name.as_str(), e.size)).collect();
        assert_eq!(view, [("big.bin", big), ("after.txt", 12)]);
        assert_fixed_metadata(&entries);
    })
    .await;
}
