//! The inventory service of the gRPC tests: tonic's server with hand-written prost messages
//! (tags as in tests/fixtures/protos/shop/inventory.proto), served over h2c on 127.0.0.1:0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use prost_reflect::prost_types;
use tokio::sync::Semaphore;
use tokio_stream::Stream;
use tonic::{Code, Status};

// ---- the service's messages, by hand (tags as in inventory.proto) ----

#[derive(Clone, PartialEq, Message)]
pub(super) struct Item {
    #[prost(string, tag = "1")]
    pub(super) sku: String,
    #[prost(string, tag = "2")]
    pub(super) display_name: String,
    #[prost(int64, tag = "3")]
    pub(super) stock: i64,
    #[prost(int32, tag = "4")]
    pub(super) color: i32,
    #[prost(message, optional, tag = "5")]
    pub(super) updated: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "6")]
    pub(super) ttl: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "7")]
    pub(super) limit: Option<i32>,
    #[prost(message, optional, tag = "8")]
    pub(super) attrs: Option<prost_types::Struct>,
    #[prost(message, optional, tag = "9")]
    pub(super) extra: Option<prost_types::Any>,
    #[prost(string, repeated, tag = "10")]
    pub(super) tags: Vec<String>,
    #[prost(bool, tag = "11")]
    pub(super) active: bool,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct Note {
    #[prost(string, tag = "1")]
    pub(super) text: String,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct GetItemRequest {
    #[prost(string, tag = "1")]
    pub(super) sku: String,
    #[prost(bool, tag = "2")]
    pub(super) verbose: bool,
    #[prost(string, repeated, tag = "3")]
    pub(super) tags: Vec<String>,
    #[prost(int32, tag = "4")]
    pub(super) delay_ms: i32,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct CreateItemRequest {
    #[prost(string, tag = "1")]
    pub(super) shelf: String,
    #[prost(message, optional, tag = "2")]
    pub(super) item: Option<Item>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct ListItemsRequest {
    #[prost(int32, tag = "1")]
    pub(super) count: i32,
    #[prost(string, tag = "2")]
    pub(super) prefix: String,
    #[prost(int32, tag = "3")]
    pub(super) fail_after: i32,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub(super) code: i32,
    #[prost(string, tag = "2")]
    pub(super) message: String,
    #[prost(message, repeated, tag = "3")]
    pub(super) details: Vec<prost_types::Any>,
}

// ---- the service ----

/// What the service saw, for the assertions.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) grpc_timeouts: Vec<String>,
    pub(super) calls: usize,
    /// The headers of the last call.
    pub(super) headers: http::HeaderMap,
}

pub(super) struct Service {
    pub(super) addr: SocketAddr,
    pub(super) seen: Arc<Mutex<Seen>>,
    /// Each streamed item after the first waits for a permit: a test reads the first one while
    /// the rest is still to come.
    pub(super) gate: Arc<Semaphore>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) type GrpcResp = Response<tonic::body::Body>;
pub(super) type ItemStream = Pin<Box<dyn Stream<Item = Result<Item, Status>> + Send>>;
pub(super) type NoteStream = Pin<Box<dyn Stream<Item = Result<Note, Status>> + Send>>;

pub(super) fn item_for(r: &GetItemRequest, tenant: &str) -> Item {
    let mut attrs = prost_types::Struct::default();
    attrs.fields.insert(
        "tenant".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(tenant.into())),
        },
    );
    Item {
        sku: r.sku.clone(),
        display_name: format!("Item {}", r.sku),
        stock: 9_007_199_254_740_993,
        color: 2,
        updated: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ttl: Some(prost_types::Duration {
            seconds: 90,
            nanos: 0,
        }),
        limit: Some(5),
        attrs: Some(attrs),
        extra: None,
        tags: r.tags.clone(),
        active: r.verbose,
    }
}

