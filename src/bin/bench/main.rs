//! Benchmark harness: runs the reference server and the real sidecar binary on loopback and
//! prints tables of measurements (also written as JSON). See the README for the commands.

mod dataset;
mod events;
mod exports;
mod harness;
mod load;
mod passthrough;
mod proxies;
mod saturated;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// The sidecar uses mimalloc (many small buffers live and die per record fetched); so does
/// the harness, so that its direct client and reference server are measured alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "bench", about = "Measures export-sidecar against the reference dataset server")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Export throughput against direct fetches, the record cache, CBOR→JSON conversion, zip,
    /// pass-through against nginx, and peak memory of a large export.
    Exports(exports::ExportArgs),
    /// Idle event-stream subscribers: sidecar memory per subscriber and change → delivery latency.
    Events {
        /// Subscribers held open on one collection.
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Records in the collection (every event lists them all).
        #[arg(long, default_value_t = 1_000)]
        records: usize,
        /// Changes to time.
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// Subscribers connected at a time (each waits for its first event before the next
        /// batch): a burst measures the connect storm, small batches the cost of holding.
        #[arg(long, default_value_t = 10_000)]
        batch: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "bench-events.json")]
        json: PathBuf,
    },
    /// The bare fan-out server `events` compares the sidecar with, run as its own process:
    /// prints its address, then sends every subscriber an event per version read from stdin.
    #[command(hide = true)]
    FloorServer {
        #[arg(long)]
        records: usize,
    },
    /// The bare pingora proxy `exports` compares the sidecar's pass-through with.
    #[command(hide = true)]
    PingoraFloor {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long)]
        threads: usize,
    },
}

fn main() -> Result<(), String> {
    let cli = Cli::parse();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    match cli.command {
        Bench::Exports(args) => runtime.block_on(exports::exports(args)),
        Bench::Events { subscribers, records, rounds, batch, json } => {
            runtime.block_on(events::events(subscribers, records, rounds, batch.max(1), json))
        }
        Bench::FloorServer { records } => runtime.block_on(events::floor_server(records)),
        // pingora builds runtimes of its own; the one above stays idle.
        Bench::PingoraFloor { listen, upstream, threads } => {
            proxies::run_pingora_floor(listen, upstream, threads)
        }
    }
}
