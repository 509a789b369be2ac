//! Builds the `[[consumer]]` bridges: each checked (its broker, service, subjects and path) and
//! started, or the running one taken over when its config, its broker's and its service's are
//! all unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::consumer::{Consumer, Settings, Source};
use crate::backend::proxy::{Proxy, ProxyOptions};
use crate::backend::target::UpstreamPath;
use crate::config::{BrokerConfig, ConfigErrors, ConsumerConfig, LoadedConfig, ServiceConfig};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;
use crate::upstream::broker::{valid_subject, Broker, Kind};
use crate::upstream::Upstream;

/// What a running bridge depends on: rebuilt when any of it changes.
#[derive(Clone, PartialEq)]
struct Key(ConsumerConfig, BrokerConfig, ServiceConfig);

pub(crate) fn build_consumers(
    loaded: &LoadedConfig,
    previous: Option<&Resources>,
    resources: &mut Resources,
    brokers: &BTreeMap<String, Arc<Broker>>,
    metrics: &Metrics,
    errors: &mut ConfigErrors,
) -> Vec<Arc<Consumer>> {
    let gfile = &loaded.gateway_file;
    let g = &loaded.gateway;
    let mut out = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for c in &g.consumer {
        let cfg = c.get_ref();
        let before = errors.0.len();
        let mut fail = |span: std::ops::Range<usize>, msg: String| {
            errors.push(gfile.error_at(span, format!("[[consumer]] {msg}")))
        };
        let broker_cfg = g.brokers.get(cfg.broker.get_ref());
        if broker_cfg.is_none() {
            fail(
                cfg.broker.span(),
                format!("unknown broker `{}`", cfg.broker.get_ref()),
            );
        }
        let service_cfg = g.services.get(cfg.service.get_ref());
        if service_cfg.is_none() {
            fail(
                cfg.service.span(),
                format!("unknown service `{}`", cfg.service.get_ref()),
            );
        }
        let kind = broker_cfg.and_then(|b| Kind::of(b.get_ref().url.get_ref()));
        let source = match (kind, &cfg.subject, &cfg.queue) {
            (Some(Kind::Nats), Some(s), None) => Some(Source::Subject(s.get_ref().clone())),
            (Some(Kind::Amqp), None, Some(q)) => Some(Source::Queue(q.get_ref().clone())),
            (Some(k @ (Kind::Nats | Kind::Amqp)), _, _) => {
                let want = if k == Kind::Nats {
                    "`subject`"
                } else {
                    "`queue`"
                };
                fail(
                    c.span(),
                    format!(
                        "broker `{}` is {}: set {want} (and not the other)",
                        cfg.broker.get_ref(),
                        k.name()
                    ),
                );
                None
            }
            (Some(Kind::Mqtt), _, _) => {
                fail(
                    cfg.broker.span(),
                    format!("broker `{}` is MQTT: consumers read NATS JetStream subjects or AMQP queues (MQTT has no redelivery with backoff to build on)", cfg.broker.get_ref()),
                );
                None
            }
            // An unknown broker, or one whose URL is wrong, has its own error.
            (None, _, _) => None,
        };
        for s in [cfg.subject.as_ref(), cfg.dead_letter.as_ref()]
            .into_iter()
            .flatten()
            .filter(|_| kind.is_none_or(|k| k == Kind::Nats))
        {
            if !valid_subject(s.get_ref()) {
                fail(
                    s.span(),
                    format!("`{}` is not a NATS subject (no wildcards)", s.get_ref()),
                );
            }
        }
        for q in [cfg.queue.as_ref(), cfg.dead_letter.as_ref()]
            .into_iter()
            .flatten()
            .filter(|_| kind == Some(Kind::Amqp))
        {
            let n = q.get_ref();
            if n.is_empty() || n.len() > 255 || !n.bytes().all(|b| b.is_ascii_graphic()) {
                fail(
                    q.span(),
                    format!("`{n}` is not an AMQP queue name (1 to 255 visible ASCII characters)"),
                );
            }
        }
        let path = match cfg.path.get_ref().parse::<http::Uri>() {
            Ok(p) if cfg.path.get_ref().starts_with('/') => Some(p),
            _ => {
                fail(
                    cfg.path.span(),
                    format!(
                        "path `{}` must be a path starting with `/`",
                        cfg.path.get_ref()
                    ),
                );
                None
            }
        };
        if cfg.max_attempts == 0 || cfg.max_in_flight == 0 {
            fail(
                c.span(),
                "max_attempts and max_in_flight must be at least 1".to_owned(),
            );
        }
        let name = cfg.name.as_ref().map_or_else(
            || {
                let from = cfg.subject.as_ref().or(cfg.queue.as_ref());
                let from: String = from
                    .map(|f| f.get_ref().as_str())
                    .unwrap_or_default()
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect();
                format!("gatehouse-{}-{from}", cfg.service.get_ref())
            },
            |n| n.get_ref().clone(),
        );
        let name_ok = !name.is_empty()
            && name.len() <= 200
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !name_ok {
            fail(
                cfg.name.as_ref().map_or(c.span(), |n| n.span()),
                format!("name `{name}` may hold only letters, digits, `-` and `_` (at most 200)"),
            );
        }
        if names.contains(&name) {
            fail(c.span(), format!("two consumers are named `{name}`"));
        }
        names.push(name.clone());
        if errors.0.len() != before {
            continue;
        }
        let (Some(bc), Some(sc), Some(path), Some(source)) =
            (broker_cfg, service_cfg, path, source)
        else {
            continue;
        };
        // Built services and brokers only (the others have errors, or `check` has no runtime).
        let (Some(broker), Some(up)) = (
            brokers.get(cfg.broker.get_ref()),
            resources.get::<Upstream>(cfg.service.get_ref()),
        ) else {
            continue;
        };
        let key = Key(cfg.clone(), bc.get_ref().clone(), sc.get_ref().clone());
        let built = resources.reuse_or_build(previous, &name, &KeyCfg(key), |_| {
            let proxy = Proxy::new(
                up.clone(),
                ProxyOptions {
                    target: UpstreamPath::AsRequested,
                    forward_query: false,
                    preserve_host: false,
                    retry: up.retry.clone(),
                    idempotent: false,
                    deadline: Some(cfg.timeout.get()),
                    upgrades: Arc::from(Vec::new()),
                },
            );
            let settings = Settings {
                name: name.clone(),
                source,
                path,
                max_attempts: cfg.max_attempts,
                dead_letter: cfg.dead_letter.as_ref().map(|d| d.get_ref().clone()),
                max_in_flight: cfg.max_in_flight,
                backoff: cfg.backoff.get(),
                max_backoff: cfg.max_backoff.get(),
                timeout: cfg.timeout.get(),
            };
            Consumer::start(
                settings,
                broker.clone(),
                proxy,
                &metrics.consumer_deliveries_total,
                metrics.consumer_pending.with_label_values(&[name.as_str()]),
            )
            .ok_or(())
        });
        if let Ok((c, _)) = built {
            out.push(c);
        }
    }
    out
}

/// The key as a resource config (`reuse_or_build` wants `PartialEq + Clone + Send + Sync`).
#[derive(Clone)]
struct KeyCfg(Key);

impl PartialEq for KeyCfg {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
