//! The benchmark harness at a smoke size: it must keep running and write every table's figures.
//! Speeds are not asserted (these machines are shared); the harness is where they are read.

use std::process::Command;

/// Runs the harness with `args`; returns what it printed and the JSON it wrote.
fn run_bench(args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let output = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let results = serde_json::from_slice(&std::fs::read(&json).expect("JSON written")).expect("valid JSON");
    (stdout, results)
}

#[test]
fn bench_exports_runs_at_a_smoke_size_and_writes_every_figure() {
    let (stdout, results) = run_bench(&[
        "exports",
        "--records",
        "300",
        "--repeat",
        "1",
        "--attachments",
        "2",
        "--passthrough-seconds",
        "0.3",
        "--passthrough-rounds",
        "2",
        "--connections",
        "4",
        "--rss-records",
        "600",
        "--saturated-records",
        "200",
    ]);
    for table in [
        "Exports",
        "working on 4 records at once",
        "CBOR → JSON",
        "Zip with attachments",
        "Pass-through",
        "Peak RSS",
    ] {
        assert!(stdout.contains(table), "table {table} printed:\n{stdout}");
    }
    for encoding in ["cbor", "json", "json-lines"] {
        let figures = &results["encodings"][encoding];
        for run in ["cold", "warm"] {
            assert_eq!(figures[run]["records"], 300, "{encoding} {run}");
            assert!(figures[run]["bytes"].as_u64().is_some_and(|b| b > 300), "{encoding} {run}");
        }
    }
    assert!(results["direct"]["records_per_second"].as_f64().is_some_and(|r| r > 0.0));
    for window in ["adaptive", "fixed"] {
        let figures = &results["saturated"]["windows"][window];
        assert!(figures["records_per_second"].as_f64().is_some_and(|r| r > 0.0), "{window}");
        assert!(figures["most_waiting"].as_u64().is_some(), "{window}");
    }
    assert!(results["zip"]["bytes"].as_u64().is_some_and(|b| b > 2 << 20), "two 1 MiB attachments");
    for target in ["direct to the upstream", "through export-sidecar", "bare pingora proxy"] {
        let rounds = results["passthrough"]["targets"][target].as_array().expect(target);
        assert_eq!(rounds.len(), 2, "{target}: one sample per round");
        assert!(
            rounds.iter().all(|r| r["requests_per_second"].as_f64().is_some_and(|r| r > 0.0)),
            "{target}"
        );
    }
    for process in ["through export-sidecar", "bare pingora proxy", "sidecar, exports running"] {
        let cpu = &results["passthrough"]["targets"][process][0]["cpu_us_per_request"];
        assert!(cpu.as_f64().is_some_and(|us| us >= 0.0), "{process}: CPU time read from /proc");
    }
    assert!(results["peak_rss"]["peak_rss_kib"].as_u64().is_some_and(|k| k > 0));
}

#[test]
fn bench_events_runs_at_a_smoke_size_and_writes_every_figure() {
    let (_, results) = run_bench(&["events", "--subscribers", "20", "--records", "50", "--rounds", "2"]);
    // At this size the RSS growth may round to nothing; it only has to be there.
    assert!(results["bytes_per_idle_subscriber"].as_f64().is_some(), "{results}");
    for figure in ["last_delivery_p99_ms", "floor_delivery_p50_ms", "floor_last_delivery_p99_ms"] {
        assert!(results[figure].as_f64().is_some_and(|v| v > 0.0), "{figure} in {results}");
    }
}
