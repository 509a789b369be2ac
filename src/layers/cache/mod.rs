//! Response caching: an RFC 9111 shared cache in a route's stack, between the rate limit and
//! the plugins (`route::chain`). `rules.rs` decides what may be stored and for how long,
//! `key.rs` what an object is found by, `store.rs` holds the objects (in memory, weighed by
//! bytes) and the fills in flight, `fill.rs` stores a response while the client reads it.
//!
//! For each GET or HEAD of a cached route:
//! - a fresh stored response answers it (`Cache-Status: gatehouse; hit`), a HEAD from a stored
//!   GET, a conditional request with 304 when its validators match;
//! - a stale one within `stale-while-revalidate` answers it too, while one background request
//!   per URL refreshes it;
//! - otherwise the request goes to the service, conditional on the stored validators when
//!   there are any (a 304 refreshes the stored headers); concurrent misses of one URL wait for
//!   the first one's response (coalescing) instead of each asking the service;
//! - when the service fails (5xx, timeout, open circuit, no endpoint, the route's fallback
//!   answering), a stale response within `stale-if-error` answers instead.
//!
//! Unsafe methods go to the service, and when they succeed the URL (and the `Location` and
//! `Content-Location` they answer with, on the same host) is invalidated.

mod answer;
mod fill;
mod forward;
pub(crate) mod key;
pub(crate) mod rules;
pub(crate) mod shared;
pub(crate) mod store;
mod targeted;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

use crate::backend::RespBody;
use crate::body::ReqBody;
use crate::context::{Exchange, Identity};
use crate::error::{BoxError, Problem};
use answer::{answer, failed_with_status, with_status};
use forward::{forward, other_method, refresh};
use rules::{Assumptions, RequestDirectives};
pub(crate) use store::CacheStore;
use store::{Join, Object, Outcome};
use tower::ServiceExt;

pub(crate) static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// `gatehouse_cache_total`'s results, in the order of `RouteCache::results`.
pub(crate) const RESULTS: [&str; 7] = [
    "hit",
    "miss",
    "stale",
    "revalidated",
    "coalesced",
    "bypass",
    "shared",
];
const HIT: usize = 0;
const MISS: usize = 1;
const STALE: usize = 2;
const REVALIDATED: usize = 3;
const COALESCED: usize = 4;
const BYPASS: usize = 5;
const SHARED: usize = 6;

/// A route's cache settings, compiled.
pub(crate) struct RouteCache {
    pub(crate) store: Arc<CacheStore>,
    /// `frontend/route`.
    pub(crate) route: Arc<str>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    /// Request headers that select a variant besides the service's `Vary`.
    pub(crate) vary: Box<[HeaderName]>,
    pub(crate) key_query: Option<Box<[Box<str>]>>,
    /// `private` responses are stored per identity (the route has authentication).
    pub(crate) per_identity: bool,
    pub(crate) results: [prometheus::IntCounter; 7],
}

/// The cache layer of one route.
#[derive(Clone)]
pub(crate) struct CacheLayer(Arc<RouteCache>);

impl CacheLayer {
    pub(crate) fn new(rc: RouteCache) -> Self {
        CacheLayer(Arc::new(rc))
    }

