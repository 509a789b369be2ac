//! Builds one route from its config, in one place: its routing conditions (path, methods,
//! headers), its inherited settings, its backend (chosen by `BackendConfig`'s variant) and its
//! layers (`chain`). Every mistake is located in the route file; the route is built only when
//! it has none.
//!
//! Settings inherit server → frontend → route, the route overriding: `Inherited` holds what a
//! frontend passes down, `Inherited::route` applies a route's own values over it.

use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::layers::{auth_layer, cache_layer, plugin_layers, rate_limit_layer};
use super::{chain, Layers, Route, RouteService};
use crate::backend::proxy::{Proxy, ProxyOptions};
use crate::backend::respond::Respond;
use crate::backend::target::UpstreamPath;
use crate::config::{
    AuthRef, BackendConfig, ConfigErrors, FallbackConfig, ProxyConfig, RateLimitRef, RequireConfig,
    RespondConfig, RouteConfig, SourceFile,
};
use crate::context::RouteInfo;
use crate::layers::auth::Providers;
use crate::layers::cache::CacheStore;
use crate::layers::cors::CorsLayer;
use crate::layers::rate_limit::Limiters;
use crate::observe::metrics::Metrics;
use crate::resources::Resources;
use crate::routing::template::route_params;
use crate::routing::{RouteFilter, RouteSpec};
use crate::upstream::retry::RetryPolicy;
use crate::upstream::Upstream;

/// What every route of a compile can use.
pub(crate) struct BuildContext<'a> {
    /// The new snapshot's resources (its services' upstreams, …).
    pub(crate) resources: &'a Resources,
    /// Every service gateway.toml defines, built or not (sorted).
    pub(crate) defined: Vec<&'a str>,
    pub(crate) metrics: &'a Metrics,
    /// The `[auth.*]` providers.
    pub(crate) providers: &'a Providers,
    /// The `[rate_limits.*]` policies.
    pub(crate) limiters: &'a Limiters,
    /// `[server] trusted_proxies`.
    pub(crate) trusted: Arc<[ipnet::IpNet]>,
    /// The `[cache]` store (built when `[cache]` parsed).
    pub(crate) cache: Option<Arc<CacheStore>>,
    /// The compiled `[protos]`.
    pub(crate) protos: Option<prost_reflect::DescriptorPool>,
    /// The `[brokers.*]` connections.
    pub(crate) brokers:
        &'a std::collections::BTreeMap<String, Arc<crate::upstream::broker::Broker>>,
    /// Every broker gateway.toml defines, and its kind (`None`: its URL has no known scheme).
    pub(crate) broker_kinds:
        std::collections::BTreeMap<&'a str, Option<crate::upstream::broker::Kind>>,
    /// The Lua plugins of `[plugins] dir` (`None` when they did not load).
    pub(crate) plugins: Option<Arc<crate::layers::plugins::PluginSet>>,
    /// The reply subscriptions of `reply = "async"` routes, by broker.
    pub(crate) replies:
        &'a std::collections::BTreeMap<String, Arc<crate::backend::publish::operations::Replies>>,
}

/// Settings a frontend passes down to its routes (after applying `[server]` defaults).
#[derive(Debug, Clone)]
pub(crate) struct Inherited {
    /// The total deadline.
    pub(crate) timeout: Duration,
    /// Request bodies larger than this get 413.
    pub(crate) max_request_body: u64,
}

impl Inherited {
    /// A route's settings: its own where it has them, else these.
    fn route(&self, rc: &RouteConfig) -> Inherited {
        Inherited {
            timeout: rc.timeout.map_or(self.timeout, |t| t.get()),
            max_request_body: rc.max_request_body.map_or(self.max_request_body, |s| s.0),
        }
    }
}

/// The frontend a route belongs to.
pub(crate) struct Frontend<'a> {
    pub(crate) name: &'a str,
    /// `""` for none.
    pub(crate) prefix: &'a str,
    pub(crate) hosts: &'a [String],
    pub(crate) settings: &'a Inherited,
    pub(crate) file: &'a SourceFile,
    pub(crate) auth: Option<&'a toml::Spanned<AuthRef>>,
    pub(crate) require: Option<&'a toml::Spanned<RequireConfig>>,
    /// The identity headers any provider of this frontend sets: removed from every request
    /// of the frontend.
    pub(crate) strip: Arc<[HeaderName]>,
    pub(crate) cors: Option<CorsLayer>,
    pub(crate) rate_limit: Option<&'a toml::Spanned<RateLimitRef>>,
    pub(crate) cache: Option<&'a toml::Spanned<crate::config::RouteCache>>,
    pub(crate) plugins: Option<&'a toml::Spanned<Vec<toml::Spanned<String>>>>,
    pub(crate) plugin_config: &'a std::collections::BTreeMap<String, toml::Spanned<toml::Table>>,
}

