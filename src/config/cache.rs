//! `[cache]` (the store) and a frontend's or route's `cache` (what it caches). Each value is
//! checked where serde reads it, so a mistake points at its key.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use super::units::{Duration, Size};

/// `[cache]`: the response cache every cached route stores in.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CacheConfig {
    /// Bytes held at most (bodies and headers): the least used objects are evicted beyond it.
    #[serde(default = "d_256mib", deserialize_with = "super::units::nonzero_size")]
    pub(crate) max_size: Size,
    /// A response larger than this is passed through, never buffered.
    #[serde(default = "d_8mib", deserialize_with = "super::units::nonzero_size")]
    pub(crate) max_object_size: Size,
    /// Where objects are kept: `["memory"]`, or `["memory", "redis"]` (a fleet-wide tier).
    #[serde(default = "memory_only")]
    pub(crate) tiers: Spanned<Vec<Spanned<Tier>>>,
    /// Freshness from `Last-Modified` (10% of its age, RFC 9111 §4.2.2) for responses that
    /// carry no explicit freshness, where the RFC allows it.
    #[serde(default = "yes")]
    pub(crate) heuristic: bool,
    /// Store responses that set a cookie (never, by default).
    #[serde(default)]
    pub(crate) store_set_cookie: bool,
    /// Concurrent misses of one object wait for the first one's response at most this long.
    #[serde(default = "d_5s")]
    pub(crate) lock_timeout: Duration,
    /// Requests that wait for one object's first response, at most; more go upstream.
    #[serde(default = "d_1000")]
    pub(crate) max_waiters: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: d_256mib(),
            max_object_size: d_8mib(),
            tiers: memory_only(),
            heuristic: true,
            store_set_cookie: false,
            lock_timeout: d_5s(),
            max_waiters: d_1000(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Tier {
    Memory,
    Redis,
}

/// `cache = true | false | { ttl, stale_while_revalidate, stale_if_error, vary, key_query }`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RouteCache {
    /// `true`: honor the service's `Cache-Control` only; `false`: not cached.
    Switch(bool),
    Settings(RouteCacheSettings),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteCacheSettings {
    /// Freshness of a response whose service says nothing of it (no `max-age`, `s-maxage` or
    /// `Expires`); the service's own directives always win.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ttl: Option<Duration>,
    /// A stale object is served while it is refreshed in the background, this long past its
    /// freshness (RFC 5861; the service's `stale-while-revalidate` wins).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_while_revalidate: Option<Duration>,
    /// A stale object is served when the service fails (5xx, timeout, open circuit, no
    /// endpoint), this long past its freshness (the service's `stale-if-error` wins).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stale_if_error: Option<Duration>,
    /// Request headers whose values are part of the key (besides the service's `Vary`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) vary: Vec<Spanned<String>>,
    /// Only these query parameters are part of the key, in this order; default: all of them,
    /// sorted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key_query: Option<Vec<Spanned<String>>>,
    /// `private`: objects are stored per identity (and `Cache-Control: private` responses
    /// too); `shared`: one object for everyone, stored for an authenticated request only when
    /// the service marks it `public`, `s-maxage` or `must-revalidate`. Default: `private` on a
    /// route with `auth`, else `shared`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) scope: Option<Spanned<CacheScope>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CacheScope {
    Shared,
    Private,
}

impl RouteCache {
    /// The settings of a cached route; `None` when it is not cached.
    pub(crate) fn settings(&self) -> Option<RouteCacheSettings> {
        match self {
            RouteCache::Switch(false) => None,
            RouteCache::Switch(true) => Some(RouteCacheSettings::default()),
            RouteCache::Settings(s) => Some(s.clone()),
        }
    }
}

impl<'de> Deserialize<'de> for RouteCache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RouteCache;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`true`, `false` or a table { ttl, stale_while_revalidate, stale_if_error, vary, key_query }")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<RouteCache, E> {
                Ok(RouteCache::Switch(b))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RouteCache, A::Error> {
                RouteCacheSettings::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RouteCache::Settings)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for RouteCache {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RouteCache::Switch(b) => s.serialize_bool(*b),
            RouteCache::Settings(v) => v.serialize(s),
        }
    }
}

fn d_256mib() -> Size {
    Size(256 * 1024 * 1024)
}
fn d_8mib() -> Size {
    Size(8 * 1024 * 1024)
}
fn d_5s() -> Duration {
    Duration::from_secs(5)
}
fn d_1000() -> usize {
    1000
}
fn yes() -> bool {
    true
}
fn memory_only() -> Spanned<Vec<Spanned<Tier>>> {
    Spanned::new(0..0, vec![Spanned::new(0..0, Tier::Memory)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct R {
        cache: RouteCache,
    }

    #[test]
    fn a_route_cache_is_a_switch_or_settings() {
        let r: R = toml::from_str("cache = true").unwrap();
        assert_eq!(r.cache.settings(), Some(RouteCacheSettings::default()));
        let r: R = toml::from_str("cache = false").unwrap();
        assert_eq!(r.cache.settings(), None);
        let r: R = toml::from_str(
            r#"cache = { ttl = "30s", stale_if_error = "5m", vary = ["accept-language"], key_query = ["page"] }"#,
        )
        .unwrap();
        let s = r.cache.settings().unwrap();
        assert_eq!(s.ttl.unwrap().get().as_secs(), 30);
        assert_eq!(s.stale_if_error.unwrap().get().as_secs(), 300);
        assert_eq!(s.vary[0].get_ref(), "accept-language");
        let e = toml::from_str::<R>(r#"cache = { tttl = "30s" }"#)
            .err()
            .unwrap();
        assert!(e.message().contains("tttl"), "{e}");
        let e = toml::from_str::<R>(r#"cache = "yes""#).err().unwrap();
        assert!(e.message().contains("`true`, `false` or a table"), "{e}");
    }

    #[test]
    fn the_store_has_defaults_and_refuses_zero() {
        let c: CacheConfig = toml::from_str("").unwrap();
        assert_eq!(c, CacheConfig::default());
        assert!(toml::from_str::<CacheConfig>(r#"max_size = "0KiB""#).is_err());
        let c: CacheConfig = toml::from_str(r#"tiers = ["memory", "redis"]"#).unwrap();
        assert_eq!(c.tiers.get_ref().len(), 2);
        assert!(toml::from_str::<CacheConfig>(r#"tiers = ["disk"]"#).is_err());
    }
}
