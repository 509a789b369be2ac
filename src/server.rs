//! Listeners and connection handling: binds the HTTP listeners and the admin listener, serves
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge, or h2 through ALPN when TLS is on) on each
//! connection, reloads on file changes, and drains in-flight requests on shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{self, ConfigErrors, LoadedConfig};
use crate::conn::Protocols;
use crate::gateway::Live;
use crate::observe::metrics::Metrics;
use crate::worker;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{0}")]
    Config(ConfigErrors),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a worker thread: {0}")]
    Worker(std::io::Error),
}

/// A running gateway.
pub struct Server {
    live: Arc<Live>,
    http_addrs: Vec<SocketAddr>,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// Set after the drain: the workers close what is left and end.
    exit: watch::Sender<bool>,
    workers: Vec<std::thread::JoinHandle<()>>,
    /// One per worker, sent when it has stopped accepting.
    stopped: Vec<oneshot::Receiver<()>>,
    admin_task: JoinHandle<()>,
    watch_task: Option<JoinHandle<()>>,
    /// Set to drain: every connection holds a receiver and drops it when closed.
    drain: watch::Sender<bool>,
}

impl Server {
    /// Loads the config at `config_path` and starts serving it.
    pub async fn start(config_path: &Path) -> Result<Server, StartError> {
        let loaded = config::load(config_path).map_err(StartError::Config)?;
        Self::start_loaded(config_path, loaded).await
    }

    /// Starts serving an already loaded config.
    pub async fn start_loaded(
        config_path: &Path,
        loaded: LoadedConfig,
    ) -> Result<Server, StartError> {
        let server_cfg = loaded.gateway.server.clone();
        let admin_listen = *loaded.gateway.admin.listen.get_ref();
        let metrics = Arc::new(Metrics::new());
        let n_workers = crate::per_worker::count(server_cfg.workers);
        // Before any service is built: each gets a connection pool per worker.
        crate::per_worker::reserve(n_workers);
        let live = Arc::new(Live::new(config_path, loaded, metrics).map_err(StartError::Config)?);

        let mut listeners = Vec::new();
        for addr in server_cfg.listen.to_vec() {
            listeners.push(bind(addr)?);
        }
        let admin_listener = bind(admin_listen)?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: admin_listen,
                source,
            })?;

        // hyper's own caps: twice the head size the dispatcher enforces, and as many header
        // fields as it allows (at least hyper's default, 100).
        let protocols = Arc::new(Protocols::new(
            server_cfg.header_read_timeout.get(),
            server_cfg.keep_alive_timeout.get(),
            usize::try_from(server_cfg.max_request_head.0)
                .unwrap_or(usize::MAX / 2)
                .saturating_mul(2),
            server_cfg.max_header_count,
        ));

        let (stop, stop_rx) = watch::channel(false);
        let (exit, exit_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(false);
        let mut http_addrs = Vec::new();
        let mut std_listeners = Vec::new();
        for listener in listeners {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: admin_listen,
                source,
            })?;
            http_addrs.push(addr);
            tracing::info!(%addr, "listening");
            let l = listener
                .into_std()
                .map_err(|source| StartError::Bind { addr, source })?;
            std_listeners.push((addr, l));
        }
        let shared = worker::Shared {
            live: live.clone(),
            protocols,
            drain: drain_rx,
            stop: stop_rx.clone(),
            exit: exit_rx,
        };
        let mut workers = Vec::new();
        let mut stopped = Vec::new();
        for n in 1..=n_workers {
            // Visible (at 0) from the start, for every worker.
            live.metrics
                .connections_total
                .with_label_values(&[&n.to_string()]);
            let mut own = Vec::new();
            for (addr, l) in &std_listeners {
                own.push(l.try_clone().map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?);
            }
            let (tx, rx) = oneshot::channel();
            let handle = worker::spawn(n, own, shared.clone(), tx).map_err(StartError::Worker)?;
            workers.push(handle);
            stopped.push(rx);
        }
        drop(shared);
        tracing::info!(workers = n_workers, "workers started");
        let admin_task = tokio::spawn(crate::admin::serve(
            admin_listener,
            live.clone(),
            stop_rx.clone(),
        ));
        tracing::info!(addr = %admin_addr, "admin listening");
        let watch_task = live.watch_dirs().and_then(|dirs| {
            match config::watch::watch(&dirs, Duration::from_millis(250)) {
                Ok(mut w) => {
                    let live = live.clone();
                    Some(tokio::spawn(async move {
                        while w.changed().await {
                            let _ = live.reload("file-watch").await;
                        }
                    }))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch the config files; reload with SIGHUP or POST /admin/reload");
                    None
                }
            }
        });
        live.ready.store(true, std::sync::atomic::Ordering::Release);
        Ok(Server {
            live,
            http_addrs,
            admin_addr,
            stop,
            exit,
            workers,
            stopped,
            admin_task,
            watch_task,
            drain,
        })
    }

    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// The bound HTTP addresses (useful when the config says port 0).
    pub fn http_addrs(&self) -> &[SocketAddr] {
        &self.http_addrs
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, lets in-flight requests finish within `[server] shutdown_grace`, then
    /// closes what is left. Returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.live
            .ready
            .store(false, std::sync::atomic::Ordering::Release);
        let _ = self.stop.send(true);
        if let Some(w) = &self.watch_task {
            w.abort();
        }
        for s in self.stopped {
            let _ = s.await;
        }
        let grace = self.live.startup_shutdown_grace();
        // Broker → HTTP bridges stop fetching and finish their deliveries, like the requests.
        let snapshot = self.live.snapshot();
        let bridges = snapshot.consumers.iter().map(|c| c.drain(grace));
        futures_util::future::join_all(bridges).await;
        drop(snapshot);
        let _ = self.drain.send(true);
        let drained = tokio::time::timeout(grace, self.drain.closed())
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                ?grace,
                "shutdown grace period over; closing the remaining connections"
            );
        }
        let _ = self.exit.send(true);
        let workers = self.workers;
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        let _ = self.admin_task.await;
        drained
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}
