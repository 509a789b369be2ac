//! `publish = { broker, … }`: a client's command handed to a message broker, answered 202 only
//! once the broker confirmed it — a JetStream stream stored it (`PubAck`), RabbitMQ confirmed
//! it (publisher confirm; an unroutable message is returned and refused), an MQTT broker sent
//! its PUBACK (QoS 1); on core NATS (which stores and confirms nothing) once it was flushed to
//! the connection it was queued on. The dedup id (`Nats-Msg-Id`, AMQP `message_id`) is the
//! client's `Idempotency-Key` scoped to the route and the client's identity (else the request
//! id), so a client's retry within JetStream's duplicate window is stored once. A broker that
//! is away, or no confirmation in time, is 503: a 202 is never given for a message that may
//! be lost.
//!
//! `reply = "sync"` makes a NATS route a request-reply within the route's deadline (`nats.rs`);
//! `reply = "async"` answers 202 with a `Location` to an operation the service's reply fills
//! (`operations.rs`). Each kind of broker has its file: `nats.rs`, `amqp.rs`, `mqtt.rs`.

mod amqp;
mod message;
mod mqtt;
mod nats;
pub(crate) mod operations;

pub(crate) use message::hex;
use message::{idempotency_key, message_headers, scoped_id};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::RespBody;
use crate::body::ReqBody;
use crate::config::{PublishConfig, ReplyMode};
use crate::context::Exchange;
use crate::error::{BoxError, Problem};

use crate::upstream::broker::{valid_subject, Broker, Kind};
use operations::Replies;

#[derive(Clone)]
pub(crate) struct Publish(Arc<Plan>);

struct Plan {
    /// `frontend/route`: scopes the message id of an `Idempotency-Key`.
    route: Arc<str>,
    broker: Arc<Broker>,
    target: Target,
    /// The route's deadline, for request-reply.
    deadline: Duration,
    /// `reply = "async"`: where replies are collected, and how long an operation lives.
    replies: Option<(Arc<Replies>, Duration)>,
}

/// Where a message goes, by the broker's kind.
enum Target {
    Nats {
        subject: async_nats::Subject,
        jetstream: bool,
        sync: bool,
    },
    Amqp {
        exchange: String,
        routing_key: String,
        sync: bool,
    },
    Mqtt {
        topic: Arc<str>,
        qos: rumqttc::QoS,
    },
}

/// Why a `publish` route cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishConfigError {
    #[error("unknown broker `{0}` (defined brokers: {1})")]
    UnknownBroker(String, String),
    #[error("subject `{0}` is not a NATS subject (tokens of letters, digits, `-`, `_` separated by `.`; no wildcards)")]
    Subject(String),
    #[error(
        "topic `{0}` is not an MQTT topic to publish to (1 to 65535 bytes, no `+`, `#` or NUL)"
    )]
    Topic(String),
    #[error("`{0}` is not an AMQP name (at most 255 visible ASCII characters)")]
    AmqpName(String),
    #[error("broker `{0}` is {1}: {2}")]
    Keys(String, &'static str, &'static str),
    #[error("qos must be 0 or 1 (QoS 2 is not offered: its exactly-once needs the broker's session across reconnects)")]
    Qos,
    #[error(
        "reply = \"{0}\" is offered on NATS and AMQP brokers only (MQTT 3.1.1 has no reply address)"
    )]
    ReplyKind(&'static str),
    #[error(
        "reply = \"sync\" is a NATS request-reply and cannot be combined with jetstream = true"
    )]
    SyncJetStream,
    #[error("reply = \"async\" adds `…/operations/{{operation}}` after the route's path: the path cannot end in a `{{*…}}` catch-all or capture `{{operation}}`")]
    AsyncPath,
}

/// What a publish route is built from.
pub(crate) struct PublishFacts<'a> {
    /// `frontend/route`.
    pub(crate) route: &'a str,
    pub(crate) brokers: &'a std::collections::BTreeMap<String, Arc<Broker>>,
    /// `[brokers.NAME]` → its kind, for every broker gateway.toml defines (built or not).
    pub(crate) defined: &'a std::collections::BTreeMap<&'a str, Option<Kind>>,
    pub(crate) replies: &'a std::collections::BTreeMap<String, Arc<Replies>>,
    pub(crate) deadline: Duration,
    /// The route's full path (its frontend's prefix included), for `Location`.
    pub(crate) full_path: &'a str,
}

type Located = (std::ops::Range<usize>, PublishConfigError);