pub(super) async fn dispatch(
    req: Request<Incoming>,
    seen: Arc<Mutex<Seen>>,
    gate: Arc<Semaphore>,
) -> GrpcResp {
    use tonic::server::Grpc;
    use tonic_prost::ProstCodec;
    {
        let mut s = seen.lock().unwrap();
        s.calls += 1;
        s.headers = req.headers().clone();
        if let Some(t) = req.headers().get("grpc-timeout") {
            s.grpc_timeouts.push(t.to_str().unwrap().to_owned());
        }
    }
    let tenant = req
        .headers()
        .get("x-tenant")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/shop.inventory.v1.Inventory/GetItem" => {
            let svc = tower::service_fn(move |r: tonic::Request<GetItemRequest>| {
                let tenant = tenant.clone();
                async move {
                    let r = r.into_inner();
                    if r.delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(r.delay_ms as u64)).await;
                    }
                    let mut resp = tonic::Response::new(item_for(&r, &tenant));
                    resp.metadata_mut()
                        .insert("x-served-by", "inventory".parse().unwrap());
                    resp.metadata_mut()
                        .insert("x-secret", "internal".parse().unwrap());
                    Ok::<_, Status>(resp)
                }
            });
            Grpc::new(ProstCodec::default()).unary(svc, req).await
        }
        "/shop.inventory.v1.Inventory/CreateItem" => {
            let svc = tower::service_fn(|r: tonic::Request<CreateItemRequest>| async move {
                let r = r.into_inner();
                let mut item = r.item.unwrap_or_default();
                item.sku = format!("{}/{}", r.shelf, item.sku);
                Ok::<_, Status>(tonic::Response::new(item))
            });
            Grpc::new(ProstCodec::default()).unary(svc, req).await
        }
        "/shop.inventory.v1.Inventory/PutItem" => {
            let svc = tower::service_fn(|r: tonic::Request<Item>| async move {
                Ok::<_, Status>(tonic::Response::new(r.into_inner()))
            });
            Grpc::new(ProstCodec::default()).unary(svc, req).await
        }
        "/shop.inventory.v1.Inventory/GetItemName" => {
            let svc = tower::service_fn(|r: tonic::Request<GetItemRequest>| async move {
                let sku = r.into_inner().sku;
                Ok::<_, Status>(tonic::Response::new(Item {
                    display_name: format!("Name of {sku}"),
                    sku,
                    ..Item::default()
                }))
            });
            Grpc::new(ProstCodec::default()).unary(svc, req).await
        }
        "/shop.inventory.v1.Inventory/Fail" => {
            let svc = tower::service_fn(|r: tonic::Request<GetItemRequest>| async move {
                let code: i32 = r.into_inner().sku.parse().unwrap();
                let detail = prost_types::Any {
                    type_url: "type.googleapis.com/shop.inventory.v1.Note".into(),
                    value: Note {
                        text: "see the shelf".into(),
                    }
                    .encode_to_vec(),
                };
                let status = RpcStatus {
                    code,
                    message: format!("failed with {code}"),
                    details: vec![detail],
                };
                Err::<tonic::Response<Item>, _>(Status::with_details(
                    Code::from(code),
                    format!("failed with {code}: ünïcode"),
                    Bytes::from(status.encode_to_vec()),
                ))
            });
            Grpc::new(ProstCodec::default()).unary(svc, req).await
        }
        "/shop.inventory.v1.Inventory/ListItems" => {
            let svc = tower::service_fn(move |r: tonic::Request<ListItemsRequest>| {
                let gate = gate.clone();
                async move {
                    let r = r.into_inner();
                    let s: ItemStream = Box::pin(async_stream(r, gate));
                    Ok::<_, Status>(tonic::Response::new(s))
                }
            });
            Grpc::new(ProstCodec::default())
                .server_streaming(svc, req)
                .await
        }
        "/shop.inventory.v1.Inventory/Chat" => {
            let svc = tower::service_fn(|r: tonic::Request<tonic::Streaming<Note>>| async move {
                let mut inbound = r.into_inner();
                let out = futures_util::stream::poll_fn(move |cx| {
                    Pin::new(&mut inbound).poll_next(cx).map(|n| {
                        n.map(|n| {
                            n.map(|n| Note {
                                text: n.text.to_uppercase(),
                            })
                        })
                    })
                });
                let s: NoteStream = Box::pin(out);
                Ok::<_, Status>(tonic::Response::new(s))
            });
            Grpc::new(ProstCodec::default()).streaming(svc, req).await
        }
        _ => Status::unimplemented("no such method").into_http(),
    }
}

/// `count` items; each after the first waits for a permit of `gate`; an UNAVAILABLE status
/// after `fail_after` items when it is set.
pub(super) fn async_stream(
    r: ListItemsRequest,
    gate: Arc<Semaphore>,
) -> impl Stream<Item = Result<Item, Status>> + Send {
    futures_util::stream::unfold(0, move |i| {
        let gate = gate.clone();
        let prefix = r.prefix.clone();
        let (count, fail_after) = (r.count, r.fail_after);
        async move {
            if fail_after > 0 && i == fail_after {
                return Some((Err(Status::unavailable("the shelf fell over")), count + 1));
            }
            if i >= count {
                return None;
            }
            if i > 0 {
                gate.acquire().await.unwrap().forget();
            }
            let item = Item {
                sku: format!("{prefix}{i}"),
                stock: i64::from(i),
                ..Item::default()
            };
            Some((Ok(item), i + 1))
        }
    })
}

pub(super) async fn service() -> Service {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let gate = Arc::new(Semaphore::new(0));
    let (s, g) = (seen.clone(), gate.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (s, g) = (s.clone(), g.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (s, g) = (s.clone(), g.clone());
                    async move { Ok::<_, Infallible>(dispatch(req, s, g).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Service {
        addr,
        seen,
        gate,
        task,
    }
}
