//! `bench exports`' saturated-server part: one export from a dataset server that works on only a
//! few records at once, with the adaptive fetch window and with a fixed one of the same maximum.

use crate::exports::{export, seed, Transfer};
use crate::harness::{cell, SidecarProcess, Table};
use export_sidecar::reference::{Capacity, CapacityStats, CollectionId, ReferenceServer};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Records the reference server works on at once, and how long each takes, in this part.
const SLOTS: usize = 4;
const SERVICE: Duration = Duration::from_millis(1);

/// Exports `records` records as json-lines (record cache off) through a sidecar with each kind
/// of window while the reference server's capacity is limited; lifts the limit afterwards.
pub async fn measure(
    reference: &ReferenceServer,
    records: usize,
    record_bytes: usize,
    dir: &Path,
) -> Result<(Table, serde_json::Value), String> {
    let busy = CollectionId::new("datasets", "bench", "busy");
    seed(reference, &busy, records, record_bytes);
    let mut rows = Vec::new();
    let mut figures = serde_json::Map::new();
    for (name, adaptive) in [("adaptive", true), ("fixed", false)] {
        let config = dir.join(format!("saturated-{name}.toml"));
        let text = format!("[cache]\nmax_bytes = 0\n[upstream]\nadaptive_concurrency = {adaptive}\n");
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let extra = ["--config".to_owned(), config.display().to_string()];
        let sidecar =
            SidecarProcess::start(&reference.url(), &dir.join(format!("saturated-{name}.sqlite")), &extra)
                .await?;
        let capacity = Arc::new(Capacity::new(SLOTS, SERVICE));
        reference.store().limit_capacity(Some(Arc::clone(&capacity)));
        let run = export(&sidecar.url("/export/datasets/bench:busy?encoding=json-lines"), records).await;
        reference.store().limit_capacity(None);
        let (run, stats) = (run?, capacity.stats());
        rows.push(row(name, &run, &stats));
        figures.insert(name.into(), figure(&run, &stats));
    }
    let header = vec!["window", "records/s", "mean wait for a slot ms", "most waiting"];
    Ok((Table { header, rows }, json!({ "slots": SLOTS, "service_ms": 1, "windows": figures })))
}

fn row(name: &str, run: &Transfer, stats: &CapacityStats) -> Vec<String> {
    vec![
        name.to_owned(),
        cell(Some(run.records_per_second()), 0),
        cell(Some(stats.mean_wait.as_secs_f64() * 1e3), 2),
        stats.most_waiting.to_string(),
    ]
}

fn figure(run: &Transfer, stats: &CapacityStats) -> serde_json::Value {
    json!({
        "records_per_second": run.records_per_second(),
        "mean_wait_ms": stats.mean_wait.as_secs_f64() * 1e3,
        "most_waiting": stats.most_waiting,
    })
}

/// The table's title, with the server's capacity.
pub fn title() -> String {
    format!(
        "Dataset server working on {SLOTS} records at once, {} ms each: adaptive against fixed fetch window",
        SERVICE.as_millis()
    )
}
