//! Choosing an endpoint for a request: round robin, least request (power of two choices over
//! in-flight requests), random, and consistent hashing (a ring with virtual nodes, keyed by a
//! header, a cookie or the client address), each honoring weights and skipping endpoints that
//! are unhealthy or ejected.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::HeaderMap;

use super::endpoint::Endpoint;
use crate::config::LoadBalancing;

/// Where a consistent-hash key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    /// The client address: the first `X-Forwarded-For` entry as the dispatcher set it.
    Ip,
}

/// A `hash_key` that names no key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HashKeyError {
    #[error("hash_key `{0}`: `{1}` is not a header name")]
    Header(String, String),
    #[error("hash_key `{0}` must be `header:NAME`, `cookie:NAME` or `ip`")]
    Unknown(String),
}

impl HashKey {
    pub(crate) fn parse(s: &str) -> Result<HashKey, HashKeyError> {
        if s == "ip" {
            return Ok(HashKey::Ip);
        }
        if let Some(h) = s.strip_prefix("header:") {
            return http::HeaderName::from_bytes(h.as_bytes())
                .map(HashKey::Header)
                .map_err(|_| HashKeyError::Header(s.to_owned(), h.to_owned()));
        }
        if let Some(c) = s.strip_prefix("cookie:").filter(|c| !c.is_empty()) {
            return Ok(HashKey::Cookie(c.to_owned()));
        }
        Err(HashKeyError::Unknown(s.to_owned()))
    }

    fn extract<'a>(&self, h: &'a HeaderMap) -> Option<&'a [u8]> {
        match self {
            HashKey::Header(name) => h.get(name).map(|v| v.as_bytes()),
            HashKey::Ip => h.get("x-forwarded-for").map(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii()
            }),
            HashKey::Cookie(name) => h.get_all(http::header::COOKIE).iter().find_map(|v| {
                v.as_bytes().split(|&b| b == b';').find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let rest = pair.strip_prefix(name.as_bytes())?;
                    rest.strip_prefix(b"=")
                })
            }),
        }
    }
}

const VNODES_PER_WEIGHT: u32 = 100;

fn hash(bytes: &[u8]) -> u64 {
    // XXH64 with seed 0: a fixed, well-mixed algorithm, so every gateway of a fleet, whatever
    // its build, maps a key to the same endpoint.
    twox_hash::XxHash64::oneshot(0, bytes)
}

pub(crate) enum Balancer {
    /// `schedule` lists endpoint indices, each as often as its weight, interleaved.
    RoundRobin {
        next: AtomicUsize,
        schedule: Box<[u32]>,
    },
    LeastRequest,
    Random {
        total_weight: u32,
    },
    ConsistentHash {
        key: HashKey,
        ring: Box<[(u64, u32)]>,
    },
}

impl Balancer {
    pub(crate) fn new(
        kind: LoadBalancing,
        key: Option<HashKey>,
        endpoints: &[Arc<Endpoint>],
    ) -> Balancer {
        match kind {
            LoadBalancing::RoundRobin => {
                let max = endpoints.iter().map(|e| e.weight).max().unwrap_or(1);
                let mut schedule = Vec::new();
                for round in 0..max {
                    for (i, e) in endpoints.iter().enumerate() {
                        if e.weight > round {
                            schedule.push(i as u32);
                        }
                    }
                }
                Balancer::RoundRobin {
                    next: AtomicUsize::new(0),
                    schedule: schedule.into_boxed_slice(),
                }
            }
            LoadBalancing::LeastRequest => Balancer::LeastRequest,
            LoadBalancing::Random => Balancer::Random {
                total_weight: endpoints.iter().map(|e| e.weight).sum(),
            },
            LoadBalancing::ConsistentHash => {
                let mut ring = Vec::new();
                for (i, e) in endpoints.iter().enumerate() {
                    for v in 0..e.weight * VNODES_PER_WEIGHT {
                        ring.push((hash(format!("{}#{v}", e.url).as_bytes()), i as u32));
                    }
                }
                ring.sort_unstable();
                Balancer::ConsistentHash {
                    key: key.unwrap_or(HashKey::Ip),
                    ring: ring.into_boxed_slice(),
                }
            }
        }
    }

