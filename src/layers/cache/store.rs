//! The in-memory tier: stored objects in a `moka` cache weighed by bytes (one entry per URL,
//! holding its variants), and the registry of fills in flight that coalesces concurrent misses
//! of one URL into one upstream request. One `CacheStore` per `[cache]` config, a resource that
//! survives reloads while that config is unchanged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use moka::notification::RemovalCause;
use tokio::sync::watch;
use tokio::time::Instant;

use super::key::{selected_by, Selected};
use super::rules::{ResponseDirectives, Timing};
use super::shared::SharedTier;
use crate::config::CacheConfig;
use crate::observe::metrics::Metrics;

/// Variants kept per URL at most (the oldest is dropped beyond it).
const MAX_VARIANTS: usize = 8;
/// What an object costs besides its body and headers (the entry, the key, the maps, the
/// allocator's rounding): `bench/run --scenarios cache_hit` measured 1 171 B of RSS per stored
/// object beyond a 193 B body with seven headers, which this weight then matches.
const OVERHEAD: usize = 1024;

/// One stored response.
#[derive(Debug)]
pub(crate) struct Object {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The request header values this variant was selected by.
    pub(crate) selected: Selected,
    /// Who it is for, on a per-identity route.
    pub(crate) identity: Option<Box<str>>,
    /// The route that stored it (`frontend/route`): only that route answers with it (two
    /// routes may serve one URL, told apart by headers), and purges by route find it.
    pub(crate) route: Arc<str>,
    pub(crate) cc: ResponseDirectives,
    pub(crate) timing: Timing,
    /// When its response arrived (its resident time counts from here).
    pub(crate) stored_at: Instant,
    /// How long past freshness it may be served while refreshed, or when the service fails.
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
}

impl Object {
    /// Its current age (§4.2.3).
    pub(crate) fn age(&self, now: Instant) -> Duration {
        self.timing.initial_age + now.saturating_duration_since(self.stored_at)
    }

    /// Whether it may be used without validation (§4.2; `no-cache` always validates).
    pub(crate) fn fresh(&self, now: Instant) -> bool {
        !self.cc.no_cache && self.timing.lifetime > self.age(now)
    }

    /// How long it has been stale (zero while fresh).
    pub(crate) fn staleness(&self, now: Instant) -> Duration {
        self.age(now).saturating_sub(self.timing.lifetime)
    }

    /// Remaining freshness in whole seconds, negative once stale (`Cache-Status: ttl`).
    pub(crate) fn ttl_secs(&self, now: Instant) -> i64 {
        let age = self.age(now);
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if self.timing.lifetime >= age {
            secs(self.timing.lifetime - age)
        } else {
            -secs(age - self.timing.lifetime)
        }
    }

    /// Whether it may stand in for a failed service now (RFC 5861 `stale-if-error`).
    pub(crate) fn serves_on_error(&self, now: Instant) -> bool {
        self.cc.allows_stale() && self.staleness(now) <= self.stale_if_error
    }

    /// Whether it may be served stale while a background request refreshes it.
    pub(crate) fn serves_while_revalidating(&self, now: Instant) -> bool {
        self.cc.allows_stale()
            && !self.stale_while_revalidate.is_zero()
            && self.staleness(now) <= self.stale_while_revalidate
    }

    /// Whether this variant answers a request of `route` with these headers from `identity`.
    pub(crate) fn answers(&self, route: &str, headers: &HeaderMap, identity: Option<&str>) -> bool {
        *self.route == *route
            && self.identity.as_deref() == identity
            && selected_by(&self.selected, headers)
    }

    /// Whether `other` stands for the same variant (and replaces it when stored).
    fn same_variant(&self, other: &Object) -> bool {
        self.route == other.route
            && self.identity == other.identity
            && self.selected == other.selected
    }

    pub(crate) fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(http::header::ETAG)
    }

    pub(crate) fn last_modified(&self) -> Option<&HeaderValue> {
        self.headers.get(http::header::LAST_MODIFIED)
    }

    fn weight(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 16)
            .sum();
        OVERHEAD + self.body.len() + headers
    }
}

