//! `gatehouse demo`: small sample services (users, orders, catalog) on the loopback addresses
//! that the shipped gateway.toml names, so the gateway can be tried with one command. Any other
//! service in the config gets an echo service that shows what the gateway sent it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::config::GatewayConfig;

mod grpc;

/// A token for the demo's `[auth.jwt.demo]` (HS256 with its secret), valid for a day, with
/// the `profile` scope; `None` when the config has no such provider.
pub fn demo_token(cfg: &GatewayConfig) -> Option<String> {
    let demo = cfg.auth.jwt.get("demo")?.get_ref();
    let crate::config::JwtKeys::Secret(secret) = &demo.keys else {
        return None;
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs()
        + 86_400;
    let claims = json!({
        "iss": demo.issuer.clone().unwrap_or_default(),
        "sub": "demo-user",
        "scope": "profile",
        "exp": exp,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .ok()
}

/// The demo's quote service, a NATS consumer: it answers `demo.orders.quote` commands (the
/// route `POST /web/orders/quote`, `reply = "async"`) on the reply subject each one names.
fn quote_service(url: &str) {
    if !url.starts_with("nats://") {
        return;
    }
    let opts = async_nats::ConnectOptions::new()
        .name("gatehouse-demo-quotes")
        .retry_on_initial_connect();
    let url = url.to_owned();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let Ok(client) = opts.connect(url.as_str()).await else {
            return;
        };
        let Ok(mut sub) = client.subscribe("demo.orders.quote").await else {
            return;
        };
        while let Some(m) = sub.next().await {
            let Some(reply) = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Gatehouse-Reply-To"))
                .map(|v| v.as_str().to_owned())
            else {
                continue;
            };
            // A quote takes a moment: the client polls meanwhile.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let order: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            let quote = json!({"order": order, "price": 12.5, "currency": "EUR"});
            let mut h = async_nats::HeaderMap::new();
            h.insert("Content-Type", "application/json");
            let _ = client
                .publish_with_headers(reply, h, quote.to_string().into())
                .await;
        }
    });
}

/// Starts a sample service on each local endpoint of each configured service. Returns the
/// addresses started, by service.
pub async fn start_samples(cfg: &GatewayConfig) -> std::io::Result<Vec<(String, SocketAddr)>> {
    let mut started = Vec::new();
    if let Some(b) = cfg.brokers.get("events") {
        quote_service(b.get_ref().url.get_ref());
    }
    for (name, svc) in &cfg.services {
        for ep in &svc.get_ref().endpoints {
            let Some(addr) = ep
                .get_ref()
                .strip_prefix("http://")
                .and_then(|a| a.trim_end_matches('/').parse::<SocketAddr>().ok())
            else {
                continue;
            };
            if name == "stock" {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    std::io::Error::new(e.kind(), format!("sample service {name} on {addr}: {e}"))
                })?;
                grpc::serve(listener);
                started.push((name.clone(), addr));
                continue;
            }
            let app = match name.as_str() {
                "users" => users(),
                "orders" => orders(),
                "catalog" => catalog(),
                _ => Router::new(),
            }
            .route("/health", get(|| async { "ok" }))
            .fallback(echo);
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("sample service {name} on {addr}: {e}"))
            })?;
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            started.push((name.clone(), addr));
        }
    }
    Ok(started)
}

fn users() -> Router {
    Router::new()
        .route(
            "/v1/users",
            get(|| async {
                Json(json!([
                    {"id": "1", "name": "Ada Lovelace", "tier": "gold"},
                    {"id": "2", "name": "Alan Turing", "tier": "silver"}
                ]))
            }),
        )
        .route(
            "/v1/users/{id}",
            get(|Path(id): Path<String>| async move {
                match id.as_str() {
                    "1" => Json(json!({"id": "1", "name": "Ada Lovelace", "tier": "gold"}))
                        .into_response(),
                    "2" => Json(json!({"id": "2", "name": "Alan Turing", "tier": "silver"}))
                        .into_response(),
                    _ => (
                        StatusCode::NOT_FOUND,
                        Json(json!({"error": "no such user"})),
                    )
                        .into_response(),
                }
            }),
        )
}

fn orders() -> Router {
    Router::new()
        .route(
            "/v1/orders",
            get(|Query(q): Query<HashMap<String, String>>| async move {
                let user = q.get("user").cloned().unwrap_or_else(|| "1".into());
                Json(json!([
                    {"id": "o-100", "user": user, "total": 42.5, "status": "shipped", "sku": "tea-01"},
                    {"id": "o-101", "user": user, "total": 9.99, "status": "processing", "sku": "cup-02"}
                ]))
            })
            .post(|body: String| async move {
                (
                    StatusCode::CREATED,
                    Json(json!({"id": "o-102", "received": body})),
                )
            }),
        )
        .route(
            "/v1/orders/{id}",
            get(|Path(id): Path<String>| async move {
                Json(json!({"id": id, "user": "1", "total": 42.5, "status": "shipped"}))
            }),
        )
}

fn catalog() -> Router {
    Router::new()
        .route(
            "/v1/products",
            get(|| async {
                Json(json!([
                    {"sku": "tea-01", "name": "Green tea", "price": 4.5},
                    {"sku": "cup-02", "name": "Tea cup", "price": 12.0}
                ]))
            }),
        )
        .route(
            "/v1/products/{sku}",
            get(|Path(sku): Path<String>| async move {
                match sku.as_str() {
                    "tea-01" => Json(
                        json!({"sku": "tea-01", "name": "Green tea", "price": 4.5, "stock": 120}),
                    )
                    .into_response(),
                    "cup-02" => {
                        Json(json!({"sku": "cup-02", "name": "Tea cup", "price": 12.0, "stock": 8}))
                            .into_response()
                    }
                    _ => (
                        StatusCode::NOT_FOUND,
                        Json(json!({"error": "no such product"})),
                    )
                        .into_response(),
                }
            }),
        )
        .route("/v1/events", get(events))
}

/// Server-sent events, one a second, to show that streamed responses flow through as produced.
async fn events() -> Response {
    let stream = futures_util::stream::unfold(0u32, |n| async move {
        if n >= 5 {
            return None;
        }
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let chunk = format!(
            "event: price\ndata: {{\"sku\":\"tea-01\",\"price\":{}}}\n\n",
            4.5 + n as f64 / 10.0
        );
        Some((Ok::<_, Infallible>(chunk), n + 1))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

/// Shows what arrived: method, path, query and headers.
async fn echo(req: Request) -> Json<serde_json::Value> {
    let headers: HashMap<String, String> = header_map(req.headers());
    Json(json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    }))
}

fn header_map(h: &HeaderMap) -> HashMap<String, String> {
    h.iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}
