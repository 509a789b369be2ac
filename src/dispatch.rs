//! The top of the request path, one per connection: load the config snapshot, give the request
//! its id and trace context, normalize and route it, set the forwarding headers, call the
//! route's prebuilt service, and turn any error into the one problem+json response. The body of
//! every response is wrapped so that metrics and the access log are recorded when it ends.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{Either, Limited};
use hyper::body::Incoming;

use crate::body::RespBody;
use crate::error::{classify, problem_response, BoxError, GatewayError};
use crate::gateway::{Gateway, Live};
use crate::observe::access::{ObservedBody, Record};
use crate::observe::metrics::RouteMetrics;
use crate::observe::trace::{new_request_id, next_traceparent, valid_request_id};
use crate::route::RouteCall;
use crate::routing::{normalize, request_host, Found};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The hyper service of one client connection. Cloned per request: one reference count.
#[derive(Clone)]
pub struct Dispatcher(Arc<Conn>);

/// What the dispatcher knows of its connection.
pub struct Conn {
    live: Arc<Live>,
    peer: SocketAddr,
    /// The peer's address as a header value, made once per connection.
    peer_ip: HeaderValue,
    tls: bool,
    /// Requests started and finished (response body ended or dropped) on this connection: the
    /// connection driver parks a connection only while they are equal.
    started: AtomicU32,
    finished: AtomicU32,
    /// Set by the connection driver while it takes an idle HTTP/1 connection back from hyper:
    /// the socket must then stay open (`conn::Io`).
    pub(crate) parking: AtomicBool,
}

/// One request in flight on a connection; dropped when its response body ends (or is dropped).
pub struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}

impl Dispatcher {
    pub fn new(live: Arc<Live>, peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        Dispatcher(Arc::new(Conn {
            live,
            peer,
            peer_ip,
            tls,
            started: AtomicU32::new(0),
            finished: AtomicU32::new(0),
            parking: AtomicBool::new(false),
        }))
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.0
    }
}

impl hyper::service::Service<Request<Incoming>> for Dispatcher {
    type Response = Response<ObservedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.0.started.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight(self.0.clone());
        Box::pin(Conn::dispatch(in_flight, req))
    }
}

impl Conn {
    /// `gatehouse_connections_parked`.
    pub(crate) fn parked_gauge(&self) -> &prometheus::IntGauge {
        &self.live.metrics.connections_parked
    }

    /// Requests started on this connection so far (wrapping).
    pub(crate) fn started(&self) -> u32 {
        self.started.load(Ordering::Relaxed)
    }

    /// Whether no request is in flight: every response body has ended or been dropped.
    pub(crate) fn is_idle(&self) -> bool {
        self.started.load(Ordering::Relaxed) == self.finished.load(Ordering::Relaxed)
    }

