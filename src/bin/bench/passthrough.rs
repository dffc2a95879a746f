//! `bench exports`' pass-through table: small GETs straight to the upstream, through the
//! sidecar, a bare pingora proxy and nginx, measured in interleaved rounds.

use crate::harness::{cell, median, Table};
use crate::load::{self, LoadResult};
use serde_json::json;
use std::net::SocketAddr;

/// How the load is applied to each target.
pub struct Shape {
    pub connections: usize,
    pub seconds: f64,
    pub rounds: usize,
}

/// One target of the comparison and how to read its CPU time.
pub struct Target<'a> {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub cpu_seconds: Box<dyn Fn() -> Option<f64> + 'a>,
}

/// A target's samples, one per round.
pub struct Measured {
    pub name: &'static str,
    pub rounds: Vec<LoadResult>,
}

/// Loads every target once per round, in turn, so that a slow spell of a shared machine falls
/// on all of them rather than on whichever ran then.
pub async fn rounds(targets: &[Target<'_>], path: &str, shape: &Shape) -> Result<Vec<Measured>, String> {
    let mut measured: Vec<Measured> =
        targets.iter().map(|t| Measured { name: t.name, rounds: Vec::new() }).collect();
    for _ in 0..shape.rounds {
        for (target, samples) in targets.iter().zip(&mut measured) {
            let result = load::run(target.addr, path, shape.connections, shape.seconds, &*target.cpu_seconds);
            samples.rounds.push(result.await?);
        }
    }
    Ok(measured)
}

/// The table (medians over rounds; the ratio to nginx is the median of each round's ratio,
/// with its range) and the JSON of every sample.
pub fn report(measured: &[Measured], shape: &Shape) -> (Table, serde_json::Value) {
    let nginx = measured.iter().find(|m| m.name.contains("nginx"));
    let rows = measured.iter().map(|m| row(m, nginx)).collect();
    let header = vec!["target", "requests/s", "p50 ms", "p99 ms", "CPU µs/request", "vs nginx", "range"];
    let targets: serde_json::Map<_, _> = measured
        .iter()
        .map(|m| {
            let samples: Vec<_> = m
                .rounds
                .iter()
                .map(|r| {
                    json!({
                        "requests_per_second": r.requests_per_second, "p50_ms": r.p50_ms,
                        "p99_ms": r.p99_ms, "cpu_us_per_request": r.cpu_us_per_request,
                    })
                })
                .collect();
            (m.name.to_string(), json!(samples))
        })
        .collect();
    let results = json!({
        "connections": shape.connections, "seconds": shape.seconds, "rounds": shape.rounds, "targets": targets,
    });
    (Table { header, rows }, results)
}

fn row(m: &Measured, nginx: Option<&Measured>) -> Vec<String> {
    let of = |f: fn(&LoadResult) -> Option<f64>| {
        let values: Vec<f64> = m.rounds.iter().filter_map(f).collect();
        (!values.is_empty()).then(|| median(values))
    };
    let rate = |r: &LoadResult| r.requests_per_second;
    // A target measured in every round is compared round by round, one measured once with
    // nginx's median.
    let ratios: Vec<f64> = match nginx {
        Some(n) if n.rounds.len() == m.rounds.len() => {
            m.rounds.iter().zip(&n.rounds).map(|(r, n)| rate(r) / rate(n)).collect()
        }
        Some(n) => {
            let nginx_median = median(n.rounds.iter().map(rate).collect());
            m.rounds.iter().map(|r| rate(r) / nginx_median).collect()
        }
        None => Vec::new(),
    };
    let range = match ratios.iter().copied().reduce(f64::min).zip(ratios.iter().copied().reduce(f64::max)) {
        Some((low, high)) if ratios.len() > 1 => format!("{low:.2}–{high:.2}"),
        _ => String::new(),
    };
    vec![
        m.name.to_string(),
        cell(of(|r| Some(r.requests_per_second)), 0),
        cell(of(|r| Some(r.p50_ms)), 3),
        cell(of(|r| Some(r.p99_ms)), 3),
        cell(of(|r| r.cpu_us_per_request), 1),
        cell((!ratios.is_empty()).then(|| median(ratios)), 2),
        range,
    ]
}
