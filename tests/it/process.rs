//! The gateway as users run it: a process with signals, JSON logs and the shipped demo.

use std::io::BufRead;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

fn config(upstream: &str, server_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n[routes]\nwatch = false\n[log]\nformat = \"json\"\n\n[services.svc]\nendpoints = [\"{upstream}\"]\n"
    )
}

const ROUTES: &str = "[frontend]\nname = \"web\"\npath_prefix = \"/web\"\n\n[[route]]\nname = \"a\"\npath = \"/a\"\nproxy = { service = \"svc\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_auth_provider_and_consumer_never_the_key() {
    let up = echo_upstream().await;
    // sha256("log-test-key-123")
    let d = ring::digest::digest(&ring::digest::SHA256, b"log-test-key-123");
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let auth = format!(
        "\n[auth.api_keys.partners]\nkeys = [{{ consumer = \"acme\", sha256 = \"{hex}\" }}]\n"
    );
    let routes = ROUTES.replace(
        "path_prefix = \"/web\"",
        "path_prefix = \"/web\"\nauth = \"partners\"",
    );
    let dir = write_config(&(config(&up.url(), "") + &auth), &[("web.toml", &routes)]);
    let gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));
    let r = send(
        http::Request::get(gw.url("/web/a"))
            .header("x-api-key", "log-test-key-123")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-request-id").to_owned();
    let mut events = Vec::new();
    eventually(10, "the access-log event", || {
        events =
            gw.events(|v| v["target"] == "gatehouse::access" && v["request_id"] == id.as_str());
        let found = !events.is_empty();
        async move { found }
    })
    .await;
    assert_eq!(events[0]["auth"], "partners");
    assert_eq!(events[0]["consumer"], "acme");
    assert!(gw
        .events(|v| v.to_string().contains("log-test-key-123"))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_lists_an_aggregates_calls() {
    let up = echo_upstream().await;
    let routes = "[frontend]\nname = \"web\"\n\n[[route]]\nname = \"home\"\npath = \"/home\"\n[route.aggregate]\n[[route.aggregate.call]]\nname = \"a\"\nservice = \"svc\"\npath = \"/a\"\n[[route.aggregate.call]]\nname = \"b\"\nservice = \"svc\"\npath = \"/b/{query.id}\"\nrequired = false\n";
    let dir = write_config(&config(&up.url(), ""), &[("web.toml", routes)]);
    let gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));
    let r = get(&gw.url("/home")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-request-id").to_owned();
    let mut events = Vec::new();
    eventually(10, "the access-log event", || {
        events =
            gw.events(|v| v["target"] == "gatehouse::access" && v["request_id"] == id.as_str());
        let found = !events.is_empty();
        async move { found }
    })
    .await;
    assert_eq!(events[0]["calls"], "a:ok b:missing_parameter");
    assert_eq!(events[0]["route"], "home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_access_log_has_one_event_per_request() {
    let up = echo_upstream().await;
    let dir = write_config(&config(&up.url(), ""), &[("web.toml", ROUTES)]);
    let gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));

    let r = get(&format!("{}?q=1", gw.url("/web/a"))).await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").to_owned();
    let mut events = Vec::new();
    eventually(10, "the access-log event", || {
        events =
            gw.events(|v| v["target"] == "gatehouse::access" && v["request_id"] == id.as_str());
        let found = !events.is_empty();
        async move { found }
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["frontend"], "web");
    assert_eq!(e["route"], "a");
    assert_eq!(e["method"], "GET");
    assert_eq!(e["path"], "/web/a");
    assert_eq!(e["status"], 200);
    assert_eq!(e["upstream"], up.url());
    assert!(e["bytes"].as_u64().unwrap() > 0);
    assert!(e["duration_ms"].as_f64().unwrap() >= 0.0);

    // File watching is off: the new route appears only after SIGHUP.
    let more =
        format!("{ROUTES}\n[[route]]\nname = \"b\"\npath = \"/b\"\nrespond = {{ body = \"b\" }}\n");
    std::fs::write(dir.path().join("routes/web.toml"), more).unwrap();
    assert_problem(&get(&gw.url("/web/b")).await, 404, "route_not_found");
    gw.signal("HUP");
    eventually(10, "route b after SIGHUP", || async {
        get(&gw.url("/web/b")).await.text() == "b"
    })
    .await;
    // The event is written after the new config is in service: wait for it too.
    eventually(10, "the reload's log event", || {
        let found = !gw
            .events(|v| v["message"] == "config reloaded" && v["trigger"] == "sighup")
            .is_empty();
        async move { found }
    })
    .await;
}

#[tokio::test]
async fn slow_request_heads_time_out() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(
        &gateway_toml(
            "header_read_timeout = \"500ms\"",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Half a request head, and then nothing.
    s.write_all(b"GET /web/a HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the gateway kept a connection with an incomplete head open"
    );
    assert_eq!(up.requests(), 0);
    // A complete request on a new connection is served.
    assert_eq!(get(&gw.url("/web/a")).await.status, 200);
}

#[test]
fn demo_serves_the_shipped_config_with_sample_services() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["demo", "--config"])
        .arg(root.join("gateway.toml"))
        .env("GATEHOUSE_LISTEN", "127.0.0.1:0")
        .env("GATEHOUSE_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = stdout.lines();
    let mut base = None;
    let mut token = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if base.is_none() {
            if let Some(url) = line
                .trim()
                .strip_prefix("curl -i ")
                .and_then(|u| u.split("/web/").next())
            {
                base = Some(url.to_owned());
            }
        }
        // The demo mints a JWT for /web/me and prints it.
        if let Some(rest) = line.split("Authorization: Bearer ").nth(1) {
            token = rest.split('\'').next().map(str::to_owned);
        }
        if line.contains("Edit routes/") {
            break;
        }
    }
    let base = base.expect("demo printed no URL to try");
    let token = token.expect("demo printed no token");
    // Keep reading: a closed pipe would make the demo's next print fail.
    std::thread::spawn(move || lines.for_each(drop));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = get(&format!("{base}/web/users/1")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["name"], "Ada Lovelace");
        assert_eq!(get(&format!("{base}/web/ping")).await.text(), "pong");
        let events = get(&format!("{base}/web/events")).await.text();
        assert_eq!(events.matches("event: price").count(), 5, "{events}");
        // Authentication in the demo: the partner API key, the printed JWT, a CORS preflight.
        let partner = |key: Option<&str>| {
            let mut r = http::Request::get(format!("{base}/catalog/products"))
                .header("host", "partner.localhost");
            if let Some(k) = key {
                r = r.header("x-api-key", k);
            }
            r.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap()
        };
        assert_eq!(send(partner(Some("demo-partner-key"))).await.status, 200);
        assert_eq!(send(partner(None)).await.status, 401);
        let me = send(
            http::Request::get(format!("{base}/web/me"))
                .header("authorization", format!("Bearer {token}"))
                .header("x-user-id", "spoofed")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(me.status, 200, "{}", me.text());
        assert_eq!(me.json()["headers"]["x-user-id"], "demo-user");
        // The add-tenant plugin: the claim as x-tenant.
        assert_eq!(me.json()["headers"]["x-tenant"], "demo-user");
        // The echo route's plugins: signed for the service, x-frame-options back, bots denied.
        let signed = send(
            http::Request::post(format!("{base}/web/echo/signed"))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"hello")))
                .unwrap(),
        )
        .await;
        assert_eq!(signed.status, 200, "{}", signed.text());
        assert_eq!(signed.json()["headers"]["x-signature"].as_str().map(str::len), Some(64));
        assert_eq!(signed.header("x-frame-options"), "DENY");
        let bot = send(
            http::Request::get(format!("{base}/web/echo/x"))
                .header("user-agent", "badbot/1.0")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_problem(&bot, 403, "denied");
        assert_eq!(get(&format!("{base}/web/me")).await.status, 401);
        let pre = send(
            http::Request::options(format!("{base}/web/users"))
                .header("origin", "http://localhost:3000")
                .header("access-control-request-method", "GET")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(pre.status, 204);
        assert_eq!(
            pre.header("access-control-allow-origin"),
            "http://localhost:3000"
        );
        // The BFF routes: the same services composed per frontend.
        let home = get(&format!("{base}/mobile/v1/home/1")).await;
        assert_eq!(home.status, 200, "{}", home.text());
        let h = home.json();
        assert_eq!(h["user"], serde_json::json!({"id": "1", "name": "Ada Lovelace"}));
        assert_eq!(h["orders"][0], serde_json::json!({"id": "o-100", "status": "shipped", "total": 42.5}));
        assert_eq!(h["recommended"], serde_json::json!([{"name": "Green tea", "price": 4.5}, {"name": "Tea cup", "price": 12.0}]));
        let dash = get(&format!("{base}/web/dashboard/1")).await.json();
        assert_eq!(dash["name"], "Ada Lovelace");
        assert_eq!(dash["orders"][1]["sku"], "cup-02");
        assert_eq!(dash["catalog"].as_array().map(Vec::len), Some(2));
        // REST → gRPC as the demo prints it: a unary call, a missing SKU, a server stream.
        let stock = get(&format!("{base}/web/stock/tea-01")).await;
        assert_eq!(stock.status, 200, "{}", stock.text());
        let v = stock.json();
        assert_eq!((v["sku"].as_str(), v["available"].as_i64()), (Some("tea-01"), Some(120)));
        assert!(v["checkedAt"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
        assert_problem(&get(&format!("{base}/web/stock/nope")).await, 404, "grpc_not_found");
        let watch = get(&format!("{base}/web/stock/cup-02/watch?updates=2")).await;
        assert_eq!(watch.header("content-type"), "application/x-ndjson");
        let lines: Vec<serde_json::Value> = watch
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{}", watch.text());
        assert_eq!(lines[1]["available"], 7);
        // The broker route the demo prints (NATS at 127.0.0.1:4222, as .ci/run provides; the
        // connection is made in the background, so the first answers may be 503).
        let order = || async {
            send(
                http::Request::post(format!("{base}/web/orders/place"))
                    .header("idempotency-key", "demo-test-1")
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(
                        b"{\"sku\":\"tea-01\"}",
                    )))
                    .unwrap(),
            )
            .await
        };
        eventually(15, "the demo's broker route answers 202", || async {
            order().await.status == 202
        })
        .await;
        assert_eq!(order().await.json()["id"], "demo-test-1");
        // The response cache the demo prints: a stored miss, then a hit with Age.
        let first = get(&format!("{base}/web/products?utm=x")).await;
        assert!(first.header("cache-status").contains("stored"), "{:?}", first.headers);
        let hit = get(&format!("{base}/web/products")).await;
        assert!(hit.header("cache-status").starts_with("gatehouse; hit"), "{:?}", hit.headers);
        assert!(!hit.header("age").is_empty());
        assert_eq!(hit.body, first.body);
        // The rate limit the demo prints: five per 10 s per client IP, then 429.
        let mut codes = Vec::new();
        for _ in 0..6 {
            let r = get(&format!("{base}/web/limited")).await;
            assert_eq!(r.header("ratelimit-policy"), "\"per_client\";q=5;w=10");
            codes.push(r.status.as_u16());
        }
        assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
        // The partner frontend's quota (Redis where reachable, else in memory) sets headers.
        let r = send(partner(Some("demo-partner-key"))).await;
        assert!(
            r.header("ratelimit").starts_with("\"partner_quota-1s\";r="),
            "{:?}",
            r.headers
        );
    });
    let _ = child.kill();
    let _ = child.wait();

    // Again with a stdout nobody reads any more (`gatehouse demo | head -1`): printing the
    // banner fails, and the gateway must keep serving. (In this test, not a second one: the
    // sample services listen on fixed ports.)
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (closed_reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(closed_reader);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["demo", "--config"])
        .arg(root.join("gateway.toml"))
        .env("GATEHOUSE_LISTEN", format!("127.0.0.1:{port}"))
        .env("GATEHOUSE_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            writer,
        )))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ping = format!("http://127.0.0.1:{port}/web/ping");
    rt.block_on(async {
        eventually(15, "the demo answers", || async {
            client()
                .request(http::Request::get(&ping).body(Default::default()).unwrap())
                .await
                .is_ok()
        })
        .await;
        // The banner is printed right after the listeners start; give a failing print time to
        // take the process down.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(get(&ping).await.text(), "pong");
    });
    let status = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(status.is_none(), "the demo exited: {status:?}");
}

