//! Publishing to NATS: JetStream (stored, confirmed by a `PubAck`), core NATS (flushed on the
//! connection it was queued on) and request-reply (`reply = "sync"`).

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::{rejected, too_large, unavailable, Message, Plan, RespBody};
use crate::context::Exchange;
use crate::error::{BoxError, GatewayError, Problem};
use crate::upstream::broker::{Broker, Nats, Outcome};

fn nats(b: &Broker) -> Result<&Nats, BoxError> {
    b.nats()
        .ok_or_else(|| "a NATS route on a broker of another kind".into())
}

/// The message's headers as NATS headers (names are case-sensitive: written as given).
fn headers(msg: &Message, reply: Option<&str>) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (k, v) in &msg.headers {
        out.insert(*k, v.as_str());
    }
    if let Some(r) = reply {
        out.insert("Gatehouse-Reply-To", r);
    }
    out
}

/// Over the server's limit a message would make it close the connection every publish
/// shares: refused here instead.
fn check_size(n: &Nats, msg: &Message) -> Result<(), BoxError> {
    let max = n.client.server_info().max_payload;
    if max > 0 && msg.body.len() > max.saturating_sub(4096) {
        return Err(too_large(max.saturating_sub(4096)));
    }
    Ok(())
}

/// JetStream: stored by a stream (or found a duplicate of its id in the stream's window). A
/// reply subject (`reply = "async"`) travels as the `Gatehouse-Reply-To` header: a JetStream
/// publish's own reply subject is where its `PubAck` goes.
pub(super) async fn jetstream(
    b: &Broker,
    subject: &async_nats::Subject,
    msg: Message,
    reply: Option<String>,
) -> Result<serde_json::Map<String, serde_json::Value>, BoxError> {
    let n = nats(b)?;
    check_size(n, &msg)?;
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .headers(headers(&msg, reply.as_deref()))
        .message_id(&msg.msg_id)
        .payload(msg.body);
    let send = async {
        let ack = n.jetstream.send_publish(subject.clone(), publish).await?;
        ack.await
    };
    let ack = match tokio::time::timeout(b.publish_timeout, send).await {
        Ok(Ok(ack)) => ack,
        Ok(Err(e)) => {
            use async_nats::jetstream::context::PublishErrorKind as K;
            let detail = match e.kind() {
                K::StreamNotFound => {
                    b.count(Outcome::Rejected);
                    return Err(rejected("No stream of the broker stores this subject"));
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
pub(super) async fn core(
    b: &Broker,
    subject: &async_nats::Subject,
    msg: Message,
    reply: Option<String>,
) -> Result<(), BoxError> {
    use std::sync::atomic::Ordering;
    let n = nats(b)?;
    check_size(n, &msg)?;
    let stats = n.client.statistics();
    let connects = stats.connects.load(Ordering::Relaxed);
    let h = headers(&msg, reply.as_deref());
    let send = async {
        match reply {
            Some(r) => n
                .client
                .publish_with_reply_and_headers(subject.clone(), r, h, msg.body)
                .await
                .map_err(|_| ())?,
            None => n
                .client
                .publish_with_headers(subject.clone(), h, msg.body)
                .await
                .map_err(|_| ())?,
        }
        n.client.flush().await.map_err(|_| ())?;
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
pub(super) async fn request(
    plan: &Plan,
    subject: &async_nats::Subject,
    msg: Message,
    x: &Exchange,
) -> Result<Response<RespBody>, BoxError> {
    let b = &plan.broker;
    let n = nats(b)?;
    check_size(n, &msg)?;
    let left = plan
        .deadline
        .saturating_sub(x.started().elapsed())
        .max(Duration::from_millis(1));
    let request = async_nats::Request::new()
        .headers(headers(&msg, None))
        .payload(msg.body)
        .timeout(Some(left));
    let reply = match n.client.send_request(subject.clone(), request).await {
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
    let (status, ct) = reply_meta(reply.headers.as_ref());
    let mut resp = Response::new(crate::backend::full(reply.payload));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    Ok(resp)
}

/// A reply's status (`Gatehouse-Status`, 200 when absent or not 200–599) and content type
/// (`Content-Type`, else `application/octet-stream`).
pub(crate) fn reply_meta(h: Option<&async_nats::HeaderMap>) -> (StatusCode, HeaderValue) {
    let status = h
        .and_then(|h| h.get("Gatehouse-Status"))
        .and_then(|v| v.as_str().parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| (200..=599).contains(&s.as_u16()))
        .unwrap_or(StatusCode::OK);
    let ct = h
        .and_then(|h| h.get("Content-Type"))
        .and_then(|v| HeaderValue::from_str(v.as_str()).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (status, ct)
}
