//! Lua plugins (`plugins/NAME.lua`, named by frontends and routes in `plugins = […]`, set up by
//! `plugin_config.NAME = { … }`). A script returns a table of phase functions:
//! `on_request(req, ctx)` before the backend (it may change the method-less parts of the
//! request — headers, path, query — or answer by returning `{ status, body, headers }`),
//! `on_response(res, ctx)` (status and headers) and `on_log(ctx)` at the end; `read_body = true`
//! gives `req.body` (bodies up to `[plugins] max_body`).
//!
//! `PluginSet` is the folder's scripts, checked at compile (a syntax error, a script that does
//! not return phase functions: located at `path:line`) and kept as a resource across reloads
//! while the folder and `[plugins]` are unchanged. Each worker runs them in its own sandboxed
//! VM (`vm.rs`); the API they see is `api.rs`. A use of a plugin by a route is a `PluginLayer`.
//! An error, the time budget or the memory limit in a call answers 500 `plugin_error` (naming
//! the plugin) with an ERROR log line — or, with `on_error = "skip"` in its `plugin_config`,
//! goes on as if the plugin were not there.

mod api;
mod call;
pub mod rust;
mod vm;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceExt};

use crate::backend::RespBody;
use crate::body::{req_full, ReqBody};
use crate::config::{ConfigErrors, LoadedConfig, PluginsConfig};
use crate::context::Exchange;
use crate::error::{BoxError, Problem};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;

/// A folder of scripts, checked.
pub(crate) struct PluginSet {
    /// Unique per built set: a worker's VM is for one set.
    id: u64,
    scripts: BTreeMap<Arc<str>, Script>,
    memory_limit: usize,
    time_budget: Duration,
    max_body: usize,
    pub(crate) dir: PathBuf,
}

/// One `NAME.lua`.
pub(crate) struct Script {
    name: Arc<str>,
    path: PathBuf,
    code: Arc<str>,
    read_body: bool,
    /// Which of on_request, on_response, on_log it has.
    phases: [bool; 3],
}

