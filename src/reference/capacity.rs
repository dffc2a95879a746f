//! A dataset server that works on only so many records at once (a test and benchmark hook):
//! record answers queue for a slot, hold it for a fixed service time, and the queue is measured.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use super::StopSignal;

/// Slots for record answers, set with [`Store::limit_capacity`](super::Store::limit_capacity).
/// Beyond `slots` requests at once, latency grows with every request added.
#[derive(Debug)]
pub struct Capacity {
    slots: Semaphore,
    service: Duration,
    waiting: AtomicUsize,
    most_waiting: AtomicUsize,
    served: AtomicU64,
    waited_micros: AtomicU64,
}

/// What the queue for slots looked like so far.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CapacityStats {
    /// Most record requests waiting for a slot at one time.
    pub most_waiting: usize,
    /// Record requests answered through a slot.
    pub served: u64,
    /// Mean time a request waited for its slot.
    pub mean_wait: Duration,
}

impl Capacity {
    pub fn new(slots: usize, service: Duration) -> Capacity {
        Capacity {
            slots: Semaphore::new(slots.max(1)),
            service,
            waiting: AtomicUsize::new(0),
            most_waiting: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            waited_micros: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CapacityStats {
        let served = self.served.load(Ordering::Relaxed);
        let waited = self.waited_micros.load(Ordering::Relaxed);
        CapacityStats {
            most_waiting: self.most_waiting.load(Ordering::Relaxed),
            served,
            mean_wait: Duration::from_micros(waited.checked_div(served).unwrap_or(0)),
        }
    }

    /// Waits for a slot and works for the service time; false when the server stopped first.
    pub(super) async fn serve(&self, stop: &StopSignal) -> bool {
        let queued = Instant::now();
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        self.most_waiting.fetch_max(waiting, Ordering::Relaxed);
        let slot = tokio::select! {
            slot = self.slots.acquire() => slot,
            () = stop.clone().wait() => return false,
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        self.waited_micros.fetch_add(queued.elapsed().as_micros() as u64, Ordering::Relaxed);
        tokio::select! {
            () = tokio::time::sleep(self.service) => {}
            () = stop.clone().wait() => return false,
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        drop(slot);
        true
    }
}