#[tokio::test]
async fn health_command_probes_the_admin_listener() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;
    assert!(health(gw.admin.to_string()).await.status.success());
    let out = health(closed_port().await.to_string()).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(
        &gateway_toml(
            "max_connections = 1",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;
    // The first connection is served and stays open (keep-alive).
    let mut first = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    first
        .write_all(b"GET /web/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // A second one is closed at once.
    let mut second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let _ = second
        .write_all(b"GET /web/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut rest))
        .await
        .expect("the second connection was neither served nor closed");
    assert!(
        n.map_or(true, |_| rest.is_empty()),
        "the second connection was served"
    );
    drop(first);
    // With the first one gone, a new connection is served again.
    eventually(10, "a connection slot is free again", || async {
        client()
            .get(gw.url("/web/a").parse().unwrap())
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_consumer_that_stops_reading_does_not_stall_requests() {
    let up = echo_upstream().await;
    let dir = write_config(&config(&up.url(), ""), &[("web.toml", ROUTES)]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["run", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Read the log only until the listening address shows, then never again: the pipe fills.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "gateway exited");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["message"] == "listening" {
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    // Each request writes an access-log line of ~300 bytes; 2000 of them are far more than a
    // pipe buffer (64 KiB) holds.
    let c = client();
    for i in 0..2000 {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.get(format!("http://{addr}/web/a").parse().unwrap()),
        )
        .await
        .unwrap_or_else(|_| panic!("request {i} stalled"))
        .unwrap();
        assert_eq!(r.status(), 200);
        read(r).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    drop(stderr);
}

/// Runs `gatehouse health --admin ADDR` off the async runtime.
async fn health(admin: String) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .args(["health", "--admin", &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The allocator settings docs/CONFIG.md names are the ones the binary runs with, and
/// `_RJEM_MALLOC_CONF` overrides them (read back from jemalloc's own statistics at exit).
#[test]
fn the_allocator_runs_with_the_documented_settings() {
    let opts = |conf: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
            .arg("--version")
            .env("_RJEM_MALLOC_CONF", conf)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stats = opts("stats_print:true");
    for line in [
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000",
        "opt.muzzy_decay_ms: 0",
        "opt.tcache_nslots_small_min: 128",
    ] {
        assert!(stats.contains(line), "{line} missing from jemalloc's stats");
    }
    let stats = opts("stats_print:true,dirty_decay_ms:5000");
    assert!(stats.contains("opt.dirty_decay_ms: 5000"));
    assert!(stats.contains("opt.tcache_nslots_small_min: 128"));
}
