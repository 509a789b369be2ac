//! Compiling `[services.*]`: endpoints or discovery, load balancing, health checks, outlier
//! detection, upstream TLS and resilience settings are checked (every mistake located in
//! gateway.toml) and turned into `Upstream`s. A service whose definition is unchanged is taken
//! over from the previous snapshot, with its pools, endpoint state and breaker.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use toml::Spanned;

use super::Gateway;
use crate::config::{
    ConfigErrors, DiscoveryConfig, DnsConfig, LoadBalancing, LoadedConfig, ServiceConfig,
    SourceFile,
};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;
use crate::upstream::bulkhead::Limits;
use crate::upstream::discovery::{self, DnsTarget};
use crate::upstream::endpoint::Outlier;
use crate::upstream::retry::RetryPolicy;
use crate::upstream::{self, Endpoint, HashKey, Parts, Source, TlsSettings, Upstream};
use crate::upstream::{breaker, health};

pub(super) fn compile_services(
    loaded: &LoadedConfig,
    previous: Option<&Gateway>,
    metrics: &Metrics,
    resources: &mut Resources,
    errors: &mut ConfigErrors,
) -> BTreeMap<String, Arc<Upstream>> {
    let mut out = BTreeMap::new();
    for (name, spanned) in &loaded.gateway.services {
        let cfg = spanned.get_ref();
        let dns = &loaded.gateway.dns;
        let uses_dns = cfg
            .discovery
            .as_ref()
            .is_some_and(|d| d.get_ref().uses_dns());
        // What the service is built from, compared by value (spans are ignored) on reload.
        let key = ServiceKey {
            config: cfg.clone(),
            dns: uses_dns.then(|| dns.clone()),
        };
        let built = resources.reuse_or_build(
            previous.map(|p| &p.resources),
            name,
            &key,
            |prev: Option<(&Upstream, &ServiceKey)>| {
                build_service(loaded, name, spanned, prev, metrics, errors).ok_or(())
            },
        );
        if let Ok((up, _)) = built {
            out.insert(name.clone(), up);
        }
    }
    out
}

/// The definition a service's `Upstream` is built from: its table and, for DNS discovery,
/// `[dns]`.
#[derive(Clone, PartialEq)]
struct ServiceKey {
    config: ServiceConfig,
    dns: Option<DnsConfig>,
}

/// A service's settings, each checked by the run-time type that uses it.
#[derive(Default)]
struct Checked {
    hash_key: Option<HashKey>,
    retry: Option<RetryPolicy>,
    breaker: Option<breaker::Settings>,
    bulkhead: Option<Limits>,
    health: Option<health::Probe>,
    outlier: Option<Outlier>,
}

