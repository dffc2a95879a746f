//! `bench exports`: export throughput against the physical limit (fetching the same records
//! straight from the reference server), the record cache, conversion, zip, pass-through, RSS.

use crate::dataset;
use crate::harness::{cell, median, write_json, SidecarProcess, Table};
use crate::load::{self, LoadResult};
use crate::passthrough::{self, Target};
use crate::proxies::ProxyProcess;
use crate::saturated;
use bytes::Bytes;
use export_sidecar::codec::json::{JsonConverter, JsonStyle};
use export_sidecar::reference::{attachment_link, CollectionId, ReferenceConfig, ReferenceServer};
use export_sidecar::upstream::{parse_listing, ListingEntry};
use futures::stream::{self, StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Empty};
use serde_json::json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `bench exports` measures, and how big.
#[derive(clap::Args)]
pub struct ExportArgs {
    /// Records in the collection exported.
    #[arg(long, default_value_t = 100_000)]
    records: usize,
    /// Approximate CBOR size of each record, in bytes.
    #[arg(long, default_value_t = 1_000)]
    record_bytes: usize,
    /// Runs of each measurement; the table shows the median.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    repeat: usize,
    /// Attachments (1 MiB each) in the zip measurement.
    #[arg(long, default_value_t = 40)]
    attachments: usize,
    /// Seconds of load per pass-through target and round.
    #[arg(long, default_value_t = 3.0, value_parser = positive_seconds)]
    passthrough_seconds: f64,
    /// Rounds of the pass-through comparison; each loads every target once, in turn.
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    passthrough_rounds: usize,
    /// Concurrent keep-alive connections of the pass-through load.
    #[arg(long, default_value_t = 32, value_parser = at_least_one)]
    connections: usize,
    /// The record cache's size for the cold and warm exports: by default room for the whole
    /// collection in both its CBOR and JSON forms, which is what "warm" means.
    #[arg(long, default_value_t = 1 << 30)]
    cache_bytes: u64,
    /// Records exported from a dataset server working on few records at once, with the
    /// adaptive and with a fixed fetch window.
    #[arg(long, default_value_t = 10_000)]
    saturated_records: usize,
    /// Measurements to leave out: any of saturated, conversion, zip, passthrough, rss.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<Part>,
    /// Records in the collection whose json-lines export's peak RSS is measured; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    rss_records: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-exports.json")]
    json: PathBuf,
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse() {
        Ok(0) | Err(_) => Err("expected a whole number of at least 1".into()),
        Ok(n) => Ok(n),
    }
}

fn positive_seconds(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(seconds) if seconds > 0.0 && seconds.is_finite() => Ok(seconds),
        _ => Err("expected a number of seconds above 0".into()),
    }
}

/// The measurements after the export table, each of which can be skipped.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Saturated,
    Conversion,
    Zip,
    Passthrough,
    Rss,
}

const ENCODINGS: [&str; 3] = ["cbor", "json", "json-lines"];

/// One timed transfer.
#[derive(Clone, Copy)]
pub struct Transfer {
    records: usize,
    bytes: u64,
    seconds: f64,
}

impl Transfer {
    pub fn records_per_second(&self) -> f64 {
        self.records as f64 / self.seconds
    }

    fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }

    /// The median of runs, by time (all runs move the same records).
    fn median(runs: &[Transfer]) -> Transfer {
        let seconds = median(runs.iter().map(|r| r.seconds).collect());
        let bytes = median(runs.iter().map(|r| r.bytes as f64).collect()) as u64;
        Transfer { records: runs[0].records, bytes, seconds }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "records": self.records, "bytes": self.bytes, "seconds": self.seconds,
            "records_per_second": self.records_per_second(), "mb_per_second": self.megabytes_per_second(),
        })
    }
}

