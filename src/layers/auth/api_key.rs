//! API keys: taken from a header or a query parameter, hashed with SHA-256 and looked up among
//! the configured hashes (the config holds only hashes), the match confirmed with a
//! constant-time comparison. A key in the query string is removed before forwarding.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, Request, Uri};

use super::AuthFailure;

pub(crate) enum KeyFrom {
    Header(HeaderName),
    Query(Box<str>),
}

pub(crate) struct ApiKeys {
    pub(crate) from: KeyFrom,
    /// SHA-256 digest → consumer.
    pub(crate) keys: HashMap<[u8; 32], Consumer>,
}

/// An API key's owner, with the header value it is forwarded as (made once, when built).
#[derive(Clone)]
pub(crate) struct Consumer {
    pub(crate) name: Arc<str>,
    pub(crate) header: http::HeaderValue,
}

/// Constant-time equality of two byte strings (the length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parses a hex SHA-256 digest.
pub(crate) fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

impl ApiKeys {
    /// The consumer whose key the request carries. A query key is removed from the request.
    pub(crate) fn authenticate<B>(&self, req: &mut Request<B>) -> Result<Consumer, AuthFailure> {
        let digest = match &self.from {
            KeyFrom::Header(h) => req
                .headers()
                .get(h)
                .map(|v| v.as_bytes().trim_ascii())
                .filter(|k| !k.is_empty())
                .map(sha256),
            KeyFrom::Query(name) => {
                let found = query_value(req.uri(), name);
                if found.is_some() {
                    remove_query_param(req, name);
                }
                found.filter(|k| !k.is_empty()).map(|k| sha256(&k))
            }
        };
        let Some(digest) = digest else {
            return Err(AuthFailure::Missing);
        };
        match self.keys.get_key_value(&digest) {
            Some((stored, consumer)) if ct_eq(stored, &digest) => Ok(consumer.clone()),
            _ => Err(AuthFailure::Invalid("unknown API key")),
        }
    }
}

/// The (percent-decoded) value of the query parameter `name`.
pub(crate) fn query_value(uri: &Uri, name: &str) -> Option<Vec<u8>> {
    let q = uri.query()?;
    q.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v.as_bytes()))
    })
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match s[i] {
            b'%' => {
                match (
                    s.get(i + 1).and_then(|&b| hex(b)),
                    s.get(i + 2).and_then(|&b| hex(b)),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Removes every `name=…` from the request's query.
pub(crate) fn remove_query_param<B>(req: &mut Request<B>, name: &str) {
    let uri = req.uri();
    let Some(q) = uri.query() else { return };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
        .collect();
    let pq = if kept.is_empty() {
        uri.path().to_owned()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = pq.parse().ok();
    if let Ok(u) = Uri::from_parts(parts) {
        *req.uri_mut() = u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        let mut keys = HashMap::new();
        keys.insert(
            sha256(b"s3cret"),
            Consumer {
                name: Arc::from("acme"),
                header: http::HeaderValue::from_static("acme"),
            },
        );
        ApiKeys {
            from: KeyFrom::Query("api_key".into()),
            keys,
        }
    }

    #[test]
    fn a_query_key_is_checked_and_removed() {
        let k = keys();
        let mut req = Request::get("/x?a=1&api_key=s3cret&b=2").body(()).unwrap();
        assert_eq!(&*k.authenticate(&mut req).unwrap().name, "acme");
        assert_eq!(req.uri().query(), Some("a=1&b=2"));
        let mut req = Request::get("/x?api_key=nope").body(()).unwrap();
        assert!(matches!(
            k.authenticate(&mut req),
            Err(AuthFailure::Invalid(_))
        ));
        assert_eq!(
            req.uri().query(),
            None,
            "a wrong key is not forwarded either"
        );
        let mut req = Request::get("/x").body(()).unwrap();
        assert!(matches!(
            k.authenticate(&mut req),
            Err(AuthFailure::Missing)
        ));
    }

    #[test]
    fn digests_and_comparison() {
        let d = sha256(b"abc");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_digest(&hex), Some(d));
        assert_eq!(parse_digest("zz"), None);
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert_eq!(percent_decode(b"a%2Fb+c%zz"), b"a/b c%zz");
    }
}
