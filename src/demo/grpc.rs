//! The demo's gRPC stock service (protos/shop/stock.proto), served over h2c with hyper: just
//! enough gRPC to show the gateway's REST → gRPC translation without anything beyond the
//! binary. Its messages are prost structs with the .proto's field numbers.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct GetStockRequest {
    #[prost(string, tag = "1")]
    sku: String,
}

#[derive(Clone, PartialEq, Message)]
struct WatchStockRequest {
    #[prost(string, tag = "1")]
    sku: String,
    #[prost(int32, tag = "2")]
    updates: i32,
}

#[derive(Clone, PartialEq, Message)]
struct StockLevel {
    #[prost(string, tag = "1")]
    sku: String,
    #[prost(int32, tag = "2")]
    available: i32,
    #[prost(string, tag = "3")]
    warehouse: String,
    #[prost(message, optional, tag = "4")]
    checked_at: Option<prost_reflect::prost_types::Timestamp>,
}

type Body = BoxBody<Bytes, Infallible>;

fn framed(msg: &impl Message) -> Bytes {
    crate::backend::grpc::frame_message(&msg.encode_to_vec())
}

fn status(code: u32, message: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    h
}

fn level(sku: &str, n: i32) -> Option<StockLevel> {
    let base = match sku {
        "tea-01" => 120,
        "cup-02" => 8,
        _ => return None,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Some(StockLevel {
        sku: sku.to_owned(),
        available: base - n,
        warehouse: "north".into(),
        checked_at: Some(prost_reflect::prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(0),
            nanos: 0,
        }),
    })
}

fn grpc_response(frames: Vec<Frame<Bytes>>) -> Response<Body> {
    let stream = futures_util::stream::iter(frames.into_iter().map(Ok));
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}

async fn handle(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let msg = body.get(5..).unwrap_or_default();
    match path.as_str() {
        "/shop.stock.v1.Stock/GetStock" => {
            let r = GetStockRequest::decode(msg).unwrap_or_default();
            match level(&r.sku, 0) {
                Some(l) => grpc_response(vec![
                    Frame::data(framed(&l)),
                    Frame::trailers(status(0, "")),
                ]),
                None => grpc_response(vec![Frame::trailers(status(5, "no such sku"))]),
            }
        }
        "/shop.stock.v1.Stock/WatchStock" => {
            let r = WatchStockRequest::decode(msg).unwrap_or_default();
            if level(&r.sku, 0).is_none() {
                return grpc_response(vec![Frame::trailers(status(5, "no such sku"))]);
            }
            let updates = if r.updates <= 0 { 3 } else { r.updates.min(10) };
            // One update every 500 ms, to show the messages streamed as they come.
            let stream = futures_util::stream::unfold(0, move |n| {
                let sku = r.sku.clone();
                async move {
                    if n > updates {
                        return None;
                    }
                    if n == updates {
                        return Some((Ok(Frame::trailers(status(0, ""))), n + 1));
                    }
                    if n > 0 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let l = level(&sku, n)?;
                    Some((Ok(Frame::data(framed(&l))), n + 1))
                }
            });
            let mut resp = Response::new(StreamBody::new(stream).boxed());
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            resp
        }
        _ => grpc_response(vec![Frame::trailers(status(12, "no such method"))]),
    }
}

/// Serves the stock service on `listener` (h2c).
pub(super) fn serve(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async {
                    Ok::<_, Infallible>(handle(req).await)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
