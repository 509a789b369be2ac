//! `routes/*.toml`: a frontend and its routes. A route's backend is one tagged enum
//! (`BackendConfig`), so "exactly one backend" is decided by serde.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use toml::Spanned;

use super::aggregate::AggregateConfig;
use super::auth::{AuthRef, CorsConfig, RequireConfig};
use super::broker::PublishConfig;
use super::cache::RouteCache;
use super::defaults::*;
use super::grpc::GrpcConfig;
use super::rate_limit::RateLimitRef;
use super::service::RetryConfig;
use super::units::{Duration, Size};

/// `fallback = { … }`: the response a route serves when its backend fails.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FallbackConfig {
    #[serde(default = "default_status")]
    pub(crate) status: u16,
    #[serde(default)]
    pub(crate) body: String,
    pub(crate) content_type: Option<String>,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
}

/// A file in `routes/`: one frontend and its routes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FrontendFile {
    pub(crate) frontend: FrontendConfig,
    #[serde(default)]
    pub(crate) route: Vec<Spanned<RouteConfig>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FrontendConfig {
    pub(crate) name: Spanned<String>,
    pub(crate) path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) hosts: Vec<Spanned<String>>,
    /// Default total deadline for the routes below.
    pub(crate) timeout: Option<Duration>,
    /// Default body limit for the routes below (overrides `[server] max_request_body`).
    pub(crate) max_request_body: Option<Size>,
    /// Authentication of the routes below (a route may say otherwise).
    pub(crate) auth: Option<Spanned<AuthRef>>,
    /// What the identity must have, for the routes below.
    pub(crate) require: Option<Spanned<RequireConfig>>,
    /// CORS for the routes below; preflights are answered by the gateway.
    pub(crate) cors: Option<Spanned<CorsConfig>>,
    /// Rate limits of the routes below (a route may say otherwise).
    pub(crate) rate_limit: Option<Spanned<RateLimitRef>>,
    /// Response caching of the routes below (a route may say otherwise).
    pub(crate) cache: Option<Spanned<RouteCache>>,
    /// Plugins of the routes below, outermost first (a route's own list replaces this).
    pub(crate) plugins: Option<Spanned<Vec<Spanned<String>>>>,
    /// Settings of each plugin, by name (`ctx.config`); a route's entry replaces this one.
    #[serde(default)]
    pub(crate) plugin_config: std::collections::BTreeMap<String, Spanned<toml::Table>>,
}

/// One `[[route]]`. Serde reads it through `RawRoute` (every key a route may have, unknown keys
/// rejected) and turns that into this, where the backend is one `BackendConfig`: a route with
/// no backend or with two is a parse error located at its table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "RawRoute", into = "RawRoute")]
pub(crate) struct RouteConfig {
    pub(crate) name: Spanned<String>,
    pub(crate) path: Spanned<String>,
    /// Default: every method.
    pub(crate) methods: Option<Vec<Spanned<String>>>,
    /// Request headers that must be present with exactly these values.
    pub(crate) headers: BTreeMap<String, String>,
    /// Total deadline; overrides the frontend's and the server's. It bounds all retries.
    pub(crate) timeout: Option<Duration>,
    /// Body limit; overrides the frontend's and the server's.
    pub(crate) max_request_body: Option<Size>,
    /// Overrides the service's retry policy for this route.
    pub(crate) retry: Option<Spanned<RetryConfig>>,
    /// Allows retrying POST and PATCH on this route.
    pub(crate) idempotent: bool,
    /// Served when the backend fails (502, 503, 504).
    pub(crate) fallback: Option<Spanned<FallbackConfig>>,
    /// Overrides the frontend's authentication (`"none"` opens the route explicitly).
    pub(crate) auth: Option<Spanned<AuthRef>>,
    /// Overrides the frontend's `require`.
    pub(crate) require: Option<Spanned<RequireConfig>>,
    /// Overrides the frontend's rate limits (`"none"` lifts them explicitly).
    pub(crate) rate_limit: Option<Spanned<RateLimitRef>>,
    /// Overrides the frontend's caching (`false` turns it off).
    pub(crate) cache: Option<Spanned<RouteCache>>,
    /// Overrides the frontend's plugins (`[]` runs none).
    pub(crate) plugins: Option<Spanned<Vec<Spanned<String>>>>,
    /// Settings of each plugin, by name (over the frontend's entry for the same plugin).
    pub(crate) plugin_config: std::collections::BTreeMap<String, Spanned<toml::Table>>,
    /// What answers the route: exactly one of the backend keys.
    pub(crate) backend: BackendConfig,
}

/// The backend of a route, by the key that names it. A new kind of backend (`aggregate`,
/// `grpc`, `publish`) is a new variant here, a field of `RawRoute`, and a match arm in
/// `route::build`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BackendConfig {
    Proxy(Spanned<ProxyConfig>),
    Respond(Spanned<RespondConfig>),
    Aggregate(Spanned<AggregateConfig>),
    Grpc(Spanned<GrpcConfig>),
    Publish(Spanned<PublishConfig>),
}

