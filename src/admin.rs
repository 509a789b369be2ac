//! The admin listener (default 127.0.0.1:9901), separate from traffic: `/healthz` (the process
//! is alive), `/readyz` (config loaded, listeners up, required services have an endpoint),
//! `/metrics` (Prometheus text), `GET /admin/config` (the effective config, secrets redacted,
//! and the last reload's outcome), `GET /admin/services` (endpoints, health, circuits) and
//! `POST /admin/reload`; `GET /admin/cache` (what the response cache holds) and
//! `POST /admin/cache/purge?url=…|prefix=…|route=…|all=true`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::Live;
use crate::layers::auth::api_key::ct_eq;

pub(crate) fn router(live: Arc<Live>) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/admin/config", get(config))
        .route("/admin/services", get(services))
        .route("/admin/reload", post(reload))
        .route("/admin/cache", get(cache_stats))
        .route("/admin/cache/purge", post(cache_purge))
        .route_layer(middleware::from_fn_with_state(live.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(live)
}

/// With `[admin] token` set (the current config's), every route but `/healthz` and `/readyz`
/// needs `Authorization: Bearer <token>`.
async fn require_token(State(live): State<Arc<Live>>, req: Request, next: Next) -> Response {
    let expected = live.snapshot().admin_token.clone();
    let Some(expected) = expected else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if ct_eq(given, expected.as_bytes()) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"gatehouse-admin\"")],
        Json(json!({"error": "unauthorized", "detail": "send Authorization: Bearer <[admin] token>"})),
    )
        .into_response()
}

pub(crate) async fn serve(listener: TcpListener, live: Arc<Live>, mut stop: watch::Receiver<bool>) {
    let app = router(live);
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// Ready when the listeners are up and every `required` service has an available endpoint.
async fn readyz(State(live): State<Arc<Live>>) -> Response {
    if !live.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or stopping\n",
        )
            .into_response();
    }
    let gw = live.snapshot();
    let missing: Vec<&str> = gw
        .services
        .values()
        .filter(|u| u.required && u.available_endpoints() == 0)
        .map(|u| &*u.name)
        .collect();
    let brokers: Vec<&str> = gw
        .brokers
        .values()
        .filter(|b| b.required && !b.connected())
        .map(|b| &*b.name)
        .collect();
    if missing.is_empty() && brokers.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut msg = String::from("not ready:");
        if !missing.is_empty() {
            msg.push_str(&format!(
                " no available endpoint for required service(s): {};",
                missing.join(", ")
            ));
        }
        if !brokers.is_empty() {
            msg.push_str(&format!(
                " required broker(s) not connected: {};",
                brokers.join(", ")
            ));
        }
        msg.pop();
        msg.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, msg).into_response()
    }
}

/// Every service with its endpoints, their health, in-flight requests and ejection state.
async fn services(State(live): State<Arc<Live>>) -> Response {
    let gw = live.snapshot();
    let list: Vec<Value> = gw
        .services
        .values()
        .map(|u| {
            let endpoints: Vec<Value> = u
                .endpoints()
                .endpoints
                .iter()
                .map(|e| {
                    json!({
                        "url": &*e.url,
                        "weight": e.weight,
                        "available": e.available(),
                        "healthy": e.healthy(),
                        "ejected": e.ejected_for_ms() > 0,
                        "ejected_for_ms": e.ejected_for_ms(),
                        "in_flight": e.in_flight(),
                        "consecutive_failures": e.consecutive_failures(),
                    })
                })
                .collect();
            json!({
                "name": &*u.name,
                "circuit": u.breaker.as_ref().map(|b| json!({
                    "state": b.state_name(),
                    "open_for_ms": b.open_for_ms(),
                })),
                "bulkhead": u.bulkhead.as_ref().map(|b| json!({
                    "max_concurrent_requests": b.max(),
                    "in_use": b.in_use(),
                })),
                "load_balancing": u.load_balancing,
                "required": u.required,
                "available_endpoints": u.available_endpoints(),
                "endpoints": endpoints,
            })
        })
        .collect();
    Json(json!({ "generation": gw.generation, "services": list })).into_response()
}

