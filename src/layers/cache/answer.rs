//! A stored object as a response: a hit (with `Age` and `Cache-Status`), a HEAD from a stored
//! GET, a 304 for a client whose conditions it matches (RFC 9110 §13.2.2, RFC 9111 §4.3.2).

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use super::rules;
use super::store::Object;
use super::CACHE_STATUS;
use crate::backend::RespBody;
use crate::body::ReqBody;

/// The client's conditional headers, taken off the request (they are evaluated here).
pub(super) struct Conditions {
    pub(super) if_none_match: HeaderMap,
    pub(super) if_modified_since: Option<SystemTime>,
}

pub(super) fn take_conditions(h: &mut HeaderMap) -> Conditions {
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
pub(super) fn conditions_match(c: &Conditions, obj: &Object) -> bool {
    // Preconditions apply to 2xx representations only (RFC 9110 §13.2.1).
    if !obj.status.is_success() {
        return false;
    }
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
pub(super) fn answer(
    obj: &Object,
    req: &Request<ReqBody>,
    now: Instant,
    status: impl Into<Bytes>,
) -> Response<RespBody> {
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

pub(super) fn answer_to(
    obj: &Object,
    c: &Conditions,
    head: bool,
    now: Instant,
    status: impl Into<Bytes>,
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

pub(super) fn respond(
    obj: &Object,
    head: bool,
    now: Instant,
    status: impl Into<Bytes>,
) -> Response<RespBody> {
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
pub(super) fn not_modified(headers: &HeaderMap) -> Response<RespBody> {
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

pub(super) fn with_status(
    mut resp: Response<RespBody>,
    status: impl Into<Bytes>,
) -> Response<RespBody> {
    resp.headers_mut()
        .append(CACHE_STATUS.clone(), status_value(status));
    resp
}

/// `Cache-Status` values are made of fixed text and numbers only.
/// Taken as `Bytes` (a formatted `String`, or static text) so that the value is not copied again.
pub(super) fn status_value(s: impl Into<Bytes>) -> HeaderValue {
    HeaderValue::from_maybe_shared(s.into())
        .unwrap_or_else(|_| HeaderValue::from_static("gatehouse"))
}

/// A failure of the stack below, carrying the cache's `Cache-Status` to the error response
/// (the problem is the same; the original error stays its source, for the log).
pub(super) fn failed_with_status(
    e: crate::error::BoxError,
    status: impl Into<Bytes>,
) -> crate::error::BoxError {
    let p = crate::error::classify(&*e)
        .header(CACHE_STATUS.clone(), status_value(status))
        .caused_by(e);
    Box::new(p)
}
