//! The circuit breaker of a service. Closed: requests pass, outcomes are counted. Open: requests
//! fail at once with 503 `circuit_open` and `Retry-After`, without touching the service. After
//! `open_for` it turns half-open and lets `half_open_requests` probes through: their success
//! closes it, a failure opens it again for twice as long (up to `max_open_for`).
//!
//! It opens on `consecutive_failures` in a row, or when the failure rate over `window` (counted
//! in ten rotating buckets) reaches `failure_rate` once `min_requests` were seen. All state is
//! atomics: a request reads one word to learn the state.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use super::endpoint::now_ms;
use crate::config::CircuitBreakerConfig;

pub(crate) const CLOSED: u8 = 0;
pub(crate) const OPEN: u8 = 1;
pub(crate) const HALF_OPEN: u8 = 2;

const BUCKETS: usize = 10;

/// Why a request was not let through, and for how long the circuit stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub(crate) retry_after_ms: u64,
}

/// Permission to send one request; report its outcome with `Breaker::record`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permit {
    Normal,
    Probe,
}

/// A permit that records its request's outcome: explicitly with `record`, or, if it is dropped
/// first (its attempt was cancelled), as `on_drop` says.
pub(crate) struct Guard<'a> {
    breaker: &'a Breaker,
    permit: Option<Permit>,
}

impl Guard<'_> {
    /// Records the outcome: `Some(true)` success, `Some(false)` failure, `None` an outcome that
    /// says nothing about the service (a half-open probe slot is given back).
    pub(crate) fn record(mut self, success: Option<bool>) {
        if let Some(p) = self.permit.take() {
            self.breaker.record(p, success);
        }
    }

    /// What a cancelled attempt counts as. The caller says it, since only it knows why the
    /// attempt was dropped (the route's deadline: a failure; the client went away: nothing).
    pub(crate) fn cancelled(self, counts_as_failure: bool) {
        self.record(if counts_as_failure { Some(false) } else { None });
    }
}

impl Drop for Guard<'_> {
    /// Dropped without a verdict: not counted, but a probe's slot is given back, so that a
    /// half-open circuit cannot be wedged by requests that never finished.
    fn drop(&mut self) {
        if let Some(p) = self.permit.take() {
            self.breaker.record(p, None);
        }
    }
}

struct Bucket {
    /// Which slice of time this bucket counts (now / bucket width).
    epoch: AtomicU64,
    ok: AtomicU32,
    failed: AtomicU32,
}

/// `[services.NAME.circuit_breaker]` as the breaker reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Settings {
    pub(crate) consecutive_failures: u32,
    pub(crate) failure_rate: f64,
    pub(crate) min_requests: u32,
    pub(crate) window_ms: u64,
    pub(crate) open_for_ms: u64,
    pub(crate) max_open_for_ms: u64,
    pub(crate) half_open_requests: u32,
    /// Whether 5xx answers count as failures.
    pub(crate) count_5xx: bool,
}

pub(crate) struct Breaker {
    cfg: Settings,
    state: AtomicU8,
    open_until_ms: AtomicU64,
    /// Consecutive openings, for the growing `open_for`.
    openings: AtomicU32,
    consecutive: AtomicU32,
    probes_in_flight: AtomicU32,
    probe_successes: AtomicU32,
    buckets: [Bucket; BUCKETS],
    bucket_ms: u64,
}

/// A `circuit_breaker` table that cannot make a breaker.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum BreakerConfigError {
    #[error("consecutive_failures, min_requests and half_open_requests must be at least 1")]
    Zero,
    #[error("failure_rate = {0} must be above 0 and at most 1")]
    Rate(f64),
    #[error("open_for ({0}) must not exceed max_open_for ({1})")]
    OpenFor(String, String),
}

