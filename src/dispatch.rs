//! The top of the request path, one per connection: load the config snapshot, give the request
//! its id, normalize and route it, record what routing found in the request's `Exchange` (a
//! typed extension: route, captured parameters, original URI, authority, client), call the
//! route's prebuilt service, and turn any error into the one problem+json response. The body of
//! every response is wrapped so that metrics and the access log are recorded when it ends.
//! Nothing here is specific to a backend: the proxy builds its own upstream target and
//! forwarding headers from the `Exchange`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;

use crate::backend::RespBody;
use crate::body::{linger, ClientBody};
use crate::context::{Client, Exchange, Params, Parts};
use crate::error::{classify, problem_response, BoxError, GatewayError};
use crate::gateway::{Gateway, Live};
use crate::layers::cors::is_preflight;
use crate::observe::access::{Finish, InFlight, ObservedBody, Record};
use crate::observe::metrics::RouteMetrics;
use crate::observe::trace::{new_request_id, valid_request_id};
use crate::route::RouteCall;
use crate::routing::head::check_head;
use crate::routing::{normalize, Found};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The hyper service of one client connection. Cloned per request: one reference count.
#[derive(Clone)]
pub(crate) struct Dispatcher(Arc<Conn>);

/// What the dispatcher knows of its connection.
pub(crate) struct Conn {
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

/// A request in flight on the connection ends when its response body ends (or is dropped).
impl Finish for Conn {
    fn finish(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }
}

impl Dispatcher {
    pub(crate) fn new(live: Arc<Live>, peer: SocketAddr, tls: bool) -> Self {
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
    type Response = Response<ObservedBody<RespBody>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.0.started.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(self.0.clone());
        Box::pin(Conn::dispatch(self.0.clone(), in_flight, req))
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
        this: Arc<Conn>,
        in_flight: InFlight,
        mut req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ObservedBody<RespBody>>, Infallible>> + Send {
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
        let overloaded = this.live.request_limit.is_some() && global_permit.is_none();
        // The per-IP guard counts only requests the gateway would otherwise take.
        let guarded = if overloaded {
            None
        } else {
            gw.settings
                .ip_guard
                .as_ref()
                .and_then(|g| g.refuse(&req, this.peer.ip(), trusted, &gw.settings.trusted_proxies))
        };
        let (routed, metrics, exchange) = if overloaded {
            (
                Err(GatewayError::Overloaded.into()),
                gw.unmatched.clone(),
                None,
            )
        } else if let Some(refused) = guarded {
            (Err(refused), gw.unmatched.clone(), None)
        } else {
            this.route(&gw, trusted, &request_id, start, req)
        };
        // Made before the response exists: if the client goes away first, the request is
        // dropped here, and the record says so (499, `client_closed`).
        let mut record = Record {
            metrics,
            method,
            uri,
            status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            code: Some("client_closed"),
            bytes: 0,
            request_id,
            exchange,
            _global_permit: global_permit,
            start,
            log: gw.settings.access_log,
            _in_flight: in_flight,
        };
        drop(gw);
        async move {
            let result = match routed {
                Ok(call) => call.await,
                Err(e) => Err(e),
            };
            let mut resp = match result {
                Ok(resp) => {
                    record.code = None;
                    resp
                }
                Err(e) => {
                    let (resp, code) = error_response(&*e, &record.request_id, &record.metrics);
                    record.code = Some(code);
                    resp
                }
            };
            resp.headers_mut()
                .insert(X_REQUEST_ID.clone(), record.request_id.clone());
            record.status = resp.status();
            Ok(resp.map(|b| ObservedBody::new(b, record)))
        }
    }

    /// Checks and routes the request and starts its route's stack; the caller awaits the
    /// returned call. Not `async`: this future's state would keep a second copy of the request.
    fn route(
        &self,
        gw: &Gateway,
        trusted: bool,
        request_id: &HeaderValue,
        started: Instant,
        mut req: Request<Incoming>,
    ) -> (
        Result<RouteCall, BoxError>,
        Arc<RouteMetrics>,
        Option<Exchange>,
    ) {
        let unmatched = || gw.unmatched.clone();
        let authority = match check_head(&mut req, &gw.settings.head) {
            Ok(a) => a,
            Err(e) => return (Err(e.into()), unmatched(), None),
        };
        let path = match normalize(req.uri().path()) {
            Ok(p) => p,
            Err(_) => {
                return (
                    Err(GatewayError::BadRequest("invalid percent-encoding in path").into()),
                    unmatched(),
                    None,
                )
            }
        };
        // The host is made for routing only where routes are chosen by host.
        let host = match &authority {
            Some(a) if gw.router.routes_by_host() => a.host(),
            _ => Cow::Borrowed(""),
        };
        let mut found = gw.router.find(&host, &path, req.method(), req.headers());
        if req.method() == Method::OPTIONS && is_preflight(&req) {
            // A preflight goes to the route the real request will take, when that route's
            // frontend has a CORS policy (which answers it).
            let asked = req
                .headers()
                .get(header::ACCESS_CONTROL_REQUEST_METHOD)
                .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
            if let Some(m) = asked {
                let real = gw.router.find(&host, &path, &m, req.headers());
                if matches!(real, Found::Route { index, .. } if gw.routes[index].cors) {
                    found = real;
                }
            }
        }
        let (route, params) = match found {
            Found::Route { index, params } => {
                let route = &gw.routes[index];
                let mut captured = Params::default();
                if !route.info.params.is_empty() {
                    for (_, v) in params.iter() {
                        captured.push(&path, v);
                    }
                }
                (route, captured)
            }
            Found::NoRoute => return (Err(GatewayError::NoRoute.into()), unmatched(), None),
            Found::MethodNotAllowed(allow) => {
                return (
                    Err(GatewayError::MethodNotAllowed {
                        allow: allow.clone(),
                    }
                    .into()),
                    unmatched(),
                    None,
                )
            }
        };
        drop(host);
        let metrics = route.metrics.clone();
        let max = route.max_request_body;
        // hyper has parsed and checked Content-Length: the body's exact size is that length.
        let declared = http_body::Body::size_hint(req.body()).exact();
        if declared.is_some_and(|n| n > max) {
            // Answered at once; the body is read and thrown away for a while (bounded), so
            // that a client still sending it reads the 413 rather than a reset connection.
            linger(req.into_body());
            return (Err(GatewayError::BodyTooLarge.into()), metrics, None);
        }
        let normalized = match path {
            Cow::Borrowed(_) => None,
            Cow::Owned(p) => Some(p.into_boxed_str()),
        };
        let exchange = Exchange::new(Parts {
            route: route.info.clone(),
            uri: req.uri().clone(),
            normalized,
            params,
            host: authority.map(|a| a.into_value()),
            request_id: request_id.clone(),
            client: Client {
                peer: self.peer,
                peer_ip: self.peer_ip.clone(),
                tls: self.tls,
                trusted,
            },
            started,
            wants_upstream: gw.settings.access_log,
        });
        req.extensions_mut().insert(exchange.clone());
        let req = req.map(|b| Either::Left(ClientBody::new(b, max)));
        (Ok(route.service.call(req)), metrics, Some(exchange))
    }
}

/// The problem+json response for a request that failed. Failures of backends are expected
/// events, recorded by the access log and metrics; only a failure of the gateway itself is
/// worth a warning.
fn error_response(
    e: &(dyn std::error::Error + Send + Sync + 'static),
    request_id: &HeaderValue,
    metrics: &RouteMetrics,
) -> (Response<RespBody>, &'static str) {
    let problem = classify(e);
    let id = request_id.to_str().unwrap_or("-");
    if problem.code == "internal_error" {
        tracing::warn!(request_id = id, route = metrics.route(), error = %e, "request failed inside the gateway");
    } else {
        tracing::debug!(request_id = id, route = metrics.route(), error = %e, code = problem.code, "request failed");
    }
    (
        problem_response(&problem, request_id).map(RespBody::Full),
        problem.code,
    )
}