async fn metrics(State(live): State<Arc<Live>>) -> Response {
    let gw = live.snapshot();
    let gauge = &live.metrics.upstream_endpoints;
    for u in gw.services.values() {
        let (mut available, mut unhealthy, mut ejected) = (0, 0, 0);
        for e in u.endpoints().endpoints.iter() {
            if !e.healthy() {
                unhealthy += 1;
            } else if e.ejected_for_ms() > 0 {
                ejected += 1;
            } else {
                available += 1;
            }
        }
        gauge
            .with_label_values(&[&*u.name, "available"])
            .set(available);
        gauge
            .with_label_values(&[&*u.name, "unhealthy"])
            .set(unhealthy);
        gauge.with_label_values(&[&*u.name, "ejected"]).set(ejected);
        if let Some(b) = &u.breaker {
            live.metrics
                .circuit_state
                .with_label_values(&[&*u.name])
                .set(i64::from(b.state()));
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        live.metrics.render(),
    )
        .into_response()
}

async fn config(State(live): State<Arc<Live>>) -> Response {
    let gw = live.snapshot();
    #[derive(serde::Serialize)]
    struct Doc<'a, S> {
        generation: u64,
        config_path: String,
        gateway: &'a serde_json::value::RawValue,
        frontends: &'a serde_json::value::RawValue,
        last_reload: S,
    }
    Json(Doc {
        generation: gw.generation,
        config_path: live.config_path.display().to_string(),
        gateway: &gw.config.gateway,
        frontends: &gw.config.frontends,
        last_reload: live.status(),
    })
    .into_response()
}

async fn reload(State(live): State<Arc<Live>>) -> Response {
    match live.reload("admin-api").await {
        Ok(generation) => Json(json!({
            "result": "success",
            "generation": generation,
            "restart_required": live.status().restart_required,
        }))
        .into_response(),
        Err(errors) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({
                "result": "failure",
                "generation": live.snapshot().generation,
                "errors": errors.0.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
    }
}

/// What `POST /admin/cache/purge` drops: one of `url` (a URL as clients request it), `prefix`
/// (every URL that starts with it), `route` (`frontend/route`: everything it stored), `all`.
#[derive(serde::Deserialize)]
struct Purge {
    url: Option<String>,
    prefix: Option<String>,
    route: Option<String>,
    #[serde(default)]
    all: bool,
}

fn cache_store(live: &Live) -> Option<Arc<crate::layers::cache::CacheStore>> {
    live.snapshot()
        .resources
        .get::<crate::layers::cache::CacheStore>("cache")
}

async fn cache_stats(State(live): State<Arc<Live>>) -> Response {
    let Some(store) = cache_store(&live) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "no_cache"}))).into_response();
    };
    store.settle();
    Json(json!({"urls": store.urls(), "bytes": store.bytes()})).into_response()
}

async fn cache_purge(
    State(live): State<Arc<Live>>,
    axum::extract::Query(p): axum::extract::Query<Purge>,
) -> Response {
    let Some(store) = cache_store(&live) else {
        return (StatusCode::NOT_FOUND, Json(json!({"error": "no_cache"}))).into_response();
    };
    let chosen = [
        p.url.is_some(),
        p.prefix.is_some(),
        p.route.is_some(),
        p.all,
    ];
    if chosen.iter().filter(|c| **c).count() != 1 {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "bad_request", "detail": "give exactly one of url, prefix, route or all=true"})),
        )
            .into_response();
    }
    // Which keys (or which prefix) and route: in memory by `matches`, in Redis by the same
    // key or prefix, exact or not.
    let (key, exact, route): (String, bool, Option<&str>) = if let Some(url) = &p.url {
        match crate::layers::cache::key::from_url(url, |p| {
            crate::routing::normalize(p).ok().map(|c| c.into_owned())
        }) {
            Some(key) => (key, true, None),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "bad_request", "detail": "url must be absolute: http(s)://host/path?query"})),
                )
                    .into_response()
            }
        }
    } else if let Some(prefix) = &p.prefix {
        (crate::layers::cache::key::prefix_of(prefix), false, None)
    } else {
        (String::new(), false, p.route.as_deref())
    };
    let matches = |k: &str, v: &crate::layers::cache::store::Variants| {
        (if exact { k == key } else { k.starts_with(&key) }) && route.is_none_or(|r| v.of_route(r))
    };
    // Redis first: a miss in memory meanwhile may read an object back from Redis, and the
    // memory purge after it drops that too.
    let shared = match &store.shared {
        Some(tier) => Some(tier.purge(&key, exact, route).await),
        None => None,
    };
    let purged = store.purge(matches);
    store.settle();
    match shared {
        None => Json(json!({"purged": purged})).into_response(),
        Some(Ok(n)) => Json(json!({"purged": purged, "purged_shared": n})).into_response(),
        Some(Err(e)) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({"purged": purged, "error": "shared_tier_failed", "detail": format!("the Redis tier was not purged: {e}")})),
        )
            .into_response(),
    }
}
