//! `[redis]`, `[rate_limits.NAME]` and `[server] ip_rate_limit`: what rate limiting reads.
//! Each value is checked where serde reads it, so a mistake points at its key.

use std::collections::BTreeMap;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use super::defaults::*;
use super::units::Duration;

/// `[redis]`: the store that rate limits with `store = "redis"` share across a fleet.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://` for TLS).
    pub(crate) url: Spanned<String>,
    /// The deadline of one limiter call (the round trip); beyond it, `on_store_failure`.
    #[serde(default = "d_5ms")]
    pub(crate) timeout: Duration,
    /// The deadline of one connection attempt; reconnects back off up to `max_backoff`.
    #[serde(default = "d_1s")]
    pub(crate) connect_timeout: Duration,
    #[serde(default = "d_5s")]
    pub(crate) max_backoff: Duration,
}

/// `[rate_limits.NAME]`: one policy.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RateLimitConfig {
    /// What the budget is counted by.
    pub(crate) key: Spanned<RateKey>,
    /// Every window must admit a request.
    pub(crate) limits: Spanned<Vec<Spanned<WindowConfig>>>,
    #[serde(default = "local_store")]
    pub(crate) store: Spanned<StoreKind>,
    #[serde(default)]
    pub(crate) on_store_failure: OnStoreFailure,
    /// `RateLimit-Policy` and `RateLimit` on the responses of limited routes.
    #[serde(default = "yes")]
    pub(crate) headers: bool,
    /// Keys held in memory at most (the local store, and the fallback of a Redis one): the
    /// least used are evicted beyond it, and any key idle for a full refill.
    #[serde(default = "hundred_thousand")]
    pub(crate) max_keys: u64,
}

/// One window: `requests` per `per`, up to `burst` at once (default: `requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowConfig {
    pub(crate) requests: u32,
    pub(crate) per: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) burst: Option<u32>,
}

/// `[server] ip_rate_limit = { requests = 100, per = "1s", burst = 200 }`: a guard per client
/// IP before routing.
pub(crate) type IpRateLimitConfig = WindowConfig;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StoreKind {
    /// In this process (each gateway of a fleet counts on its own).
    #[default]
    Local,
    /// In `[redis]`, shared by every gateway that uses it.
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnStoreFailure {
    /// Admit the request.
    Allow,
    /// Refuse it with 503 `rate_limit_unavailable`.
    Deny,
    /// Count it in this gateway's memory instead.
    #[default]
    Local,
}

/// `key = "ip" | "header:NAME" | "claim:NAME" | "consumer" | "route" | "global"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RateKey {
    /// The client's IP (the peer's, or from X-Forwarded-For behind `trusted_proxies`).
    Ip,
    /// A request header (lowercase name).
    Header(http::HeaderName),
    /// A claim of the request's JWT.
    Claim(String),
    /// The API-key consumer.
    Consumer,
    /// One budget per route.
    Route,
    /// One budget for everything.
    Global,
}

impl std::str::FromStr for RateKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "rate limit key `{s}` is not one of ip, header:NAME, claim:NAME, consumer, route, global"
            )
        };
        Ok(match s {
            "ip" => RateKey::Ip,
            "consumer" => RateKey::Consumer,
            "route" => RateKey::Route,
            "global" => RateKey::Global,
            _ => match s.split_once(':') {
                Some(("header", h)) => RateKey::Header(
                    http::HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("rate limit key `{s}`: `{h}` is not a header name"))?,
                ),
                Some(("claim", c)) if !c.is_empty() => RateKey::Claim(c.to_owned()),
                _ => return Err(bad()),
            },
        })
    }
}

impl std::fmt::Display for RateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateKey::Ip => f.write_str("ip"),
            RateKey::Header(h) => write!(f, "header:{h}"),
            RateKey::Claim(c) => write!(f, "claim:{c}"),
            RateKey::Consumer => f.write_str("consumer"),
            RateKey::Route => f.write_str("route"),
            RateKey::Global => f.write_str("global"),
        }
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for RateKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A window that cannot be built, with why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WindowError {
    #[error("`requests` must be at least 1")]
    NoRequests,
    #[error("`burst` must be at least 1")]
    NoBurst,
    #[error("`per` / `requests` is under a microsecond")]
    TooFast,
    #[error("`burst` requests at `per` / `requests` take over ten years to refill")]
    TooLong,
}

impl WindowConfig {
    /// The steady interval between two requests and the burst.
    pub(crate) fn check(&self) -> Result<(std::time::Duration, u32), WindowError> {
        if self.requests == 0 {
            return Err(WindowError::NoRequests);
        }
        let burst = self.burst.unwrap_or(self.requests);
        if burst == 0 {
            return Err(WindowError::NoBurst);
        }
        // Whole microseconds: the Redis store counts in them.
        let us = self.per.get().as_micros() / u128::from(self.requests);
        if us == 0 {
            return Err(WindowError::TooFast);
        }
        if us.saturating_mul(u128::from(burst)) > TEN_YEARS_US {
            return Err(WindowError::TooLong);
        }
        let interval = std::time::Duration::from_micros(u64::try_from(us).unwrap_or(u64::MAX));
        Ok((interval, burst))
    }
}

const TEN_YEARS_US: u128 = 10 * 365 * 24 * 3600 * 1_000_000;

/// `rate_limit = "NAME"`, `rate_limit = ["A", "B"]` (all must admit) or `"none"`.
pub(crate) type RateLimitRef = super::names::Names<super::names::RateLimitNames>;

/// Everything `[rate_limits]` defines, by name.
pub(crate) type RateLimits = BTreeMap<String, Spanned<RateLimitConfig>>;

fn local_store() -> Spanned<StoreKind> {
    Spanned::new(0..0, StoreKind::Local)
}

fn yes() -> bool {
    true
}

fn hundred_thousand() -> u64 {
    100_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_print_back() {
        for k in [
            "ip",
            "header:x-tenant",
            "claim:sub",
            "consumer",
            "route",
            "global",
        ] {
            let parsed: RateKey = k.parse().unwrap();
            assert_eq!(parsed.to_string(), k);
        }
        assert!("header:bad name".parse::<RateKey>().is_err());
        assert!("claim:".parse::<RateKey>().is_err());
        let e = "user".parse::<RateKey>().unwrap_err();
        assert!(e.contains("ip, header:NAME"), "{e}");
    }

    #[test]
    fn windows_are_checked() {
        let w = |requests, per: u64, burst| WindowConfig {
            requests,
            per: Duration::from_secs(per),
            burst,
        };
        assert_eq!(
            w(10, 1, None).check().unwrap(),
            (std::time::Duration::from_millis(100), 10)
        );
        assert_eq!(w(10, 2, Some(3)).check().unwrap().1, 3);
        assert_eq!(w(0, 1, None).check(), Err(WindowError::NoRequests));
        assert_eq!(w(1, 1, Some(0)).check(), Err(WindowError::NoBurst));
        assert_eq!(w(u32::MAX, 1, None).check(), Err(WindowError::TooFast));
    }
}
