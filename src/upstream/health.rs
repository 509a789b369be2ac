//! Active health checks: a background task per service that asks every endpoint for
//! `[health_check] path` each `interval` and flips its health after `healthy_threshold`
//! successes or `unhealthy_threshold` failures in a row. The task dies with its service.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::BodyExt;

use tokio::task::JoinHandle;

use super::endpoint::Endpoint;
use super::table::EndpointTable;
use super::HttpClient;
use crate::body::req_full;
use crate::config::HealthCheckConfig;

/// `[services.NAME.health_check]` as the checks read it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Probe {
    path: http::uri::PathAndQuery,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    /// Statuses that count as healthy; empty: 200–399.
    expected_statuses: Box<[u16]>,
    /// `grpc.health.v1.Health/Check`: the framed request for the configured service name.
    grpc: Option<Bytes>,
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`: `status` 1 is SERVING.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// A gRPC message framed for the wire (uncompressed).
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

/// A `health_check` table that cannot make a probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HealthConfigError {
    #[error("path `{0}` must start with `/`")]
    Path(String),
    #[error("healthy_threshold and unhealthy_threshold must be at least 1")]
    Threshold,
    #[error("timeout ({0}) must not be longer than interval ({1})")]
    Timeout(String, String),
    #[error("expected status {0} is not an HTTP status")]
    Status(u16),
    #[error("`grpc` checks need the service's protocol = \"http2\" (gRPC runs over HTTP/2)")]
    GrpcNeedsHttp2,
}

impl Probe {
    /// Checks a `health_check` table; every mistake in it is reported.
    pub(crate) fn from_config(
        h: &HealthCheckConfig,
        protocol: crate::config::UpstreamProtocol,
    ) -> Result<Self, Vec<HealthConfigError>> {
        let mut errors = Vec::new();
        let path = match h.path.parse::<http::uri::PathAndQuery>() {
            Ok(p) if h.path.starts_with('/') => Some(p),
            _ => {
                errors.push(HealthConfigError::Path(h.path.clone()));
                None
            }
        };
        if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
            errors.push(HealthConfigError::Threshold);
        }
        if h.timeout.get() > h.interval.get() {
            errors.push(HealthConfigError::Timeout(
                h.timeout.to_string(),
                h.interval.to_string(),
            ));
        }
        if h.grpc.is_some() && protocol != crate::config::UpstreamProtocol::Http2 {
            errors.push(HealthConfigError::GrpcNeedsHttp2);
        }
        if let Some(s) = h
            .expected_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            errors.push(HealthConfigError::Status(*s));
        }
        match path {
            Some(path) if errors.is_empty() => Ok(Probe {
                path,
                interval: h.interval.get(),
                timeout: h.timeout.get(),
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
                expected_statuses: h.expected_statuses.clone().into(),
                grpc: h.grpc.as_ref().map(|service| {
                    let req = HealthCheckRequest {
                        service: service.clone(),
                    };
                    grpc_frame(&prost::Message::encode_to_vec(&req))
                }),
            }),
            _ => Err(errors),
        }
    }
}

pub(crate) fn spawn(
    table: Arc<EndpointTable>,
    client: HttpClient,
    cfg: Probe,
) -> Option<JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    Some(handle.spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Check whatever discovery lists now.
            let set = table.snapshot();
            let service = &*table.service;
            let checks = set
                .endpoints
                .iter()
                .map(|ep| check(service, ep, &client, &cfg));
            futures_util::future::join_all(checks).await;
        }
    }))
}

async fn check(service: &str, ep: &Endpoint, client: &HttpClient, cfg: &Probe) {
    let ok = probe(ep, client, cfg).await;
    if ok {
        ep.check_failures.store(0, Ordering::Relaxed);
        let n = ep.check_successes.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= cfg.healthy_threshold && ep.set_healthy(true) {
            tracing::info!(service, endpoint = &*ep.url, "endpoint healthy again");
        }
    } else {
        ep.check_successes.store(0, Ordering::Relaxed);
        let n = ep.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= cfg.unhealthy_threshold && ep.set_healthy(false) {
            tracing::warn!(
                service,
                endpoint = &*ep.url,
                failures = n,
                "endpoint unhealthy"
            );
        }
    }
}

async fn probe(ep: &Endpoint, client: &HttpClient, cfg: &Probe) -> bool {
    if let Some(body) = &cfg.grpc {
        return grpc_probe(ep, client, cfg, body.clone()).await;
    }
    let uri = Uri::builder()
        .scheme(ep.scheme.clone())
        .authority(ep.authority.clone())
        .path_and_query(cfg.path.clone())
        .build();
    let Ok(uri) = uri else { return false };
    let Ok(req) = Request::get(uri)
        .header(http::header::USER_AGENT, "gatehouse-health-check")
        .body(req_full(Bytes::new()))
    else {
        return false;
    };
    let attempt = async {
        let resp = client.request(req).await.ok()?;
        let status = resp.status().as_u16();
        // Read the body so the connection can be reused.
        resp.into_body().collect().await.ok()?;
        Some(status)
    };
    match tokio::time::timeout(cfg.timeout, attempt).await {
        Ok(Some(status)) if cfg.expected_statuses.is_empty() => (200..400).contains(&status),
        Ok(Some(status)) => cfg.expected_statuses.contains(&status),
        _ => false,
    }
}

/// `grpc.health.v1.Health/Check`: healthy when the call ends with status OK and says SERVING.
async fn grpc_probe(ep: &Endpoint, client: &HttpClient, cfg: &Probe, body: Bytes) -> bool {
    let uri = Uri::builder()
        .scheme(ep.scheme.clone())
        .authority(ep.authority.clone())
        .path_and_query("/grpc.health.v1.Health/Check")
        .build();
    let Ok(uri) = uri else { return false };
    let Ok(req) = Request::post(uri)
        .header(http::header::USER_AGENT, "gatehouse-health-check")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(req_full(body))
    else {
        return false;
    };
    let attempt = async {
        let resp = client.request(req).await.ok()?;
        if resp.status() != http::StatusCode::OK {
            return Some(false);
        }
        let in_head = resp.headers().get("grpc-status").cloned();
        let collected = resp.into_body().collect().await.ok()?;
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
            .or(in_head);
        if status.as_ref().map(|s| s.as_bytes()) != Some(b"0") {
            return Some(false);
        }
        let bytes = collected.to_bytes();
        let msg = bytes.get(5..)?;
        let answer: HealthCheckResponse = prost::Message::decode(msg).ok()?;
        Some(answer.status == 1)
    };
    matches!(
        tokio::time::timeout(cfg.timeout, attempt).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_checked_when_built() {
        let mut h: HealthCheckConfig = toml::from_str("").unwrap();
        use crate::config::UpstreamProtocol::{Http1, Http2};
        let p = Probe::from_config(&h, Http1).unwrap();
        assert!(p.path.as_str().starts_with('/'));
        h.grpc = Some("shop.Inventory".into());
        assert!(Probe::from_config(&h, Http2).unwrap().grpc.is_some());
        assert_eq!(
            Probe::from_config(&h, Http1).unwrap_err(),
            vec![HealthConfigError::GrpcNeedsHttp2]
        );
        h.grpc = None;
        h.path = "health".into();
        h.healthy_threshold = 0;
        h.expected_statuses = vec![200, 700];
        assert_eq!(
            Probe::from_config(&h, Http1).unwrap_err(),
            vec![
                HealthConfigError::Path("health".into()),
                HealthConfigError::Threshold,
                HealthConfigError::Status(700),
            ]
        );
    }
}
