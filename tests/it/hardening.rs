//! The edge against hostile or broken clients, on raw sockets (a client library would
//! normalise the requests): client faults are not backend faults, no tunnel past routing, one
//! Host, only the chunked coding, head limits, a refused body read before the close.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Writes `raw` and reads until the peer closes or 10 s pass; returns what was read.
async fn exchange(gw: &TestGateway, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> &str {
    resp.split(' ').nth(1).unwrap_or("")
}

fn routes(extra: &str) -> String {
    format!(
        r#"
[frontend]
name = "web"
path_prefix = "/web"

[[route]]
name = "all"
path = "/{{*rest}}"
proxy = {{ service = "svc" }}
{extra}"#
    )
}

async fn gateway(up: &Upstream, server_extra: &str, service_extra: &str) -> TestGateway {
    TestGateway::start(
        &gateway_toml(
            server_extra,
            &format!(
                "[services.svc]\nendpoints = [\"{}\"]\n{service_extra}\n",
                up.url()
            ),
        ),
        &[("web.toml", &routes(""))],
    )
    .await
}

/// An upstream that reads the whole request body before answering.
async fn reading_upstream() -> Upstream {
    Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        match http_body_util::BodyExt::collect(req.into_body()).await {
            Ok(b) => text(200, format!("got {}", b.to_bytes().len())),
            Err(_) => text(400, "body failed"),
        }
    })
    .await
}

fn metric(m: &str, prefix: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn client_body_failures_do_not_eject_the_endpoint_or_open_the_circuit() {
    let up = reading_upstream().await;
    let gw = gateway(
        &up,
        "",
        "[services.svc.outlier_detection]\nconsecutive_failures = 2\n\
         [services.svc.circuit_breaker]\nconsecutive_failures = 2\n",
    )
    .await;
    let head = "POST /web/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    // Three clients that go away in the middle of a chunked upload.
    for _ in 0..3 {
        let before = up.requests();
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(format!("{head}5\r\nhello\r\n").as_bytes())
            .await
            .unwrap();
        // Until the upstream has the request, so that the failure is in the body.
        eventually(10, "the upload reached the upstream (not refused: earlier client faults must not eject it)", || async {
            up.requests() > before
        })
        .await;
        drop(s);
    }
    // Three clients that send an invalid chunk size: 400, not 502.
    for _ in 0..3 {
        let resp = exchange(&gw, format!("{head}5\r\nhello\r\nzz\r\n").as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "{resp}");
        assert!(resp.contains("\"code\":\"bad_request\""), "{resp}");
    }
    // Every one of them is over (recorded as 499 or 400), and none was the service's fault.
    eventually(10, "the six requests were recorded", || async {
        let m = get(&gw.admin_url("/metrics")).await.text();
        metric(&m, "gatehouse_requests_total{frontend=\"web\"") >= 6.0
    })
    .await;
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        metric(&m, "gatehouse_requests_total{frontend=\"web\",method=\"POST\",route=\"all\",status=\"499\"}") >= 1.0
            || metric(&m, "gatehouse_requests_total{frontend=\"web\",method=\"POST\",route=\"all\",status=\"400\"}") >= 4.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "gatehouse_upstream_requests_total{outcome=\"reset\""),
        0.0,
        "client faults are not upstream errors:\n{m}"
    );
    let r = get(&gw.url("/web/after")).await;
    assert_eq!(r.status, 200, "the endpoint was not ejected: {}", r.text());
    let services = get(&gw.admin_url("/admin/services")).await.json();
    assert_eq!(
        services["services"][0]["circuit"]["state"], "closed",
        "{services}"
    );
}

