//! The attempt loop of a proxied request. Per attempt: the circuit breaker's permit (a guard
//! that records the outcome), an endpoint (a retry prefers one not tried yet), the send under
//! the per-attempt timeout, outcome reporting (outlier detection, metrics). Between attempts:
//! the retry decision (policy, retry budget) and jittered backoff.
//!
//! What counts against the service: connect failures, resets, timeouts and (for the breaker,
//! when `count_5xx`) 5xx answers. An attempt dropped before it finished counts as a failure only
//! when the route's deadline cut it; when the client went away, nothing is held against the
//! service (a half-open probe slot is given back).
//!
//! Generic over the `Transport` that sends one attempt, so that the loop is tested with a
//! `tower-test` mock and paused time (below) as well as end to end.

use std::future::Future;
use std::sync::Arc;

use futures_util::{future, FutureExt};
use http::header::HeaderMap;
use http::{Request, Response};
use tokio::time::Instant;
use tower::retry::budget::Budget as _;

use super::replay::Replay;
use crate::body::ReqBody;
use crate::body::{BodyTooLarge, ClientBodyError};
use crate::error::{chain_has, client_body, find_in_chain, GatewayError};
use crate::observe::metrics::{Resilience, UpstreamErrorKind};
use crate::upstream::breaker::Guard;
use crate::upstream::retry::{Failure, RetryPolicy};
use crate::upstream::{Endpoint, SendError, Upstream, UpstreamBody};

/// Sends one attempt to an endpoint.
pub(crate) trait Transport: Sync {
    type Body: Send;

    fn send<'a>(
        &'a self,
        ep: &'a Endpoint,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<Self::Body>, SendError>> + Send + 'a;
}

impl Transport for Upstream {
    type Body = UpstreamBody;

    fn send<'a>(
        &'a self,
        ep: &'a Endpoint,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        Upstream::send(self, ep, req)
    }
}

/// What the loop needs besides the request.
pub(crate) struct Plan<'a> {
    pub(crate) up: &'a Upstream,
    /// The retry policy, if this request may be retried at all.
    pub(crate) policy: Option<&'a RetryPolicy>,
    /// When the route's deadline passes: an attempt dropped after it was cut by the deadline;
    /// one dropped before it was abandoned by the client.
    pub(crate) deadline_at: Option<Instant>,
    /// The service may answer gRPC (an HTTP/2 service): a trailers-only answer's
    /// `grpc-status` counts as the HTTP status it stands for (below).
    pub(crate) grpc: bool,
}

/// The status an answer counts as for the breaker, outlier detection and retries: its own,
/// or, for a gRPC trailers-only answer (HTTP 200 with `grpc-status` in the head, which is how
/// services refuse calls before answering), the HTTP status of that gRPC status's standard
/// mapping where it is a server error: UNAVAILABLE 503, DEADLINE_EXCEEDED 504, UNKNOWN,
/// INTERNAL and DATA_LOSS 500.
fn counted_status<B>(r: &Response<B>, grpc: bool) -> u16 {
    let status = r.status().as_u16();
    if !grpc || status != 200 {
        return status;
    }
    match r.headers().get("grpc-status").map(|v| v.as_bytes()) {
        Some(b"14") => 503,
        Some(b"4") => 504,
        Some(b"2" | b"13" | b"15") => 500,
        _ => status,
    }
}

/// The response that ends the loop, with the endpoint that gave it and the attempts made.
pub(crate) struct Answer<B> {
    pub(crate) resp: Response<B>,
    pub(crate) ep: Arc<Endpoint>,
    pub(crate) attempts: u32,
}

/// The outcome of one attempt. Lives on one attempt's stack and is matched at once, so the size
/// of the response variant costs nothing (boxing it would cost an allocation per request).
#[allow(clippy::large_enum_variant)]
enum Attempt<B> {
    Response(Response<B>),
    Failed(GatewayError, Option<Failure>),
}