/// A built route, ready for the router.
pub(crate) struct Built {
    pub(crate) route: Route,
    pub(crate) spec: RouteSpec,
    /// A route the gateway adds for this one: `GET …/operations/{operation}` of a publish
    /// route with `reply = "async"`, behind the same layers.
    pub(crate) also: Option<Box<Built>>,
}

/// Builds the route `rc` of `fe`, or records why not in `errors`.
pub(crate) fn build(
    cx: &BuildContext<'_>,
    fe: &Frontend<'_>,
    rc: &RouteConfig,
    errors: &mut ConfigErrors,
) -> Option<Built> {
    let file = fe.file;
    let rname = rc.name.get_ref().as_str();
    let before = errors.0.len();
    let mut fail = |span: Range<usize>, msg: String| errors.push(file.error_at(span, msg));
    if rname.is_empty() || rname.contains('/') {
        fail(
            rc.name.span(),
            format!("route `{rname}` must be non-empty and hold no `/`"),
        );
    }
    let params = match route_params(rc.path.get_ref()) {
        Ok(p) => p,
        Err(msg) => {
            fail(rc.path.span(), msg.to_string());
            Vec::new()
        }
    };
    let methods = methods(rc, &mut fail);
    let mut match_headers = Vec::new();
    for (k, v) in &rc.headers {
        match (HeaderName::from_str(k), HeaderValue::from_str(v)) {
            (Ok(k), Ok(v)) => match_headers.push((k, v)),
            _ => fail(
                rc.name.span(),
                format!(
                    "route `{rname}`: `headers` entry `{k}` is not a valid header name and value"
                ),
            ),
        }
    }
    let settings = fe.settings.route(rc);
    let fallback = rc
        .fallback
        .as_ref()
        .and_then(|f| match fallback(f.get_ref()) {
            Ok(r) => Some(r),
            Err(msg) => {
                fail(f.span(), format!("route `{rname}` fallback: {msg}"));
                None
            }
        });
    let id = format!("{}/{rname}", fe.name);
    let auth = auth_layer(cx, fe, rc, &id, &mut fail);
    let rate_limit = rate_limit_layer(cx, fe, rc, &id, &mut fail);
    let cache = cache_layer(cx, fe, rc, &id, &mut fail);
    let plugins = plugin_layers(cx, fe, rc, &id, &mut fail);
    // Plugins read the parameters (`ctx.params`).
    let plugins_read_params = !plugins.is_empty();
    let layers = Layers {
        plugins,
        fallback,
        cors: fe.cors.clone(),
        auth,
        rate_limit,
        cache,
        ..Layers::deadline(settings.timeout)
    };
    let full_path = if rc.path.get_ref() == "/" && !fe.prefix.is_empty() {
        fe.prefix.to_owned()
    } else {
        format!("{}{}", fe.prefix, rc.path.get_ref())
    };
    let mut operations = None;
    let service = match &rc.backend {
        BackendConfig::Proxy(p) => proxy(
            cx,
            fe,
            rc,
            p.get_ref(),
            &params,
            &settings,
            layers,
            &mut fail,
        ),
        BackendConfig::Aggregate(a) => {
            let facts = crate::backend::aggregate::RouteFacts {
                id: &id,
                params: &params,
                timeout: settings.timeout,
                resources: cx.resources,
                defined: &cx.defined,
                metrics: cx.metrics,
            };
            crate::backend::aggregate::build(&facts, a, &mut fail).map(|b| chain(b, layers))
        }
        BackendConfig::Grpc(g) => {
            let retry = route_retry(rc, &mut fail);
            service(cx, &g.get_ref().service, &mut fail).and_then(|upstream| {
                let facts = crate::backend::grpc::GrpcFacts {
                    route: rname,
                    pool: cx.protos.as_ref(),
                    retry: retry.or_else(|| upstream.retry.clone()),
                    upstream,
                    idempotent: rc.idempotent,
                    deadline: settings.timeout,
                    prefix_len: fe.prefix.len(),
                    params: &params,
                };
                crate::backend::grpc::build(&facts, g, &mut fail).map(|b| chain(b, layers))
            })
        }
        BackendConfig::Publish(p) => {
            let facts = crate::backend::publish::PublishFacts {
                route: &id,
                brokers: cx.brokers,
                defined: &cx.broker_kinds,
                replies: cx.replies,
                deadline: settings.timeout,
                full_path: &full_path,
            };
            match crate::backend::publish::build(&facts, p.get_ref()) {
                Ok(b) => b.map(|b| {
                    if let Some(r) = b.replies() {
                        operations = Some(chain(
                            crate::backend::publish::operations::Operation(r),
                            Layers {
                                fallback: None,
                                ..layers.clone()
                            },
                        ));
                    }
                    chain(b, layers)
                }),
                Err((span, e)) => {
                    fail(span, format!("route `{rname}`: {e}"));
                    None
                }
            }
        }
        BackendConfig::Respond(r) => match respond(r.get_ref()) {
            Ok(b) => Some(chain(b, layers)),
            Err(msg) => {
                fail(r.span(), format!("route `{rname}`: {msg}"));
                None
            }
        },
    };
    if errors.0.len() != before {
        return None;
    }
    let service = service?;
    // Only a proxy's path template reads the parameters today.
    let reads_params = plugins_read_params
        || match &rc.backend {
            BackendConfig::Proxy(p) => p.get_ref().path.is_some(),
            BackendConfig::Aggregate(_) => true,
            // Path parameters fill fields by name when no google.api.http rule matches.
            BackendConfig::Grpc(_) => true,
            BackendConfig::Respond(_) | BackendConfig::Publish(_) => false,
        };
    let (line, _) = file.locate(rc.name.span().start);
    let label = format!("route `{id}` ({}:{line})", file.path.display());
    let route_metrics = Arc::new(cx.metrics.route(fe.name, rname));
    let also = operations.map(|service| {
        let op = crate::backend::publish::operations::PARAM;
        Box::new(Built {
            spec: RouteSpec {
                full_path: format!("{}/operations/{{{op}}}", full_path.trim_end_matches('/')),
                hosts: fe.hosts.to_vec(),
                filter: RouteFilter {
                    methods: Some(Box::new([Method::GET])),
                    headers: match_headers.clone().into_boxed_slice(),
                },
                label: format!("{label}: its operations"),
            },
            route: Route {
                metrics: route_metrics.clone(),
                info: Arc::new(RouteInfo {
                    id: id.clone().into_boxed_str(),
                    params: params
                        .iter()
                        .map(|p| p.clone().into_boxed_str())
                        .chain(std::iter::once(op.into()))
                        .collect(),
                }),
                max_request_body: 0,
                cors: fe.cors.is_some(),
                service,
            },
            also: None,
        })
    });
    Some(Built {
        spec: RouteSpec {
            full_path,
            hosts: fe.hosts.to_vec(),
            filter: RouteFilter {
                methods,
                headers: match_headers.into_boxed_slice(),
            },
            label,
        },
        route: Route {
            metrics: route_metrics,
            info: Arc::new(RouteInfo {
                id: id.into_boxed_str(),
                params: if reads_params {
                    params.into_iter().map(String::into_boxed_str).collect()
                } else {
                    Box::default()
                },
            }),
            max_request_body: settings.max_request_body,
            cors: fe.cors.is_some(),
            service,
        },
        also,
    })
}

