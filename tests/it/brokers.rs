//! AMQP and MQTT brokers, and `reply = "async"`: against the machine's RabbitMQ
//! (127.0.0.1:5672, guest/guest), Mosquitto (127.0.0.1:1883), NATS with JetStream
//! (127.0.0.1:4222) and Redis (127.0.0.1:6379) — `.ci/run` starts any that is missing, and a
//! test fails when its broker cannot be reached.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::Full;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::publish::{post, ready};
use crate::support::*;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MQTT: &str = "mqtt://127.0.0.1:1883";
const NATS: &str = "nats://127.0.0.1:4222";

fn name(test: &str) -> String {
    format!("ghtest-{}-{test}", std::process::id())
}

async fn rabbit() -> lapin::Channel {
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default()),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .expect("RabbitMQ is required at 127.0.0.1:5672 (guest/guest; .ci/run starts it)");
    let ch = conn.create_channel().await.unwrap();
    // The connection lives as long as the test process (a test's channel uses it).
    std::mem::forget(conn);
    ch
}

async fn queue(ch: &lapin::Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            auto_delete: false,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_purge(name.into(), Default::default())
        .await
        .unwrap();
}

fn config(broker: &str, extra: &str) -> String {
    gateway_toml(
        "",
        &format!("[brokers.events]\nurl = \"{broker}\"\nrequired = true\npublish_timeout = \"2s\"\n{extra}"),
    )
}

fn routes(publish: &str) -> String {
    format!("[frontend]\nname = \"cmd\"\n\n[[route]]\nname = \"place\"\npath = \"/orders\"\nmethods = [\"POST\"]\ntimeout = \"3s\"\npublish = {publish}\n")
}

/// Messages waiting in a queue.
async fn queue_len(ch: &lapin::Channel, q: &str) -> u32 {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test]
async fn amqp_publishes_are_202_after_the_confirm_with_id_and_headers() {
    let ch = rabbit().await;
    let q = name("amqp-pub");
    queue(&ch, &q).await;
    let two = format!(
        "{}\n[[route]]\nname = \"lost\"\npath = \"/lost\"\npublish = {{ broker = \"events\", exchange = \"\", routing_key = \"{q}-nobody\" }}\n\n[[route]]\nname = \"noexchange\"\npath = \"/noexchange\"\npublish = {{ broker = \"events\", exchange = \"{q}-none\", routing_key = \"x\" }}\n",
        routes(&format!("{{ broker = \"events\", exchange = \"\", routing_key = \"{q}\" }}"))
    );
    let gw = TestGateway::start(&config(AMQP, ""), &[("cmd.toml", &two)]).await;
    ready(&gw).await;
    let r = post(
        &gw.url("/orders"),
        &[("idempotency-key", "order-1")],
        "{\"sku\":1}",
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let j = r.json();
    assert_eq!(j["id"], "order-1");
    assert_eq!(j["routing_key"], q.as_str());
    // Confirmed means stored: the queue has it, with its id and headers.
    let m = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message is in the queue");
    assert_eq!(m.delivery.data, b"{\"sku\":1}");
    let props = &m.delivery.properties;
    let msg_id = props.message_id().as_ref().unwrap().as_str().to_owned();
    assert_eq!(
        msg_id.len(),
        64,
        "the scoped, hashed Idempotency-Key: {msg_id}"
    );
    assert_eq!(
        props.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    let rid = header_text(props, "x-request-id").unwrap();
    assert_eq!(rid, r.header("x-request-id"), "the request id travels");
    assert_eq!(
        header_text(props, "idempotency-key").as_deref(),
        Some("order-1")
    );
    // The same key again: the same message id (a consumer or a dedup plugin can drop it).
    let r = post(&gw.url("/orders"), &[("idempotency-key", "order-1")], "{}").await;
    assert_eq!(r.status, 202);
    let again = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        msg_id
    );
    // No queue takes it: returned by the broker, refused with 502 (never a 202).
    let r = post(&gw.url("/lost"), &[], "{}").await;
    assert_problem(&r, 502, "publish_rejected");
    // No such exchange: the broker closes the channel; 502, and the next publish still works.
    let r = post(&gw.url("/noexchange"), &[], "{}").await;
    assert_problem(&r, 502, "publish_rejected");
    eventually(10, "publishing works again on a new channel", || async {
        post(&gw.url("/orders"), &[], "{}").await.status == 202
    })
    .await;
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_broker_publishes_total{broker=\"events\",outcome=\"rejected\"} 2"),
        "{m}"
    );
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn brokers_that_are_down_get_503_never_202() {
    let port = closed_port().await.port();
    for (url, publish) in [
        (
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            "{ broker = \"events\", exchange = \"\", routing_key = \"q\" }",
        ),
        (
            format!("mqtt://127.0.0.1:{port}"),
            "{ broker = \"events\", topic = \"t/1\" }",
        ),
    ] {
        let gw = TestGateway::start(&config(&url, ""), &[("cmd.toml", &routes(publish))]).await;
        let r = post(&gw.url("/orders"), &[], "{}").await;
        assert_problem(&r, 503, "broker_unavailable");
        assert!(!r.header("retry-after").is_empty());
        assert_eq!(get(&gw.admin_url("/readyz")).await.status, 503, "{url}");
    }
}

#[tokio::test]
async fn mqtt_qos1_publishes_are_202_after_the_puback() {
    let topic = format!("ghtest/{}/orders", std::process::id());
    let mut opts = rumqttc::MqttOptions::new(name("sub"), "127.0.0.1", 1883);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
    client
        .subscribe(topic.as_str(), rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, s) = (got.clone(), subscribed.clone());
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    s.store(true, std::sync::atomic::Ordering::SeqCst)
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => g
                    .lock()
                    .unwrap()
                    .push((p.topic.clone(), p.payload.to_vec())),
                Ok(_) => {}
                Err(e) => {
                    panic!("Mosquitto is required at 127.0.0.1:1883 (.ci/run starts it): {e}")
                }
            }
        }
    });
    eventually(10, "the test subscribed", || async {
        subscribed.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let two = format!(
        "{}\n[[route]]\nname = \"fast\"\npath = \"/fast\"\npublish = {{ broker = \"events\", topic = \"{topic}\", qos = 0 }}\n",
        routes(&format!("{{ broker = \"events\", topic = \"{topic}\" }}"))
    );
    let gw = TestGateway::start(&config(MQTT, ""), &[("cmd.toml", &two)]).await;
    ready(&gw).await;
    for i in 0..20 {
        let r = post(&gw.url("/orders"), &[], &format!("{{\"n\":{i}}}")).await;
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(r.json()["topic"], topic.as_str());
    }
    let r = post(&gw.url("/fast"), &[], "{\"n\":\"qos0\"}").await;
    assert_eq!(r.status, 202);
    eventually(10, "every message reached the subscriber", || async {
        got.lock().unwrap().len() == 21
    })
    .await;
    let got = got.lock().unwrap().clone();
    assert!(got.iter().all(|(t, _)| *t == topic));
    assert_eq!(got[0].1, b"{\"n\":0}");
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains("gatehouse_broker_publishes_total{broker=\"events\",outcome=\"confirmed\"} 21"),
        "{m}"
    );
}

