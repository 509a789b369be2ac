//! Checks of the request head, before routing: every byte from the internet is hostile until
//! proven otherwise.
//!
//! - Limits (`[server]`): request target length (414), header count, header line size and
//!   total head size (431), each answered with problem+json. (hyper's own caps — twice the head
//!   size, and the header count but at least 100 — bound what it holds before this runs.)
//! - Header names with `_`: dropped by default (like nginx), since a backend that maps `-` to
//!   `_` (CGI, WSGI, PHP) would otherwise take `X_Forwarded_For` for the `X-Forwarded-For` the
//!   gateway sets; `underscores_in_headers = "reject"` answers 400, `"allow"` forwards them.
//! - Transfer codings: only `chunked`; any other (`gzip, chunked`) is 501, as RFC 9112 §6.1
//!   allows and nginx does — the gateway does not decode codings, and must not forward a body
//!   whose framing it dropped.
//! - One authority per request (RFC 9112 §3.2, RFC 9113 §8.3.1): 400 for a repeated `Host`,
//!   for an HTTP/1.1 request without one, and for a `Host` that disagrees with the
//!   absolute-form target or HTTP/2 `:authority`; the authority must be a valid host[:port].
//!   That one authority is used for routing, `Host` (with `preserve_host`) and
//!   `X-Forwarded-Host`, and by every later feature.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Version};

use crate::config::Underscores;
use crate::error::GatewayError;

/// The head limits of `[server]`, as the request path reads them.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_uri: usize,
    pub(crate) max_header_line: usize,
    pub(crate) max_head: usize,
    pub(crate) max_headers: usize,
    pub(crate) underscores: Underscores,
}

/// Checks the head of `req` (dropping underscore headers when so configured) and returns its
/// one authority, if it names one.
pub(crate) fn check_head<B>(
    req: &mut Request<B>,
    limits: &Limits,
) -> Result<Option<Authority>, GatewayError> {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if uri_len > limits.max_uri {
        return Err(GatewayError::UriTooLong);
    }
    let h = req.headers();
    if h.len() > limits.max_headers {
        return Err(GatewayError::HeadersTooLarge);
    }
    // One pass over the fields: sizes, `_` in names, and the Host and Transfer-Encoding fields
    // (compared by their standard names, without hashing).
    let mut head = uri_len;
    let mut underscore = false;
    let mut host: Option<&HeaderValue> = None;
    let mut hosts = 0u32;
    let mut codings = 0u32;
    let mut only_chunked = true;
    for (name, value) in h {
        let line = name.as_str().len() + value.len();
        if line > limits.max_header_line {
            return Err(GatewayError::HeadersTooLarge);
        }
        head += line + 4;
        if *name == header::HOST {
            hosts += 1;
            host.get_or_insert(value);
        } else if *name == header::TRANSFER_ENCODING {
            codings += 1;
            only_chunked &= value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked");
        } else {
            underscore |= name.as_str().as_bytes().contains(&b'_');
        }
    }
    if head > limits.max_head {
        return Err(GatewayError::HeadersTooLarge);
    }
    // Only one coding, `chunked`. (hyper has refused a list that does not end with it.)
    if codings > 0 && !(codings == 1 && only_chunked) {
        return Err(GatewayError::NotImplemented("transfer coding"));
    }
    if hosts > 1 {
        return Err(GatewayError::BadRequest("more than one Host header"));
    }
    let authority = authority(req, host.cloned())?;
    if underscore {
        match limits.underscores {
            Underscores::Allow => {}
            Underscores::Reject => {
                return Err(GatewayError::BadRequest("header name with `_`"));
            }
            Underscores::Drop => drop_underscores(req.headers_mut()),
        }
    }
    Ok(authority)
}

fn drop_underscores(h: &mut HeaderMap) {
    let names: Vec<_> = h
        .keys()
        .filter(|n| n.as_str().as_bytes().contains(&b'_'))
        .cloned()
        .collect();
    for n in names {
        h.remove(n);
    }
}

