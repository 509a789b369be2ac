//! Hop-by-hop headers (RFC 9110 §7.6.1): removed from requests and responses both ways, except
//! that an upgrade keeps `Upgrade` and `Connection: upgrade`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Whether every protocol the request's `Upgrade` names is one the route allows. `h2c` never
/// is: an upgraded HTTP/2 connection to the backend would carry requests for any path past
/// the gateway's routing.
pub(crate) fn upgrade_allowed(h: &HeaderMap, allowed: &[Box<str>]) -> bool {
    let mut any = false;
    for v in h.get_all(header::UPGRADE) {
        for proto in v.as_bytes().split(|&b| b == b',') {
            let proto = proto.trim_ascii();
            // `name/version`: the name decides.
            let name = proto.split(|&b| b == b'/').next().unwrap_or(proto);
            if name.is_empty() {
                continue;
            }
            if name.eq_ignore_ascii_case(b"h2c")
                || !allowed
                    .iter()
                    .any(|a| name.eq_ignore_ascii_case(a.as_bytes()))
            {
                return false;
            }
            any = true;
        }
    }
    any
}

/// Removes an upgrade request that is not forwarded: `Upgrade`, `Connection` (and what it
/// names), `HTTP2-Settings`. The request then goes on as a plain one.
pub(crate) fn refuse_upgrade(h: &mut HeaderMap) {
    strip_hop_by_hop(h, false);
    h.remove("http2-settings");
}

pub(crate) fn wants_upgrade(h: &HeaderMap) -> bool {
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
    fn only_allowed_upgrades_pass_and_h2c_never() {
        let allowed: Vec<Box<str>> = vec!["websocket".into()];
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("upgrade", HeaderValue::from_static(v));
            h
        };
        assert!(upgrade_allowed(&with("websocket"), &allowed));
        assert!(upgrade_allowed(&with("WebSocket"), &allowed));
        assert!(!upgrade_allowed(&with("h2c"), &allowed));
        assert!(!upgrade_allowed(&with("websocket, h2c"), &allowed));
        assert!(!upgrade_allowed(&with("foo/1"), &allowed));
        let h2c_listed: Vec<Box<str>> = vec!["h2c".into(), "websocket".into()];
        assert!(
            !upgrade_allowed(&with("h2c"), &h2c_listed),
            "h2c is never allowed"
        );
        let mut h = with("h2c");
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        refuse_upgrade(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
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