fn methods(rc: &RouteConfig, fail: &mut impl FnMut(Range<usize>, String)) -> Option<Box<[Method]>> {
    let list = rc.methods.as_ref()?;
    if list.is_empty() {
        fail(
            rc.name.span(),
            "`methods` is empty; leave it out to allow every method".into(),
        );
        return None;
    }
    let mut out = Vec::new();
    for m in list {
        let s = m.get_ref();
        match Method::from_str(s) {
            Ok(mm) if s.bytes().all(|b| !b.is_ascii_lowercase()) => out.push(mm),
            _ => fail(
                m.span(),
                format!("`{s}` is not an HTTP method (write methods in upper case, like \"GET\")"),
            ),
        }
    }
    Some(out.into_boxed_slice())
}

/// The proxy backend of a route, in its layers.
#[allow(clippy::too_many_arguments)]
fn proxy(
    cx: &BuildContext<'_>,
    fe: &Frontend<'_>,
    rc: &RouteConfig,
    pc: &ProxyConfig,
    params: &[String],
    settings: &Inherited,
    layers: Layers,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<RouteService> {
    let rname = rc.name.get_ref();
    let route_retry = route_retry(rc, fail);
    let target = match &pc.path {
        None => Some(UpstreamPath::StripPrefix(fe.prefix.len())),
        Some(t) => match UpstreamPath::template(t.get_ref(), params) {
            Ok(u) => Some(u),
            Err(msg) => {
                fail(t.span(), msg.to_string());
                None
            }
        },
    };
    let up = service(cx, &pc.service, fail)?;
    let mut upgrades = Vec::new();
    for u in &pc.upgrades {
        let name = u.get_ref().to_ascii_lowercase();
        if name == "h2c" {
            fail(
                u.span(),
                format!("route `{rname}`: `h2c` cannot be in `upgrades`: an upgraded HTTP/2 connection would carry requests past the gateway's routing"),
            );
        } else if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            fail(
                u.span(),
                format!("route `{rname}`: `{name}` in `upgrades` is not a protocol name"),
            );
        } else {
            upgrades.push(name.into_boxed_str());
        }
    }
    let opts = ProxyOptions {
        upgrades: upgrades.into(),
        target: target?,
        forward_query: pc.forward_query,
        preserve_host: pc.preserve_host,
        retry: route_retry.or_else(|| up.retry.clone()),
        idempotent: rc.idempotent,
        deadline: Some(settings.timeout),
    };
    Some(chain(Proxy::new(up.clone(), opts), layers))
}