/// Runs the attempts. `build` makes the request for one attempt at an endpoint from the parts,
/// the headers (cloned when the request may be sent again, else moved) and the body. Parts
/// and body are borrowed: the caller's future holds them, and this one's state stays small.
pub(crate) async fn run<T, F>(
    plan: Plan<'_>,
    transport: &T,
    parts: &mut http::request::Parts,
    body: &mut Replay,
    build: F,
) -> Result<Answer<T::Body>, GatewayError>
where
    T: Transport,
    F: Fn(
        &http::request::Parts,
        HeaderMap,
        &Endpoint,
        ReqBody,
    ) -> Result<Request<ReqBody>, GatewayError>,
{
    let up = plan.up;
    let policy = plan.policy.filter(|_| body.replayable());
    if policy.is_some() {
        up.budget.deposit();
    }
    let attempts = policy.map_or(1, |p| p.attempts);
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    let mut n = 0;
    loop {
        n += 1;
        let permit = match &up.breaker {
            Some(b) => match b.admit() {
                Ok(g) => Some(g),
                Err(rej) => {
                    up.metrics().resilience(Resilience::CircuitOpen);
                    return Err(GatewayError::CircuitOpen {
                        retry_after_secs: rej.retry_after_ms.div_ceil(1000).max(1),
                    });
                }
            },
            None => None,
        };
        // Without an endpoint the permit is dropped: not counted.
        let ep = up
            .pick_untried(&parts.headers, &tried)
            .ok_or(GatewayError::NoHealthyEndpoint)?;
        // If this attempt is dropped before it finishes, the guard reports it (below).
        let mut cancelled = Cancelled {
            up,
            ep: &ep,
            permit,
            deadline_at: plan.deadline_at,
            armed: true,
        };
        // The request is built in the argument's own block: its parts are then not kept in
        // this future's state while the attempt runs.
        let outcome = attempt(up, transport, &ep, plan.grpc, {
            let Some(this_body) = body.next() else {
                // A streamed body is sent once, and such a request is never retried.
                return Err(GatewayError::BadRequest("request body"));
            };
            let headers = if body.replayable() {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            // Bound by `let`, so that the `Result` is not a temporary of the whole statement,
            // kept across the await.
            let built = build(parts, headers, &ep, this_body);
            built?
        })
        .await;
        let permit = cancelled.disarm();
        drop(cancelled);
        let failure = match &outcome {
            Attempt::Response(r) => {
                let status = counted_status(r, plan.grpc);
                (status >= 500).then_some(Failure::Status(status))
            }
            Attempt::Failed(_, f) => *f,
        };
        if let (Some(b), Some(g)) = (&up.breaker, permit) {
            let verdict = match (&outcome, failure) {
                (Attempt::Failed(_, None), _) => None,
                (Attempt::Response(_), Some(_)) if !b.settings().count_5xx => Some(true),
                (_, f) => Some(f.is_none()),
            };
            g.record(verdict);
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
        return match outcome {
            Attempt::Response(resp) => Ok(Answer {
                resp,
                ep,
                attempts: n,
            }),
            Attempt::Failed(e, _) => Err(e),
        };
    }
}

/// One attempt: the send under the per-attempt timeout, then its outcome reported. Built from
/// combinators: as an `async fn` it would keep the request in its state next to the send
/// future that owns it, and its own copy of that future.
fn attempt<'a, T: Transport>(
    up: &'a Upstream,
    transport: &'a T,
    ep: &'a Endpoint,
    grpc: bool,
    req: Request<ReqBody>,
) -> impl Future<Output = Attempt<T::Body>> + Send + 'a {
    let in_flight = ep.start();
    let sent = transport.send(ep, req);
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
                up.report(ep, counted_status(&r, grpc) < 500);
                Attempt::Response(r)
            }
            Ok(Err(e)) => {
                let (err, failure) = classify_send_error(up, e);
                // A body over the limit is the client's doing, not the endpoint's.
                if failure.is_some() {
                    up.report(ep, false);
                }
                Attempt::Failed(err, failure)
            }
        }
    })
}

