//! One endpoint of a service and its live state: in-flight requests, the verdict of active
//! health checks, and passive ejection (outlier detection). All state is atomics, read on the
//! request path without locks and written by the proxy and the health-check task.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use http::uri::{Authority, Scheme};
use http::Uri;

use crate::config::OutlierDetectionConfig;

/// Passive ejection of an endpoint (`[services.NAME.outlier_detection]`), as the request path
/// reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outlier {
    /// Failures in a row that eject the endpoint.
    pub(crate) consecutive_failures: u32,
    /// The first ejection; each further one in a row lasts one more of these.
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
}

/// An `outlier_detection` table that cannot eject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OutlierConfigError {
    #[error("consecutive_failures must be at least 1")]
    Zero,
    #[error("base_ejection_time ({0}) must not exceed max_ejection_time ({1})")]
    Ejection(String, String),
}

impl Outlier {
    /// Checks an `outlier_detection` table; every mistake in it is reported.
    pub(crate) fn from_config(c: &OutlierDetectionConfig) -> Result<Self, Vec<OutlierConfigError>> {
        let mut errors = Vec::new();
        if c.consecutive_failures == 0 {
            errors.push(OutlierConfigError::Zero);
        }
        if c.base_ejection_time.get() > c.max_ejection_time.get() {
            errors.push(OutlierConfigError::Ejection(
                c.base_ejection_time.to_string(),
                c.max_ejection_time.to_string(),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Outlier {
            consecutive_failures: c.consecutive_failures,
            base_ejection: c.base_ejection_time.get(),
            max_ejection: c.max_ejection_time.get(),
        })
    }
}

/// Milliseconds on a process clock (never 0, so 0 can mean "not set"). Tokio's clock, so tests
/// can pause and advance it. Its origin lies an hour before the first reading: each test
/// runtime has a paused clock of its own, which starts at the real time when the runtime does;
/// an origin taken from a clock that another test had already advanced would otherwise lie in
/// this one's future.
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| {
        let now = Instant::now();
        [3600, 600, 60]
            .into_iter()
            .find_map(|s| now.checked_sub(Duration::from_secs(s)))
            .unwrap_or(now)
    });
    Instant::now().saturating_duration_since(start).as_millis() as u64 + 1
}

#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Unique in the process: with the service's pool id, the key of its pooled connections.
    pub(crate) id: u64,
    /// As configured, for logs, metrics and the admin API.
    pub(crate) url: Arc<str>,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The `Host` header for this endpoint (`host`, or `host:port` unless the port is the
    /// scheme's default), made once instead of per request.
    pub(crate) host: http::HeaderValue,
    pub(crate) weight: u32,
    in_flight: AtomicU32,
    healthy: AtomicBool,
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    // Active health check bookkeeping, written only by the health task.
    pub(crate) check_successes: AtomicU32,
    pub(crate) check_failures: AtomicU32,
    /// Success and failure counters, set when the service is built.
    pub(crate) counters: OnceLock<[prometheus::IntCounter; 2]>,
}

