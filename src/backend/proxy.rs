//! `proxy = { service, path }`: forwards the request to an endpoint of a service and streams
//! both bodies through. First the upstream target (`target.rs`) and the forwarding headers
//! (`forward.rs`) are made from the request's `Exchange`. Then, per request: the service's bulkhead slot; per attempt: the circuit breaker,
//! the endpoint (a retry prefers one not tried yet), the per-attempt timeout, outcome reporting
//! (outlier detection, breaker, metrics); between attempts: the retry decision (policy, retry
//! budget) and jittered backoff. A body is buffered only when it may be sent again (small, of
//! known size, on a retryable request); otherwise it streams once. Hop-by-hop headers are
//! removed both ways, and WebSocket (any HTTP/1.1) upgrades become a byte tunnel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::{future, FutureExt};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper_util::rt::TokioIo;

use std::time::Duration;

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::forward::forwarding_headers;
use super::target::UpstreamPath;
use super::RespBody;
use crate::body::{req_full, ReqBody};
use crate::context::{Exchange, UpstreamUsed};
use crate::error::{chain_has, BoxError, GatewayError};
use crate::observe::metrics::{Resilience, UpstreamErrorKind};
use tower::retry::budget::Budget as _;

use crate::upstream::breaker::Permit;
use crate::upstream::retry::{method_allows_retry, Failure, RetryPolicy};
use crate::upstream::{Endpoint, SendError, Upstream, UpstreamBody};

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
        let target = self.opts.target.build(&exchange, self.opts.forward_query);
        match Uri::from_maybe_shared(Bytes::from(target)) {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => {
                let e = GatewayError::BadRequest("request target");
                return Box::pin(future::ready(Err(e.into())));
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
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        Box::pin(self.clone().forward(req, client_upgrade, exchange))
    }
}

/// The outcome of one attempt. Lives on one attempt's stack and is matched at once, so the size
/// of the response variant costs nothing (boxing it would cost an allocation per request).
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Response(Response<UpstreamBody>),
    Failed(GatewayError, Option<Failure>),
}

