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
#[serde(try_from = "RawDiscovery", into = "RawDiscovery")]
pub(crate) enum DiscoveryConfig {
    /// A/AAAA records of `dns`, each an endpoint at `port`.
    Dns {
        name: String,
        port: u16,
        https: bool,
    },
    /// SRV records of `dns_srv` (target, port, priority, weight).
    Srv { name: String, https: bool },
    /// Instances registered in etcd under `prefix`.
    Etcd { urls: Vec<String>, prefix: String },
}

impl DiscoveryConfig {
    /// Whether it asks DNS (and so depends on `[dns]`).
    pub(crate) fn uses_dns(&self) -> bool {
        !matches!(self, DiscoveryConfig::Etcd { .. })
    }
}

/// `discovery = { … }` as written: exactly one of `dns`, `dns_srv` or `etcd`, with the keys
/// that go with it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiscovery {
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// `http` (default) or `https`.
    #[serde(skip_serializing_if = "Option::is_none")]
    scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns_srv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etcd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
}

/// A `discovery` table that is not exactly one kind of discovery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DiscoveryError {
    #[error("discovery: give exactly one of `dns`, `dns_srv` or `etcd`")]
    Kinds,
    #[error("discovery: scheme `{0}` must be http or https")]
    Scheme(String),
    #[error("discovery: `port` must not be 0")]
    PortZero,
    #[error("discovery: `port` and `scheme` come from each registered instance's url with `etcd`")]
    EtcdPort,
    #[error("discovery: `etcd` needs `prefix`, like \"/services/NAME/\"")]
    EtcdPrefix,
    #[error("discovery: `etcd` needs at least one URL")]
    EtcdUrls,
    #[error("discovery: etcd URL `{0}` must be http://host:port")]
    EtcdUrl(String),
    #[error("discovery: `prefix` goes with `etcd`")]
    Prefix,
    #[error("discovery: `dns = \"{0}\"` needs `port`")]
    DnsPort(String),
    #[error("discovery: `port` comes from the SRV records; leave it out")]
    SrvPort,
}

impl TryFrom<RawDiscovery> for DiscoveryConfig {
    type Error = DiscoveryError;

    fn try_from(d: RawDiscovery) -> Result<Self, DiscoveryError> {
        let fail = |e: DiscoveryError| Err(e);
        let kinds = d.dns.is_some() as u8 + d.dns_srv.is_some() as u8 + d.etcd.is_some() as u8;
        if kinds != 1 {
            return fail(DiscoveryError::Kinds);
        }
        let https = match d.scheme.as_deref() {
            None | Some("http") => false,
            Some("https") => true,
            Some(other) => return fail(DiscoveryError::Scheme(other.to_owned())),
        };
        if d.port == Some(0) {
            return fail(DiscoveryError::PortZero);
        }
        if let Some(urls) = d.etcd {
            if d.port.is_some() || d.scheme.is_some() {
                return fail(DiscoveryError::EtcdPort);
            }
            let Some(prefix) = d.prefix.filter(|p| !p.is_empty()) else {
                return fail(DiscoveryError::EtcdPrefix);
            };
            if urls.is_empty() {
                return fail(DiscoveryError::EtcdUrls);
            }
            if let Some(bad) = urls.iter().find(|u| !u.starts_with("http://")) {
                return fail(DiscoveryError::EtcdUrl(bad.clone()));
            }
            return Ok(DiscoveryConfig::Etcd { urls, prefix });
        }
        if d.prefix.is_some() {
            return fail(DiscoveryError::Prefix);
        }
        if let Some(name) = d.dns {
            let Some(port) = d.port else {
                return fail(DiscoveryError::DnsPort(name));
            };
            return Ok(DiscoveryConfig::Dns { name, port, https });
        }
        if d.port.is_some() {
            return fail(DiscoveryError::SrvPort);
        }
        Ok(DiscoveryConfig::Srv {
            name: d.dns_srv.unwrap_or_default(),
            https,
        })
    }
}

