//! `proxy = { service, path }`: forwards the request to an endpoint of a service and streams
//! both bodies through. First the upstream target (`target.rs`) and the forwarding headers
//! (`forward.rs`) are made from the request's `Exchange`. Then, in order:
//!
//! 1. admission: the service's bulkhead slot (`admit`), held until the response body ends;
//! 2. the body: buffered for retries when it is small and of known size (`replay.rs`),
//!    otherwise streamed once;
//! 3. the attempt loop (`attempts.rs`): breaker permit, endpoint, per-attempt timeout,
//!    outcome reporting, retry decision and backoff;
//! 4. the answer: hop-by-hop headers removed (`hop.rs`), an upgrade spliced into a byte tunnel,
//!    the upstream used and the attempts recorded on the exchange.

mod attempts;
mod hop;
mod replay;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use self::attempts::{Answer, Plan};
use self::hop::{refuse_upgrade, strip_hop_by_hop, upgrade_allowed, wants_upgrade};
use self::replay::Replay;
use super::forward::forwarding_headers;
use super::target::UpstreamPath;
use super::RespBody;
use crate::body::ReqBody;
use crate::context::{Exchange, UpstreamUsed};
use crate::error::{BoxError, GatewayError};
use crate::observe::metrics::Resilience;
use crate::upstream::retry::{method_allows_retry, RetryPolicy};
use crate::upstream::{Endpoint, Upstream};

/// Per-route settings of a proxy backend.
#[derive(Clone)]
pub(crate) struct ProxyOptions {
    /// How the upstream path is made.
    pub(crate) target: UpstreamPath,
    /// Whether the client's query goes upstream.
    pub(crate) forward_query: bool,
    pub(crate) preserve_host: bool,
    /// The route's retry policy (its own, or its service's).
    pub(crate) retry: Option<RetryPolicy>,
    /// The route allows retrying POST and PATCH.
    pub(crate) idempotent: bool,
    /// The route's total deadline, sent to gRPC services as `grpc-timeout`.
    pub(crate) deadline: Option<Duration>,
    /// Protocols a client may upgrade to (lower case; never `h2c`).
    pub(crate) upgrades: Arc<[Box<str>]>,
}

#[derive(Clone)]
pub(crate) struct Proxy {
    upstream: Arc<Upstream>,
    opts: Arc<ProxyOptions>,
}

impl Proxy {
    pub(crate) fn new(upstream: Arc<Upstream>, opts: ProxyOptions) -> Self {
        Proxy {
            upstream,
            opts: Arc::new(opts),
        }
    }
}

impl tower::Service<Request<ReqBody>> for Proxy {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Here rather than in `forward`: a `mut` parameter of an `async fn` is kept twice in
        // its future.
        let Some(exchange) = req.extensions().get::<Exchange>().cloned() else {
            return Box::pin(future::ready(Err(
                "a proxied request has no exchange".into()
            )));
        };
        let query = if self.opts.forward_query {
            req.uri().query()
        } else {
            None
        };
        if self.opts.target != UpstreamPath::AsRequested {
            let target = self.opts.target.build(&exchange, query);
            match Uri::from_maybe_shared(Bytes::from(target)) {
                Ok(u) => *req.uri_mut() = u,
                Err(_) => {
                    let e = GatewayError::BadRequest("request target");
                    return Box::pin(future::ready(Err(e.into())));
                }
            }
        }
        let h = req.headers_mut();
        forwarding_headers(h, &exchange);
        if self.opts.preserve_host && !h.contains_key(header::HOST) {
            // An HTTP/2 client names the host only in :authority; it becomes Host, so that
            // `preserve_host` works whatever protocol the client spoke.
            if let Some(host) = exchange.host() {
                h.insert(header::HOST, host.clone());
            }
        }
        let mut upgrade = wants_upgrade(req.headers());
        if upgrade && !upgrade_allowed(req.headers(), &self.opts.upgrades) {
            refuse_upgrade(req.headers_mut());
            upgrade = false;
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        // Taken by the dispatcher, before the route's deadline started its timer: when the
        // deadline cuts the request, `started + deadline` has passed (how a cancelled attempt
        // is told apart).
        let started = Instant::from_std(exchange.started());
        Box::pin(self.clone().forward(req, client_upgrade, exchange, started))
    }
}

