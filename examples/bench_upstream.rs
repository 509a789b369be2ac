//! The benchmark's upstream: a tiny, fast HTTP/1.1 server on one thread, the same for every
//! contender. `GET /json` answers ~200 bytes of JSON, `GET /1m` one MiB, `POST /post` reads the
//! body and answers its length. Usage: `bench_upstream 127.0.0.1:9000`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: it may stop on a broken setup

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const JSON: &[u8] = br#"{"id":"42","name":"Ada Lovelace","email":"ada@example.com","tier":"gold","orders":[{"id":"o-100","total":42.5},{"id":"o-101","total":9.99}],"updated_at":"2026-11-23T10:00:00Z","flags":["beta"]}"#;

async fn handle(req: Request<Incoming>, big: Bytes) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match req.uri().path() {
        "/1m" => big,
        "/post" => {
            let n = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            Bytes::from(format!("{{\"received\":{n}}}"))
        }
        _ => Bytes::from_static(JSON),
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

fn main() {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into())
        .parse()
        .expect("address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let big = big.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, big.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