/// What a failed send means, and whether it is the service's failure (`Some`): a body over the
/// limit, or a client body that failed (the client went away mid-upload, or sent invalid
/// chunked framing), is the client's doing — not counted against the endpoint, the breaker or
/// the upstream error metrics, and never retried.
fn classify_send_error(up: &Upstream, e: SendError) -> (GatewayError, Option<Failure>) {
    if chain_has::<BodyTooLarge>(&e) {
        return (GatewayError::BodyTooLarge, None);
    }
    if let Some(b) = find_in_chain::<ClientBodyError>(&e) {
        tracing::debug!(service = &*up.name, error = %b, "the client's request body failed");
        return (client_body(b), None);
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

/// Reports an attempt that was dropped before it finished: by the route's deadline (a failure
/// of the endpoint and, for the breaker, of the service) or because the client went away
/// (nothing is held against the service; a probe's slot is given back).
struct Cancelled<'a, 'b> {
    up: &'a Upstream,
    ep: &'a Endpoint,
    permit: Option<Guard<'b>>,
    deadline_at: Option<Instant>,
    armed: bool,
}

impl<'b> Cancelled<'_, 'b> {
    /// The attempt finished: the caller records its outcome with the permit.
    fn disarm(&mut self) -> Option<Guard<'b>> {
        self.armed = false;
        self.permit.take()
    }
}