impl Proxy {
    /// One request: admission, the body made replayable where it may be retried, the attempt
    /// loop, then the answer made ready for the client (upgrade tunnel, hop-by-hop headers,
    /// response metadata on the exchange).
    async fn forward(
        self,
        req: Request<ReqBody>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        exchange: Exchange,
        started: Instant,
    ) -> Result<Response<RespBody>, BoxError> {
        let upgrade = client_upgrade.is_some();
        let up = &*self.upstream;
        // The bulkhead slot is held for the whole request, retries included, and released
        // when the response body ends (the exchange holds it, and the access record the
        // exchange).
        let slot = admit(up).await?;
        let policy = self.opts.retry.as_ref().filter(|p| {
            p.attempts > 1
                && !upgrade
                && method_allows_retry(req.method(), req.headers(), self.opts.idempotent)
        });
        let (mut parts, body) = req.into_parts();
        let mut body = match policy {
            None => Replay::once(body),
            Some(p) => Replay::buffer(&parts.headers, body, p.max_body_buffer).await?,
        };
        let plan = Plan {
            up,
            policy,
            deadline_at: self.opts.deadline.map(|d| started + d),
            grpc: !up.is_http1(),
        };
        let answer = attempts::run(
            plan,
            up,
            &mut parts,
            &mut body,
            |parts, headers, ep, body| self.request_for(parts, headers, upgrade, ep, body, started),
        )
        .await?;
        let Answer {
            mut resp,
            ep,
            attempts,
        } = answer;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            if let Some(client_side) = client_upgrade {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_side, upstream_side));
            }
        }
        strip_hop_by_hop(resp.headers_mut(), switching);
        let meta = exchange.meta();
        if meta.wants_upstream() {
            meta.set_upstream(UpstreamUsed {
                url: ep.url.clone(),
                attempts,
            });
        }
        if let Some(slot) = slot {
            meta.hold(slot);
        }
        Ok(resp.map(RespBody::Upstream))
    }

    /// The request for one attempt at `ep`.
    fn request_for(
        &self,
        parts: &http::request::Parts,
        mut headers: HeaderMap,
        upgrade: bool,
        ep: &Endpoint,
        body: ReqBody,
        started: Instant,
    ) -> Result<Request<ReqBody>, GatewayError> {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = if self.upstream.is_http1() {
            // Origin form: what goes on the wire.
            Uri::from(path)
        } else {
            let mut uri = uri::Parts::default();
            uri.scheme = Some(ep.scheme.clone());
            uri.authority = Some(ep.authority.clone());
            uri.path_and_query = Some(path);
            Uri::from_parts(uri).map_err(|_| GatewayError::BadRequest("request target"))?
        };
        *req.version_mut() = self.upstream.version;
        strip_hop_by_hop(&mut headers, upgrade);
        if !self.opts.preserve_host {
            // Made once per endpoint: the client would otherwise format it per request.
            headers.insert(header::HOST, ep.host.clone());
        }
        if let Some(deadline) = self.opts.deadline {
            grpc_timeout(&mut headers, deadline.saturating_sub(started.elapsed()));
        }
        *req.headers_mut() = headers;
        Ok(req)
    }
}

/// Admission to the service: its bulkhead slot, or 503 `overloaded` when it is full.
async fn admit(up: &Upstream) -> Result<Option<OwnedSemaphorePermit>, GatewayError> {
    match &up.bulkhead {
        None => Ok(None),
        Some(b) => match b.acquire().await {
            Some(p) => Ok(Some(p)),
            None => {
                up.metrics().resilience(Resilience::Overloaded);
                Err(GatewayError::Overloaded)
            }
        },
    }
}

/// Sets `grpc-timeout` on gRPC requests to what is left of the route's deadline (or keeps the
/// client's, if shorter).
fn grpc_timeout(h: &mut HeaderMap, left: Duration) {
    let grpc = h
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return;
    }
    let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    let client_ms = h
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()));
    let ms = client_ms.map_or(ms, |c| c.min(ms));
    h.insert(
        "grpc-timeout",
        HeaderValue::from_str(&format_grpc_timeout(ms)).unwrap_or(HeaderValue::from_static("1m")),
    );
}