/// The one authority of a request: the target's (absolute form, HTTP/2 `:authority`) or the
/// single `Host`; they must agree when both are there.
fn authority<B>(
    req: &Request<B>,
    host: Option<HeaderValue>,
) -> Result<Option<Authority>, GatewayError> {
    let target = req.uri().authority();
    if host.is_none() && target.is_none() && req.version() == Version::HTTP_11 {
        return Err(GatewayError::BadRequest("HTTP/1.1 request without Host"));
    }
    let value = match (host, target) {
        (Some(h), Some(t)) => {
            if !h.as_bytes().eq_ignore_ascii_case(t.as_str().as_bytes()) {
                return Err(GatewayError::BadRequest(
                    "Host disagrees with the request target",
                ));
            }
            h
        }
        (Some(h), None) => h,
        (None, Some(t)) => HeaderValue::from_str(t.as_str())
            .map_err(|_| GatewayError::BadRequest("request authority"))?,
        (None, None) => return Ok(None),
    };
    let Some(host) = host_range(value.as_bytes()) else {
        return Err(GatewayError::BadRequest("Host is not a valid host[:port]"));
    };
    Ok(Some(Authority { value, host }))
}

/// Bytes allowed in a host name (reg-name: letters, digits, `-._~`).
static HOST_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' || b == b'~';
        i += 1;
    }
    t
};

/// A request's one authority, checked: its value, and where the host is in it.
#[derive(Debug, Clone)]
pub(crate) struct Authority {
    value: HeaderValue,
    host: std::ops::Range<usize>,
}

impl Authority {
    /// The value, as `Host` would carry it.
    pub(crate) fn into_value(self) -> HeaderValue {
        self.value
    }

    /// The host, for routing: lower case, without port, brackets or trailing dot.
    pub(crate) fn host(&self) -> std::borrow::Cow<'_, str> {
        let b = &self.value.as_bytes()[self.host.clone()];
        let b = b.strip_suffix(b".").unwrap_or(b);
        // ASCII only: `host_range` allowed nothing else.
        let s = std::str::from_utf8(b).unwrap_or("");
        if b.iter().any(u8::is_ascii_uppercase) {
            std::borrow::Cow::Owned(s.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(s)
        }
    }
}

/// Where the host is in `host[:port]` (a reg-name, IPv4 or bracketed IPv6 host; no user info),
/// or `None` if the value is not that. Empty is allowed (RFC 9112 §3.2: a target without an
/// authority is sent with an empty `Host`).
fn host_range(b: &[u8]) -> Option<std::ops::Range<usize>> {
    if b.is_empty() {
        return Some(0..0);
    }
    let (host, port) = if let Some(rest) = b.strip_prefix(b"[") {
        let end = rest.iter().position(|&c| c == b']')?;
        let v6 = &rest[..end];
        if v6.is_empty()
            || !v6
                .iter()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, b':' | b'.'))
        {
            return None;
        }
        let port = match &rest[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return None,
        };
        (1..1 + end, port)
    } else {
        let (end, port) = match b.iter().rposition(|&c| c == b':') {
            Some(i) => (i, Some(&b[i + 1..])),
            None => (b.len(), None),
        };
        if end == 0 || !b[..end].iter().all(|&c| HOST_BYTE[usize::from(c)]) {
            return None;
        }
        (0..end, port)
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    port_ok.then_some(host)
}