#[tokio::test]
async fn an_h2c_upgrade_is_not_forwarded() {
    let up = echo_upstream().await;
    let gw = gateway(&up, "", "").await;
    let resp = exchange(
        &gw,
        b"GET /web/anything HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    let lower = body.to_ascii_lowercase();
    assert!(
        !lower.contains("\"upgrade\""),
        "Upgrade reached the backend: {body}"
    );
    assert!(!lower.contains("http2-settings"), "{body}");
}

#[tokio::test]
async fn a_request_has_exactly_one_valid_authority() {
    let up = echo_upstream().await;
    let gw = gateway(&up, "", "").await;
    for (what, raw) in [
        (
            "two Host headers",
            "GET /web/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
        ),
        (
            "no Host in HTTP/1.1",
            "GET /web/x HTTP/1.1\r\nConnection: close\r\n\r\n",
        ),
        (
            "Host disagreeing with the absolute target",
            "GET http://a.example/web/x HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        ),
        (
            "user info in Host",
            "GET /web/x HTTP/1.1\r\nHost: u@a\r\nConnection: close\r\n\r\n",
        ),
    ] {
        let resp = exchange(&gw, raw.as_bytes()).await;
        assert_eq!(status_of(&resp), "400", "{what}: {resp}");
        assert!(resp.contains("application/problem+json"), "{what}: {resp}");
    }
    // HTTP/1.0 may leave Host out; an agreeing absolute target is served.
    let resp = exchange(&gw, b"GET /web/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    let resp = exchange(
        &gw,
        b"GET http://a.example/web/x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    assert!(
        resp.contains("\"x-forwarded-host\":\"a.example\""),
        "{resp}"
    );
}

#[tokio::test]
async fn a_coding_other_than_chunked_is_501() {
    let up = reading_upstream().await;
    let gw = gateway(&up, "", "").await;
    let resp = exchange(
        &gw,
        b"POST /web/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "501", "{resp}");
    assert!(resp.contains("\"code\":\"not_implemented\""), "{resp}");
    assert_eq!(up.requests(), 0, "nothing reached the backend");
}

/// Sends `head`, then `body_len` bytes (chunked framing if `chunked`) while reading; returns the
/// answer's status line and whether the whole body could be written.
async fn upload_while_reading(
    gw: &TestGateway,
    head: String,
    body_len: usize,
    chunked: bool,
) -> (String, bool) {
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'a'; 64 * 1024];
        let mut sent = 0;
        while sent < body_len {
            let ok = if chunked {
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(&chunk);
                framed.extend_from_slice(b"\r\n");
                wr.write_all(&framed).await
            } else {
                wr.write_all(&chunk).await
            };
            if ok.is_err() {
                return false;
            }
            sent += chunk.len();
        }
        if chunked && wr.write_all(b"0\r\n\r\n").await.is_err() {
            return false;
        }
        true
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("the connection was not reset before the answer");
        assert!(n > 0, "closed before the answer");
        out.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    (line, writer.await.unwrap())
}

#[tokio::test]
async fn a_refused_body_is_read_so_the_client_sees_the_413() {
    let up = reading_upstream().await;
    let gw = gateway(&up, "max_request_body = \"1KiB\"", "").await;
    let len = 16 * 1024 * 1024;
    // Declared too large: refused before the backend is asked.
    let (line, all_written) = upload_while_reading(
        &gw,
        format!("POST /web/x HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n"),
        len,
        false,
    )
    .await;
    assert_eq!(status_of(&line), "413", "{line}");
    assert!(all_written, "the whole declared body could be written");
    // Chunked, found too large while it streams to the backend.
    let (line, all_written) = upload_while_reading(
        &gw,
        "POST /web/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
        len,
        true,
    )
    .await;
    assert_eq!(status_of(&line), "413", "{line}");
    assert!(all_written, "the whole chunked body could be written");
}

#[tokio::test]
async fn head_limits_answer_414_and_431_with_problem_json() {
    let up = echo_upstream().await;
    let gw = gateway(&up, "", "").await;
    let long_uri = format!("/web/{}", "a".repeat(9 * 1024));
    let resp = exchange(
        &gw,
        format!("GET {long_uri} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), "414", "{}", &resp[..resp.len().min(300)]);
    assert!(resp.contains("\"code\":\"uri_too_long\""));
    let line = "v".repeat(10 * 1024);
    let resp = exchange(
        &gw,
        format!("GET /web/x HTTP/1.1\r\nHost: x\r\nX-Big: {line}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), "431", "{}", &resp[..resp.len().min(300)]);
    assert!(resp.contains("\"code\":\"headers_too_large\""));
    let many: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let resp = exchange(
        &gw,
        format!("GET /web/x HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), "431", "{}", &resp[..resp.len().min(300)]);
    // A 70 KB header line never reaches the backend.
    let huge = "v".repeat(70 * 1024);
    let resp = exchange(
        &gw,
        format!("GET /web/x HTTP/1.1\r\nHost: x\r\nX-Huge: {huge}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status_of(&resp), "431", "{}", &resp[..resp.len().min(300)]);
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn underscore_header_names_are_dropped() {
    let up = echo_upstream().await;
    let gw = gateway(&up, "", "").await;
    let resp = exchange(
        &gw,
        b"GET /web/x HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX-Kept: 1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), "200", "{resp}");
    assert!(!resp.contains("6.6.6.6"), "{resp}");
    assert!(resp.contains("\"x-kept\":\"1\""), "{resp}");
}

#[tokio::test]
async fn a_route_may_lower_the_body_limit() {
    let up = reading_upstream().await;
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url()),
        ),
        &[(
            "web.toml",
            r#"
[frontend]
name = "web"
path_prefix = "/web"
max_request_body = "64B"

[[route]]
name = "small"
path = "/small"
max_request_body = "8B"
proxy = { service = "svc" }

[[route]]
name = "rest"
path = "/{*rest}"
proxy = { service = "svc" }
"#,
        )],
    )
    .await;
    let post = |path: &'static str, n: usize| {
        let gw_url = gw.url(path);
        async move {
            send(
                http::Request::post(gw_url)
                    .body(http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; n])))
                    .unwrap(),
            )
            .await
        }
    };
    assert_problem(&post("/web/small", 9).await, 413, "body_too_large");
    assert_eq!(post("/web/small", 8).await.text(), "got 8");
    assert_eq!(
        post("/web/other", 64).await.text(),
        "got 64",
        "the frontend's limit"
    );
    assert_problem(&post("/web/other", 65).await, 413, "body_too_large");
}

#[tokio::test]
async fn the_admin_api_needs_its_token_except_for_health() {
    let up = echo_upstream().await;
    let token = "s3cret-admin-token-0123";
    let gw = TestGateway::start(
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n\
             [log]\naccess_log = false\n\n[services.svc]\nendpoints = [\"{}\"]\n",
            up.url()
        ),
        &[("web.toml", &routes(""))],
    )
    .await;
    for open in ["/healthz", "/readyz"] {
        assert_eq!(get(&gw.admin_url(open)).await.status, 200, "{open}");
    }
    for guarded in ["/metrics", "/admin/config", "/admin/services"] {
        let r = get(&gw.admin_url(guarded)).await;
        assert_eq!(r.status, 401, "{guarded}");
        let wrong = send(
            http::Request::get(gw.admin_url(guarded))
                .header("authorization", "Bearer s3cret-admin-token-0124")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(wrong.status, 401, "{guarded}");
        let right = send(
            http::Request::get(gw.admin_url(guarded))
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(right.status, 200, "{guarded}");
        assert!(!right.text().contains(token), "{guarded} shows the token");
    }
    let reload = send(
        http::Request::post(gw.admin_url("/admin/reload"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(reload.status, 401);
}

#[test]
fn an_admin_api_beyond_loopback_without_a_token_is_refused() {
    let dir = write_config(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"0.0.0.0:0\"\n",
        &[],
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "gateway.toml:5:10: [admin] listen = \"0.0.0.0:0\" is not a loopback address"
        ),
        "{stdout}"
    );
}
