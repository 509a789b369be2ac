//! What goes to the service: a miss or a revalidation (coalesced by the caller), a background
//! refresh, another method; and what its answer does to the store.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use tokio::time::Instant;
use tower::ServiceExt;

use super::answer::{
    answer_to, conditions_match, failed_with_status, not_modified, status_value, take_conditions,
    with_status,
};
use super::fill::{drain, FillBody, Filling};
use super::rules::{self, ResponseDirectives};
use super::store::{FlightGuard, Join, Object, Outcome};
use super::{key, Inner, Lookup, RouteCache, BYPASS, CACHE_STATUS, REVALIDATED, STALE};
use crate::backend::RespBody;
use crate::body::{req_full, ReqBody};
use crate::context::Exchange;
use crate::error::{classify, BoxError};

/// Sends the request to the service (conditional on the stored validators) and handles what
/// it answers: a 304 refreshes the stored object, a storable response is filled as the client
/// reads it, a failure is answered by a stale object when one may stand in.
pub(super) async fn forward<S: Inner>(
    rc: &Arc<RouteCache>,
    inner: &S,
    mut req: Request<ReqBody>,
    lookup: &Lookup,
    fwd: &str,
    guard: Option<FlightGuard>,
    background: bool,
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
                return Ok(answer_to(obj, &client_conditions, false, now, status));
            }
            if let Some(g) = guard {
                g.finish(Outcome::Failed);
            }
            let status = format!("gatehouse; fwd={fwd}; fwd-status={}", p.status.as_u16());
            return Err(failed_with_status(e, status.clone()));
        }
        Ok(resp) => resp,
    };
    let status = resp.status();
    let is_fallback = resp
        .extensions()
        .get::<crate::layers::fallback::Served>()
        .is_some();
    if is_fallback || failed(status) {
        if let Some(obj) = stale {
            if let Some(g) = guard {
                g.finish(Outcome::Failed);
            }
            rc.count(STALE);
            let status = format!(
                "gatehouse; fwd=stale; fwd-status={}; ttl={}; detail=stale-if-error",
                status.as_u16(),
                obj.ttl_secs(now)
            );
            return Ok(answer_to(obj, &client_conditions, false, now, status));
        }
        // A fallback's answer is never stored; a 5xx from the service is, like any other
        // answer, when it says it may be (explicit freshness).
        if is_fallback {
            if let Some(g) = guard {
                g.finish(Outcome::Failed);
            }
            return Ok(with_status(
                resp,
                format!("gatehouse; fwd={fwd}; fwd-status={}", status.as_u16()),
            ));
        }
    }
    let identity = lookup.identity.is_some();
    if status == StatusCode::NOT_MODIFIED {
        let Some(obj) = &lookup.found else {
            if let Some(g) = guard {
                g.finish(Outcome::NotStored);
            }
            return Ok(with_status(
                resp,
                format!("gatehouse; fwd={fwd}; fwd-status=304"),
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
                    headers.append(name.clone(), owned(v));
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
            route: obj.route.clone(),
            cc,
            timing: timing.unwrap_or(obj.timing),
            stored_at: now,
        });
        rc.count(REVALIDATED);
        match timing {
            Ok(_) => {
                rc.store.put(&lookup.key, refreshed.clone());
                if let Some(g) = guard {
                    g.finish(Outcome::Stored(refreshed.clone()));
                }
            }
            Err(_) => rc.store.remove(&lookup.key).await,
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
            status,
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
                format!(
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
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), owned(v)))
            .collect(),
        body: Bytes::new(),
        selected,
        identity: lookup.identity.clone(),
        route: rc.route.clone(),
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
        Arc::from(lookup.key.as_str()),
        object,
        guard,
    );
    let cache_status = format!(
        "gatehouse; fwd={fwd}; fwd-status={}; stored; ttl={ttl}",
        status.as_u16()
    );
    if background {
        // A refresh: nobody reads the answer; reading it to its end stores it.
        drain(FillBody::background(body, filling)).await;
        return Ok(Response::new(crate::backend::full(Bytes::new())));
    }
    if matches {
        // The client already has it: 304 now, and the object is filled in the background.
        tokio::spawn(drain(FillBody::background(body, filling)));
        let mut resp = not_modified(&parts.headers);
        resp.headers_mut()
            .append(CACHE_STATUS.clone(), status_value(cache_status));
        return Ok(resp);
    }
    let fill = FillBody::new(body, filling);
    let mut resp = Response::from_parts(parts, RespBody::Stream(BoxBody::new(fill)));
    resp.headers_mut()
        .append(CACHE_STATUS.clone(), status_value(cache_status));
    Ok(resp)
}

/// A header value in memory of its own. hyper's values are slices of the buffer it read the
/// response head into: stored as they are, each object would keep that whole buffer alive
/// (measured: ~4.6 KiB more per small object).
fn owned(v: &http::HeaderValue) -> http::HeaderValue {
    let mut o = http::HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    o.set_sensitive(v.is_sensitive());
    o
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
pub(super) fn refresh<S: Inner>(
    rc: &Arc<RouteCache>,
    inner: &S,
    req: &Request<ReqBody>,
    exchange: &Exchange,
    lookup: &Lookup,
) {
    let Join::Lead(guard) = rc.store.join(&rc.flight_key(lookup)) else {
        return;
    };
    let mut bg = Request::new(req_full(Bytes::new()));
    *bg.method_mut() = Method::GET;
    *bg.uri_mut() = req.uri().clone();
    *bg.version_mut() = req.version();
    *bg.headers_mut() = req.headers().clone();
    // The whole representation: a range would come back as a 206, which is never stored.
    bg.headers_mut().remove(header::RANGE);
    bg.headers_mut().remove(header::IF_RANGE);
    // On behalf of the same client: its identity decides what may be stored (§3.5) as for
    // the request that found the object stale.
    let sub = exchange.sub_request();
    if let Some(id) = exchange.identity() {
        sub.set_identity(id.clone());
    }
    bg.extensions_mut().insert(sub);
    let (rc, inner) = (rc.clone(), inner.clone());
    let lookup = Lookup {
        key: lookup.key.clone(),
        identity: lookup.identity.clone(),
        found: lookup.found.clone(),
        url_known: true,
    };
    tokio::spawn(async move {
        // What is not stored is dropped unread.
        let _ = forward(&rc, &inner, bg, &lookup, "stale", Some(guard), true).await;
    });
}

/// Methods other than GET and HEAD: forwarded; an unsafe one that succeeds invalidates its
/// URL and the URLs its `Location` and `Content-Location` name on the same host (§4.4).
pub(super) async fn other_method<S: Inner>(
    rc: &Arc<RouteCache>,
    inner: &S,
    req: Request<ReqBody>,
) -> Result<Response<RespBody>, BoxError> {
    let safe = matches!(*req.method(), Method::OPTIONS | Method::TRACE);
    let exchange = req.extensions().get::<Exchange>().cloned();
    rc.count(BYPASS);
    let resp = inner
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| failed_with_status(e, "gatehouse; fwd=method"))?;
    let ok = resp.status().is_success() || resp.status().is_redirection();
    if let (false, true, Some(x)) = (safe, ok, exchange) {
        rc.store.remove(&rc.key(&x)).await;
        let host = x.host().and_then(|h| h.to_str().ok()).unwrap_or("");
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = resp.headers().get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if let Some(k) = same_origin_key(x.client().tls, host, target) {
                rc.store.remove(&k).await;
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
