//! Graceful shutdown: SIGTERM marks the sidecar as draining (`/readyz` fails), then stops
//! accepting (pingora), and the process exits as soon as no request is in flight.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Requests being handled, across every listener thread.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

/// One request's share of `InFlight`, released when the request's context is dropped.
pub struct InFlightGuard(Arc<AtomicUsize>);

impl InFlight {
    pub fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(Arc::clone(&self.0))
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// SIGTERM's two steps as the rest of the sidecar sees them: draining (readiness fails so load
/// balancers stop sending traffic; still serving) and then closing (event streams end).
#[derive(Clone, Default)]
pub struct Draining {
    draining: Arc<AtomicBool>,
    closing: CancellationToken,
}

impl Draining {
    pub fn start(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Listeners are about to stop: long-lived streams should end now.
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Resolves once `close` was called; one shared wake-up, however many streams wait.
    pub async fn closed(&self) {
        self.closing.cancelled().await;
    }
}

/// pingora's signal handling, plus: SIGTERM first marks the process draining and keeps serving
/// for `delay` (so readiness fails before the listeners close), then lets pingora stop
/// accepting, and exits once nothing is in flight. Event streams are told to end as accepting
/// stops, so they do not hold it up.
pub struct DrainThenExit {
    pub in_flight: InFlight,
    pub draining: Draining,
    pub delay: Duration,
}

/// Time for event streams to write their last bytes and leave before the count is read.
const SETTLE: Duration = Duration::from_millis(500);

#[async_trait]
impl ShutdownSignalWatch for DrainThenExit {
    async fn recv(&self) -> ShutdownSignal {
        let mut signal = UnixShutdownSignalWatch.recv().await;
        if matches!(signal, ShutdownSignal::GracefulTerminate) {
            self.draining.start();
            tracing::info!(delay_seconds = self.delay.as_secs(), "SIGTERM: draining");
            // A second signal during the delay (SIGINT, another SIGTERM) cuts it short.
            tokio::select! {
                () = tokio::time::sleep(self.delay) => {}
                next = UnixShutdownSignalWatch.recv() => signal = next,
            }
        }
        if matches!(signal, ShutdownSignal::GracefulTerminate) {
            self.draining.close();
            let in_flight = self.in_flight.clone();
            std::thread::spawn(move || exit_when_idle(&in_flight));
        }
        signal
    }
}

fn exit_when_idle(in_flight: &InFlight) {
    std::thread::sleep(SETTLE);
    while in_flight.count() > 0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("no request in flight; exiting");
    // `exit` runs no destructors; scratch directories would stay behind.
    for path in scratch_dirs().drain(..) {
        let _ = std::fs::remove_dir_all(path);
    }
    std::process::exit(0);
}

/// A temporary directory removed when dropped or when the process exits after SIGTERM (which
/// skips destructors, see `exit_when_idle`).
pub struct ScratchDir {
    path: std::path::PathBuf,
}

impl ScratchDir {
    pub fn new(prefix: &str) -> std::io::Result<ScratchDir> {
        let path = tempfile::Builder::new().prefix(prefix).tempdir()?.keep();
        scratch_dirs().push(path.clone());
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        scratch_dirs().retain(|p| p != &self.path);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn scratch_dirs() -> std::sync::MutexGuard<'static, Vec<std::path::PathBuf>> {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    DIRS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
