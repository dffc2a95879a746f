//! Graceful shutdown: SIGTERM stops accepting (pingora) and the process exits as soon as no
//! request is in flight, instead of always sleeping out the whole grace period.

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch};
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// pingora's signal handling, plus: after SIGTERM, exit once nothing is in flight. Event
/// streams end themselves within a second of shutdown starting, so they do not hold it up.
pub struct DrainThenExit {
    pub in_flight: InFlight,
}

/// Time for event streams to notice the shutdown and end cleanly before the count is read.
const SETTLE: Duration = Duration::from_millis(1500);

#[async_trait]
impl ShutdownSignalWatch for DrainThenExit {
    async fn recv(&self) -> ShutdownSignal {
        let signal = UnixShutdownSignalWatch.recv().await;
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
