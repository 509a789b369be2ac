//! `[redis]`: the one Redis connection of a config, shared by what keeps state in Redis —
//! rate limit policies with `store = "redis"` (`rate_limit/redis.rs`), the response cache's
//! Redis tier (`cache/shared.rs`) and the operations of `reply = "async"` publish routes
//! (`backend/publish/operations.rs`). A store reached like a service, so it sits with them in
//! `upstream`. A resource, kept across reloads while `[redis]` is unchanged.
//!
//! One multiplexed connection (`redis::aio::ConnectionManager`, which reconnects by itself).
//! Each call has `[redis] timeout`; a call that fails or times out marks the store down, and
//! while it is down callers do not wait for it at all (their fallback applies at once) — one
//! call every backoff interval (100 ms doubling to `max_backoff`) probes it, and the first that
//! succeeds brings it back.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// Why a check of the store did not answer. The index of each failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreError {
    Timeout = 0,
    Error = 1,
    /// Down since an earlier failure; not asked.
    Down = 2,
}

pub(crate) const FAILURE_REASONS: [&str; 3] = ["timeout", "error", "down"];

/// One `[redis]`: a connection shared by every rate limit policy with `store = "redis"` and
/// the response cache's Redis tier.
pub(crate) struct RedisStore {
    /// `None` outside a runtime (`gatehouse check` builds the config without serving it).
    conn: Option<ConnectionManager>,
    timeout: Duration,
    max_backoff: Duration,
    base: Instant,
    /// While down: when the next call may probe (ms since `base`); 0 while up.
    retry_at: AtomicU64,
    failures: AtomicU32,
}

impl RedisStore {
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        connect_timeout: Duration,
        max_backoff: Duration,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("[redis] url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(connect_timeout.max(timeout)))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(max_backoff)
            .set_number_of_retries(2);
        let conn = match tokio::runtime::Handle::try_current() {
            Ok(_) => Some(
                ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| format!("[redis]: {e}"))?,
            ),
            Err(_) => None,
        };
        Ok(RedisStore {
            conn,
            timeout,
            max_backoff,
            base: Instant::now(),
            retry_at: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn backoff(&self, failures: u32) -> u64 {
        let ms = 100u64.saturating_mul(1 << failures.min(16));
        ms.min(u64::try_from(self.max_backoff.as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether this call may ask the store: it is up, or this call is the one probe of the
    /// current backoff interval.
    fn may_call(&self) -> bool {
        let at = self.retry_at.load(Ordering::Acquire);
        if at == 0 {
            return true;
        }
        let now = self.now_ms();
        let next = now + self.backoff(self.failures.load(Ordering::Relaxed));
        now >= at
            && self
                .retry_at
                .compare_exchange(at, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// A call failed. Only the one that finds the store up (the switch to down) or a probe
    /// (the store already down) moves the backoff: the calls in flight when it went down all
    /// fail at once, and must not push it to `max_backoff` at once. Whether this call was the
    /// switch (to log it once).
    fn failed(&self, probe: bool) -> bool {
        let at = self.now_ms() + self.backoff(self.failures.load(Ordering::Relaxed));
        let switched = self
            .retry_at
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if switched || probe {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if probe {
                self.retry_at
                    .store(self.now_ms() + self.backoff(n), Ordering::Release);
            }
        }
        switched
    }

    fn succeeded(&self, what: &str) {
        if self.retry_at.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.retry_at.store(0, Ordering::Release);
            tracing::info!("{what} (Redis) is reachable again");
        }
    }

    /// The connection, for callers with deadlines of their own (admin purges); `None` outside
    /// a runtime.
    pub(crate) fn connection(&self) -> Option<ConnectionManager> {
        self.conn.clone()
    }

    /// Whether the store answered its last call.
    pub(crate) fn is_up(&self) -> bool {
        self.retry_at.load(Ordering::Relaxed) == 0
    }

    /// Runs one call on the connection, within `[redis] timeout`, unless the store is down
    /// (then only the probe of the current backoff interval calls). `what` names the user in
    /// the log lines of a switch to down and back.
    pub(crate) async fn call<T, F>(
        &self,
        what: &'static str,
        f: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = &self.conn else {
            return Err(StoreError::Down);
        };
        let probe = !self.is_up();
        if !self.may_call() {
            return Err(StoreError::Down);
        }
        match tokio::time::timeout(self.timeout, f(conn.clone())).await {
            Ok(Ok(v)) => {
                self.succeeded(what);
                Ok(v)
            }
            Ok(Err(e)) => {
                if self.failed(probe) {
                    tracing::warn!(error = %e, "{what} (Redis) failed; its fallback applies until it answers again");
                }
                Err(StoreError::Error)
            }
            Err(_) => {
                if self.failed(probe) {
                    tracing::warn!(timeout = ?self.timeout, "{what} (Redis) timed out; its fallback applies until it answers again");
                }
                Err(StoreError::Timeout)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Down-marking: the calls in flight when the store goes down fail together and move the
    /// backoff once; while down, one call per interval probes; a success brings it back.
    #[test]
    fn the_backoff_moves_on_the_switch_and_on_failed_probes_only() {
        let s = RedisStore::new(
            "redis://127.0.0.1:1",
            Duration::from_millis(5),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(s.is_up() && s.may_call());
        assert!(s.failed(false), "the first failure is the switch");
        for _ in 0..100 {
            assert!(!s.failed(false), "calls in flight at the switch");
        }
        assert_eq!(s.failures.load(Ordering::Relaxed), 1);
        assert!(!s.is_up());
        assert!(
            !s.may_call(),
            "within the backoff interval nothing is asked"
        );
        // Past the interval, exactly one call probes.
        s.retry_at.store(1, Ordering::Release);
        assert!(s.may_call());
        assert!(!s.may_call());
        s.failed(true);
        assert_eq!(s.failures.load(Ordering::Relaxed), 2);
        assert!(s.backoff(2) > s.backoff(1) && s.backoff(40) == 5000);
        s.succeeded("test");
        assert!(s.is_up() && s.may_call());
        assert_eq!(s.failures.load(Ordering::Relaxed), 0);
    }
}