impl Drop for Cancelled<'_, '_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let by_deadline = self.deadline_at.is_some_and(|at| Instant::now() >= at);
        if let Some(permit) = self.permit.take() {
            permit.cancelled(by_deadline);
        }
        if by_deadline {
            self.up.report(self.ep, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::upstream;
    use super::*;
    use crate::body::req_full;
    use http::{Method, StatusCode};
    use std::sync::Mutex;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;
    use tower::Service as _;
    use tower_test::mock;

    type Handle = mock::Handle<(String, Method), Response<&'static str>>;
    /// The loop's outcome: status, endpoint URL and attempts.
    type Task = tokio::task::JoinHandle<Result<(u16, String, u32), GatewayError>>;

    /// A transport whose answers the test gives: each attempt arrives at the handle as the
    /// endpoint's URL and the method.
    struct Mocked(Mutex<mock::Mock<(String, Method), Response<&'static str>>>);

    impl Transport for Mocked {
        type Body = &'static str;

        fn send<'a>(
            &'a self,
            ep: &'a Endpoint,
            req: Request<ReqBody>,
        ) -> impl Future<Output = Result<Response<&'static str>, SendError>> + Send + 'a {
            let fut = {
                let mut m = self.0.lock().unwrap();
                let mut cx = Context::from_waker(Waker::noop());
                assert!(matches!(m.poll_ready(&mut cx), Poll::Ready(Ok(()))));
                m.call((ep.url.to_string(), req.method().clone()))
            };
            async move {
                fut.await.map_err(|e| match e.downcast::<SendError>() {
                    Ok(s) => *s,
                    Err(e) => SendError::Request(e),
                })
            }
        }
    }

    fn request(method: Method) -> http::request::Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = method;
        parts
    }

    fn build(
        parts: &http::request::Parts,
        headers: HeaderMap,
        _ep: &Endpoint,
        body: ReqBody,
    ) -> Result<Request<ReqBody>, GatewayError> {
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.headers_mut() = headers;
        Ok(req)
    }

    fn status(code: u16, body: &'static str) -> Response<&'static str> {
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::from_u16(code).unwrap();
        r
    }

    /// Runs the loop for `method` on `up` in a task; the test answers through the handle.
    fn start(up: &'static Upstream, body: Replay, deadline_at: Option<Instant>) -> (Task, Handle) {
        let (svc, handle) = mock::pair();
        let transport: &'static Mocked = Box::leak(Box::new(Mocked(Mutex::new(svc))));
        let task = tokio::spawn(async move {
            let plan = Plan {
                up,
                policy: up.retry.as_ref(),
                deadline_at,
                grpc: false,
            };
            let (mut parts, mut body) = (request(Method::GET), body);
            let a = run(plan, transport, &mut parts, &mut body, build).await?;
            Ok((a.resp.status().as_u16(), a.ep.url.to_string(), a.attempts))
        });
        (task, handle)
    }

    fn leak(up: Upstream) -> &'static Upstream {
        Box::leak(Box::new(up))
    }

    fn kept() -> Replay {
        Replay::Kept(http_body_util::Full::new(bytes::Bytes::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_is_retried_on_the_other_endpoint_after_a_backoff() {
        let up = leak(upstream(
            "[retry]\nattempts = 3\nbackoff = \"100ms\"\nmax_backoff = \"100ms\"",
        ));
        let (task, mut h) = start(up, kept(), None);
        let (first, tx) = h.next_request().await.unwrap();
        let t0 = Instant::now();
        tx.send_response(status(503, "busy"));
        let (second, tx) = h.next_request().await.unwrap();
        assert!(
            t0.elapsed() <= Duration::from_millis(100),
            "full jitter up to max_backoff"
        );
        assert_ne!(
            first.0, second.0,
            "a retry prefers an endpoint not tried yet"
        );
        tx.send_response(status(200, "ok"));
        let (code, url, attempts) = task.await.unwrap().unwrap();
        assert_eq!((code, attempts), (200, 2));
        assert_eq!(url, second.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_attempt_s_answer_is_returned_when_all_fail() {
        let up = leak(upstream("[retry]\nattempts = 2"));
        let (task, mut h) = start(up, kept(), None);
        for _ in 0..2 {
            let (_, tx) = h.next_request().await.unwrap();
            tx.send_response(status(502, "bad"));
        }
        let (code, _, attempts) = task.await.unwrap().unwrap();
        assert_eq!((code, attempts), (502, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_is_retried_and_a_streamed_body_is_not() {
        let up = leak(upstream("[retry]\nattempts = 3"));
        let (task, mut h) = start(up, kept(), None);
        let (_, tx) = h.next_request().await.unwrap();
        tx.send_error(SendError::Connect("refused".into()));
        let (_, tx) = h.next_request().await.unwrap();
        tx.send_response(status(200, "ok"));
        assert_eq!(task.await.unwrap().unwrap().2, 2);

        // The same failure with a body that can be sent only once: one attempt.
        let (task, mut h) = start(up, Replay::once(req_full("x")), None);
        let (_, tx) = h.next_request().await.unwrap();
        tx.send_error(SendError::Connect("refused".into()));
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, GatewayError::UpstreamConnect(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_stops_retries() {
        let up = leak(upstream(
            "[retry]\nattempts = 3\nbudget_percent = 0\nmin_retries_per_second = 0",
        ));
        let (task, mut h) = start(up, kept(), None);
        let (_, tx) = h.next_request().await.unwrap();
        tx.send_response(status(503, "busy"));
        let (code, _, attempts) = task.await.unwrap().unwrap();
        assert_eq!((code, attempts), (503, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_ends_the_loop_with_503_circuit_open() {
        let up = leak(upstream(
            "[retry]\nattempts = 3\n[circuit_breaker]\nconsecutive_failures = 2",
        ));
        let (task, mut h) = start(up, kept(), None);
        for _ in 0..2 {
            let (_, tx) = h.next_request().await.unwrap();
            tx.send_response(status(503, "busy"));
        }
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, GatewayError::CircuitOpen { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_attempt_counts_only_when_the_deadline_cut_it() {
        let cfg = "[circuit_breaker]\nconsecutive_failures = 1";
        // The client goes away a second into a 10 s deadline: nothing is held against the
        // service.
        let up = leak(upstream(cfg));
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let (task, mut h) = start(up, kept(), deadline);
        let (_req, _tx) = h.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        task.abort();
        let _ = task.await;
        assert_eq!(up.breaker.as_ref().unwrap().state_name(), "closed");

        // The deadline passed while the attempt ran: that is the service's failure.
        let up = leak(upstream(cfg));
        let deadline = Some(Instant::now() + Duration::from_secs(1));
        let (task, mut h) = start(up, kept(), deadline);
        let (_req, _tx) = h.next_request().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        task.abort();
        let _ = task.await;
        assert_eq!(up.breaker.as_ref().unwrap().state_name(), "open");
    }
}