/// The stored variants of one URL, newest first.
pub(crate) struct Variants {
    pub(crate) list: Box<[Arc<Object>]>,
}

impl Variants {
    /// The variant that answers a request, if any.
    pub(crate) fn find(
        &self,
        route: &str,
        headers: &HeaderMap,
        identity: Option<&str>,
    ) -> Option<&Arc<Object>> {
        self.list
            .iter()
            .find(|o| o.answers(route, headers, identity))
    }

    /// Whether any variant was stored by `route`.
    pub(crate) fn of_route(&self, route: &str) -> bool {
        self.list.iter().any(|o| *o.route == *route)
    }

    /// These variants with `new` ones in front (replacing the variants they stand for), at most
    /// `MAX_VARIANTS`.
    fn with(&self, new: &[Arc<Object>]) -> Variants {
        merged(new, Some(self))
    }

    fn weight(&self, key: &str) -> u32 {
        let w: usize = key.len() + self.list.iter().map(|o| o.weight()).sum::<usize>();
        u32::try_from(w).unwrap_or(u32::MAX)
    }
}

fn merged(new: &[Arc<Object>], old: Option<&Variants>) -> Variants {
    let mut list: Vec<Arc<Object>> = Vec::with_capacity(new.len() + 1);
    for o in new {
        if !list.iter().any(|l| l.same_variant(o)) {
            list.push(o.clone());
        }
    }
    if let Some(old) = old {
        for o in old.list.iter() {
            if !list.iter().any(|l| l.same_variant(o)) {
                list.push(o.clone());
            }
        }
    }
    list.truncate(MAX_VARIANTS);
    Variants { list: list.into() }
}

/// What the request that fills an object ended in, for those waiting on it.
#[derive(Clone)]
pub(crate) enum Outcome {
    Pending,
    /// Stored: the waiters are answered from it.
    Stored(Arc<Object>),
    /// Answered, but not stored (not storable, too large, cut short): each waiter asks itself.
    NotStored,
    /// The service failed: a waiter serves its stale copy if it may, else asks itself.
    Failed,
}

/// One fill in flight.
pub(crate) struct Flight {
    tx: watch::Sender<Outcome>,
    waiters: AtomicUsize,
}

/// Whether a request leads a fill or waits for another's.
pub(crate) enum Join {
    Lead(FlightGuard),
    Follow(Arc<Flight>),
}

/// Held by the request that fills an object: tells the waiters how it ended, and ends the
/// flight (a dropped guard ends it as `NotStored`).
pub(crate) struct FlightGuard {
    store: Arc<CacheStore>,
    key: Arc<str>,
    flight: Arc<Flight>,
    done: bool,
}

impl FlightGuard {
    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        self.flight.tx.send_replace(outcome);
        // Only this guard removes its flight, and no other can be registered while it is
        // there: the entry is this flight unless the registry evicted it.
        if self
            .store
            .flights
            .get(&self.key)
            .is_some_and(|f| Arc::ptr_eq(&f, &self.flight))
        {
            self.store.flights.invalidate(&self.key);
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.end(Outcome::NotStored);
    }
}

/// One `[cache]`: its objects and flights.
pub(crate) struct CacheStore {
    objects: moka::sync::Cache<Arc<str>, Arc<Variants>>,
    flights: moka::sync::Cache<Arc<str>, Arc<Flight>>,
    pub(crate) max_object_size: usize,
    pub(crate) heuristic: bool,
    pub(crate) store_set_cookie: bool,
    pub(crate) lock_timeout: Duration,
    pub(crate) max_waiters: usize,
    /// This store's part of the process-wide gauges (given back when it is dropped).
    held: Arc<Held>,
    /// The Redis tier, with `tiers = ["memory", "redis"]`.
    pub(crate) shared: Option<SharedTier>,
}

/// What one store adds to `gatehouse_cache_bytes` and `gatehouse_cache_objects`: a store
/// replaced by a reload takes its share out of them when it goes.
struct Held {
    bytes: prometheus::IntGauge,
    count: prometheus::IntGauge,
    own_bytes: std::sync::atomic::AtomicI64,
    own_count: std::sync::atomic::AtomicI64,
}

