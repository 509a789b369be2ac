//! `publish` routes against a real NATS: the machine's server at 127.0.0.1:4222 (JetStream on;
//! `.ci/run` starts one when it is missing) and, for the broker going away, a `nats-server`
//! started by the test. 202 only after the broker confirmed; dedup by `Idempotency-Key`;
//! request-reply; 503 (and nothing acknowledged that was not stored) when the broker is down.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use http::Request;
use http_body_util::Full;

use crate::support::*;

const NATS: &str = "nats://127.0.0.1:4222";

async fn nats() -> async_nats::Client {
    async_nats::connect(NATS)
        .await
        .expect("NATS with JetStream is required at 127.0.0.1:4222 (.ci/run starts it)")
}

/// A subject prefix of this run (the server outlives test runs).
fn prefix(test: &str) -> String {
    format!("ghtest.{}.{test}", std::process::id())
}

fn config(url: &str, extra: &str) -> String {
    gateway_toml(
        "",
        &format!(
            "[brokers.events]\nurl = \"{url}\"\nrequired = true\npublish_timeout = \"1s\"\n{extra}"
        ),
    )
}

fn routes(publish: &str) -> String {
    format!("[frontend]\nname = \"cmd\"\n\n[[route]]\nname = \"place\"\npath = \"/orders\"\nmethods = [\"POST\"]\ntimeout = \"2s\"\npublish = {publish}\n")
}

pub(crate) async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut b = Request::post(url).header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

