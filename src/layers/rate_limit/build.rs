//! Builds the `[rate_limits.*]` policies, the `[redis]` store and `[server] ip_rate_limit`
//! when a config is compiled, each mistake located at its key in gateway.toml. Each is a
//! resource: a reload that leaves a policy's config (and its store's) unchanged keeps its
//! limiter, with every key's budget.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use super::local::LocalStore;
use super::redis::{RedisStore, WindowArgs, FAILURE_REASONS};
use super::{Limiter, Shared, Window, Windows, MAX_WINDOWS};
use crate::config::{
    ConfigErrors, LoadedConfig, RateLimitConfig, RedisConfig, StoreKind, WindowConfig,
};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;

/// The policies of one snapshot, by name.
#[derive(Default)]
pub(crate) struct Limiters {
    by_name: BTreeMap<String, Arc<Limiter>>,
    /// Every name `[rate_limits]` defines, built or not (a policy with mistakes has its own
    /// errors; a route naming it gets no second one).
    defined: Vec<String>,
    /// `[server] ip_rate_limit`.
    pub(crate) ip_guard: Option<Arc<IpGuard>>,
}

impl Limiters {
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Limiter>> {
        self.by_name.get(name)
    }

    pub(crate) fn is_defined(&self, name: &str) -> bool {
        self.defined.iter().any(|d| d == name)
    }

    /// Every policy name, sorted (for error messages).
    pub(crate) fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

/// The per-client-IP guard before routing: one window, in memory.
pub(crate) struct IpGuard {
    pub(crate) store: LocalStore<IpAddr>,
    pub(crate) refused: prometheus::IntCounter,
}

impl IpGuard {
    /// The 429 of a request over its client IP's budget; `None` when it is admitted.
    pub(crate) fn refuse<B>(
        &self,
        req: &http::Request<B>,
        peer: IpAddr,
        trusted: bool,
        proxies: &[ipnet::IpNet],
    ) -> Option<crate::error::BoxError> {
        let ip = super::ip_key(if trusted {
            super::forwarded_client(req.headers(), peer, proxies)
        } else {
            peer
        });
        let out = self.store.check(&ip);
        if out.admitted {
            return None;
        }
        self.refused.inc();
        Some(Box::new(super::too_many(&out)))
    }
}

/// What a limiter is rebuilt on: its own config, and its store's.
#[derive(Clone, PartialEq)]
struct LimiterConfig {
    policy: RateLimitConfig,
    redis: Option<RedisConfig>,
}

pub(crate) fn build_limiters(
    loaded: &LoadedConfig,
    previous: Option<&Resources>,
    resources: &mut Resources,
    metrics: &Metrics,
    errors: &mut ConfigErrors,
) -> Limiters {
    let gfile = &loaded.gateway_file;
    let g = &loaded.gateway;
    let redis = g.redis.as_ref().and_then(|r| {
        let cfg = r.get_ref();
        let built = resources.reuse_or_build(previous, "redis", cfg, |_| {
            RedisStore::new(
                cfg.url.get_ref(),
                cfg.timeout.get(),
                cfg.connect_timeout.get(),
                cfg.max_backoff.get(),
            )
        });
        match built {
            Ok((store, _)) => Some(store),
            Err(msg) => {
                errors.push(gfile.error_at(cfg.url.span(), msg));
                None
            }
        }
    });
    let mut out = Limiters {
        defined: g.rate_limits.keys().cloned().collect(),
        ..Limiters::default()
    };
    for (name, spanned) in &g.rate_limits {
        let cfg = spanned.get_ref();
        let before = errors.0.len();
        // The name goes into headers (a structured-field string) and Redis keys.
        if name == "none"
            || name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            errors.push(gfile.error_at(
                spanned.span(),
                format!("[rate_limits.{name}]: a policy name is letters, digits, `_` and `-` (and not `none`)"),
            ));
        }
        let windows = windows(name, &cfg.limits.get_ref()[..], |span, msg| {
            errors.push(gfile.error_at(span, format!("[rate_limits.{name}] {msg}")))
        });
        if cfg.limits.get_ref().is_empty() {
            errors.push(gfile.error_at(
                cfg.limits.span(),
                format!("[rate_limits.{name}] `limits` is empty: give at least one window"),
            ));
        } else if cfg.limits.get_ref().len() > MAX_WINDOWS {
            errors.push(gfile.error_at(
                cfg.limits.span(),
                format!("[rate_limits.{name}] has more than {MAX_WINDOWS} windows"),
            ));
        }
        if cfg.max_keys == 0 {
            errors.push(gfile.error_at(
                spanned.span(),
                format!("[rate_limits.{name}] `max_keys` must be at least 1"),
            ));
        }
        let store = match cfg.store.get_ref() {
            StoreKind::Local => None,
            StoreKind::Redis => match &redis {
                Some(r) => Some(r.clone()),
                None => {
                    if g.redis.is_none() {
                        errors.push(gfile.error_at(
                            cfg.store.span(),
                            format!("[rate_limits.{name}] store = \"redis\" needs a [redis] table with its url"),
                        ));
                    }
                    None
                }
            },
        };
        if errors.0.len() != before {
            continue;
        }
        let key = LimiterConfig {
            policy: cfg.clone(),
            redis: store
                .as_ref()
                .and(g.redis.as_ref())
                .map(|r| r.get_ref().clone()),
        };
        let built = resources.reuse_or_build(previous, name, &key, |_| {
            Ok::<_, ()>(limiter(name, cfg, windows.clone(), store.clone(), metrics))
        });
        if let Ok((l, _)) = built {
            out.by_name.insert(name.clone(), l);
        }
    }
    if let Some(guard) = &g.server.ip_rate_limit {
        let w = guard.get_ref();
        match w.check() {
            Ok((interval, burst)) => {
                let windows: Windows = vec![Window {
                    interval,
                    burst,
                    label: "ip".into(),
                }]
                .into();
                let built = resources.reuse_or_build(previous, "[server] ip_rate_limit", w, |_| {
                    Ok::<_, ()>(IpGuard {
                        store: LocalStore::new(&windows, 1_000_000),
                        refused: metrics.ip_rate_limited.clone(),
                    })
                });
                out.ip_guard = built.ok().map(|(g, _)| g);
            }
            Err(e) => {
                errors.push(gfile.error_at(guard.span(), format!("[server] ip_rate_limit: {e}")))
            }
        }
    }
    out
}