    /// Runs one request through the cache, above the route's stack `inner`.
    pub(crate) fn call<S: Inner>(&self, inner: &S, req: Request<ReqBody>) -> BoxFuture {
        let (rc, inner) = (self.0.clone(), inner.clone());
        Box::pin(serve(rc, inner, req))
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

/// The stack below the cache (the erased rest of the route).
pub(crate) use crate::backend::RouteStack as Inner;

/// What a request looked up.
struct Lookup {
    key: String,
    identity: Option<Box<str>>,
    /// The variant that answers it, if one is stored.
    found: Option<Arc<Object>>,
    /// A URL entry existed (for `uri-miss` against `vary-miss`).
    url_known: bool,
}

async fn serve<S: Inner>(
    rc: Arc<RouteCache>,
    inner: S,
    req: Request<ReqBody>,
) -> Result<Response<RespBody>, BoxError> {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD {
        return other_method(&rc, &inner, req).await;
    }
    let rd = if req.headers().contains_key(header::CACHE_CONTROL)
        || req.headers().contains_key(header::PRAGMA)
    {
        RequestDirectives::parse(req.headers())
    } else {
        RequestDirectives::default()
    };
    let Some(exchange) = req.extensions().get::<Exchange>().cloned() else {
        return inner.clone().oneshot(req).await;
    };
    let mut lookup = rc.lookup(&exchange, req.headers());
    // Not in this gateway's memory: what another gateway of the fleet stored, if any.
    if lookup.found.is_none() {
        if let Some(v) = rc.store.fetch_shared(&lookup.key).await {
            lookup.url_known = true;
            lookup.found = v
                .find(&rc.route, req.headers(), lookup.identity.as_deref())
                .cloned();
            if lookup.found.is_some() {
                rc.count(SHARED);
            }
        }
    }
    let now = Instant::now();
    if let Some(obj) = &lookup.found {
        if rd.no_store {
            // Not stored, and not answered from the store either (§5.2.1.5 leaves it open;
            // the client asked for a fresh exchange).
        } else if !rd.no_cache && usable(obj, &rd, now) {
            rc.count(HIT);
            let status = format!("gatehouse; hit; ttl={}", obj.ttl_secs(now));
            return Ok(answer(obj, &req, now, status));
        } else if !rd.no_cache
            && rd.max_age.is_none()
            && rd.min_fresh.is_none()
            && obj.serves_while_revalidating(now)
        {
            // (Not for a client that asked for an age or freshness this copy does not have.)
            rc.count(STALE);
            refresh(&rc, &inner, &req, &exchange, &lookup);
            let status = format!(
                "gatehouse; hit; ttl={}; detail=stale-while-revalidate",
                obj.ttl_secs(now)
            );
            return Ok(answer(obj, &req, now, status));
        }
    }
    if rd.only_if_cached {
        return Err(Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            "not_cached",
            "No stored response can answer this only-if-cached request",
        )
        .header(
            CACHE_STATUS.clone(),
            HeaderValue::from_static("gatehouse; fwd=miss; detail=only-if-cached"),
        )
        .into());
    }
    let fwd = if rd.no_cache || rd.no_store {
        "request"
    } else if lookup.found.is_some() {
        "stale"
    } else if lookup.url_known {
        "vary-miss"
    } else {
        "uri-miss"
    };
    // Not filled through this request: a HEAD (no body to store), a range (not assembled),
    // a client that asked for nothing to be stored, or a private route's request without an
    // identity to store it for.
    let unkeyed = rc.per_identity && lookup.identity.is_none();
    if method == Method::HEAD || req.headers().contains_key(header::RANGE) || rd.no_store || unkeyed
    {
        rc.count(BYPASS);
        let status = format!("gatehouse; fwd={fwd}");
        let resp = inner
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| failed_with_status(e, status.clone()))?;
        return Ok(with_status(resp, status));
    }
    match rc.store.join(&rc.flight_key(&lookup)) {
        Join::Lead(guard) => {
            rc.count(MISS);
            forward(&rc, &inner, req, &lookup, fwd, Some(guard), false).await
        }
        Join::Follow(flight) => match flight.wait(&rc.store).await {
            // Answered from the waited-for object only when it may be reused as it is.
            Some(Outcome::Stored(obj))
                if obj.answers(&rc.route, req.headers(), lookup.identity.as_deref())
                    && usable(&obj, &rd, Instant::now()) =>
            {
                rc.count(COALESCED);
                let now = Instant::now();
                let status = format!("gatehouse; fwd={fwd}; collapsed; ttl={}", obj.ttl_secs(now));
                Ok(answer(&obj, &req, now, status))
            }
            Some(Outcome::Failed)
                if lookup
                    .found
                    .as_ref()
                    .is_some_and(|o| o.serves_on_error(Instant::now())) =>
            {
                rc.count(STALE);
                let obj = lookup
                    .found
                    .as_ref()
                    .map(Arc::clone)
                    .ok_or("checked above")?;
                let now = Instant::now();
                let status = format!(
                    "gatehouse; fwd=stale; collapsed; ttl={}; detail=stale-if-error",
                    obj.ttl_secs(now)
                );
                Ok(answer(&obj, &req, now, status))
            }
            _ => {
                rc.count(MISS);
                forward(&rc, &inner, req, &lookup, fwd, None, false).await
            }
        },
    }
}

impl RouteCache {
    /// What concurrent misses wait together on: the URL, for one route and one identity
    /// (another user's fill on a private route could never answer this one).
    fn flight_key(&self, lookup: &Lookup) -> Arc<str> {
        format!(
            "{}\0{}\0{}",
            self.route,
            lookup.identity.as_deref().unwrap_or(""),
            lookup.key
        )
        .into()
    }

    fn count(&self, result: usize) {
        if let Some(c) = self.results.get(result) {
            c.inc();
        }
    }

    fn key(&self, exchange: &Exchange) -> String {
        let host = exchange.host().and_then(|h| h.to_str().ok()).unwrap_or("");
        key::primary(
            exchange.client().tls,
            host,
            exchange.path(),
            exchange.query(),
            self.key_query.as_deref(),
        )
    }

