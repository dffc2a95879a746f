//! Listing-order fetching within the export's fetch window, where an item that needs no I/O
//! (a cache hit, a tombstone) skips the future machinery whenever nothing is queued ahead of it.

use super::window::FetchWindow;
use crate::metrics;
use futures::future::{self, Either};
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

/// One item of the plan: already at hand, or still to be fetched.
pub enum Step<T, F> {
    Ready(T),
    Fetch(F),
}

/// An item as it leaves the queue, with its fetch's latency when it was fetched.
type Queued<T> = (T, Option<Duration>);

/// Items in plan order with at most the window's size of fetches in flight; as a `Stream` it
/// yields them in order and tells the window how long each fetch took. A warm export is all
/// `Ready` steps, and then costs no task allocation or waker traffic per record.
pub struct InOrder<T, F: Future<Output = T>> {
    queue: FuturesOrdered<Either<future::Ready<Queued<T>>, Timed<F>>>,
    window: FetchWindow,
}

impl<T, F: Future<Output = T>> InOrder<T, F> {
    pub fn new(window: FetchWindow) -> Self {
        InOrder { queue: FuturesOrdered::new(), window }
    }

    /// Takes steps from `next` until the window is full or the plan ends. Returns an item at
    /// once when it is ready with nothing queued ahead of it; otherwise the caller awaits the
    /// stream, which ends once the plan is done.
    pub fn fill(&mut self, mut next: impl FnMut() -> Option<Step<T, F>>) -> Option<T> {
        while self.queue.len() < self.window.size() {
            match next()? {
                Step::Ready(item) if self.queue.is_empty() => return Some(item),
                Step::Ready(item) => self.queue.push_back(Either::Left(future::ready((item, None)))),
                Step::Fetch(fetch) => self.queue.push_back(Either::Right(Timed { fetch, started: None })),
            }
        }
        None
    }
}

impl<T: Unpin, F: Future<Output = T>> Stream for InOrder<T, F> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        let Some((item, latency)) = ready!(this.queue.poll_next_unpin(cx)) else {
            return Poll::Ready(None);
        };
        if let Some(latency) = latency {
            this.window.record(latency);
            metrics::get().fetch_window.observe(this.window.size() as f64);
        }
        Poll::Ready(Some(item))
    }
}

pin_project! {
    /// A fetch that reports how long it took from its first poll, so time spent queued behind
    /// a slow client is not taken for the dataset server's latency.
    struct Timed<F> {
        #[pin]
        fetch: F,
        started: Option<Instant>,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = Queued<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(Instant::now);
        let item = ready!(this.fetch.poll(cx));
        Poll::Ready((item, Some(started.elapsed())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn order_is_kept_and_fetches_are_bounded() {
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut steps = (0..200u64).map(|i| -> Step<u64, BoxFuture<'static, u64>> {
            if i % 3 == 0 {
                return Step::Ready(i);
            }
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            Step::Fetch(Box::pin(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Later items finish first, so order has to be restored.
                tokio::time::sleep(Duration::from_micros(200 - i)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i
            }))
        });
        let mut order = InOrder::new(FetchWindow::new(8, false));
        let mut out = Vec::new();
        loop {
            match order.fill(|| steps.next()) {
                Some(item) => out.push(item),
                None => match order.next().await {
                    Some(item) => out.push(item),
                    None => break,
                },
            }
        }
        assert_eq!(out, (0..200).collect::<Vec<_>>());
        assert!(most.load(Ordering::SeqCst) <= 8, "at most 8 fetches at once");
        assert!(most.load(Ordering::SeqCst) > 1, "fetches overlap");
    }
}
