//! Publishing to an AMQP 0-9-1 broker (RabbitMQ): persistent, `mandatory` (a message no queue
//! takes is returned, and refused with 502), on the broker's confirm-mode channel; 202 once
//! the broker acked it. The dedup id is the message's `message_id` (RabbitMQ keeps no dedup
//! window of its own: a consumer, or a deduplication plugin, can use it).

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use super::{rejected, unavailable, Message, Plan, RespBody};
use crate::context::Exchange;
use crate::error::{BoxError, GatewayError};
use crate::upstream::broker::amqp::{Sent, REPLY_TO};
use crate::upstream::broker::{Broker, Conn, Outcome};

/// An exchange or routing key: at most 255 bytes (a short string), visible ASCII.
pub(super) fn valid_name(s: &str) -> bool {
    s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Publishes; with `correlation`, the message asks for a reply (direct reply-to) under that id.
pub(super) async fn publish(
    b: &Broker,
    exchange: &str,
    routing_key: &str,
    msg: Message,
    correlation: Option<&str>,
) -> Result<(), BoxError> {
    let Conn::Amqp(a) = &b.conn else {
        return Err("an AMQP route on a broker of another kind".into());
    };
    let mut table = FieldTable::default();
    let mut props = BasicProperties::default()
        .with_app_id("gatehouse".into())
        // Persistent: a durable queue keeps it across a broker restart.
        .with_delivery_mode(2);
    // Short strings (at most 255 bytes): a longer value from a client is left out.
    if let Ok(id) = ShortString::try_new(msg.msg_id) {
        props = props.with_message_id(id);
    }
    for (k, v) in msg.headers {
        if k == "Content-Type" {
            if let Ok(ct) = ShortString::try_new(v) {
                props = props.with_content_type(ct);
            }
        } else {
            table.insert(
                k.to_ascii_lowercase().into(),
                AMQPValue::LongString(v.into()),
            );
        }
    }
    props = props.with_headers(table);
    if let Some(c) = correlation {
        props = props
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(c.into());
    }
    match a
        .confirm(exchange, routing_key, msg.body, props, b.publish_timeout)
        .await
    {
        Sent::Confirmed => {
            b.count(Outcome::Confirmed);
            Ok(())
        }
        Sent::Returned => {
            b.count(Outcome::Rejected);
            Err(rejected("No queue of the broker takes this routing key"))
        }
        Sent::NotFound => {
            b.count(Outcome::Rejected);
            Err(rejected("The broker has no such exchange"))
        }
        Sent::Failed => {
            b.count(Outcome::Unavailable);
            Err(unavailable("the broker did not take the message"))
        }
        Sent::Timeout => {
            b.count(Outcome::Timeout);
            Err(unavailable("no confirmation in time"))
        }
    }
}

/// RPC (`reply = "sync"`): publishes with a reply address and waits, within what is left of
/// the route's deadline, for the reply with its correlation id.
pub(super) async fn request(
    plan: &Plan,
    exchange: &str,
    routing_key: &str,
    msg: Message,
    x: &Exchange,
) -> Result<Response<RespBody>, BoxError> {
    let b = &plan.broker;
    let Conn::Amqp(a) = &b.conn else {
        return Err("an AMQP route on a broker of another kind".into());
    };
    let mut raw = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| "no randomness for a correlation id")?;
    let id = super::hex(&raw);
    // Registered before the publish: a fast reply is not missed.
    let reply = a.replies.wait(&id);
    struct Forget<'a>(&'a crate::upstream::broker::amqp::Replies, &'a str);
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            self.0.forget(self.1);
        }
    }
    let _forget = Forget(&a.replies, &id);
    publish(b, exchange, routing_key, msg, Some(&id)).await?;
    let left = plan
        .deadline
        .saturating_sub(x.started().elapsed())
        .max(Duration::from_millis(1));
    let reply = match tokio::time::timeout(left, reply).await {
        Ok(Ok(r)) => r,
        // The channel closed (its replies with it) or no reply in time.
        Ok(Err(_)) => {
            b.count(Outcome::Unavailable);
            return Err(unavailable("the broker's reply channel closed"));
        }
        Err(_) => {
            b.count(Outcome::Timeout);
            return Err(GatewayError::UpstreamTimeout.into());
        }
    };
    b.count(Outcome::Replied);
    Ok(reply_response(reply))
}

/// A reply as a response: its `gatehouse-status` (200–599, else 200), content type (else
/// `application/octet-stream`) and body.
pub(crate) fn reply_response(r: crate::upstream::broker::amqp::Reply) -> Response<RespBody> {
    let (status, ct) = reply_meta(&r);
    let mut resp = Response::new(crate::backend::full(r.body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    resp
}

pub(crate) fn reply_meta(r: &crate::upstream::broker::amqp::Reply) -> (StatusCode, HeaderValue) {
    let status = r
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .unwrap_or(StatusCode::OK);
    let ct = r
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (status, ct)
}
