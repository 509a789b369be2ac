//! Publishing to an AMQP 0-9-1 broker (RabbitMQ): persistent, `mandatory` (a message no queue
//! takes is returned, and refused with 502), on the broker's confirm-mode channel; 202 once
//! the broker acked it. The dedup id is the message's `message_id` (RabbitMQ keeps no dedup
//! window of its own: a consumer, or a deduplication plugin, can use it).

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};

use super::{rejected, unavailable, Message};
use crate::error::BoxError;
use crate::upstream::broker::{amqp::not_found, Broker, Conn, Outcome};

/// An exchange or routing key: at most 255 bytes (a short string), visible ASCII.
pub(super) fn valid_name(s: &str) -> bool {
    s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

pub(super) async fn publish(
    b: &Broker,
    exchange: &str,
    routing_key: &str,
    msg: Message,
) -> Result<(), BoxError> {
    let Conn::Amqp(a) = &b.conn else {
        return Err("an AMQP route on a broker of another kind".into());
    };
    let Some(live) = a.live() else {
        b.count(Outcome::Unavailable);
        return Err(unavailable("the broker is not connected"));
    };
    let mut table = FieldTable::default();
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(msg.msg_id))
        .with_app_id("gatehouse".into())
        // Persistent: a durable queue keeps it across a broker restart.
        .with_delivery_mode(2);
    for (k, v) in msg.headers {
        if k == "Content-Type" {
            props = props.with_content_type(v.into());
        } else {
            table.insert(
                k.to_ascii_lowercase().into(),
                AMQPValue::LongString(v.into()),
            );
        }
    }
    props = props.with_headers(table);
    let send = async {
        live.publish
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.body,
                props,
            )
            .await?
            .await
    };
    match tokio::time::timeout(b.publish_timeout, send).await {
        Ok(Ok(Confirmation::Ack(None))) => {
            b.count(Outcome::Confirmed);
            Ok(())
        }
        Ok(Ok(Confirmation::Ack(Some(_)))) => {
            b.count(Outcome::Rejected);
            Err(rejected("No queue of the broker takes this routing key"))
        }
        Ok(Ok(Confirmation::Nack(_))) => {
            b.count(Outcome::Unavailable);
            Err(unavailable("the broker refused the message"))
        }
        Ok(Ok(Confirmation::NotRequested)) => {
            // The channel is not in confirm mode: nothing says the broker has it.
            b.count(Outcome::Unavailable);
            a.repair();
            Err(unavailable("no confirmation"))
        }
        Ok(Err(e)) => {
            // Either way the channel is closed now: the broker's task opens another.
            a.repair();
            if not_found(&e) {
                b.count(Outcome::Rejected);
                return Err(rejected("The broker has no such exchange"));
            }
            b.count(Outcome::Unavailable);
            Err(unavailable("the broker refused the message"))
        }
        Err(_) => {
            b.count(Outcome::Timeout);
            Err(unavailable("no confirmation in time"))
        }
    }
}
