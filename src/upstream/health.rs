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

pub(crate) fn spawn(
    table: Arc<EndpointTable>,
    client: HttpClient,
    cfg: HealthCheckConfig,
) -> Option<JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    Some(handle.spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval.get());
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

async fn check(service: &str, ep: &Endpoint, client: &HttpClient, cfg: &HealthCheckConfig) {
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

async fn probe(ep: &Endpoint, client: &HttpClient, cfg: &HealthCheckConfig) -> bool {
    let uri = Uri::builder()
        .scheme(ep.scheme.clone())
        .authority(ep.authority.clone())
        .path_and_query(cfg.path.as_str())
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
    match tokio::time::timeout(cfg.timeout.get(), attempt).await {
        Ok(Some(status)) if cfg.expected_statuses.is_empty() => (200..400).contains(&status),
        Ok(Some(status)) => cfg.expected_statuses.contains(&status),
        _ => false,
    }
}