impl Settings {
    /// Checks a `circuit_breaker` table; every mistake in it is reported.
    pub(crate) fn from_config(c: &CircuitBreakerConfig) -> Result<Self, Vec<BreakerConfigError>> {
        let mut errors = Vec::new();
        if c.consecutive_failures == 0 || c.min_requests == 0 || c.half_open_requests == 0 {
            errors.push(BreakerConfigError::Zero);
        }
        if !(c.failure_rate > 0.0 && c.failure_rate <= 1.0) {
            errors.push(BreakerConfigError::Rate(c.failure_rate));
        }
        if c.open_for.get() > c.max_open_for.get() {
            errors.push(BreakerConfigError::OpenFor(
                c.open_for.to_string(),
                c.max_open_for.to_string(),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Settings {
            consecutive_failures: c.consecutive_failures,
            failure_rate: c.failure_rate,
            min_requests: c.min_requests,
            window_ms: c.window.get().as_millis() as u64,
            open_for_ms: c.open_for.get().as_millis() as u64,
            max_open_for_ms: c.max_open_for.get().as_millis() as u64,
            half_open_requests: c.half_open_requests,
            count_5xx: c.count_5xx,
        })
    }
}

impl Breaker {
    pub(crate) fn new(cfg: Settings) -> Self {
        let bucket_ms = (cfg.window_ms / BUCKETS as u64).max(1);
        Breaker {
            cfg,
            state: AtomicU8::new(CLOSED),
            open_until_ms: AtomicU64::new(0),
            openings: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            probes_in_flight: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            buckets: std::array::from_fn(|_| Bucket {
                epoch: AtomicU64::new(0),
                ok: AtomicU32::new(0),
                failed: AtomicU32::new(0),
            }),
            bucket_ms,
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.cfg
    }

    /// `CLOSED`, `OPEN` or `HALF_OPEN`, as it stands now.
    pub(crate) fn state(&self) -> u8 {
        let s = self.state.load(Ordering::Acquire);
        if s == OPEN && now_ms() >= self.open_until_ms.load(Ordering::Acquire) {
            HALF_OPEN
        } else {
            s
        }
    }

    pub(crate) fn state_name(&self) -> &'static str {
        match self.state() {
            CLOSED => "closed",
            OPEN => "open",
            _ => "half_open",
        }
    }

    /// Asks to send a request; the guard records its outcome.
    pub(crate) fn admit(&self) -> Result<Guard<'_>, Rejected> {
        self.try_acquire().map(|p| Guard {
            breaker: self,
            permit: Some(p),
        })
    }

    /// Asks to send a request.
    pub(crate) fn try_acquire(&self) -> Result<Permit, Rejected> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(Permit::Normal),
            OPEN => {
                let until = self.open_until_ms.load(Ordering::Acquire);
                let now = now_ms();
                if now < until {
                    return Err(Rejected {
                        retry_after_ms: until - now,
                    });
                }
                // Time is up: one caller moves it to half-open; everyone then asks for a probe.
                if self
                    .state
                    .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.probes_in_flight.store(0, Ordering::Release);
                    self.probe_successes.store(0, Ordering::Release);
                    tracing::info!("circuit half-open: letting probe requests through");
                }
                self.try_probe()
            }
            _ => self.try_probe(),
        }
    }

    fn try_probe(&self) -> Result<Permit, Rejected> {
        let max = self.cfg.half_open_requests;
        let got = self
            .probes_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if got {
            Ok(Permit::Probe)
        } else {
            Err(Rejected {
                retry_after_ms: self.bucket_ms.max(1000),
            })
        }
    }

    /// Records the outcome of a request that was let through. `None` means the request ended
    /// without an outcome that says anything about the service (a client error, say).
    pub(crate) fn record(&self, permit: Permit, success: Option<bool>) {
        match (permit, success) {
            (Permit::Probe, Some(true)) => {
                let n = self.probe_successes.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= self.cfg.half_open_requests
                    && self.state.load(Ordering::Acquire) == HALF_OPEN
                {
                    self.close();
                }
            }
            (Permit::Probe, Some(false)) => self.open(),
            (Permit::Probe, None) => {
                self.probes_in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            (Permit::Normal, Some(ok)) => self.count(ok),
            (Permit::Normal, None) => {}
        }
    }

    fn count(&self, ok: bool) {
        let now = now_ms();
        let epoch = now / self.bucket_ms;
        let b = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = b.epoch.load(Ordering::Acquire);
        if seen != epoch
            && b.epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.ok.store(0, Ordering::Release);
            b.failed.store(0, Ordering::Release);
        }
        if ok {
            b.ok.fetch_add(1, Ordering::AcqRel);
            self.consecutive.store(0, Ordering::Release);
            return;
        }
        b.failed.fetch_add(1, Ordering::AcqRel);
        let consecutive = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if consecutive >= self.cfg.consecutive_failures {
            self.open();
            return;
        }
        let (mut total, mut failed) = (0u64, 0u64);
        for b in &self.buckets {
            if epoch.saturating_sub(b.epoch.load(Ordering::Acquire)) < BUCKETS as u64 {
                let f = b.failed.load(Ordering::Acquire) as u64;
                total += b.ok.load(Ordering::Acquire) as u64 + f;
                failed += f;
            }
        }
        if total >= self.cfg.min_requests as u64
            && failed as f64 >= self.cfg.failure_rate * total as f64
        {
            self.open();
        }
    }

    fn open(&self) {
        let prev = self.state.swap(OPEN, Ordering::AcqRel);
        if prev == OPEN {
            return;
        }
        let n = self.openings.fetch_add(1, Ordering::AcqRel).min(16);
        let base = self.cfg.open_for_ms;
        let open_for = base.saturating_mul(1 << n).min(self.cfg.max_open_for_ms);
        self.open_until_ms
            .store(now_ms() + open_for, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        for b in &self.buckets {
            b.ok.store(0, Ordering::Release);
            b.failed.store(0, Ordering::Release);
        }
        tracing::warn!(open_for_ms = open_for, "circuit opened");
    }

    fn close(&self) {
        self.state.store(CLOSED, Ordering::Release);
        self.openings.store(0, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        tracing::info!("circuit closed");
    }

    /// Milliseconds until an open circuit turns half-open.
    pub(crate) fn open_for_ms(&self) -> u64 {
        if self.state.load(Ordering::Acquire) == OPEN {
            self.open_until_ms
                .load(Ordering::Acquire)
                .saturating_sub(now_ms())
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Duration;
    use std::time::Duration as StdDuration;

    fn cfg() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(12),
            half_open_requests: 2,
            count_5xx: true,
        }
    }

    #[test]
    fn every_mistake_in_a_table_is_reported() {
        let mut c = cfg();
        c.min_requests = 0;
        c.failure_rate = 1.5;
        c.open_for = Duration::from_secs(60);
        assert_eq!(
            Settings::from_config(&c).unwrap_err(),
            vec![
                BreakerConfigError::Zero,
                BreakerConfigError::Rate(1.5),
                BreakerConfigError::OpenFor("1m".into(), "12s".into()),
            ]
        );
        assert_eq!(Settings::from_config(&cfg()).unwrap().window_ms, 10_000);
    }

    fn fail(b: &Breaker) {
        let p = b.try_acquire().unwrap();
        b.record(p, Some(false));
    }

    fn succeed(b: &Breaker) {
        let p = b.try_acquire().unwrap();
        b.record(p, Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_consecutive_failures_and_recovers_through_half_open() {
        let b = Breaker::new(Settings::from_config(&cfg()).unwrap());
        fail(&b);
        fail(&b);
        succeed(&b); // resets the run
        fail(&b);
        fail(&b);
        assert_eq!(b.state(), CLOSED);
        fail(&b);
        assert_eq!(b.state(), OPEN);
        let r = b.try_acquire().unwrap_err();
        assert!(r.retry_after_ms > 4000 && r.retry_after_ms <= 5000);

        tokio::time::advance(StdDuration::from_millis(5001)).await;
        assert_eq!(b.state(), HALF_OPEN);
        let p1 = b.try_acquire().unwrap();
        let p2 = b.try_acquire().unwrap();
        assert_eq!((p1, p2), (Permit::Probe, Permit::Probe));
        assert!(
            b.try_acquire().is_err(),
            "only half_open_requests probes at a time"
        );
        b.record(p1, Some(true));
        assert_eq!(b.state(), HALF_OPEN);
        b.record(p2, Some(true));
        assert_eq!(b.state(), CLOSED);
        assert_eq!(b.try_acquire(), Ok(Permit::Normal));
    }

    #[tokio::test(start_paused = true)]
    async fn a_guard_records_its_verdict_or_gives_a_probe_back_when_dropped() {
        let b = Breaker::new(Settings::from_config(&cfg()).unwrap());
        for _ in 0..3 {
            b.admit().unwrap().record(Some(false));
        }
        assert_eq!(b.state(), OPEN);
        tokio::time::advance(StdDuration::from_millis(5001)).await;
        // Two probe slots. A probe dropped unfinished (its client went away) gives its slot
        // back instead of holding it forever.
        let g1 = b.admit().unwrap();
        let g2 = b.admit().unwrap();
        assert!(b.admit().is_err());
        drop(g1);
        let g3 = b.admit().expect("the dropped probe's slot is free again");
        // A probe cancelled by the deadline is a failure: the circuit opens again.
        g2.cancelled(true);
        assert_eq!(b.state(), OPEN);
        drop(g3);
        // In a closed circuit, a cancelled attempt that is not the service's doing is not
        // counted: three of them do not open it.
        let b = Breaker::new(Settings::from_config(&cfg()).unwrap());
        for _ in 0..5 {
            b.admit().unwrap().cancelled(false);
        }
        assert_eq!(b.state(), CLOSED);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let b = Breaker::new(Settings::from_config(&cfg()).unwrap());
        for _ in 0..3 {
            fail(&b);
        }
        assert!(b.open_for_ms() <= 5000);
        tokio::time::advance(StdDuration::from_millis(5001)).await;
        let p = b.try_acquire().unwrap();
        b.record(p, Some(false));
        assert_eq!(b.state(), OPEN);
        assert!(
            b.open_for_ms() > 9000 && b.open_for_ms() <= 10000,
            "{}",
            b.open_for_ms()
        );
        tokio::time::advance(StdDuration::from_millis(10001)).await;
        let p = b.try_acquire().unwrap();
        b.record(p, Some(false));
        assert!(
            b.open_for_ms() > 11000 && b.open_for_ms() <= 12000,
            "capped: {}",
            b.open_for_ms()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_once_enough_requests_were_seen() {
        let mut c = cfg();
        c.consecutive_failures = 100;
        let b = Breaker::new(Settings::from_config(&c).unwrap());
        // Alternate: a 50% failure rate, never three failures in a row.
        for i in 0..9 {
            if i % 2 == 0 {
                fail(&b)
            } else {
                succeed(&b)
            }
        }
        assert_eq!(b.state(), CLOSED, "fewer than min_requests");
        fail(&b);
        assert_eq!(b.state(), OPEN);
    }

    #[tokio::test(start_paused = true)]
    async fn old_outcomes_leave_the_window() {
        let mut c = cfg();
        c.consecutive_failures = 100;
        let b = Breaker::new(Settings::from_config(&c).unwrap());
        for _ in 0..4 {
            fail(&b);
            tokio::time::advance(StdDuration::from_millis(10)).await;
        }
        tokio::time::advance(StdDuration::from_secs(11)).await;
        for _ in 0..9 {
            succeed(&b);
        }
        fail(&b);
        assert_eq!(
            b.state(),
            CLOSED,
            "the early failures are out of the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_that_say_nothing_do_not_count() {
        let b = Breaker::new(Settings::from_config(&cfg()).unwrap());
        for _ in 0..10 {
            let p = b.try_acquire().unwrap();
            b.record(p, None);
        }
        assert_eq!(b.state(), CLOSED);
    }
}
