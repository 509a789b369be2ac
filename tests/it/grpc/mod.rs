//! gRPC translation against a real gRPC server (tonic, in the test; its messages written by
//! hand with prost, while the gateway reads tests/fixtures/protos/shop/inventory.proto):
//! REST → unary calls by every mapping (google.api.http bindings, a body field, `body: "*"`,
//! `response_body`, `additional_bindings`, parameters by name), the proto3 JSON mapping of
//! well-known types, server streaming as NDJSON and SSE read as it arrives, the status → HTTP
//! table, rich error details, bad requests, the deadline as `grpc-timeout`, gRPC-Web (binary
//! and text), native passthrough of a bidi stream, gRPC health checks, retries of idempotent
//! methods only, reloads, descriptor sets, and config errors located in the .proto.

mod service;

use std::convert::Infallible;
use std::path::PathBuf;

use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;

use crate::support::*;

use self::service::*;

fn protos_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/protos")
}

fn gateway_config(svc: &Service) -> String {
    let dir = protos_dir();
    gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\ninclude = [\"{}\"]\n\n[services.inventory]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n",
            dir.join("shop/inventory.proto").display(),
            dir.display(),
            svc.addr
        ),
    )
}

const ROUTES: &str = r#"
[frontend]
name = "shop"

[[route]]
name = "inventory"
path = "/v1/{*rest}"
grpc = { service = "inventory", method = "shop.inventory.v1.Inventory/*", request_headers = ["x-tenant", "x-trace-bin"], response_headers = ["x-served-by"] }

[[route]]
name = "by-name"
path = "/items/{sku}"
methods = ["GET"]
grpc = { service = "inventory", method = "shop.inventory.v1.Inventory/GetItem" }

[[route]]
name = "fail"
path = "/fail/{sku}"
grpc = { service = "inventory", method = "shop.inventory.v1.Inventory/Fail" }

[[route]]
name = "slow"
path = "/slow/{sku}"
timeout = "300ms"
grpc = { service = "inventory", method = "shop.inventory.v1.Inventory/GetItem" }

[[route]]
name = "lenient"
path = "/lenient/{sku}"
methods = ["PUT"]
grpc = { service = "inventory", method = "shop.inventory.v1.Inventory/PutItem", unknown_fields = "ignore", max_message_size = "1KiB" }

[[route]]
name = "put-by-name"
path = "/put/{sku}"
grpc = { service = "inventory", method = "shop.inventory.v1.Inventory/PutItem" }

[[route]]
name = "passthrough"
path = "/shop.inventory.v1.Inventory/{*method}"
grpc = { service = "inventory" }
"#;

async fn setup() -> (Service, TestGateway) {
    let svc = service().await;
    let gw = TestGateway::start(&gateway_config(&svc), &[("shop.toml", ROUTES)]).await;
    (svc, gw)
}

async fn call(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await
}

