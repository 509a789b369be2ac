//! Response caching: an RFC 9111 shared cache in a route's stack, between the rate limit and
//! the plugins (`route::chain`). `rules.rs` decides what may be stored and for how long,
//! `key.rs` what an object is found by, `store.rs` holds the objects (in memory, weighed by
//! bytes) and the fills in flight, `fill.rs` stores a response while the client reads it.
//!
//! For each GET or HEAD of a cached route:
//! - a fresh stored response answers it (`Cache-Status: gatehouse; hit`), a HEAD from a stored
//!   GET, a conditional request with 304 when its validators match;
//! - a stale one within `stale-while-revalidate` answers it too, while one background request
//!   per URL refreshes it;
//! - otherwise the request goes to the service, conditional on the stored validators when
//!   there are any (a 304 refreshes the stored headers); concurrent misses of one URL wait for
//!   the first one's response (coalescing) instead of each asking the service;
//! - when the service fails (5xx, timeout, open circuit, no endpoint, the route's fallback
//!   answering), a stale response within `stale-if-error` answers instead.
//!
//! Unsafe methods go to the service, and when they succeed the URL (and the `Location` and
//! `Content-Location` they answer with, on the same host) is invalidated.

mod fill;
pub(crate) mod key;
pub(crate) mod rules;
pub(crate) mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use crate::backend::RespBody;
use crate::body::{req_full, ReqBody};
use crate::context::{Exchange, Identity};
use crate::error::{classify, BoxError, Problem};
use fill::{FillBody, Filling};
use rules::{Assumptions, RequestDirectives, ResponseDirectives};
pub(crate) use store::CacheStore;
use store::{Join, Object, Outcome};
use tower::{Service, ServiceExt};

pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// `gatehouse_cache_total`'s results, in the order of `RouteCache::results`.
pub(crate) const RESULTS: [&str; 6] =
    ["hit", "miss", "stale", "revalidated", "coalesced", "bypass"];
const HIT: usize = 0;
const MISS: usize = 1;
const STALE: usize = 2;
const REVALIDATED: usize = 3;
const COALESCED: usize = 4;
const BYPASS: usize = 5;

/// A route's cache settings, compiled.
pub(crate) struct RouteCache {
    pub(crate) store: Arc<CacheStore>,
    /// `frontend/route`.
    pub(crate) route: Arc<str>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    /// Request headers that select a variant besides the service's `Vary`.
    pub(crate) vary: Box<[HeaderName]>,
    pub(crate) key_query: Option<Box<[Box<str>]>>,
    /// `private` responses are stored per identity (the route has authentication).
    pub(crate) per_identity: bool,
    pub(crate) results: [prometheus::IntCounter; 6],
}

/// The cache layer of one route.
#[derive(Clone)]
pub(crate) struct CacheLayer(Arc<RouteCache>);

impl CacheLayer {
    pub(crate) fn new(rc: RouteCache) -> Self {
        CacheLayer(Arc::new(rc))
    }

