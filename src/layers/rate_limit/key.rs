//! What a request is counted by: the key's value read from the request (`Raw`: the client
//! IP, a header, a claim, the consumer, the route, or nothing), the small owned form the
//! in-memory store keeps (`KeyValue`), and the client IP behind trusted proxies.

use std::net::IpAddr;

use http::header::HeaderValue;
use http::Request;

use super::redis;
use crate::context::Exchange;

/// The value a request is counted by, as read from the request.
#[derive(Debug, Clone)]
pub(crate) enum Raw<'a> {
    Ip(IpAddr),
    /// A header value (which may be a credential).
    Header(&'a [u8]),
    /// A claim's value or a consumer's name.
    Text(std::borrow::Cow<'a, str>),
    Route(&'a str),
    Global,
}

/// The value a request is counted by, as the in-memory store keeps it: small and owned, never
/// the client's bytes (a header value could be kilobytes, and would pin the request's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum KeyValue {
    Ip(IpAddr),
    /// 128 bits of two seeded hashes of a header value, claim, consumer or route.
    Hash(u64, u64),
    Global,
}

/// Per-process seeds of the in-memory keys' hashes: a client cannot choose colliding values.
fn seeds() -> (u64, u64) {
    static SEEDS: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();
    *SEEDS.get_or_init(|| (fastrand::u64(..), fastrand::u64(..)))
}

impl Raw<'_> {
    pub(crate) fn local(&self) -> KeyValue {
        let hash = |tag: u8, bytes: &[u8]| {
            use std::hash::Hasher;
            let (a, b) = seeds();
            let mut h1 = twox_hash::XxHash64::with_seed(a);
            let mut h2 = twox_hash::XxHash64::with_seed(b);
            h1.write_u8(tag);
            h1.write(bytes);
            h2.write_u8(tag);
            h2.write(bytes);
            KeyValue::Hash(h1.finish(), h2.finish())
        };
        match self {
            Raw::Ip(ip) => KeyValue::Ip(*ip),
            Raw::Header(b) => hash(b'h', b),
            Raw::Text(t) => hash(b't', t.as_bytes()),
            Raw::Route(r) => hash(b'r', r.as_bytes()),
            Raw::Global => KeyValue::Global,
        }
    }
}

/// The IP a budget is kept for: an IPv4-mapped IPv6 address as IPv4, and an IPv6 address by
/// its /64 (one host usually has a whole /64, and could rotate through it).
pub(crate) fn ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
        v4 => v4,
    }
}

/// A claim as a key: a string or a number; other claims (objects, lists) count as absent.
pub(crate) fn claim_text(v: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(std::borrow::Cow::Borrowed(s)),
        serde_json::Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// The client's IP: the peer's, or — when the peer is one of `trusted_proxies` — the nearest
/// address in `X-Forwarded-For` that is not a trusted proxy. A client can put anything in
/// the header; only what trusted proxies appended to it is believed.
pub(crate) fn client_ip<B>(
    req: &Request<B>,
    x: Option<&Exchange>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let Some(x) = x else {
        return IpAddr::from([0, 0, 0, 0]);
    };
    let client = x.client();
    let peer = client.peer.ip();
    if !client.trusted {
        return peer;
    }
    forwarded_client(req.headers(), peer, trusted)
}

/// The nearest untrusted address of `X-Forwarded-For` (right to left), or the leftmost when
/// every hop is trusted. An entry that is not an address (or `IP:port`, `[IPv6]:port`) stops
/// the walk at the last trusted hop: what lies beyond it was not written by a trusted proxy.
pub(crate) fn forwarded_client(
    headers: &http::HeaderMap,
    peer: IpAddr,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*ip, IpAddr::V4),
            v4 => *v4,
        };
        trusted.iter().any(|n| n.contains(&ip))
    };
    let mut last = peer;
    for value in headers
        .get_all(http::header::HeaderName::from_static("x-forwarded-for"))
        .iter()
        .rev()
    {
        for hop in value.as_bytes().rsplit(|&b| b == b',') {
            let Some(ip) = hop_address(hop) else {
                return last;
            };
            if !is_trusted(&ip) {
                return ip;
            }
            last = ip;
        }
    }
    last
}

/// One `X-Forwarded-For` entry: `IP`, `IPv4:port` or `[IPv6]:port`, spaces around it allowed.
fn hop_address(hop: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(hop).ok()?.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (v6, port) = rest.split_once(']')?;
        port.strip_prefix(':')?.parse::<u16>().ok()?;
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (v4, port) = s.split_once(':')?;
    port.parse::<u16>().ok()?;
    v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The fuzz target `rate_limit_key`: X-Forwarded-For from a client (and from trusted proxies),
/// read into a client IP; a header value and a claim made a key, and each key made a Redis key.
pub(crate) fn fuzz_key(data: &[u8]) {
    let trusted: [ipnet::IpNet; 2] = [
        ipnet::IpNet::from(IpAddr::from([10, 0, 0, 0])),
        ipnet::IpNet::from(IpAddr::from([127, 0, 0, 1])),
    ];
    let peer = IpAddr::from([127, 0, 0, 1]);
    let mut h = http::HeaderMap::new();
    for part in data.split(|&b| b == b'\n') {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            h.append("x-forwarded-for", v);
        }
    }
    let ip = forwarded_client(&h, peer, &trusted);
    let text = String::from_utf8_lossy(data);
    let claim = serde_json::from_str::<serde_json::Value>(&text).ok();
    let mut keys = vec![
        Raw::Ip(ip_key(ip)),
        Raw::Global,
        Raw::Header(data),
        Raw::Route(&text),
    ];
    if let Some(t) = claim.as_ref().and_then(claim_text) {
        keys.push(Raw::Text(t));
    }
    for k in &keys {
        let key = redis::redis_key("p", k);
        assert!(key.starts_with(b"gatehouse:rl:p:"));
        // What a client sent never reaches the store raw when it could be a credential or
        // holds anything but printable ASCII.
        assert!(key.iter().all(|b| b.is_ascii_graphic()), "{key:?}");
        if let Raw::Header(_) = k {
            // A digest, never the value.
            let digest = &key[b"gatehouse:rl:p:h#".len()..];
            assert!(
                digest.len() == 32 && digest.iter().all(u8::is_ascii_hexdigit),
                "{key:?}"
            );
        }
        let _ = k.local();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_believed_only_up_to_the_first_untrusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let mut h = http::HeaderMap::new();
        // The client wrote "6.6.6.6" itself; the trusted proxy appended the client's real IP.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 203.0.113.7, 10.0.0.2"),
        );
        assert_eq!(
            forwarded_client(&h, peer, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        // Every hop trusted: the leftmost.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("10.1.1.1, 10.0.0.2"),
        );
        assert_eq!(
            forwarded_client(&h, peer, &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the last trusted hop.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 10.0.0.2"),
        );
        assert_eq!(
            forwarded_client(&h, peer, &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // Entries with a port, as some proxies write them.
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.7:5555, 10.0.0.2"),
        );
        assert_eq!(
            forwarded_client(&h, peer, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::1]:443"),
        );
        assert_eq!(
            forwarded_client(&h, peer, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // No header: the peer.
        assert_eq!(
            forwarded_client(&http::HeaderMap::new(), peer, &trusted),
            peer
        );
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ones_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_eq!(ip_key(a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        let mapped: IpAddr = "::ffff:203.0.113.5".parse().unwrap();
        assert_eq!(ip_key(mapped), "203.0.113.5".parse::<IpAddr>().unwrap());
    }
}