/// A `grpc-timeout` value (at most 8 digits and a unit) in milliseconds, rounded up.
fn parse_grpc_timeout(v: &[u8]) -> Option<u64> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => n.checked_mul(3_600_000)?,
        b"M" => n.checked_mul(60_000)?,
        b"S" => n.checked_mul(1000)?,
        b"m" => n,
        b"u" => n.div_ceil(1000),
        b"n" => n.div_ceil(1_000_000),
        _ => return None,
    })
}

/// Milliseconds as a `grpc-timeout` value: at most 8 digits, so a coarser unit for long ones.
fn format_grpc_timeout(ms: u64) -> String {
    const MAX: u64 = 99_999_999;
    if ms <= MAX {
        format!("{ms}m")
    } else if ms.div_ceil(1000) <= MAX {
        format!("{}S", ms.div_ceil(1000))
    } else {
        format!("{}M", ms.div_ceil(60_000).min(MAX))
    }
}

/// Copies bytes both ways between the client and the upstream once both sides switched.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection closed with an error");
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceConfig;

    #[test]
    fn grpc_timeouts_are_read_and_written_within_the_spec() {
        assert_eq!(parse_grpc_timeout(b"2S"), Some(2000));
        assert_eq!(parse_grpc_timeout(b"500u"), Some(1), "rounded up, never 0");
        assert_eq!(parse_grpc_timeout(b"1n"), Some(1));
        assert_eq!(
            parse_grpc_timeout(b"99999999H"),
            Some(99_999_999 * 3_600_000)
        );
        assert_eq!(parse_grpc_timeout(b"999999999H"), None, "over 8 digits");
        assert_eq!(parse_grpc_timeout(b"-1S"), None);
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b""), None);
        assert_eq!(format_grpc_timeout(300), "300m");
        assert_eq!(format_grpc_timeout(100_000_000), "100000S");
        assert_eq!(format_grpc_timeout(u64::MAX), "99999999M");
    }
    use crate::observe::metrics::Metrics;
    use crate::upstream::{Parts, Source, TlsSettings};

    /// A service of two static endpoints, with `extra` config lines.
    pub(super) fn upstream(extra: &str) -> Upstream {
        let toml = format!("endpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n{extra}");
        let cfg: ServiceConfig = toml::from_str(&toml).unwrap();
        let endpoints = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
            .iter()
            .map(|u| Endpoint::parse(u).unwrap())
            .collect();
        let retry = cfg
            .retry
            .as_ref()
            .map(|r| RetryPolicy::parse(r.get_ref()).unwrap());
        let parts = Parts {
            source: Source::Static(endpoints),
            seed: Vec::new(),
            hash_key: None,
            tls: TlsSettings {
                config: crate::upstream::tls::client_config(None, |p| p.to_path_buf()).unwrap(),
                server_name: None,
            },
            retry,
            breaker: cfg
                .circuit_breaker
                .as_ref()
                .map(|c| crate::upstream::breaker::Settings::from_config(c.get_ref()).unwrap()),
            health: None,
            outlier: None,
            bulkhead: crate::upstream::bulkhead::Limits::from_config(
                cfg.max_concurrent_requests.as_ref().map(|m| *m.get_ref()),
                cfg.max_queued_requests,
                cfg.queue_timeout.get(),
            )
            .unwrap(),
        };
        Upstream::new(
            "svc",
            cfg,
            Default::default(),
            parts,
            Metrics::new().service("svc"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn admission_holds_a_bulkhead_slot_and_refuses_beyond_it() {
        let up = upstream(
            "max_concurrent_requests = 1\nqueue_timeout = \"50ms\"\nmax_queued_requests = 1",
        );
        let slot = admit(&up).await.unwrap();
        assert!(slot.is_some());
        let start = Instant::now();
        let refused = admit(&up).await.unwrap_err();
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(50),
            "queued first"
        );
        let p = crate::error::classify(&refused);
        assert_eq!((p.status.as_u16(), p.code), (503, "overloaded"));
        assert_eq!(p.headers["retry-after"], "1");
        drop(slot);
        assert!(admit(&up).await.unwrap().is_some());
        // Without a bulkhead there is nothing to hold.
        assert!(admit(&upstream("")).await.unwrap().is_none());
    }
}
