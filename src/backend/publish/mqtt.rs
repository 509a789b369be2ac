//! Publishing to an MQTT broker: QoS 1 (default) answers 202 once the broker's PUBACK for this
//! message came, QoS 0 once it was written. MQTT 3.1.1 has no message headers: the body goes
//! as it is, and the id (the `Idempotency-Key` or the request id) is only in the answer.

use std::sync::Arc;

use rumqttc::QoS;

use super::{too_large, unavailable, Message};
use crate::error::BoxError;
use crate::upstream::broker::mqtt::{MqttError, MAX_PACKET};
use crate::upstream::broker::{Broker, Conn, Outcome};

pub(super) async fn publish(
    b: &Broker,
    topic: &Arc<str>,
    qos: QoS,
    msg: Message,
) -> Result<(), BoxError> {
    let Conn::Mqtt(m) = &b.conn else {
        return Err("an MQTT route on a broker of another kind".into());
    };
    match tokio::time::timeout(b.publish_timeout, m.publish(topic.clone(), qos, msg.body)).await {
        Ok(Ok(())) => {
            b.count(Outcome::Confirmed);
            Ok(())
        }
        Ok(Err(MqttError::TooLarge)) => Err(too_large(MAX_PACKET - topic.len() - 8)),
        Ok(Err(MqttError::Unavailable)) => {
            b.count(Outcome::Unavailable);
            Err(unavailable("the broker is not connected"))
        }
        Err(_) => {
            b.count(Outcome::Timeout);
            Err(unavailable("no confirmation in time"))
        }
    }
}