#[cfg(test)]
fn valid_authority(b: &[u8]) -> bool {
    host_range(b).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_uri: 64,
            max_header_line: 64,
            max_head: 256,
            max_headers: 8,
            underscores: Underscores::Drop,
        }
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().uri(uri);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    fn value(r: Result<Option<Authority>, GatewayError>) -> Option<HeaderValue> {
        r.unwrap().map(Authority::into_value)
    }

    fn code(r: Result<Option<Authority>, GatewayError>) -> &'static str {
        r.map_or_else(|e| e.problem().code, |_| "ok")
    }

    #[test]
    fn one_host_is_the_authority() {
        let mut r = req("/x", &[("host", "Shop.example:8080")]);
        assert_eq!(
            value(check_head(&mut r, &limits())).unwrap(),
            "Shop.example:8080"
        );
        let mut r = req("/x", &[("host", "a.example"), ("host", "b.example")]);
        assert_eq!(code(check_head(&mut r, &limits())), "bad_request");
        let mut r = req("/x", &[]);
        assert_eq!(
            code(check_head(&mut r, &limits())),
            "bad_request",
            "HTTP/1.1 needs Host"
        );
        let mut r = req("/x", &[]);
        *r.version_mut() = Version::HTTP_10;
        assert_eq!(value(check_head(&mut r, &limits())), None);
    }

    #[test]
    fn an_absolute_target_and_host_must_agree() {
        let mut r = req("http://a.example/x", &[("host", "a.example")]);
        assert_eq!(value(check_head(&mut r, &limits())).unwrap(), "a.example");
        let mut r = req("http://a.example/x", &[("host", "A.EXAMPLE")]);
        assert!(
            check_head(&mut r, &limits()).is_ok(),
            "host names are case-insensitive"
        );
        let mut r = req("http://a.example/x", &[("host", "b.example")]);
        assert_eq!(code(check_head(&mut r, &limits())), "bad_request");
        // HTTP/2: :authority alone is the authority.
        let mut r = req("http://h2.example/x", &[]);
        *r.version_mut() = Version::HTTP_2;
        assert_eq!(value(check_head(&mut r, &limits())).unwrap(), "h2.example");
    }

    #[test]
    fn the_routing_host_is_lower_case_without_port_or_trailing_dot() {
        let host = |s: &'static str| {
            let value = HeaderValue::from_static(s);
            let host = host_range(value.as_bytes()).unwrap();
            Authority { value, host }.host().into_owned()
        };
        assert_eq!(host("WWW.Example.com.:8080"), "www.example.com");
        assert_eq!(host("[::1]:80"), "::1");
        assert_eq!(host("a.b"), "a.b");
        assert_eq!(host(""), "");
    }

    #[test]
    fn a_host_must_be_host_and_port() {
        for ok in [
            "a.example",
            "a.example:80",
            "127.0.0.1:1",
            "[::1]:8080",
            "[::1]",
            "",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "user@a.example",
            "a.example:",
            "a.example:99999x",
            "a b",
            "[::1",
            "[zz]",
            "a/b",
            ":80",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn limits_answer_414_and_431() {
        let long = format!("/{}", "a".repeat(64));
        let mut r = req(&long, &[("host", "h")]);
        assert_eq!(code(check_head(&mut r, &limits())), "uri_too_long");
        let mut r = req("/x", &[("host", "h"), ("x-big", &"v".repeat(60))]);
        assert_eq!(code(check_head(&mut r, &limits())), "headers_too_large");
        let many: Vec<(String, String)> = (0..9).map(|i| (format!("x-{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut r = req("/x", &many);
        assert_eq!(code(check_head(&mut r, &limits())), "headers_too_large");
        let total: Vec<(String, String)> =
            (0..6).map(|i| (format!("x-{i}"), "v".repeat(40))).collect();
        let mut total: Vec<(&str, &str)> = total
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        total.push(("host", "h"));
        let mut r = req("/x", &total);
        assert_eq!(code(check_head(&mut r, &limits())), "headers_too_large");
    }

    #[test]
    fn underscore_names_are_dropped_rejected_or_allowed() {
        let headers = [("host", "h"), ("x_forwarded_for", "6.6.6.6"), ("x-ok", "1")];
        let mut r = req("/x", &headers);
        check_head(&mut r, &limits()).unwrap();
        assert!(r.headers().get("x_forwarded_for").is_none());
        assert!(r.headers().get("x-ok").is_some());
        let mut r = req("/x", &headers);
        let reject = Limits {
            underscores: Underscores::Reject,
            ..limits()
        };
        assert_eq!(code(check_head(&mut r, &reject)), "bad_request");
        let mut r = req("/x", &headers);
        let allow = Limits {
            underscores: Underscores::Allow,
            ..limits()
        };
        check_head(&mut r, &allow).unwrap();
        assert!(r.headers().get("x_forwarded_for").is_some());
    }

    #[test]
    fn only_the_chunked_coding_is_accepted() {
        let mut r = req("/x", &[("host", "h"), ("transfer-encoding", "chunked")]);
        assert!(check_head(&mut r, &limits()).is_ok());
        for te in ["gzip, chunked", "gzip", "chunked, chunked"] {
            let mut r = req("/x", &[("host", "h"), ("transfer-encoding", te)]);
            assert_eq!(
                code(check_head(&mut r, &limits())),
                "not_implemented",
                "{te}"
            );
        }
        let mut r = req(
            "/x",
            &[
                ("host", "h"),
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
        );
        assert_eq!(code(check_head(&mut r, &limits())), "not_implemented");
    }
}