pub async fn exports(args: ExportArgs) -> Result<(), String> {
    let reference = ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), ReferenceConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    let data = CollectionId::new("datasets", "bench", "data");
    seed(&reference, &data, args.records, args.record_bytes);
    let concurrency = export_sidecar::config::Config::default().upstream.concurrency;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let journal = dir.path().join("journal.sqlite");
    let client =
        reqwest::Client::builder().pool_max_idle_per_host(1024).build().map_err(|e| e.to_string())?;
    println!(
        "{} records of ~{} bytes, up to {concurrency} fetches in flight, record cache of {} MB, median of {} runs",
        args.records,
        args.record_bytes,
        args.cache_bytes / 1_000_000,
        args.repeat
    );

    let (direct, runs) = cold_and_warm(&args, &client, &reference, &journal).await?;
    let wanted = |part: Part| !args.skip.contains(&part);
    let saturated = match wanted(Part::Saturated) {
        true => {
            Some(saturated::measure(&reference, args.saturated_records, args.record_bytes, dir.path()).await?)
        }
        false => None,
    };
    let conversion = wanted(Part::Conversion).then(|| conversion(&reference, &data));
    let zip = match wanted(Part::Zip) {
        true => Some(zip(&args, &reference, &journal).await?),
        false => None,
    };
    let passthrough = match wanted(Part::Passthrough) {
        true => Some(passthrough(&args, &reference, &data, &journal).await?),
        false => None,
    };
    let rss = match wanted(Part::Rss) && args.rss_records > 0 {
        true => Some(peak_rss(&args, &client, &reference, dir.path()).await?),
        false => None,
    };

    let results = json!({
        "records": args.records, "record_bytes": args.record_bytes, "concurrency": concurrency,
        "direct": direct.json(),
        "encodings": ENCODINGS.iter().zip(&runs).map(|(e, run)| {
            let figures = json!({
                "cold": run.cold.json(), "warm": run.warm.json(), "first_warm": run.first_warm.json(),
                "cold_to_direct": run.cold_to_direct, "warm_to_cold": run.warm_to_cold,
            });
            (e.to_string(), figures)
        }).collect::<serde_json::Map<_, _>>(),
        "cache_bytes": args.cache_bytes,
        "saturated": saturated.as_ref().map(|s| &s.1),
        "conversion": conversion.as_ref().map(|c| &c.1),
        "zip": zip.map(|z| z.json()),
        "passthrough": passthrough.as_ref().map(|p| &p.1),
        "peak_rss": rss.as_ref().map(|r| &r.1),
    });
    export_table(direct, &runs)
        .print("Exports (records/s and output MB/s; ratios: cold to direct, warm to cold)");
    if let Some((table, _)) = saturated {
        table.print(&saturated::title());
    }
    if let Some((table, _)) = conversion {
        table.print("CBOR → JSON conversion of the same records, in memory");
    }
    if let Some(zip) = zip {
        zip_table(zip).print("Zip with attachments");
    }
    if let Some((table, _)) = passthrough {
        table.print("Pass-through: GET of one small record");
    }
    if let Some((table, _)) = rss {
        table.print("Peak RSS of the sidecar during a json-lines export (record cache off)");
    }
    write_json(&args.json, &results)
}

pub fn seed(reference: &ReferenceServer, collection: &CollectionId, records: usize, size: usize) {
    let values = (0..records).map(|i| (dataset::record_id(i), Some(dataset::record(i, size)))).collect();
    reference.store().write(collection, values);
}

async fn repeat<F, Fut>(times: usize, mut run: F) -> Result<Transfer, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Transfer, String>>,
{
    let mut runs = Vec::new();
    for _ in 0..times {
        runs.push(run().await?);
    }
    Ok(Transfer::median(&runs))
}

