//! The in-memory store: `governor`'s GCRA, one limiter per window, over a bounded keyed state
//! store of our own (`BoundedStore`): a `moka` cache of each key's window states. Memory is
//! bounded by `max_keys` (the least used keys are evicted beyond it, so a flood of new keys
//! cannot push out the hot ones), and a key idle for a full refill of its longest window is
//! dropped (its state is then the same as a new key's).

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use super::{Outcome, WindowState, Windows};

/// The time of the limiters: tokio's clock (so tests can pause it), as a duration since the
/// store was made.
#[derive(Clone)]
pub(crate) struct TokioClock {
    base: tokio::time::Instant,
}

impl TokioClock {
    fn new() -> Self {
        TokioClock {
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.base)
    }
}

/// One key's state in one window: the key's states (a GCRA theoretical arrival time each, in
/// nanoseconds since the limiter's start; 0 for none yet), the window's index, and whether the
/// check only asks (`peek`) or also counts.
#[derive(Clone)]
pub(crate) struct Slot {
    states: Arc<[AtomicU64]>,
    window: usize,
    peek: bool,
}

impl PartialEq for Slot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.states, &other.states) && self.window == other.window
    }
}
impl Eq for Slot {}
impl Hash for Slot {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.window.hash(h);
    }
}

/// The keyed state store governor's limiters update. The state is in the key itself (looked
/// up once per request for all windows), so this store only applies the update: a
/// compare-and-swap loop, as governor's own in-memory state does, or nothing for a `peek`.
pub(crate) struct SlotStore;

impl StateStore for SlotStore {
    type Key = Slot;
    fn measure_and_replace<T, F, E>(&self, key: &Slot, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let Some(cell) = key.states.get(key.window) else {
            // A slot is always made with one state per window.
            return f(None).map(|(t, _)| t);
        };
        let read = |v: u64| (v != 0).then(|| Nanos::new(v));
        let mut prev = cell.load(Ordering::Acquire);
        loop {
            let (result, next) = f(read(prev))?;
            if key.peek {
                return Ok(result);
            }
            match cell.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(now) => prev = now,
            }
        }
    }
}

type WindowLimiter = RateLimiter<Slot, SlotStore, TokioClock, StateInformationMiddleware>;

