//! Listing-order fetching with bounded concurrency, where an item that needs no I/O (a cache
//! hit, a tombstone) skips the future machinery whenever nothing is queued ahead of it.

use futures::future::{self, Either};
use futures::stream::FuturesOrdered;
use std::future::Future;

/// One item of the plan: already at hand, or still to be fetched.
pub enum Step<T, F> {
    Ready(T),
    Fetch(F),
}

/// Items in plan order with at most `limit` fetches in flight. A warm export is all `Ready`
/// steps, and then costs no task allocation or waker traffic per record.
pub struct InOrder<T, F: Future<Output = T>> {
    queue: FuturesOrdered<Either<future::Ready<T>, F>>,
    limit: usize,
}

impl<T, F: Future<Output = T>> InOrder<T, F> {
    pub fn new(limit: usize) -> Self {
        InOrder { queue: FuturesOrdered::new(), limit: limit.max(1) }
    }

    /// Takes steps from `next` until `limit` fetches are queued or the plan ends. Returns an
    /// item at once when it is ready with nothing queued ahead of it; otherwise the caller
    /// awaits `queued()`, which yields `None` once the plan is done.
    pub fn fill(&mut self, mut next: impl FnMut() -> Option<Step<T, F>>) -> Option<T> {
        while self.queue.len() < self.limit {
            match next()? {
                Step::Ready(item) if self.queue.is_empty() => return Some(item),
                Step::Ready(item) => self.queue.push_back(Either::Left(future::ready(item))),
                Step::Fetch(fetch) => self.queue.push_back(Either::Right(fetch)),
            }
        }
        None
    }

    pub fn queued(&mut self) -> &mut FuturesOrdered<Either<future::Ready<T>, F>> {
        &mut self.queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

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
        let mut order = InOrder::new(8);
        let mut out = Vec::new();
        loop {
            match order.fill(|| steps.next()) {
                Some(item) => out.push(item),
                None => match order.queued().next().await {
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
