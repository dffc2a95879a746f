//! The `export-sidecar` command: `run` in front of a dataset server, `demo` with the reference
//! server embedded, `reference` to run the reference server alone.

use clap::{Args, Parser, Subcommand};
use export_sidecar::config::{Config, LogFormat};
use export_sidecar::reference::{seed_demo, ReferenceConfig, ReferenceServer, DEMO_TOKEN};
use export_sidecar::server;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "export-sidecar",
    version,
    about = "Streamed exports, pull-sync and a change feed in front of a dataset server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar in front of a dataset server.
    Run(RunArgs),
    /// Start a reference dataset server with sample data and the sidecar in front of it.
    Demo(DemoArgs),
    /// Run only the reference dataset server (for trying clients and for benchmarks).
    Reference(ReferenceArgs),
}

/// Flags override the config file; the config file overrides the built-in defaults. The
/// environment variables stand in for absent flags: Kubernetes injects settings that way.
#[derive(Args)]
struct RunArgs {
    /// proxy.toml to read; without it the documented defaults apply.
    #[arg(long, value_name = "FILE", env = "EXPORT_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// The dataset server's base URL, e.g. http://127.0.0.1:3000.
    #[arg(long, value_name = "URL", env = "EXPORT_SIDECAR_UPSTREAM")]
    upstream: Option<String>,
    /// Public listener address.
    #[arg(long, value_name = "ADDR", env = "EXPORT_SIDECAR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Internal listener address (webhooks, health, readiness, metrics; keep it on loopback).
    #[arg(long, value_name = "ADDR", env = "EXPORT_SIDECAR_INTERNAL_LISTEN")]
    internal_listen: Option<SocketAddr>,
    /// Version journal file (SQLite).
    #[arg(long, value_name = "PATH", env = "EXPORT_SIDECAR_JOURNAL")]
    journal: Option<PathBuf>,
    /// Standard Webhooks secret for incoming webhooks.
    #[arg(long, value_name = "S", env = "EXPORT_SIDECAR_WEBHOOK_SECRET", hide_env_values = true)]
    webhook_secret: Option<String>,
    /// Seconds between listing polls for servers without webhooks; 0 disables.
    #[arg(long, value_name = "SECONDS")]
    poll_interval: Option<u64>,
    /// Seconds between heartbeat comments on event streams.
    #[arg(long, value_name = "SECONDS")]
    sse_heartbeat: Option<u64>,
    /// Open event streams at most.
    #[arg(long, value_name = "N")]
    sse_max_connections: Option<usize>,
}

#[derive(Args)]
struct DemoArgs {
    /// Public listener of the demo sidecar.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Internal listener of the demo sidecar.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    internal_listen: SocketAddr,
}

#[derive(Args)]
struct ReferenceArgs {
    /// Address to serve the dataset API on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Load the demo collections.
    #[arg(long)]
    seed: bool,
    /// Where to send change webhooks.
    #[arg(long, value_name = "URL")]
    webhook_url: Option<String>,
    /// Standard Webhooks secret (whsec_…) to sign webhooks with.
    #[arg(long, value_name = "S")]
    webhook_secret: Option<String>,
}

/// Many small buffers live and die per record fetched; mimalloc handles that pattern with far
/// fewer instructions than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Reference(args) => reference(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("export-sidecar: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    apply_overrides(&mut config, args);
    config.validate().map_err(|e| e.to_string())?;
    init_logging(&config);
    server::run(&config).map_err(|e| e.to_string())
}

fn apply_overrides(config: &mut Config, args: RunArgs) {
    if let Some(url) = args.upstream {
        config.upstream.url = url;
    }
    if let Some(addr) = args.listen {
        config.listen.public = addr;
    }
    if let Some(addr) = args.internal_listen {
        config.listen.internal = addr;
    }
    if let Some(path) = args.journal {
        config.journal.path = path;
    }
    if let Some(secret) = args.webhook_secret {
        config.changes.webhook_secret = secret;
    }
    if let Some(seconds) = args.poll_interval {
        config.changes.poll_interval_seconds = seconds;
    }
    if let Some(seconds) = args.sse_heartbeat {
        config.events.heartbeat_seconds = seconds;
    }
    if let Some(max) = args.sse_max_connections {
        config.events.max_connections = max;
    }
}