#[tokio::test]
async fn amqp_consumers_retry_with_backoff_then_dead_letter() {
    let ch = rabbit().await;
    let q = name("amqp-cons");
    let dlq = format!("{q}-dlq");
    queue(&ch, &q).await;
    queue(&ch, &dlq).await;
    let seen = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let log = seen.clone();
    let from = q.clone();
    let up = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let (log, from) = (log.clone(), from.clone());
        async move {
            let n = req.headers()["gatehouse-delivery"]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(req.headers()["gatehouse-queue"], from.as_str());
            assert_eq!(req.headers()["content-type"], "text/plain");
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            log.lock().unwrap().push((body.clone(), n.clone()));
            match (body.as_str(), n.as_str()) {
                ("poison", _) | ("flaky", "1" | "2") => text(503, "not now"),
                _ => text(200, "ok"),
            }
        }
    })
    .await;
    let cfg = format!(
        "[brokers.rabbit]\nurl = \"{AMQP}\"\n\n[services.notify]\nendpoints = [\"{}\"]\n\n[[consumer]]\nbroker = \"rabbit\"\nqueue = \"{q}\"\nservice = \"notify\"\npath = \"/notify\"\nmax_attempts = 3\ndead_letter = \"{dlq}\"\nbackoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
        up.url()
    );
    let gw = TestGateway::start(
        &gateway_toml("", &cfg),
        &[("x.toml", "[frontend]\nname = \"x\"\n")],
    )
    .await;
    for body in ["flaky", "poison", "fine"] {
        let confirm = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_content_type("text/plain".into()),
            )
            .await
            .unwrap();
        confirm.await.unwrap();
    }
    let dead = Arc::new(Mutex::new(None));
    eventually(
        20,
        "the poison message on the dead letter queue",
        || async {
            let m = ch
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap();
            if let Some(m) = m {
                *dead.lock().unwrap() = Some(m.delivery);
                true
            } else {
                false
            }
        },
    )
    .await;
    let dead = dead.lock().unwrap().take().unwrap();
    assert_eq!(dead.data, b"poison");
    assert_eq!(
        header_text(&dead.properties, "gatehouse-last-status").as_deref(),
        Some("503")
    );
    assert_eq!(
        header_text(&dead.properties, "gatehouse-original-queue").as_deref(),
        Some(q.as_str())
    );
    eventually(
        20,
        "the flaky message acked on its third delivery",
        || async { seen.lock().unwrap().contains(&("flaky".into(), "3".into())) },
    )
    .await;
    let deliveries = |b: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(x, _)| x == b)
            .map(|(_, n)| n.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(deliveries("poison"), ["1", "2", "3"]);
    assert_eq!(deliveries("fine"), ["1"]);
    // Nothing left behind: every message acked (or moved) exactly as counted.
    eventually(10, "the queue is empty", || async {
        queue_len(&ch, &q).await == 0
    })
    .await;
    let m = get(&gw.admin_url("/metrics")).await.text();
    let cname = format!("gatehouse-notify-{q}");
    for (outcome, n) in [("acked", 2), ("retried", 4), ("dead_lettered", 1)] {
        let line = format!(
            "gatehouse_consumer_deliveries_total{{consumer=\"{cname}\",outcome=\"{outcome}\"}} {n}"
        );
        assert!(m.contains(&line), "{line}\n{m}");
    }
    drop(gw);
    for n in [&q, &dlq] {
        let _ = ch
            .queue_delete(n.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// A service that consumes the commands and replies on the operation's reply subject once
/// `go` is told, with status 201 and the command echoed.
async fn replying_service(subject: String, go: Arc<tokio::sync::Notify>) {
    let client = async_nats::connect(NATS)
        .await
        .expect("NATS is required at 127.0.0.1:4222 (.ci/run starts it)");
    let mut sub = client.subscribe(subject).await.unwrap();
    client.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            go.notified().await;
            let reply = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Gatehouse-Reply-To"))
                .map(|v| v.as_str().to_owned())
                .expect("the reply subject travels as Gatehouse-Reply-To");
            assert_eq!(m.reply.as_ref().map(|r| r.as_str()), Some(reply.as_str()));
            let mut h = async_nats::HeaderMap::new();
            h.insert("Gatehouse-Status", "201");
            h.insert("Content-Type", "application/json");
            let body = format!("{{\"done\":{}}}", String::from_utf8_lossy(&m.payload));
            client
                .publish_with_headers(reply, h, body.into())
                .await
                .unwrap();
            client.flush().await.unwrap();
        }
    });
}

