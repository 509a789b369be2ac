//! The layers of a route, built from its (inherited) settings: authentication, the rate limits
//! and the response cache. Each returns `None` when the route has none of it.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::build::{BuildContext, Frontend};
use super::chain::BoxLayer;
use super::RouteService;
use crate::config::{AuthRef, CacheScope, RateKey, RouteConfig};
use crate::layers::auth::{AuthLayer, AuthPolicy, Require};
use crate::layers::cache::{CacheLayer, RouteCache, RESULTS as CACHE_RESULTS};
use crate::layers::plugins::PluginLayer;
use crate::layers::rate_limit::{RateLimitLayer, RouteLimiter, RoutePolicy, OUTCOMES};

/// The route's authentication layer: its providers (its own `auth`, else the frontend's),
/// its `require`, and the frontend's identity headers to strip. `None` when there is nothing
/// to do (no auth anywhere in the frontend).
pub(super) fn auth_layer(
    cx: &BuildContext<'_>,
    fe: &Frontend<'_>,
    rc: &RouteConfig,
    id: &str,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<AuthLayer> {
    let auth = rc.auth.as_ref().or(fe.auth);
    let names = auth.map(|a| a.get_ref().names()).unwrap_or_default();
    let span = auth.map_or(0..0, |a| a.span());
    let mut providers = Vec::new();
    for n in names {
        if n == "none" {
            fail(
                span.clone(),
                "`none` cannot be one of several providers; write `auth = \"none\"`".into(),
            );
            continue;
        }
        match cx.providers.get(n) {
            Some(p) => providers.push(p.clone()),
            None => {
                let known = cx.providers.names();
                fail(
                    span.clone(),
                    format!(
                        "unknown auth provider `{}` (defined: {})",
                        n,
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
    }
    let require = rc.require.as_ref().or(fe.require);
    if let Some(r) = require {
        if providers.is_empty()
            && (!r.get_ref().scopes.is_empty() || !r.get_ref().claims.is_empty())
        {
            fail(
                r.span(),
                format!("route `{}`: `require` needs `auth`", rc.name.get_ref()),
            );
        }
    }
    if providers.is_empty() && fe.strip.is_empty() {
        return None;
    }
    let require = require.map_or_else(Require::default, |r| Require {
        scopes: r.get_ref().scopes.clone().into(),
        claims: r
            .get_ref()
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_boxed_slice()))
            .collect(),
    });
    let ok = providers
        .iter()
        .map(|p| {
            cx.metrics
                .auth_total
                .with_label_values(&[id, p.name(), "ok"])
        })
        .collect();
    Some(AuthLayer::new(AuthPolicy {
        ok,
        providers,
        require,
        strip: fe.strip.clone(),
        outcomes: cx.metrics.auth_total.clone(),
        route: Arc::from(id),
    }))
}

/// The route's response cache: its own `cache`, else the frontend's (`false`: none).
pub(super) fn cache_layer(
    cx: &BuildContext<'_>,
    fe: &Frontend<'_>,
    rc: &RouteConfig,
    id: &str,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<CacheLayer> {
    let cfg = rc.cache.as_ref().or(fe.cache)?;
    let settings = cfg.get_ref().settings()?;
    let rname = rc.name.get_ref();
    let mut vary = Vec::new();
    for v in &settings.vary {
        match HeaderName::from_bytes(v.get_ref().as_bytes()) {
            Ok(n) => vary.push(n),
            Err(_) => fail(
                v.span(),
                format!(
                    "route `{rname}` cache: `{}` is not a header name",
                    v.get_ref()
                ),
            ),
        }
    }
    let key_query = settings.key_query.as_ref().map(|names| {
        for n in names.iter().filter(|n| n.get_ref().is_empty()) {
            fail(
                n.span(),
                format!("route `{rname}` cache: a `key_query` name is empty"),
            );
        }
        names
            .iter()
            .map(|n| Box::from(n.get_ref().as_str()))
            .collect::<Box<[Box<str>]>>()
    });
    // The route's effective authentication: its own `auth` (`"none"` opens it), else the
    // frontend's.
    let authenticated = rc
        .auth
        .as_ref()
        .or(fe.auth)
        .is_some_and(|a| !a.get_ref().names().is_empty());
    let per_identity = match settings.scope.as_ref().map(|s| (*s.get_ref(), s.span())) {
        None => authenticated,
        Some((CacheScope::Shared, _)) => false,
        Some((CacheScope::Private, span)) => {
            if !authenticated {
                fail(
                    span,
                    format!("route `{rname}` cache: `scope = \"private\"` needs `auth` on the route or its frontend"),
                );
            }
            true
        }
    };
    let store = cx.cache.clone()?;
    Some(CacheLayer::new(RouteCache {
        store,
        route: Arc::from(id),
        ttl: settings.ttl.map(|t| t.get()),
        stale_while_revalidate: settings
            .stale_while_revalidate
            .map_or(Duration::ZERO, |d| d.get()),
        stale_if_error: settings.stale_if_error.map_or(Duration::ZERO, |d| d.get()),
        vary: vary.into(),
        key_query,
        per_identity,
        results: CACHE_RESULTS.map(|r| cx.metrics.cache_total.with_label_values(&[id, r])),
    }))
}

/// The route's rate limits: its own `rate_limit`, else the frontend's (`"none"`: none).
pub(super) fn rate_limit_layer(
    cx: &BuildContext<'_>,
    fe: &Frontend<'_>,
    rc: &RouteConfig,
    id: &str,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<RateLimitLayer> {
    let named = rc.rate_limit.as_ref().or(fe.rate_limit)?;
    let span = named.span();
    // A claim or consumer exists only where some provider can set it: on a route with no
    // auth in a frontend with none, such a key could never have a value. (A route that opens
    // an authenticated frontend, `auth = "none"`, counts by the IP fallback.)
    let has_auth =
        |a: Option<&toml::Spanned<AuthRef>>| a.is_some_and(|a| !a.get_ref().names().is_empty());
    let authenticated = has_auth(rc.auth.as_ref()) || has_auth(fe.auth);
    let mut limiters = Vec::new();
    for n in named.get_ref().names() {
        if n == "none" {
            fail(
                span.clone(),
                "`none` cannot be one of several policies; write `rate_limit = \"none\"`".into(),
            );
            continue;
        }
        let Some(l) = cx.limiters.get(n) else {
            if cx.limiters.is_defined(n) {
                continue;
            }
            let known = cx.limiters.names();
            fail(
                span.clone(),
                format!(
                    "unknown rate limit `{n}` (defined: {})",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
            continue;
        };
        if matches!(l.key, RateKey::Claim(_) | RateKey::Consumer) && !authenticated {
            fail(
                span.clone(),
                format!(
                    "route `{}`: rate limit `{n}` is counted by `{}`, which needs `auth` on the route or its frontend",
                    rc.name.get_ref(),
                    l.key
                ),
            );
            continue;
        }
        limiters.push(RouteLimiter {
            counters: OUTCOMES.map(|o| {
                cx.metrics
                    .rate_limit_total
                    .with_label_values(&[id, &l.name, o])
            }),
            limiter: l.clone(),
        });
    }
    if limiters.is_empty() {
        return None;
    }
    let items: Vec<&str> = limiters
        .iter()
        .filter(|l| l.limiter.headers)
        .map(|l| &*l.limiter.policy_items)
        .collect();
    let policy_header = (!items.is_empty())
        .then(|| HeaderValue::from_str(&items.join(", ")).ok())
        .flatten();
    Some(RateLimitLayer::new(RoutePolicy {
        local_only: limiters.iter().all(|l| l.limiter.shared.is_none()),
        limiters: limiters.into(),
        route: Arc::from(id),
        trusted: cx.trusted.clone(),
        policy_header,
    }))
}

/// The route's plugins (its own list, else its frontend's), outermost first: each a Lua script
/// of `[plugins] dir` or a registered Rust plugin, with its `plugin_config` table (the route's
/// entry, else the frontend's).
pub(super) fn plugin_layers(
    cx: &BuildContext<'_>,
    fe: &Frontend<'_>,
    rc: &RouteConfig,
    id: &str,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Vec<BoxLayer> {
    let rname = rc.name.get_ref();
    let list = rc.plugins.as_ref().or(fe.plugins);
    let names: Vec<&toml::Spanned<String>> = list
        .map(|l| l.get_ref().iter().collect())
        .unwrap_or_default();
    for (k, v) in &rc.plugin_config {
        if !names.iter().any(|n| n.get_ref() == k) {
            fail(
                v.span(),
                format!(
                    "route `{rname}`: plugin_config.{k}: `{k}` is not one of this route's plugins"
                ),
            );
        }
    }
    let mut out = Vec::new();
    for name in names {
        let n = name.get_ref().as_str();
        let config = rc
            .plugin_config
            .get(n)
            .or_else(|| fe.plugin_config.get(n))
            .map(|c| c.get_ref().clone())
            .unwrap_or_default();
        if let Some(set) = cx.plugins.as_ref().filter(|s| s.has(n)) {
            match PluginLayer::new(
                set,
                n,
                id,
                &config,
                cx.metrics,
                cx.trusted.clone(),
                fe.prefix,
            ) {
                Ok(l) => out.push(Arc::new(move |inner: RouteService| {
                    let l = l.clone();
                    RouteService::from_fn(move |req| l.call(&inner, req))
                }) as BoxLayer),
                Err(e) => fail(name.span(), format!("route `{rname}`: {e}")),
            }
        } else if let Some(make) = crate::layers::plugins::rust::registered(n) {
            // Built once per route, here, to report its config errors; wrapped per stack.
            let probe = make(
                &config,
                rust_inner(RouteService::from_fn(|_| {
                    Box::pin(async {
                        Err::<http::Response<crate::backend::RespBody>, _>("unused".into())
                    })
                })),
            );
            let n_owned = n.to_owned();
            match probe {
                Ok(_) => out.push(Arc::new(move |inner: RouteService| {
                    match make(&config, rust_inner(inner.clone())) {
                        Ok(svc) => RouteService::from_fn(
                            move |req: http::Request<crate::body::ReqBody>| {
                                let svc = svc.clone();
                                Box::pin(async move {
                                    use tower::ServiceExt;
                                    let resp = svc
                                        .oneshot(req.map(crate::layers::plugins::rust::RequestBody))
                                        .await?;
                                    Ok(resp.map(|b| b.0))
                                })
                            },
                        ),
                        // Built once above with the same table; should it fail now, the
                        // route fails closed (500), never runs without its plugin.
                        Err(msg) => {
                            tracing::error!(plugin = %n_owned, error = ?msg, "Rust plugin could not be built");
                            RouteService::from_fn(|_| {
                                Box::pin(async {
                                    Err(crate::error::Problem::new(
                                        http::StatusCode::INTERNAL_SERVER_ERROR,
                                        "plugin_error",
                                        "A plugin of this route failed",
                                    )
                                    .into())
                                })
                            })
                        }
                    }
                }) as BoxLayer),
                Err(msg) => fail(name.span(), format!("route `{rname}`: plugin `{n}`: {msg}")),
            }
        } else {
            let known = cx
                .plugins
                .as_ref()
                .map(|s| s.names().join(", "))
                .unwrap_or_default();
            let dir = cx
                .plugins
                .as_ref()
                .map_or_else(String::new, |s| s.dir.display().to_string());
            fail(
                name.span(),
                format!(
                    "route `{rname}`: unknown plugin `{n}` (no `{n}.lua` in {dir}, and no Rust plugin of that name; plugins there: {})",
                    if known.is_empty() { "none" } else { &known }
                ),
            );
        }
    }
    out
}

/// A route's erased stack as the service a Rust plugin's layer wraps.
fn rust_inner(inner: RouteService) -> crate::layers::plugins::rust::PluginService {
    use crate::layers::plugins::rust::{BoxError, RequestBody, ResponseBody};
    tower::util::BoxCloneSyncService::new(tower::service_fn(
        move |req: http::Request<RequestBody>| {
            let call = inner.call(req.map(|b| b.0));
            async move {
                let resp = call.await?;
                Ok::<_, BoxError>(resp.map(ResponseBody))
            }
        },
    ))
}