/// The limit for a cold export: the listing, then every record from U2 in order with the
/// sidecar's concurrency, bytes counted and dropped.
async fn direct_fetch(
    client: &reqwest::Client,
    reference: &ReferenceServer,
    collection: &CollectionId,
    concurrency: usize,
) -> Result<Transfer, String> {
    let started = Instant::now();
    let base =
        format!("{}/{}/{}:{}/records/", reference.url(), collection.realm, collection.user, collection.name);
    let entries = listing(client, &base).await?;
    let records = entries.len();
    let fetches = stream::iter(entries).map(|entry| {
        let url = format!("{base}{}", entry.id);
        async move {
            let response = client.get(url).header("accept", "application/cbor").send().await?;
            response.bytes().await.map(|b| b.len() as u64)
        }
    });
    let bytes = fetches.buffered(concurrency).try_fold(0, |sum, n| async move { Ok(sum + n) }).await;
    let bytes = bytes.map_err(|e| e.to_string())?;
    Ok(Transfer { records, bytes, seconds: started.elapsed().as_secs_f64() })
}

async fn listing(client: &reqwest::Client, url: &str) -> Result<Vec<ListingEntry>, String> {
    let response =
        client.get(url).header("accept", "application/cbor").send().await.map_err(|e| e.to_string())?;
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    parse_listing(&body, false).map_err(|e| e.to_string())
}

/// One export through the sidecar, body counted and dropped. The connection is driven by the
/// task that reads the body: with reqwest, whose connection runs on a task of its own, warm
/// JSON exports read at 1.1 or 1.7 GB/s by the luck of where the two tasks ran, and the
/// client, not the sidecar, set the warm figures.
pub async fn export(url: &str, records: usize) -> Result<Transfer, String> {
    let started = Instant::now();
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?.to_string();
    let (mut sender, connection) = load::handshake(&authority).await?;
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, &authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let read = async {
        let response = sender.send_request(request).await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let mut body = response.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("{url}: {e}"))?;
            bytes += frame.data_ref().map_or(0, |data| data.len() as u64);
        }
        Ok(bytes)
    };
    let bytes = tokio::select! {
        bytes = read => bytes?,
        ended = connection => return Err(format!("{url}: connection ended early: {ended:?}")),
    };
    Ok(Transfer { records, bytes, seconds: started.elapsed().as_secs_f64() })
}

/// One encoding's figures: medians of its runs, and medians of the per-run ratios (each cold
/// export against a direct fetch made just before it, each warm one against its cold one), so
/// load from elsewhere on the machine moves both sides of a ratio alike.
struct EncodingRuns {
    cold: Transfer,
    warm: Transfer,
    /// The first warm export after the cold one, before the allocator has warmed up too.
    first_warm: Transfer,
    cold_to_direct: f64,
    warm_to_cold: f64,
}

/// Per encoding and run: a direct fetch, a cold export from a freshly started sidecar (empty
/// record cache; the journal already knows the version, as it does for every export after a
/// collection's first), then a warm one from the same process.
async fn cold_and_warm(
    args: &ExportArgs,
    client: &reqwest::Client,
    reference: &ReferenceServer,
    journal: &Path,
) -> Result<(Transfer, Vec<EncodingRuns>), String> {
    let data = CollectionId::new("datasets", "bench", "data");
    let concurrency = export_sidecar::config::Config::default().upstream.concurrency;
    let config = journal.with_file_name("cache.toml");
    std::fs::write(&config, format!("[cache]\nmax_bytes = {}\n", args.cache_bytes))
        .map_err(|e| e.to_string())?;
    let with_cache = ["--config".to_owned(), config.display().to_string()];
    {
        let primer = SidecarProcess::start(&reference.url(), journal, &[]).await?;
        export(&primer.url("/export/datasets/bench:data?encoding=cbor"), args.records).await?;
    }
    let (mut directs, mut encodings) = (Vec::new(), Vec::new());
    for encoding in ENCODINGS {
        let path = format!("/export/datasets/bench:data?encoding={encoding}");
        let (mut colds, mut warms, mut firsts, mut to_direct, mut to_cold) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeat {
            let direct = direct_fetch(client, reference, &data, concurrency).await?;
            let sidecar = SidecarProcess::start(&reference.url(), journal, &with_cache).await?;
            let cold = export(&sidecar.url(&path), args.records).await?;
            // Three in a row: the first after start also pays for first-touch page faults of
            // buffers the allocator has not handed out before; the median is the steady state.
            let mut again = Vec::new();
            for _ in 0..3 {
                again.push(export(&sidecar.url(&path), args.records).await?);
            }
            let warm = Transfer::median(&again);
            to_direct.push(direct.seconds / cold.seconds);
            to_cold.push(cold.seconds / warm.seconds);
            firsts.push(again[0]);
            directs.push(direct);
            colds.push(cold);
            warms.push(warm);
        }
        encodings.push(EncodingRuns {
            cold: Transfer::median(&colds),
            warm: Transfer::median(&warms),
            first_warm: Transfer::median(&firsts),
            cold_to_direct: median(to_direct),
            warm_to_cold: median(to_cold),
        });
    }
    Ok((Transfer::median(&directs), encodings))
}