impl PluginSet {
    pub(crate) fn names(&self) -> Vec<&str> {
        self.scripts.keys().map(|k| &**k).collect()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.scripts.contains_key(name)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Ids of uses (a VM keeps each use's `ctx` table under it).
static NEXT_USE: AtomicU64 = AtomicU64::new(1);

/// What decides whether a set is rebuilt: `[plugins]` and every script's name and text.
#[derive(Clone, PartialEq)]
struct Key(PluginsConfig, Vec<(String, String)>);

/// Reads and checks `[plugins] dir`. A missing folder is an empty set (a route naming a
/// plugin then gets "unknown plugin").
pub(crate) fn build_plugins(
    loaded: &LoadedConfig,
    previous: Option<&Resources>,
    resources: &mut Resources,
    errors: &mut ConfigErrors,
) -> Option<Arc<PluginSet>> {
    let cfg = &loaded.gateway.plugins;
    let dir = loaded.resolve(&cfg.dir);
    let mut files = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "lua") && p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut texts = Vec::new();
    let before = errors.0.len();
    for p in &files {
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            errors.push(crate::config::source::ConfigError::file(
                p,
                format!("plugin file name `{name}.lua`: a plugin's name may hold only letters, digits, `-` and `_`"),
            ));
            continue;
        }
        match std::fs::read_to_string(p) {
            Ok(code) => texts.push((name, code)),
            Err(e) => errors.push(crate::config::source::ConfigError::file(
                p,
                format!("cannot read the plugin: {e}"),
            )),
        }
    }
    let memory_limit = usize::try_from(cfg.memory_limit.0).unwrap_or(usize::MAX);
    let mut scripts = BTreeMap::new();
    for ((name, code), path) in texts.iter().zip(&files) {
        let mut s = Script {
            name: Arc::from(name.as_str()),
            path: shown_path(loaded, path),
            code: code.as_str().into(),
            read_body: false,
            phases: [false; 3],
        };
        match vm::check(&s, memory_limit) {
            Ok((read_body, phases)) => {
                s.read_body = read_body;
                s.phases = phases;
                s.path = path.clone();
                scripts.insert(Arc::from(name.as_str()), s);
            }
            Err(msg) => errors.push(located(path, &s.path, &msg)),
        }
    }
    if errors.0.len() != before {
        return None;
    }
    // All of them in one VM, as a worker runs them (their memory together, say).
    if let Err(msg) = vm::build_scripts(scripts.values(), memory_limit) {
        errors.push(crate::config::source::ConfigError::file(
            &dir,
            format!("plugins: {msg}"),
        ));
        return None;
    }
    let key = Key(cfg.clone(), texts);
    let built = resources.reuse_or_build(previous, "plugins", &key, |_| {
        Ok::<_, ()>(PluginSet {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            scripts,
            memory_limit,
            time_budget: cfg.time_budget.get(),
            max_body: usize::try_from(cfg.max_body.0).unwrap_or(usize::MAX),
            dir,
        })
    });
    built.ok().map(|(s, _)| s)
}

/// The path as Lua names the chunk (relative to gateway.toml's folder when it is inside it).
fn shown_path(loaded: &LoadedConfig, p: &std::path::Path) -> PathBuf {
    p.strip_prefix(&loaded.root)
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}

/// A Lua message as a located config error: `shown:LINE: …` gives the line.
fn located(
    path: &std::path::Path,
    shown: &std::path::Path,
    msg: &str,
) -> crate::config::source::ConfigError {
    let first = msg.lines().next().unwrap_or(msg);
    let marker = format!("{}:", shown.display());
    let mut line = 1;
    let mut text = first.to_owned();
    if let Some(i) = first.find(&marker) {
        let rest = &first[i + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse::<usize>() {
            line = n;
            text = rest[digits.len()..]
                .trim_start_matches(':')
                .trim()
                .to_owned();
        } else {
            text = rest.trim().to_owned();
        }
    }
    crate::config::source::ConfigError {
        file: path.to_path_buf(),
        line,
        col: 1,
        message: format!("plugin: {text}"),
    }
}

/// The phases, as counter indexes.
const REQUEST: usize = 0;
const RESPONSE: usize = 1;
const LOG: usize = 2;

/// A route's use of one Lua plugin.
#[derive(Clone)]
pub(crate) struct PluginLayer(Arc<Use>);

struct Use {
    /// Unique: keys this use's `ctx` table in each VM.
    id: u64,
    set: Arc<PluginSet>,
    name: Arc<str>,
    route: Arc<str>,
    /// `ctx.config` (its address keys the VM's table of it).
    config: Arc<serde_json::Value>,
    skip_on_error: bool,
    read_body: bool,
    /// `[server] trusted_proxies`, for `ctx.client_ip`.
    trusted: Arc<[ipnet::IpNet]>,
    /// The frontend's path prefix: a rewritten path keeps it.
    prefix: Arc<str>,
    /// Which phases the script has.
    phases: [bool; 3],
    calls: [prometheus::IntCounter; 3],
    errors: prometheus::IntCounter,
    seconds: prometheus::Counter,
}

/// Why a use of a plugin cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PluginUseError {
    #[error("plugin_config.{0}.on_error must be \"fail\" or \"skip\"")]
    OnError(String),
}

impl PluginLayer {
    pub(crate) fn new(
        set: &Arc<PluginSet>,
        name: &str,
        route: &str,
        config: &toml::Table,
        metrics: &Metrics,
        trusted: Arc<[ipnet::IpNet]>,
        prefix: &str,
    ) -> Result<PluginLayer, PluginUseError> {
        let skip_on_error = match config.get("on_error").map(|v| v.as_str()) {
            None | Some(Some("fail")) => false,
            Some(Some("skip")) => true,
            Some(_) => return Err(PluginUseError::OnError(name.to_owned())),
        };
        let json = serde_json::to_value(config).unwrap_or(serde_json::Value::Null);
        let script = set.scripts.get(name);
        Ok(PluginLayer(Arc::new(Use {
            id: NEXT_USE.fetch_add(1, Ordering::Relaxed),
            set: set.clone(),
            name: name.into(),
            route: route.into(),
            config: Arc::new(json),
            skip_on_error,
            read_body: script.is_some_and(|s| s.read_body),
            trusted,
            prefix: prefix.into(),
            phases: script.map_or([false; 3], |s| s.phases),
            calls: ["request", "response", "log"]
                .map(|p| metrics.plugin_calls_total.with_label_values(&[name, p])),
            errors: metrics.plugin_errors_total.with_label_values(&[name]),
            seconds: metrics.plugin_seconds_total.with_label_values(&[name]),
        })))
    }

