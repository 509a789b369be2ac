//! `[[consumer]]`: a broker → HTTP bridge. On NATS, a durable JetStream pull consumer on the
//! stream that stores `subject`; on AMQP, a consumer of `queue` with a prefetch of
//! `max_in_flight` (`amqp.rs`). Each message is delivered as `POST path` to a service through
//! its `Proxy` (discovery, balancing, retries, breaker, bulkhead apply), at most
//! `max_in_flight` at once. A 2xx acks it; anything else retries it with backoff, and its
//! `max_attempts`-th failure sends it to `dead_letter` (then acks it). Nothing is acked before
//! its 2xx (or before its next attempt or its dead letter is confirmed stored), so a gateway
//! that dies mid-delivery loses nothing: the broker delivers it again.
//!
//! A bridge is a resource: kept across reloads while its config is equal. When it is dropped
//! (its config changed or it was removed) or the gateway stops, it stops fetching, finishes
//! the deliveries in flight (acking or nakking each) and ends (`drain`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Uri};
use http_body_util::BodyExt;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::backend::proxy::Proxy;
use crate::body::req_full;
use crate::context::{Client, Exchange, Params, Parts, RouteInfo};
use crate::upstream::broker::Broker;

pub(super) const ACKED: usize = 0;
pub(super) const RETRIED: usize = 1;
pub(super) const DEAD_LETTERED: usize = 2;

/// Where a consumer reads.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A NATS subject a JetStream stream stores.
    Subject(String),
    /// An AMQP queue.
    Queue(String),
}

/// A compiled `[[consumer]]`.
pub(crate) struct Settings {
    pub(crate) name: String,
    pub(crate) source: Source,
    pub(crate) path: Uri,
    pub(crate) max_attempts: u32,
    pub(crate) dead_letter: Option<String>,
    pub(crate) max_in_flight: usize,
    pub(crate) backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) timeout: Duration,
}

/// A running bridge.
pub(crate) struct Consumer {
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // The task drains and ends by itself (not aborted: deliveries in flight finish).
        let _ = self.stop.send(true);
    }
}

impl Consumer {
    pub(crate) fn start(
        settings: Settings,
        broker: Arc<Broker>,
        proxy: Proxy,
        outcomes: &prometheus::IntCounterVec,
        pending: prometheus::IntGauge,
    ) -> Option<Consumer> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let settings_name = settings.name.clone();
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(false);
        let bridge = Arc::new(Bridge {
            s: settings,
            broker,
            outcomes: ["acked", "retried", "dead_lettered"]
                .map(|o| outcomes.with_label_values(&[settings_name.as_str(), o])),
            proxy,
            pending,
        });
        handle.spawn(async move {
            bridge.run(stop_rx).await;
            let _ = done_tx.send(true);
        });
        Some(Consumer { stop, done })
    }

    /// Stops fetching and waits (at most `grace`) for the deliveries in flight.
    pub(crate) async fn drain(&self, grace: Duration) {
        let _ = self.stop.send(true);
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(grace, done.wait_for(|d| *d)).await;
    }
}

pub(super) struct Bridge {
    pub(super) s: Settings,
    pub(super) broker: Arc<Broker>,
    proxy: Proxy,
    /// `gatehouse_consumer_deliveries_total{consumer, outcome}`: acked, retried, dead_lettered.
    outcomes: [prometheus::IntCounter; 3],
    pub(super) pending: prometheus::IntGauge,
}

/// Where messages come from once set up.
enum Messages {
    Nats(Box<async_nats::jetstream::consumer::pull::Stream>),
    /// The channel is held with the consumer (and with each delivery in flight): lapin closes
    /// a channel once no handle is left, and an unacked delivery would then go back.
    Amqp(Box<(lapin::Consumer, lapin::Channel)>),
}

/// One message, from either.
enum Msg {
    Nats(async_nats::jetstream::Message),
    Amqp(lapin::message::Delivery, lapin::Channel),
}