    /// Runs one request through the cache, above the route's stack `inner`.
    pub(crate) fn call<S: Inner>(&self, inner: &S, req: Request<ReqBody>) -> BoxFuture {
        let (rc, inner) = (self.0.clone(), inner.clone());
        Box::pin(serve(rc, inner, req))
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

/// The stack below the cache (the erased rest of the route).
pub(crate) trait Inner:
    Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Inner for S where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// What a request looked up.
struct Lookup {
    key: Arc<str>,
    identity: Option<Box<str>>,
    /// The variant that answers it, if one is stored.
    found: Option<Arc<Object>>,
    /// A URL entry existed (for `uri-miss` against `vary-miss`).
    url_known: bool,
}

async fn serve<S: Inner>(
    rc: Arc<RouteCache>,
    inner: S,
    req: Request<ReqBody>,
) -> Result<Response<RespBody>, BoxError> {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return other_method(&rc, &inner, req).await;
    }
    let rd = if req.headers().contains_key(header::CACHE_CONTROL)
        || req.headers().contains_key(header::PRAGMA)
    {
        RequestDirectives::parse(req.headers())
    } else {
        RequestDirectives::default()
    };
    let Some(exchange) = req.extensions().get::<Exchange>().cloned() else {
        return inner.clone().oneshot(req).await;
    };
    let lookup = rc.lookup(&exchange, req.headers());
    let now = Instant::now();
    if let Some(obj) = &lookup.found {
        if rd.no_store {
            // Not stored, and not answered from the store either (§5.2.1.5 leaves it open;
            // the client asked for a fresh exchange).
        } else if !rd.no_cache && usable(obj, &rd, now) {
            rc.count(HIT);
            let status = format!("gatehouse; hit; ttl={}", obj.ttl_secs(now));
            return Ok(answer(obj, &req, now, &status));
        } else if !rd.no_cache && obj.serves_while_revalidating(now) {
            rc.count(STALE);
            refresh(&rc, &inner, &req, &exchange, &lookup);
            let status = format!(
                "gatehouse; hit; ttl={}; detail=stale-while-revalidate",
                obj.ttl_secs(now)
            );
            return Ok(answer(obj, &req, now, &status));
        }
    }
    if rd.only_if_cached {
        return Err(Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "not_cached",
            "No stored response can answer this only-if-cached request",
        )
        .into());
    }
    let fwd = if rd.no_cache || rd.no_store {
        "request"
    } else if lookup.found.is_some() {
        "stale"
    } else if lookup.url_known {
        "vary-miss"
    } else {
        "uri-miss"
    };
    // Not filled through this request: a HEAD (no body to store), a range (not assembled),
    // or a client that asked for nothing to be stored.
    if method == Method::HEAD || req.headers().contains_key(header::RANGE) || rd.no_store {
        rc.count(BYPASS);
        let resp = inner.clone().oneshot(req).await?;
        return Ok(with_status(resp, &format!("gatehouse; fwd={fwd}")));
    }
    match rc.store.join(&lookup.key) {
        Join::Lead(guard) => {
            rc.count(MISS);
            forward(&rc, &inner, req, &lookup, fwd, Some(guard)).await
        }
        Join::Follow(flight) => match flight.wait(&rc.store).await {
            Some(Outcome::Stored(obj))
                if obj.answers(req.headers(), lookup.identity.as_deref()) =>
            {
                rc.count(COALESCED);
                let now = Instant::now();
                let status = format!("gatehouse; fwd={fwd}; collapsed; ttl={}", obj.ttl_secs(now));
                Ok(answer(&obj, &req, now, &status))
            }
            Some(Outcome::Failed)
                if lookup
                    .found
                    .as_ref()
                    .is_some_and(|o| o.serves_on_error(Instant::now())) =>
            {
                rc.count(STALE);
                let obj = lookup
                    .found
                    .as_ref()
                    .map(Arc::clone)
                    .ok_or("checked above")?;
                let now = Instant::now();
                let status = format!(
                    "gatehouse; fwd=stale; collapsed; ttl={}; detail=stale-if-error",
                    obj.ttl_secs(now)
                );
                Ok(answer(&obj, &req, now, &status))
            }
            _ => {
                rc.count(MISS);
                forward(&rc, &inner, req, &lookup, fwd, None).await
            }
        },
    }
}

impl RouteCache {
    fn count(&self, result: usize) {
        if let Some(c) = self.results.get(result) {
            c.inc();
        }
    }

    fn key(&self, exchange: &Exchange) -> String {
        let host = exchange.host().and_then(|h| h.to_str().ok()).unwrap_or("");
        key::primary(
            exchange.client().tls,
            host,
            exchange.path(),
            exchange.query(),
            self.key_query.as_deref(),
        )
    }

    fn lookup(&self, exchange: &Exchange, headers: &HeaderMap) -> Lookup {
        let key: Arc<str> = self.key(exchange).into();
        let identity = if self.per_identity {
            exchange.identity().and_then(identity_key)
        } else {
            None
        };
        let (found, url_known) = match self.store.get(&key) {
            Some(v) => (v.find(headers, identity.as_deref()).cloned(), true),
            None => (None, false),
        };
        Lookup {
            key,
            identity,
            found,
            url_known,
        }
    }

    fn assumptions(&self, identity: bool) -> Assumptions {
        Assumptions {
            ttl: self.ttl,
            heuristic: self.store.heuristic,
            store_set_cookie: self.store.store_set_cookie,
            per_identity: identity,
        }
    }
}

/// Who a private object is for: the API-key consumer, or the JWT's subject (with the
/// provider, so two providers' subjects never meet).
fn identity_key(id: &Identity) -> Option<Box<str>> {
    if let Some(c) = &id.consumer {
        return Some(format!("{}\0consumer\0{c}", id.provider).into());
    }
    let sub = id.claims.as_ref()?.get("sub")?.as_str()?;
    Some(format!("{}\0sub\0{sub}", id.provider).into())
}

