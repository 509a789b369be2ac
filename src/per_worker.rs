//! Per-worker state: the one documented way to keep one instance of something per worker
//! thread (upstream connection pools today; Lua VMs and other state that must not be shared
//! across workers next). Each worker thread has a slot number (`slot()`: 0 outside the
//! workers, that is the control plane and tests; `n` in worker `n`, from 1); a `PerWorker<T>`
//! holds one lazily built `T` per slot, so each worker only ever touches its own and never
//! contends with another. State that must be private to a thread and is not `Send` can use a
//! `thread_local!` keyed the same way (as `upstream::pool` does for its idle lists).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// This thread's slot.
pub(crate) fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// Makes the calling thread worker `n` (from 1). Called once by each worker thread at start.
pub(crate) fn enter(n: usize) {
    SLOT.with(|s| s.set(n));
}

/// How many workers `[server] workers` asks for: 0 means one per CPU this process may use.
pub(crate) fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Slots every `PerWorker` made from now on gets: one per worker plus one for the control plane.
static SLOTS: AtomicUsize = AtomicUsize::new(0);

/// Makes room for `workers` workers in per-worker state built from now on.
pub(crate) fn reserve(workers: usize) {
    SLOTS.fetch_max(workers + 1, Ordering::Relaxed);
}

fn slots() -> usize {
    match SLOTS.load(Ordering::Relaxed) {
        0 => count(0) + 1,
        n => n,
    }
}

/// One `T` per worker, each built on first use by its own thread.
pub(crate) struct PerWorker<T> {
    make: Box<dyn Fn() -> T + Send + Sync>,
    slots: Box<[OnceLock<T>]>,
}

impl<T> PerWorker<T> {
    pub(crate) fn new(make: impl Fn() -> T + Send + Sync + 'static) -> Self {
        PerWorker {
            make: Box::new(make),
            slots: (0..slots()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The calling thread's instance. Threads beyond the reserved slots share one (correct,
    /// only not thread-local).
    pub(crate) fn get(&self) -> &T {
        let slot = &self.slots[slot() % self.slots.len()];
        slot.get_or_init(|| (self.make)())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    #[test]
    fn each_worker_gets_its_own_instance_built_once() {
        reserve(2);
        let built = Arc::new(AtomicU32::new(0));
        let b = built.clone();
        let pw = Arc::new(PerWorker::new(move || {
            b.fetch_add(1, Ordering::Relaxed) + 1
        }));
        let here = *pw.get();
        assert_eq!(*pw.get(), here, "the same thread gets the same instance");
        let ids: Vec<u32> = (1..=2)
            .map(|n| {
                let pw = pw.clone();
                std::thread::spawn(move || {
                    enter(n);
                    (*pw.get(), *pw.get())
                })
                .join()
                .unwrap()
            })
            .map(|(a, b)| {
                assert_eq!(a, b);
                a
            })
            .collect();
        assert_ne!(ids[0], ids[1]);
        assert!(!ids.contains(&here));
        assert_eq!(built.load(Ordering::Relaxed), 3);
    }
}
