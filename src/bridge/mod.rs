//! Broker → HTTP bridges (`[[consumer]]`): the gateway as a client of a broker, delivering its
//! messages to services through their `Proxy` — requests that come from a broker instead of a
//! listener. `build.rs` checks and starts them at compile (kept across reloads while unchanged);
//! `consumer.rs` is one running bridge (fetch, deliver, ack or nak, dead letter, drain).

mod amqp;
mod build;
mod consumer;

pub(crate) use build::build_consumers;
pub(crate) use consumer::Consumer;
