//! Errors the gateway answers itself: 404, 405, 413, 502, 504, all as problem+json.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};

use crate::support::*;

const ROUTES: &str = r#"
[frontend]
name = "web"
path_prefix = "/web"

[[route]]
name = "items"
path = "/items/{id}"
methods = ["GET", "PUT"]
proxy = { service = "svc" }

[[route]]
name = "upload"
path = "/upload"
methods = ["POST"]
proxy = { service = "svc" }

[[route]]
name = "slow"
path = "/slow"
timeout = "300ms"
proxy = { service = "svc" }
"#;

async fn gateway_for(url: &str, server_extra: &str) -> TestGateway {
    TestGateway::start(
        &gateway_toml(
            server_extra,
            &format!("[services.svc]\nendpoints = [\"{url}\"]\n"),
        ),
        &[("web.toml", ROUTES)],
    )
    .await
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405() {
    let up = echo_upstream().await;
    let gw = gateway_for(&up.url(), "").await;
    assert_problem(&get(&gw.url("/nothing/here")).await, 404, "route_not_found");
    let del = Request::delete(gw.url("/web/items/1"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(del).await;
    assert_problem(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), "GET, HEAD, PUT");
    assert_eq!(
        up.requests(),
        0,
        "errors are answered without calling the upstream"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let up = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        match req.into_body().collect().await {
            Ok(b) => text(200, format!("{}", b.to_bytes().len())),
            Err(_) => text(400, "body failed"),
        }
    })
    .await;
    let gw = gateway_for(&up.url(), "max_request_body = \"1KiB\"").await;

    // Declared too large: refused before the upstream is called.
    let req = Request::post(gw.url("/web/upload"))
        .body(Full::new(Bytes::from(vec![b'x'; 2048])))
        .unwrap();
    assert_problem(&send(req).await, 413, "body_too_large");
    assert_eq!(up.requests(), 0);

    // Within the limit: passes.
    let req = Request::post(gw.url("/web/upload"))
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    assert_eq!(send(req).await.text(), "1000");

    // Chunked (no length) and too large: cut off while streaming, answered 413.
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::io::Error>> = (0..8)
        .map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![b'y'; 512]))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let req = Request::post(gw.url("/web/upload")).body(body).unwrap();
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let r = read(c.request(req).await.unwrap()).await;
    assert_problem(&r, 413, "body_too_large");
}

#[tokio::test]
async fn upstream_down_is_502() {
    let addr = closed_port().await;
    let gw = gateway_for(&format!("http://{addr}"), "").await;
    let r = get(&gw.url("/web/items/1")).await;
    assert_problem(&r, 502, "upstream_connect_failed");
    assert!(
        !r.text().contains("refused"),
        "no internal detail: {}",
        r.text()
    );
    // The gateway keeps serving.
    assert_problem(
        &get(&gw.url("/web/items/1")).await,
        502,
        "upstream_connect_failed",
    );
}

#[tokio::test]
async fn upstream_reset_is_502() {
    // Accepts, reads the request, and closes without answering.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let gw = gateway_for(&format!("http://{addr}"), "").await;
    assert_problem(&get(&gw.url("/web/items/1")).await, 502, "upstream_failed");
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let up = Upstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        text(200, "too late")
    })
    .await;
    let gw = gateway_for(&up.url(), "").await;
    let r = get(&gw.url("/web/slow")).await;
    assert_problem(&r, 504, "upstream_timeout");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let up = echo_upstream().await;
    let gw = gateway_for(&up.url(), "").await;
    for _ in 0..3 {
        assert_eq!(get(&gw.url("/web/items/1")).await.status, 200);
    }
    get(&gw.url("/nope")).await;
    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(
            r#"gatehouse_requests_total{frontend="web",method="GET",route="items",status="200"} 3"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"gatehouse_requests_total{frontend="",method="GET",route="",status="404"} 1"#)
    );
    assert!(m.contains(r#"gatehouse_upstream_requests_total{outcome="200",service="svc"} 3"#));
    assert!(m.contains("gatehouse_request_duration_seconds_bucket"));
    assert!(m.contains("gatehouse_config_generation 1"));
    assert!(m.contains(r#"gatehouse_config_reloads_total{result="failure"} 0"#));
    assert_eq!(get(&gw.admin_url("/healthz")).await.status, 200);
    assert_eq!(get(&gw.admin_url("/readyz")).await.status, 200);
}
