//! RFC 9111 as a shared cache: the `Cache-Control` directives of a response and of a request,
//! whether a response may be stored (§3, §3.5), its freshness lifetime (§4.2.1, heuristics
//! §4.2.2), its age (§4.2.3) and the stale extensions of RFC 5861. Each response's rules are
//! worked out once, when it is stored; a hit only adds its resident time.
//!
//! Written here rather than taken from `http-cache-semantics`: that crate is a browser-side
//! policy object (it keeps both header maps and re-parses them on every use, formats `Date` as
//! RFC 2822 rather than an HTTP-date, and knows neither `stale-while-revalidate` nor
//! `stale-if-error`), while a gateway needs the decision precomputed for a cheap hit.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::targeted::targeted_valid;
pub(crate) use super::targeted::CDN_CACHE_CONTROL;
use http::StatusCode;

/// RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31.
const DELTA_MAX: u64 = 2_147_483_648;

/// The directives of a response's `Cache-Control` a shared cache acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ResponseDirectives {
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) no_store: bool,
    /// `no-cache`, with or without field names (a qualified one is taken whole).
    pub(crate) no_cache: bool,
    /// `private`, with or without field names.
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) proxy_revalidate: bool,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    /// `must-understand`: a cache that understands the status may store despite `no-store`.
    pub(crate) must_understand: bool,
    /// Read from `CDN-Cache-Control`: `Cache-Control` and `Expires` do not count.
    pub(crate) targeted: bool,
}

/// The directives of a request's `Cache-Control` (and `Pragma: no-cache`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RequestDirectives {
    pub(crate) no_cache: bool,
    pub(crate) no_store: bool,
    pub(crate) max_age: Option<u64>,
    /// `max-stale` (`Some(None)`: any staleness).
    pub(crate) max_stale: Option<Option<u64>>,
    pub(crate) min_fresh: Option<u64>,
    pub(crate) only_if_cached: bool,
}

/// Calls `f(name, value)` for each directive of every `Cache-Control` line, names lowercased,
/// quoted values unquoted; commas inside quotes do not split.
fn directives(headers: &HeaderMap, field: &HeaderName, mut f: impl FnMut(&str, Option<&str>)) {
    for line in headers.get_all(field) {
        let Ok(s) = line.to_str() else { continue };
        items(s, |name, value| f(name, value));
    }
}

/// The comma-separated items of one field line (commas inside quotes do not split), names
/// lowercased, quoted values unquoted.
fn items(s: &str, mut f: impl FnMut(&str, Option<&str>)) {
    {
        let mut rest = s;
        while !rest.is_empty() {
            // One directive: up to a comma outside quotes.
            let mut in_quotes = false;
            let mut end = rest.len();
            for (i, c) in rest.char_indices() {
                match c {
                    '"' => in_quotes = !in_quotes,
                    ',' if !in_quotes => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            let item = rest[..end].trim();
            rest = rest.get(end + 1..).unwrap_or("");
            if item.is_empty() {
                continue;
            }
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (item, None),
            };
            let name = name.to_ascii_lowercase();
            f(&name, value);
        }
    }
}

/// A delta-seconds value: digits only; too large is 2^31; anything else is `None`.
fn delta(v: Option<&str>) -> Option<u64> {
    let v = v?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().map_or(DELTA_MAX, |n| n.min(DELTA_MAX)))
}

/// A directive that must carry seconds and has an invalid value makes the response stale
/// (RFC 9111 §4.2.1 allows treating it so): 0.
fn delta_or_zero(v: Option<&str>) -> u64 {
    delta(v).unwrap_or(0)
}