fn export_table(direct: Transfer, runs: &[EncodingRuns]) -> Table {
    let row = |name: String, t: Transfer, ratio: Option<f64>, target: &str| {
        let rate = cell(Some(t.records_per_second()), 0);
        vec![name, rate, cell(Some(t.megabytes_per_second()), 1), cell(ratio, 2), target.to_owned()]
    };
    let mut rows = vec![row("direct (listing + U2 each)".into(), direct, Some(1.0), "")];
    for (encoding, run) in ENCODINGS.iter().zip(runs) {
        rows.push(row(format!("cold {encoding}"), run.cold, Some(run.cold_to_direct), "≥ 0.90"));
    }
    for (encoding, run) in ENCODINGS.iter().zip(runs) {
        rows.push(row(format!("warm {encoding}"), run.warm, Some(run.warm_to_cold), "≥ 10"));
    }
    // The second export is the first to touch fresh memory for its buffers.
    for (encoding, run) in ENCODINGS.iter().zip(runs) {
        let ratio = run.cold.seconds / run.first_warm.seconds;
        rows.push(row(format!("second {encoding}"), run.first_warm, Some(ratio), ""));
    }
    Table { header: vec!["run", "records/s", "MB/s", "ratio", "target"], rows }
}

/// Our CBOR→JSON converter over every record's bytes, against serde_json writing the same
/// values already parsed into memory (its best case: no CBOR to read).
fn conversion(reference: &ReferenceServer, collection: &CollectionId) -> (Table, serde_json::Value) {
    let values: Vec<bytes::Bytes> =
        reference.store().records(collection).into_iter().map(|(_, _, v)| v).collect();
    let mut converter = JsonConverter::new();
    let mut out = Vec::with_capacity(1 << 20);
    let mut parsed = Vec::with_capacity(values.len());
    for value in &values {
        out.clear();
        if converter.convert(value, JsonStyle::Compact, &mut out).is_ok() {
            parsed.push(serde_json::from_slice::<serde_json::Value>(&out).unwrap_or_default());
        }
    }
    let ours = time_output(|out| {
        for value in &values {
            let _ = converter.convert(value, JsonStyle::Compact, out);
            drain_if_full(out);
        }
    });
    let theirs = time_output(|out| {
        for value in &parsed {
            let _ = serde_json::to_writer(&mut *out, value);
            drain_if_full(out);
        }
    });
    let row = |name: &str, (seconds, bytes): (f64, u64), ratio: f64| {
        let rate = cell(Some(values.len() as f64 / seconds), 0);
        vec![name.to_owned(), rate, cell(Some(bytes as f64 / 1e6 / seconds), 1), cell(Some(ratio), 2)]
    };
    let rows = vec![
        row("export-sidecar CBOR → JSON", ours, theirs.0 / ours.0),
        row("serde_json::to_writer(Value)", theirs, 1.0),
    ];
    let results = json!({
        "records": values.len(),
        "converter": {"seconds": ours.0, "bytes": ours.1},
        "serde_json": {"seconds": theirs.0, "bytes": theirs.1},
    });
    (Table { header: vec!["converter", "records/s", "MB/s out", "speed vs serde_json"], rows }, results)
}