impl BackendConfig {
    /// The config key of this backend.
    pub(crate) fn key(&self) -> &'static str {
        match self {
            BackendConfig::Proxy(_) => "proxy",
            BackendConfig::Respond(_) => "respond",
            BackendConfig::Aggregate(_) => "aggregate",
            BackendConfig::Grpc(_) => "grpc",
            BackendConfig::Publish(_) => "publish",
        }
    }
}

/// What serde reads for a route, before the backend is chosen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    name: Spanned<String>,
    path: Spanned<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    methods: Option<Vec<Spanned<String>>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_request_body: Option<Size>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<Spanned<RetryConfig>>,
    #[serde(default)]
    idempotent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback: Option<Spanned<FallbackConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<Spanned<AuthRef>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    require: Option<Spanned<RequireConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_limit: Option<Spanned<RateLimitRef>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<Spanned<RouteCache>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plugins: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    plugin_config: std::collections::BTreeMap<String, Spanned<toml::Table>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<Spanned<ProxyConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    respond: Option<Spanned<RespondConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aggregate: Option<Spanned<AggregateConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc: Option<Spanned<GrpcConfig>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publish: Option<Spanned<PublishConfig>>,
}

/// A route without exactly one backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route `{route}` must have exactly one backend: `proxy`, `respond`, `aggregate`, `grpc` or `publish` (it has {}{})", .found.len(), if .found.is_empty() { String::new() } else { format!(": {}", .found.join(", ")) })]
pub(crate) struct BackendChoiceError {
    route: String,
    found: Vec<&'static str>,
}

impl TryFrom<RawRoute> for RouteConfig {
    type Error = BackendChoiceError;

    fn try_from(r: RawRoute) -> Result<Self, BackendChoiceError> {
        let mut found = Vec::new();
        if let Some(p) = r.proxy {
            found.push(BackendConfig::Proxy(p));
        }
        if let Some(p) = r.respond {
            found.push(BackendConfig::Respond(p));
        }
        if let Some(p) = r.aggregate {
            found.push(BackendConfig::Aggregate(p));
        }
        if let Some(p) = r.grpc {
            found.push(BackendConfig::Grpc(p));
        }
        if let Some(p) = r.publish {
            found.push(BackendConfig::Publish(p));
        }
        let name = r.name.get_ref();
        if found.len() != 1 {
            return Err(BackendChoiceError {
                route: name.clone(),
                found: found.iter().map(BackendConfig::key).collect(),
            });
        }
        let backend = found.remove(0);
        Ok(RouteConfig {
            name: r.name,
            path: r.path,
            methods: r.methods,
            headers: r.headers,
            timeout: r.timeout,
            max_request_body: r.max_request_body,
            retry: r.retry,
            idempotent: r.idempotent,
            fallback: r.fallback,
            auth: r.auth,
            require: r.require,
            rate_limit: r.rate_limit,
            cache: r.cache,
            plugins: r.plugins,
            plugin_config: r.plugin_config,
            backend,
        })
    }
}

impl From<RouteConfig> for RawRoute {
    fn from(r: RouteConfig) -> RawRoute {
        let (mut proxy, mut respond, mut aggregate, mut grpc, mut publish) =
            (None, None, None, None, None);
        match r.backend {
            BackendConfig::Proxy(p) => proxy = Some(p),
            BackendConfig::Respond(p) => respond = Some(p),
            BackendConfig::Aggregate(p) => aggregate = Some(p),
            BackendConfig::Grpc(p) => grpc = Some(p),
            BackendConfig::Publish(p) => publish = Some(p),
        }
        RawRoute {
            name: r.name,
            path: r.path,
            methods: r.methods,
            headers: r.headers,
            timeout: r.timeout,
            max_request_body: r.max_request_body,
            retry: r.retry,
            idempotent: r.idempotent,
            fallback: r.fallback,
            auth: r.auth,
            require: r.require,
            rate_limit: r.rate_limit,
            cache: r.cache,
            plugins: r.plugins,
            plugin_config: r.plugin_config,
            proxy,
            respond,
            aggregate,
            grpc,
            publish,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProxyConfig {
    pub(crate) service: Spanned<String>,
    /// Upstream path template; default: the matched path with the frontend prefix stripped.
    pub(crate) path: Option<Spanned<String>>,
    /// Send the client's `Host` header upstream instead of the endpoint's.
    #[serde(default)]
    pub(crate) preserve_host: bool,
    #[serde(default = "yes")]
    pub(crate) forward_query: bool,
    /// Protocols a client may upgrade to through this route (`Upgrade:`); others are not
    /// forwarded (the request goes on without `Upgrade`). `h2c` can never be listed.
    #[serde(default = "default_upgrades")]
    pub(crate) upgrades: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RespondConfig {
    #[serde(default = "default_status")]
    pub(crate) status: u16,
    #[serde(default)]
    pub(crate) body: String,
    pub(crate) content_type: Option<String>,
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, String>,
}