/// Checks one service and builds its `Upstream`; `None` when it has errors (recorded).
fn build_service(
    loaded: &LoadedConfig,
    name: &str,
    spanned: &Spanned<ServiceConfig>,
    prev: Option<(&Upstream, &ServiceKey)>,
    metrics: &Metrics,
    errors: &mut ConfigErrors,
) -> Option<Upstream> {
    let gfile = &loaded.gateway_file;
    let cfg = spanned.get_ref();
    let dns = &loaded.gateway.dns;
    {
        let before = errors.0.len();
        let source = match (&cfg.discovery, cfg.endpoints.is_empty()) {
            (Some(d), false) => {
                errors.push(gfile.error_at(
                    d.span(),
                    format!("service `{name}` has both `endpoints` and `discovery`; give one"),
                ));
                None
            }
            (None, true) => {
                errors.push(gfile.error_at(
                    spanned.span(),
                    format!("service `{name}` has no `endpoints` (or `discovery`)"),
                ));
                None
            }
            (Some(d), true) => discovery_source(gfile, name, d, dns, errors),
            (None, false) => {
                let mut endpoints = Vec::new();
                for e in &cfg.endpoints {
                    match Endpoint::parse(e.get_ref()) {
                        Ok(ep) => endpoints.push(ep),
                        Err(msg) => errors.push(gfile.error_at(e.span(), msg)),
                    }
                }
                Some(Source::Static(endpoints))
            }
        };
        let mut checked = Checked::default();
        check_balancing(gfile, name, cfg, spanned.span(), &mut checked, errors);
        let tls = upstream_tls(loaded, name, cfg, spanned.span(), errors);
        check_resilience(gfile, name, cfg, spanned.span(), &mut checked, errors);
        if let (Some(source), Some(tls), true) = (source, tls, errors.0.len() == before) {
            // A discovered service rebuilt with the same source starts from what the previous
            // build knew: no gap until the next answer, and endpoint state kept.
            let seed = match (&source, prev) {
                (Source::Dns { .. } | Source::Etcd { .. }, Some((prev, key)))
                    if key.config.discovery == cfg.discovery =>
                {
                    prev.endpoints().endpoints.to_vec()
                }
                _ => Vec::new(),
            };
            let parts = Parts {
                seed,
                source,
                hash_key: checked.hash_key,
                tls,
                retry: checked.retry,
                breaker: checked.breaker,
                health: checked.health,
                outlier: checked.outlier,
                bulkhead: checked.bulkhead,
            };
            return Some(Upstream::new(
                name,
                cfg.clone(),
                dns.clone(),
                parts,
                metrics.service(name),
            ));
        }
        None
    }
}

/// Builds the TLS client settings of a service (https endpoints, mutual TLS).
fn upstream_tls(
    loaded: &LoadedConfig,
    name: &str,
    cfg: &crate::config::ServiceConfig,
    span: Range<usize>,
    errors: &mut ConfigErrors,
) -> Option<TlsSettings> {
    let gfile = &loaded.gateway_file;
    let span = cfg.tls.as_ref().map_or(span, |t| t.span());
    let tls = cfg.tls.as_ref().map(|t| t.get_ref());
    if tls.is_some_and(|t| t.insecure_skip_verify && t.ca.is_some()) {
        let msg =
            format!("service `{name}`: tls.ca has no effect with insecure_skip_verify; remove one");
        errors.push(gfile.error_at(span, msg));
        return None;
    }
    let config = match upstream::tls::client_config(tls, |p| loaded.resolve(p)) {
        Ok(c) => c,
        Err(msg) => {
            errors.push(gfile.error_at(span, format!("service `{name}`: {msg}")));
            return None;
        }
    };
    let server_name = match tls.and_then(|t| t.server_name.clone()) {
        None => None,
        Some(n) => match rustls::pki_types::ServerName::try_from(n.clone()) {
            Ok(sn) => Some(sn),
            Err(_) => {
                let msg = format!(
                    "service `{name}`: tls.server_name `{n}` is not a DNS name or IP address"
                );
                errors.push(gfile.error_at(span, msg));
                return None;
            }
        },
    };
    if tls.is_some_and(|t| t.insecure_skip_verify) {
        tracing::warn!(
            service = name,
            "tls.insecure_skip_verify: server certificates of this service are NOT verified"
        );
    }
    Some(TlsSettings {
        config,
        server_name,
    })
}

/// Builds what a `discovery` table's task needs (its shape was checked when it was read).
fn discovery_source(
    gfile: &SourceFile,
    name: &str,
    d: &toml::Spanned<DiscoveryConfig>,
    dns: &crate::config::DnsConfig,
    errors: &mut ConfigErrors,
) -> Option<Source> {
    let mut fail = |msg: String| {
        errors.push(gfile.error_at(d.span(), format!("service `{name}` discovery: {msg}")));
        None
    };
    let scheme = |https: bool| if https { "https" } else { "http" }.to_owned();
    let target = match d.get_ref() {
        DiscoveryConfig::Etcd { urls, prefix } => {
            return Some(Source::Etcd {
                urls: urls.clone(),
                prefix: prefix.clone(),
            })
        }
        DiscoveryConfig::Dns { name, port, https } => DnsTarget::Host {
            name: name.clone(),
            port: *port,
            scheme: scheme(*https),
        },
        DiscoveryConfig::Srv { name, https } => DnsTarget::Srv {
            name: name.clone(),
            scheme: scheme(*https),
        },
    };
    if dns.min_refresh.get() > dns.max_refresh.get() {
        return fail(format!(
            "[dns] min_refresh ({}) is longer than max_refresh ({})",
            dns.min_refresh, dns.max_refresh
        ));
    }
    match discovery::resolver(dns) {
        Ok(resolver) => Some(Source::Dns {
            resolver: Box::new(resolver),
            target,
        }),
        Err(e) => fail(e.to_string()),
    }
}