/// Whether a stored response may answer a request without the service (§4.2, §5.2.1).
fn usable(obj: &Object, rd: &RequestDirectives, now: Instant) -> bool {
    let age = obj.age(now);
    if rd.max_age.is_some_and(|m| age > Duration::from_secs(m)) {
        return false;
    }
    if obj.fresh(now) {
        let left = obj.timing.lifetime.saturating_sub(age);
        return rd.min_fresh.is_none_or(|m| left >= Duration::from_secs(m));
    }
    // A client that accepts staleness (max-stale), where the service allows it.
    match rd.max_stale {
        Some(limit) if obj.cc.allows_stale() && !obj.cc.no_cache => {
            limit.is_none_or(|l| obj.staleness(now) <= Duration::from_secs(l))
        }
        _ => false,
    }
}

/// Sends the request to the service (conditional on the stored validators) and handles what
/// it answers: a 304 refreshes the stored object, a storable response is filled as the client
/// reads it, a failure is answered by a stale object when one may stand in.
async fn forward<S: Inner>(
    rc: &Arc<RouteCache>,
    inner: &S,
    mut req: Request<ReqBody>,
    lookup: &Lookup,
    fwd: &str,
    guard: Option<store::FlightGuard>,
) -> Result<Response<RespBody>, BoxError> {
    // The client's own conditions are answered here, from what the service sends: it is asked
    // for the representation (or, when one is stored, whether that one is still current).
    let client_conditions = take_conditions(req.headers_mut());
    if let Some(obj) = &lookup.found {
        if let Some(etag) = obj.etag() {
            req.headers_mut()
                .insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = obj.last_modified() {
            req.headers_mut()
                .insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
    }
    let authorized = req.headers().contains_key(header::AUTHORIZATION)
        || req
            .extensions()
            .get::<Exchange>()
            .is_some_and(|x| x.identity().is_some());
    let request_headers = req.headers().clone();
    let request_time = SystemTime::now();
    let result = inner.clone().oneshot(req).await;
    let response_time = SystemTime::now();
    let now = Instant::now();
    let stale = lookup.found.as_ref().filter(|o| o.serves_on_error(now));
    let resp = match result {
        Err(e) => {
            let p = classify(&*e);
            if let (Some(obj), true) = (stale, failed(p.status)) {
                if let Some(g) = guard {
                    g.finish(Outcome::Failed);
                }
                rc.count(STALE);
                let status = format!(
                    "gatehouse; fwd=stale; fwd-status={}; ttl={}; detail=stale-if-error",
                    p.status.as_u16(),
                    obj.ttl_secs(now)
                );
                return Ok(answer_to(obj, &client_conditions, false, now, &status));
            }
            if let Some(g) = guard {
                g.finish(Outcome::Failed);
            }
            return Err(e);
        }
        Ok(resp) => resp,
    };
    let status = resp.status();
    let is_fallback = resp
        .extensions()
        .get::<crate::layers::fallback::Served>()
        .is_some();
    if is_fallback || failed(status) {
        if let Some(g) = guard {
            g.finish(Outcome::Failed);
        }
        if let Some(obj) = stale {
            rc.count(STALE);
            let status = format!(
                "gatehouse; fwd=stale; fwd-status={}; ttl={}; detail=stale-if-error",
                status.as_u16(),
                obj.ttl_secs(now)
            );
            return Ok(answer_to(obj, &client_conditions, false, now, &status));
        }
        return Ok(with_status(
            resp,
            &format!("gatehouse; fwd={fwd}; fwd-status={}", status.as_u16()),
        ));
    }
    let identity = lookup.identity.is_some();
    if status == StatusCode::NOT_MODIFIED {
        let Some(obj) = &lookup.found else {
            if let Some(g) = guard {
                g.finish(Outcome::NotStored);
            }
            return Ok(with_status(
                resp,
                &format!("gatehouse; fwd={fwd}; fwd-status=304"),
            ));
        };
        // §4.3.4: the stored response, with the 304's headers over its own.
        let mut headers = obj.headers.clone();
        for name in resp.headers().keys() {
            if !matches!(
                name.as_str(),
                "content-length" | "content-encoding" | "transfer-encoding" | "content-range"
            ) {
                headers.remove(name);
                for v in resp.headers().get_all(name) {
                    headers.append(name.clone(), v.clone());
                }
            }
        }
        let cc = ResponseDirectives::parse(&headers);
        let timing = rules::storable(
            obj.status,
            &headers,
            &cc,
            authorized,
            &rc.assumptions(identity),
            request_time,
            response_time,
        );
        let refreshed = Arc::new(Object {
            status: obj.status,
            stale_while_revalidate: window(cc.stale_while_revalidate, rc.stale_while_revalidate),
            stale_if_error: window(cc.stale_if_error, rc.stale_if_error),
            headers,
            body: obj.body.clone(),
            selected: obj.selected.clone(),
            identity: obj.identity.clone(),
            cc,
            timing: timing.unwrap_or(obj.timing),
            stored_at: now,
        });
        rc.count(REVALIDATED);
        match timing {
            Ok(_) => {
                rc.store.put(&lookup.key, &rc.route, refreshed.clone());
                if let Some(g) = guard {
                    g.finish(Outcome::Stored(refreshed.clone()));
                }
            }
            Err(_) => rc.store.remove(&lookup.key),
        }
        let status = format!(
            "gatehouse; fwd=stale; fwd-status=304; ttl={}",
            refreshed.ttl_secs(now)
        );
        return Ok(answer_to(
            &refreshed,
            &client_conditions,
            false,
            now,
            &status,
        ));
    }
    let cc = ResponseDirectives::parse(resp.headers());
    let timing = rules::storable(
        status,
        resp.headers(),
        &cc,
        authorized,
        &rc.assumptions(identity),
        request_time,
        response_time,
    );
    let too_large = http_body::Body::size_hint(resp.body())
        .upper()
        .is_some_and(|n| n > rc.store.max_object_size as u64);
    let timing = match timing {
        Ok(t) if !too_large => t,
        other => {
            if let Some(g) = guard {
                g.finish(Outcome::NotStored);
            }
            let detail = match other {
                Err(why) => why.detail(),
                Ok(_) => "too-large",
            };
            return Ok(with_status(
                resp,
                &format!(
                    "gatehouse; fwd={fwd}; fwd-status={}; detail={detail}",
                    status.as_u16()
                ),
            ));
        }
    };
    // Stored under the request header values the response varies on, besides the route's.
    let mut names: Vec<HeaderName> = rc.vary.to_vec();
    for n in rules::vary_names(resp.headers()) {
        if let Ok(n) = HeaderName::from_bytes(n.as_bytes()) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let selected = key::select(&request_headers, names.iter());
    let (parts, body) = resp.into_parts();
    let object = Object {
        status,
        headers: parts.headers.clone(),
        body: Bytes::new(),
        selected,
        identity: lookup.identity.clone(),
        stale_while_revalidate: window(cc.stale_while_revalidate, rc.stale_while_revalidate),
        stale_if_error: window(cc.stale_if_error, rc.stale_if_error),
        cc,
        timing,
        stored_at: now,
    };
    let ttl = object.ttl_secs(now);
    let matches = conditions_match(&client_conditions, &object);
    let filling = Filling::new(
        rc.store.clone(),
        lookup.key.clone(),
        rc.route.clone(),
        object,
        guard,
    );
    let fill = FillBody::new(body, filling);
    let cache_status = format!(
        "gatehouse; fwd={fwd}; fwd-status={}; stored; ttl={ttl}",
        status.as_u16()
    );
    if matches {
        // The client already has it: 304 now, and the object is filled in the background.
        tokio::spawn(async move {
            let _ = fill.collect().await;
        });
        let mut resp = not_modified(&parts.headers);
        resp.headers_mut()
            .append(CACHE_STATUS.clone(), status_value(&cache_status));
        return Ok(resp);
    }
    let mut resp = Response::from_parts(parts, RespBody::Stream(BoxBody::new(fill)));
    resp.headers_mut()
        .append(CACHE_STATUS.clone(), status_value(&cache_status));
    Ok(resp)
}

/// A failure a stale object may stand in for (RFC 5861 §4: what would be a 500, 502, 503 or
/// 504).
fn failed(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// A stale window: the service's directive, else the route's.
fn window(directive: Option<u64>, route: Duration) -> Duration {
    directive.map_or(route, Duration::from_secs)
}

/// Refreshes a stale object in the background, once per URL at a time.
fn refresh<S: Inner>(
    rc: &Arc<RouteCache>,
    inner: &S,
    req: &Request<ReqBody>,
    exchange: &Exchange,
    lookup: &Lookup,
) {
    let Join::Lead(guard) = rc.store.join(&lookup.key) else {
        return;
    };
    let mut bg = Request::new(req_full(Bytes::new()));
    *bg.method_mut() = Method::GET;
    *bg.uri_mut() = req.uri().clone();
    *bg.version_mut() = req.version();
    *bg.headers_mut() = req.headers().clone();
    bg.extensions_mut().insert(exchange.sub_request());
    let (rc, inner) = (rc.clone(), inner.clone());
    let lookup = Lookup {
        key: lookup.key.clone(),
        identity: lookup.identity.clone(),
        found: lookup.found.clone(),
        url_known: true,
    };
    tokio::spawn(async move {
        if let Ok(resp) = forward(&rc, &inner, bg, &lookup, "stale", Some(guard)).await {
            // Reading the body to its end is what stores it.
            let _ = resp.into_body().collect().await;
        }
    });
}

/// Methods other than GET and HEAD: forwarded; an unsafe one that succeeds invalidates its
/// URL and the URLs its `Location` and `Content-Location` name on the same host (§4.4).
async fn other_method<S: Inner>(
    rc: &Arc<RouteCache>,
    inner: &S,
    req: Request<ReqBody>,
) -> Result<Response<RespBody>, BoxError> {
    let safe = matches!(*req.method(), Method::OPTIONS | Method::TRACE);
    let exchange = req.extensions().get::<Exchange>().cloned();
    rc.count(BYPASS);
    let resp = inner.clone().oneshot(req).await?;
    let ok = resp.status().is_success() || resp.status().is_redirection();
    if let (false, true, Some(x)) = (safe, ok, exchange) {
        rc.store.remove(&rc.key(&x));
        let host = x.host().and_then(|h| h.to_str().ok()).unwrap_or("");
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = resp.headers().get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if let Some(k) = same_origin_key(x.client().tls, host, target) {
                rc.store.remove(&k);
            }
        }
    }
    Ok(with_status(resp, "gatehouse; fwd=method"))
}

/// The key of a `Location`-like reference, when it is on the request's own origin.
fn same_origin_key(tls: bool, host: &str, target: &str) -> Option<String> {
    let uri: http::Uri = target.parse().ok()?;
    if let Some(authority) = uri.authority() {
        let scheme_ok = uri.scheme_str() == Some(if tls { "https" } else { "http" });
        if !scheme_ok || !authority.as_str().eq_ignore_ascii_case(host) {
            return None;
        }
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return None;
    }
    Some(key::primary(tls, host, path, uri.query(), None))
}

/// The client's conditional headers, taken off the request (they are evaluated here).
struct Conditions {
    if_none_match: HeaderMap,
    if_modified_since: Option<SystemTime>,
}

fn take_conditions(h: &mut HeaderMap) -> Conditions {
    let mut if_none_match = HeaderMap::new();
    for v in h.get_all(header::IF_NONE_MATCH) {
        if_none_match.append(header::IF_NONE_MATCH, v.clone());
    }
    h.remove(header::IF_NONE_MATCH);
    let if_modified_since = h
        .remove(header::IF_MODIFIED_SINCE)
        .and_then(|v| rules::http_date(&v));
    Conditions {
        if_none_match,
        if_modified_since,
    }
}

/// RFC 9110 §13.2.2 for a stored response: `If-None-Match` first, else `If-Modified-Since`
/// against `Last-Modified` (or `Date`, §4.3.2).
fn conditions_match(c: &Conditions, obj: &Object) -> bool {
    if c.if_none_match.contains_key(header::IF_NONE_MATCH) {
        return rules::none_match(&c.if_none_match, obj.etag());
    }
    let Some(since) = c.if_modified_since else {
        return false;
    };
    let modified = obj
        .last_modified()
        .or_else(|| obj.headers.get(header::DATE))
        .and_then(rules::http_date);
    modified.is_some_and(|m| m <= since)
}

/// A stored object as the answer to `req` (a 304 when its conditions match).
fn answer(obj: &Object, req: &Request<ReqBody>, now: Instant, status: &str) -> Response<RespBody> {
    let h = req.headers();
    let conditional =
        h.contains_key(header::IF_NONE_MATCH) || h.contains_key(header::IF_MODIFIED_SINCE);
    if conditional {
        let mut c = Conditions {
            if_none_match: HeaderMap::new(),
            if_modified_since: h.get(header::IF_MODIFIED_SINCE).and_then(rules::http_date),
        };
        for v in h.get_all(header::IF_NONE_MATCH) {
            c.if_none_match.append(header::IF_NONE_MATCH, v.clone());
        }
        return answer_to(obj, &c, req.method() == Method::HEAD, now, status);
    }
    respond(obj, req.method() == Method::HEAD, now, status)
}

fn answer_to(
    obj: &Object,
    c: &Conditions,
    head: bool,
    now: Instant,
    status: &str,
) -> Response<RespBody> {
    if conditions_match(c, obj) {
        let mut resp = not_modified(&obj.headers);
        resp.headers_mut()
            .insert(header::AGE, HeaderValue::from(obj.age(now).as_secs()));
        resp.headers_mut()
            .append(CACHE_STATUS.clone(), status_value(status));
        return resp;
    }
    respond(obj, head, now, status)
}

fn respond(obj: &Object, head: bool, now: Instant, status: &str) -> Response<RespBody> {
    let body = if head { Bytes::new() } else { obj.body.clone() };
    let mut resp = Response::new(RespBody::Full(Full::new(body)));
    *resp.status_mut() = obj.status;
    *resp.headers_mut() = obj.headers.clone();
    let h = resp.headers_mut();
    h.insert(header::AGE, HeaderValue::from(obj.age(now).as_secs()));
    h.append(CACHE_STATUS.clone(), status_value(status));
    resp
}

/// A 304 carrying the fields a 200 would have (RFC 9110 §15.4.5).
fn not_modified(headers: &HeaderMap) -> Response<RespBody> {
    let mut resp = Response::new(crate::backend::full(Bytes::new()));
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::LAST_MODIFIED,
        header::VARY,
    ] {
        for v in headers.get_all(&name) {
            resp.headers_mut().append(name.clone(), v.clone());
        }
    }
    resp
}

fn with_status(mut resp: Response<RespBody>, status: &str) -> Response<RespBody> {
    resp.headers_mut()
        .append(CACHE_STATUS.clone(), status_value(status));
    resp
}

/// `Cache-Status` values are made of fixed text and numbers only.
fn status_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("gatehouse"))
}

