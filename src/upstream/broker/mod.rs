//! `[brokers.NAME]`: a message broker the gateway talks to, as a service is one it proxies to
//! (`publish` routes send through it, `[[consumer]]` bridges read from it). The URL's scheme
//! names its kind: NATS (async-nats), AMQP 0-9-1 (lapin, `amqp.rs`) or MQTT 3.1.1 (`mqtt.rs`).
//! One connection per broker, a resource kept across reloads while its config is equal (so a
//! reload neither drops nor re-opens it). Each connects in the background and reconnects with
//! backoff; a publish while it is away fails at once or after at most `publish_timeout` (the
//! client gets 503), so nothing is acknowledged that the broker did not take.

pub(crate) mod amqp;
pub(crate) mod mqtt;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{BrokerConfig, ConfigErrors, LoadedConfig};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;

/// A connected (or connecting) broker.
pub(crate) struct Broker {
    pub(crate) name: Arc<str>,
    pub(crate) conn: Conn,
    pub(crate) required: bool,
    pub(crate) publish_timeout: Duration,
    /// `gatehouse_broker_publishes_total{broker, outcome}`, resolved when the broker is built.
    pub(crate) outcomes: Outcomes,
}

/// The connection, by the broker's kind.
pub(crate) enum Conn {
    Nats(Box<Nats>),
    Amqp(amqp::Amqp),
    Mqtt(mqtt::Mqtt),
}

/// The kinds of broker, by URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Nats,
    Amqp,
    Mqtt,
}

impl Kind {
    pub(crate) fn of(url: &str) -> Option<Kind> {
        let scheme = url.trim().split_once("://")?.0;
        match scheme.to_ascii_lowercase().as_str() {
            "nats" => Some(Kind::Nats),
            "amqp" | "amqps" => Some(Kind::Amqp),
            "mqtt" => Some(Kind::Mqtt),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Nats => "NATS",
            Kind::Amqp => "AMQP",
            Kind::Mqtt => "MQTT",
        }
    }
}

/// A NATS connection (core and JetStream).
pub(crate) struct Nats {
    pub(crate) client: async_nats::Client,
    pub(crate) jetstream: async_nats::jetstream::Context,
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
        match &self.conn {
            Conn::Nats(n) => {
                n.client.connection_state() == async_nats::connection::State::Connected
            }
            Conn::Amqp(a) => a.connected(),
            Conn::Mqtt(m) => m.connected(),
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        match &self.conn {
            Conn::Nats(_) => Kind::Nats,
            Conn::Amqp(_) => Kind::Amqp,
            Conn::Mqtt(_) => Kind::Mqtt,
        }
    }

    /// The NATS connection, when this is a NATS broker.
    pub(crate) fn nats(&self) -> Option<&Nats> {
        match &self.conn {
            Conn::Nats(n) => Some(n),
            _ => None,
        }
    }

    pub(crate) fn count(&self, outcome: Outcome) {
        self.outcomes.0[outcome as usize].inc();
    }
}

/// A broker URL the gateway cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BrokerConfigError {
    #[error("broker `{0}`: url `{1}` has no known scheme: nats://, amqp://, amqps:// or mqtt://")]
    Scheme(String, String),
    #[error("broker `{0}`: url `{1}` is not a {2}://HOST:PORT address")]
    Url(String, String, &'static str),
    #[error("broker `{0}`: url `{1}` mixes kinds: a list is of nats:// servers (one cluster)")]
    Mixed(String, String),
    #[error("broker `{0}`: one URL per AMQP or MQTT broker (a list is for a NATS cluster)")]
    List(String),
    #[error("broker `{0}`: brokers are connected only by a running gateway (no async runtime)")]
    NoRuntime(String),
}

fn check(name: &str, url: &str) -> Result<Kind, BrokerConfigError> {
    let first = url.split(',').next().unwrap_or(url).trim();
    let Some(kind) = Kind::of(first) else {
        return Err(BrokerConfigError::Scheme(
            name.into(),
            crate::config::mask_userinfo(first),
        ));
    };
    if kind != Kind::Nats && url.contains(',') {
        return Err(BrokerConfigError::List(name.into()));
    }
    for one in url.split(',') {
        let one = one.trim();
        // Errors show the URL without its password.
        let shown = crate::config::mask_userinfo(one);
        let scheme = one.split_once("://").map_or("", |(s, _)| s);
        if Kind::of(one) != Some(kind) {
            return Err(BrokerConfigError::Mixed(name.into(), shown));
        }
        let rest = &one[scheme.len() + 3..];
        let authority = rest.split('/').next().unwrap_or(rest);
        let host_port = authority.rsplit('@').next().unwrap_or(authority);
        let valid = match host_port.rsplit_once(':') {
            Some((h, p)) => !h.is_empty() && p.parse::<u16>().is_ok(),
            // AMQP has a default port.
            None => kind == Kind::Amqp && !host_port.is_empty(),
        };
        if !valid {
            return Err(BrokerConfigError::Url(
                name.into(),
                shown,
                kind_scheme(kind),
            ));
        }
    }
    Ok(kind)
}

fn kind_scheme(kind: Kind) -> &'static str {
    match kind {
        Kind::Nats => "nats",
        Kind::Amqp => "amqp",
        Kind::Mqtt => "mqtt",
    }
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
        let kind = match check(name, c.url.get_ref()) {
            Ok(k) => k,
            Err(e) => {
                errors.push(gfile.error_at(c.url.span(), e));
                continue;
            }
        };
        // A connection needs a runtime (`run` and `check` have one; a library caller may not):
        // said, never a route silently missing.
        if tokio::runtime::Handle::try_current().is_err() {
            errors.push(gfile.error_at(c.url.span(), BrokerConfigError::NoRuntime(name.clone())));
            continue;
        }
        match resources.reuse_or_build(previous, name, c, |_| connect(name, kind, c, metrics)) {
            Ok((b, _)) => {
                out.insert(name.clone(), b);
            }
            Err(e) => errors.push(gfile.error_at(c.url.span(), e)),
        }
    }
    out
}

fn connect(name: &str, kind: Kind, c: &BrokerConfig, metrics: &Metrics) -> Result<Broker, String> {
    let conn = match kind {
        Kind::Nats => Conn::Nats(Box::new(connect_nats(name, c)?)),
        Kind::Amqp => Conn::Amqp(amqp::Amqp::start(name, c)?),
        Kind::Mqtt => Conn::Mqtt(mqtt::Mqtt::start(name, c)?),
    };
    Ok(Broker {
        name: name.into(),
        conn,
        required: c.required,
        publish_timeout: c.publish_timeout.get(),
        outcomes: Outcomes::new(&metrics.broker_publishes_total, name),
    })
}

fn connect_nats(name: &str, c: &BrokerConfig) -> Result<Nats, String> {
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
    Ok(Nats { client, jetstream })
}

/// Reconnect backoff of the AMQP and MQTT connections: 100 ms doubling to 5 s, with jitter.
pub(crate) fn backoff(failures: u32) -> Duration {
    let ms = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    let jitter = fastrand::u64(..=ms / 4);
    Duration::from_millis(ms + jitter)
}
