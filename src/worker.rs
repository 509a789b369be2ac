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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::conn::Protocols;
use crate::dispatch::Dispatcher;
use crate::gateway::Live;

/// Everything a worker needs; shared by all of them.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) live: Arc<Live>,
    pub(crate) protocols: Arc<Protocols>,
    /// Turns true to drain; each connection holds a clone until it closes.
    pub(crate) drain: watch::Receiver<bool>,
    /// Set to stop accepting.
    pub(crate) stop: watch::Receiver<bool>,
    /// Set (or dropped) to end the worker: its remaining connections are closed.
    pub(crate) exit: watch::Receiver<bool>,
}

/// Starts worker `n` (from 1) on `listeners`, each a clone of a bound listener. `stopped` is
/// sent once the worker has stopped accepting (after `stop`).
pub(crate) fn spawn(
    n: usize,
    listeners: Vec<std::net::TcpListener>,
    shared: Shared,
    stopped: oneshot::Sender<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("gatehouse-w{n}"))
        .spawn(move || {
            crate::per_worker::enter(n);
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
                        Ok(l) => loops.push(tokio::spawn(accept_loop(
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

/// Accepts connections on one listener until `stop`, serving each on this worker.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    live: Arc<Live>,
    protocols: Arc<Protocols>,
    drain: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // Resolved once: counting a connection is then one atomic add.
    let accepted = live
        .metrics
        .connections_total
        .with_label_values(&[&crate::per_worker::slot().to_string()]);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let max = live.max_connections;
        if max > 0 && live.connections.load(std::sync::atomic::Ordering::Relaxed) >= max {
            // Over [server] max_connections: close at once rather than queue.
            tracing::debug!(%peer, max, "connection refused: max_connections reached");
            drop(stream);
            continue;
        }
        accepted.inc();
        let _ = stream.set_nodelay(true);
        let drain = drain.clone();
        let live = live.clone();
        let protocols = protocols.clone();
        live.connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let counted = live.clone();
            serve_connection(stream, peer, live, &protocols, drain).await;
            counted
                .connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    live: Arc<Live>,
    protocols: &Protocols,
    drain: watch::Receiver<bool>,
) {
    match live.snapshot().tls.clone() {
        None => {
            let svc = Dispatcher::new(live, peer, false);
            crate::conn::serve(stream, svc, protocols, false, drain).await
        }
        // Boxed: a plain connection's task (which lives as long as the connection, parked or
        // not) should not be sized for a TLS handshake and session.
        Some(cfg) => Box::pin(serve_tls(stream, peer, cfg, live, protocols, drain)).await,
    }
}

async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: Arc<rustls::ServerConfig>,
    live: Arc<Live>,
    protocols: &Protocols,
    drain: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let tls_stream =
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let svc = Dispatcher::new(live, peer, true);
    crate::conn::serve(tls_stream, svc, protocols, h2, drain).await;
}