/// An endpoint URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint `{url}` {problem}")]
pub(crate) struct EndpointError {
    pub(crate) url: String,
    pub(crate) problem: EndpointProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EndpointProblem {
    #[error("is not a valid URL: {0}")]
    Invalid(String),
    #[error("needs a scheme, like `http://HOST:PORT`")]
    NoScheme,
    #[error("must use the http or https scheme")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("must not have a path or query; put the path in the route's `proxy.path`")]
    Path,
    #[error("has a host that is not a valid Host header")]
    HostHeader,
}

impl Endpoint {
    /// Parses an endpoint URL: `http://host:port` with no path.
    pub(crate) fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        let fail = |problem| EndpointError {
            url: url.to_owned(),
            problem,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| fail(EndpointProblem::Invalid(e.to_string())))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| fail(EndpointProblem::NoScheme))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(fail(EndpointProblem::Scheme));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| fail(EndpointProblem::NoHost))?;
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(fail(EndpointProblem::Path));
        }
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_owned(),
        };
        let host =
            http::HeaderValue::from_str(&host).map_err(|_| fail(EndpointProblem::HostHeader))?;
        Ok(Endpoint {
            id: super::pool::next_id(),
            url: Arc::from(url),
            scheme,
            authority,
            host,
            weight: 1,
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            check_successes: AtomicU32::new(0),
            check_failures: AtomicU32::new(0),
            counters: OnceLock::new(),
        })
    }

    pub(crate) fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight.max(1);
        self
    }

    /// Healthy by active checks and not ejected by outlier detection.
    pub(crate) fn available(&self) -> bool {
        if !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, v: bool) -> bool {
        self.healthy.swap(v, Ordering::Relaxed) != v
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Milliseconds of ejection left (0: not ejected).
    pub(crate) fn ejected_for_ms(&self) -> u64 {
        self.ejected_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(now_ms())
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub(crate) fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Records the outcome of a request for outlier detection. Returns the ejection time when
    /// this failure ejected the endpoint.
    pub(crate) fn report(&self, success: bool, od: Option<&Outlier>) -> Option<Duration> {
        if success {
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            if self.ejections.load(Ordering::Relaxed) != 0 && self.ejected_for_ms() == 0 {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let od = od?;
        if self.ejected_for_ms() > 0 {
            // Already out; failures of requests still in flight do not count towards the next one.
            return None;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < od.consecutive_failures {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = od.base_ejection.saturating_mul(n).min(od.max_ejection);
        self.ejected_until_ms
            .store(now_ms() + time.as_millis() as u64, Ordering::Relaxed);
        Some(time)
    }
}

/// Decrements the endpoint's in-flight count when dropped.
pub(crate) struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let e = Endpoint::parse("http://127.0.0.1:8081").unwrap();
        assert_eq!(e.authority.as_str(), "127.0.0.1:8081");
        assert_eq!(e.host, "127.0.0.1:8081");
        let e = Endpoint::parse("https://api.example.com:443").unwrap();
        assert_eq!(e.host, "api.example.com");
        let e = Endpoint::parse("http://[::1]:80").unwrap();
        assert_eq!(e.host, "[::1]");
        assert_eq!(
            Endpoint::parse("127.0.0.1:8081").unwrap_err().problem,
            EndpointProblem::NoScheme
        );
        assert_eq!(
            Endpoint::parse("http://h:1/v1").unwrap_err().problem,
            EndpointProblem::Path
        );
        assert_eq!(
            Endpoint::parse("ftp://h:1").unwrap_err().problem,
            EndpointProblem::Scheme
        );
        assert!(Endpoint::parse("https://h:1").is_ok());
        assert!(Endpoint::parse("http://h:1/").is_ok());
    }

    #[test]
    fn consecutive_failures_eject_with_growing_time() {
        let od = OutlierDetectionConfig {
            consecutive_failures: 2,
            base_ejection_time: crate::config::Duration::from_secs(10),
            max_ejection_time: crate::config::Duration::from_secs(25),
        };
        let e = Endpoint::parse("http://h:1").unwrap();
        let od = Outlier::from_config(&od).unwrap();
        assert_eq!(e.report(false, Some(&od)), None);
        assert!(e.available());
        assert_eq!(e.report(false, Some(&od)), Some(Duration::from_secs(10)));
        assert!(!e.available());
        // Expire the ejection by hand; the next ejection in a row is longer, then capped.
        e.ejected_until_ms.store(1, Ordering::Relaxed);
        assert!(e.available());
        e.report(false, Some(&od));
        assert_eq!(e.report(false, Some(&od)), Some(Duration::from_secs(20)));
        e.ejected_until_ms.store(1, Ordering::Relaxed);
        e.report(false, Some(&od));
        assert_eq!(e.report(false, Some(&od)), Some(Duration::from_secs(25)));
        // Without outlier detection nothing is ejected.
        let f = Endpoint::parse("http://h:2").unwrap();
        for _ in 0..10 {
            assert_eq!(f.report(false, None), None);
        }
        assert!(f.available());
    }

    #[test]
    fn in_flight_is_counted() {
        let e = Endpoint::parse("http://h:1").unwrap();
        let a = e.start();
        let b = e.start();
        assert_eq!(e.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(e.in_flight(), 0);
    }
}
