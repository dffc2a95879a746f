//! Graceful shutdown: SIGTERM marks the sidecar as draining (`/readyz` fails), then stops
//! accepting (pingora), and the process exits as soon as no request is in flight.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Set once SIGTERM arrives; readiness reports it so load balancers stop sending traffic.
#[derive(Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    pub fn start(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// pingora's signal handling, plus: SIGTERM first marks the process draining and keeps serving
/// for `delay` (so readiness fails before the listeners close), then lets pingora stop
/// accepting, and exits once nothing is in flight. Event streams end themselves within a
/// second of shutdown starting, so they do not hold it up.
pub struct DrainThenExit {
    pub in_flight: InFlight,
    pub draining: Draining,
    pub delay: Duration,
}

/// Time for event streams to notice the shutdown and end cleanly before the count is read.
const SETTLE: Duration = Duration::from_millis(1500);

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
    std::process::exit(0);
}