/// An in-memory limiter of one policy: its windows, and each key's states.
pub(crate) struct LocalStore<K: Hash + Eq + Clone + Send + Sync + 'static> {
    windows: Box<[(WindowLimiter, Duration, u32)]>,
    /// Keyed by a seeded xxHash: SipHash (std's) cost ~300 instructions a request here, and
    /// a per-process random seed keeps a client from choosing keys that collide.
    keys: moka::sync::Cache<K, Arc<[AtomicU64]>, twox_hash::xxhash64::State>,
    clock: TokioClock,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> LocalStore<K> {
    /// `windows`: (steady interval, burst) each, already checked.
    pub(crate) fn new(windows: &Windows, max_keys: u64) -> Self {
        let clock = TokioClock::new();
        let mut idle = Duration::from_secs(1);
        let limiters = windows
            .iter()
            .filter_map(|w| {
                let burst = std::num::NonZeroU32::new(w.burst)?;
                let quota = Quota::with_period(w.interval)?.allow_burst(burst);
                idle = idle.max(w.interval.saturating_mul(w.burst));
                let limiter = RateLimiter::<
                    Slot,
                    SlotStore,
                    TokioClock,
                    governor::middleware::NoOpMiddleware<Duration>,
                >::new(quota, SlotStore, clock.clone())
                .with_middleware::<StateInformationMiddleware>();
                Some((limiter, w.interval, w.burst))
            })
            .collect();
        LocalStore {
            windows: limiters,
            keys: moka::sync::Cache::builder()
                .max_capacity(max_keys)
                .time_to_idle(idle + Duration::from_secs(1))
                .build_with_hasher(twox_hash::xxhash64::State::with_seed(fastrand::u64(..))),
            clock,
        }
    }

    /// Admits the request when every window does, and then counts it in each; a refused
    /// request counts in none, and waits for the last window to admit it.
    pub(crate) fn check(&self, key: &K) -> Outcome {
        let n = self.windows.len();
        let states = self
            .keys
            .get_with_by_ref(key, || (0..n).map(|_| AtomicU64::new(0)).collect());
        let slot = |window, peek| Slot {
            states: states.clone(),
            window,
            peek,
        };
        let mut out = Outcome::admitted();
        if n > 1 {
            // First ask every window, counting nothing.
            let mut wait = None;
            for (i, (limiter, _, _)) in self.windows.iter().enumerate() {
                if let Err(not_until) = limiter.check_key(&slot(i, true)) {
                    let w = not_until.wait_time_from(self.clock.now());
                    wait = Some(wait.map_or(w, |m: Duration| m.max(w)));
                }
            }
            if let Some(wait) = wait {
                return self.refused(&states, wait);
            }
        }
        for (i, (limiter, interval, burst)) in self.windows.iter().enumerate() {
            match limiter.check_key(&slot(i, false)) {
                Ok(snapshot) => {
                    let remaining = snapshot.remaining_burst_capacity();
                    let reset = interval.saturating_mul(burst.saturating_sub(remaining));
                    out.push(WindowState { remaining, reset });
                }
                // The only window, or a window another request of the key took since it was
                // asked (the windows before it have counted this one).
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    return self.refused(&states, wait);
                }
            }
        }
        out
    }

    /// What `check` would say, counting nothing (a route with several policies asks each
    /// first). The windows' states are what is left, this request not counted.
    pub(crate) fn peek(&self, key: &K) -> Outcome {
        let n = self.windows.len();
        let states = self
            .keys
            .get_with_by_ref(key, || (0..n).map(|_| AtomicU64::new(0)).collect());
        let mut wait = None;
        for (i, (limiter, _, _)) in self.windows.iter().enumerate() {
            let slot = Slot {
                states: states.clone(),
                window: i,
                peek: true,
            };
            if let Err(not_until) = limiter.check_key(&slot) {
                let w = not_until.wait_time_from(self.clock.now());
                wait = Some(wait.map_or(w, |m: Duration| m.max(w)));
            }
        }
        let mut out = self.refused(&states, wait.unwrap_or_default());
        if wait.is_none() {
            out.admitted = true;
            out.retry_after = Duration::ZERO;
        }
        out
    }

    /// A refusal, with each window's state as the headers show it.
    fn refused(&self, states: &Arc<[AtomicU64]>, wait: Duration) -> Outcome {
        let mut out = Outcome::admitted();
        out.refuse(wait);
        for (i, (limiter, interval, burst)) in self.windows.iter().enumerate() {
            let slot = Slot {
                states: states.clone(),
                window: i,
                peek: true,
            };
            let state = match limiter.check_key(&slot) {
                // What is left, this request not counted.
                Ok(snapshot) => {
                    let remaining = (snapshot.remaining_burst_capacity() + 1).min(*burst);
                    WindowState {
                        remaining,
                        reset: interval.saturating_mul(burst.saturating_sub(remaining)),
                    }
                }
                Err(not_until) => WindowState {
                    remaining: 0,
                    reset: not_until.wait_time_from(self.clock.now()),
                },
            };
            out.push(state);
        }
        out
    }

    /// Keys held now (after pending evictions are applied).
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.keys.run_pending_tasks();
        self.keys.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Window;
    use super::*;

    fn store(windows: &[(u64, u32)]) -> LocalStore<u32> {
        let w: Windows = windows
            .iter()
            .map(|&(ms, burst)| Window {
                interval: Duration::from_millis(ms),
                burst,
                label: String::new().into(),
            })
            .collect();
        LocalStore::new(&w, 1000)
    }

    fn admitted(s: &LocalStore<u32>, key: u32, n: usize) -> usize {
        (0..n).filter(|_| s.check(&key).admitted).count()
    }

    /// 10 per second with a burst of 3: three at once, then one per 100 ms.
    #[tokio::test(start_paused = true)]
    async fn burst_then_the_steady_rate() {
        let s = store(&[(100, 3)]);
        assert_eq!(admitted(&s, 1, 10), 3);
        let refused = s.check(&1);
        assert!(!refused.admitted);
        assert_eq!(refused.retry_after, Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(admitted(&s, 1, 10), 1);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(admitted(&s, 1, 10), 2);
        // Another key has its own budget.
        assert_eq!(admitted(&s, 2, 10), 3);
        // A full refill restores the whole burst, never more.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(admitted(&s, 1, 10), 3);
    }

    /// Two windows: 1 per 100 ms (burst 2) and 5 per 10 s. The second is a quota: once it is
    /// spent, the first refills in vain until the second does.
    #[tokio::test(start_paused = true)]
    async fn two_windows_all_must_admit() {
        let s = store(&[(100, 2), (2000, 5)]);
        assert_eq!(admitted(&s, 7, 10), 2);
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(admitted(&s, 7, 10), 2);
        tokio::time::advance(Duration::from_millis(300)).await;
        // The quota has 1 left (5 - 4 + what 600 ms refilled of one per 2 s: nothing).
        assert_eq!(admitted(&s, 7, 10), 1);
        let out = s.check(&7);
        assert!(!out.admitted);
        // The quota refills one every 2 s from the first request: the next at 2 s.
        assert_eq!(out.retry_after, Duration::from_millis(1400));
        tokio::time::advance(Duration::from_millis(1400)).await;
        assert_eq!(admitted(&s, 7, 10), 1);
        assert!(!s.check(&7).admitted);
    }

    #[tokio::test(start_paused = true)]
    async fn headers_state_counts_down() {
        let s = store(&[(1000, 3)]);
        let a = s.check(&1);
        assert_eq!(a.windows()[0].remaining, 2);
        assert_eq!(a.windows()[0].reset, Duration::from_secs(1));
        let b = s.check(&1);
        assert_eq!(b.windows()[0].remaining, 1);
        assert_eq!(b.windows()[0].reset, Duration::from_secs(2));
    }

    /// A flood of new keys cannot grow memory past `max_keys`, and does not evict a hot key.
    #[tokio::test]
    async fn a_flood_of_keys_is_bounded() {
        // An hour per request: the hot key cannot refill while the flood runs.
        let s = store(&[(3_600_000, 2)]);
        for _ in 0..20 {
            s.check(&0);
        }
        // The flood, while the hot key keeps being used (as a client in use is).
        for k in 1..50_000 {
            s.check(&k);
            if k % 50 == 0 {
                s.check(&0);
            }
        }
        let len = s.len();
        assert!(len <= 1000, "{len} keys held for max_keys = 1000");
        // The hot key kept its spent budget.
        assert!(!s.check(&0).admitted);
    }
}
