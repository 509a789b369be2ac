//! Retry policy: which failures are retried, how long to wait between attempts (exponential
//! backoff with full jitter), and which requests may be retried at all (idempotent methods; POST
//! and PATCH only with an `Idempotency-Key` or on a route marked `idempotent`). The retry budget
//! that bounds retries per service is tower's `TpsBudget`, held by the `Upstream`.

use std::time::Duration;

use http::{HeaderMap, Method};

use crate::config::RetryConfig;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RetryPolicy {
    pub(crate) attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    pub(crate) on_connect: bool,
    pub(crate) on_reset: bool,
    pub(crate) on_timeout: bool,
    statuses: Box<[u16]>,
    pub(crate) max_body_buffer: u64,
}

/// What went wrong with one attempt, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    Connect,
    Reset,
    Timeout,
    Status(u16),
}

/// A `retry` table that cannot become a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RetryConfigError {
    #[error("attempts = {0} must be between 1 and 10 (the first attempt included)")]
    Attempts(u32),
    #[error("backoff ({backoff}) must not exceed max_backoff ({max})")]
    Backoff { backoff: String, max: String },
    #[error("budget_percent = {0} must be at most 1000")]
    Budget(u32),
    #[error("retry_on `{0}`: expected connect-failure, reset, timeout, 408, 429 or a 5xx status")]
    Condition(String),
}

impl RetryPolicy {
    pub(crate) fn parse(cfg: &RetryConfig) -> Result<RetryPolicy, RetryConfigError> {
        if cfg.attempts == 0 || cfg.attempts > 10 {
            return Err(RetryConfigError::Attempts(cfg.attempts));
        }
        if cfg.backoff.get() > cfg.max_backoff.get() {
            return Err(RetryConfigError::Backoff {
                backoff: cfg.backoff.to_string(),
                max: cfg.max_backoff.to_string(),
            });
        }
        if cfg.budget_percent > 1000 {
            return Err(RetryConfigError::Budget(cfg.budget_percent));
        }
        let mut p = RetryPolicy {
            attempts: cfg.attempts,
            backoff: cfg.backoff.get(),
            max_backoff: cfg.max_backoff.get(),
            on_connect: false,
            on_reset: false,
            on_timeout: false,
            statuses: Box::new([]),
            max_body_buffer: cfg.max_body_buffer.0,
        };
        let mut statuses = Vec::new();
        for cond in &cfg.retry_on {
            match cond.as_str() {
                "connect-failure" => p.on_connect = true,
                "reset" => p.on_reset = true,
                "timeout" => p.on_timeout = true,
                s => match s.parse::<u16>() {
                    Ok(code) if (500..=599).contains(&code) || code == 429 || code == 408 => {
                        statuses.push(code)
                    }
                    _ => return Err(RetryConfigError::Condition(s.to_owned())),
                },
            }
        }
        p.statuses = statuses.into_boxed_slice();
        Ok(p)
    }

    pub(crate) fn retries(&self, f: Failure) -> bool {
        match f {
            Failure::Connect => self.on_connect,
            Failure::Reset => self.on_reset,
            Failure::Timeout => self.on_timeout,
            Failure::Status(s) => self.statuses.contains(&s),
        }
    }

    /// The wait before retry number `n` (1 for the first retry): a random time up to
    /// `min(max_backoff, backoff × 2^(n-1))` ("full jitter").
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let cap = self
            .backoff
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.max_backoff);
        let ms = cap.as_millis() as u64;
        Duration::from_millis(if ms == 0 { 0 } else { fastrand::u64(..=ms) })
    }
}

/// Whether a request may be sent more than once.
pub(crate) fn method_allows_retry(
    method: &Method,
    headers: &HeaderMap,
    route_idempotent: bool,
) -> bool {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::OPTIONS
        | Method::PUT
        | Method::DELETE
        | Method::TRACE => true,
        Method::POST | Method::PATCH => route_idempotent || headers.contains_key("idempotency-key"),
        _ => route_idempotent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Duration as D, Size};

    fn cfg() -> RetryConfig {
        RetryConfig {
            attempts: 3,
            backoff: D::from_millis(25),
            max_backoff: D::from_millis(250),
            retry_on: vec!["connect-failure".into(), "503".into()],
            budget_percent: 20,
            min_retries_per_second: 10,
            max_body_buffer: Size(65536),
        }
    }

    #[test]
    fn conditions() {
        let p = RetryPolicy::parse(&cfg()).unwrap();
        assert!(p.retries(Failure::Connect));
        assert!(!p.retries(Failure::Reset));
        assert!(!p.retries(Failure::Timeout));
        assert!(p.retries(Failure::Status(503)));
        assert!(!p.retries(Failure::Status(500)));
        let mut bad = cfg();
        bad.retry_on = vec!["404".into()];
        assert_eq!(
            RetryPolicy::parse(&bad).unwrap_err(),
            RetryConfigError::Condition("404".into())
        );
        bad = cfg();
        bad.attempts = 0;
        assert_eq!(
            RetryPolicy::parse(&bad).unwrap_err(),
            RetryConfigError::Attempts(0)
        );
    }

    #[test]
    fn backoff_is_capped_full_jitter() {
        let p = RetryPolicy::parse(&cfg()).unwrap();
        for n in 1..8 {
            let cap = (25u64 << (n - 1)).min(250);
            for _ in 0..50 {
                assert!(p.backoff(n).as_millis() as u64 <= cap);
            }
        }
        // Jitter: not always the same value.
        let waits: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(4)).collect();
        assert!(waits.len() > 5);
    }

    #[test]
    fn which_methods_may_be_retried() {
        let none = HeaderMap::new();
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "k1".parse().unwrap());
        assert!(method_allows_retry(&Method::GET, &none, false));
        assert!(method_allows_retry(&Method::PUT, &none, false));
        assert!(!method_allows_retry(&Method::POST, &none, false));
        assert!(method_allows_retry(&Method::POST, &keyed, false));
        assert!(method_allows_retry(&Method::PATCH, &none, true));
    }

    #[test]
    fn budget_bounds_retries() {
        use tower::retry::budget::{Budget, TpsBudget};
        let b = TpsBudget::new(std::time::Duration::from_secs(10), 0, 0.2);
        for _ in 0..100 {
            b.deposit();
        }
        let allowed = (0..100).filter(|_| b.withdraw()).count();
        assert!(
            (19..=21).contains(&allowed),
            "20% of 100 requests, got {allowed}"
        );
    }
}
