//! TLS to upstreams: a real https upstream that requires a client certificate (mutual TLS).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::support::*;

struct Pki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
}

/// Writes `NAME.crt` / `NAME.key` signed by a new CA written as `NAME-ca.crt`.
fn ca(dir: &std::path::Path, name: &str) -> (Issuer<'static, KeyPair>, CertificateDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    (Issuer::new(params, key), cert.der().clone())
}

fn leaf(
    dir: &std::path::Path,
    name: &str,
    san: &str,
    issuer: &Issuer<'static, KeyPair>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![san.to_string()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// An https upstream that demands a client certificate signed by `client_ca`.
async fn mtls_upstream(
    server: (CertificateDer<'static>, PrivateKeyDer<'static>),
    client_ca: CertificateDer<'static>,
    served: Arc<AtomicUsize>,
) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.0], server.1)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (acceptor, served) = (acceptor.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    served.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, std::convert::Infallible>(text(200, "secure")) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

const ROUTES: &str = CATCH_ALL_ROUTES;

async fn gateway(addr: std::net::SocketAddr, tls: &str) -> TestGateway {
    let cfg = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"https://127.0.0.1:{}\"]\ntls = {{ {tls} }}\n",
            addr.port()
        ),
    );
    TestGateway::start(&cfg, &[("web.toml", ROUTES)]).await
}

fn setup() -> (Pki, (CertificateDer<'static>, PrivateKeyDer<'static>)) {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, ca_der) = ca(dir.path(), "ca");
    let server = leaf(dir.path(), "server", "upstream.internal", &issuer);
    leaf(dir.path(), "client", "gatehouse", &issuer);
    let (other, _) = ca(dir.path(), "other-ca");
    leaf(dir.path(), "stranger", "gatehouse", &other);
    (Pki { dir, ca_der }, server)
}

#[tokio::test]
async fn mutual_tls_upstream_is_reached_with_the_right_certificates() {
    let (pki, server) = setup();
    let served = Arc::new(AtomicUsize::new(0));
    let addr = mtls_upstream(server, pki.ca_der.clone(), served.clone()).await;
    let d = pki.dir.path().display();
    // The endpoint is an IP address; the certificate names upstream.internal (SNI override).
    let gw = gateway(addr, &format!("ca = \"{d}/ca.crt\", cert = \"{d}/client.crt\", key = \"{d}/client.key\", server_name = \"upstream.internal\"")).await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "secure");
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_with_an_unknown_ca_is_refused_with_502() {
    let (pki, server) = setup();
    let served = Arc::new(AtomicUsize::new(0));
    let addr = mtls_upstream(server, pki.ca_der.clone(), served.clone()).await;
    let d = pki.dir.path().display();
    let gw = gateway(addr, &format!("ca = \"{d}/other-ca.crt\", cert = \"{d}/client.crt\", key = \"{d}/client.key\", server_name = \"upstream.internal\"")).await;
    assert_problem(&get(&gw.url("/x")).await, 502, "upstream_connect_failed");
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_certificate_the_upstream_does_not_trust_gets_no_answer() {
    let (pki, server) = setup();
    let served = Arc::new(AtomicUsize::new(0));
    let addr = mtls_upstream(server, pki.ca_der.clone(), served.clone()).await;
    let d = pki.dir.path().display();
    let gw = gateway(addr, &format!("ca = \"{d}/ca.crt\", cert = \"{d}/stranger.crt\", key = \"{d}/stranger.key\", server_name = \"upstream.internal\"")).await;
    let r = get(&gw.url("/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(served.load(Ordering::SeqCst), 0);
    // Without any client certificate, likewise.
    let gw = gateway(
        addr,
        &format!("ca = \"{d}/ca.crt\", server_name = \"upstream.internal\""),
    )
    .await;
    assert_eq!(get(&gw.url("/x")).await.status, 502);
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn insecure_skip_verify_is_an_explicit_test_only_override() {
    let (pki, server) = setup();
    let served = Arc::new(AtomicUsize::new(0));
    let addr = mtls_upstream(server, pki.ca_der.clone(), served.clone()).await;
    let d = pki.dir.path().display();
    let gw = gateway(
        addr,
        &format!(
            "insecure_skip_verify = true, cert = \"{d}/client.crt\", key = \"{d}/client.key\""
        ),
    )
    .await;
    assert_eq!(get(&gw.url("/x")).await.text(), "secure");
}