    /// One request through the plugin and `inner`.
    pub(crate) fn call<S>(&self, inner: &S, req: Request<ReqBody>) -> BoxFuture
    where
        S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        let u = self.0.clone();
        let inner = inner.clone();
        Box::pin(async move { u.run(inner, req).await })
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

/// What `on_request` decided.
enum Step {
    /// Go on, with the values the plugin set in `ctx`.
    Continue(serde_json::Map<String, serde_json::Value>),
    /// Answer this, without the backend (and the plugin's `ctx` values, for `on_log`).
    Respond(
        Box<Response<RespBody>>,
        serde_json::Map<String, serde_json::Value>,
    ),
}

impl Use {
    async fn run<S>(
        self: Arc<Self>,
        inner: S,
        mut req: Request<ReqBody>,
    ) -> Result<Response<RespBody>, BoxError>
    where
        S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError> + Send,
        S::Future: Send,
    {
        let x = req.extensions().get::<Exchange>().cloned();
        let body = if self.read_body {
            let (parts, b) = req.into_parts();
            let limited = http_body_util::Limited::new(b, self.set.max_body);
            let bytes = match limited.collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(Problem::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        "The request body is larger than this route's plugins read",
                    )
                    .member("max_body", self.set.max_body)
                    .into())
                }
                Err(e) => return Err(e),
            };
            req = Request::from_parts(parts, req_full(bytes.clone()));
            Some(bytes)
        } else {
            None
        };
        let client_ip = self.client_ip(&req, x.as_ref());
        let mut ctx = serde_json::Map::new();
        if self.has(REQUEST) {
            // With `skip`, a failed call leaves the request as it was.
            let kept = self
                .skip_on_error
                .then(|| (req.headers().clone(), req.uri().clone()));
            match self.on_request(&mut req, x.as_ref(), body.as_ref(), &client_ip) {
                Ok(Step::Continue(c)) => ctx = c,
                Ok(Step::Respond(r, c)) => {
                    self.on_log(x.as_ref(), &client_ip, &c);
                    return Ok(*r);
                }
                Err(e) => {
                    if let Some(err) = self.failed(REQUEST, &e) {
                        self.on_log(x.as_ref(), &client_ip, &ctx);
                        return Err(err);
                    }
                    if let Some((h, u)) = kept {
                        *req.headers_mut() = h;
                        *req.uri_mut() = u;
                    }
                }
            }
        }
        let mut resp = match inner.oneshot(req).await {
            Ok(r) => r,
            Err(e) => {
                self.on_log(x.as_ref(), &client_ip, &ctx);
                return Err(e);
            }
        };
        if self.has(RESPONSE) {
            let kept = self
                .skip_on_error
                .then(|| (resp.headers().clone(), resp.status()));
            if let Err(e) = self.on_response(&mut resp, x.as_ref(), &mut ctx, &client_ip) {
                if let Some(err) = self.failed(RESPONSE, &e) {
                    self.on_log(x.as_ref(), &client_ip, &ctx);
                    return Err(err);
                }
                if let Some((h, st)) = kept {
                    *resp.headers_mut() = h;
                    *resp.status_mut() = st;
                }
            }
        }
        self.on_log(x.as_ref(), &client_ip, &ctx);
        Ok(resp)
    }

    /// The client's address as `ctx.client_ip`: behind `[server] trusted_proxies`, the one
    /// `X-Forwarded-For` names (as the rate limits see it).
    fn client_ip(&self, req: &Request<ReqBody>, x: Option<&Exchange>) -> http::HeaderValue {
        match x {
            Some(x) if !x.client().trusted => x.client().peer_ip.clone(),
            _ => {
                let ip = crate::layers::rate_limit::client_ip(req, x, &self.trusted);
                http::HeaderValue::from_str(&ip.to_string())
                    .unwrap_or(http::HeaderValue::from_static("0.0.0.0"))
            }
        }
    }

    fn has(&self, phase: usize) -> bool {
        self.phases[phase]
    }

    /// Counts and logs a failed call; the error to answer with, unless the plugin is skipped.
    fn failed(&self, phase: usize, e: &str) -> Option<BoxError> {
        self.errors.inc();
        if e.contains("not enough memory") || e.contains("memory error") {
            // Its state filled the VM: a new one for the next call on this worker.
            vm::discard(&self.set);
        }
        let phase = ["on_request", "on_response", "on_log"][phase];
        tracing::error!(plugin = %self.name, route = %self.route, phase, error = ?e, "plugin failed");
        if self.skip_on_error {
            return None;
        }
        Some(
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "plugin_error",
                "A plugin of this route failed",
            )
            .member("plugin", &*self.name)
            .into(),
        )
    }

    /// Times a call and counts it.
    fn timed<R>(&self, phase: usize, f: impl FnOnce() -> R) -> R {
        self.calls[phase].inc();
        let t = Instant::now();
        let out = f();
        self.seconds.inc_by(t.elapsed().as_secs_f64());
        out
    }
}