/// Builds the `[cache]` store (the previous snapshot's, while `[cache]` is unchanged: objects
/// survive reloads and are dropped when its settings change).
pub(crate) fn build_store(
    loaded: &crate::config::LoadedConfig,
    previous: Option<&crate::resources::Resources>,
    resources: &mut crate::resources::Resources,
    metrics: &crate::observe::metrics::Metrics,
    errors: &mut crate::config::ConfigErrors,
) -> Option<Arc<CacheStore>> {
    let default = crate::config::CacheConfig::default();
    let cfg = loaded
        .gateway
        .cache
        .as_ref()
        .map_or(&default, |c| c.get_ref());
    let mut ok = true;
    for t in cfg.tiers.get_ref() {
        if *t.get_ref() == crate::config::Tier::Redis {
            ok = false;
            errors.push(loaded.gateway_file.error_at(
                t.span(),
                "[cache] tiers: the `redis` tier is not available in this version; use [\"memory\"]"
                    .to_owned(),
            ));
        }
    }
    if !cfg
        .tiers
        .get_ref()
        .iter()
        .any(|t| *t.get_ref() == crate::config::Tier::Memory)
    {
        ok = false;
        errors.push(loaded.gateway_file.error_at(
            cfg.tiers.span(),
            "[cache] tiers must hold \"memory\"".to_owned(),
        ));
    }
    if cfg.max_object_size.0 > cfg.max_size.0 {
        ok = false;
        let span = loaded.gateway.cache.as_ref().map_or(0..0, |c| c.span());
        errors.push(loaded.gateway_file.error_at(
            span,
            "[cache] max_object_size is larger than max_size".to_owned(),
        ));
    }
    if !ok {
        return None;
    }
    let built = resources.reuse_or_build(previous, "cache", cfg, |_| {
        Ok::<_, ()>(CacheStore::new(cfg, metrics))
    });
    built.ok().map(|(s, _)| s)
}