impl From<DiscoveryConfig> for RawDiscovery {
    fn from(d: DiscoveryConfig) -> RawDiscovery {
        let scheme = |https: bool| Some(if https { "https" } else { "http" }.to_owned());
        match d {
            DiscoveryConfig::Dns { name, port, https } => RawDiscovery {
                dns: Some(name),
                port: Some(port),
                scheme: scheme(https),
                ..RawDiscovery::default()
            },
            DiscoveryConfig::Srv { name, https } => RawDiscovery {
                dns_srv: Some(name),
                scheme: scheme(https),
                ..RawDiscovery::default()
            },
            DiscoveryConfig::Etcd { urls, prefix } => RawDiscovery {
                etcd: Some(urls),
                prefix: Some(prefix),
                ..RawDiscovery::default()
            },
        }
    }
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
    /// Check with gRPC's `grpc.health.v1.Health/Check` for this service name (`""`: the
    /// server as a whole) instead of a GET of `path`.
    pub(crate) grpc: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(toml_text: &str) -> Result<DiscoveryConfig, String> {
        #[derive(Deserialize)]
        struct W {
            discovery: DiscoveryConfig,
        }
        toml::from_str::<W>(&format!("discovery = {toml_text}"))
            .map(|w| w.discovery)
            .map_err(|e| e.message().to_owned())
    }

    #[test]
    fn exactly_one_kind_of_discovery_with_its_own_keys() {
        assert_eq!(
            discovery(r#"{ dns = "a.svc", port = 80, scheme = "https" }"#),
            Ok(DiscoveryConfig::Dns {
                name: "a.svc".into(),
                port: 80,
                https: true
            })
        );
        assert_eq!(
            discovery(r#"{ dns_srv = "_http._tcp.a" }"#),
            Ok(DiscoveryConfig::Srv {
                name: "_http._tcp.a".into(),
                https: false
            })
        );
        assert!(matches!(
            discovery(r#"{ etcd = ["http://127.0.0.1:2379"], prefix = "/s/a/" }"#),
            Ok(DiscoveryConfig::Etcd { .. })
        ));
        for (bad, says) in [
            (r#"{ dns = "a", dns_srv = "b" }"#, "exactly one of"),
            (r#"{ port = 80 }"#, "exactly one of"),
            (r#"{ dns = "a" }"#, "needs `port`"),
            (r#"{ dns = "a", port = 0 }"#, "must not be 0"),
            (
                r#"{ dns = "a", port = 1, scheme = "ftp" }"#,
                "http or https",
            ),
            (r#"{ dns_srv = "a", port = 1 }"#, "SRV records"),
            (
                r#"{ dns = "a", port = 1, prefix = "/x" }"#,
                "goes with `etcd`",
            ),
            (r#"{ etcd = ["http://e:2379"] }"#, "needs `prefix`"),
            (r#"{ etcd = [], prefix = "/x" }"#, "at least one URL"),
            (
                r#"{ etcd = ["https://e"], prefix = "/x" }"#,
                "must be http://",
            ),
            (
                r#"{ etcd = ["http://e"], prefix = "/x", port = 1 }"#,
                "come from each",
            ),
            (
                r#"{ dns = "a", port = 1, colour = "red" }"#,
                "unknown field",
            ),
        ] {
            let err = discovery(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn discovery_round_trips_through_its_written_form() {
        for text in [
            r#"{ dns = "a.svc", port = 80, scheme = "https" }"#,
            r#"{ dns_srv = "_http._tcp.a" }"#,
            r#"{ etcd = ["http://127.0.0.1:2379"], prefix = "/s/a/" }"#,
        ] {
            let d = discovery(text).unwrap();
            let raw = RawDiscovery::from(d.clone());
            assert_eq!(DiscoveryConfig::try_from(raw).unwrap(), d);
        }
    }
}
