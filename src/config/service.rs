//! `[services.NAME]`: a backend service's endpoints or discovery, balancing, health checks,
//! outlier detection, TLS, retries and circuit breaker.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::defaults::*;
use super::units::{Duration, Size};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 (prior knowledge on `http://` endpoints).
    Http2,
}

/// `discovery = { … }`: exactly one of `dns`, `dns_srv` or `etcd`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DiscoveryConfig {
    /// A/AAAA records of this name, with `port`.
    pub(crate) dns: Option<String>,
    pub(crate) port: Option<u16>,
    /// `http` (default) or `https`.
    pub(crate) scheme: Option<String>,
    /// SRV records of this name (target, port, priority, weight).
    pub(crate) dns_srv: Option<String>,
    /// etcd endpoints, with `prefix`.
    pub(crate) etcd: Option<Vec<String>>,
    pub(crate) prefix: Option<String>,
}

/// `[services.NAME]`: a backend microservice.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceConfig {
    #[serde(default)]
    pub(crate) endpoints: Vec<Spanned<String>>,
    /// Where endpoints come from when they are not listed in `endpoints`.
    pub(crate) discovery: Option<Spanned<DiscoveryConfig>>,
    /// Per attempt, until the response head arrives.
    pub(crate) timeout: Option<Duration>,
    #[serde(default = "d_1s")]
    pub(crate) connect_timeout: Duration,
    #[serde(default)]
    pub(crate) protocol: UpstreamProtocol,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "d_90s")]
    pub(crate) pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub(crate) pool_max_idle_per_endpoint: usize,
    #[serde(default)]
    pub(crate) load_balancing: LoadBalancing,
    /// `header:NAME`, `cookie:NAME` or `ip`; required by `consistent_hash`.
    pub(crate) hash_key: Option<Spanned<String>>,
    /// `/readyz` is not ready while this service has no available endpoint.
    #[serde(default)]
    pub(crate) required: bool,
    /// What to do when no endpoint is available.
    #[serde(default)]
    pub(crate) all_unhealthy: AllUnhealthy,
    pub(crate) health_check: Option<Spanned<HealthCheckConfig>>,
    pub(crate) outlier_detection: Option<Spanned<OutlierDetectionConfig>>,
    /// TLS to `https` endpoints; without it, the system's roots are trusted.
    pub(crate) tls: Option<Spanned<UpstreamTlsConfig>>,
    /// Bulkhead: requests in flight to this service; beyond it (and the queue), 503 `overloaded`.
    pub(crate) max_concurrent_requests: Option<Spanned<usize>>,
    /// Requests that may wait for a bulkhead slot, each at most `queue_timeout`.
    #[serde(default)]
    pub(crate) max_queued_requests: usize,
    #[serde(default = "d_100ms")]
    pub(crate) queue_timeout: Duration,
    pub(crate) retry: Option<Spanned<RetryConfig>>,
    pub(crate) circuit_breaker: Option<Spanned<CircuitBreakerConfig>>,
}

/// `[services.NAME.retry]`, and a route's `retry` override.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryConfig {
    /// Total attempts, the first included.
    #[serde(default = "three")]
    pub(crate) attempts: u32,
    /// Base of exponential backoff with full jitter.
    #[serde(default = "d_25ms")]
    pub(crate) backoff: Duration,
    #[serde(default = "d_250ms")]
    pub(crate) max_backoff: Duration,
    /// `connect-failure`, `reset`, `timeout`, or a status code like `"503"`.
    #[serde(default = "default_retry_on")]
    pub(crate) retry_on: Vec<String>,
    /// Retries add at most this percentage to the original requests (per service; a route's
    /// override cannot change it).
    #[serde(default = "twenty")]
    pub(crate) budget_percent: u32,
    /// Retries allowed per second even when the percentage would allow none.
    #[serde(default = "ten")]
    pub(crate) min_retries_per_second: u32,
    /// Bodies up to this size are buffered so they can be sent again; larger ones (and bodies
    /// of unknown length) are sent once and never retried.
    #[serde(default = "d_64kib")]
    pub(crate) max_body_buffer: Size,
}

/// `[services.NAME.circuit_breaker]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CircuitBreakerConfig {
    #[serde(default = "five")]
    pub(crate) consecutive_failures: u32,
    /// Opens when this share of requests in `window` failed, once `min_requests` were seen.
    #[serde(default = "half")]
    pub(crate) failure_rate: f64,
    #[serde(default = "twenty")]
    pub(crate) min_requests: u32,
    #[serde(default = "d_10s")]
    pub(crate) window: Duration,
    /// How long it stays open the first time; doubles on each reopening, up to `max_open_for`.
    #[serde(default = "d_5s")]
    pub(crate) open_for: Duration,
    #[serde(default = "d_60s")]
    pub(crate) max_open_for: Duration,
    /// Probe requests let through while half-open; that many successes close it.
    #[serde(default = "one")]
    pub(crate) half_open_requests: u32,
    /// Whether 5xx responses count as failures (connect errors, resets and timeouts always do;
    /// 4xx never).
    #[serde(default = "yes")]
    pub(crate) count_5xx: bool,
}

/// `[services.NAME.tls]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamTlsConfig {
    /// CA certificates (PEM) to trust instead of the system's roots.
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    /// The name to send (SNI) and to verify, instead of the endpoint's host.
    pub(crate) server_name: Option<String>,
    /// Accept any server certificate. For tests and development only.
    #[serde(default)]
    pub(crate) insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum LoadBalancing {
    #[default]
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AllUnhealthy {
    /// Answer 503 `no_healthy_endpoint` at once.
    #[default]
    Reject,
    /// Spread requests over every endpoint, healthy or not.
    UseAll,
}

/// `[services.NAME.health_check]`: active checks of every endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub(crate) path: String,
    #[serde(default = "d_5s")]
    pub(crate) interval: Duration,
    #[serde(default = "d_1s")]
    pub(crate) timeout: Duration,
    #[serde(default = "two")]
    pub(crate) healthy_threshold: u32,
    #[serde(default = "three")]
    pub(crate) unhealthy_threshold: u32,
    /// Statuses that count as healthy; default: 200–399.
    #[serde(default)]
    pub(crate) expected_statuses: Vec<u16>,
}

/// `[services.NAME.outlier_detection]`: passive ejection of failing endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutlierDetectionConfig {
    /// Connection failures or 5xx responses in a row that eject an endpoint.
    #[serde(default = "five")]
    pub(crate) consecutive_failures: u32,
    /// First ejection; each further ejection in a row lasts one more of these.
    #[serde(default = "d_10s")]
    pub(crate) base_ejection_time: Duration,
    #[serde(default = "d_300s")]
    pub(crate) max_ejection_time: Duration,
}
