//! The process's Prometheus metrics, served as text on the internal listener's `/metrics`.
//! One registry for the process; modules record into it through `metrics::get()`.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::sync::OnceLock;

/// Every metric the sidecar exports (names get the `export_sidecar_` prefix).
pub struct Metrics {
    registry: Registry,
    /// Public requests by route (`export-records`, `export-zip`, `export-events`,
    /// `passthrough`) and status sent (`none` when the client left before a head).
    pub requests: IntCounterVec,
    /// Exports by kind (`records`, `event-stream`…) and outcome (`complete`, `failed`…).
    pub exports: IntCounterVec,
    /// Records written by record and zip exports, by kind (`cbor`, `json`, `json-lines`, `zip`).
    pub export_records: IntCounterVec,
    /// Body bytes sent by record and zip exports (after content coding), by kind.
    pub export_bytes: IntCounterVec,
    /// Record and zip exports from request to last byte, by kind. Event streams are left out:
    /// they last as long as their clients want.
    pub export_duration: HistogramVec,
    /// Record and zip exports running now, the count `export.max_concurrent` caps.
    pub exports_running: IntGauge,
    /// Requests to the dataset server, from sending to the response head, by request
    /// (`listing`, `record`, `attachment`).
    pub upstream_latency: HistogramVec,
    /// The fetch window of record and zip exports, observed at every record fetched: well
    /// below `upstream.concurrency`, the dataset server is queueing (`upstream.adaptive_concurrency`).
    pub fetch_window: Histogram,
    /// Failed requests to the dataset server by request and kind (`connect`, `connect_timeout`,
    /// `first_byte_timeout`, `idle_timeout`, `status`, `protocol`, `too_large`). Refusals
    /// (401, 403, 404) are the client's business and not counted.
    pub upstream_errors: IntCounterVec,
    /// Bytes of the journal's SQLite file and its write-ahead log, read at each scrape.
    pub journal_bytes: IntGauge,
    /// Webhooks by outcome: `accepted`, `duplicate`, or the reason they were refused.
    pub webhooks: IntCounterVec,
    /// Open event streams.
    pub subscribers: IntGauge,
    /// Events published (once per new version, whatever the number of subscribers).
    pub events_published: IntCounter,
    /// Events written to subscribers (merged ones count once).
    pub events_delivered: IntCounter,
    /// Events merged into a pending one because the subscriber was behind.
    pub pending_merges: IntCounter,
    /// Event streams ended, by reason (`client_gone`, `write_failed`, `lifetime`, `shutdown`).
    pub disconnects: IntCounterVec,
    /// From the change notice (webhook or poll) to an event reaching a subscriber.
    pub delivery_latency: Histogram,
    /// Record values served from the record cache, and fetched from U2 because they were not.
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    /// Bytes the record cache holds (values, keys and bookkeeping).
    pub cache_bytes: IntGauge,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics, created on first use.
pub fn get() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// Seconds, for latencies of single requests and events.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Fetches in flight, up to `upstream.concurrency`'s maximum.
const WINDOW_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0];
/// Seconds, for whole exports: from a small collection to an hour-long archive.
const EXPORT_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new_custom(Some("export_sidecar".into()), None).expect("valid prefix");
        let r = Registrar(&registry);
        Metrics {
            requests: r.counter_vec(
                "requests_total",
                "Public requests by route and status",
                &["route", "status"],
            ),
            exports: r.counter_vec("exports_total", "Exports by kind and outcome", &["kind", "outcome"]),
            export_records: r.counter_vec("export_records_total", "Records written by exports", &["kind"]),
            export_bytes: r.counter_vec("export_bytes_total", "Body bytes sent by exports", &["kind"]),
            export_duration: r.histogram_vec(
                "export_duration_seconds",
                "Record and zip exports, request to last byte",
                &["kind"],
                EXPORT_BUCKETS,
            ),
            exports_running: r.gauge("exports_running", "Record and zip exports running"),
            upstream_latency: r.histogram_vec(
                "upstream_latency_seconds",
                "Dataset server requests, sent to response head",
                &["request"],
                LATENCY_BUCKETS,
            ),
            fetch_window: r.histogram(
                "export_fetch_window",
                "Record fetches an export had in flight, at each record fetched",
                WINDOW_BUCKETS,
            ),
            upstream_errors: r.counter_vec(
                "upstream_errors_total",
                "Failed dataset server requests by request and kind",
                &["request", "kind"],
            ),
            journal_bytes: r.gauge("journal_bytes", "Bytes of the version journal on disk"),
            webhooks: r.counter_vec("webhooks_total", "Webhooks by outcome", &["outcome"]),
            subscribers: r.gauge("sse_subscribers", "Open event streams"),
            events_published: r.counter("sse_events_published_total", "Events published"),
            events_delivered: r.counter("sse_events_delivered_total", "Events written to subscribers"),
            pending_merges: r.counter("sse_pending_merges_total", "Events merged for slow subscribers"),
            disconnects: r.counter_vec(
                "sse_disconnects_total",
                "Event streams ended, by reason",
                &["reason"],
            ),
            delivery_latency: r.histogram(
                "sse_delivery_latency_seconds",
                "Change notice to event delivery",
                LATENCY_BUCKETS,
            ),
            cache_hits: r.counter("cache_hits_total", "Records served from the record cache"),
            cache_misses: r.counter("cache_misses_total", "Records fetched because they were not cached"),
            cache_bytes: r.gauge("cache_bytes", "Bytes held by the record cache"),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into memory fails only for invalid metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Creates metrics and registers each in the same step, so none can be left unregistered.
/// Names and labels are literals of this file, so creating them cannot fail at run time.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register<C: Collector + Clone + 'static>(&self, collector: C) -> C {
        self.0.register(Box::new(collector.clone())).expect("each metric is registered once");
        collector
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.register(IntCounter::new(name, help).expect("valid metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts).expect("valid metric"))
    }

    fn histogram_vec(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels).expect("valid metric"))
    }
}