pub(crate) async fn ready(gw: &TestGateway) {
    eventually(15, "the broker connected (/readyz)", || async {
        get(&gw.admin_url("/readyz")).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn jetstream_publishes_are_202_after_the_ack_and_deduplicated() {
    let client = nats().await;
    let js = jetstream::new(client.clone());
    let p = prefix("js");
    let name = p.replace('.', "_").to_uppercase();
    let mut stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{p}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    let two = format!(
        "{}\n[[route]]\nname = \"place2\"\npath = \"/orders2\"\npublish = {{ broker = \"events\", subject = \"{p}.place\", jetstream = true }}\n",
        routes(&format!(
            "{{ broker = \"events\", subject = \"{p}.place\", jetstream = true }}"
        ))
    );
    let gw = TestGateway::start(&config(NATS, ""), &[("cmd.toml", &two)]).await;
    ready(&gw).await;
    let r = post(
        &gw.url("/orders"),
        &[("idempotency-key", "order-1")],
        r#"{"sku":"a"}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let v = r.json();
    assert_eq!(v["id"], "order-1");
    assert_eq!(v["stream"], name.as_str());
    assert_eq!(v["duplicate"], false);
    let seq = v["sequence"].as_u64().unwrap();
    // The client's retry: stored once.
    let r = post(
        &gw.url("/orders"),
        &[("idempotency-key", "order-1")],
        r#"{"sku":"a"}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["duplicate"], true);
    assert_eq!(r.json()["sequence"].as_u64(), Some(seq));
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    // What was stored: the body and the headers.
    let m = stream.get_raw_message(seq).await.unwrap();
    assert_eq!(&m.payload[..], br#"{"sku":"a"}"#);
    // NATS header names are case-sensitive: the usual spelling, exactly.
    let h = |name: &str| {
        m.headers
            .iter()
            .find(|(k, _)| k.to_string() == name)
            .and_then(|(_, v)| v.first().map(|v| v.to_string()))
    };
    // The dedup id is the key scoped to the route and the client: not the bare key.
    let msg_id = h("Nats-Msg-Id").unwrap();
    assert_eq!(msg_id.len(), 64, "{msg_id}");
    assert_eq!(h("Idempotency-Key").as_deref(), Some("order-1"));
    assert_eq!(h("Content-Type").as_deref(), Some("application/json"));
    assert!(h("X-Request-Id").is_some());
    assert_eq!(h("X-Forwarded-For").as_deref(), Some("127.0.0.1"));
    assert!(h("traceparent").is_some_and(|t| t.starts_with("00-")));
    // Without a key the request id is the message id.
    let r = post(&gw.url("/orders"), &[], "{}").await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["id"], r.header("x-request-id"));
    // The same key on another route is another message.
    let r = post(&gw.url("/orders2"), &[("idempotency-key", "order-1")], "{}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["duplicate"], false);
    // Larger than the broker takes (1 MiB by default): refused before it reaches the broker
    // (which would close the connection every publish shares).
    let big = "x".repeat(2 << 20);
    assert_problem(
        &post(&gw.url("/orders"), &[], &big).await,
        413,
        "message_too_large",
    );
    let r = post(&gw.url("/orders"), &[], "{}").await;
    assert_eq!(r.status, 202, "the connection is still up: {}", r.text());
    // A bad key is the client's mistake.
    let r = post(&gw.url("/orders"), &[("idempotency-key", "a b")], "{}").await;
    assert_problem(&r, 400, "invalid_idempotency_key");
    // A subject no stream stores: 503, never 202.
    let gw2 = TestGateway::start(
        &config(NATS, ""),
        &[(
            "cmd.toml",
            &routes(
                "{ broker = \"events\", subject = \"ghtest.nostream.anywhere\", jetstream = true }",
            ),
        )],
    )
    .await;
    ready(&gw2).await;
    assert_problem(
        &post(&gw2.url("/orders"), &[], "{}").await,
        502,
        "publish_rejected",
    );
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(r#"gatehouse_broker_publishes_total{broker="events",outcome="duplicate"} 1"#),
        "{m}"
    );
    js.delete_stream(&name).await.unwrap();
}

#[tokio::test]
async fn core_publish_and_request_reply() {
    let client = nats().await;
    let p = prefix("core");
    let mut sub = client.subscribe(format!("{p}.place")).await.unwrap();
    // A service answering requests on `{p}.ask`, with a status and a content type.
    let mut asks = client.subscribe(format!("{p}.ask")).await.unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(m) = asks.next().await {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Gatehouse-Status", "201");
            h.insert("Content-Type", "application/json");
            let body = format!("{{\"echo\":{}}}", String::from_utf8_lossy(&m.payload));
            if let Some(reply) = m.reply {
                let _ = responder.publish_with_headers(reply, h, body.into()).await;
            }
        }
    });
    // A subscriber that never answers.
    let _silent = client.subscribe(format!("{p}.silent")).await.unwrap();
    client.flush().await.unwrap();
    let file = format!(
        "[frontend]\nname = \"cmd\"\n\n[[route]]\nname = \"place\"\npath = \"/orders\"\npublish = {{ broker = \"events\", subject = \"{p}.place\" }}\n\n[[route]]\nname = \"ask\"\npath = \"/ask\"\npublish = {{ broker = \"events\", subject = \"{p}.ask\", reply = \"sync\" }}\n\n[[route]]\nname = \"silent\"\npath = \"/silent\"\ntimeout = \"300ms\"\npublish = {{ broker = \"events\", subject = \"{p}.silent\", reply = \"sync\" }}\n\n[[route]]\nname = \"nobody\"\npath = \"/nobody\"\npublish = {{ broker = \"events\", subject = \"{p}.nobody\", reply = \"sync\" }}\n"
    );
    let gw = TestGateway::start(&config(NATS, ""), &[("cmd.toml", &file)]).await;
    ready(&gw).await;
    let r = post(&gw.url("/orders"), &[], "{\"n\":1}").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"{\"n\":1}");
    assert_eq!(
        m.headers.unwrap().get("X-Request-Id").unwrap().as_str(),
        r.header("x-request-id")
    );
    let r = post(&gw.url("/ask"), &[], "7").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.text(), "{\"echo\":7}");
    assert_problem(
        &post(&gw.url("/silent"), &[], "x").await,
        504,
        "upstream_timeout",
    );
    assert_problem(
        &post(&gw.url("/nobody"), &[], "x").await,
        503,
        "no_responders",
    );
}

/// A `nats-server` of the test's own, with JetStream, on a free port.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start(port: u16, dir: &std::path::Path) -> OwnNats {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server is required (.ci/run installs it)");
        OwnNats {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    async fn client(&self) -> async_nats::Client {
        for _ in 0..100 {
            if let Ok(c) = async_nats::connect(format!("nats://127.0.0.1:{}", self.port)).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the test's nats-server did not start");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn a_broker_that_is_down_gets_503_and_nothing_acknowledged_is_lost() {
    let port = closed_port().await.port();
    let store = tempfile::tempdir().unwrap();
    let mut server = OwnNats::start(port, store.path());
    let js = jetstream::new(server.client().await);
    js.get_or_create_stream(jetstream::stream::Config {
        name: "DOWN".into(),
        subjects: vec!["down.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let gw = TestGateway::start(
        &config(&url, ""),
        &[(
            "cmd.toml",
            &routes("{ broker = \"events\", subject = \"down.orders\", jetstream = true }"),
        )],
    )
    .await;
    ready(&gw).await;
    let mut accepted = 0;
    for i in 0..3 {
        let r = post(
            &gw.url("/orders"),
            &[("idempotency-key", &format!("k{i}"))],
            "{}",
        )
        .await;
        assert_eq!(r.status, 202, "{}", r.text());
        accepted += 1;
    }
    server.stop();
    for i in 3..6 {
        let r = post(
            &gw.url("/orders"),
            &[("idempotency-key", &format!("k{i}"))],
            "{}",
        )
        .await;
        assert_problem(&r, 503, "broker_unavailable");
    }
    eventually(15, "readyz reports the required broker", || async {
        let r = get(&gw.admin_url("/readyz")).await;
        r.status == 503 && r.text().contains("events")
    })
    .await;
    // Back again: every 202 was stored, and publishing works again by itself.
    let server = OwnNats::start(port, &server.dir.clone());
    let js = jetstream::new(server.client().await);
    let mut stream = js.get_stream("DOWN").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, accepted);
    ready(&gw).await;
    let r = post(&gw.url("/orders"), &[("idempotency-key", "k9")], "{}").await;
    assert_eq!(r.status, 202, "{}", r.text());
}

#[test]
fn publish_mistakes_are_located() {
    let gw = config(
        NATS,
        "\n[brokers.kafka]\nurl = \"kafka://127.0.0.1:9092\"\n",
    );
    let e = compile_errors(
        &gw,
        "cmd.toml",
        &routes("{ broker = \"nope\", subject = \"a.b\" }"),
    );
    assert!(e.contains("has no known scheme: nats://, amqp://"), "{e}");
    assert!(
        e.contains("cmd.toml:9:") && e.contains("unknown broker `nope`"),
        "{e}"
    );
    let gw = config(NATS, "");
    let e = compile_errors(
        &gw,
        "cmd.toml",
        &routes("{ broker = \"events\", subject = \"a.*\" }"),
    );
    assert!(e.contains("is not a NATS subject"), "{e}");
    // Each kind of broker takes its own keys, and replies only on NATS.
    let gw = config(
        NATS,
        "\n[brokers.rabbit]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\n[brokers.mq]\nurl = \"mqtt://127.0.0.1:1883\"\n",
    );
    for (publish, says) in [
        (
            "{ broker = \"rabbit\", subject = \"a.b\" }",
            "broker `rabbit` is AMQP: set `exchange` and `routing_key`",
        ),
        (
            "{ broker = \"events\", exchange = \"x\", routing_key = \"k\" }",
            "broker `events` is NATS: set `subject`",
        ),
        (
            "{ broker = \"mq\", topic = \"a/+\" }",
            "is not an MQTT topic",
        ),
        (
            "{ broker = \"mq\", topic = \"a/b\", qos = 2 }",
            "qos must be 0 or 1",
        ),
        (
            "{ broker = \"mq\", topic = \"a/b\", reply = \"sync\" }",
            "reply = \"sync\" is offered on NATS and AMQP brokers only",
        ),
    ] {
        let e = compile_errors(&gw, "cmd.toml", &routes(publish));
        assert!(
            e.contains("cmd.toml:9:") && e.contains(says),
            "{publish}: {e}"
        );
    }
    let e = compile_errors(
        &gw,
        "cmd.toml",
        &routes("{ broker = \"events\", subject = \"a.b\", reply = \"sync\", jetstream = true }"),
    );
    assert!(
        e.contains("cannot be combined with jetstream = true"),
        "{e}"
    );
    // `[[consumer]]` mistakes, each at its key.
    let gw = config(
        NATS,
        "\n[services.s]\nendpoints = [\"http://127.0.0.1:1\"]\n\n[[consumer]]\nbroker = \"nope\"\nsubject = \"a.*\"\nservice = \"gone\"\npath = \"notify\"\nname = \"a b\"\nmax_attempts = 0\n",
    );
    let e = compile_errors(&gw, "cmd.toml", "[frontend]\nname = \"f\"\n");
    for (line, says) in [
        (":20:", "[[consumer]] unknown broker `nope`"),
        (":21:", "[[consumer]] `a.*` is not a NATS subject"),
        (":22:", "[[consumer]] unknown service `gone`"),
        (
            ":23:",
            "[[consumer]] path `notify` must be a path starting with `/`",
        ),
        (":24:", "[[consumer]] name `a b` may hold only"),
        (
            "",
            "[[consumer]] max_attempts and max_in_flight must be at least 1",
        ),
    ] {
        assert!(
            e.lines().any(|l| l.contains(line) && l.contains(says)),
            "want {line} {says}:\n{e}"
        );
    }
    // Credentials never shown in errors.
    let gw = config("nats://gw:s3cret@127.0.0.1:4222,amqp://u:s3cret@h:5672", "");
    let e = compile_errors(&gw, "cmd.toml", "[frontend]\nname = \"f\"\n");
    assert!(e.contains("mixes kinds") && !e.contains("s3cret"), "{e}");
}

/// A stream for a consumer test, and a service that answers deliveries: `flaky` fails its first
/// two deliveries, `poison` every one, `slow` takes 800 ms; each delivery's number is recorded.
async fn consumer_setup(
    test: &str,
) -> (
    String,
    jetstream::Context,
    Upstream,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
) {
    let client = nats().await;
    let js = jetstream::new(client);
    let p = prefix(test);
    js.get_or_create_stream(jetstream::stream::Config {
        name: p.replace('.', "_").to_uppercase(),
        subjects: vec![format!("{p}.>")],
        ..Default::default()
    })
    .await
    .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let up = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let n = req.headers()["gatehouse-delivery"]
                .to_str()
                .unwrap()
                .to_owned();
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            log.lock().unwrap().push((body.clone(), n.clone()));
            match (body.as_str(), n.as_str()) {
                ("poison", _) | ("flaky", "1" | "2") => text(503, "not now"),
                ("slow", _) => {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    text(200, "done")
                }
                _ => text(200, "ok"),
            }
        }
    })
    .await;
    (p, js, up, seen)
}

fn consumer_config(p: &str, up: &Upstream, extra: &str) -> String {
    format!(
        "[brokers.events]\nurl = \"{NATS}\"\n\n[services.notify]\nendpoints = [\"{}\"]\n\n[[consumer]]\nbroker = \"events\"\nsubject = \"{p}.placed\"\nservice = \"notify\"\npath = \"/notify\"\nname = \"{}\"\nmax_attempts = 3\ndead_letter = \"{p}.dlq\"\nbackoff = \"50ms\"\nmax_backoff = \"100ms\"\n{extra}",
        up.url(),
        p.replace('.', "-")
    )
}

#[tokio::test]
async fn consumers_retry_with_backoff_then_dead_letter() {
    let (p, js, up, seen) = consumer_setup("cons").await;
    let client = nats().await;
    let mut dlq = client.subscribe(format!("{p}.dlq")).await.unwrap();
    client.flush().await.unwrap();
    let gw = TestGateway::start(
        &gateway_toml("", &consumer_config(&p, &up, "")),
        &[("x.toml", "[frontend]\nname = \"x\"\n")],
    )
    .await;
    for body in ["flaky", "poison", "fine"] {
        js.publish(format!("{p}.placed"), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The poison message, after its third failure, on the dead letter subject.
    let dead = tokio::time::timeout(Duration::from_secs(20), dlq.next())
        .await
        .expect("a dead letter")
        .unwrap();
    assert_eq!(&dead.payload[..], b"poison");
    let h = dead.headers.unwrap();
    assert_eq!(
        h.get("Gatehouse-Original-Subject").unwrap().as_str(),
        format!("{p}.placed")
    );
    assert_eq!(h.get("Gatehouse-Last-Status").unwrap().as_str(), "503");
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
    let m = get(&gw.admin_url("/metrics")).await.text();
    let name = p.replace('.', "-");
    for (outcome, n) in [("acked", 2), ("retried", 4), ("dead_lettered", 1)] {
        let line = format!(
            "gatehouse_consumer_deliveries_total{{consumer=\"{name}\",outcome=\"{outcome}\"}} {n}"
        );
        assert!(m.contains(&line), "{line}\n{m}");
    }
    js.delete_stream(p.replace('.', "_").to_uppercase())
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_during_a_delivery_finishes_and_acks_it() {
    let (p, js, up, seen) = consumer_setup("term").await;
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n\n{}",
        consumer_config(&p, &up, "")
    );
    let dir = write_config(&cfg, &[("x.toml", "[frontend]\nname = \"x\"\n")]);
    let mut gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));
    js.publish(format!("{p}.placed"), "slow".into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(20, "the delivery started", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    gw.signal("TERM");
    let status = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    // The delivery finished before the exit and was acked: nothing pending, nothing to redeliver.
    let stream = js
        .get_stream(p.replace('.', "_").to_uppercase())
        .await
        .unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&p.replace('.', "-")).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "{info:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);
    js.delete_stream(p.replace('.', "_").to_uppercase())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reload_that_removes_a_consumer_lets_its_delivery_finish() {
    let (p, js, up, seen) = consumer_setup("drain").await;
    let gw = TestGateway::start(
        &gateway_toml("", &consumer_config(&p, &up, "")),
        &[("x.toml", "[frontend]\nname = \"x\"\n")],
    )
    .await;
    js.publish(format!("{p}.placed"), "slow".into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(20, "the delivery started", || async {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    let m = get(&gw.admin_url("/metrics")).await.text();
    let name = p.replace('.', "-");
    assert!(
        m.contains(&format!(
            "gatehouse_consumer_pending{{consumer=\"{name}\"}} 0"
        )),
        "{m}"
    );
    // The consumer is gone from the config: it stops fetching, its delivery finishes.
    std::fs::write(
        gw.dir.path().join("gateway.toml"),
        gateway_toml(
            "",
            &format!(
                "[brokers.events]\nurl = \"{NATS}\"\n\n[services.notify]\nendpoints = [\"{}\"]\n",
                up.url()
            ),
        ),
    )
    .unwrap();
    assert_eq!(admin_reload(&gw).await.status, 200);
    let stream = js
        .get_stream(p.replace('.', "_").to_uppercase())
        .await
        .unwrap();
    let mut consumer: jetstream::consumer::PullConsumer = stream.get_consumer(&name).await.unwrap();
    let mut info = consumer.info().await.unwrap().clone();
    for _ in 0..100 {
        if info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        info = consumer.info().await.unwrap().clone();
    }
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "{info:?}");
    assert_eq!(seen.lock().unwrap().len(), 1, "delivered once, not again");
    js.delete_stream(p.replace('.', "_").to_uppercase())
        .await
        .unwrap();
}