impl Held {
    fn add(&self, bytes: i64, count: i64) {
        self.bytes.add(bytes);
        self.count.add(count);
        self.own_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.own_count.fetch_add(count, Ordering::Relaxed);
    }
}

impl Drop for CacheStore {
    fn drop(&mut self) {
        let h = &self.held;
        h.bytes.sub(h.own_bytes.swap(0, Ordering::Relaxed));
        h.count.sub(h.own_count.swap(0, Ordering::Relaxed));
    }
}

impl CacheStore {
    pub(crate) fn new(c: &CacheConfig, metrics: &Metrics, shared: Option<SharedTier>) -> Self {
        let (bytes, count, evictions) = (
            metrics.cache_bytes.clone(),
            metrics.cache_objects.clone(),
            metrics.cache_evictions.clone(),
        );
        let held = Arc::new(Held {
            bytes,
            count,
            own_bytes: 0.into(),
            own_count: 0.into(),
        });
        let h = held.clone();
        let objects = moka::sync::Cache::builder()
            .max_capacity(c.max_size.0)
            .weigher(|k: &Arc<str>, v: &Arc<Variants>| v.weight(k))
            .eviction_listener(move |k: Arc<Arc<str>>, v: Arc<Variants>, cause| {
                h.add(-i64::from(v.weight(&k)), -1);
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        CacheStore {
            objects,
            flights: moka::sync::Cache::builder().max_capacity(1 << 20).build(),
            max_object_size: usize::try_from(c.max_object_size.0).unwrap_or(usize::MAX),
            heuristic: c.heuristic,
            store_set_cookie: c.store_set_cookie,
            lock_timeout: c.lock_timeout.get(),
            max_waiters: c.max_waiters,
            held,
            shared,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<Arc<Variants>> {
        self.objects.get(key)
    }

    /// Stores `obj` under `key`, replacing the variant it stands for (one atomic step per
    /// URL: a concurrent store of another variant, or an invalidation, is not undone).
    pub(crate) fn put(&self, key: &str, obj: Arc<Object>) {
        let key: Arc<str> = Arc::from(key);
        let mut stored = None;
        self.objects.entry(key.clone()).and_compute_with(|old| {
            let v = Arc::new(match &old {
                Some(e) => e.value().with(std::slice::from_ref(&obj)),
                None => merged(std::slice::from_ref(&obj), None),
            });
            stored = Some(v.clone());
            moka::ops::compute::Op::Put(v)
        });
        if let Some(v) = stored {
            self.held.add(i64::from(v.weight(&key)), 1);
            if let Some(s) = &self.shared {
                s.put(&key, &v);
            }
        }
    }

    /// What the shared tier holds for `key`, merged into what memory holds (`None` without a
    /// shared tier, or when it holds nothing usable or does not answer in time).
    pub(crate) async fn fetch_shared(&self, key: &str) -> Option<Arc<Variants>> {
        let shared = self.shared.as_ref()?;
        if shared.recently_removed(key) {
            return None;
        }
        let fetched = shared.get(key, self.max_object_size).await?;
        let mut stored = None;
        self.objects.entry(Arc::from(key)).and_compute_with(|old| {
            // Memory's own variants first: they are at least as new as Redis's.
            let v = Arc::new(match &old {
                Some(e) => merged(
                    &e.value().list,
                    Some(&Variants {
                        list: fetched.into(),
                    }),
                ),
                None => merged(&fetched, None),
            });
            stored = Some(v.clone());
            moka::ops::compute::Op::Put(v)
        });
        let v = stored?;
        self.held.add(i64::from(v.weight(key)), 1);
        Some(v)
    }

    /// Drops every variant of `key`, in the shared tier too (awaited there, within
    /// `[redis] timeout`, so that no miss brings the old copy back from Redis).
    pub(crate) async fn remove(&self, key: &str) {
        self.objects.invalidate(key);
        if let Some(s) = &self.shared {
            s.remove(key).await;
            self.objects.invalidate(key);
        }
    }

    /// Drops every URL `matches` selects; how many.
    pub(crate) fn purge(&self, matches: impl Fn(&str, &Variants) -> bool) -> usize {
        let keys: Vec<Arc<str>> = self
            .objects
            .iter()
            .filter(|(k, v)| matches(k, v))
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in &keys {
            self.objects.invalidate(k);
        }
        keys.len()
    }

    /// URLs held.
    pub(crate) fn urls(&self) -> u64 {
        self.objects.entry_count()
    }

    /// Bytes held (as weighed).
    pub(crate) fn bytes(&self) -> u64 {
        self.objects.weighted_size()
    }

    /// Settles pending evictions (for tests and the admin API's counts).
    pub(crate) fn settle(&self) {
        self.objects.run_pending_tasks();
    }

    /// Leads the fill of `key`, or joins the one in flight.
    pub(crate) fn join(self: &Arc<Self>, key: &Arc<str>) -> Join {
        let entry = self.flights.entry(key.clone()).or_insert_with(|| {
            Arc::new(Flight {
                tx: watch::channel(Outcome::Pending).0,
                waiters: AtomicUsize::new(0),
            })
        });
        if entry.is_fresh() {
            Join::Lead(FlightGuard {
                store: self.clone(),
                key: key.clone(),
                flight: entry.into_value(),
                done: false,
            })
        } else {
            Join::Follow(entry.into_value())
        }
    }
}

impl Flight {
    /// Waits for the fill's outcome: `None` when too many wait already or it took longer than
    /// `lock_timeout` (the waiter then asks the service itself).
    pub(crate) async fn wait(&self, store: &CacheStore) -> Option<Outcome> {
        // Counted while it waits, and no longer once it stops, however it stops (a client
        // that goes away drops this future mid-wait).
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let before = self.waiters.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.waiters);
        if before >= store.max_waiters {
            return None;
        }
        let mut rx = self.tx.subscribe();
        let waited = tokio::time::timeout(
            store.lock_timeout,
            rx.wait_for(|o| !matches!(o, Outcome::Pending)),
        )
        .await;
        match waited {
            Ok(Ok(o)) => Some(o.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(route: &str, identity: Option<&str>, body: &'static str) -> Arc<Object> {
        Arc::new(Object {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
            selected: Box::new([]),
            identity: identity.map(Box::from),
            route: route.into(),
            cc: ResponseDirectives::default(),
            timing: Timing {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::ZERO,
            },
            stored_at: Instant::now(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        })
    }

    #[test]
    fn variants_replace_their_own_and_the_gauges_follow_replacements_and_drops() {
        let metrics = Metrics::new();
        let store = CacheStore::new(&CacheConfig::default(), &metrics, None);
        let key: Arc<str> = "http://x/a".into();
        store.put(&key, object("web/a", None, "one"));
        store.put(&key, object("web/a", None, "two"));
        store.put(&key, object("web/b", None, "other route"));
        store.put(&key, object("web/a", Some("ann"), "ann's"));
        store.settle();
        let v = store.get(&key).unwrap();
        assert_eq!(v.list.len(), 3, "one variant per route and identity");
        let none = HeaderMap::new();
        assert_eq!(v.find("web/a", &none, None).unwrap().body, "two");
        assert_eq!(v.find("web/b", &none, None).unwrap().body, "other route");
        assert_eq!(v.find("web/a", &none, Some("ann")).unwrap().body, "ann's");
        assert!(v.find("web/c", &none, None).is_none());
        assert_eq!(
            u64::try_from(metrics.cache_bytes.get()).unwrap(),
            store.bytes(),
            "replacements are taken out of the gauge"
        );
        assert_eq!(metrics.cache_objects.get(), 1);
        drop(store);
        assert_eq!(
            metrics.cache_bytes.get(),
            0,
            "a dropped store takes its share out"
        );
        assert_eq!(metrics.cache_objects.get(), 0);
    }
}
