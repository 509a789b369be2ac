//! A `[[consumer]]` on an AMQP queue: a channel of its own on the broker's connection, a
//! prefetch of `max_in_flight`, manual acks. AMQP has no delayed redelivery, and a classic
//! queue no delivery count, so a failed delivery waits its backoff (unacked: a gateway that
//! dies meanwhile lets the broker deliver it again), then a copy with the next attempt number
//! (`x-gatehouse-delivery`) goes back to the queue, and the original is acked only once the
//! broker confirmed the copy. The `max_attempts`-th failure goes the same way to
//! `dead_letter` (a queue); without one, the message is rejected (the queue's own
//! dead-letter exchange, if any, takes it).

use bytes::Bytes;
use http::header::HeaderValue;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use super::consumer::{Bridge, ACKED, DEAD_LETTERED, RETRIED};
use crate::upstream::broker::amqp::Sent;
use crate::upstream::broker::Conn;

const ATTEMPT: &str = "x-gatehouse-delivery";

/// Opens the consumer's channel and starts consuming `queue` (which must exist).
pub(super) async fn setup(
    b: &Bridge,
    queue: &str,
) -> Result<(lapin::Consumer, lapin::Channel), String> {
    let Conn::Amqp(a) = &b.broker.conn else {
        return Err("an AMQP consumer on a broker of another kind".into());
    };
    let live = a.live().ok_or("the broker is not connected")?;
    let ch = live
        .conn
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let prefetch = u16::try_from(b.s.max_in_flight).unwrap_or(u16::MAX);
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("queue `{queue}`: {e}"))?;
    b.pending.set(i64::from(q.message_count()));
    let consumer = ch
        .basic_consume(
            queue.into(),
            b.s.name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((consumer, ch))
}

/// A header of the message as text.
fn header(props: &BasicProperties, name: &str) -> Option<String> {
    let table = props.headers().as_ref()?;
    match table.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        _ => None,
    }
}

pub(super) async fn deliver(b: &Bridge, d: lapin::message::Delivery) {
    let delivered = header(&d.properties, ATTEMPT)
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    let queue = match &b.s.source {
        super::consumer::Source::Queue(q) => q.clone(),
        super::consumer::Source::Subject(_) => return,
    };
    let props = d.properties.clone();
    let get = |name: &str| {
        if name.eq_ignore_ascii_case("content-type") {
            return props
                .content_type()
                .as_ref()
                .and_then(|c| HeaderValue::from_str(c.as_str()).ok());
        }
        header(&props, &name.to_ascii_lowercase()).and_then(|v| HeaderValue::from_str(&v).ok())
    };
    let payload = Bytes::from(d.data.clone());
    let status = b.post(payload.clone(), get, &queue, delivered).await;
    if status.is_some_and(|s| (200..300).contains(&s)) {
        if d.acker.ack(BasicAckOptions::default()).await.is_ok() {
            b.count(ACKED);
        }
        return;
    }
    let last = delivered >= b.s.max_attempts;
    let to = if last {
        match &b.s.dead_letter {
            Some(dl) => dl.clone(),
            None => {
                let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
                b.count(DEAD_LETTERED);
                return;
            }
        }
    } else {
        // Unacked while waiting: a gateway that stops now lets the broker deliver it again.
        tokio::time::sleep(b.delay(delivered)).await;
        queue.clone()
    };
    let mut table = d.properties.headers().clone().unwrap_or_default();
    table.insert(
        ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(delivered) + 1),
    );
    if last {
        table.insert(
            "gatehouse-original-queue".into(),
            AMQPValue::LongString(queue.as_str().into()),
        );
        table.insert(
            "gatehouse-last-status".into(),
            AMQPValue::LongString(status.map_or("none".to_owned(), |s| s.to_string()).into()),
        );
    }
    let copy = d.properties.clone().with_headers(table);
    if republish(b, &to, &d.data, copy).await {
        let _ = d.acker.ack(BasicAckOptions::default()).await;
        b.count(if last { DEAD_LETTERED } else { RETRIED });
    } else {
        // Not stored elsewhere: the broker keeps (and delivers again) the original — after a
        // wait, so that a dead letter queue that is missing is not a tight loop.
        tokio::time::sleep(b.s.max_backoff).await;
        let _ = d
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await;
        b.count(RETRIED);
    }
}

/// Publishes to queue `to` (through the default exchange), confirmed by the broker.
async fn republish(b: &Bridge, to: &str, data: &[u8], props: BasicProperties) -> bool {
    let Conn::Amqp(a) = &b.broker.conn else {
        return false;
    };
    let sent = a
        .confirm(
            "",
            to,
            bytes::Bytes::copy_from_slice(data),
            props,
            b.broker.publish_timeout,
        )
        .await;
    if matches!(sent, Sent::Failed) {
        a.repair();
    }
    matches!(sent, Sent::Confirmed)
}
