//! A service's connection pools, one per worker thread (`crate::worker`). A worker only ever
//! uses its own pool, so a pooled connection is driven by the thread that sends on it and a
//! checkout contends with nobody. Each pool is built on first use by its thread.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::HttpClient;

/// Pool slots every new service gets: one per worker plus one for the control plane.
static SLOTS: AtomicUsize = AtomicUsize::new(0);

/// Makes room for `workers` workers in services built from now on.
pub fn reserve(workers: usize) {
    SLOTS.fetch_max(workers + 1, Ordering::Relaxed);
}

fn slots() -> usize {
    match SLOTS.load(Ordering::Relaxed) {
        0 => crate::worker::count(0) + 1,
        n => n,
    }
}

pub struct Clients {
    make: Box<dyn Fn() -> HttpClient + Send + Sync>,
    pools: Box<[OnceLock<HttpClient>]>,
}

impl Clients {
    pub fn new(make: impl Fn() -> HttpClient + Send + Sync + 'static) -> Self {
        Clients {
            make: Box::new(make),
            pools: (0..slots()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The calling thread's pool. Threads beyond the reserved slots share one (correct, only
    /// not thread-local).
    pub fn get(&self) -> &HttpClient {
        let pool = &self.pools[crate::worker::slot() % self.pools.len()];
        pool.get_or_init(|| (self.make)())
    }
}