    /// Picks an endpoint among those for which `ok` holds.
    pub(crate) fn pick<'a>(
        &self,
        eps: &'a [Arc<Endpoint>],
        headers: &HeaderMap,
        ok: impl Fn(&Endpoint) -> bool,
    ) -> Option<&'a Arc<Endpoint>> {
        let n = eps.len();
        if n == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin { next, schedule } => {
                let len = schedule.len();
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|i| &eps[schedule[(start + i) % len] as usize])
                    .find(|e| ok(e))
            }
            Balancer::LeastRequest => {
                let a = fastrand::usize(..n);
                let b = if n > 1 {
                    (a + 1 + fastrand::usize(..n - 1)) % n
                } else {
                    a
                };
                let (ea, eb) = (&eps[a], &eps[b]);
                let load =
                    |e: &Endpoint| (e.in_flight() as u64 + 1) * 1_000_000 / e.weight.max(1) as u64;
                match (ok(ea), ok(eb)) {
                    (true, true) => Some(if load(eb) < load(ea) { eb } else { ea }),
                    (true, false) => Some(ea),
                    (false, true) => Some(eb),
                    (false, false) => {
                        // Both choices unavailable: take the least loaded available one.
                        eps.iter().filter(|e| ok(e)).min_by_key(|e| load(e))
                    }
                }
            }
            Balancer::Random { total_weight } => {
                let mut r = fastrand::u32(..(*total_weight).max(1));
                let start = eps
                    .iter()
                    .position(|e| {
                        if r < e.weight {
                            true
                        } else {
                            r -= e.weight;
                            false
                        }
                    })
                    .unwrap_or(0);
                (0..n).map(|i| &eps[(start + i) % n]).find(|e| ok(e))
            }
            Balancer::ConsistentHash { key, ring } => {
                let h = key.extract(headers).map_or_else(|| fastrand::u64(..), hash);
                let start = ring.partition_point(|(p, _)| *p < h);
                (0..ring.len())
                    .map(|i| &eps[ring[(start + i) % ring.len()].1 as usize])
                    .find(|e| ok(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Arc::new(Endpoint::parse(&format!("http://10.0.0.{i}:80")).unwrap()))
            .collect()
    }

    fn idx(eps: &[Arc<Endpoint>], e: &Arc<Endpoint>) -> usize {
        eps.iter().position(|x| Arc::ptr_eq(x, e)).unwrap()
    }

    #[test]
    fn round_robin_is_even_and_skips_unavailable() {
        let e = eps(3);
        let b = Balancer::new(LoadBalancing::RoundRobin, None, &e);
        let h = HeaderMap::new();
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[idx(&e, b.pick(&e, &h, |_| true).unwrap())] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        for _ in 0..10 {
            let picked = b.pick(&e, &h, |x| x.url != e[1].url).unwrap();
            assert_ne!(idx(&e, picked), 1);
        }
        assert!(b.pick(&e, &h, |_| false).is_none());
    }

    #[test]
    fn consistent_hash_is_sticky_and_spreads() {
        let e = eps(3);
        let b = Balancer::new(
            LoadBalancing::ConsistentHash,
            Some(HashKey::parse("header:x-user").unwrap()),
            &e,
        );
        let mut used = [false; 3];
        for user in 0..60 {
            let mut h = HeaderMap::new();
            h.insert("x-user", user.to_string().parse().unwrap());
            let first = idx(&e, b.pick(&e, &h, |_| true).unwrap());
            used[first] = true;
            for _ in 0..5 {
                assert_eq!(idx(&e, b.pick(&e, &h, |_| true).unwrap()), first);
            }
        }
        assert_eq!(used, [true, true, true]);
    }

    #[test]
    fn hash_keys() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=1; session=xyz; b=2".parse().unwrap());
        h.insert("x-forwarded-for", "203.0.113.9, 10.0.0.1".parse().unwrap());
        assert_eq!(
            HashKey::parse("cookie:session").unwrap().extract(&h),
            Some(&b"xyz"[..])
        );
        assert_eq!(HashKey::Ip.extract(&h), Some(&b"203.0.113.9"[..]));
        assert_eq!(
            HashKey::parse("body"),
            Err(HashKeyError::Unknown("body".into()))
        );
        assert!(matches!(
            HashKey::parse("header:bad header"),
            Err(HashKeyError::Header(..))
        ));
    }
}
