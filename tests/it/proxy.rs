//! Proxying: path rewrite, query, headers set and removed, routing by host, path and method.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

fn services(url: &str) -> String {
    format!("[services.users]\nendpoints = [\"{url}\"]\n")
}

const WEB: &str = r#"
[frontend]
name = "web"
path_prefix = "/web"

[[route]]
name = "user"
path = "/users/{id}"
methods = ["GET"]
proxy = { service = "users", path = "/v1/users/{id}" }

[[route]]
name = "user-v2"
path = "/users/{id}"
methods = ["GET"]
headers = { "x-api-version" = "2" }
proxy = { service = "users", path = "/v2/users/{id}" }

[[route]]
name = "rest"
path = "/api/{*rest}"
proxy = { service = "users", path = "/{rest}" }

[[route]]
name = "plain"
path = "/plain/{*rest}"
proxy = { service = "users" }

[[route]]
name = "noquery"
path = "/noquery"
proxy = { service = "users", forward_query = false }

[[route]]
name = "keephost"
path = "/keephost"
proxy = { service = "users", preserve_host = true }

[[route]]
name = "ping"
path = "/ping"
respond = { status = 201, body = "pong", content_type = "text/plain", headers = { "cache-control" = "no-store" } }
"#;

const PARTNER: &str = r#"
[frontend]
name = "partner"
hosts = ["api.partner.test", "*.eu.partner.test"]

[[route]]
name = "ping"
path = "/web/ping"
respond = { body = "partner pong" }
"#;

async fn setup(server_extra: &str) -> (Upstream, TestGateway) {
    let up = echo_upstream().await;
    let gw = TestGateway::start(
        &gateway_toml(server_extra, &services(&up.url())),
        &[("web.toml", WEB), ("partner.toml", PARTNER)],
    )
    .await;
    (up, gw)
}

#[tokio::test]
async fn rewrites_path_with_params_and_forwards_query() {
    let (_up, gw) = setup("").await;
    let r = get(&gw.url("/web/users/42?fields=name&x=1")).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["path"], "/v1/users/42");
    assert_eq!(v["query"], "fields=name&x=1");
    assert_eq!(v["method"], "GET");

    let v = get(&gw.url("/web/api/a/b/c?q=1")).await.json();
    assert_eq!(v["path"], "/a/b/c");
    assert_eq!(v["query"], "q=1");

    // No upstream path: the matched path with the frontend prefix stripped.
    let v = get(&gw.url("/web/plain/x/y")).await.json();
    assert_eq!(v["path"], "/plain/x/y");

    let v = get(&gw.url("/web/noquery?secret=1")).await.json();
    assert_eq!(v["path"], "/noquery");
    assert!(v["query"].is_null());
}

#[tokio::test]
async fn routes_by_header_host_and_method() {
    let (_up, gw) = setup("").await;
    let req = Request::get(gw.url("/web/users/7"))
        .header("x-api-version", "2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(req).await.json()["path"], "/v2/users/7");
    assert_eq!(
        get(&gw.url("/web/users/7")).await.json()["path"],
        "/v1/users/7"
    );

    // HEAD is allowed wherever GET is.
    let head = Request::head(gw.url("/web/users/7"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(head).await.status, 200);

    for host in [
        "api.partner.test",
        "x.eu.partner.test",
        "API.Partner.Test:8080",
    ] {
        let req = Request::get(gw.url("/web/ping"))
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(req).await.text(), "partner pong", "host {host}");
    }
    // Another host gets the host-less frontend.
    let r = get(&gw.url("/web/ping")).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "pong");
    assert_eq!(r.header("content-type"), "text/plain");
    assert_eq!(r.header("cache-control"), "no-store");
}