/// Signs the demo reference server's webhooks, so the demo shows the verified path.
const DEMO_WEBHOOK_SECRET: &str = "whsec_ZXhwb3J0LXNpZGVjYXItZGVtby13ZWJob29rLXNlY3JldA==";

fn demo(args: DemoArgs) -> Result<(), String> {
    let mut config = Config::default();
    init_logging(&config);
    let runtime = reference_runtime()?;
    let reference_config = ReferenceConfig {
        webhook_url: Some(format!("http://{}/hooks/changes", args.internal_listen)),
        webhook_secret: Some(DEMO_WEBHOOK_SECRET.to_owned()),
    };
    let reference = runtime
        .block_on(ReferenceServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), reference_config))
        .map_err(|e| format!("cannot start the reference server: {e}"))?;
    config.upstream.url = reference.url();
    config.listen.public = args.listen;
    config.listen.internal = args.internal_listen;
    config.changes.webhook_secret = DEMO_WEBHOOK_SECRET.to_owned();
    config.changes.upstream_authorization = format!("Bearer {DEMO_TOKEN}");
    let journal_dir = demo_journal_dir()?;
    config.journal.path = journal_dir.path().join("journal.sqlite");
    config.validate().map_err(|e| e.to_string())?;
    server::check_listeners(&config).map_err(|e| e.to_string())?;
    // Seeded once the sidecar listens, so the seed's webhooks reach it.
    let store = reference.store().clone();
    runtime.spawn(async move {
        wait_for_listener(args.internal_listen).await;
        seed_demo(&store);
    });
    print_demo_help(&reference.url(), args.listen, args.internal_listen);
    let result = server::run(&config).map_err(|e| e.to_string());
    drop(runtime);
    drop(journal_dir);
    result
}

/// The demo's reference server starts empty, so versions from an earlier run would name other
/// states: each demo gets an empty journal in a directory of its own, removed when it ends
/// (also after SIGTERM), so a second demo (on other ports) never touches the first one's.
fn demo_journal_dir() -> Result<export_sidecar::shutdown::ScratchDir, String> {
    export_sidecar::shutdown::ScratchDir::new("export-sidecar-demo-")
        .map_err(|e| format!("cannot create a directory for the demo journal: {e}"))
}

async fn wait_for_listener(addr: SocketAddr) {
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn print_demo_help(upstream: &str, public: SocketAddr, internal: SocketAddr) {
    let base = format!("http://{public}");
    println!(
        "\nexport-sidecar demo\n\
         reference dataset server: {upstream}\n\
         sidecar (public):         {base}\n\
         sidecar (internal):       http://{internal}\n\n\
         Try:\n\
         \x20 curl -s '{base}/export/datasets/demo:animals?encoding=json-lines' | head -3\n\
         \x20 curl -s '{base}/export/datasets/demo:animals?encoding=json' | head -c 600; echo\n\
         \x20 curl -s '{base}/export/datasets/demo:animals?encoding=cbor' | wc -c\n\
         \x20 curl -s --compressed -D - -o /dev/null '{base}/export/lenses/demo:word-index?encoding=json'\n\
         \x20 curl -s -i '{base}/export/datasets/private:diary?encoding=json'\n\
         \x20 curl -s -H 'Authorization: Bearer demo-token' '{base}/export/datasets/private:diary?encoding=json-lines' | head -3\n\
         \x20 curl -s '{base}/datasets/demo:animals/records/' -H 'accept: application/json' | head -c 300; echo\n\
         \x20 curl -s http://{internal}/readyz\n\n\
         Ctrl-C stops it.\n"
    );
}

fn reference(args: ReferenceArgs) -> Result<(), String> {
    init_logging(&Config::default());
    let runtime = reference_runtime()?;
    runtime.block_on(async {
        let config = ReferenceConfig { webhook_url: args.webhook_url, webhook_secret: args.webhook_secret };
        let server = ReferenceServer::start(args.listen, config)
            .await
            .map_err(|e| format!("cannot start the reference server on {}: {e}", args.listen))?;
        if args.seed {
            seed_demo(server.store());
        }
        println!("reference dataset server on {}", server.url());
        tokio::signal::ctrl_c().await.map_err(|e| e.to_string())?;
        server.shutdown().await;
        Ok(())
    })
}

/// The reference server runs on a runtime of its own: pingora's server owns its runtimes and
/// must be started from a plain thread.
fn reference_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("reference")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