impl Proxy {
    async fn forward(
        self,
        req: Request<ReqBody>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
        exchange: Exchange,
    ) -> Result<Response<RespBody>, BoxError> {
        let upgrade = client_upgrade.is_some();
        // Only a route with a deadline (gRPC's `grpc-timeout`) needs the start time.
        let started = self.opts.deadline.map(|_| Instant::now());
        let up = &*self.upstream;
        // The bulkhead slot is held for the whole request, retries included, and released
        // when the response body ends (the exchange holds it, and the access record the
        // exchange).
        let slot = match &up.bulkhead {
            Some(b) => match b.acquire().await {
                Some(p) => Some(p),
                None => {
                    up.metrics().resilience(Resilience::Overloaded);
                    return Err(GatewayError::Overloaded.into());
                }
            },
            None => None,
        };

        let policy = self.opts.retry.as_ref().filter(|p| {
            p.attempts > 1
                && !upgrade
                && method_allows_retry(req.method(), req.headers(), self.opts.idempotent)
        });
        let (mut parts, body) = req.into_parts();
        // A retryable request needs its body again: buffer it if it is small and of known size.
        let (body, policy) = match policy {
            None => (Some(body), None),
            Some(p) => match buffered_len(&parts.headers, &body, p.max_body_buffer) {
                None => (Some(body), None),
                Some(_) => {
                    let bytes = body.collect().await.map_err(|e| -> BoxError {
                        if chain_has::<http_body_util::LengthLimitError>(&*e) {
                            GatewayError::BodyTooLarge.into()
                        } else {
                            GatewayError::BadRequest("request body").into()
                        }
                    })?;
                    (Some(req_full(bytes.to_bytes())), Some(p))
                }
            },
        };
        let buffered = policy.map(|_| match &body {
            Some(Either::Right(full)) => full.clone(),
            _ => Full::new(Bytes::new()),
        });
        if policy.is_some() {
            up.budget.deposit();
        }
        let attempts = policy.map_or(1, |p| p.attempts);
        let mut body = body;
        let mut tried: Vec<Arc<Endpoint>> = Vec::new();
        let mut n = 0;
        loop {
            n += 1;
            let permit = match &up.breaker {
                Some(b) => match b.try_acquire() {
                    Ok(p) => Some(p),
                    Err(rej) => {
                        up.metrics().resilience(Resilience::CircuitOpen);
                        return Err(GatewayError::CircuitOpen {
                            retry_after_secs: rej.retry_after_ms.div_ceil(1000).max(1),
                        }
                        .into());
                    }
                },
                None => None,
            };
            let Some(ep) = up.pick_untried(&parts.headers, &tried) else {
                if let (Some(b), Some(p)) = (&up.breaker, permit) {
                    b.record(p, None);
                }
                return Err(GatewayError::NoHealthyEndpoint.into());
            };
            // If the route's deadline cancels this attempt, the guard records it as a failure
            // (for the breaker — a probe must not keep its slot — and for outlier detection).
            let mut cancelled = Cancelled {
                up,
                ep: &ep,
                permit,
                armed: true,
            };
            // The request is built in the argument's own block: its parts are then not kept
            // in this future's state while the attempt runs.
            let outcome = self
                .attempt(&ep, {
                    let this_body = match (&buffered, body.take()) {
                        (Some(full), _) => Either::Right(full.clone()),
                        (None, Some(b)) => b,
                        (None, None) => unreachable!("an unbuffered body is sent once"),
                    };
                    // Headers are cloned only when the request may be sent again; else they
                    // move.
                    let headers = if buffered.is_some() {
                        parts.headers.clone()
                    } else {
                        std::mem::take(&mut parts.headers)
                    };
                    // Bound by `let`, so that the `Result` is not a temporary of the whole
                    // statement, kept across the await.
                    let built = self.request_for(&parts, headers, upgrade, &ep, this_body, started);
                    match built {
                        Ok(r) => r,
                        Err(e) => {
                            cancelled.armed = false;
                            if let (Some(b), Some(p)) = (&up.breaker, permit) {
                                b.record(p, None);
                            }
                            return Err(e.into());
                        }
                    }
                })
                .await;
            cancelled.armed = false;
            drop(cancelled);
            let failure = match &outcome {
                Attempt::Response(r) if r.status().is_server_error() => {
                    Some(Failure::Status(r.status().as_u16()))
                }
                Attempt::Response(_) => None,
                Attempt::Failed(_, f) => *f,
            };
            if let (Some(b), Some(p)) = (&up.breaker, permit) {
                let verdict = match (&outcome, failure) {
                    (Attempt::Failed(_, None), _) => None,
                    (Attempt::Response(_), Some(_)) if !b.config().count_5xx => Some(true),
                    (_, f) => Some(f.is_none()),
                };
                b.record(p, verdict);
            }
            let retry = match (policy, failure) {
                (Some(p), Some(f)) if n < attempts && p.retries(f) => {
                    if up.budget.withdraw() {
                        true
                    } else {
                        up.metrics().resilience(Resilience::BudgetExhausted);
                        false
                    }
                }
                _ => false,
            };
            if retry {
                up.metrics().resilience(Resilience::Retry);
                tried.push(ep);
                if let Some(p) = policy {
                    tokio::time::sleep(p.backoff(n)).await;
                }
                continue;
            }
            let mut resp = match outcome {
                Attempt::Response(r) => r,
                Attempt::Failed(e, _) => return Err(e.into()),
            };
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if switching {
                if let Some(client_side) = client_upgrade {
                    let upstream_side = hyper::upgrade::on(&mut resp);
                    tokio::spawn(tunnel(client_side, upstream_side));
                }
            }
            strip_hop_by_hop(resp.headers_mut(), switching);
            let meta = exchange.meta();
            meta.set_upstream(UpstreamUsed {
                url: ep.url.clone(),
                attempts: n,
            });
            if let Some(slot) = slot {
                meta.hold(slot);
            }
            return Ok(resp.map(Either::Left));
        }
    }

    /// The request for one attempt at `ep`.
    fn request_for(
        &self,
        parts: &http::request::Parts,
        mut headers: HeaderMap,
        upgrade: bool,
        ep: &Endpoint,
        body: ReqBody,
        started: Option<Instant>,
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
        if let (Some(deadline), Some(started)) = (self.opts.deadline, started) {
            grpc_timeout(&mut headers, deadline.saturating_sub(started.elapsed()));
        }
        *req.headers_mut() = headers;
        Ok(req)
    }

