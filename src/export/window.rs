//! The fetch window of one export: how many record fetches it keeps in flight. It grows while
//! the dataset server answers about as fast as when idle, and shrinks when its latency climbs.

use std::time::Duration;

/// Fetches in flight when an export starts, before any latency is known: low, so the first
/// latencies say what the dataset server needs when it is not queueing.
const START: f64 = 4.0;
/// Weight of each new latency in the recent average (about the last ten fetches).
const RECENT_WEIGHT: f64 = 0.1;
/// Fetches averaged before the baseline is first taken; the first ones also open connections.
const WARM_UP: u64 = 10;
/// Recent latency up to this multiple of the baseline counts as a server that keeps up. On a
/// shared machine, loopback latency doubles from 4 to 32 fetches in flight while throughput
/// still rises; with 2 here the window hovered near 15 and cold JSON exports lost 15 %.
const TOLERANCE: f64 = 3.0;
/// Fetches added to the window's target on every answer: with the gradient at 1 the window
/// grows by `SMOOTHING × GROWTH` per fetch, from `START` to 32 in about 140 fetches.
const GROWTH: f64 = 1.0;
/// Weight of each new estimate in the window, so one slow answer does not halve it.
const SMOOTHING: f64 = 0.2;

/// The window of one export; `FetchWindow::new` gives the template each export copies.
#[derive(Clone, Debug)]
pub struct FetchWindow {
    max: f64,
    size: f64,
    adaptive: bool,
    /// Seconds, averaged over the last fetches.
    recent: f64,
    /// Seconds: the lowest recent average this export has seen. It never rises: a server
    /// that got busier after the export started gets fewer fetches from it, which is the point.
    baseline: f64,
    fetches: u64,
}

impl FetchWindow {
    /// A window of at most `max` fetches; a fixed one when `adaptive` is false.
    pub fn new(max: usize, adaptive: bool) -> FetchWindow {
        let max = max.max(1) as f64;
        let size = if adaptive { START.min(max) } else { max };
        FetchWindow { max, size, adaptive, recent: 0.0, baseline: 0.0, fetches: 0 }
    }

    /// Fetches the export may have in flight now.
    pub fn size(&self) -> usize {
        self.size as usize
    }

    /// Takes one finished fetch's latency, from sending the request to the whole record.
    ///
    /// The window moves toward `size × gradient + GROWTH`, where the gradient is 1 while recent
    /// latency is within `TOLERANCE` of the baseline and down to ½ as it exceeds it: a server
    /// that keeps up lets the window grow to the maximum; one that queues gets fewer fetches
    /// until its latency comes back down. A server working on `k` records at once settles at
    /// about `TOLERANCE × max(k, START) + GROWTH` fetches.
    pub fn record(&mut self, latency: Duration) {
        if !self.adaptive {
            return;
        }
        let latency = latency.as_secs_f64().max(1e-6);
        self.fetches += 1;
        if self.fetches == 1 {
            self.recent = latency;
            return;
        }
        self.recent += RECENT_WEIGHT * (latency - self.recent);
        if self.fetches < WARM_UP {
            return;
        }
        self.baseline = match self.fetches {
            WARM_UP => self.recent,
            _ => self.baseline.min(self.recent),
        };
        let gradient = (TOLERANCE * self.baseline / self.recent).clamp(0.5, 1.0);
        let target = self.size * gradient + GROWTH;
        self.size = (self.size + SMOOTHING * (target - self.size)).clamp(1.0, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dataset server that works on `slots` records at once, each for `service`: beyond
    /// `slots` fetches in flight, latency grows with the window.
    fn saturated(window: &FetchWindow, slots: f64, service: f64) -> Duration {
        Duration::from_secs_f64(service * (window.size / slots).max(1.0))
    }

    fn run(window: &mut FetchWindow, fetches: usize, mut latency: impl FnMut(&FetchWindow) -> Duration) {
        for _ in 0..fetches {
            let latency = latency(window);
            window.record(latency);
        }
    }

    #[test]
    fn a_fixed_window_never_moves() {
        let mut window = FetchWindow::new(32, false);
        assert_eq!(window.size(), 32);
        run(&mut window, 1000, |w| saturated(w, 2.0, 0.005));
        assert_eq!(window.size(), 32);
    }

    #[test]
    fn a_server_that_keeps_up_gets_the_whole_window_soon() {
        let mut window = FetchWindow::new(32, true);
        assert_eq!(window.size(), 4, "starts small");
        run(&mut window, 200, |_| Duration::from_micros(300));
        assert_eq!(window.size(), 32);
    }

    #[test]
    fn noise_within_tolerance_keeps_the_window_whole() {
        let mut window = FetchWindow::new(32, true);
        let mut n = 0u64;
        run(&mut window, 5000, |_| {
            n += 1;
            Duration::from_micros(if n.is_multiple_of(7) { 450 } else { 250 })
        });
        assert_eq!(window.size(), 32);
    }

    /// What loopback on a shared two-core machine looked like in `bench exports`: latency
    /// rises about 2.4 times between 4 and 32 fetches in flight, yet throughput (window ÷
    /// latency) still rises all the way, so the window must not stop halfway.
    #[test]
    fn latency_that_rises_slower_than_the_window_keeps_it_whole() {
        let mut window = FetchWindow::new(32, true);
        run(&mut window, 2000, |w| Duration::from_secs_f64(60e-6 * (1.0 + w.size / 16.0)));
        assert_eq!(window.size(), 32);
    }

    #[test]
    fn a_saturated_server_gets_a_window_near_its_capacity() {
        let mut window = FetchWindow::new(32, true);
        run(&mut window, 5000, |w| saturated(w, 4.0, 0.002));
        let size = window.size();
        assert!((4..=16).contains(&size), "window {size} for a server working on 4 at once");
        run(&mut window, 20_000, |w| saturated(w, 4.0, 0.002));
        let later = window.size();
        assert!((4..=16).contains(&later), "window crept from {size} to {later} while saturated");
    }

    #[test]
    fn the_window_grows_back_when_latency_recovers() {
        let mut window = FetchWindow::new(32, true);
        run(&mut window, 2000, |w| saturated(w, 2.0, 0.002));
        assert!(window.size() < 16, "window {} while saturated", window.size());
        run(&mut window, 200, |_| Duration::from_millis(2));
        assert_eq!(window.size(), 32);
    }

    #[test]
    fn a_window_of_one_stays_one() {
        let mut window = FetchWindow::new(1, true);
        run(&mut window, 100, |_| Duration::from_micros(100));
        assert_eq!(window.size(), 1);
        run(&mut window, 100, |_| Duration::from_millis(100));
        assert_eq!(window.size(), 1);
    }
}