    fn lookup(&self, exchange: &Exchange, headers: &HeaderMap) -> Lookup {
        let key = self.key(exchange);
        let identity = if self.per_identity {
            exchange.identity().and_then(identity_key)
        } else {
            None
        };
        let (found, url_known) = match self.store.get(&key) {
            Some(v) => (
                v.find(&self.route, headers, identity.as_deref()).cloned(),
                true,
            ),
            None => (None, false),
        };
        Lookup {
            key,
            identity,
            found,
            url_known,
        }
    }

    fn assumptions(&self, identity: bool) -> Assumptions {
        Assumptions {
            ttl: self.ttl,
            heuristic: self.store.heuristic,
            store_set_cookie: self.store.store_set_cookie,
            per_identity: identity,
        }
    }
}

/// Who a private object is for: the API-key consumer, or the JWT's subject (with the
/// provider, so two providers' subjects never meet).
fn identity_key(id: &Identity) -> Option<Box<str>> {
    if let Some(c) = &id.consumer {
        return Some(format!("{}\0consumer\0{c}", id.provider).into());
    }
    let sub = id.claims.as_ref()?.get("sub")?.as_str()?;
    Some(format!("{}\0sub\0{sub}", id.provider).into())
}

/// Whether a stored response may answer a request without the service (§4.2, §5.2.1).
fn usable(obj: &Object, rd: &RequestDirectives, now: Instant) -> bool {
    let age = obj.age(now);
    if rd.max_age.is_some_and(|m| age > Duration::from_secs(m)) {
        return false;
    }
    if obj.fresh(now) {
        let left = obj.timing.lifetime.saturating_sub(age);
        return rd.min_fresh.is_none_or(|m| left >= Duration::from_secs(m));
    }
    // A client that accepts staleness (max-stale), where the service allows it.
    match rd.max_stale {
        Some(limit) if obj.cc.allows_stale() && !obj.cc.no_cache => {
            limit.is_none_or(|l| obj.staleness(now) <= Duration::from_secs(l))
        }
        _ => false,
    }
}

/// Builds the `[cache]` store (the previous snapshot's, while `[cache]` is unchanged: objects
/// survive reloads and are dropped when its settings change).
pub(crate) fn build_store(
    loaded: &crate::config::LoadedConfig,
    previous: Option<&crate::resources::Resources>,
    resources: &mut crate::resources::Resources,
    metrics: &crate::observe::metrics::Metrics,
    errors: &mut crate::config::ConfigErrors,
) -> Option<Arc<CacheStore>> {
    use crate::config::Tier;
    let default = crate::config::CacheConfig::default();
    let cfg = loaded
        .gateway
        .cache
        .as_ref()
        .map_or(&default, |c| c.get_ref());
    let gfile = &loaded.gateway_file;
    let mut ok = true;
    let tiers = cfg.tiers.get_ref();
    let wants_redis = tiers.iter().any(|t| *t.get_ref() == Tier::Redis);
    if !tiers.iter().any(|t| *t.get_ref() == Tier::Memory) {
        ok = false;
        errors.push(gfile.error_at(
            cfg.tiers.span(),
            "[cache] tiers must hold \"memory\" (a hit is answered from memory; \"redis\" is shared behind it)"
                .to_owned(),
        ));
    }
    if wants_redis && loaded.gateway.redis.is_none() {
        ok = false;
        errors.push(gfile.error_at(
            cfg.tiers.span(),
            "[cache] tiers: the `redis` tier needs a [redis] table".to_owned(),
        ));
    }
    if cfg.max_object_size.0 > cfg.max_size.0 {
        ok = false;
        let span = loaded.gateway.cache.as_ref().map_or(0..0, |c| c.span());
        errors.push(gfile.error_at(
            span,
            "[cache] max_object_size is larger than max_size".to_owned(),
        ));
    }
    if !ok {
        return None;
    }
    // Rebuilt when [cache] changes, or the [redis] its shared tier uses.
    let redis = if wants_redis {
        resources.get::<crate::upstream::redis::RedisStore>("redis")
    } else {
        None
    };
    if wants_redis && redis.is_none() {
        // [redis] itself failed to build; its error is reported where it is.
        return None;
    }
    let key = StoreKey {
        cache: cfg.clone(),
        redis: redis
            .as_ref()
            .and(loaded.gateway.redis.as_ref())
            .map(|r| r.get_ref().clone()),
    };
    let built = resources.reuse_or_build(previous, "cache", &key, |_| {
        let shared = redis.map(shared::SharedTier::new);
        Ok::<_, ()>(CacheStore::new(cfg, metrics, shared))
    });
    built.ok().map(|(s, _)| s)
}

/// What a cache store is rebuilt on.
#[derive(Clone, PartialEq)]
struct StoreKey {
    cache: crate::config::CacheConfig,
    redis: Option<crate::config::RedisConfig>,
}
