//! Bodies stream through in both directions, as they are produced, without being buffered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::{mpsc, Mutex};

use crate::support::*;

const ROUTES: &str = r#"
[frontend]
name = "web"
path_prefix = "/web"

[[route]]
name = "all"
path = "/{*rest}"
proxy = { service = "svc" }
"#;

fn svc(url: &str) -> String {
    format!("[services.svc]\nendpoints = [\"{url}\"]\n")
}

#[tokio::test]
async fn response_chunks_arrive_before_the_upstream_finishes() {
    // The upstream sends one chunk, then waits for the test to release the rest.
    let (release_tx, release_rx) = mpsc::channel::<()>(1);
    let release_rx = Arc::new(Mutex::new(release_rx));
    let up = Upstream::start(move |_req| {
        let release_rx = release_rx.clone();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                tx.send(Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))))
                    .await
                    .unwrap();
                release_rx.lock().await.recv().await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"data: second\n\n"))))
                    .await
                    .unwrap();
            });
            let body = StreamBody::new(tokio_stream(rx)).boxed();
            let mut r = http::Response::new(body);
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
    })
    .await;
    let gw = TestGateway::start(&gateway_toml("", &svc(&up.url())), &[("web.toml", ROUTES)]).await;
    let resp = open(&gw.url("/web/events")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event arrives while the upstream is still holding the second one back.
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    release_tx.send(()).await.unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"data: second\n\n");
}

/// A bulkhead slot (`max_concurrent_requests`) is held until the response body has ended, not
/// only until its head: it travels with the body to the access record.
#[tokio::test]
async fn a_bulkhead_slot_is_held_until_the_response_body_ends() {
    let (release_tx, release_rx) = mpsc::channel::<()>(1);
    let release_rx = Arc::new(Mutex::new(release_rx));
    let up = Upstream::start(move |req| {
        let release_rx = release_rx.clone();
        async move {
            if !req.uri().path().ends_with("/stream") {
                return text(200, "quick");
            }
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                release_rx.lock().await.recv().await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"-last")))).await;
            });
            http::Response::new(StreamBody::new(tokio_stream(rx)).boxed())
        }
    })
    .await;
    let gw = TestGateway::start(
        &gateway_toml(
            "",
            &format!("{}max_concurrent_requests = 1\n", svc(&up.url())),
        ),
        &[("web.toml", ROUTES)],
    )
    .await;
    let resp = open(&gw.url("/web/stream")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");
    // The head has arrived, the body has not ended: the one slot is still taken.
    let r = get(&gw.url("/web/quick")).await;
    assert_problem(&r, 503, "overloaded");
    release_tx.send(()).await.unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "-last");
    // Once the body has ended, the slot is free again.
    eventually(10, "the slot freed after the body ended", || async {
        get(&gw.url("/web/quick")).await.status == 200
    })
    .await;
}

fn tokio_stream<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

const MIB: u64 = 1024 * 1024;

/// 1 GiB up and 1 GiB down through a gateway process whose peak memory stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_and_download_do_not_grow_memory() {
    const TOTAL: u64 = 1024 * MIB;
    let chunk = Bytes::from(vec![7u8; MIB as usize]);
    let received = Arc::new(AtomicU64::new(0));
    let (chunk2, received2) = (chunk.clone(), received.clone());
    let up = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let (chunk, received) = (chunk2.clone(), received2.clone());
        async move {
            if req.method() == http::Method::POST {
                let mut body = req.into_body();
                while let Some(f) = body.frame().await {
                    if let Ok(d) = f.unwrap().into_data() {
                        received.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                text(200, received.load(Ordering::Relaxed).to_string())
            } else {
                let frames =
                    (0..TOTAL / MIB).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone())));
                http::Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            }
        }
    })
    .await;
    let cfg = format!(
        "{}\n[log]\nformat = \"json\"\naccess_log = false\n\n{}",
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_request_body = \"2GiB\"\nrequest_timeout = \"300s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        svc(&up.url())
    );
    let dir = write_config(&cfg, &[("web.toml", ROUTES)]);
    let gw = GatewayProcess::spawn(&dir.path().join("gateway.toml"));
    let baseline = gw.proc_status_kib("VmRSS");

    let frames = (0..TOTAL / MIB).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone())));
    let req = Request::post(gw.url("/web/upload"))
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let r = read(c.request(req).await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), TOTAL.to_string());

    let resp = open(&gw.url("/web/download")).await;
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, TOTAL);
    let peak = gw.proc_status_kib("VmHWM");
    eprintln!(
        "gateway RSS at start {} MiB, peak {} MiB",
        baseline / 1024,
        peak / 1024
    );
    assert!(
        peak < baseline + 64 * 1024,
        "peak RSS {peak} KiB vs start {baseline} KiB: bodies were buffered"
    );
}
