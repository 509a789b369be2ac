//! Raw configuration types: exactly what `gateway.toml` and `routes/*.toml` say, as serde reads
//! them. Nothing here is on the request path; `gateway::compile` turns these into runtime values.
//! Every table rejects unknown keys, and values that later checks must point at are `Spanned`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::units::{Duration, Size};

/// `gateway.toml`: the gateway's own settings and the shared definitions.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub routes: RoutesConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub services: BTreeMap<String, Spanned<ServiceConfig>>,
}

/// One address or a list of them (`listen = "…"` or `listen = ["…", "…"]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: OneOrMany<SocketAddr>,
    pub tls: Option<Spanned<TlsConfig>>,
    /// Total deadline of one request unless its route says otherwise.
    #[serde(default = "d_30s")]
    pub request_timeout: Duration,
    /// Bodies larger than this get 413.
    #[serde(default = "default_max_body")]
    pub max_request_body: Size,
    /// Requests in flight across the gateway; beyond it, 503 `overloaded` at once. 0: no limit.
    #[serde(default)]
    pub max_concurrent_requests: usize,
    /// Open client connections; beyond it, new connections are closed at once. 0: no limit.
    #[serde(default)]
    pub max_connections: usize,
    /// Peers whose X-Forwarded-* and X-Request-Id headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// A client must send its complete request head within this time.
    #[serde(default = "d_10s")]
    pub header_read_timeout: Duration,
    /// An HTTP/1 connection with no request for this long is closed.
    #[serde(default = "d_75s")]
    pub keep_alive_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    #[serde(default = "d_30s")]
    pub shutdown_grace: Duration,
    /// Threads that serve client connections, each with its own event loop and upstream
    /// connection pools. 0: one per CPU the process may run on.
    #[serde(default)]
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls: None,
            request_timeout: d_30s(),
            max_request_body: default_max_body(),
            trusted_proxies: Vec::new(),
            max_concurrent_requests: 0,
            max_connections: 0,
            header_read_timeout: d_10s(),
            keep_alive_timeout: d_75s(),
            shutdown_grace: d_30s(),
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    #[serde(default = "default_routes_dir")]
    pub dir: PathBuf,
    /// Reload when gateway.toml or a route file changes.
    #[serde(default = "yes")]
    pub watch: bool,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        RoutesConfig {
            dir: default_routes_dir(),
            watch: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` variable overrides it.
    #[serde(default = "default_filter")]
    pub filter: Spanned<String>,
    /// One event per request on target `gatehouse::access`.
    #[serde(default = "yes")]
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: default_filter(),
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 (prior knowledge on `http://` endpoints).
    Http2,
}

/// `[dns]`: the resolver used by `dns` and `dns_srv` discovery.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Nameservers (UDP, with TCP fallback); empty: the system resolver (/etc/resolv.conf).
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// Re-resolve no sooner than this, even if the TTL is shorter.
    #[serde(default = "d_1s")]
    pub min_refresh: Duration,
    /// Re-resolve no later than this, even if the TTL is longer.
    #[serde(default = "d_30s")]
    pub max_refresh: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            min_refresh: d_1s(),
            max_refresh: d_30s(),
        }
    }
}

/// `discovery = { … }`: exactly one of `dns`, `dns_srv` or `etcd`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A/AAAA records of this name, with `port`.
    pub dns: Option<String>,
    pub port: Option<u16>,
    /// `http` (default) or `https`.
    pub scheme: Option<String>,
    /// SRV records of this name (target, port, priority, weight).
    pub dns_srv: Option<String>,
    /// etcd endpoints, with `prefix`.
    pub etcd: Option<Vec<String>>,
    pub prefix: Option<String>,
}

