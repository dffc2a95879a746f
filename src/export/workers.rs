//! The threads export pipelines run on: single-threaded runtimes, each with its own upstream
//! client, so a pipeline and the connections it fetches over never wake another thread.

use crate::config::{ConfigError, UpstreamConfig};
use crate::upstream::Upstream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;

/// Where one export runs: a runtime's handle and the client whose pool lives on it.
#[derive(Clone)]
pub struct Worker {
    pub runtime: Handle,
    pub upstream: Upstream,
}

/// The export threads, handed out in turn; cheap to clone.
///
/// With pipelines on the listener's work-stealing threads every record fetched woke a task on
/// the other thread (cold exports at 0.76–0.97× a direct fetch). On the listener's threads
/// without stealing, an export held back every request accepted on its thread: pass-through
/// beside running exports fell to 10.6–11.3k requests/s with p99 8.1–8.8 ms. Threads of their
/// own keep cold exports at 0.99–1.14× direct and that pass-through at 18.7k, p99 5.0 ms.
#[derive(Clone)]
pub struct ExportWorkers {
    workers: Arc<[Worker]>,
    next: Arc<AtomicUsize>,
}

impl ExportWorkers {
    /// Starts `count` threads, each running a runtime for the life of the process.
    pub fn start(count: usize, upstream: &UpstreamConfig) -> Result<ExportWorkers, ConfigError> {
        let workers = (0..count.max(1))
            .map(|index| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| thread_failed(index, e))?;
                let handle = runtime.handle().clone();
                std::thread::Builder::new()
                    .name(format!("export-{index}"))
                    .spawn(move || runtime.block_on(std::future::pending::<()>()))
                    .map_err(|e| thread_failed(index, e))?;
                Ok(Worker { runtime: handle, upstream: Upstream::new(upstream)? })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(ExportWorkers { workers: workers.into(), next: Arc::new(AtomicUsize::new(0)) })
    }

    /// The worker the next export runs on.
    pub fn next(&self) -> Worker {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[index].clone()
    }
}

fn thread_failed(index: usize, e: std::io::Error) -> ConfigError {
    ConfigError::Invalid {
        key: "server.threads",
        message: format!("cannot start export thread {index}: {e}"),
    }
}