/// Checks retry, circuit breaker and bulkhead settings; returns the service's retry policy.
fn check_resilience(
    gfile: &SourceFile,
    name: &str,
    cfg: &crate::config::ServiceConfig,
    span: Range<usize>,
    s: &mut Checked,
    errors: &mut ConfigErrors,
) {
    let retry = cfg
        .retry
        .as_ref()
        .and_then(|r| match RetryPolicy::parse(r.get_ref()) {
            Ok(p) => Some(p),
            Err(msg) => {
                errors.push(gfile.error_at(r.span(), format!("service `{name}` retry: {msg}")));
                None
            }
        });
    s.retry = retry;
    if let Some(cb) = &cfg.circuit_breaker {
        match breaker::Settings::from_config(cb.get_ref()) {
            Ok(b) => s.breaker = Some(b),
            Err(list) => {
                for e in list {
                    let msg = format!("service `{name}` circuit_breaker: {e}");
                    errors.push(gfile.error_at(cb.span(), msg));
                }
            }
        }
    }
    let bulkhead = Limits::from_config(
        cfg.max_concurrent_requests.as_ref().map(|m| *m.get_ref()),
        cfg.max_queued_requests,
        cfg.queue_timeout.get(),
    );
    match bulkhead {
        Ok(b) => s.bulkhead = b,
        Err(e) => {
            let at = cfg
                .max_concurrent_requests
                .as_ref()
                .map_or(span, |m| m.span());
            errors.push(gfile.error_at(at, format!("service `{name}`: {e}")));
        }
    }
}

/// Checks load balancing, health check and outlier detection settings; returns the hash key.
fn check_balancing(
    gfile: &SourceFile,
    name: &str,
    cfg: &crate::config::ServiceConfig,
    span: Range<usize>,
    s: &mut Checked,
    errors: &mut ConfigErrors,
) {
    let consistent = cfg.load_balancing == LoadBalancing::ConsistentHash;
    let key = match &cfg.hash_key {
        Some(k) if !consistent => {
            errors.push(gfile.error_at(
                k.span(),
                format!(
                "service `{name}`: hash_key applies only to load_balancing = \"consistent_hash\""
            ),
            ));
            None
        }
        Some(k) => match HashKey::parse(k.get_ref()) {
            Ok(key) => Some(key),
            Err(msg) => {
                errors.push(gfile.error_at(k.span(), msg));
                None
            }
        },
        None if consistent => {
            errors.push(gfile.error_at(span, format!(
                "service `{name}`: consistent_hash needs hash_key (`header:NAME`, `cookie:NAME` or `ip`)"
            )));
            None
        }
        None => None,
    };
    s.hash_key = key;
    if let Some(hc) = &cfg.health_check {
        match health::Probe::from_config(hc.get_ref(), cfg.protocol) {
            Ok(p) => s.health = Some(p),
            Err(list) => {
                for e in list {
                    let msg = format!("service `{name}` health_check: {e}");
                    errors.push(gfile.error_at(hc.span(), msg));
                }
            }
        }
    }
    if let Some(od) = &cfg.outlier_detection {
        match Outlier::from_config(od.get_ref()) {
            Ok(o) => s.outlier = Some(o),
            Err(list) => {
                for e in list {
                    let msg = format!("service `{name}` outlier_detection: {e}");
                    errors.push(gfile.error_at(od.span(), msg));
                }
            }
        }
    }
}
