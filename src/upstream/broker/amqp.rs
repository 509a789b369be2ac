//! An AMQP 0-9-1 broker (RabbitMQ) through lapin: one connection per `[brokers.NAME]`, opened
//! and re-opened by a background task (backoff 100 ms doubling to 5 s), and `LANES` channels in
//! publisher-confirm mode that the broker's publishes take in turn, one message at a time per
//! channel: lapin attributes a `basic.return` to whichever confirm resolves next, so only with
//! one mandatory message outstanding on a channel is a return surely that message's (and a
//! channel closed by one publish's error fails that publish alone). What the request path reads
//! is an `ArcSwapOption` (no lock): `None` while the broker is away, so a publish then fails at
//! once with 503 instead of queueing for a connection that may never come.
//!
//! A channel error (a publish to an exchange that does not exist closes the channel, not the
//! connection) asks the task for a new channel; a connection error makes it reconnect.
//!
//! Replies (`reply = "sync"` and `"async"` routes) come over RabbitMQ's direct reply-to: the
//! publishing channel consumes `amq.rabbitmq.reply-to`, a message is sent with that as its
//! `reply_to` and an id as its `correlation_id`, and the service's reply arrives on the same
//! channel. `Replies` routes each by its correlation id: to the request waiting for it (sync),
//! else to the operations store (async, the `filer`).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};

use crate::config::BrokerConfig;

/// The broker's connection, as the task keeps it.
pub(crate) struct Amqp {
    live: Arc<ArcSwapOption<Live>>,
    repair: Arc<Notify>,
    task: tokio::task::AbortHandle,
    /// Where replies go.
    pub(crate) replies: Arc<Replies>,
}

/// The reply-to address of direct reply-to.
pub(crate) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A service's reply.
pub(crate) struct Reply {
    /// `gatehouse-status`, if the reply has one.
    pub(crate) status: Option<u16>,
    pub(crate) content_type: Option<String>,
    pub(crate) body: Bytes,
}

/// Files a reply under its correlation id (the async operations store).
pub(crate) type Filer = Arc<dyn Fn(String, Reply) + Send + Sync>;

/// Routes replies by correlation id.
pub(crate) struct Replies {
    /// Requests waiting for their reply (sync routes): correlation id → waiter.
    waiting: moka::sync::Cache<Arc<str>, Arc<Waiter>>,
    filer: ArcSwapOption<Filer>,
}

/// A waiter's slot, taken once (swapped out, not locked).
pub(crate) struct Waiter(ArcSwapOption<oneshot::Sender<Reply>>);

impl Replies {
    fn new() -> Self {
        Replies {
            waiting: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                // A waiter is forgotten when its request ends; this bounds a leak, not a wait.
                .time_to_live(Duration::from_secs(3600))
                .build(),
            filer: ArcSwapOption::empty(),
        }
    }

    /// Registers a waiter for `id`; the reply (if it comes) is read from the receiver.
    pub(crate) fn wait(&self, id: &str) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .insert(id.into(), Arc::new(Waiter(ArcSwapOption::from_pointee(tx))));
        rx
    }

    /// Forgets a waiter (its request ended).
    pub(crate) fn forget(&self, id: &str) {
        self.waiting.invalidate(id);
    }

    /// Sets where replies no request waits for go.
    pub(crate) fn set_filer(&self, f: Filer) {
        self.filer.store(Some(Arc::new(f)));
    }

    /// Clears the filer if it is still `f` (a newer one set meanwhile stays).
    pub(crate) fn clear_filer(&self, f: &Filer) {
        let current = self.filer.load_full();
        if let Some(c) = current.filter(|c| Arc::ptr_eq(&**c, f)) {
            let _ = self.filer.compare_and_swap(&Some(c), None);
        }
    }

    fn route(&self, d: lapin::message::Delivery) {
        let Some(id) = d
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned())
        else {
            return;
        };
        let status = d
            .properties
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get("gatehouse-status").cloned())
            .and_then(|v| match v {
                lapin::types::AMQPValue::LongString(s) => {
                    std::str::from_utf8(s.as_bytes()).ok()?.parse().ok()
                }
                lapin::types::AMQPValue::ShortString(s) => s.as_str().parse().ok(),
                lapin::types::AMQPValue::LongInt(n) => u16::try_from(n).ok(),
                lapin::types::AMQPValue::LongLongInt(n) => u16::try_from(n).ok(),
                lapin::types::AMQPValue::ShortInt(n) => u16::try_from(n).ok(),
                lapin::types::AMQPValue::ShortUInt(n) => Some(n),
                _ => None,
            });
        let reply = Reply {
            status,
            content_type: d
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            body: Bytes::from(d.data),
        };
        if let Some(w) = self.waiting.remove(id.as_str()) {
            if let Some(tx) = w.0.swap(None).and_then(|tx| Arc::try_unwrap(tx).ok()) {
                let _ = tx.send(reply);
            }
            return;
        }
        if let Some(f) = self.filer.load_full() {
            f(id, reply);
        }
    }
}