impl Messages {
    async fn next(&mut self) -> Option<Result<Msg, String>> {
        match self {
            Messages::Nats(s) => s
                .next()
                .await
                .map(|m| m.map(Msg::Nats).map_err(|e| e.to_string())),
            Messages::Amqp(b) => {
                let (c, ch) = &mut **b;
                c.next().await.map(|m| {
                    m.map(|d| Msg::Amqp(d, ch.clone()))
                        .map_err(|e| e.to_string())
                })
            }
        }
    }
}

impl Bridge {
    pub(super) fn count(&self, outcome: usize) {
        self.outcomes[outcome].inc();
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut inflight = JoinSet::new();
        let permits = Arc::new(Semaphore::new(self.s.max_in_flight));
        let mut retry = Duration::from_millis(200);
        'setup: while !*stop.borrow() {
            let setup = match &self.s.source {
                Source::Subject(subject) => self
                    .setup(subject)
                    .await
                    .map(|s| Messages::Nats(Box::new(s)))
                    .map_err(|e| e.to_string()),
                Source::Queue(queue) => super::amqp::setup(&self, queue)
                    .await
                    .map(|cc| Messages::Amqp(Box::new(cc))),
            };
            let mut messages = match setup {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(consumer = %self.s.name, error = %e, "consumer not ready; trying again");
                    tokio::select! {
                        _ = stop.changed() => break 'setup,
                        () = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            retry = Duration::from_millis(200);
            loop {
                // A slot first, then a message: never more in flight than allowed.
                let permit = tokio::select! {
                    _ = stop.changed() => break 'setup,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break 'setup,
                    },
                };
                let next = tokio::select! {
                    _ = stop.changed() => break 'setup,
                    m = messages.next() => m,
                };
                match next {
                    Some(Ok(msg)) => {
                        let me = self.clone();
                        inflight.spawn(async move {
                            match msg {
                                Msg::Nats(m) => me.deliver(m).await,
                                Msg::Amqp(d, channel) => {
                                    super::amqp::deliver(&me, d).await;
                                    drop(channel);
                                }
                            }
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(consumer = %self.s.name, error = %e, "consumer stream failed; setting up again");
                        continue 'setup;
                    }
                    None => continue 'setup,
                }
                // Reap finished deliveries as we go.
                while inflight.try_join_next().is_some() {}
            }
        }
        while inflight.join_next().await.is_some() {}
    }

    async fn setup(
        &self,
        subject: &str,
    ) -> Result<async_nats::jetstream::consumer::pull::Stream, async_nats::Error> {
        use async_nats::jetstream::consumer::{pull, AckPolicy};
        let js = &self.nats()?.jetstream;
        let stream_name = js.stream_by_subject(subject.to_owned()).await?;
        let stream = js.get_stream(stream_name).await?;
        let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &self.s.name,
                pull::Config {
                    durable_name: Some(self.s.name.clone()),
                    filter_subject: subject.to_owned(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.s.timeout + Duration::from_secs(5),
                    max_ack_pending: i64::try_from(self.s.max_in_flight).unwrap_or(1000),
                    ..Default::default()
                },
            )
            .await?;
        Ok(consumer
            .stream()
            .max_messages_per_batch(self.s.max_in_flight)
            .messages()
            .await?)
    }

    async fn deliver(&self, msg: async_nats::jetstream::Message) {
        let (delivered, pending) = msg.info().map_or((1, None), |i| {
            (
                u32::try_from(i.delivered).unwrap_or(u32::MAX),
                Some(i.pending),
            )
        });
        if let Some(p) = pending {
            self.pending.set(i64::try_from(p).unwrap_or(i64::MAX));
        }
        let status = self.send(&msg, delivered).await;
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        if ok {
            if msg.ack().await.is_ok() {
                self.count(ACKED);
            }
            return;
        }
        if delivered >= self.s.max_attempts {
            // The last attempt: to the dead letter subject (if any), then off the stream.
            if let Some(dl) = &self.s.dead_letter {
                let mut h = msg.headers.clone().unwrap_or_default();
                h.insert("Gatehouse-Original-Subject", msg.subject.as_str());
                h.insert(
                    "Gatehouse-Last-Status",
                    status.map_or("none".to_owned(), |s| s.to_string()).as_str(),
                );
                // Stored by a stream (its ack awaited) before the original is terminated: a
                // dead letter no stream keeps would be lost.
                let published = match self.nats() {
                    Ok(n) => {
                        let sent = async {
                            n.jetstream
                                .publish_with_headers(dl.clone(), h, msg.payload.clone())
                                .await?
                                .await
                        };
                        matches!(
                            tokio::time::timeout(self.broker.publish_timeout, sent).await,
                            Ok(Ok(_))
                        )
                    }
                    Err(_) => false,
                };
                if !published {
                    // Not on the dead letter subject yet: let JetStream deliver it again.
                    let _ = msg
                        .ack_with(async_nats::jetstream::AckKind::Nak(Some(
                            self.s.max_backoff,
                        )))
                        .await;
                    self.count(RETRIED);
                    return;
                }
            }
            let _ = msg.ack_with(async_nats::jetstream::AckKind::Term).await;
            self.count(DEAD_LETTERED);
            return;
        }
        let delay = self.delay(delivered);
        let _ = msg
            .ack_with(async_nats::jetstream::AckKind::Nak(Some(delay)))
            .await;
        self.count(RETRIED);
    }

    fn nats(&self) -> Result<&crate::upstream::broker::Nats, async_nats::Error> {
        self.broker
            .nats()
            .ok_or_else(|| "a NATS consumer on a broker of another kind".into())
    }

    /// The backoff before attempt `delivered + 1`.
    pub(super) fn delay(&self, delivered: u32) -> Duration {
        self.s
            .backoff
            .saturating_mul(1u32 << delivered.saturating_sub(1).min(16))
            .min(self.s.max_backoff)
    }

    /// One delivery as an HTTP request; the service's status, `None` when there was none.
    async fn send(&self, msg: &async_nats::jetstream::Message, delivered: u32) -> Option<u16> {
        let get = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|m| m.get(name))
                .and_then(|v| HeaderValue::from_str(v.as_str()).ok())
        };
        self.post(
            Bytes::clone(&msg.payload),
            get,
            msg.subject.as_str(),
            delivered,
        )
        .await
    }

