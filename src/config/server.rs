//! `gateway.toml`'s own settings: `[server]`, `[admin]`, `[routes]`, `[log]`, `[dns]`, and the
//! top-level `GatewayConfig` that holds every table (each feature adds its own file and field).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::defaults::*;
use super::service::ServiceConfig;
use super::units::{nonzero_count, nonzero_size, Duration, Size};

/// `gateway.toml`: the gateway's own settings and the shared definitions.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub(crate) server: ServerConfig,
    #[serde(default)]
    pub(crate) admin: AdminConfig,
    #[serde(default)]
    pub(crate) routes: RoutesConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub(crate) dns: DnsConfig,
    #[serde(default)]
    pub(crate) services: BTreeMap<String, Spanned<ServiceConfig>>,
    #[serde(default)]
    pub(crate) auth: super::auth::AuthConfig,
    /// The store of `store = "redis"` rate limits.
    pub(crate) redis: Option<Spanned<super::rate_limit::RedisConfig>>,
    #[serde(default)]
    pub(crate) rate_limits: super::rate_limit::RateLimits,
    /// The response cache of routes with `cache` (defaults when absent).
    pub(crate) cache: Option<Spanned<super::cache::CacheConfig>>,
    /// The `.proto` files of `grpc` routes.
    pub(crate) protos: Option<Spanned<super::grpc::ProtosConfig>>,
    /// Message brokers that `publish` routes send to.
    #[serde(default)]
    pub(crate) brokers: BTreeMap<String, Spanned<super::broker::BrokerConfig>>,
    /// Broker → HTTP bridges.
    #[serde(default)]
    pub(crate) consumer: Vec<Spanned<super::broker::ConsumerConfig>>,
    /// Lua plugins: their folder and limits.
    #[serde(default)]
    pub(crate) plugins: super::plugins::PluginsConfig,
}

/// One address or a list of them (`listen = "…"` or `listen = ["…", "…"]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub(crate) fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerConfig {
    #[serde(default = "default_listen")]
    pub(crate) listen: OneOrMany<SocketAddr>,
    pub(crate) tls: Option<Spanned<TlsConfig>>,
    /// Total deadline of one request unless its route says otherwise.
    #[serde(default = "d_30s")]
    pub(crate) request_timeout: Duration,
    /// Bodies larger than this get 413 (a frontend or route may say otherwise).
    #[serde(default = "default_max_body")]
    pub(crate) max_request_body: Size,
    /// The request line and headers together; beyond it, 431.
    #[serde(default = "d_32kib", deserialize_with = "nonzero_size")]
    pub(crate) max_request_head: Size,
    /// Header fields in one request; beyond it, 431.
    #[serde(default = "hundred", deserialize_with = "nonzero_count")]
    pub(crate) max_header_count: usize,
    /// One header field (name and value); beyond it, 431.
    #[serde(default = "d_8kib", deserialize_with = "nonzero_size")]
    pub(crate) max_header_size: Size,
    /// The request target; beyond it, 414.
    #[serde(default = "d_8kib", deserialize_with = "nonzero_size")]
    pub(crate) max_uri_length: Size,
    /// Header names with `_`: `drop` (default), `reject` (400) or `allow`.
    #[serde(default)]
    pub(crate) underscores_in_headers: Underscores,
    /// Requests in flight across the gateway; beyond it, 503 `overloaded` at once. 0: no limit.
    #[serde(default)]
    pub(crate) max_concurrent_requests: usize,
    /// Open client connections; beyond it, new connections are closed at once. 0: no limit.
    #[serde(default)]
    pub(crate) max_connections: usize,
    /// Peers whose X-Forwarded-* and X-Request-Id headers are believed.
    #[serde(default)]
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    /// A client must send its complete request head within this time.
    #[serde(default = "d_10s")]
    pub(crate) header_read_timeout: Duration,
    /// An HTTP/1 connection with no request for this long is closed.
    #[serde(default = "d_75s")]
    pub(crate) keep_alive_timeout: Duration,
    /// On SIGTERM, in-flight requests get this long to finish.
    #[serde(default = "d_30s")]
    pub(crate) shutdown_grace: Duration,
    /// Threads that serve client connections, each with its own event loop and upstream
    /// connection pools. 0: one per CPU the process may run on.
    #[serde(default)]
    pub(crate) workers: usize,
    /// Requests per client IP before routing (an abuse guard); beyond it, 429.
    pub(crate) ip_rate_limit: Option<Spanned<super::rate_limit::IpRateLimitConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls: None,
            request_timeout: d_30s(),
            max_request_body: default_max_body(),
            max_request_head: d_32kib(),
            max_header_count: hundred(),
            max_header_size: d_8kib(),
            max_uri_length: d_8kib(),
            underscores_in_headers: Underscores::default(),
            trusted_proxies: Vec::new(),
            max_concurrent_requests: 0,
            max_connections: 0,
            header_read_timeout: d_10s(),
            keep_alive_timeout: d_75s(),
            shutdown_grace: d_30s(),
            workers: 0,
            ip_rate_limit: None,
        }
    }
}

/// What to do with request header names that contain `_`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Underscores {
    /// Removed before the request goes on (nginx's default).
    #[default]
    Drop,
    /// 400 bad_request.
    Reject,
    /// Forwarded as they are.
    Allow,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub(crate) listen: Spanned<SocketAddr>,
    /// Bearer token required for everything but `/healthz` and `/readyz`. Required when
    /// `listen` is not a loopback address.
    pub(crate) token: Option<Spanned<String>>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoutesConfig {
    #[serde(default = "default_routes_dir")]
    pub(crate) dir: PathBuf,
    /// Reload when gateway.toml or a route file changes.
    #[serde(default = "yes")]
    pub(crate) watch: bool,
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
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub(crate) format: LogFormat,
    /// A `RUST_LOG`-style filter; the `RUST_LOG` variable overrides it.
    #[serde(default = "default_filter")]
    pub(crate) filter: Spanned<String>,
    /// One event per request on target `gatehouse::access`.
    #[serde(default = "yes")]
    pub(crate) access_log: bool,
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

/// `[dns]`: the resolver used by `dns` and `dns_srv` discovery.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DnsConfig {
    /// Nameservers (UDP, with TCP fallback); empty: the system resolver (/etc/resolv.conf).
    #[serde(default)]
    pub(crate) servers: Vec<SocketAddr>,
    /// Re-resolve no sooner than this, even if the TTL is shorter.
    #[serde(default = "d_1s")]
    pub(crate) min_refresh: Duration,
    /// Re-resolve no later than this, even if the TTL is longer.
    #[serde(default = "d_30s")]
    pub(crate) max_refresh: Duration,
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