/// `[services.NAME]`: a backend microservice.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    #[serde(default)]
    pub endpoints: Vec<Spanned<String>>,
    /// Where endpoints come from when they are not listed in `endpoints`.
    pub discovery: Option<Spanned<DiscoveryConfig>>,
    /// Per attempt, until the response head arrives.
    pub timeout: Option<Duration>,
    #[serde(default = "d_1s")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "d_90s")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_endpoint: usize,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// `header:NAME`, `cookie:NAME` or `ip`; required by `consistent_hash`.
    pub hash_key: Option<Spanned<String>>,
    /// `/readyz` is not ready while this service has no available endpoint.
    #[serde(default)]
    pub required: bool,
    /// What to do when no endpoint is available.
    #[serde(default)]
    pub all_unhealthy: AllUnhealthy,
    pub health_check: Option<Spanned<HealthCheckConfig>>,
    pub outlier_detection: Option<Spanned<OutlierDetectionConfig>>,
    /// TLS to `https` endpoints; without it, the system's roots are trusted.
    pub tls: Option<Spanned<UpstreamTlsConfig>>,
    /// Bulkhead: requests in flight to this service; beyond it (and the queue), 503 `overloaded`.
    pub max_concurrent_requests: Option<Spanned<usize>>,
    /// Requests that may wait for a bulkhead slot, each at most `queue_timeout`.
    #[serde(default)]
    pub max_queued_requests: usize,
    #[serde(default = "d_100ms")]
    pub queue_timeout: Duration,
    pub retry: Option<Spanned<RetryConfig>>,
    pub circuit_breaker: Option<Spanned<CircuitBreakerConfig>>,
}

/// `[services.NAME.retry]`, and a route's `retry` override.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Total attempts, the first included.
    #[serde(default = "three")]
    pub attempts: u32,
    /// Base of exponential backoff with full jitter.
    #[serde(default = "d_25ms")]
    pub backoff: Duration,
    #[serde(default = "d_250ms")]
    pub max_backoff: Duration,
    /// `connect-failure`, `reset`, `timeout`, or a status code like `"503"`.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<String>,
    /// Retries add at most this percentage to the original requests (per service; a route's
    /// override cannot change it).
    #[serde(default = "twenty")]
    pub budget_percent: u32,
    /// Retries allowed per second even when the percentage would allow none.
    #[serde(default = "ten")]
    pub min_retries_per_second: u32,
    /// Bodies up to this size are buffered so they can be sent again; larger ones (and bodies
    /// of unknown length) are sent once and never retried.
    #[serde(default = "d_64kib")]
    pub max_body_buffer: Size,
}

/// `[services.NAME.circuit_breaker]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// Opens when this share of requests in `window` failed, once `min_requests` were seen.
    #[serde(default = "half")]
    pub failure_rate: f64,
    #[serde(default = "twenty")]
    pub min_requests: u32,
    #[serde(default = "d_10s")]
    pub window: Duration,
    /// How long it stays open the first time; doubles on each reopening, up to `max_open_for`.
    #[serde(default = "d_5s")]
    pub open_for: Duration,
    #[serde(default = "d_60s")]
    pub max_open_for: Duration,
    /// Probe requests let through while half-open; that many successes close it.
    #[serde(default = "one")]
    pub half_open_requests: u32,
    /// Whether 5xx responses count as failures (connect errors, resets and timeouts always do;
    /// 4xx never).
    #[serde(default = "yes")]
    pub count_5xx: bool,
}

/// `fallback = { … }`: the response a route serves when its backend fails.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    pub content_type: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// `[services.NAME.tls]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA certificates (PEM) to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to send (SNI) and to verify, instead of the endpoint's host.
    pub server_name: Option<String>,
    /// Accept any server certificate. For tests and development only.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    #[default]
    RoundRobin,
    /// Power of two choices over in-flight requests.
    LeastRequest,
    Random,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllUnhealthy {
    /// Answer 503 `no_healthy_endpoint` at once.
    #[default]
    Reject,
    /// Spread requests over every endpoint, healthy or not.
    UseAll,
}