impl ResponseDirectives {
    /// The directives this cache follows: `CDN-Cache-Control`'s when the response has a valid
    /// one, else `Cache-Control`'s.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let cdn = headers.get_all(&CDN_CACHE_CONTROL);
        let targeted =
            cdn.iter().next().is_some() && cdn.iter().all(|v| v.to_str().is_ok_and(targeted_valid));
        let field = if targeted {
            &CDN_CACHE_CONTROL
        } else {
            &header::CACHE_CONTROL
        };
        let mut d = ResponseDirectives {
            targeted,
            ..ResponseDirectives::default()
        };
        // The first occurrence of a repeated directive wins.
        directives(headers, field, |name, value| match name {
            "max-age" if d.max_age.is_none() => d.max_age = Some(delta_or_zero(value)),
            "s-maxage" if d.s_maxage.is_none() => d.s_maxage = Some(delta_or_zero(value)),
            "no-store" => d.no_store = true,
            "no-cache" => d.no_cache = true,
            "private" => d.private = true,
            "public" => d.public = true,
            "must-revalidate" => d.must_revalidate = true,
            "proxy-revalidate" => d.proxy_revalidate = true,
            "stale-while-revalidate" if d.stale_while_revalidate.is_none() => {
                d.stale_while_revalidate = delta(value)
            }
            "stale-if-error" if d.stale_if_error.is_none() => d.stale_if_error = delta(value),
            "must-understand" => d.must_understand = true,
            _ => {}
        });
        d
    }

    /// Whether a stale response may ever be served without validation: not when the service
    /// says `must-revalidate`, `proxy-revalidate`, `no-cache`, or `s-maxage` (which implies
    /// `proxy-revalidate` for a shared cache, §5.2.2.10).
    pub(crate) fn allows_stale(&self) -> bool {
        !(self.must_revalidate || self.proxy_revalidate || self.no_cache || self.s_maxage.is_some())
    }
}

impl RequestDirectives {
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        let mut any = false;
        directives(headers, &header::CACHE_CONTROL, |name, value| {
            any = true;
            match name {
                "no-cache" => d.no_cache = true,
                "no-store" => d.no_store = true,
                "max-age" if d.max_age.is_none() => d.max_age = Some(delta_or_zero(value)),
                "max-stale" if d.max_stale.is_none() => {
                    d.max_stale = Some(value.map(|v| delta(Some(v)).unwrap_or(0)))
                }
                "min-fresh" if d.min_fresh.is_none() => d.min_fresh = delta(value),
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        });
        // §5.4: `Pragma: no-cache` counts only where the request has no Cache-Control.
        if !any
            && headers.get_all(header::PRAGMA).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|s| s.to_ascii_lowercase().contains("no-cache"))
            })
        {
            d.no_cache = true;
        }
        d
    }
}

/// Statuses a response may be stored with, when its freshness is explicit; those marked
/// heuristically cacheable (RFC 9110 §15.1) may also be stored without it.
pub(crate) fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Final statuses this cache understands well enough to store (not 206: ranges are not
/// assembled; not 304: it is a validation answer, not a representation).
fn understood(status: StatusCode) -> bool {
    let s = status.as_u16();
    (200..600).contains(&s) && s != 206 && s != 304
}

/// Statuses whose semantics are defined (RFC 9110 §15, and 429, 451), for `must-understand`.
fn known(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200..=205 | 300..=303 | 305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 429 | 451 | 500..=505
    )
}

/// What a route's settings and the store add to the RFC's rules.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Assumptions {
    /// Freshness of a response without explicit freshness (the route's `ttl`).
    pub(crate) ttl: Option<Duration>,
    /// Heuristic freshness from `Last-Modified` is allowed.
    pub(crate) heuristic: bool,
    /// Responses with `Set-Cookie` may be stored.
    pub(crate) store_set_cookie: bool,
    /// The route keys objects by identity: `private` responses may be stored, per identity.
    pub(crate) per_identity: bool,
}

/// Why a response is not stored (for `Cache-Status: detail=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStorable {
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NoFreshness,
}

impl NotStorable {
    pub(crate) fn detail(self) -> &'static str {
        match self {
            NotStorable::Status => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::VaryStar => "vary-star",
            NotStorable::NoFreshness => "no-freshness",
        }
    }
}

/// The timing of a stored response, worked out once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// Freshness lifetime (§4.2.1).
    pub(crate) lifetime: Duration,
    /// `corrected_initial_age` (§4.2.3): its age when it was received.
    pub(crate) initial_age: Duration,
}

