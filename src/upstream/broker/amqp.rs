//! An AMQP 0-9-1 broker (RabbitMQ) through lapin: one connection per `[brokers.NAME]`, opened
//! and re-opened by a background task (backoff 100 ms doubling to 5 s), and one channel in
//! publisher-confirm mode that every publish of the broker shares. What the request path reads
//! is an `ArcSwapOption` (no lock): `None` while the broker is away, so a publish then fails at
//! once with 503 instead of queueing for a connection that may never come.
//!
//! A channel error (a publish to an exchange that does not exist closes the channel, not the
//! connection) asks the task for a new channel; a connection error makes it reconnect.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use tokio::sync::Notify;

use crate::config::BrokerConfig;

/// The broker's connection, as the task keeps it.
pub(crate) struct Amqp {
    live: Arc<ArcSwapOption<Live>>,
    repair: Arc<Notify>,
    task: tokio::task::AbortHandle,
}

/// An open connection and its publishing channel.
pub(crate) struct Live {
    pub(crate) conn: Arc<lapin::Connection>,
    /// In confirm mode: each publish is acked (or nacked) by the broker.
    pub(crate) publish: lapin::Channel,
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
        let task = handle
            .spawn(run(
                name.to_owned(),
                url,
                c.connect_timeout.get(),
                live.clone(),
                repair.clone(),
            ))
            .abort_handle();
        Ok(Amqp { live, repair, task })
    }

    /// The open connection, if any.
    pub(crate) fn live(&self) -> Option<Arc<Live>> {
        self.live
            .load_full()
            .filter(|l| l.conn.status().connected())
    }

    pub(crate) fn connected(&self) -> bool {
        self.live().is_some()
    }

    /// A publish found the channel closed: the task opens a new one.
    pub(crate) fn repair(&self) {
        self.repair.notify_one();
    }
}

async fn open(url: &str) -> Result<Live, lapin::Error> {
    let props = lapin::ConnectionProperties::default().with_connection_name("gatehouse".into());
    let conn = Arc::new(lapin::Connection::connect(url, props).await?);
    let publish = channel(&conn).await?;
    Ok(Live { conn, publish })
}

async fn channel(conn: &lapin::Connection) -> Result<lapin::Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    Ok(ch)
}

async fn run(
    name: String,
    url: String,
    connect_timeout: Duration,
    live: Arc<ArcSwapOption<Live>>,
    repair: Arc<Notify>,
) {
    let mut failures = 0u32;
    loop {
        let opened = tokio::time::timeout(connect_timeout, open(&url)).await;
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
                        () = repair.notified() => {
                            let broken = live.load().as_ref().is_some_and(|l| !l.publish.status().connected());
                            if broken && conn.status().connected() {
                                match channel(&conn).await {
                                    Ok(ch) => live.store(Some(Arc::new(Live { conn: conn.clone(), publish: ch }))),
                                    Err(e) => {
                                        tracing::warn!(broker = %name, error = %e, "AMQP channel could not be opened; reconnecting");
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