/// `[services.NAME.health_check]`: active checks of every endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default = "default_health_path")]
    pub path: String,
    #[serde(default = "d_5s")]
    pub interval: Duration,
    #[serde(default = "d_1s")]
    pub timeout: Duration,
    #[serde(default = "two")]
    pub healthy_threshold: u32,
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
    /// Statuses that count as healthy; default: 200–399.
    #[serde(default)]
    pub expected_statuses: Vec<u16>,
}

/// `[services.NAME.outlier_detection]`: passive ejection of failing endpoints.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Connection failures or 5xx responses in a row that eject an endpoint.
    #[serde(default = "five")]
    pub consecutive_failures: u32,
    /// First ejection; each further ejection in a row lasts one more of these.
    #[serde(default = "d_10s")]
    pub base_ejection_time: Duration,
    #[serde(default = "d_300s")]
    pub max_ejection_time: Duration,
}

/// A file in `routes/`: one frontend and its routes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendFile {
    pub frontend: FrontendConfig,
    #[serde(default)]
    pub route: Vec<Spanned<RouteConfig>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendConfig {
    pub name: Spanned<String>,
    pub path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    /// Default total deadline for the routes below.
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Spanned<String>,
    pub path: Spanned<String>,
    /// Default: every method.
    pub methods: Option<Vec<Spanned<String>>>,
    /// Request headers that must be present with exactly these values.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Total deadline; overrides the frontend's and the server's. It bounds all retries.
    pub timeout: Option<Duration>,
    /// Overrides the service's retry policy for this route.
    pub retry: Option<Spanned<RetryConfig>>,
    /// Allows retrying POST and PATCH on this route.
    #[serde(default)]
    pub idempotent: bool,
    /// Served when the backend fails (502, 503, 504).
    pub fallback: Option<Spanned<FallbackConfig>>,
    pub proxy: Option<Spanned<ProxyConfig>>,
    pub respond: Option<Spanned<RespondConfig>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    pub service: Spanned<String>,
    /// Upstream path template; default: the matched path with the frontend prefix stripped.
    pub path: Option<Spanned<String>>,
    /// Send the client's `Host` header upstream instead of the endpoint's.
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default = "yes")]
    pub forward_query: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    pub content_type: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_listen() -> OneOrMany<SocketAddr> {
    OneOrMany::One(SocketAddr::from(([0, 0, 0, 0], 8080)))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_routes_dir() -> PathBuf {
    PathBuf::from("routes")
}
fn default_filter() -> Spanned<String> {
    Spanned::new(0..0, "info".to_owned())
}
fn default_max_body() -> Size {
    Size(8 * 1024 * 1024)
}
fn default_pool_max_idle() -> usize {
    1024
}
fn default_status() -> u16 {
    200
}
fn yes() -> bool {
    true
}
fn default_health_path() -> String {
    "/health".to_owned()
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn five() -> u32 {
    5
}
fn d_5s() -> Duration {
    Duration::from_secs(5)
}
fn d_300s() -> Duration {
    Duration::from_secs(300)
}
fn default_retry_on() -> Vec<String> {
    ["connect-failure", "reset", "timeout", "502", "503", "504"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn one() -> u32 {
    1
}
fn ten() -> u32 {
    10
}
fn twenty() -> u32 {
    20
}
fn half() -> f64 {
    0.5
}
fn d_25ms() -> Duration {
    Duration::from_millis(25)
}
fn d_100ms() -> Duration {
    Duration::from_millis(100)
}
fn d_250ms() -> Duration {
    Duration::from_millis(250)
}
fn d_60s() -> Duration {
    Duration::from_secs(60)
}
fn d_64kib() -> Size {
    Size(64 * 1024)
}
fn d_1s() -> Duration {
    Duration::from_secs(1)
}
fn d_10s() -> Duration {
    Duration::from_secs(10)
}
fn d_30s() -> Duration {
    Duration::from_secs(30)
}
fn d_75s() -> Duration {
    Duration::from_secs(75)
}
fn d_90s() -> Duration {
    Duration::from_secs(90)
}