/// Publishing channels per connection.
const LANES: usize = 16;

/// An open connection and its publishing channels.
pub(crate) struct Live {
    pub(crate) conn: Arc<lapin::Connection>,
    /// In confirm mode: each publish is acked (or nacked) by the broker.
    lanes: Box<[Lane]>,
    next: std::sync::atomic::AtomicUsize,
}

/// A publishing channel and its turn (one message on it at a time).
struct Lane {
    ch: lapin::Channel,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Live {
    fn broken(&self) -> bool {
        self.lanes.iter().any(|l| !l.ch.status().connected())
    }
}

/// What a confirmed publish came to.
#[derive(Debug)]
pub(crate) enum Sent {
    /// The broker has it.
    Confirmed,
    /// No queue took it (returned).
    Returned,
    /// The exchange does not exist.
    NotFound,
    /// Nacked, the channel closed, or not connected.
    Failed,
    /// No confirmation in time.
    Timeout,
}

impl Drop for Amqp {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(live) = self.live.swap(None) {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = live
                        .conn
                        .close(200, "gatehouse: broker removed".into())
                        .await;
                });
            }
        }
    }
}

impl Amqp {
    pub(crate) fn start(name: &str, c: &BrokerConfig) -> Result<Amqp, String> {
        let url = c.url.get_ref().trim().to_owned();
        // The URL's own mistakes (a bad vhost encoding, a bad port) before any connection.
        url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            format!(
                "broker `{name}`: url `{}`: {e}",
                crate::config::mask_userinfo(&url)
            )
        })?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| format!("broker `{name}`: no async runtime"))?;
        let live = Arc::new(ArcSwapOption::empty());
        let repair = Arc::new(Notify::new());
        let replies = Arc::new(Replies::new());
        let task = handle
            .spawn(run(
                name.to_owned(),
                url,
                c.connect_timeout.get(),
                live.clone(),
                repair.clone(),
                replies.clone(),
            ))
            .abort_handle();
        Ok(Amqp {
            live,
            repair,
            task,
            replies,
        })
    }

    /// The open connection, if any.
    pub(crate) fn live(&self) -> Option<Arc<Live>> {
        self.live
            .load_full()
            .filter(|l| l.conn.status().connected() && !l.broken())
    }

    pub(crate) fn connected(&self) -> bool {
        self.live().is_some()
    }

    /// A publish found a channel closed: the task opens new ones.
    pub(crate) fn repair(&self) {
        self.repair.notify_one();
    }

    /// Publishes `body` (mandatory) and waits at most `timeout` for the broker's confirmation.
    /// The publish and its confirmation run in a task of their own, so one that outlives the
    /// wait still completes (and frees its channel) rather than leaving a confirm behind.
    pub(crate) async fn confirm(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        props: lapin::BasicProperties,
        timeout: Duration,
    ) -> Sent {
        let Some(live) = self.live() else {
            return Sent::Failed;
        };
        let i = live.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % live.lanes.len();
        let (ch, turn) = (live.lanes[i].ch.clone(), live.lanes[i].turn.clone());
        let (Ok(exchange), Ok(routing_key)) = (
            lapin::types::ShortString::try_new(exchange),
            lapin::types::ShortString::try_new(routing_key),
        ) else {
            return Sent::Failed;
        };
        let repair = self.repair.clone();
        let task = tokio::spawn(async move {
            let _turn = turn.lock_owned().await;
            let sent = async {
                ch.basic_publish(
                    exchange,
                    routing_key,
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    props,
                )
                .await?
                .await
            }
            .await;
            if !matches!(
                sent,
                Ok(lapin::Confirmation::Ack(_) | lapin::Confirmation::Nack(_))
            ) {
                repair.notify_one();
            }
            sent
        });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(Ok(lapin::Confirmation::Ack(None)))) => Sent::Confirmed,
            Ok(Ok(Ok(lapin::Confirmation::Ack(Some(_))))) => Sent::Returned,
            Ok(Ok(Err(e))) if not_found(&e) => Sent::NotFound,
            Ok(_) => Sent::Failed,
            Err(_) => Sent::Timeout,
        }
    }
}

