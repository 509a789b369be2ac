//! An MQTT 3.1.1 broker (Mosquitto, EMQX, HiveMQ …): one session per `[brokers.NAME]`, run by a
//! background task over rumqttc's packet codec. The session is ours, not rumqttc's event loop:
//! a publish must learn that *its* QoS 1 PUBACK came, and rumqttc's `AsyncClient` neither
//! returns the packet id it assigns nor says which queued publishes a reconnect dropped. Here
//! the task assigns each packet id itself, keeps the waiter under it, and on a lost connection
//! fails every waiter (the client gets 503) before it reconnects with a clean session — so a
//! 202 means the broker's PUBACK for that very message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rumqttc::{Codec, ConnectReturnCode, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;

use crate::config::BrokerConfig;

/// Publishes waiting for a PUBACK at most (more wait in the queue).
const MAX_INFLIGHT: usize = 1024;
const KEEP_ALIVE: u16 = 30;

/// The broker's session, as the task keeps it.
pub(crate) struct Mqtt {
    jobs: mpsc::Sender<Job>,
    connected: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

struct Job {
    topic: Arc<str>,
    qos: QoS,
    payload: Bytes,
    /// Told when the broker confirmed (QoS 1) or the packet was written (QoS 0).
    done: oneshot::Sender<()>,
}

/// Why a publish was not confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MqttError {
    /// Not connected, or the connection was lost before the confirmation.
    Unavailable,
    /// Larger than the broker takes.
    TooLarge,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `mqtt://[USER:PASS@]HOST:PORT`: the address and the login.
struct Target {
    addr: String,
    login: Option<(String, String)>,
}

fn target(url: &str) -> Option<Target> {
    let url = url.trim();
    let rest = url
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("mqtt://"))
        .map(|_| &url[7..])?;
    let authority = rest.split('/').next()?;
    let (login, addr) = match authority.rsplit_once('@') {
        Some((userinfo, addr)) => {
            let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            (Some((u.to_owned(), p.to_owned())), addr)
        }
        None => (None, authority),
    };
    Some(Target {
        addr: addr.to_owned(),
        login,
    })
}

impl Mqtt {
    pub(crate) fn start(name: &str, c: &BrokerConfig) -> Result<Mqtt, String> {
        let t =
            target(c.url.get_ref()).ok_or_else(|| format!("broker `{name}`: bad mqtt:// url"))?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| format!("broker `{name}`: no async runtime"))?;
        let (jobs, rx) = mpsc::channel(MAX_INFLIGHT);
        let connected = Arc::new(AtomicBool::new(false));
        let client_id = format!("gatehouse-{:016x}", fastrand::u64(..));
        let task = handle
            .spawn(run(
                name.to_owned(),
                t,
                client_id,
                c.connect_timeout.get(),
                rx,
                connected.clone(),
            ))
            .abort_handle();
        Ok(Mqtt {
            jobs,
            connected,
            task,
        })
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Publishes and waits for the broker's confirmation (QoS 1) or the write (QoS 0).
    pub(crate) async fn publish(
        &self,
        topic: Arc<str>,
        qos: QoS,
        payload: Bytes,
    ) -> Result<(), MqttError> {
        if !self.connected() {
            return Err(MqttError::Unavailable);
        }
        // The fixed header, the topic and the packet id fit in 4 + 2 + len + 2 bytes.
        if payload.len() + topic.len() + 8 > MAX_PACKET {
            return Err(MqttError::TooLarge);
        }
        let (done, confirmed) = oneshot::channel();
        self.jobs
            .send(Job {
                topic,
                qos,
                payload,
                done,
            })
            .await
            .map_err(|_| MqttError::Unavailable)?;
        confirmed.await.map_err(|_| MqttError::Unavailable)
    }
}

/// The largest packet written or read (MQTT's own limit is 256 MiB; brokers set less).
pub(crate) const MAX_PACKET: usize = 1 << 20;

async fn run(
    name: String,
    t: Target,
    client_id: String,
    connect_timeout: Duration,
    mut jobs: mpsc::Receiver<Job>,
    connected: Arc<AtomicBool>,
) {
    let mut failures = 0u32;
    loop {
        match tokio::time::timeout(connect_timeout, open(&t, &client_id)).await {
            Ok(Ok(framed)) => {
                failures = 0;
                connected.store(true, Ordering::Release);
                tracing::info!(broker = %name, "MQTT broker connected");
                let why = session(framed, &mut jobs).await;
                connected.store(false, Ordering::Release);
                tracing::warn!(broker = %name, reason = why, "MQTT connection lost; reconnecting");
                // What was queued while the connection went: failed now (a job queued after
                // this is sent on the next connection, unless its client gave up meanwhile).
                while jobs.try_recv().is_ok() {}
            }
            Ok(Err(e)) => {
                tracing::warn!(broker = %name, error = %e, "MQTT broker unreachable; trying again");
            }
            Err(_) => {
                tracing::warn!(broker = %name, "MQTT broker did not answer in time; trying again");
            }
        }
        tokio::time::sleep(super::backoff(failures)).await;
        failures = failures.saturating_add(1);
    }
}