/// Whether a response to a GET may be stored, and for how long it is fresh. `request_time`
/// and `response_time` are when the request went out and its response came back;
/// `authorized`: the request carried credentials (`Authorization`, or any identity the
/// gateway's auth established).
pub(crate) fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &ResponseDirectives,
    authorized: bool,
    a: &Assumptions,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Result<Timing, NotStorable> {
    if !understood(status) {
        return Err(NotStorable::Status);
    }
    // §5.2.2.3: with `must-understand`, only a status whose semantics this cache knows is
    // stored, and then `no-store` may be ignored.
    if cc.must_understand && !known(status) {
        return Err(NotStorable::Status);
    }
    if cc.no_store && !cc.must_understand {
        return Err(NotStorable::NoStore);
    }
    if cc.private && !a.per_identity {
        return Err(NotStorable::Private);
    }
    // §3.5: a shared cache stores a response to an authorized request only when the service
    // says it may: `public`, `s-maxage` or `must-revalidate`. (A per-identity route keys it by
    // who asked instead.)
    if authorized && !a.per_identity && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Err(NotStorable::Authorization);
    }
    if !a.store_set_cookie && headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    if vary_names(headers).any(|n| n == "*") {
        return Err(NotStorable::VaryStar);
    }
    let date = headers
        .get(header::DATE)
        .and_then(http_date)
        .unwrap_or(response_time);
    let explicit = if let Some(s) = cc.s_maxage {
        Some(Duration::from_secs(s))
    } else if let Some(m) = cc.max_age {
        Some(Duration::from_secs(m))
    } else if !cc.targeted && headers.contains_key(header::EXPIRES) {
        // An invalid Expires (such as "0") is a time in the past (§5.3).
        Some(
            headers
                .get(header::EXPIRES)
                .and_then(http_date)
                .and_then(|e| e.duration_since(date).ok())
                .unwrap_or(Duration::ZERO),
        )
    } else {
        None
    };
    let heuristic_ok = heuristically_cacheable(status) || cc.public;
    let lifetime = match explicit {
        Some(l) => l,
        None if !heuristic_ok => return Err(NotStorable::Status),
        None => match a.ttl {
            Some(ttl) => ttl,
            None if a.heuristic => headers
                .get(header::LAST_MODIFIED)
                .and_then(http_date)
                .and_then(|lm| date.duration_since(lm).ok())
                .map_or(Duration::ZERO, |d| d / 10),
            None => Duration::ZERO,
        },
    };
    let validators =
        headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED);
    // Stored with no freshness and nothing to revalidate with, it could never be used.
    if lifetime.is_zero() && !validators {
        return Err(NotStorable::NoFreshness);
    }
    Ok(Timing {
        lifetime,
        initial_age: initial_age(headers, date, request_time, response_time),
    })
}

/// §4.2.3: `corrected_initial_age = max(apparent_age, age_value + response_delay)`.
pub(crate) fn initial_age(
    headers: &HeaderMap,
    date: SystemTime,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let age_value = headers
        .get(header::AGE)
        // A list (`7200, 0`) counts by its first member.
        .and_then(|v| {
            delta(
                v.to_str()
                    .ok()
                    .and_then(|s| s.split(',').next())
                    .map(str::trim),
            )
        })
        .map_or(Duration::ZERO, Duration::from_secs);
    let apparent = response_time.duration_since(date).unwrap_or(Duration::ZERO);
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    apparent.max(age_value + delay)
}

/// The names a response's `Vary` lists, lowercased.
pub(crate) fn vary_names(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// An HTTP-date (IMF-fixdate, RFC 850 or asctime); names of days and months and `GMT` in any
/// case (RFC 9110 §5.6.7 asks for them as written, but senders get it wrong).
pub(crate) fn http_date(v: &HeaderValue) -> Option<SystemTime> {
    let s = v.to_str().ok()?.trim();
    if let Ok(t) = httpdate::parse_http_date(s) {
        return Some(t);
    }
    let mut fixed = String::with_capacity(s.len());
    let mut word_start = true;
    for c in s.chars() {
        if c.is_ascii_alphabetic() {
            fixed.push(if word_start {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            });
            word_start = false;
        } else {
            fixed.push(c);
            word_start = true;
        }
    }
    let fixed = fixed.replace("Gmt", "GMT");
    httpdate::parse_http_date(&fixed).ok()
}

/// Whether an entity tag in `If-None-Match` matches `etag` (weak comparison, RFC 9110 §13.1.2).
pub(crate) fn none_match(if_none_match: &HeaderMap, etag: Option<&HeaderValue>) -> bool {
    let Some(etag) = etag.and_then(|e| e.to_str().ok()) else {
        return if_none_match
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .any(|v| v.as_bytes().trim_ascii() == b"*");
    };
    let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let want = bare(etag);
    if_none_match
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .any(|t| t.trim() == "*" || bare(t) == want)
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
