//! `[brokers.NAME]` (connections to message brokers) and a route's `publish = { … }` backend.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::defaults::*;
use super::units::Duration;

/// `[brokers.NAME]`: one broker connection, shared by the routes that publish to it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrokerConfig {
    /// `nats://HOST:PORT` (several, comma-separated, for a cluster).
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
    /// 202 with a `Location` to poll for the reply (not built yet: a config error).
    Async,
}

/// A route's `publish = { … }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishConfig {
    /// A `[brokers.NAME]`.
    pub(crate) broker: Spanned<String>,
    /// The NATS subject.
    pub(crate) subject: Spanned<String>,
    /// Publish to JetStream and answer only once a stream stored the message.
    #[serde(default)]
    pub(crate) jetstream: bool,
    /// `none` (default), `sync` or `async`.
    pub(crate) reply: Option<Spanned<ReplyMode>>,
}