async fn open(url: &str, replies: &Arc<Replies>) -> Result<Live, lapin::Error> {
    let props = lapin::ConnectionProperties::default().with_connection_name("gatehouse".into());
    let conn = Arc::new(lapin::Connection::connect(url, props).await?);
    lanes(conn, replies).await
}

async fn lanes(conn: Arc<lapin::Connection>, replies: &Arc<Replies>) -> Result<Live, lapin::Error> {
    let mut lanes = Vec::with_capacity(LANES);
    for _ in 0..LANES {
        lanes.push(Lane {
            ch: channel(&conn, replies).await?,
            turn: Arc::new(tokio::sync::Mutex::new(())),
        });
    }
    Ok(Live {
        conn,
        lanes: lanes.into_boxed_slice(),
        next: std::sync::atomic::AtomicUsize::new(0),
    })
}

/// The publishing channel: confirm mode, and consuming its direct replies.
async fn channel(
    conn: &lapin::Connection,
    replies: &Arc<Replies>,
) -> Result<lapin::Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    let mut incoming = ch
        .basic_consume(
            REPLY_TO.into(),
            "gatehouse-replies".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    let replies = replies.clone();
    // Ends with the channel.
    tokio::spawn(async move {
        while let Some(Ok(d)) = incoming.next().await {
            replies.route(d);
        }
    });
    Ok(ch)
}

async fn run(
    name: String,
    url: String,
    connect_timeout: Duration,
    live: Arc<ArcSwapOption<Live>>,
    repair: Arc<Notify>,
    replies: Arc<Replies>,
) {
    let mut failures = 0u32;
    loop {
        let opened = tokio::time::timeout(connect_timeout, open(&url, &replies)).await;
        match opened {
            Ok(Ok(l)) => {
                failures = 0;
                let mut events = l.conn.events_listener();
                let conn = l.conn.clone();
                live.store(Some(Arc::new(l)));
                tracing::info!(broker = %name, "AMQP broker connected");
                loop {
                    tokio::select! {
                        ev = events.next() => match ev {
                            Some(lapin::Event::Error(e)) => {
                                tracing::warn!(broker = %name, error = %e, "AMQP connection lost; reconnecting");
                                break;
                            }
                            Some(_) => {}
                            None => break,
                        },
                        () = tokio::time::sleep(Duration::from_secs(1)) => repair.notify_one(),
                        () = repair.notified() => {
                            let broken = live.load().as_ref().is_some_and(|l| l.broken());
                            if broken && conn.status().connected() {
                                match tokio::time::timeout(connect_timeout, lanes(conn.clone(), &replies)).await {
                                    Ok(Ok(l)) => live.store(Some(Arc::new(l))),
                                    _ => {
                                        tracing::warn!(broker = %name, "AMQP channels could not be opened; reconnecting");
                                        let _ = conn.close(200, "gatehouse: reconnecting".into()).await;
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    if !conn.status().connected() {
                        break;
                    }
                }
                live.store(None);
            }
            Ok(Err(e)) => {
                tracing::warn!(broker = %name, error = %e, "AMQP broker unreachable; trying again");
            }
            Err(_) => {
                tracing::warn!(broker = %name, "AMQP broker did not answer in time; trying again");
            }
        }
        tokio::time::sleep(super::backoff(failures)).await;
        failures = failures.saturating_add(1);
    }
}

/// Whether a publish error means the exchange does not exist (a setup mistake, not an outage).
pub(crate) fn not_found(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => matches!(
            p.kind(),
            lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
        ),
        _ => false,
    }
}
