//! The `Gateway` snapshot — everything one config generation needs to serve requests, immutable
//! once built — and `Live`, which holds the snapshot in use behind an `ArcSwap` and replaces it on
//! reload. A request loads the snapshot once and keeps it to the end, so in-flight requests finish
//! on the config they started with.

mod compile;
mod services;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;

pub(crate) use compile::compile;

/// Loads the config files and compiles them, reporting the errors of both steps together:
/// a route file that does not parse does not hide the mistakes of the others.
pub fn load_and_compile(
    config_path: &Path,
    previous: Option<&Gateway>,
    metrics: &Metrics,
    generation: u64,
) -> Result<Gateway, ConfigErrors> {
    let (loaded, mut errors) = config::load_partial(config_path);
    if !loaded.gateway_ok {
        // Without gateway.toml, route checks would only report services as unknown.
        return Err(errors);
    }
    match compile(loaded, previous, metrics, generation) {
        Ok(g) if errors.is_empty() => Ok(g),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.0.extend(more.0);
            Err(errors)
        }
    }
}

use crate::config::{self, ConfigErrors, ConfigView, LoadedConfig};
use crate::observe::metrics::{Metrics, RouteMetrics};
use crate::resources::Resources;
use crate::route::Route;
use crate::routing::Router;
use crate::upstream::Upstream;

/// One compiled config generation.
pub struct Gateway {
    pub(crate) generation: u64,
    /// The effective config as `/admin/config` shows it (rendered, secrets masked).
    pub(crate) config: Arc<ConfigView>,
    pub(crate) router: Router,
    /// Indexed by the router's route index.
    pub(crate) routes: Vec<Route>,
    pub(crate) services: BTreeMap<String, Arc<Upstream>>,
    /// The `[brokers.*]` connections (for `/readyz`).
    pub(crate) brokers: BTreeMap<String, Arc<crate::upstream::broker::Broker>>,
    /// The `[[consumer]]` bridges running (drained on shutdown).
    pub(crate) consumers: Vec<Arc<crate::bridge::Consumer>>,
    /// Everything stateful this snapshot uses (services' upstreams, …), reused by the next
    /// snapshot where its definition is unchanged.
    pub(crate) resources: Resources,
    pub(crate) settings: Settings,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Metrics for requests that match no route.
    pub(crate) unmatched: Arc<RouteMetrics>,
    /// `[admin] token`: required by the admin API when set.
    pub(crate) admin_token: Option<Arc<str>>,
}

impl Gateway {
    pub fn frontend_count(&self) -> usize {
        self.config.frontend_count
    }

    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }
}

/// Server settings the request path reads.
pub(crate) struct Settings {
    /// Limits and checks of the request head.
    pub(crate) head: crate::routing::head::Limits,
    pub(crate) trusted_proxies: Arc<[ipnet::IpNet]>,
    /// `[server] ip_rate_limit`.
    pub(crate) ip_guard: Option<Arc<crate::layers::rate_limit::build::IpGuard>>,
    pub(crate) access_log: bool,
}

impl Settings {
    pub(crate) fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

/// Settings that only take effect at start; a reload that changes them says so.
#[derive(Debug, Clone, PartialEq)]
struct StartupSettings {
    listen: Vec<SocketAddr>,
    admin: SocketAddr,
    /// Format and filter; `access_log` is read per request and changes on reload.
    log: (crate::config::LogFormat, String),
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    shutdown_grace: Duration,
    routes_dir: PathBuf,
    watch: bool,
    limits: (usize, usize),
    workers: usize,
    /// hyper's caps are made from these at start.
    head_caps: (u64, usize),
}

impl StartupSettings {
    fn of(c: &LoadedConfig) -> Self {
        let g = &c.gateway;
        StartupSettings {
            listen: g.server.listen.to_vec(),
            admin: *g.admin.listen.get_ref(),
            log: (g.log.format, g.log.filter.get_ref().clone()),
            header_read_timeout: g.server.header_read_timeout.get(),
            keep_alive_timeout: g.server.keep_alive_timeout.get(),
            shutdown_grace: g.server.shutdown_grace.get(),
            routes_dir: c.routes_dir(),
            watch: g.routes.watch,
            limits: (g.server.max_concurrent_requests, g.server.max_connections),
            workers: g.server.workers,
            head_caps: (g.server.max_request_head.0, g.server.max_header_count),
        }
    }

    fn differences(&self, other: &StartupSettings) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |changed: bool, key: &str| {
            if changed {
                out.push(key.to_owned());
            }
        };
        check(self.listen != other.listen, "server.listen");
        check(self.admin != other.admin, "admin.listen");
        check(self.log.0 != other.log.0, "log.format");
        check(self.log.1 != other.log.1, "log.filter");
        check(
            self.header_read_timeout != other.header_read_timeout,
            "server.header_read_timeout",
        );
        check(
            self.keep_alive_timeout != other.keep_alive_timeout,
            "server.keep_alive_timeout",
        );
        check(
            self.shutdown_grace != other.shutdown_grace,
            "server.shutdown_grace",
        );
        check(
            self.routes_dir != other.routes_dir,
            "routes.dir (for file watching)",
        );
        check(self.watch != other.watch, "routes.watch");
        check(
            self.limits.0 != other.limits.0,
            "server.max_concurrent_requests",
        );
        check(self.limits.1 != other.limits.1, "server.max_connections");
        check(self.workers != other.workers, "server.workers");
        check(
            self.head_caps != other.head_caps,
            "server.max_request_head / max_header_count (hyper's hard caps made from them are set at start)",
        );
        out
    }
}