/// Builds a route's `publish` backend; `brokers` are the `[brokers.*]` that connected.
pub(crate) fn build(f: &PublishFacts<'_>, cfg: &PublishConfig) -> Result<Option<Publish>, Located> {
    let name = cfg.broker.get_ref();
    let Some(kind) = f.defined.get(name.as_str()) else {
        let list = if f.defined.is_empty() {
            "none".to_owned()
        } else {
            f.defined.keys().copied().collect::<Vec<_>>().join(", ")
        };
        return Err((
            cfg.broker.span(),
            PublishConfigError::UnknownBroker(name.clone(), list),
        ));
    };
    // A broker whose URL is wrong has its own error.
    let Some(kind) = *kind else { return Ok(None) };
    let reply = cfg.reply.as_ref().map_or(ReplyMode::None, |r| *r.get_ref());
    let target = target(kind, name, cfg)?;
    if let Some(r) = &cfg.reply {
        if *r.get_ref() != ReplyMode::None && kind == Kind::Mqtt {
            let mode = if *r.get_ref() == ReplyMode::Sync {
                "sync"
            } else {
                "async"
            };
            return Err((r.span(), PublishConfigError::ReplyKind(mode)));
        }
        if *r.get_ref() == ReplyMode::Sync && cfg.jetstream {
            return Err((r.span(), PublishConfigError::SyncJetStream));
        }
    }
    if reply == ReplyMode::Async {
        // `…/operations/{operation}` is added after the route's path: that path cannot end in a
        // catch-all, nor capture a parameter of that name.
        if f.full_path.contains("{*") || f.full_path.contains(&format!("{{{}}}", operations::PARAM))
        {
            return Err((
                cfg.reply.as_ref().map_or(cfg.broker.span(), |r| r.span()),
                PublishConfigError::AsyncPath,
            ));
        }
    }
    // A defined broker that was not built has its own error.
    let Some(broker) = f.brokers.get(name) else {
        return Ok(None);
    };
    let replies = if reply == ReplyMode::Async {
        let Some(r) = f.replies.get(name) else {
            return Ok(None);
        };
        Some((r.clone(), cfg.result_ttl.get()))
    } else {
        None
    };
    Ok(Some(Publish(Arc::new(Plan {
        route: f.route.into(),
        broker: broker.clone(),
        target,
        deadline: f.deadline,
        replies,
    }))))
}

/// The target of `cfg` on a broker of `kind`, its keys checked.
fn target(kind: Kind, name: &str, cfg: &PublishConfig) -> Result<Target, Located> {
    let wrong = |span, want| {
        Err((
            span,
            PublishConfigError::Keys(name.to_owned(), kind.name(), want),
        ))
    };
    let amqp_keys = cfg.exchange.as_ref().or(cfg.routing_key.as_ref());
    let mqtt_keys = cfg
        .topic
        .as_ref()
        .map(|t| t.span())
        .or(cfg.qos.as_ref().map(|q| q.span()));
    match kind {
        Kind::Nats => {
            const WANT: &str =
                "set `subject` (and `jetstream`), not `exchange`, `routing_key`, `topic` or `qos`";
            if let Some(k) = amqp_keys {
                return wrong(k.span(), WANT);
            }
            if let Some(span) = mqtt_keys {
                return wrong(span, WANT);
            }
            let Some(subject) = &cfg.subject else {
                return wrong(cfg.broker.span(), WANT);
            };
            if !valid_subject(subject.get_ref()) {
                return Err((
                    subject.span(),
                    PublishConfigError::Subject(subject.get_ref().clone()),
                ));
            }
            Ok(Target::Nats {
                subject: async_nats::Subject::from(subject.get_ref().as_str()),
                jetstream: cfg.jetstream,
                sync: cfg
                    .reply
                    .as_ref()
                    .is_some_and(|r| *r.get_ref() == ReplyMode::Sync),
            })
        }
        Kind::Amqp => {
            const WANT: &str =
                "set `exchange` and `routing_key`, not `subject`, `jetstream`, `topic` or `qos`";
            if let Some(s) = &cfg.subject {
                return wrong(s.span(), WANT);
            }
            if let Some(span) = mqtt_keys {
                return wrong(span, WANT);
            }
            let (Some(exchange), Some(routing_key)) = (&cfg.exchange, &cfg.routing_key) else {
                return wrong(cfg.broker.span(), WANT);
            };
            if cfg.jetstream {
                return wrong(cfg.broker.span(), WANT);
            }
            for n in [exchange, routing_key] {
                if !amqp::valid_name(n.get_ref()) {
                    return Err((n.span(), PublishConfigError::AmqpName(n.get_ref().clone())));
                }
            }
            Ok(Target::Amqp {
                exchange: exchange.get_ref().clone(),
                routing_key: routing_key.get_ref().clone(),
                sync: cfg
                    .reply
                    .as_ref()
                    .is_some_and(|r| *r.get_ref() == ReplyMode::Sync),
            })
        }
        Kind::Mqtt => {
            const WANT: &str =
                "set `topic` (and `qos`), not `subject`, `jetstream`, `exchange` or `routing_key`";
            if let Some(s) = &cfg.subject {
                return wrong(s.span(), WANT);
            }
            if let Some(k) = amqp_keys {
                return wrong(k.span(), WANT);
            }
            let Some(topic) = &cfg.topic else {
                return wrong(cfg.broker.span(), WANT);
            };
            if cfg.jetstream {
                return wrong(cfg.broker.span(), WANT);
            }
            if !crate::upstream::broker::mqtt::valid_topic(topic.get_ref()) {
                return Err((
                    topic.span(),
                    PublishConfigError::Topic(topic.get_ref().clone()),
                ));
            }
            let qos = match cfg.qos.as_ref().map(|q| (*q.get_ref(), q.span())) {
                None | Some((1, _)) => rumqttc::QoS::AtLeastOnce,
                Some((0, _)) => rumqttc::QoS::AtMostOnce,
                Some((_, span)) => return Err((span, PublishConfigError::Qos)),
            };
            Ok(Target::Mqtt {
                topic: topic.get_ref().as_str().into(),
                qos,
            })
        }
    }
}

