//! Data-plane workers, one thread per core. Each worker runs its own single-threaded event loop
//! (a current-thread tokio runtime), accepts from the shared listeners and serves each of its
//! connections from start to end; each has its own upstream connection pools
//! (`Upstream::client`). A request therefore never crosses threads: no lock, no cross-thread
//! wake-up. The control plane (admin API, reloads, discovery, health checks) runs on the main
//! runtime, outside the workers.
//!
//! A multi-threaded runtime measured ~35% more CPU per proxied request on one core than this
//! (bench/README.md): its idle worker parks and is woken through the scheduler, and each wake-up
//! let the upstream preempt the gateway.

use std::cell::Cell;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::conn::Protocols;
use crate::gateway::Live;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// This thread's slot for per-worker state: 0 outside the workers (control plane, tests), `n`
/// in worker `n` (from 1).
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// How many workers `[server] workers` asks for: 0 means one per CPU this process may use.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Everything a worker needs; shared by all of them.
#[derive(Clone)]
pub struct Shared {
    pub live: Arc<Live>,
    pub protocols: Arc<Protocols>,
    /// Turns true to drain; each connection holds a clone until it closes.
    pub drain: watch::Receiver<bool>,
    /// Set to stop accepting.
    pub stop: watch::Receiver<bool>,
    /// Set (or dropped) to end the worker: its remaining connections are closed.
    pub exit: watch::Receiver<bool>,
}

/// Starts worker `n` (from 1) on `listeners`, each a clone of a bound listener. `stopped` is
/// sent once the worker has stopped accepting (after `stop`).
pub fn spawn(
    n: usize,
    listeners: Vec<std::net::TcpListener>,
    shared: Shared,
    stopped: oneshot::Sender<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("gatehouse-w{n}"))
        .spawn(move || {
            SLOT.with(|s| s.set(n));
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(worker = n, error = %e, "cannot start a worker's event loop");
                    return;
                }
            };
            rt.block_on(async move {
                let Shared {
                    live,
                    protocols,
                    drain,
                    stop,
                    mut exit,
                } = shared;
                let mut loops = Vec::new();
                for l in listeners {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => loops.push(tokio::spawn(crate::server::accept_loop(
                            l,
                            live.clone(),
                            protocols.clone(),
                            drain.clone(),
                            stop.clone(),
                        ))),
                        Err(e) => {
                            tracing::error!(worker = n, error = %e, "cannot use a listener")
                        }
                    }
                }
                // Idle upstream connections of this worker past their timeout get closed.
                tokio::spawn(async {
                    let mut every = tokio::time::interval(crate::upstream::pool::SWEEP_EVERY);
                    loop {
                        every.tick().await;
                        crate::upstream::pool::sweep();
                    }
                });
                // The drain waits for every receiver of `drain` but the connections' to be gone.
                drop(drain);
                for l in loops {
                    let _ = l.await;
                }
                let _ = stopped.send(());
                // Connections keep being served after `stop`, until the drain is over.
                let _ = exit.wait_for(|v| *v).await;
            });
        })
}
