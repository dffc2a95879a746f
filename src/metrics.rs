//! The process's Prometheus metrics, served as text on the internal listener's `/metrics`.
//! One registry for the process; modules record into it through `metrics::get()`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    /// Exports by kind (`records`, `event-stream`…) and outcome (`complete`, `failed`…).
    pub exports: IntCounterVec,
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

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new_custom(Some("export_sidecar".into()), None).expect("valid prefix");
        let exports = counter_vec("exports_total", "Exports by kind and outcome", &["kind", "outcome"]);
        let webhooks = counter_vec("webhooks_total", "Webhooks by outcome", &["outcome"]);
        let subscribers = IntGauge::new("sse_subscribers", "Open event streams").expect("valid metric");
        let events_published =
            IntCounter::new("sse_events_published_total", "Events published").expect("valid metric");
        let events_delivered = IntCounter::new("sse_events_delivered_total", "Events written to subscribers")
            .expect("valid metric");
        let pending_merges =
            IntCounter::new("sse_pending_merges_total", "Events merged for slow subscribers")
                .expect("valid metric");
        let disconnects = counter_vec("sse_disconnects_total", "Event streams ended, by reason", &["reason"]);
        let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let delivery_latency = Histogram::with_opts(
            HistogramOpts::new("sse_delivery_latency_seconds", "Change notice to event delivery")
                .buckets(buckets),
        )
        .expect("valid metric");
        let cache_hits = IntCounter::new("cache_hits_total", "Records served from the record cache")
            .expect("valid metric");
        let cache_misses =
            IntCounter::new("cache_misses_total", "Records fetched because they were not cached")
                .expect("valid metric");
        let cache_bytes =
            IntGauge::new("cache_bytes", "Bytes held by the record cache").expect("valid metric");
        let metrics = Metrics {
            registry,
            exports,
            webhooks,
            subscribers,
            events_published,
            events_delivered,
            pending_merges,
            disconnects,
            delivery_latency,
            cache_hits,
            cache_misses,
            cache_bytes,
        };
        metrics.register();
        metrics
    }

    fn register(&self) {
        let collectors: [Box<dyn prometheus::core::Collector>; 11] = [
            Box::new(self.exports.clone()),
            Box::new(self.webhooks.clone()),
            Box::new(self.subscribers.clone()),
            Box::new(self.events_published.clone()),
            Box::new(self.events_delivered.clone()),
            Box::new(self.pending_merges.clone()),
            Box::new(self.disconnects.clone()),
            Box::new(self.delivery_latency.clone()),
            Box::new(self.cache_hits.clone()),
            Box::new(self.cache_misses.clone()),
            Box::new(self.cache_bytes.clone()),
        ];
        for collector in collectors {
            self.registry.register(collector).expect("each metric is registered once");
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

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}