    /// Everything up to the route's call runs here, synchronously. The returned future holds
    /// only what the response needs, not the request: an `async fn` would keep the request in
    /// its state (twice) for the whole exchange, and every move of the future would copy it.
    fn dispatch(
        in_flight: InFlight,
        mut req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ObservedBody>, Infallible>> + Send {
        let this = &*in_flight.0;
        let start = Instant::now();
        let gw = this.live.snapshot();
        let trusted = gw.settings.is_trusted(this.peer.ip());
        // One lookup: the id is kept, or set on the request as the backend must receive it.
        let request_id = match req.headers_mut().entry(&X_REQUEST_ID) {
            header::Entry::Occupied(e) if trusted && valid_request_id(e.get()) => e.get().clone(),
            header::Entry::Occupied(mut e) => {
                let id = new_request_id();
                e.insert(id.clone());
                id
            }
            header::Entry::Vacant(e) => e.insert(new_request_id()).clone(),
        };
        let method = req.method().clone();
        let uri = gw.settings.access_log.then(|| req.uri().clone());
        // The gateway's own limit: beyond it, 503 at once, before any work.
        let global_permit = match &this.live.request_limit {
            None => None,
            Some(sem) => sem.clone().try_acquire_owned().ok(),
        };
        let (routed, metrics) = if this.live.request_limit.is_some() && global_permit.is_none() {
            (Err(GatewayError::Overloaded.into()), gw.unmatched.clone())
        } else {
            this.route(&gw, trusted, req)
        };
        let log = gw.settings.access_log;
        drop(gw);
        async move {
            let result = match routed {
                Ok(call) => call.await,
                Err(e) => Err(e),
            };
            let mut resp = result.unwrap_or_else(|e| error_response(&*e, &request_id, &metrics));
            let upstream = match resp.body_mut() {
                Either::Left(b) => b.used.take(),
                Either::Right(_) => None,
            };
            resp.headers_mut()
                .insert(X_REQUEST_ID.clone(), request_id.clone());
            let record = Record {
                metrics,
                method,
                uri,
                status: resp.status(),
                request_id,
                upstream,
                global_permit,
                start,
                log,
                in_flight,
            };
            Ok(resp.map(|b| ObservedBody::new(b, record)))
        }
    }

    /// Routes the request and starts its route's stack; the caller awaits the returned call.
    /// Not `async`: this future's state would keep a second copy of the request.
    fn route(
        &self,
        gw: &Gateway,
        trusted: bool,
        mut req: Request<Incoming>,
    ) -> (Result<RouteCall, BoxError>, Arc<RouteMetrics>) {
        let unmatched = || gw.unmatched.clone();
        let (route, target) = {
            let path = match normalize(req.uri().path()) {
                Ok(p) => p,
                Err(_) => {
                    return (
                        Err(GatewayError::BadRequest("invalid percent-encoding in path").into()),
                        unmatched(),
                    )
                }
            };
            let host = request_host(req.uri(), req.headers());
            match gw.router.find(&host, &path, req.method(), req.headers()) {
                Found::Route { index, params } => {
                    let route = &gw.routes[index];
                    let query = if route.forward_query {
                        req.uri().query()
                    } else {
                        None
                    };
                    let target = route
                        .upstream_path
                        .as_ref()
                        .map(|u| u.build(&path, &params, query));
                    (route, target)
                }
                Found::NotFound => return (Err(GatewayError::NoRoute.into()), unmatched()),
                Found::MethodNotAllowed(allow) => {
                    return (
                        Err(GatewayError::MethodNotAllowed {
                            allow: allow.clone(),
                        }
                        .into()),
                        unmatched(),
                    )
                }
            }
        };
        let metrics = route.metrics.clone();

        let max = gw.settings.max_request_body;
        // hyper has parsed and checked Content-Length: the body's exact size is that length.
        let declared = http_body::Body::size_hint(req.body()).exact();
        if declared.is_some_and(|n| n > max) {
            return (Err(GatewayError::BodyTooLarge.into()), metrics);
        }
        // Before the target is rewritten: an HTTP/2 request's host is in its URI.
        self.forwarding_headers(&mut req, trusted);
        if let Some(t) = target {
            match Uri::from_maybe_shared(Bytes::from(t)) {
                Ok(u) => *req.uri_mut() = u,
                Err(_) => {
                    return (
                        Err(GatewayError::BadRequest("request target").into()),
                        metrics,
                    )
                }
            }
        }
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let req = req.map(|b| Either::Left(Limited::new(b, limit)));
        (Ok(route.service.call(req)), metrics)
    }

    /// X-Forwarded-For/-Proto/-Host and traceparent for the backend (X-Request-Id is already
    /// set). Values from a peer that is not a trusted proxy are replaced, never appended to.
    fn forwarding_headers(&self, req: &mut Request<Incoming>, trusted: bool) {
        let host = match req.headers().get(header::HOST) {
            Some(v) => Some(v.clone()),
            // An HTTP/2 client names the host only in :authority; keep it as Host, so that
            // `preserve_host` works whatever protocol the client spoke.
            None => {
                let v = req
                    .uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(v) = &v {
                    req.headers_mut().insert(header::HOST, v.clone());
                }
                v
            }
        };
        let h = req.headers_mut();
        // Entries: one lookup per header where a get and an insert would take two.
        match h.entry(&X_FORWARDED_FOR) {
            header::Entry::Occupied(mut e) if trusted => {
                let prev = e.get();
                let mut v = Vec::with_capacity(prev.len() + 2 + self.peer_ip.len());
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(self.peer_ip.as_bytes());
                e.insert(HeaderValue::from_bytes(&v).unwrap_or_else(|_| self.peer_ip.clone()));
            }
            header::Entry::Occupied(mut e) => {
                e.insert(self.peer_ip.clone());
            }
            header::Entry::Vacant(e) => {
                e.insert(self.peer_ip.clone());
            }
        }
        if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
            let proto = if self.tls { "https" } else { "http" };
            h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
        }
        if !(trusted && h.contains_key(&X_FORWARDED_HOST)) {
            match host {
                Some(v) => h.insert(X_FORWARDED_HOST.clone(), v),
                None => h.remove(&X_FORWARDED_HOST),
            };
        }
        if !trusted {
            h.remove(header::FORWARDED);
        }
        match h.entry(&TRACEPARENT) {
            header::Entry::Occupied(mut e) => {
                let tp = next_traceparent(Some(e.get()));
                e.insert(tp);
            }
            header::Entry::Vacant(e) => {
                e.insert(next_traceparent(None));
            }
        }
    }
}

/// The problem+json response for a request that failed. Failures of backends are expected
/// events, recorded by the access log and metrics; only a failure of the gateway itself is
/// worth a warning.
fn error_response(
    e: &(dyn std::error::Error + Send + Sync + 'static),
    request_id: &HeaderValue,
    metrics: &RouteMetrics,
) -> Response<RespBody> {
    let problem = classify(e);
    let id = request_id.to_str().unwrap_or("-");
    if problem.code == "internal_error" {
        tracing::warn!(request_id = id, route = metrics.route(), error = %e, "request failed inside the gateway");
    } else {
        tracing::debug!(request_id = id, route = metrics.route(), error = %e, code = problem.code, "request failed");
    }
    problem_response(&problem, request_id)
}