type Conn = Framed<tokio::net::TcpStream, Codec>;

async fn open(t: &Target, client_id: &str) -> Result<Conn, String> {
    let stream = tokio::net::TcpStream::connect(&t.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(
        stream,
        Codec {
            max_incoming_size: MAX_PACKET,
            max_outgoing_size: MAX_PACKET,
        },
    );
    let mut connect = rumqttc::Connect::new(client_id);
    connect.keep_alive = KEEP_ALIVE;
    connect.clean_session = true;
    if let Some((u, p)) = &t.login {
        connect.set_login(u.clone(), p.clone());
    }
    framed
        .send(Packet::Connect(connect))
        .await
        .map_err(|e| e.to_string())?;
    match framed.next().await {
        Some(Ok(Packet::ConnAck(ack))) if ack.code == ConnectReturnCode::Success => Ok(framed),
        Some(Ok(Packet::ConnAck(ack))) => Err(format!("connection refused: {:?}", ack.code)),
        Some(Ok(_)) => Err("the broker did not answer CONNECT with CONNACK".into()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the broker closed the connection".into()),
    }
}

/// One connected session: until the connection fails (the reason is returned). Every waiter
/// still in flight is dropped with it (its publish gets 503).
async fn session(mut framed: Conn, jobs: &mut mpsc::Receiver<Job>) -> &'static str {
    // Each waiter with when it was sent: a PUBACK overdue by `OVERDUE` ends the session (the
    // broker is not answering; every waiter gets 503 and the connection is made again).
    let mut inflight: HashMap<u16, (oneshot::Sender<()>, std::time::Instant)> = HashMap::new();
    let mut next: u16 = 0;
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE) / 2));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut awaiting_pong = false;
    loop {
        tokio::select! {
            job = jobs.recv(), if inflight.len() < MAX_INFLIGHT => {
                let Some(job) = job else { return "the broker was removed" };
                if job.done.is_closed() {
                    continue; // its client gave up waiting: not sent at all
                }
                let mut p = rumqttc::Publish::new(&*job.topic, job.qos, Vec::new());
                p.payload = job.payload;
                if job.qos == QoS::AtMostOnce {
                    if !sent(&mut framed, Packet::Publish(p)).await {
                        return "write failed";
                    }
                    let _ = job.done.send(());
                    continue;
                }
                // A packet id not in use (there are 65 535, at most MAX_INFLIGHT in use).
                loop {
                    next = next.wrapping_add(1).max(1);
                    if !inflight.contains_key(&next) {
                        break;
                    }
                }
                p.pkid = next;
                inflight.insert(next, (job.done, std::time::Instant::now()));
                if !sent(&mut framed, Packet::Publish(p)).await {
                    return "write failed";
                }
            }
            packet = framed.next() => match packet {
                Some(Ok(Packet::PubAck(ack))) => {
                    if let Some((done, _)) = inflight.remove(&ack.pkid) {
                        let _ = done.send(());
                    }
                }
                Some(Ok(Packet::PingResp)) => awaiting_pong = false,
                Some(Ok(_)) => {}
                Some(Err(_)) => return "protocol error",
                None => return "closed by the broker",
            },
            _ = ping.tick() => {
                if awaiting_pong {
                    return "no answer to PINGREQ";
                }
                if inflight.values().any(|(_, at)| at.elapsed() > OVERDUE) {
                    return "PUBACKs overdue";
                }
                awaiting_pong = true;
                if !sent(&mut framed, Packet::PingReq).await {
                    return "write failed";
                }
            }
        }
    }
}

/// How long a PUBACK may take before the session is given up.
const OVERDUE: Duration = Duration::from_secs(30);

/// Writes a packet, at most 10 s: a broker that stops reading does not stall the session.
async fn sent(framed: &mut Conn, p: Packet) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(10), framed.send(p)).await,
        Ok(Ok(()))
    )
}

/// An MQTT topic name to publish to: 1–65 535 bytes of UTF-8, no wildcards (`+`, `#`), no NUL.
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= 65_535 && !topic.contains(['+', '#', '\0'])
}
