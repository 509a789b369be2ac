//! `[brokers.NAME]`: a message broker the gateway talks to, as a service is one it proxies to
//! (`publish` routes send through it, `[[consumer]]` bridges read from it). One NATS connection per broker, a resource kept across reloads while its
//! config is equal (so a reload neither drops nor re-opens it). async-nats connects in the
//! background and reconnects by itself with backoff; a publish while it is away waits at most
//! `publish_timeout` and then fails (the client gets 503), so nothing is acknowledged that the
//! broker did not take.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BrokerConfig, ConfigErrors, LoadedConfig};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;

/// A connected (or connecting) broker.
pub(crate) struct Broker {
    pub(crate) name: Arc<str>,
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: async_nats::jetstream::Context,
    pub(crate) required: bool,
    pub(crate) publish_timeout: Duration,
    /// `gatehouse_broker_publishes_total{broker, outcome}`, resolved when the broker is built.
    pub(crate) outcomes: Outcomes,
}

/// What a publish came to; each a counter of `gatehouse_broker_publishes_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Confirmed,
    Duplicate,
    Replied,
    Unavailable,
    Timeout,
    Rejected,
    NoResponders,
}

const OUTCOMES: [&str; 7] = [
    "confirmed",
    "duplicate",
    "replied",
    "unavailable",
    "timeout",
    "rejected",
    "no_responders",
];

/// The broker's counters, one per `Outcome` (no label lookup per publish).
pub(crate) struct Outcomes([prometheus::IntCounter; 7]);

impl Outcomes {
    fn new(family: &prometheus::IntCounterVec, broker: &str) -> Self {
        Outcomes(OUTCOMES.map(|o| family.with_label_values(&[broker, o])))
    }
}

/// A NATS subject without wildcards: tokens of letters, digits, `-` and `_`, separated by `.`.
pub(crate) fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && subject.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Broker {
    /// Whether the connection is up now.
    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    pub(crate) fn count(&self, outcome: Outcome) {
        self.outcomes.0[outcome as usize].inc();
    }
}

/// A broker URL the gateway cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BrokerConfigError {
    #[error("broker `{0}`: url `{1}` is not supported yet: only nats:// brokers are (AMQP and MQTT are planned)")]
    Scheme(String, String),
    #[error("broker `{0}`: url `{1}` is not a nats://HOST:PORT address")]
    Url(String, String),
    #[error("broker `{0}`: brokers are connected only by a running gateway (no async runtime)")]
    NoRuntime(String),
}

fn check(name: &str, url: &str) -> Result<(), BrokerConfigError> {
    for one in url.split(',') {
        let one = one.trim();
        // Errors show the URL without its password.
        let shown = crate::config::mask_userinfo(one);
        let Some(rest) = one.strip_prefix("nats://") else {
            if one.contains("://") {
                return Err(BrokerConfigError::Scheme(name.into(), shown));
            }
            return Err(BrokerConfigError::Url(name.into(), shown));
        };
        let host_port = rest.rsplit('@').next().unwrap_or(rest);
        let valid = host_port
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(BrokerConfigError::Url(name.into(), shown));
        }
    }
    Ok(())
}

/// Builds (or takes over) every `[brokers.*]`. Connecting happens in the background: a broker
/// that is down at start does not stop the gateway (unless `required`, it is not even unready).
pub(crate) fn build_brokers(
    loaded: &LoadedConfig,
    previous: Option<&Resources>,
    resources: &mut Resources,
    metrics: &Metrics,
    errors: &mut ConfigErrors,
) -> BTreeMap<String, Arc<Broker>> {
    let gfile = &loaded.gateway_file;
    let mut out = BTreeMap::new();
    for (name, cfg) in &loaded.gateway.brokers {
        let c = cfg.get_ref();
        if let Err(e) = check(name, c.url.get_ref()) {
            errors.push(gfile.error_at(c.url.span(), e));
            continue;
        }
        // A connection needs a runtime (`run` and `check` have one; a library caller may not):
        // said, never a route silently missing.
        if tokio::runtime::Handle::try_current().is_err() {
            errors.push(gfile.error_at(c.url.span(), BrokerConfigError::NoRuntime(name.clone())));
            continue;
        }
        match resources.reuse_or_build(previous, name, c, |_| connect(name, c, metrics)) {
            Ok((b, _)) => {
                out.insert(name.clone(), b);
            }
            Err(e) => errors.push(gfile.error_at(c.url.span(), e)),
        }
    }
    out
}

fn connect(name: &str, c: &BrokerConfig, metrics: &Metrics) -> Result<Broker, String> {
    let opts = async_nats::ConnectOptions::new()
        .name("gatehouse")
        .connection_timeout(c.connect_timeout.get())
        .request_timeout(Some(c.publish_timeout.get()))
        // Connect (and reconnect) in the background, for ever, with the client's backoff.
        .retry_on_initial_connect()
        .max_reconnects(None);
    let mut urls = Vec::new();
    for u in c.url.get_ref().split(',') {
        let addr: async_nats::ServerAddr = u.trim().parse().map_err(|e| {
            format!(
                "broker `{name}`: url `{}`: {e}",
                crate::config::mask_userinfo(u.trim())
            )
        })?;
        urls.push(addr);
    }
    // With `retry_on_initial_connect` the client is made at once (the connection follows in a
    // task of this runtime): the future is ready on its first poll.
    let client = futures_util::FutureExt::now_or_never(opts.connect(urls))
        .ok_or_else(|| format!("broker `{name}`: the client did not start"))?
        .map_err(|e| format!("broker `{name}`: {e}"))?;
    let mut jetstream = async_nats::jetstream::new(client.clone());
    jetstream.set_timeout(c.publish_timeout.get());
    Ok(Broker {
        name: name.into(),
        client,
        jetstream,
        required: c.required,
        publish_timeout: c.publish_timeout.get(),
        outcomes: Outcomes::new(&metrics.broker_publishes_total, name),
    })
}