/// A route's own retry policy, if it has one that parses.
fn route_retry(
    rc: &RouteConfig,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<RetryPolicy> {
    let rname = rc.name.get_ref();
    rc.retry
        .as_ref()
        .and_then(|r| match RetryPolicy::parse(r.get_ref()) {
            Ok(p) => Some(p),
            Err(msg) => {
                fail(r.span(), format!("route `{rname}` retry: {msg}"));
                None
            }
        })
}

/// The service a backend names: an error when it is not defined; `None` without one when it
/// is defined but did not compile (it has its own errors).
fn service(
    cx: &BuildContext<'_>,
    name: &toml::Spanned<String>,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<Arc<Upstream>> {
    let sname = name.get_ref();
    if !cx.defined.iter().any(|d| d == sname) {
        let known = if cx.defined.is_empty() {
            "none".to_owned()
        } else {
            cx.defined.join(", ")
        };
        fail(
            name.span(),
            format!("unknown service `{sname}` (defined services: {known})"),
        );
        return None;
    }
    cx.resources.get::<Upstream>(sname)
}

/// A `respond` or `fallback` table that cannot become a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RespondError {
    #[error("respond status {0} must be between 200 and 599")]
    Status(u16),
    #[error("respond header name `{0}` is not valid")]
    HeaderName(String),
    #[error("respond header `{0}` has an invalid value")]
    HeaderValue(String),
    #[error("content_type `{0}` is not a valid header value")]
    ContentType(String),
}

fn fallback(f: &FallbackConfig) -> Result<Respond, RespondError> {
    respond(&RespondConfig {
        status: f.status,
        body: f.body.clone(),
        content_type: f.content_type.clone(),
        headers: f.headers.clone(),
    })
}

fn respond(r: &RespondConfig) -> Result<Respond, RespondError> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| s.as_u16() >= 200 && s.as_u16() <= 599)
        .ok_or(RespondError::Status(r.status))?;
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        let name = HeaderName::from_str(k).map_err(|_| RespondError::HeaderName(k.clone()))?;
        let value = HeaderValue::from_str(v).map_err(|_| RespondError::HeaderValue(k.clone()))?;
        headers.append(name, value);
    }
    if let Some(ct) = &r.content_type {
        let v = HeaderValue::from_str(ct).map_err(|_| RespondError::ContentType(ct.clone()))?;
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    Ok(Respond::new(status, headers, Bytes::from(r.body.clone())))
}
