//! `publish = { broker, subject, jetstream, reply }`: a client's command handed to a message
//! broker (NATS), answered 202 only once the broker confirmed it — a JetStream stream stored
//! it (`PubAck`); on core NATS (which stores and confirms nothing) once it was flushed to the
//! connection it was queued on. The dedup id (`Nats-Msg-Id`) is the client's
//! `Idempotency-Key` scoped to the route and the client's identity (else the request id), so
//! a client's retry within the stream's duplicate window is stored once. `reply = "sync"` makes the route
//! a NATS request-reply within the route's deadline. A broker that is away, or no confirmation
//! in time, is 503: a 202 is never given for a message that may be lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::RespBody;
use crate::body::ReqBody;
use crate::config::{PublishConfig, ReplyMode};
use crate::context::Exchange;
use crate::error::{BoxError, GatewayError, Problem};

use crate::upstream::broker::{valid_subject, Broker, Outcome};

#[derive(Clone)]
pub(crate) struct Publish(Arc<Plan>);

struct Plan {
    /// `frontend/route`: scopes the message id of an `Idempotency-Key`.
    route: Arc<str>,
    broker: Arc<Broker>,
    subject: async_nats::Subject,
    jetstream: bool,
    sync: bool,
    /// The route's deadline, for request-reply.
    deadline: Duration,
}

/// Why a `publish` route cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishConfigError {
    #[error("unknown broker `{0}` (defined brokers: {1})")]
    UnknownBroker(String, String),
    #[error("subject `{0}` is not a NATS subject (tokens of letters, digits, `-`, `_` separated by `.`; no wildcards)")]
    Subject(String),
    #[error("reply = \"async\" is not built yet; use \"none\" or \"sync\"")]
    Async,
    #[error(
        "reply = \"sync\" is a NATS request-reply and cannot be combined with jetstream = true"
    )]
    SyncJetStream,
}

/// Builds a route's `publish` backend; `brokers` are the `[brokers.*]` that connected.
pub(crate) fn build(
    route: &str,
    cfg: &PublishConfig,
    brokers: &std::collections::BTreeMap<String, Arc<Broker>>,
    defined: &[&str],
    deadline: Duration,
) -> Result<Option<Publish>, (std::ops::Range<usize>, PublishConfigError)> {
    let name = cfg.broker.get_ref();
    if !defined.contains(&name.as_str()) {
        let list = if defined.is_empty() {
            "none".to_owned()
        } else {
            defined.join(", ")
        };
        return Err((
            cfg.broker.span(),
            PublishConfigError::UnknownBroker(name.clone(), list),
        ));
    }
    let subject = cfg.subject.get_ref();
    if !valid_subject(subject) {
        return Err((
            cfg.subject.span(),
            PublishConfigError::Subject(subject.clone()),
        ));
    }
    if let Some(r) = &cfg.reply {
        if *r.get_ref() == ReplyMode::Async {
            return Err((r.span(), PublishConfigError::Async));
        }
        if *r.get_ref() == ReplyMode::Sync && cfg.jetstream {
            return Err((r.span(), PublishConfigError::SyncJetStream));
        }
    }
    // A defined broker that was not built has its own error.
    let Some(broker) = brokers.get(name) else {
        return Ok(None);
    };
    Ok(Some(Publish(Arc::new(Plan {
        route: route.into(),
        broker: broker.clone(),
        subject: async_nats::Subject::from(subject.as_str()),
        jetstream: cfg.jetstream,
        sync: cfg
            .reply
            .as_ref()
            .is_some_and(|r| *r.get_ref() == ReplyMode::Sync),
        deadline,
    }))))
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

/// An `Idempotency-Key` usable as a message id: 1–200 visible ASCII characters.
fn idempotency_key(h: &HeaderMap) -> Result<Option<String>, BoxError> {
    let Some(v) = h.get("idempotency-key") else {
        return Ok(None);
    };
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 200 || !b.iter().all(|c| c.is_ascii_graphic()) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "The Idempotency-Key must be 1 to 200 visible ASCII characters",
        )
        .into());
    }
    Ok(Some(String::from_utf8_lossy(b).into_owned()))
}