async fn async_round_trip(extra: &str, test: &str) -> (TestGateway, String) {
    let subject = format!("ghtest.{}.{test}", std::process::id());
    let go = Arc::new(tokio::sync::Notify::new());
    replying_service(subject.clone(), go.clone()).await;
    let gw = TestGateway::start(
        &config(NATS, extra),
        &[(
            "cmd.toml",
            &routes(&format!("{{ broker = \"events\", subject = \"{subject}\", reply = \"async\", result_ttl = \"1m\" }}")),
        )],
    )
    .await;
    ready(&gw).await;
    let r = post(&gw.url("/orders"), &[], "{\"sku\":7}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let location = r.header("location").to_owned();
    let op = r.json()["operation"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/orders/operations/{op}"));
    // Pending until the service replies.
    let p = get(&gw.url(&location)).await;
    assert_eq!(p.status, 202, "{}", p.text());
    assert_eq!(p.json()["status"], "pending");
    assert_eq!(p.header("cache-control"), "no-store");
    go.notify_one();
    eventually(10, "the reply filed under the operation", || async {
        get(&gw.url(&location)).await.status == 201
    })
    .await;
    let done = get(&gw.url(&location)).await;
    assert_eq!(done.text(), "{\"done\":{\"sku\":7}}");
    assert_eq!(done.header("content-type"), "application/json");
    // Unknown, malformed: 404.
    let unknown = get(&gw.url("/orders/operations/0123456789abcdef0123456789abcdef")).await;
    assert_problem(&unknown, 404, "operation_not_found");
    let bad = get(&gw.url("/orders/operations/..%2f..%2fadmin")).await;
    assert_eq!(bad.status, 404);
    (gw, op)
}

#[tokio::test]
async fn async_reply_round_trip_in_memory() {
    async_round_trip("", "async-mem").await;
}

#[tokio::test]
async fn async_reply_round_trip_in_redis_is_shared_by_the_fleet() {
    let url =
        std::env::var("GATEHOUSE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = format!("\n[redis]\nurl = \"{url}\"\n");
    let (_gw, op) = async_round_trip(&redis, "async-redis").await;
    // Another gateway of the fleet (same Redis, no publish of its own) answers the poll.
    let other = TestGateway::start(
        &config(NATS, &redis),
        &[(
            "cmd.toml",
            &routes("{ broker = \"events\", subject = \"ghtest.other\", reply = \"async\" }"),
        )],
    )
    .await;
    let r = get(&other.url(&format!("/orders/operations/{op}"))).await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.text(), "{\"done\":{\"sku\":7}}");
}

/// A `mosquitto` of the test's own on `port`, killed on drop.
struct OwnMosquitto(std::process::Child);

impl OwnMosquitto {
    fn start(port: u16) -> OwnMosquitto {
        OwnMosquitto(
            std::process::Command::new("mosquitto")
                .args(["-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mosquitto is required (.ci/run installs it)"),
        )
    }
}

impl Drop for OwnMosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_mqtt_broker_that_stops_gets_503_and_is_reconnected() {
    let port = closed_port().await.port();
    let broker = OwnMosquitto::start(port);
    let gw = TestGateway::start(
        &config(&format!("mqtt://127.0.0.1:{port}"), ""),
        &[(
            "cmd.toml",
            &routes("{ broker = \"events\", topic = \"t/restart\" }"),
        )],
    )
    .await;
    ready(&gw).await;
    assert_eq!(post(&gw.url("/orders"), &[], "{}").await.status, 202);
    drop(broker);
    eventually(10, "a stopped broker is 503, never 202", || async {
        let r = post(&gw.url("/orders"), &[], "{}").await;
        assert_ne!(r.status, 202, "a 202 from a stopped broker");
        r.status == 503
    })
    .await;
    assert_eq!(get(&gw.admin_url("/readyz")).await.status, 503);
    let _broker = OwnMosquitto::start(port);
    eventually(15, "reconnected after the broker came back", || async {
        post(&gw.url("/orders"), &[], "{}").await.status == 202
    })
    .await;
}

#[tokio::test]
async fn the_identity_travels_with_the_message_and_owns_the_operation() {
    let client = async_nats::connect(NATS)
        .await
        .expect("NATS is required at 127.0.0.1:4222 (.ci/run starts it)");
    let subject = format!("ghtest.{}.identity", std::process::id());
    let mut sub = client.subscribe(subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    let extra = format!(
        "\n[auth.api_keys.partners]\nheader = \"x-api-key\"\nkeys = [{{ consumer = \"acme\", sha256 = \"{}\" }}, {{ consumer = \"other\", sha256 = \"{}\" }}]\n",
        sha256_hex("key-acme"),
        sha256_hex("key-other"),
    );
    let routes = format!(
        "[frontend]\nname = \"cmd\"\nauth = \"partners\"\n\n[[route]]\nname = \"place\"\npath = \"/orders\"\nmethods = [\"POST\"]\npublish = {{ broker = \"events\", subject = \"{subject}\", reply = \"async\" }}\n"
    );
    let gw = TestGateway::start(&config(NATS, &extra), &[("cmd.toml", &routes)]).await;
    ready(&gw).await;
    let r = post(&gw.url("/orders"), &[("x-api-key", "key-acme")], "{}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let location = r.header("location").to_owned();
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("the message")
        .unwrap();
    let h = m.headers.unwrap();
    assert_eq!(h.get("Gatehouse-Consumer").unwrap().as_str(), "acme");
    assert_eq!(
        h.get("X-Request-Id").unwrap().as_str(),
        r.header("x-request-id")
    );
    // Only its owner reads the operation; anyone else gets the 404 of an unknown one.
    let read = |key: &'static str| {
        let url = gw.url(&location);
        async move {
            send(
                Request::get(url)
                    .header("x-api-key", key)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
        }
    };
    assert_eq!(read("key-acme").await.status, 202);
    assert_problem(&read("key-other").await, 404, "operation_not_found");
    // Behind the route's authentication like the route itself.
    assert_eq!(get(&gw.url(&location)).await.status, 401);
}

/// An AMQP service: consumes `queue`, replies to each message's `reply_to` with its
/// `correlation_id`, status 201 and the body echoed.
async fn amqp_replier(queue: &str) -> lapin::Channel {
    let ch = rabbit().await;
    queue_declare_fresh(&ch, queue).await;
    let mut c = ch
        .basic_consume(
            queue.into(),
            "replier".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let out = ch.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = c.next().await {
            let reply_to = d.properties.reply_to().clone().expect("a reply_to");
            let corr = d
                .properties
                .correlation_id()
                .clone()
                .expect("a correlation_id");
            let mut h = FieldTable::default();
            h.insert(
                "gatehouse-status".into(),
                AMQPValue::LongString("201".into()),
            );
            let body = format!("{{\"done\":{}}}", String::from_utf8_lossy(&d.data));
            out.basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_correlation_id(corr)
                    .with_content_type("application/json".into())
                    .with_headers(h),
            )
            .await
            .unwrap();
            d.acker.ack(Default::default()).await.unwrap();
        }
    });
    ch
}

async fn queue_declare_fresh(ch: &lapin::Channel, name: &str) {
    queue(ch, name).await;
}

#[tokio::test]
async fn amqp_rpc_sync_and_async_replies() {
    let q = name("amqp-rpc");
    let idle = format!("{q}-idle");
    let ch = amqp_replier(&q).await;
    queue(&ch, &idle).await;
    let routes = format!(
        "[frontend]\nname = \"cmd\"\n\n[[route]]\nname = \"quote\"\npath = \"/quote\"\nmethods = [\"POST\"]\ntimeout = \"1s\"\npublish = {{ broker = \"events\", exchange = \"\", routing_key = \"{q}\", reply = \"sync\" }}\n\n[[route]]\nname = \"idle\"\npath = \"/idle\"\nmethods = [\"POST\"]\ntimeout = \"500ms\"\npublish = {{ broker = \"events\", exchange = \"\", routing_key = \"{idle}\", reply = \"sync\" }}\n\n[[route]]\nname = \"later\"\npath = \"/later\"\nmethods = [\"POST\"]\npublish = {{ broker = \"events\", exchange = \"\", routing_key = \"{q}\", reply = \"async\" }}\n"
    );
    let gw = TestGateway::start(&config(AMQP, ""), &[("cmd.toml", &routes)]).await;
    ready(&gw).await;
    // Sync: the reply is the response.
    let r = post(&gw.url("/quote"), &[], "{\"sku\":3}").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.text(), "{\"done\":{\"sku\":3}}");
    assert_eq!(r.header("content-type"), "application/json");
    // Nobody answers within the route's timeout: 504.
    let r = post(&gw.url("/idle"), &[], "{}").await;
    assert_problem(&r, 504, "upstream_timeout");
    // Async: 202 and a Location, then the reply under the operation.
    let r = post(&gw.url("/later"), &[], "{\"sku\":4}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let location = r.header("location").to_owned();
    eventually(10, "the AMQP reply filed under the operation", || async {
        get(&gw.url(&location)).await.status == 201
    })
    .await;
    assert_eq!(
        get(&gw.url(&location)).await.text(),
        "{\"done\":{\"sku\":4}}"
    );
    for n in [&q, &idle] {
        let _ = ch
            .queue_delete(n.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

#[tokio::test]
async fn sigterm_during_an_amqp_delivery_finishes_and_acks_it() {
    let ch = rabbit().await;
    let q = name("amqp-term");
    queue(&ch, &q).await;
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let up = Upstream::start(move |_req: http::Request<hyper::body::Incoming>| {
        let count = count.clone();
        async move {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(800)).await;
            text(200, "done")
        }
    })
    .await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\n[brokers.rabbit]\nurl = \"{AMQP}\"\n\n[services.notify]\nendpoints = [\"{}\"]\n\n[[consumer]]\nbroker = \"rabbit\"\nqueue = \"{q}\"\nservice = \"notify\"\npath = \"/notify\"\n",
        up.url()
    );
    let dir = write_config(&cfg, &[("x.toml", "[frontend]\nname = \"x\"\n")]);
    let mut gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"slow",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    eventually(20, "the delivery started", || async {
        seen.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    gw.signal("TERM");
    let status = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Finished and acked before the exit: the queue holds nothing to deliver again.
    assert_eq!(queue_len(&ch, &q).await, 0);
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    let _ = ch
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await;
}

#[test]
fn an_async_route_path_leaves_room_for_its_operations() {
    let gw = config(NATS, "");
    let routes = "[frontend]\nname = \"cmd\"\n\n[[route]]\nname = \"all\"\npath = \"/orders/{*rest}\"\nmethods = [\"POST\"]\npublish = { broker = \"events\", subject = \"a.b\", reply = \"async\" }\n";
    let e = compile_errors(&gw, "cmd.toml", routes);
    assert!(
        e.contains("cmd.toml:8:") && e.contains("cannot end in a `{*…}` catch-all"),
        "{e}"
    );
}
