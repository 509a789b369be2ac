//! The admin listener (default 127.0.0.1:9901), separate from traffic: `/healthz` (the process
//! is alive), `/readyz` (config loaded, listeners up), `/metrics` (Prometheus text),
//! `GET /admin/config` (the effective config, secrets redacted, and the last reload's outcome)
//! and `POST /admin/reload`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::gateway::Live;

pub fn router(live: Arc<Live>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/config", get(config))
        .route("/admin/reload", post(reload))
        .with_state(live)
}

pub async fn serve(listener: TcpListener, live: Arc<Live>, mut stop: watch::Receiver<bool>) {
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

async fn readyz(State(live): State<Arc<Live>>) -> Response {
    if live.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(live): State<Arc<Live>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        live.metrics.render(),
    )
        .into_response()
}

async fn config(State(live): State<Arc<Live>>) -> Response {
    let gw = live.snapshot();
    let loaded = &gw.loaded;
    let mut frontends = serde_json::Map::new();
    for (file, ff) in &loaded.frontends {
        frontends.insert(
            file.path.display().to_string(),
            serde_json::to_value(ff).unwrap_or(Value::Null),
        );
    }
    let mut gateway = serde_json::to_value(&loaded.gateway).unwrap_or(Value::Null);
    redact(&mut gateway);
    let mut frontends = Value::Object(frontends);
    redact(&mut frontends);
    Json(json!({
        "generation": gw.generation,
        "config_path": live.config_path.display().to_string(),
        "gateway": gateway,
        "frontends": frontends,
        "last_reload": live.status(),
    }))
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

/// Replaces values whose key suggests a secret. Secrets reach the config through `${VAR}`, and
/// the keys that carry them (tokens, passwords, keys, secrets) are masked wherever they are.
pub fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                let secret = [
                    "secret",
                    "password",
                    "token",
                    "authorization",
                    "api_key",
                    "apikey",
                    "credential",
                    "private",
                ]
                .iter()
                .any(|s| k.contains(s))
                    || k == "key";
                if secret && !val.is_object() && !val.is_null() {
                    *val = Value::String("[redacted]".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_secret_keys() {
        let mut v = json!({"a": {"client_secret": "s", "password": "p", "name": "n", "tls": {"key": "k.pem"}}, "list": [{"token": "t"}]});
        redact(&mut v);
        assert_eq!(v["a"]["client_secret"], "[redacted]");
        assert_eq!(v["a"]["password"], "[redacted]");
        assert_eq!(v["a"]["name"], "n");
        assert_eq!(v["a"]["tls"]["key"], "[redacted]");
        assert_eq!(v["list"][0]["token"], "[redacted]");
    }
}
