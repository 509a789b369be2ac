//! The headers every call to a backend service carries, made from the request's `Exchange`:
//! `X-Request-Id`, `X-Forwarded-For/-Proto/-Host`, and a `traceparent` continuing the client's
//! trace with a new span for this hop. One function, called by each backend for each call it
//! makes (the proxy once per request; an aggregate or gRPC backend once per backend call).
//! Values from a peer that is not a trusted proxy are replaced, never appended to.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::context::Exchange;
use crate::observe::trace::next_traceparent;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Sets the forwarding headers of a call to a backend on `h`: the client's headers of a
/// proxied request, or a fresh map of a call the gateway makes itself.
pub(crate) fn forwarding_headers(h: &mut HeaderMap, x: &Exchange) {
    let client = x.client();
    let trusted = client.trusted;
    // A proxied request already carries the id the dispatcher chose; a fresh map gets it here.
    if let header::Entry::Vacant(e) = h.entry(&X_REQUEST_ID) {
        e.insert(x.request_id().clone());
    }
    // Entries: one lookup per header where a get and an insert would take two.
    match h.entry(&X_FORWARDED_FOR) {
        header::Entry::Occupied(mut e) if trusted => {
            let prev = e.get();
            let mut v = Vec::with_capacity(prev.len() + 2 + client.peer_ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client.peer_ip.as_bytes());
            e.insert(HeaderValue::from_bytes(&v).unwrap_or_else(|_| client.peer_ip.clone()));
        }
        header::Entry::Occupied(mut e) => {
            e.insert(client.peer_ip.clone());
        }
        header::Entry::Vacant(e) => {
            e.insert(client.peer_ip.clone());
        }
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        let proto = if client.tls { "https" } else { "http" };
        h.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(trusted && h.contains_key(&X_FORWARDED_HOST)) {
        match x.host() {
            Some(v) => h.insert(X_FORWARDED_HOST.clone(), v.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::testing::with_client;

    fn exchange(trusted: bool, tls: bool) -> Exchange {
        with_client("/x", &[], &[], Some("shop.example"), trusted, tls)
    }

    #[test]
    fn an_untrusted_peer_has_its_forwarding_headers_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        forwarding_headers(&mut h, &exchange(false, false));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], "rid-1");
        assert!(h.get("forwarded").is_none());
        let tp = h["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
    }

    #[test]
    fn a_trusted_proxy_is_appended_to_and_believed() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("forwarded", HeaderValue::from_static("for=1.2.3.4"));
        forwarding_headers(&mut h, &exchange(true, false));
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=1.2.3.4");
    }

    #[test]
    fn a_fresh_map_gets_every_header() {
        let mut h = HeaderMap::new();
        forwarding_headers(&mut h, &exchange(false, true));
        for name in [
            "x-request-id",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "traceparent",
        ] {
            assert!(h.contains_key(name), "{name}");
        }
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