#[tokio::test]
async fn rest_calls_follow_the_http_rules_and_the_json_mapping() {
    let (svc, gw) = setup().await;
    // GET with a path variable, query parameters (a bool, a repeated field) and allow-listed
    // metadata both ways.
    let r = call(
        "GET",
        &gw.url("/v1/items/ab%20c?verbose=true&tags=x&tags=y"),
        &[
            ("x-tenant", "acme"),
            ("x-trace-bin", "AAEC"),
            ("x-not-listed", "stays"),
        ],
        "",
    )
    .await;
    {
        let seen = svc.seen.lock().unwrap();
        assert_eq!(seen.headers["x-tenant"], "acme");
        assert_eq!(
            seen.headers["x-trace-bin"], "AAEC",
            "valid binary metadata is sent"
        );
        assert!(
            seen.headers.get("x-not-listed").is_none(),
            "only allow-listed headers"
        );
        assert!(
            seen.headers.get("x-request-id").is_some(),
            "forwarding headers always"
        );
    }
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-served-by"), "inventory");
    assert_eq!(
        r.header("x-secret"),
        "",
        "metadata not allow-listed stays behind"
    );
    let v = r.json();
    assert_eq!(v["sku"], "ab c");
    assert_eq!(v["displayName"], "Item ab c");
    assert_eq!(v["stock"], "9007199254740993", "int64 as a string");
    assert_eq!(v["color"], "BLUE", "enums by name");
    assert_eq!(v["updated"], "2023-11-14T22:13:20Z");
    assert_eq!(v["ttl"], "90s");
    assert_eq!(v["limit"], 5, "a wrapper as its value");
    assert_eq!(v["attrs"], serde_json::json!({"tenant": "acme"}));
    assert_eq!(v["tags"], serde_json::json!(["x", "y"]));
    assert_eq!(v["active"], true);

    // additional_bindings, with a verb.
    let r = call("GET", &gw.url("/v1/skus/q9:lookup"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sku"], "q9");

    // body: "item", a path variable beside it; Timestamp, enum, int64 and Any (by the type
    // registry) read from JSON.
    let body = r#"{"sku":"k1","displayName":"Kettle","stock":"12","color":"RED",
        "updated":"2024-01-02T03:04:05.5Z","ttl":"1.5s","limit":7,
        "extra":{"@type":"type.googleapis.com/shop.inventory.v1.Note","text":"fragile"}}"#;
    let r = call("POST", &gw.url("/v1/shelves/s1/items"), &[], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["sku"], "s1/k1");
    assert_eq!(v["displayName"], "Kettle");
    assert_eq!(v["stock"], "12");
    assert_eq!(v["color"], "RED");
    assert_eq!(v["updated"], "2024-01-02T03:04:05.500Z");
    assert_eq!(v["ttl"], "1.500s");
    assert_eq!(v["limit"], 7);
    assert_eq!(
        v["extra"],
        serde_json::json!({"@type": "type.googleapis.com/shop.inventory.v1.Note", "text": "fragile"})
    );

    // body: "*" with the path variable filling its field.
    let r = call(
        "PUT",
        &gw.url("/v1/items/p1"),
        &[],
        r#"{"display_name":"Pan"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sku"], "p1");
    assert_eq!(
        r.json()["displayName"],
        "Pan",
        "proto field names are read too"
    );

    // response_body: one field of the answer.
    let r = call("GET", &gw.url("/v1/items/z/name"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), serde_json::json!("Name of z"));

    // A route whose path no rule matches: parameters and query by field name.
    let r = call("GET", &gw.url("/items/n1?verbose=true"), &[], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sku"], "n1");
    assert_eq!(r.json()["active"], true);

    // No binding of the service matches.
    let r = call("GET", &gw.url("/v1/nothing/here"), &[], "").await;
    assert_problem(&r, 404, "route_not_found");
    // A path some binding matches with another verb: 405 with the verbs that would do.
    let r = call("DELETE", &gw.url("/v1/items/abc"), &[], "").await;
    assert_problem(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), "GET, PUT");
    // A named method with rules is never reached by field name with a verb none of them has.
    let r = call("GET", &gw.url("/put/x1"), &[], "").await;
    assert_problem(&r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), "PUT");
    let r = call(
        "PUT",
        &gw.url("/put/x1"),
        &[],
        r#"{"displayName":"By name"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sku"], "x1");
}

#[tokio::test]
async fn bad_requests_are_400_naming_the_field() {
    let (svc, gw) = setup().await;
    let post = |body: &'static str| {
        let url = gw.url("/v1/shelves/s/items");
        async move { call("POST", &url, &[], body).await }
    };
    let r = post("{not json").await;
    assert_problem(&r, 400, "invalid_json");
    // The same on a `body: "*"` binding.
    let r = call("PUT", &gw.url("/v1/items/p1"), &[], "{oops").await;
    assert_problem(&r, 400, "invalid_json");
    // A field path deeper than any message should need.
    let deep = vec!["attrs"; 40].join(".");
    let r = call("GET", &gw.url(&format!("/v1/items/a?{deep}=1")), &[], "").await;
    assert_problem(&r, 400, "invalid_field");

    let r = post(r#"{"stock":"many"}"#).await;
    assert_problem(&r, 400, "invalid_field");
    assert_eq!(r.json()["field"], "item.stock", "{}", r.text());

    let r = post(r#"{"sku":"a","bogus":1}"#).await;
    assert_problem(&r, 400, "unknown_field");
    assert!(
        r.json()["detail"].as_str().unwrap().contains("bogus"),
        "{}",
        r.text()
    );

    let r = post(r#"{"color":"PURPLE"}"#).await;
    assert_problem(&r, 400, "invalid_field");
    assert_eq!(r.json()["field"], "item.color", "{}", r.text());

    let r = call("GET", &gw.url("/v1/items/a?nope=1"), &[], "").await;
    assert_problem(&r, 400, "unknown_field");
    assert_eq!(r.json()["field"], "nope");

    let r = call(
        "GET",
        &gw.url("/v1/items/a"),
        &[("x-trace-bin", "not base64!")],
        "",
    )
    .await;
    assert_problem(&r, 400, "invalid_header");
    assert_eq!(r.json()["header"], "x-trace-bin");

    let r = call("GET", &gw.url("/v1/items/a?verbose=maybe"), &[], "").await;
    assert_problem(&r, 400, "invalid_field");
    assert_eq!(r.json()["field"], "verbose");

    // The lenient route ignores unknown fields but limits the message's size.
    let r = call(
        "PUT",
        &gw.url("/lenient/l1"),
        &[],
        r#"{"bogus":1,"displayName":"ok"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["displayName"], "ok");
    let big = format!(r#"{{"displayName":"{}"}}"#, "x".repeat(2000));
    let r = call("PUT", &gw.url("/lenient/l1"), &[], &big).await;
    assert_problem(&r, 400, "message_too_large");

    // None of the refused requests reached the service (only the lenient one did).
    assert_eq!(svc.seen.lock().unwrap().calls, 1);
}

#[tokio::test]
async fn grpc_statuses_map_to_http_with_their_details() {
    let (_svc, gw) = setup().await;
    let table = [
        (1, 499),
        (2, 500),
        (3, 400),
        (4, 504),
        (5, 404),
        (6, 409),
        (7, 403),
        (8, 429),
        (9, 400),
        (10, 409),
        (11, 400),
        (12, 501),
        (13, 500),
        (14, 503),
        (15, 500),
        (16, 401),
    ];
    for (code, http) in table {
        let r = call("GET", &gw.url(&format!("/fail/{code}")), &[], "").await;
        assert_eq!(r.status.as_u16(), http, "gRPC code {code}: {}", r.text());
        assert_eq!(r.header("content-type"), "application/problem+json");
        assert_eq!(r.json()["grpc_status"], code);
    }
    let r = call("GET", &gw.url("/fail/5"), &[], "").await;
    assert_problem(&r, 404, "grpc_not_found");
    let v = r.json();
    assert_eq!(v["grpc_code"], "NOT_FOUND");
    assert_eq!(v["detail"], "failed with 5: ünïcode");
    assert_eq!(
        v["details"][0],
        serde_json::json!({"@type": "type.googleapis.com/shop.inventory.v1.Note", "text": "see the shelf"})
    );
}

/// Reads one chunk of a streamed body.
async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        match body.frame().await? {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    if !d.is_empty() {
                        return Some(d);
                    }
                }
            }
            Err(e) => panic!("body failed: {e}"),
        }
    }
}

#[tokio::test]
async fn server_streams_arrive_as_ndjson_and_sse_message_by_message() {
    let (svc, gw) = setup().await;
    let resp = open(&gw.url("/v1/items?count=3&prefix=s")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    // The first item arrives while the service still holds back the others.
    let first = next_chunk(&mut body).await.unwrap();
    assert_eq!(&first[..], b"{\"sku\":\"s0\"}\n");
    svc.gate.add_permits(2);
    let mut rest = Vec::new();
    while let Some(c) = next_chunk(&mut body).await {
        rest.extend_from_slice(&c);
    }
    assert_eq!(
        String::from_utf8(rest).unwrap(),
        "{\"sku\":\"s1\",\"stock\":\"1\"}\n{\"sku\":\"s2\",\"stock\":\"2\"}\n"
    );

    // SSE by Accept; a stream that fails ends with an error event.
    svc.gate.add_permits(5);
    let req = Request::get(gw.url("/v1/items?count=3&prefix=e&failAfter=2"))
        .header("accept", "text/event-stream")
        .body(Full::default())
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let text = r.text();
    assert!(
        text.starts_with("data: {\"sku\":\"e0\"}\n\ndata: {\"sku\":\"e1\",\"stock\":\"1\"}\n\n"),
        "{text}"
    );
    assert!(text.ends_with("event: error\ndata: {\"error\":{\"code\":14,\"message\":\"the shelf fell over\",\"status\":\"UNAVAILABLE\"}}\n\n"), "{text}");
}

#[tokio::test]
async fn the_route_deadline_is_sent_as_grpc_timeout_and_enforced() {
    let (svc, gw) = setup().await;
    let r = call("GET", &gw.url("/slow/s?delayMs=5000"), &[], "").await;
    assert_problem(&r, 504, "upstream_timeout");
    let t = svc.seen.lock().unwrap().grpc_timeouts.clone();
    assert_eq!(t.len(), 1, "{t:?}");
    let ms: u64 = t[0].strip_suffix('m').unwrap().parse().unwrap();
    assert!(ms > 0 && ms <= 300, "{t:?}");
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The frames of a gRPC-Web body: messages, then the trailer block.
fn web_frames(mut b: Bytes) -> (Vec<Bytes>, String) {
    let mut msgs = Vec::new();
    let mut trailers = String::new();
    while b.len() >= 5 {
        let flag = b.get_u8();
        let len = b.get_u32() as usize;
        let data = b.split_to(len);
        if flag & 0x80 != 0 {
            trailers = String::from_utf8(data.to_vec()).unwrap();
        } else {
            msgs.push(data);
        }
    }
    assert!(b.is_empty());
    (msgs, trailers)
}

#[tokio::test]
async fn grpc_web_binary_and_text_reach_the_grpc_service() {
    let (_svc, gw) = setup().await;
    let msg = GetItemRequest {
        sku: "w1".into(),
        ..GetItemRequest::default()
    }
    .encode_to_vec();
    let req = Request::post(gw.url("/shop.inventory.v1.Inventory/GetItem"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(frame(&msg)))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "application/grpc-web+proto");
    let (msgs, trailers) = web_frames(r.body.clone());
    assert_eq!(msgs.len(), 1);
    assert_eq!(Item::decode(msgs[0].clone()).unwrap().sku, "w1");
    assert!(trailers.contains("grpc-status:0\r\n"), "{trailers:?}");

    // Text: base64 both ways; a failing call's status in the trailer frame.
    let b64 = base64::engine::general_purpose::STANDARD;
    let fail = GetItemRequest {
        sku: "7".into(),
        ..GetItemRequest::default()
    }
    .encode_to_vec();
    let req = Request::post(gw.url("/shop.inventory.v1.Inventory/Fail"))
        .header("content-type", "application/grpc-web-text")
        .body(Full::new(Bytes::from(b64.encode(frame(&fail)))))
        .unwrap();
    let r = send(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), "application/grpc-web-text+proto");
    let raw = b64.decode(r.body.as_ref()).map(Bytes::from);
    // A trailers-only answer has its status in the headers.
    if r.header("grpc-status").is_empty() {
        let (_, trailers) = web_frames(raw.unwrap());
        assert!(trailers.contains("grpc-status:7\r\n"), "{trailers:?}");
    } else {
        assert_eq!(r.header("grpc-status"), "7");
    }

    let req = Request::post(gw.url("/shop.inventory.v1.Inventory/GetItem"))
        .header("content-type", "application/grpc-web-text")
        .body(Full::new(Bytes::from(b64.encode(frame(&msg)))))
        .unwrap();
    let r = send(req).await;
    let (msgs, trailers) = web_frames(Bytes::from(b64.decode(r.body.as_ref()).unwrap()));
    assert_eq!(Item::decode(msgs[0].clone()).unwrap().sku, "w1");
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");

    // A plain HTTP request on a passthrough route is refused.
    let r = call(
        "POST",
        &gw.url("/shop.inventory.v1.Inventory/GetItem"),
        &[],
        "{}",
    )
    .await;
    assert_problem(&r, 415, "not_grpc");
}

#[tokio::test]
async fn native_grpc_bidi_streams_pass_through_with_trailers() {
    let (_svc, gw) = setup().await;
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, StreamBody<_>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let req = Request::post(format!(
        "http://{}/shop.inventory.v1.Inventory/Chat",
        gw.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(body)
    .unwrap();
    let note = |t: &str| frame(&Note { text: t.into() }.encode_to_vec());
    tx.send(Ok(Frame::data(note("one")))).await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let read_note = async |body: &mut Incoming| {
        let mut buf = BytesMut::new();
        loop {
            if buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() >= 5 + len {
                    return Note::decode(&buf[5..5 + len]).unwrap().text;
                }
            }
            let f = body.frame().await.unwrap().unwrap();
            buf.extend_from_slice(&f.into_data().unwrap());
        }
    };
    // Each answer arrives before the next note is sent: streaming both ways.
    assert_eq!(read_note(&mut body).await, "ONE");
    tx.send(Ok(Frame::data(note("two")))).await.unwrap();
    assert_eq!(read_note(&mut body).await, "TWO");
    drop(tx);
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        if let Ok(t) = f.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
}

#[test]
fn proto_and_route_mistakes_are_located() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.proto");
    std::fs::write(
        &bad,
        "syntax = \"proto3\";\npackage bad;\n\nmessage A {\n  strin x = 1;\n}\n",
    )
    .unwrap();
    let gw = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\n\n[services.s]\nendpoints = [\"http://127.0.0.1:1\"]\n",
            bad.display()
        ),
    );
    let e = compile_errors(&gw, "r.toml", "[frontend]\nname = \"f\"\n");
    assert!(e.starts_with(&format!("{}:5:", bad.display())), "{e}");

    let missing = tmp.path().join("imp.proto");
    std::fs::write(
        &missing,
        "syntax = \"proto3\";\npackage imp;\nimport \"nowhere/gone.proto\";\n",
    )
    .unwrap();
    let gw = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\n\n[services.s]\nendpoints = [\"http://127.0.0.1:1\"]\n",
            missing.display()
        ),
    );
    let e = compile_errors(&gw, "r.toml", "[frontend]\nname = \"f\"\n");
    assert!(e.starts_with(&format!("{}:3:", missing.display())), "{e}");
    assert!(e.contains("nowhere/gone.proto"), "{e}");

    // `[protos]` keys, each at its place in gateway.toml.
    for (protos, says) in [
        (
            "[protos]\nfiles = []\n",
            "[protos] lists no `files` and no `descriptor_sets`",
        ),
        (
            "[protos]\nfiles = [\"nowhere.proto\"]\n",
            "nowhere.proto` cannot be read",
        ),
        (
            "[protos]\nfiles = [\"x.proto\"]\ninclude = [\"no-such-dir\"]\n",
            "[protos] include",
        ),
    ] {
        let e = compile_errors(
            &gateway_toml("", protos),
            "r.toml",
            "[frontend]\nname = \"f\"\n",
        );
        assert!(
            e.contains("gateway.toml:") && e.contains(says),
            "{says}: {e}"
        );
    }
    let svc = "[services.inventory]\nendpoints = [\"http://127.0.0.1:1\"]\nprotocol = \"http2\"\n";
    let dir = protos_dir();
    let good = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\ninclude = [\"{}\"]\n\n{svc}",
            dir.join("shop/inventory.proto").display(),
            dir.display()
        ),
    );
    let route = |grpc: &str| {
        format!(
            "[frontend]\nname = \"f\"\n\n[[route]]\nname = \"r\"\npath = \"/x\"\ngrpc = {grpc}\n"
        )
    };
    let e = compile_errors(
        &good,
        "r.toml",
        &route(r#"{ service = "inventory", method = "shop.inventory.v1.Inventory/Nope" }"#),
    );
    assert!(
        e.contains("r.toml:7:") && e.contains("has no method `Nope`"),
        "{e}"
    );
    let e = compile_errors(
        &good,
        "r.toml",
        &route(r#"{ service = "inventory", method = "shop.Nope/Get" }"#),
    );
    assert!(e.contains("unknown gRPC service `shop.Nope`"), "{e}");
    let e = compile_errors(
        &good,
        "r.toml",
        &route(r#"{ service = "inventory", method = "shop.inventory.v1.Inventory/Chat" }"#),
    );
    assert!(e.contains("client stream"), "{e}");
    let e = compile_errors(
        &good,
        "r.toml",
        &route(r#"{ service = "inventory", method = "x", unknown_fields = "maybe" }"#),
    );
    assert!(e.contains("r.toml:7:"), "{e}");
    let no_protos = gateway_toml("", svc);
    let e = compile_errors(
        &no_protos,
        "r.toml",
        &route(r#"{ service = "inventory", method = "a.B/C" }"#),
    );
    assert!(
        e.contains("needs the service's .proto files in [protos]"),
        "{e}"
    );
}

#[tokio::test]
async fn health_checks_can_ask_grpc_health() {
    use tonic_health::ServingStatus;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.inventory.v1.Inventory", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper_util::service::TowerToHyperService::new(health.clone());
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let cfg = gateway_toml(
        "",
        &format!(
            "[services.inventory]\nendpoints = [\"http://{addr}\"]\nprotocol = \"http2\"\n[services.inventory.health_check]\ngrpc = \"shop.inventory.v1.Inventory\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nhealthy_threshold = 1\nunhealthy_threshold = 1\n"
        ),
    );
    let gw = TestGateway::start(&cfg, &[("shop.toml", "[frontend]\nname = \"shop\"\n")]).await;
    let healthy = || async {
        get(&gw.admin_url("/admin/services")).await.json()["services"][0]["endpoints"][0]["healthy"]
            .clone()
    };
    // NOT_SERVING marks the endpoint unhealthy, SERVING healthy again.
    reporter
        .set_service_status("shop.inventory.v1.Inventory", ServingStatus::NotServing)
        .await;
    eventually(10, "endpoint marked unhealthy", || async {
        healthy().await == false
    })
    .await;
    reporter
        .set_service_status("shop.inventory.v1.Inventory", ServingStatus::Serving)
        .await;
    eventually(10, "endpoint healthy again", || async {
        healthy().await == true
    })
    .await;
    server.abort();
}

#[tokio::test]
async fn only_methods_marked_idempotent_are_retried() {
    let svc = service().await;
    let dead = closed_port().await;
    let dir = protos_dir();
    let cfg = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\ninclude = [\"{}\"]\n\n[services.inventory]\nendpoints = [\"http://{dead}\", \"http://{}\"]\nprotocol = \"http2\"\n[services.inventory.retry]\nattempts = 2\nbackoff = \"1ms\"\nmax_backoff = \"1ms\"\nmin_retries_per_second = 100\n",
            dir.join("shop/inventory.proto").display(),
            dir.display(),
            svc.addr
        ),
    );
    let gw = TestGateway::start(&cfg, &[("shop.toml", ROUTES)]).await;
    // GetItem is NO_SIDE_EFFECTS: a connect failure is retried on the other endpoint.
    for i in 0..6 {
        let r = call("GET", &gw.url(&format!("/v1/items/i{i}")), &[], "").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // CreateItem is not marked: half of the calls meet the dead endpoint and are not retried.
    let mut failed = 0;
    for _ in 0..6 {
        let r = call("POST", &gw.url("/v1/shelves/s/items"), &[], "{}").await;
        if r.status != 200 {
            assert_problem(&r, 502, "upstream_connect_failed");
            failed += 1;
        }
    }
    assert!(failed > 0, "a POST was retried");
}

#[tokio::test]
async fn protos_reload_with_the_config_and_a_broken_one_keeps_the_old() {
    let svc = service().await;
    let tmp = tempfile::tempdir().unwrap();
    let proto = tmp.path().join("shop/inventory.proto");
    std::fs::create_dir_all(proto.parent().unwrap()).unwrap();
    let text = std::fs::read_to_string(protos_dir().join("shop/inventory.proto")).unwrap();
    std::fs::write(&proto, &text).unwrap();
    let cfg = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\ninclude = [\"{}\"]\n\n[services.inventory]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n",
            proto.display(),
            tmp.path().display(),
            svc.addr
        ),
    );
    let gw = TestGateway::start(&cfg, &[("shop.toml", ROUTES)]).await;
    assert_eq!(get(&gw.url("/v1/items/a/name")).await.status, 200);
    // An edit of the .proto is picked up by the file watch.
    std::fs::write(&proto, text.replace("{sku}/name", "{sku}/title")).unwrap();
    eventually(10, "the new rule serves", || async {
        get(&gw.url("/v1/items/a/title")).await.status == 200
    })
    .await;
    assert_eq!(get(&gw.url("/v1/items/a/name")).await.status, 404);
    // A broken .proto is refused; the running config keeps serving.
    std::fs::write(&proto, "syntax = \"proto3\";\nmessage {").unwrap();
    let r = admin_reload(&gw).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("inventory.proto:2:"), "{}", r.text());
    assert_eq!(get(&gw.url("/v1/items/a/title")).await.status, 200);
}

#[tokio::test]
async fn descriptor_sets_work_like_proto_files() {
    let svc = service().await;
    let tmp = tempfile::tempdir().unwrap();
    // A descriptor set as `protoc --include_imports --descriptor_set_out` writes it.
    // googleapis' files as the gateway has them built in.
    let google = tmp.path().join("google/api");
    std::fs::create_dir_all(&google).unwrap();
    let builtin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/backend/grpc/google");
    for f in ["http.proto", "annotations.proto"] {
        std::fs::copy(builtin.join(f), google.join(f)).unwrap();
    }
    let mut compiler = protox::Compiler::new([protos_dir(), tmp.path().to_path_buf()]).unwrap();
    compiler.include_imports(true);
    compiler.open_file("shop/inventory.proto").unwrap();
    let set = tmp.path().join("all.binpb");
    std::fs::write(&set, compiler.encode_file_descriptor_set()).unwrap();
    let cfg = gateway_toml(
        "",
        &format!(
            "[protos]\ndescriptor_sets = [\"{}\"]\n\n[services.inventory]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n",
            set.display(),
            svc.addr
        ),
    );
    let gw = TestGateway::start(&cfg, &[("shop.toml", ROUTES)]).await;
    let r = get(&gw.url("/v1/skus/d1:lookup")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sku"], "d1");
    assert_eq!(r.json()["color"], "BLUE");
    // A file that is not a descriptor set is a located config error.
    std::fs::write(&set, b"\xff\xff not protobuf").unwrap();
    let e = compile_errors(&cfg, "shop.toml", ROUTES);
    assert!(
        e.contains("descriptor set") && e.contains("gateway.toml:"),
        "{e}"
    );
}

/// A "gRPC service" that answers wrongly: `/x.S/Empty` OK with no message, `/x.S/Cut` a frame
/// cut short, `/x.S/Two` two messages to a unary call.
async fn broken_service() -> Upstream {
    Upstream::start(|req: Request<Incoming>| async move {
        let path = req.uri().path().to_owned();
        let _ = req.into_body().collect().await;
        let msg = frame(&Note { text: "x".into() }.encode_to_vec());
        let data: Vec<Bytes> = match path.as_str() {
            "/x.S/Empty" => vec![],
            "/x.S/Cut" => vec![msg.slice(..msg.len() - 1)],
            _ => vec![msg.clone(), msg],
        };
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = data
            .into_iter()
            .map(|d| Ok(Frame::data(d)))
            .chain([Ok(Frame::trailers(trailers))])
            .collect();
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    })
    .await
}

#[tokio::test]
async fn a_unary_answer_must_be_exactly_one_whole_message() {
    let up = broken_service().await;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("x.proto"),
        "syntax = \"proto3\";\npackage x;\nmessage N { string text = 1; }\nservice S {\n  rpc Empty(N) returns (N);\n  rpc Cut(N) returns (N);\n  rpc Two(N) returns (N);\n}\n",
    )
    .unwrap();
    let cfg = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\n\n[services.x]\nendpoints = [\"{}\"]\nprotocol = \"http2\"\n",
            tmp.path().join("x.proto").display(),
            up.url()
        ),
    );
    let routes = "[frontend]\nname = \"x\"\n\n[[route]]\nname = \"empty\"\npath = \"/empty\"\ngrpc = { service = \"x\", method = \"x.S/Empty\" }\n\n[[route]]\nname = \"cut\"\npath = \"/cut\"\ngrpc = { service = \"x\", method = \"x.S/Cut\" }\n\n[[route]]\nname = \"two\"\npath = \"/two\"\ngrpc = { service = \"x\", method = \"x.S/Two\" }\n";
    let gw = TestGateway::start(&cfg, &[("x.toml", routes)]).await;
    for path in ["/empty", "/cut", "/two"] {
        let r = call("POST", &gw.url(path), &[], "{}").await;
        assert_problem(&r, 502, "grpc_bad_response");
    }
}

#[tokio::test]
async fn grpc_errors_count_for_the_circuit_breaker() {
    let svc = service().await;
    let dir = protos_dir();
    let cfg = gateway_toml(
        "",
        &format!(
            "[protos]\nfiles = [\"{}\"]\ninclude = [\"{}\"]\n\n[services.inventory]\nendpoints = [\"http://{}\"]\nprotocol = \"http2\"\n[services.inventory.circuit_breaker]\nconsecutive_failures = 2\nopen_for = \"1h\"\nmax_open_for = \"1h\"\n",
            dir.join("shop/inventory.proto").display(),
            dir.display(),
            svc.addr
        ),
    );
    let gw = TestGateway::start(&cfg, &[("shop.toml", ROUTES)]).await;
    // NOT_FOUND is the caller's: it never opens the circuit.
    for _ in 0..3 {
        assert_problem(
            &call("GET", &gw.url("/fail/5"), &[], "").await,
            404,
            "grpc_not_found",
        );
    }
    // UNAVAILABLE (a trailers-only answer over HTTP 200) counts as the service failing.
    for _ in 0..2 {
        assert_problem(
            &call("GET", &gw.url("/fail/14"), &[], "").await,
            503,
            "grpc_unavailable",
        );
    }
    assert_problem(
        &call("GET", &gw.url("/fail/5"), &[], "").await,
        503,
        "circuit_open",
    );
}

#[test]
fn grpc_routes_need_http2_services_and_parameters_that_name_fields() {
    let dir = protos_dir();
    let protos = format!(
        "[protos]\nfiles = [\"{}\"]\ninclude = [\"{}\"]\n\n",
        dir.join("shop/inventory.proto").display(),
        dir.display()
    );
    let h1 = gateway_toml(
        "",
        &format!("{protos}[services.inventory]\nendpoints = [\"http://127.0.0.1:1\"]\n[services.inventory.health_check]\ngrpc = \"\"\n"),
    );
    let route = "[frontend]\nname = \"f\"\n\n[[route]]\nname = \"r\"\npath = \"/x/{sku}\"\ngrpc = { service = \"inventory\", method = \"shop.inventory.v1.Inventory/GetItem\" }\n";
    let e = compile_errors(&h1, "r.toml", "[frontend]\nname = \"f\"\n");
    assert!(
        e.contains("health_check: `grpc` checks need the service's protocol = \"http2\""),
        "{e}"
    );
    let h1 = h1.replace("[services.inventory.health_check]\ngrpc = \"\"\n", "");
    let e = compile_errors(&h1, "r.toml", route);
    assert!(
        e.contains("r.toml:7:") && e.contains("must have protocol = \"http2\""),
        "{e}"
    );
    let h2 = gateway_toml(
        "",
        &format!("{protos}[services.inventory]\nendpoints = [\"http://127.0.0.1:1\"]\nprotocol = \"http2\"\n"),
    );
    let e = compile_errors(&h2, "r.toml", &route.replace("{sku}", "{id}"));
    assert!(
        e.contains("path parameter `id` names no field of shop.inventory.v1.GetItemRequest"),
        "{e}"
    );
}