/// The outcome of the last reload, for `/admin/config`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReloadStatus {
    pub(crate) generation: u64,
    pub(crate) result: &'static str,
    pub(crate) trigger: String,
    pub(crate) at_unix: u64,
    pub(crate) errors: Vec<String>,
    /// Changed settings that keep their old value until the gateway restarts.
    pub(crate) restart_required: Vec<String>,
}

/// The gateway in service: the live snapshot and what replaces it.
pub struct Live {
    current: ArcSwap<Gateway>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config_path: PathBuf,
    startup: StartupSettings,
    status: Mutex<ReloadStatus>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Set once the listeners are up.
    pub(crate) ready: AtomicBool,
    /// `[server] max_concurrent_requests` (fixed at start).
    pub(crate) request_limit: Option<Arc<tokio::sync::Semaphore>>,
    /// `[server] max_connections` (fixed at start) and the connections open now.
    pub(crate) max_connections: usize,
    pub(crate) connections: std::sync::atomic::AtomicUsize,
    /// The folders of `[protos]` and `[plugins]` at start, watched beside the config's.
    proto_dirs: Vec<PathBuf>,
}

impl Live {
    /// Compiles the first generation.
    pub(crate) fn new(
        config_path: &Path,
        loaded: LoadedConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Live, ConfigErrors> {
        let startup = StartupSettings::of(&loaded);
        let mut proto_dirs = crate::backend::grpc::proto_dirs(&loaded);
        // The plugins folder is watched beside them (when it exists at start).
        let plugins = loaded.resolve(&loaded.gateway.plugins.dir);
        if plugins.is_dir() {
            proto_dirs.push(plugins);
        }
        let server = &loaded.gateway.server;
        let request_limit = (server.max_concurrent_requests > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(server.max_concurrent_requests)));
        let max_connections = server.max_connections;
        let gateway = compile(loaded, None, &metrics, 1)?;
        metrics.config_generation.set(1);
        Ok(Live {
            current: ArcSwap::from_pointee(gateway),
            metrics,
            config_path: config_path.to_path_buf(),
            startup,
            status: Mutex::new(ReloadStatus {
                generation: 1,
                result: "initial",
                trigger: "start".into(),
                at_unix: unix_now(),
                errors: Vec::new(),
                restart_required: Vec::new(),
            }),
            reload_lock: tokio::sync::Mutex::new(()),
            proto_dirs,
            ready: AtomicBool::new(false),
            request_limit,
            max_connections,
            connections: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The snapshot in use. Hold the `Arc` for as long as the request needs it.
    pub(crate) fn snapshot(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn startup_shutdown_grace(&self) -> Duration {
        self.startup.shutdown_grace
    }

    pub(crate) fn watch_dirs(&self) -> Option<Vec<PathBuf>> {
        if !self.startup.watch {
            return None;
        }
        let root = self
            .config_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut dirs = vec![root, self.startup.routes_dir.clone()];
        for d in &self.proto_dirs {
            if !dirs.contains(d) {
                dirs.push(d.clone());
            }
        }
        Some(dirs)
    }

    /// Loads and compiles the config files again and swaps the result in. On any error the
    /// running config stays in service and the errors are logged, counted and kept for
    /// `/admin/config`.
    pub async fn reload(&self, trigger: &str) -> Result<u64, ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .unwrap_or_else(|e| {
                Err(ConfigErrors(vec![config::ConfigError::file(
                    &self.config_path,
                    format!("loading panicked: {e}"),
                )]))
            });
        let prev = self.snapshot();
        let generation = prev.generation + 1;
        let outcome = loaded.and_then(|l| {
            let restart = self.startup.differences(&StartupSettings::of(&l));
            compile(l, Some(&prev), &self.metrics, generation).map(|g| (g, restart))
        });
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok((gateway, restart)) => {
                self.current.store(Arc::new(gateway));
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.config_generation.set(generation as i64);
                for key in &restart {
                    tracing::warn!(setting = %key, "config changed a setting that only takes effect after a restart");
                }
                tracing::info!(generation, trigger, "config reloaded");
                *status = ReloadStatus {
                    generation,
                    result: "success",
                    trigger: trigger.to_owned(),
                    at_unix: unix_now(),
                    errors: Vec::new(),
                    restart_required: restart,
                };
                Ok(generation)
            }
            Err(errors) => {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["failure"])
                    .inc();
                for e in &errors.0 {
                    tracing::error!(trigger, "config rejected: {e}");
                }
                tracing::warn!(
                    generation = prev.generation,
                    "the previous config keeps serving"
                );
                *status = ReloadStatus {
                    generation: prev.generation,
                    result: "failure",
                    trigger: trigger.to_owned(),
                    at_unix: unix_now(),
                    errors: errors.0.iter().map(ToString::to_string).collect(),
                    restart_required: Vec::new(),
                };
                Err(errors)
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