impl Plan {
    async fn run(self: Arc<Self>, req: Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let Some(x) = req.extensions().get::<Exchange>().cloned() else {
            return Err("a publish request has no exchange".into());
        };
        let key = idempotency_key(req.headers())?;
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        let b = &self.broker;
        // Over the server's limit a message would make it close the connection every publish
        // shares: refused here instead.
        let max = b.client.server_info().max_payload;
        if max > 0 && body.len() > max.saturating_sub(4096) {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                "The message is larger than the broker takes",
            )
            .member("max_message_size", max.saturating_sub(4096))
            .into());
        }
        // The id the client sees: its key, or the request id. The broker's dedup id is the key
        // scoped to this route and the client's identity, so two clients' keys never collide.
        let id = key
            .clone()
            .unwrap_or_else(|| String::from_utf8_lossy(x.request_id().as_bytes()).into_owned());
        let msg_id = match &key {
            Some(k) => scoped_id(&self.route, &x, k),
            None => id.clone(),
        };
        let headers = message_headers(&parts.headers, &x, &id, key.is_some());
        if !b.connected() {
            b.count(Outcome::Unavailable);
            return Err(unavailable("the broker is not connected"));
        }
        if self.sync {
            return self.request(headers, body, &x).await;
        }
        let confirmed = if self.jetstream {
            self.jetstream(headers, body, &msg_id).await?
        } else {
            self.core(headers, body).await?;
            serde_json::Map::new()
        };
        let mut doc = serde_json::Map::new();
        doc.insert("id".into(), id.into());
        doc.insert("broker".into(), (&*b.name).into());
        doc.insert("subject".into(), self.subject.as_str().into());
        doc.extend(confirmed);
        let mut resp = Response::new(super::full(
            serde_json::to_vec(&serde_json::Value::Object(doc)).unwrap_or_default(),
        ));
        *resp.status_mut() = StatusCode::ACCEPTED;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    }

    /// JetStream: stored by a stream (or found a duplicate of `id` in its window).
    async fn jetstream(
        &self,
        headers: async_nats::HeaderMap,
        body: Bytes,
        id: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, BoxError> {
        let b = &self.broker;
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(body)
            .headers(headers)
            .message_id(id);
        let send = async {
            let ack = b
                .jetstream
                .send_publish(self.subject.clone(), publish)
                .await?;
            ack.await
        };
        let ack = match tokio::time::timeout(b.publish_timeout, send).await {
            Ok(Ok(ack)) => ack,
            Ok(Err(e)) => {
                use async_nats::jetstream::context::PublishErrorKind as K;
                let detail = match e.kind() {
                    K::StreamNotFound => {
                        // A setup mistake, not a passing failure: no Retry-After.
                        b.count(Outcome::Rejected);
                        return Err(Problem::new(
                            StatusCode::BAD_GATEWAY,
                            "publish_rejected",
                            "No stream of the broker stores this subject",
                        )
                        .into());
                    }
                    K::TimedOut => "no confirmation in time",
                    _ => "the broker refused the message",
                };
                b.count(Outcome::Unavailable);
                return Err(unavailable(detail));
            }
            Err(_) => {
                b.count(Outcome::Timeout);
                return Err(unavailable("no confirmation in time"));
            }
        };
        b.count(if ack.duplicate {
            Outcome::Duplicate
        } else {
            Outcome::Confirmed
        });
        let mut m = serde_json::Map::new();
        m.insert("stream".into(), ack.stream.into());
        m.insert("sequence".into(), ack.sequence.into());
        m.insert("duplicate".into(), ack.duplicate.into());
        Ok(m)
    }

    /// Core NATS: written to the server's connection (flushed), on the same connection it was
    /// queued on — a reconnect in between may have lost it, and then it is 503. Core NATS keeps
    /// nothing: at most once; JetStream is for messages that must not be lost.
    async fn core(&self, headers: async_nats::HeaderMap, body: Bytes) -> Result<(), BoxError> {
        use std::sync::atomic::Ordering;
        let b = &self.broker;
        let stats = b.client.statistics();
        let connects = stats.connects.load(Ordering::Relaxed);
        let send = async {
            b.client
                .publish_with_headers(self.subject.clone(), headers, body)
                .await
                .map_err(|_| ())?;
            b.client.flush().await.map_err(|_| ())?;
            if stats.connects.load(Ordering::Relaxed) != connects {
                return Err(());
            }
            Ok(())
        };
        match tokio::time::timeout(b.publish_timeout, send).await {
            Ok(Ok(())) => {
                b.count(Outcome::Confirmed);
                Ok(())
            }
            Ok(Err(())) => {
                b.count(Outcome::Unavailable);
                Err(unavailable("the broker refused the message"))
            }
            Err(_) => {
                b.count(Outcome::Timeout);
                Err(unavailable("no confirmation in time"))
            }
        }
    }

    /// Request-reply within what is left of the route's deadline.
    async fn request(
        &self,
        headers: async_nats::HeaderMap,
        body: Bytes,
        x: &Exchange,
    ) -> Result<Response<RespBody>, BoxError> {
        let b = &self.broker;
        let left = self
            .deadline
            .saturating_sub(x.started().elapsed())
            .max(Duration::from_millis(1));
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body)
            .timeout(Some(left));
        let reply = match b.client.send_request(self.subject.clone(), request).await {
            Ok(m) => m,
            Err(e) => {
                use async_nats::RequestErrorKind as K;
                return Err(match e.kind() {
                    K::TimedOut => {
                        b.count(Outcome::Timeout);
                        GatewayError::UpstreamTimeout.into()
                    }
                    K::NoResponders => {
                        b.count(Outcome::NoResponders);
                        Problem::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no_responders",
                            "No service answers this subject",
                        )
                        .retry_after(1)
                        .into()
                    }
                    _ => {
                        b.count(Outcome::Unavailable);
                        unavailable("the request could not be sent")
                    }
                });
            }
        };
        b.count(Outcome::Replied);
        let mut resp = Response::new(super::full(reply.payload));
        let rh = reply.headers.as_ref();
        let status = rh
            .and_then(|h| h.get("Gatehouse-Status"))
            .and_then(|v| v.as_str().parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .filter(|s| (200..=599).contains(&s.as_u16()))
            .unwrap_or(StatusCode::OK);
        *resp.status_mut() = status;
        let ct = rh
            .and_then(|h| h.get("Content-Type"))
            .and_then(|v| HeaderValue::from_str(v.as_str()).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
        Ok(resp)
    }
}

