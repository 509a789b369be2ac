//! The bulkhead of a service: at most `max_concurrent_requests` in flight, plus at most
//! `max_queued_requests` waiting up to `queue_timeout` for a slot; anything beyond is refused at
//! once with 503 `overloaded`, so one slow service cannot hold every connection and task.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(crate) struct Bulkhead {
    max: usize,
    slots: Arc<Semaphore>,
    max_queue: usize,
    queued: AtomicUsize,
    queue_timeout: Duration,
}

/// A service's `max_concurrent_requests`, `max_queued_requests` and `queue_timeout`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    max: usize,
    max_queue: usize,
    queue_timeout: Duration,
}

/// Bulkhead settings that make no bulkhead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BulkheadConfigError {
    #[error("max_concurrent_requests must be at least 1")]
    Zero,
    #[error("max_queued_requests needs max_concurrent_requests")]
    QueueWithoutLimit,
}

impl Limits {
    /// `None` when the service has no bulkhead (`max_concurrent_requests` unset).
    pub(crate) fn from_config(
        max: Option<usize>,
        max_queue: usize,
        queue_timeout: Duration,
    ) -> Result<Option<Self>, BulkheadConfigError> {
        match max {
            Some(0) => Err(BulkheadConfigError::Zero),
            Some(max) => Ok(Some(Limits {
                max,
                max_queue,
                queue_timeout,
            })),
            None if max_queue > 0 => Err(BulkheadConfigError::QueueWithoutLimit),
            None => Ok(None),
        }
    }
}

impl Bulkhead {
    pub(crate) fn new(l: Limits) -> Self {
        Bulkhead {
            max: l.max,
            slots: Arc::new(Semaphore::new(l.max)),
            max_queue: l.max_queue,
            queued: AtomicUsize::new(0),
            queue_timeout: l.queue_timeout,
        }
    }

    /// A slot, or `None` when the service is full.
    pub(crate) async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        let queued = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if queued.is_err() {
            return None;
        }
        let got =
            tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned()).await;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        got.ok().and_then(Result::ok)
    }

    /// Slots taken now.
    pub(crate) fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// `max_concurrent_requests`.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn full_bulkhead_refuses_or_queues_with_a_timeout() {
        let b = Arc::new(Bulkhead::new(
            Limits::from_config(Some(2), 1, Duration::from_millis(100))
                .unwrap()
                .unwrap(),
        ));
        let p1 = b.acquire().await.unwrap();
        let _p2 = b.acquire().await.unwrap();
        // One may queue; it gets the slot freed within the timeout.
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire().await.is_some() })
        };
        tokio::task::yield_now().await;
        // The queue is full: refused at once.
        assert!(b.acquire().await.is_none());
        drop(p1);
        assert!(waiter.await.unwrap());
        // A queued request that waits too long is refused.
        let b2 = Bulkhead::new(
            Limits::from_config(Some(1), 1, Duration::from_millis(100))
                .unwrap()
                .unwrap(),
        );
        let _hold = b2.acquire().await.unwrap();
        let start = tokio::time::Instant::now();
        assert!(b2.acquire().await.is_none());
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