impl Publish {
    /// Where an async route's replies are collected (`None` without `reply = "async"`).
    pub(crate) fn replies(&self) -> Option<Arc<Replies>> {
        self.0.replies.as_ref().map(|(r, _)| r.clone())
    }
}

/// Starts (or takes over) the reply collection of each broker (NATS or AMQP) that a
/// `reply = "async"` route publishes to. Kept across reloads while the broker and `[redis]` are unchanged.
pub(crate) fn build_replies(
    loaded: &crate::config::LoadedConfig,
    previous: Option<&crate::resources::Resources>,
    resources: &mut crate::resources::Resources,
    brokers: &std::collections::BTreeMap<String, Arc<Broker>>,
) -> std::collections::BTreeMap<String, Arc<Replies>> {
    use crate::config::BackendConfig;
    let mut out = std::collections::BTreeMap::new();
    let g = &loaded.gateway;
    for (_, ff) in &loaded.frontends {
        for r in &ff.route {
            let BackendConfig::Publish(p) = &r.get_ref().backend else {
                continue;
            };
            let p = p.get_ref();
            if p.reply.as_ref().map(|r| *r.get_ref()) != Some(ReplyMode::Async) {
                continue;
            }
            let name = p.broker.get_ref();
            let (Some(broker), Some(cfg)) = (brokers.get(name), g.brokers.get(name)) else {
                continue;
            };
            if out.contains_key(name) || broker.kind() == Kind::Mqtt {
                continue;
            }
            let redis = resources.get::<crate::upstream::redis::RedisStore>("redis");
            let key = (
                cfg.get_ref().clone(),
                g.redis.as_ref().map(|r| r.get_ref().clone()),
            );
            let built = resources.reuse_or_build(previous, name, &key, |_| {
                Replies::start(broker, redis).ok_or(())
            });
            if let Ok((r, _)) = built {
                out.insert(name.clone(), r);
            }
        }
    }
    out
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

impl tower::Service<Request<ReqBody>> for Publish {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        Box::pin(self.0.clone().run(req))
    }
}

fn unavailable(detail: &str) -> BoxError {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        "The message broker did not take the message",
    )
    .member("detail", detail.to_owned())
    .retry_after(1)
    .into()
}

/// A message the broker refused for good (no stream stores the subject, no exchange or queue
/// takes the routing key): a setup mistake, not a passing failure, so no `Retry-After`.
fn rejected(title: &'static str) -> BoxError {
    Problem::new(StatusCode::BAD_GATEWAY, "publish_rejected", title).into()
}

fn too_large(max: usize) -> BoxError {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "message_too_large",
        "The message is larger than the broker takes",
    )
    .member("max_message_size", max)
    .into()
}

