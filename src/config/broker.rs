//! `[brokers.NAME]` (connections to message brokers) and a route's `publish = { … }` backend.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::defaults::*;
use super::units::Duration;

/// `[brokers.NAME]`: one broker connection, shared by the routes that publish to it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrokerConfig {
    /// `nats://HOST:PORT` (several, comma-separated, for a cluster),
    /// `amqp://USER:PASS@HOST:PORT/VHOST` (or `amqps://`) or `mqtt://HOST:PORT`.
    pub(crate) url: Spanned<String>,
    /// `/readyz` is not ready while this broker is not connected.
    #[serde(default)]
    pub(crate) required: bool,
    /// How long a connection attempt may take.
    #[serde(default = "d_2s")]
    pub(crate) connect_timeout: Duration,
    /// How long a publish waits for the broker's confirmation before the client gets 503.
    #[serde(default = "d_5s")]
    pub(crate) publish_timeout: Duration,
}

/// How a `publish` route answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ReplyMode {
    /// 202 once the broker confirmed the message.
    #[default]
    None,
    /// Request-reply: the reply is the response, within the route's timeout.
    Sync,
    /// 202 with a `Location` to an operation resource that holds the reply once it came.
    Async,
}

/// A route's `publish = { … }`. Which keys apply depends on the broker's kind: NATS takes
/// `subject` (and `jetstream`), AMQP `exchange` and `routing_key`, MQTT `topic` and `qos`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishConfig {
    /// A `[brokers.NAME]`.
    pub(crate) broker: Spanned<String>,
    /// NATS: the subject.
    pub(crate) subject: Option<Spanned<String>>,
    /// NATS: publish to JetStream and answer only once a stream stored the message.
    #[serde(default)]
    pub(crate) jetstream: bool,
    /// AMQP: the exchange (`""` is the default exchange, which routes by queue name).
    pub(crate) exchange: Option<Spanned<String>>,
    /// AMQP: the routing key.
    pub(crate) routing_key: Option<Spanned<String>>,
    /// MQTT: the topic (no wildcards).
    pub(crate) topic: Option<Spanned<String>>,
    /// MQTT: 1 (default: 202 once the broker's PUBACK came) or 0 (once written; at most once).
    pub(crate) qos: Option<Spanned<u8>>,
    /// `none` (default), `sync` or `async`.
    pub(crate) reply: Option<Spanned<ReplyMode>>,
    /// `reply = "async"`: how long an operation (pending or with its result) can be read.
    #[serde(default = "d_600s")]
    pub(crate) result_ttl: Duration,
}

/// One `[[consumer]]`: messages of a JetStream subject delivered to a service over HTTP.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConsumerConfig {
    /// A `[brokers.NAME]`.
    pub(crate) broker: Spanned<String>,
    /// NATS: the subject (a JetStream stream must store it).
    pub(crate) subject: Option<Spanned<String>>,
    /// AMQP: the queue (it must exist).
    pub(crate) queue: Option<Spanned<String>>,
    /// The `[services.NAME]` the messages go to.
    pub(crate) service: Spanned<String>,
    /// The path each message is `POST`ed to.
    pub(crate) path: Spanned<String>,
    /// The durable consumer's name (default: `gatehouse-SERVICE-SUBJECT`).
    pub(crate) name: Option<Spanned<String>>,
    /// Deliveries of one message before it goes to `dead_letter`.
    #[serde(default = "five")]
    pub(crate) max_attempts: u32,
    /// Where a message goes after its last failed delivery (else it is dropped): a subject on
    /// NATS, a queue on AMQP.
    pub(crate) dead_letter: Option<Spanned<String>>,
    /// Deliveries at once.
    #[serde(default = "sixteen")]
    pub(crate) max_in_flight: usize,
    /// The wait before the second delivery; doubled for each further one.
    #[serde(default = "d_1s")]
    pub(crate) backoff: Duration,
    #[serde(default = "d_30s")]
    pub(crate) max_backoff: Duration,
    /// One delivery (the service's answer read) at most this long.
    #[serde(default = "d_30s")]
    pub(crate) timeout: Duration,
}