/// The checked windows of a policy (the ones that check; the others are reported).
fn windows(
    name: &str,
    limits: &[toml::Spanned<WindowConfig>],
    mut fail: impl FnMut(std::ops::Range<usize>, String),
) -> Windows {
    let several = limits.len() > 1;
    limits
        .iter()
        .filter_map(|w| match w.get_ref().check() {
            Ok((interval, burst)) => Some(Window {
                interval,
                burst,
                label: if several {
                    format!("{name}-{}", w.get_ref().per).into()
                } else {
                    name.into()
                },
            }),
            Err(e) => {
                fail(w.span(), e.to_string());
                None
            }
        })
        .collect()
}

fn limiter(
    name: &str,
    cfg: &RateLimitConfig,
    windows: Windows,
    store: Option<Arc<RedisStore>>,
    metrics: &Metrics,
) -> Limiter {
    let mut items = String::new();
    for (w, c) in windows.iter().zip(cfg.limits.get_ref()) {
        if !items.is_empty() {
            items.push_str(", ");
        }
        let c = c.get_ref();
        let secs = c.per.get().as_nanos().div_ceil(1_000_000_000);
        let _ = write!(items, "\"{}\";q={};w={}", w.label, c.requests, secs);
        if w.burst != c.requests {
            let _ = write!(items, ";burst={}", w.burst);
        }
    }
    let shared = store.map(|store| Shared {
        store,
        on_failure: cfg.on_store_failure,
        script_args: WindowArgs::new(&windows),
        failures: FAILURE_REASONS.map(|r| {
            metrics
                .rate_limit_store_failures
                .with_label_values(&[name, r])
        }),
        latency: metrics.rate_limit_store_seconds.with_label_values(&[name]),
    });
    Limiter {
        name: Arc::from(name),
        key: cfg.key.get_ref().clone(),
        local: LocalStore::new(&windows, cfg.max_keys),
        windows,
        headers: cfg.headers,
        policy_items: items.into(),
        shared,
    }
}

/// A local limiter with these windows, for tests.
#[cfg(test)]
pub(crate) fn test_limiter(windows: Windows) -> Limiter {
    Limiter {
        name: Arc::from("test"),
        key: crate::config::RateKey::Global,
        local: LocalStore::new(&windows, 100),
        windows,
        headers: true,
        policy_items: "".into(),
        shared: None,
    }
}
