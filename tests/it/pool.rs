//! The per-worker HTTP/1.1 connection pool: reuse, idle expiry, upstreams that close idle
//! connections, and bodies dropped half-way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const ROUTES: &str = CATCH_ALL_ROUTES;

fn one_worker(service: &str) -> String {
    // One worker: these tests count the connections of one pool.
    gateway_toml("workers = 1", service)
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let up = Upstream::start(|_req| async { text(200, "ok") }).await;
    let gw = TestGateway::start(
        &one_worker(&format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url())),
        &[("web.toml", ROUTES)],
    )
    .await;
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    }
    assert_eq!(up.requests(), 20);
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn an_idle_connection_is_not_used_after_pool_idle_timeout() {
    let up = Upstream::start(|_req| async { text(200, "ok") }).await;
    let gw = TestGateway::start(
        &one_worker(&format!(
            "[services.svc]\nendpoints = [\"{}\"]\npool_idle_timeout = \"200ms\"\n",
            up.url()
        )),
        &[("web.toml", ROUTES)],
    )
    .await;
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    assert_eq!(up.connections(), 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    assert_eq!(up.connections(), 2, "the expired connection was reused");
}

#[tokio::test]
async fn pool_max_idle_zero_keeps_no_connection() {
    let up = Upstream::start(|_req| async { text(200, "ok") }).await;
    let gw = TestGateway::start(
        &one_worker(&format!(
            "[services.svc]\nendpoints = [\"{}\"]\npool_max_idle_per_endpoint = 0\n",
            up.url()
        )),
        &[("web.toml", ROUTES)],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    }
    assert_eq!(up.connections(), 5);
}

/// An upstream that answers one request per connection and then closes it without saying so
/// (no `Connection: close`), as a server does when it times out an idle keep-alive connection.
async fn closing_upstream() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Closed right after the response.
            });
        }
    });
    (format!("http://{addr}"), conns)
}

#[tokio::test]
async fn connections_the_upstream_closed_are_replaced_without_an_error() {
    let (url, conns) = closing_upstream().await;
    let gw = TestGateway::start(
        &one_worker(&format!("[services.svc]\nendpoints = [\"{url}\"]\n")),
        &[("web.toml", ROUTES)],
    )
    .await;
    for i in 0..30 {
        let r = get(&gw.url("/a")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "ok");
        // Half the time the close has arrived before the next request, half the time not.
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(conns.load(Ordering::SeqCst), 30);
}

#[tokio::test]
async fn a_body_dropped_half_way_takes_its_connection_with_it() {
    let up = Upstream::start(|req| async move {
        if req.uri().path() != "/slow" {
            return text(200, "ok");
        }
        // Two chunks 200 ms apart.
        let chunks = futures_util::stream::unfold(0, |n| async move {
            match n {
                0 => Some((Ok(Frame::data(Bytes::from_static(b"first"))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Some((Ok(Frame::data(Bytes::from_static(b"second"))), 2))
                }
                _ => None,
            }
        });
        http::Response::new(StreamBody::new(chunks).boxed())
    })
    .await;
    let gw = TestGateway::start(
        &one_worker(&format!("[services.svc]\nendpoints = [\"{}\"]\n", up.url())),
        &[("web.toml", ROUTES)],
    )
    .await;
    let resp = client()
        .request(
            http::Request::get(gw.url("/slow"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    drop(body);
    // Long enough for the upstream to have finished that response, had the connection lived.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    assert_eq!(
        up.connections(),
        2,
        "a connection whose response was cut off was reused"
    );
}

/// An HTTP/1.1 upstream that counts the connections it opened and the ones that have closed.
async fn counting_upstream() -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(text(200, "ok"))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (format!("http://{addr}"), opened, closed)
}

#[tokio::test]
async fn idle_connections_are_closed_after_pool_idle_timeout_without_traffic() {
    let (url, opened, closed) = counting_upstream().await;
    let gw = TestGateway::start(
        &one_worker(&format!(
            "[services.svc]\nendpoints = [\"{url}\"]\npool_idle_timeout = \"1s\"\n"
        )),
        &[("web.toml", ROUTES)],
    )
    .await;
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    // The worker's sweep (every 5 s) closes it once expired.
    eventually(15, "the idle connection is closed", || async {
        closed.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn a_service_changed_by_a_reload_closes_its_idle_connections() {
    let (url, opened, closed) = counting_upstream().await;
    let service = |extra: &str| format!("[services.svc]\nendpoints = [\"{url}\"]\n{extra}\n");
    let gw = TestGateway::start(&one_worker(&service("")), &[("web.toml", ROUTES)]).await;
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    std::fs::write(
        gw.dir.path().join("gateway.toml"),
        one_worker(&service("timeout = \"5s\"")),
    )
    .unwrap();
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The changed service has a new pool: a new connection.
    assert_eq!(get(&gw.url("/a")).await.text(), "ok");
    assert_eq!(opened.load(Ordering::SeqCst), 2);
    // The old pool's idle connection is closed by the next sweep, not kept for 90 s.
    eventually(
        15,
        "the old service's idle connection is closed",
        || async { closed.load(Ordering::SeqCst) == 1 },
    )
    .await;
}
