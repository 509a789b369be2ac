//! Inbound HTTP/2 (h2c and h2 over TLS), HTTP/2 to upstreams, TLS termination, WebSocket.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::*;

const ROUTES: &str = r#"
[frontend]
name = "web"
path_prefix = "/web"

[[route]]
name = "all"
path = "/{*rest}"
proxy = { service = "svc" }

[[route]]
name = "keep"
path = "/keep"
proxy = { service = "svc", preserve_host = true }

[[route]]
name = "h2"
path = "/h2/{*rest}"
proxy = { service = "svc2", path = "/{rest}" }
"#;

fn services(url: &str) -> String {
    format!("[services.svc]\nendpoints = [\"{url}\"]\n\n[services.svc2]\nendpoints = [\"{url}\"]\nprotocol = \"http2\"\n")
}

#[tokio::test]
async fn h2c_prior_knowledge_inbound_and_http2_upstream() {
    let up = echo_upstream().await;
    let gw = TestGateway::start(
        &gateway_toml("", &services(&up.url())),
        &[("web.toml", ROUTES)],
    )
    .await;
    let h2 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = h2
        .request(
            Request::get(gw.url("/web/x"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let r = read(resp).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["version"], "HTTP/1.1", "an http1 service gets HTTP/1.1");
    assert_eq!(v["headers"]["x-forwarded-host"], gw.addr.to_string());

    // preserve_host works for an HTTP/2 client, whose host is only in :authority.
    let resp = h2
        .request(
            Request::get(gw.url("/web/keep"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        read(resp).await.json()["headers"]["host"],
        gw.addr.to_string()
    );

    let v = get(&gw.url("/web/h2/y")).await.json();
    assert_eq!(
        v["version"], "HTTP/2.0",
        "protocol = \"http2\" speaks h2c to the service"
    );
    assert_eq!(v["path"], "/y");
}

#[tokio::test]
async fn websocket_upgrade_is_proxied() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let gw = TestGateway::start(
        &gateway_toml("", &services(&format!("http://{addr}"))),
        &[("web.toml", ROUTES)],
    )
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/web/socket", gw.addr))
        .await
        .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through", "the gateway"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

fn tls_material(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.der().clone()
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn tls_termination_with_http1_and_h2_via_alpn() {
    let up = echo_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = tls_material(dir.path());
    let server_extra = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        dir.path().join("tls.crt").display(),
        dir.path().join("tls.key").display()
    );
    let gw = TestGateway::start(
        &gateway_toml(&server_extra, &services(&up.url())),
        &[("web.toml", ROUTES)],
    )
    .await;

    // HTTP/1.1 over TLS.
    let tls = tls_connect(gw.addr, &ca, b"http/1.1").await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/web/tls")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = read(send.send_request(req).await.unwrap()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");

    // HTTP/2 negotiated through ALPN.
    let tls = tls_connect(gw.addr, &ca, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/web/tls2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let r = read(resp).await;
    assert_eq!(r.json()["path"], "/tls2");

    // New certificate files take effect on reload, for new connections.
    let new_ca = tls_material(dir.path());
    let r = crate::support::admin_reload(&gw).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let tls = tls_connect(gw.addr, &new_ca, b"http/1.1").await;
    let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(served, new_ca, "the reloaded certificate is served");

    // Plain HTTP on the TLS port does not get through.
    let plain = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client().get(gw.url("/web/x").parse().unwrap()),
    )
    .await;
    assert!(
        matches!(plain, Ok(Err(_))),
        "plain HTTP must fail on a TLS listener"
    );
}