/// A message on its way: what every kind of broker sends.
struct Message {
    /// The id the client sees: its key, or the request id.
    id: String,
    /// The broker's dedup id: the key scoped to the route and the client's identity.
    msg_id: String,
    headers: Vec<(&'static str, String)>,
    body: bytes::Bytes,
}

impl Plan {
    async fn run(self: Arc<Self>, req: Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let Some(x) = req.extensions().get::<Exchange>().cloned() else {
            return Err("a publish request has no exchange".into());
        };
        let key = idempotency_key(req.headers())?;
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        // The id the client sees: its key, or the request id. The broker's dedup id is the key
        // scoped to this route and the client's identity, so two clients' keys never collide.
        let id = key
            .clone()
            .unwrap_or_else(|| String::from_utf8_lossy(x.request_id().as_bytes()).into_owned());
        // Without a key, no dedup: a random id (a request id may come from a trusted proxy, and
        // two clients' ids must not make one message a duplicate of the other's).
        let msg_id = match &key {
            Some(k) => scoped_id(&self.route, &x, k),
            None => {
                let mut raw = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
                    .map_err(|_| "no randomness for a message id")?;
                hex(&raw)
            }
        };
        let headers = message_headers(&parts.headers, &x, &id, key.is_some());
        let b = &self.broker;
        if !b.connected() {
            b.count(crate::upstream::broker::Outcome::Unavailable);
            return Err(unavailable("the broker is not connected"));
        }
        let msg = Message {
            id,
            msg_id,
            headers,
            body,
        };
        let mut doc = serde_json::Map::new();
        doc.insert("id".into(), msg.id.clone().into());
        doc.insert("broker".into(), (&*b.name).into());
        let mut location = None;
        match &self.target {
            Target::Nats {
                subject,
                jetstream,
                sync,
            } => {
                if *sync {
                    return nats::request(self.as_ref(), subject, msg, &x).await;
                }
                doc.insert("subject".into(), subject.as_str().into());
                let reply = match &self.replies {
                    Some((r, ttl)) => {
                        let op = r.create(&x, *ttl).await?;
                        location = Some(operation_location(&parts.uri, &op.id));
                        doc.insert("operation".into(), op.id.as_str().into());
                        op.reply_subject
                    }
                    None => None,
                };
                let sent = if *jetstream {
                    nats::jetstream(b, subject, msg, reply).await
                } else {
                    nats::core(b, subject, msg, reply)
                        .await
                        .map(|()| serde_json::Map::new())
                };
                let confirmed = self.forget_on_error(sent, &doc).await?;
                doc.extend(confirmed);
            }
            Target::Amqp {
                exchange,
                routing_key,
                sync,
            } => {
                if *sync {
                    return amqp::request(self.as_ref(), exchange, routing_key, msg, &x).await;
                }
                doc.insert("exchange".into(), exchange.as_str().into());
                doc.insert("routing_key".into(), routing_key.as_str().into());
                let correlation = match &self.replies {
                    Some((r, ttl)) => {
                        let op = r.create(&x, *ttl).await?;
                        location = Some(operation_location(&parts.uri, &op.id));
                        doc.insert("operation".into(), op.id.as_str().into());
                        Some(op.id)
                    }
                    None => None,
                };
                let sent =
                    amqp::publish(b, exchange, routing_key, msg, correlation.as_deref()).await;
                self.forget_on_error(sent, &doc).await?;
            }
            Target::Mqtt { topic, qos } => {
                doc.insert("topic".into(), (&**topic).into());
                mqtt::publish(b, topic, *qos, msg).await?;
            }
        }
        let mut resp = Response::new(super::full(
            serde_json::to_vec(&serde_json::Value::Object(doc)).unwrap_or_default(),
        ));
        *resp.status_mut() = StatusCode::ACCEPTED;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(l) = location.and_then(|l| HeaderValue::try_from(l).ok()) {
            h.insert(header::LOCATION, l);
        }
        Ok(resp)
    }
}

/// Where an operation is read: under the path the request came to (a route's path may hold
/// parameters, so the template alone would not do). Built only for `reply = "async"` routes.
fn operation_location(uri: &http::Uri, id: &str) -> String {
    format!("{}/operations/{id}", uri.path().trim_end_matches('/'))
}

impl Plan {
    /// A publish that failed leaves no operation behind.
    async fn forget_on_error<T>(
        &self,
        sent: Result<T, BoxError>,
        doc: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<T, BoxError> {
        if sent.is_err() {
            if let (Some((r, _)), Some(op)) =
                (&self.replies, doc.get("operation").and_then(|o| o.as_str()))
            {
                r.forget(op).await;
            }
        }
        sent
    }
}