    /// One attempt: the send under the per-attempt timeout, then its outcome reported. Built
    /// from combinators: as an `async fn` it would keep the request in its state next to the
    /// send future that owns it, and its own copy of that future.
    fn attempt<'a>(
        &'a self,
        ep: &'a Endpoint,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Attempt> + Send + 'a {
        let up = &*self.upstream;
        let in_flight = ep.start();
        let sent = up.send(ep, req);
        let timed = match up.timeout {
            Some(t) => future::Either::Left(tokio::time::timeout(t, sent)),
            None => future::Either::Right(sent.map(Ok)),
        };
        timed.map(move |result| {
            let _in_flight = in_flight;
            match result {
                Err(_elapsed) => {
                    up.metrics().error(UpstreamErrorKind::Timeout);
                    up.report(ep, false);
                    Attempt::Failed(GatewayError::UpstreamTimeout, Some(Failure::Timeout))
                }
                Ok(Ok(r)) => {
                    up.metrics().response(r.status());
                    up.report(ep, !r.status().is_server_error());
                    Attempt::Response(r)
                }
                Ok(Err(e)) => {
                    let (err, failure) = classify_client_error(up, e);
                    // A body over the limit is the client's doing, not the endpoint's.
                    if failure.is_some() {
                        up.report(ep, false);
                    }
                    Attempt::Failed(err, failure)
                }
            }
        })
    }
}

/// Reports an attempt that was dropped before it finished (the route's total deadline passed).
struct Cancelled<'a> {
    up: &'a Upstream,
    ep: &'a Endpoint,
    permit: Option<Permit>,
    armed: bool,
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let (Some(b), Some(p)) = (&self.up.breaker, self.permit) {
            b.record(p, Some(false));
        }
        self.up.report(self.ep, false);
    }
}

/// The body length if it can be buffered for retries: known and at most `max`.
fn buffered_len(headers: &HeaderMap, body: &ReqBody, max: u64) -> Option<u64> {
    if body.is_end_stream() {
        return Some(0);
    }
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    (len <= max).then_some(len)
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
    let ms = left.as_millis().max(1) as u64;
    let client_ms = h
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()));
    let ms = client_ms.map_or(ms, |c| c.min(ms));
    h.insert(
        "grpc-timeout",
        HeaderValue::from_str(&format!("{ms}m")).unwrap_or(HeaderValue::from_static("1m")),
    );
}

fn parse_grpc_timeout(v: &[u8]) -> Option<u64> {
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => n * 3_600_000,
        b"M" => n * 60_000,
        b"S" => n * 1000,
        b"m" => n,
        b"u" => n / 1000,
        b"n" => n / 1_000_000,
        _ => return None,
    })
}

fn classify_client_error(up: &Upstream, e: SendError) -> (GatewayError, Option<Failure>) {
    if chain_has::<http_body_util::LengthLimitError>(&e) {
        return (GatewayError::BodyTooLarge, None);
    }
    match e {
        SendError::Connect(e) => {
            up.metrics().error(UpstreamErrorKind::Connect);
            tracing::debug!(service = &*up.name, error = %e, "upstream connect failed");
            (GatewayError::UpstreamConnect(e), Some(Failure::Connect))
        }
        SendError::Request(e) => {
            up.metrics().error(UpstreamErrorKind::Reset);
            tracing::debug!(service = &*up.name, error = %e, "upstream request failed");
            (GatewayError::UpstreamFailed(e), Some(Failure::Reset))
        }
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

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Whether `n` is one of `HOP_BY_HOP`, `TE` or `Upgrade`. Runs for every header of every
/// message: the length picks at most two candidates, so a name is compared at most twice
/// (comparing with all nine names cost ~50 instructions per header).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    let s = n.as_str();
    match s.len() {
        2 => s == "te",
        7 => s == "upgrade" || s == "trailer",
        10 => s == "connection" || s == "keep-alive",
        16 => s == "proxy-connection",
        17 => s == "transfer-encoding",
        18 => s == "proxy-authenticate",
        19 => s == "proxy-authorization",
        _ => false,
    }
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// including any the `Connection` header names. For an upgrade, `Upgrade` and
/// `Connection: upgrade` are kept, since they must reach the other side.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages have none: one pass over the names instead of a lookup per name.
    if !upgrade && !h.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    // `TE: trailers` is allowed through (gRPC needs it); other TE values are hop-by-hop.
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        // One at a time: the early return for messages without any must not miss one.
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-keep", HeaderValue::from_static("yes"));
            h.insert(name, HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h, false);
            let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["x-keep"], "{name}");
        }
    }

    #[test]
    fn names_as_long_as_a_hop_by_hop_name_are_end_to_end() {
        for name in [
            "tk",
            "referer",
            "user-agent",
            "content-encoding",
            "x-forwarded-proto",
            "x-frame-options-xx",
            "content-disposition",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("trailers"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }
}