    /// `POST path` with a message's body and headers (read by `get`); the service's status.
    pub(super) async fn post(
        &self,
        payload: Bytes,
        get: impl Fn(&str) -> Option<HeaderValue>,
        from: &str,
        delivered: u32,
    ) -> Option<u16> {
        let mut req = Request::new(req_full(payload));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.s.path.clone();
        let h = req.headers_mut();
        let request_id = get("x-request-id")
            .filter(crate::observe::trace::valid_request_id)
            .unwrap_or_else(crate::observe::trace::new_request_id);
        if let Some(ct) = get("Content-Type") {
            h.insert(header::CONTENT_TYPE, ct);
        }
        if let Some(tp) = get("traceparent") {
            h.insert(HeaderName::from_static("traceparent"), tp);
        }
        if let Ok(v) = HeaderValue::from_str(from) {
            let name = match self.s.source {
                Source::Subject(_) => "gatehouse-subject",
                Source::Queue(_) => "gatehouse-queue",
            };
            h.insert(HeaderName::from_static(name), v);
        }
        h.insert(
            HeaderName::from_static("gatehouse-delivery"),
            HeaderValue::from(delivered),
        );
        req.extensions_mut().insert(self.exchange(request_id));
        let call = async {
            let resp = self.proxy.clone().oneshot(req).await.ok()?;
            let status = resp.status().as_u16();
            // Read to the end, so that the connection is reused.
            let _ = resp.into_body().collect().await;
            Some(status)
        };
        tokio::time::timeout(self.s.timeout, call)
            .await
            .ok()
            .flatten()
    }

    /// The context of a delivery: the bridge is its "client".
    fn exchange(&self, request_id: HeaderValue) -> Exchange {
        Exchange::new(Parts {
            route: Arc::new(RouteInfo {
                id: format!("consumer/{}", self.s.name).into_boxed_str(),
                params: Box::default(),
            }),
            uri: self.s.path.clone(),
            normalized: None,
            params: Params::default(),
            host: None,
            request_id,
            client: Client {
                peer: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                peer_ip: HeaderValue::from_static("127.0.0.1"),
                tls: false,
                trusted: true,
            },
            started: std::time::Instant::now(),
            wants_upstream: false,
        })
    }
}