/// The message's headers: its id, the request's content type, the forwarding headers
/// (`X-Request-Id`, `traceparent`, `X-Forwarded-*`) and the identity auth found.
fn message_headers(
    h: &HeaderMap,
    x: &Exchange,
    id: &str,
    from_client: bool,
) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    // The request's own forwarding headers (a trusted proxy's are extended, others replaced).
    let mut fwd = HeaderMap::new();
    for name in [
        "traceparent",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ] {
        if let Some(v) = h.get(name) {
            fwd.insert(name, v.clone());
        }
    }
    super::forward::forwarding_headers(&mut fwd, x);
    // NATS header names are case-sensitive: written in their usual spelling.
    for (name, spelled) in [
        ("x-request-id", "X-Request-Id"),
        ("x-forwarded-for", "X-Forwarded-For"),
        ("x-forwarded-proto", "X-Forwarded-Proto"),
        ("x-forwarded-host", "X-Forwarded-Host"),
        ("traceparent", "traceparent"),
    ] {
        if let Some(v) = fwd.get(name).and_then(|v| v.to_str().ok()) {
            insert(&mut out, spelled, v);
        }
    }
    if let Some(ct) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        insert(&mut out, "Content-Type", ct);
    }
    if from_client {
        insert(&mut out, "Idempotency-Key", id);
    }
    if let Some(identity) = x.identity() {
        if let Some(c) = &identity.consumer {
            insert(&mut out, "Gatehouse-Consumer", c);
        }
        if let Some(sub) = identity
            .claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(|s| s.as_str())
            .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
        {
            insert(&mut out, "Gatehouse-Subject", sub);
        }
    }
    out
}

/// Sets a message header whose value is visible ASCII or spaces only: nothing from a client
/// can end a header line early and add one of its own (`Nats-Expected-*`, `Nats-Rollup`).
fn insert(out: &mut async_nats::HeaderMap, name: &'static str, value: &str) {
    if value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    {
        out.insert(name, value);
    }
}

/// The broker's dedup id for a client's `Idempotency-Key`: the key scoped to the route and the
/// client's identity (its API-key consumer or JWT subject; else its address), hashed.
fn scoped_id(route: &str, x: &Exchange, key: &str) -> String {
    let who = x
        .identity()
        .and_then(|i| {
            i.consumer.as_deref().map(str::to_owned).or_else(|| {
                i.claims
                    .as_ref()
                    .and_then(|c| c.get("sub"))
                    .and_then(|s| s.as_str())
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| String::from_utf8_lossy(x.client().peer_ip.as_bytes()).into_owned());
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [route, "\n", &who, "\n", key] {
        ctx.update(part.as_bytes());
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in ctx.finish().as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}