/// Times `work` writing into a buffer that is emptied whenever it holds a chunk, as an export's is.
fn time_output(mut work: impl FnMut(&mut Vec<u8>)) -> (f64, u64) {
    let mut out = Vec::with_capacity(1 << 20);
    let before = written();
    let started = Instant::now();
    work(&mut out);
    let seconds = started.elapsed().as_secs_f64();
    count(out.len());
    (seconds, written() - before)
}

thread_local! {
    static WRITTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn written() -> u64 {
    WRITTEN.get()
}

fn count(bytes: usize) {
    WRITTEN.set(WRITTEN.get() + bytes as u64);
}

fn drain_if_full(out: &mut Vec<u8>) {
    if out.len() >= 1 << 20 {
        count(out.len());
        out.clear();
    }
}

/// A zip with attachments: records that link `args.attachments` blobs of 1 MiB (each linked
/// twice, incompressible like most media), through the sidecar.
async fn zip(args: &ExportArgs, reference: &ReferenceServer, journal: &Path) -> Result<Transfer, String> {
    let media = CollectionId::new("datasets", "bench", "media");
    let mut records = Vec::new();
    for i in 0..args.attachments {
        let hex = reference.store().add_attachment(dataset::blob(i, 1 << 20), "application/octet-stream");
        let link = attachment_link(&hex, "application/octet-stream");
        for copy in 0..2 {
            let value = ciborium::Value::Map(vec![
                (ciborium::Value::Text("file".into()), ciborium::Value::Text(link.clone())),
                (ciborium::Value::Text("copy".into()), ciborium::Value::Integer(copy.into())),
            ]);
            let mut bytes = Vec::new();
            ciborium::into_writer(&value, &mut bytes).map_err(|e| e.to_string())?;
            records.push((format!("m{i:05}-{copy}"), Some(bytes::Bytes::from(bytes))));
        }
    }
    let count = records.len();
    reference.store().write(&media, records);
    let sidecar = SidecarProcess::start(&reference.url(), journal, &[]).await?;
    let url = sidecar.url("/export/datasets/bench:media/zip?attachments=true");
    repeat(args.repeat, || export(&url, count)).await
}

fn zip_table(zip: Transfer) -> Table {
    let rows = vec![vec![
        zip.records.to_string(),
        cell(Some(zip.bytes as f64 / 1e6), 1),
        cell(Some(zip.seconds), 2),
        cell(Some(zip.megabytes_per_second()), 1),
    ]];
    Table { header: vec!["records", "archive MB", "seconds", "MB/s"], rows }
}

/// Pass-through load on a sidecar that is also running JSON exports of the whole collection
/// back to back: what a long export costs the requests beside it.
async fn while_exporting(
    sidecar: &SidecarProcess,
    path: &str,
    args: &ExportArgs,
) -> Result<LoadResult, String> {
    let (url, records) = (sidecar.url(EXPORTED), args.records);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let exporting = tokio::spawn(async move {
        while !*stopped.borrow() {
            export(&url, records).await?;
        }
        Ok::<(), String>(())
    });
    let cpu = || sidecar.cpu_seconds();
    let measured = load::run(sidecar.public, path, args.connections, args.passthrough_seconds, &cpu).await;
    stop.send_replace(true);
    exporting.await.map_err(|e| e.to_string())??;
    measured
}

/// The export `while_exporting` repeats.
const EXPORTED: &str = "/export/datasets/bench:data?encoding=json";

/// Requests/s, latency and CPU per request of one small record straight from the upstream,
/// through the sidecar (alone and while exporting), through a bare pingora proxy, and through
/// nginx (skipped with a note when nginx is not installed).
async fn passthrough(
    args: &ExportArgs,
    reference: &ReferenceServer,
    collection: &CollectionId,
    journal: &Path,
) -> Result<(Table, serde_json::Value), String> {
    let path = format!(
        "/{}/{}:{}/records/{}",
        collection.realm,
        collection.user,
        collection.name,
        dataset::record_id(1)
    );
    let sidecar = SidecarProcess::start(&reference.url(), journal, &[]).await?;
    let threads = export_sidecar::config::Config::default().threads();
    let floor = ProxyProcess::pingora_floor(reference.addr(), threads).await?;
    let nginx =
        ProxyProcess::nginx(reference.addr()).await.inspect_err(|why| println!("\nnginx skipped: {why}"));
    let mut targets = vec![
        Target { name: "direct to the upstream", addr: reference.addr(), cpu_seconds: Box::new(|| None) },
        Target {
            name: "through export-sidecar",
            addr: sidecar.public,
            cpu_seconds: Box::new(|| sidecar.cpu_seconds()),
        },
        Target {
            name: "bare pingora proxy",
            addr: floor.addr,
            cpu_seconds: Box::new(|| floor.cpu_seconds()),
        },
    ];
    if let Ok(nginx) = &nginx {
        targets.push(Target {
            name: "through nginx",
            addr: nginx.addr,
            cpu_seconds: Box::new(|| nginx.cpu_seconds()),
        });
    }
    let shape = passthrough::Shape {
        connections: args.connections,
        seconds: args.passthrough_seconds,
        rounds: args.passthrough_rounds,
    };
    let mut measured = passthrough::rounds(&targets, &path, &shape).await?;
    let exporting = while_exporting(&sidecar, &path, args).await?;
    measured.insert(2, passthrough::Measured { name: "sidecar, exports running", rounds: vec![exporting] });
    println!(
        "\n({} keep-alive connections; {} rounds of {} s per target, interleaved; medians)",
        shape.connections, shape.rounds, shape.seconds
    );
    Ok(passthrough::report(&measured, &shape))
}

/// The sidecar's peak RSS while a large collection streams out as json-lines, against the
/// target of twice the listing's size in memory plus 64 MB.
async fn peak_rss(
    args: &ExportArgs,
    client: &reqwest::Client,
    reference: &ReferenceServer,
    dir: &Path,
) -> Result<(Table, serde_json::Value), String> {
    let big = CollectionId::new("datasets", "bench", "big");
    seed(reference, &big, args.rss_records, args.record_bytes);
    let listing_url = format!("{}/datasets/bench:big/records/", reference.url());
    let entries = listing(client, &listing_url).await?;
    let listing_bytes = entries.capacity() * std::mem::size_of::<ListingEntry>()
        + entries.iter().map(|e| e.id.capacity() + e.version.capacity()).sum::<usize>();
    drop(entries);
    let config = dir.join("rss.toml");
    std::fs::write(&config, "[cache]\nmax_bytes = 0\n").map_err(|e| e.to_string())?;
    let extra = ["--config".to_owned(), config.display().to_string()];
    let sidecar = SidecarProcess::start(&reference.url(), &dir.join("rss-journal.sqlite"), &extra).await?;
    let idle = sidecar.rss_kib();
    let transfer =
        export(&sidecar.url("/export/datasets/bench:big?encoding=json-lines"), args.rss_records).await?;
    let peak = sidecar.peak_rss_kib();
    let limit = 2.0 * listing_bytes as f64 / 1e6 + 64.0;
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    let rows = vec![vec![
        args.rss_records.to_string(),
        cell(Some(listing_bytes as f64 / 1e6), 1),
        cell(Some(mb(idle)), 1),
        cell(Some(mb(peak)), 1),
        cell(Some(limit), 1),
        cell(Some(transfer.seconds), 1),
    ]];
    let header = vec!["records", "listing MB", "idle RSS MB", "peak RSS MB", "limit MB", "export s"];
    let results = json!({
        "records": args.rss_records, "listing_bytes": listing_bytes, "idle_rss_kib": idle,
        "peak_rss_kib": peak, "limit_mb": limit, "export": transfer.json(),
    });
    Ok((Table { header, rows }, results))
}