#[tokio::test]
async fn host_is_rewritten_unless_preserved() {
    let (up, gw) = setup("").await;
    let v = get(&gw.url("/web/users/1")).await.json();
    assert_eq!(v["headers"]["host"], up.addr.to_string());
    assert_eq!(v["headers"]["x-forwarded-host"], gw.addr.to_string());
    let v = get(&gw.url("/web/keephost")).await.json();
    assert_eq!(v["headers"]["host"], gw.addr.to_string());
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let (_up, gw) = setup("").await;
    let req = Request::get(gw.url("/web/users/1"))
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("x-request-id", "client-chosen-id")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(req).await;
    let v = r.json();
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.addr.to_string());
    assert!(h["forwarded"].is_null());
    // The request id is generated, sent upstream and returned.
    let id = r.header("x-request-id");
    assert_ne!(id, "client-chosen-id");
    assert_eq!(id.len(), 32);
    assert_eq!(h["x-request-id"], id);
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_are_extended() {
    let (_up, gw) = setup("trusted_proxies = [\"127.0.0.0/8\"]").await;
    let req = Request::get(gw.url("/web/users/1"))
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("x-request-id", "edge-123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(req).await;
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-request-id"], "edge-123");
    assert_eq!(r.header("x-request-id"), "edge-123");

    // Even from a trusted proxy, an id that is not plain is replaced, both ways.
    let req = Request::get(gw.url("/web/users/1"))
        .header("x-request-id", "not plain!")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(req).await;
    let id = r.header("x-request-id");
    assert_eq!(id.len(), 32);
    assert_eq!(r.json()["headers"]["x-request-id"], id);
}

#[tokio::test]
async fn trace_context_is_propagated_or_started() {
    let (_up, gw) = setup("").await;
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = Request::get(gw.url("/web/users/1"))
        .header("traceparent", incoming)
        .header("tracestate", "vendor=1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let h = send(req).await.json()["headers"].clone();
    let tp = h["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_ne!(tp, incoming, "the gateway's hop gets its own span id");
    assert_eq!(h["tracestate"], "vendor=1");

    let h = get(&gw.url("/web/users/1")).await.json()["headers"].clone();
    let tp = h["traceparent"].as_str().unwrap();
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-"));
}

#[tokio::test]
async fn hop_by_hop_request_headers_are_removed() {
    let (_up, gw) = setup("").await;
    let req = Request::get(gw.url("/web/users/1"))
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "gzip")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let h = send(req).await.json()["headers"].clone();
    for gone in ["x-hop-secret", "keep-alive", "proxy-authorization", "te"] {
        assert!(h[gone].is_null(), "{gone} reached the upstream: {h}");
    }
    assert_eq!(h["x-end-to-end"], "kept");
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() {
    // A raw upstream, so the response headers are exactly what we write.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                let resp = "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-upstream-hop\r\nKeep-Alive: timeout=30\r\nx-upstream-hop: 1\r\nProxy-Authenticate: Basic\r\nx-app: yes\r\nContent-Length: 2\r\n\r\nok";
                s.write_all(resp.as_bytes()).await.unwrap();
            });
        }
    });
    let gw = TestGateway::start(
        &gateway_toml("", &services(&format!("http://{addr}"))),
        &[("web.toml", WEB)],
    )
    .await;
    let r = get(&gw.url("/web/users/1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    assert_eq!(r.header("x-app"), "yes");
    for gone in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert!(r.headers.get(gone).is_none(), "{gone} reached the client");
    }
}

#[tokio::test]
async fn path_is_normalized_before_routing() {
    let up = echo_upstream().await;
    let admin_only = r#"
[frontend]
name = "internal"
path_prefix = "/internal"

[[route]]
name = "secret"
path = "/secret"
respond = { body = "internal" }
"#;
    let gw = TestGateway::start(
        &gateway_toml("", &services(&up.url())),
        &[("web.toml", WEB), ("internal.toml", admin_only)],
    )
    .await;
    // Dot segments and duplicate slashes resolve before matching.
    assert_eq!(
        get(&gw.url("/web//users/./5")).await.json()["path"],
        "/v1/users/5"
    );
    assert_eq!(get(&gw.url("/web/api/x/../y")).await.json()["path"], "/y");
    // Encoded unreserved characters are decoded: %75 is `u`.
    assert_eq!(
        get(&gw.url("/web/%75sers/6")).await.json()["path"],
        "/v1/users/6"
    );
    // `..` cannot climb out of /web into a route under it: it resolves to the other path,
    // which is then routed on its own merits.
    let r = get(&gw.url("/web/api/../../internal/secret")).await;
    assert_eq!(r.text(), "internal");
    let r = get(&gw.url("/web/api/%2e%2e/%2e%2e/nothing")).await;
    assert_problem(&r, 404, "route_not_found");
    // A catch-all never sees a dot segment.
    let v = get(&gw.url("/web/api/a/%2E%2E/b")).await.json();
    assert_eq!(v["path"], "/b");
    // Invalid escapes are a 400.
    let r = get(&gw.url("/web/api/%zz")).await;
    assert_problem(&r, 400, "bad_request");
}
