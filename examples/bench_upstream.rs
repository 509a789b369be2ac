//! The benchmark's upstream: a tiny, fast HTTP/1.1 server on one thread, the same for every
//! contender. `GET /json` answers ~200 bytes of JSON, `GET /1m` one MiB, `POST /post` reads the
//! body and answers its length. On the next port (h2c) it serves the gRPC method
//! `bench.v1.Users/GetUser` (bench/protos/bench.proto): the same user as a protobuf message.
//! Usage: `bench_upstream 127.0.0.1:9000`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: it may stop on a broken setup

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const JSON: &[u8] = br#"{"id":"42","name":"Ada Lovelace","email":"ada@example.com","tier":"gold","orders":[{"id":"o-100","total":42.5},{"id":"o-101","total":9.99}],"updated_at":"2026-11-23T10:00:00Z","flags":["beta"]}"#;

#[derive(Clone, PartialEq, prost::Message)]
struct Order {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(double, tag = "2")]
    total: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct User {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "3")]
    email: String,
    #[prost(string, tag = "4")]
    tier: String,
    #[prost(message, repeated, tag = "5")]
    orders: Vec<Order>,
    #[prost(message, optional, tag = "6")]
    updated_at: Option<prost_reflect::prost_types::Timestamp>,
    #[prost(string, repeated, tag = "7")]
    flags: Vec<String>,
}

/// The framed `User` answer, made once.
fn user_frame() -> Bytes {
    use prost::Message;
    let user = User {
        id: "42".into(),
        name: "Ada Lovelace".into(),
        email: "ada@example.com".into(),
        tier: "gold".into(),
        orders: vec![
            Order {
                id: "o-100".into(),
                total: 42.5,
            },
            Order {
                id: "o-101".into(),
                total: 9.99,
            },
        ],
        updated_at: Some(prost_reflect::prost_types::Timestamp {
            seconds: 1_795_428_000,
            nanos: 0,
        }),
        flags: vec!["beta".into()],
    };
    let m = user.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
    out.extend_from_slice(&m);
    Bytes::from(out)
}

type GrpcBody = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, Infallible>>>,
>;

async fn grpc(req: Request<Incoming>, user: Bytes) -> Result<Response<GrpcBody>, Infallible> {
    let _ = req.into_body().collect().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(hyper::body::Frame::data(user)),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let mut r = Response::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(r)
}

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
        let grpc_addr = std::net::SocketAddr::new(addr.ip(), addr.port() + 1);
        let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
            .await
            .expect("bind");
        let user = user_frame();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = grpc_listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let user = user.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| grpc(req, user.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
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
