//! Authentication at the edge, against real sockets: tokens minted here (RS256 from a fixture
//! key, ES256 and EdDSA from keys generated per test, HS256), a JWKS server on loopback that
//! rotates its keys, an external auth service, and the attack cases of the issue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::support::*;

const RSA_PEM: &str = include_str!("../fixtures/jwt-rsa.pem");
const RSA_PUB_PEM: &str = include_str!("../fixtures/jwt-rsa.pub.pem");
const RSA_MODULUS_HEX: &str = include_str!("../fixtures/jwt-rsa.modulus.hex");

/// An API key's hash as the config holds it.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({
        "iss": "https://id.test/",
        "aud": "shop-api",
        "sub": "user-7",
        "scope": "orders:read profile",
        "exp": now() + 600,
        "iat": now(),
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// A signing key and its public JWK.
struct Signer {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn rsa(kid: &str) -> Signer {
        let n: Vec<u8> = (0..RSA_MODULUS_HEX.trim().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&RSA_MODULUS_HEX.trim()[i..i + 2], 16).unwrap())
            .collect();
        Signer {
            alg: Algorithm::RS256,
            kid: kid.into(),
            key: EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap(),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": B64.encode(n), "e": "AQAB"}),
        }
    }

    fn ec(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = kp.public_key_raw();
        Signer {
            alg: Algorithm::ES256,
            kid: kid.into(),
            key: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65])}),
        }
    }

    fn ed(kid: &str) -> Signer {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        Signer {
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            key: EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "OKP", "kid": kid, "crv": "Ed25519", "x": B64.encode(kp.public_key_raw())}),
        }
    }

    fn token(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        encode(&h, claims, &self.key).unwrap()
    }
}

/// A JWKS server whose key list the test changes; counts its requests.
struct JwksServer {
    up: Upstream,
    keys: Arc<Mutex<Vec<Value>>>,
    hits: Arc<AtomicUsize>,
}

async fn jwks_server(keys: Vec<Value>) -> JwksServer {
    let keys = Arc::new(Mutex::new(keys));
    let hits = Arc::new(AtomicUsize::new(0));
    let (k, h) = (keys.clone(), hits.clone());
    let up = Upstream::start(move |_req| {
        let body = json!({ "keys": *k.lock().unwrap() }).to_string();
        h.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut r = text(200, body);
            r.headers_mut()
                .insert("cache-control", "max-age=3600".parse().unwrap());
            r
        }
    })
    .await;
    JwksServer { up, keys, hits }
}

fn routes() -> String {
    r#"
[frontend]
name = "web"
auth = "main"

[[route]]
name = "orders"
path = "/orders"
require = { scopes = ["orders:read"] }
proxy = { service = "svc" }

[[route]]
name = "admin"
path = "/admin"
require = { scopes = ["admin"] }
proxy = { service = "svc" }

[[route]]
name = "public"
path = "/public"
auth = "none"
proxy = { service = "svc" }

[[route]]
name = "all"
path = "/{*rest}"
proxy = { service = "svc" }
"#
    .to_owned()
}

async fn gateway(up: &Upstream, jwt: &str) -> TestGateway {
    // Head limits above the token limit, so an oversized token meets the JWT check (401), not
    // the header limit (431).
    let gw = gateway_toml(
        "max_header_size = \"32KiB\"\nmax_request_head = \"64KiB\"",
        &format!(
            r#"[services.svc]
endpoints = ["{}"]

[auth.jwt.main]
issuer = "https://id.test/"
audiences = ["shop-api"]
forward_claims = {{ sub = "x-user-id", scope = "x-user-scopes" }}
{jwt}
"#,
            up.url()
        ),
    );
    TestGateway::start(&gw, &[("web.toml", &routes())]).await
}

async fn call(gw: &TestGateway, path: &str, token: Option<&str>, extra: &[(&str, &str)]) -> Resp {
    let mut req = Request::get(gw.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    send(req.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test]
async fn jwks_rotation_unknown_kid_refetch_and_removed_keys() {
    let up = echo_upstream().await;
    let (a, b, c) = (Signer::rsa("a"), Signer::ec("b"), Signer::ed("c"));
    let jwks = jwks_server(vec![a.jwk.clone()]).await;
    let gw = gateway(
        &up,
        &format!(
            "algorithms = [\"RS256\", \"ES256\", \"EdDSA\"]\njwks_url = \"{}/jwks.json\"\njwks_refetch_cooldown = \"500ms\"",
            jwks.up.url()
        ),
    )
    .await;
    let ta = a.token(&claims(json!({})));
    let r = call(&gw, "/orders", Some(&ta), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-user-id"], "user-7");
    assert_eq!(r.json()["headers"]["x-user-scopes"], "orders:read profile");

    // A new key: its token is accepted after the unknown-kid refetch.
    jwks.keys.lock().unwrap().push(b.jwk.clone());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let tb = b.token(&claims(json!({})));
    let r = call(&gw, "/orders", Some(&tb), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // A flood of random kids: at most one fetch per cooldown.
    let before = jwks.hits.load(Ordering::SeqCst);
    for i in 0..30 {
        let t = Signer {
            kid: format!("random-{i}"),
            ..Signer::ec("x")
        }
        .token(&claims(json!({})));
        let r = call(&gw, "/orders", Some(&t), &[]).await;
        assert_problem(&r, 401, "invalid_token");
    }
    let fetched = jwks.hits.load(Ordering::SeqCst) - before;
    assert!(fetched <= 2, "{fetched} fetches for 30 unknown kids");
    // A kid that looks like a path is only a lookup key: signed by key a, named otherwise.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("../../a".into());
    let t = encode(&h, &claims(json!({})), &a.key).unwrap();
    assert_problem(
        &call(&gw, "/orders", Some(&t), &[]).await,
        401,
        "invalid_token",
    );

    // Key a removed (and EdDSA key c added): learned at the next refetch; a's tokens, cached or
    // not, are then rejected.
    *jwks.keys.lock().unwrap() = vec![b.jwk.clone(), c.jwk.clone()];
    tokio::time::sleep(Duration::from_millis(600)).await;
    let tc = c.token(&claims(json!({})));
    assert_eq!(call(&gw, "/orders", Some(&tc), &[]).await.status, 200);
    let r = call(&gw, "/orders", Some(&ta), &[]).await;
    assert_problem(&r, 401, "invalid_token");
    assert_eq!(
        r.header("www-authenticate"),
        "Bearer error=\"invalid_token\""
    );

    // The JWKS goes down: the cached keys keep working.
    jwks.up.kill();
    assert_eq!(call(&gw, "/orders", Some(&tb), &[]).await.status, 200);
    let fresh = b.token(&claims(json!({"jti": "other"})));
    assert_eq!(call(&gw, "/orders", Some(&fresh), &[]).await.status, 200);
}

#[tokio::test]
async fn jwks_down_from_the_start_is_503_not_401() {
    let up = echo_upstream().await;
    let dead = closed_port().await;
    let gw = gateway(
        &up,
        &format!("algorithms = [\"RS256\"]\njwks_url = \"http://{dead}/jwks.json\"\njwks_timeout = \"1s\""),
    )
    .await;
    let t = Signer::rsa("a").token(&claims(json!({})));
    let r = call(&gw, "/orders", Some(&t), &[]).await;
    assert_problem(&r, 503, "auth_unavailable");
    assert_eq!(up.requests(), 0);
}

fn static_key_gateway_config(dir: &std::path::Path) -> String {
    let key = dir.join("rsa.pub.pem");
    std::fs::write(&key, RSA_PUB_PEM).unwrap();
    format!(
        "algorithms = [\"RS256\"]\npublic_key = \"{}\"",
        key.display()
    )
}

#[tokio::test]
async fn attack_cases_are_401_and_never_reach_the_service() {
    let up = echo_upstream().await;
    let keydir = tempfile::tempdir().unwrap();
    let gw = gateway(&up, &static_key_gateway_config(keydir.path())).await;
    let rsa = Signer::rsa("a");
    let good = rsa.token(&claims(json!({})));
    assert_eq!(call(&gw, "/orders", Some(&good), &[]).await.status, 200);
    let served = up.requests();

    let header = |h: Value| B64.encode(h.to_string());
    let body = |c: Value| B64.encode(c.to_string());
    let parts: Vec<&str> = good.split('.').collect();
    let mut attacks: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                header(json!({"alg": "none", "typ": "JWT"})),
                parts[1]
            ),
        ),
        ("signature stripped", format!("{}.{}.", parts[0], parts[1])),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                body(claims(json!({"sub": "admin", "scope": "admin"}))),
                parts[2]
            ),
        ),
        ("expired", rsa.token(&claims(json!({"exp": now() - 3600})))),
        (
            "not yet valid",
            rsa.token(&claims(json!({"nbf": now() + 3600}))),
        ),
        (
            "issued in the future",
            rsa.token(&claims(json!({"iat": now() + 3600}))),
        ),
        (
            "wrong issuer",
            rsa.token(&claims(json!({"iss": "https://evil/"}))),
        ),
        (
            "wrong audience",
            rsa.token(&claims(json!({"aud": "other"}))),
        ),
        (
            "oversized",
            rsa.token(&claims(json!({"pad": "x".repeat(9000)}))),
        ),
        ("garbage", "a.b.c".to_owned()),
    ];
    // HS256 "signed" with the RSA public key as the secret.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("a".into());
    let confused = encode(
        &h,
        &claims(json!({})),
        &EncodingKey::from_secret(RSA_PUB_PEM.as_bytes()),
    )
    .unwrap();
    attacks.push(("HS256 with the public key", confused));
    for (what, token) in &attacks {
        let r = call(&gw, "/orders", Some(token), &[]).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_problem(&r, 401, "invalid_token");
    }
    // None reached the service.
    assert_eq!(up.requests(), served);

    // No token: 401 with a bare challenge.
    let r = call(&gw, "/orders", None, &[]).await;
    assert_problem(&r, 401, "unauthorized");
    assert_eq!(r.header("www-authenticate"), "Bearer");
    // A scope the token lacks: 403.
    let r = call(&gw, "/admin", Some(&good), &[]).await;
    assert_problem(&r, 403, "insufficient_scope");
    assert!(r.header("www-authenticate").contains("insufficient_scope"));
}

#[tokio::test]
async fn spoofed_identity_headers_never_reach_the_service() {
    let up = echo_upstream().await;
    let gw = gateway(
        &up,
        "algorithms = [\"HS256\"]\nsecret = \"test-secret-0123456789\"",
    )
    .await;
    let mut h = Header::new(Algorithm::HS256);
    h.kid = None;
    let token = encode(
        &h,
        &claims(json!({})),
        &EncodingKey::from_secret(b"test-secret-0123456789"),
    )
    .unwrap();
    let spoof = [("x-user-id", "admin"), ("x-user-scopes", "admin")];
    // With a token: the header is the token's subject, not the client's.
    let r = call(&gw, "/orders", Some(&token), &spoof).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-user-id"], "user-7");
    assert_eq!(r.json()["headers"]["x-user-scopes"], "orders:read profile");
    // On an open route of the frontend: removed.
    let r = call(&gw, "/public", None, &spoof).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["headers"].get("x-user-id").is_none());
    assert!(r.json()["headers"].get("x-user-scopes").is_none());
}

#[tokio::test]
async fn api_keys_from_a_header_or_the_query_and_external_auth() {
    let up = echo_upstream().await;
    let auth = Upstream::start(|req: http::Request<hyper::body::Incoming>| async move {
        match req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some("Basic good") => {
                let mut r = text(200, "ok");
                r.headers_mut()
                    .insert("x-user-id", "ext-user".parse().unwrap());
                r
            }
            Some("Basic forbidden") => text(403, "no"),
            _ => text(401, "who"),
        }
    })
    .await;
    let gwt = gateway_toml(
        "",
        &format!(
            r#"[services.svc]
endpoints = ["{}"]
[services.authsvc]
endpoints = ["{}"]

[auth.api_keys.partners]
header = "x-api-key"
keys = [{{ consumer = "acme", sha256 = "{}" }}]

[auth.api_keys.links]
query = "api_key"
keys = [{{ consumer = "mailer", sha256 = "{}" }}]

[auth.external.legacy]
service = "authsvc"
path = "/check"
copy_response_headers = ["x-user-id"]
"#,
            up.url(),
            auth.url(),
            sha256_hex("key-1"),
            sha256_hex("key-2"),
        ),
    );
    let routes = r#"
[frontend]
name = "partner"
auth = ["partners", "links"]

[[route]]
name = "legacy"
path = "/legacy"
auth = "legacy"
proxy = { service = "svc" }

[[route]]
name = "all"
path = "/{*rest}"
proxy = { service = "svc" }
"#;
    let gw = TestGateway::start(&gwt, &[("partner.toml", routes)]).await;
    let r = call(
        &gw,
        "/x",
        None,
        &[("x-api-key", "key-1"), ("x-consumer", "spoof")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer"], "acme");
    let r = call(&gw, "/x?a=1&api_key=key-2", None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["query"], "a=1", "the key is not forwarded");
    assert_eq!(r.json()["headers"]["x-consumer"], "mailer");
    assert_problem(
        &call(&gw, "/x", None, &[("x-api-key", "nope")]).await,
        401,
        "invalid_token",
    );
    assert_problem(&call(&gw, "/x", None, &[]).await, 401, "unauthorized");

    // External auth: 2xx lets through with the copied header; 403 and 401 are passed on.
    let r = call(
        &gw,
        "/legacy",
        None,
        &[("authorization", "Basic good"), ("x-user-id", "spoof")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-user-id"], "ext-user");
    let r = call(
        &gw,
        "/legacy",
        None,
        &[("authorization", "Basic forbidden")],
    )
    .await;
    assert_problem(&r, 403, "forbidden");
    let r = call(&gw, "/legacy", None, &[]).await;
    assert_eq!(r.status, 401);
    // The auth service down: 503 (fail closed).
    auth.kill();
    let r = call(&gw, "/legacy", None, &[("authorization", "Basic good")]).await;
    assert_problem(&r, 503, "auth_unavailable");
}

#[tokio::test]
async fn auth_config_mistakes_are_located() {
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("k.pem");
    std::fs::write(&key, RSA_PUB_PEM).unwrap();
    let routes = "[frontend]\nname = \"web\"\nauth = \"nobody\"\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\nproxy = { service = \"svc\" }\n";
    let gwt = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"http://127.0.0.1:9\"]\n\n[auth.jwt.bad]\nalgorithms = [\"none\", \"RS256\", \"HS256\"]\npublic_key = \"{}\"\n",
            key.display()
        ),
    );
    let errs = compile_errors(&gwt, "web.toml", routes);
    assert!(
        errs.contains("gateway.toml:")
            && errs.contains("auth.jwt.bad: `none` can never be an algorithm"),
        "{errs}"
    );
    assert!(
        errs.contains("algorithm HS256 does not fit the key"),
        "{errs}"
    );
    assert!(
        errs.contains("web.toml:3:8: unknown auth provider `nobody` (defined: bad)")
            || errs.contains("unknown auth provider `nobody`"),
        "{errs}"
    );
    let two = gateway_toml(
        "",
        "[auth.jwt.two]\nalgorithms = [\"RS256\"]\nsecret = \"s\"\njwks_url = \"http://127.0.0.1:9/jwks\"\n",
    );
    let errs = compile_errors(&two, "web.toml", "[frontend]\nname = \"web\"\n");
    assert!(
        errs.contains("exactly one of `jwks_url`, `oidc_discovery = true`, `public_key` or `secret` (it has 2)"),
        "{errs}"
    );
    // `auth` of the wrong type is located and says what it takes.
    let gwt = gateway_toml("", "[services.svc]\nendpoints = [\"http://127.0.0.1:9\"]\n");
    let errs = compile_errors(&gwt, "web.toml", "[frontend]\nname = \"web\"\nauth = 5\n");
    assert!(
        errs.contains("web.toml:3:8:")
            && errs.contains("a provider name, a list of provider names, or \"none\""),
        "{errs}"
    );
    let errs = compile_errors(&gwt, "web.toml", "[frontend]\nname = \"web\"\nauth = []\n");
    assert!(errs.contains("names no provider"), "{errs}");
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(b"test-secret-0123456789"),
    )
    .unwrap()
}

#[tokio::test]
async fn cors_preflights_are_answered_and_errors_carry_cors_headers() {
    let up = echo_upstream().await;
    let gwt = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"{}\"]\n\n[auth.jwt.main]\nalgorithms = [\"HS256\"]\nsecret = \"test-secret-0123456789\"\nissuer = \"https://id.test/\"\n",
            up.url()
        ),
    );
    let routes = r#"
[frontend]
name = "web"
auth = "main"
cors = { origins = ["https://app.test"], methods = ["GET", "POST"], headers = ["authorization", "content-type"], expose_headers = ["x-request-id"], credentials = true, max_age = "10m" }

[[route]]
name = "orders"
path = "/orders"
methods = ["GET"]
proxy = { service = "svc" }
"#;
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    let preflight = |origin: &'static str, headers: &'static str| {
        Request::options(gw.url("/orders"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", headers)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = send(preflight("https://app.test", "Authorization")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-origin"), "https://app.test");
    assert_eq!(r.header("access-control-allow-methods"), "GET, POST");
    assert_eq!(
        r.header("access-control-allow-headers"),
        "authorization, content-type"
    );
    assert_eq!(r.header("access-control-allow-credentials"), "true");
    assert_eq!(r.header("access-control-max-age"), "600");
    // A disallowed origin, or a header not allowed: 403 and no CORS headers.
    for (origin, headers) in [
        ("https://evil.test", "authorization"),
        ("https://app.test", "x-secret"),
    ] {
        let r = send(preflight(origin, headers)).await;
        assert_problem(&r, 403, "cors_rejected");
        assert_eq!(r.header("access-control-allow-origin"), "");
    }
    assert_eq!(up.requests(), 0, "preflights never reach the service");

    // The gateway's own 401 carries the CORS headers, so the browser app can read it.
    let r = call(&gw, "/orders", None, &[("origin", "https://app.test")]).await;
    assert_problem(&r, 401, "unauthorized");
    assert_eq!(r.header("access-control-allow-origin"), "https://app.test");
    assert_eq!(r.header("access-control-allow-credentials"), "true");
    let token = hs256(&claims(json!({})));
    let r = call(
        &gw,
        "/orders",
        Some(&token),
        &[("origin", "https://app.test")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), "https://app.test");
    assert_eq!(r.header("access-control-expose-headers"), "x-request-id");
    assert_eq!(r.header("vary"), "origin");
    let r = call(
        &gw,
        "/orders",
        Some(&token),
        &[("origin", "https://evil.test")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), "");
}

#[tokio::test]
async fn oidc_discovery_finds_the_jwks() {
    let up = echo_upstream().await;
    let signer = Signer::ec("k1");
    let jwk = signer.jwk.clone();
    let idp = Arc::new(Mutex::new(String::new()));
    let base = idp.clone();
    let server = Upstream::start(move |req: http::Request<hyper::body::Incoming>| {
        let base = base.lock().unwrap().clone();
        let jwk = jwk.clone();
        async move {
            match req.uri().path() {
                "/realm/.well-known/openid-configuration" => text(
                    200,
                    json!({"issuer": format!("{base}/realm"), "jwks_uri": format!("{base}/realm/certs")}).to_string(),
                ),
                "/realm/certs" => text(200, json!({"keys": [jwk]}).to_string()),
                _ => text(404, "no"),
            }
        }
    })
    .await;
    *idp.lock().unwrap() = server.url();
    let issuer = format!("{}/realm", server.url());
    let gwt = gateway_toml(
        "",
        &format!(
            "[services.svc]\nendpoints = [\"{}\"]\n\n[auth.jwt.main]\nalgorithms = [\"ES256\"]\noidc_discovery = true\nissuer = \"{issuer}\"\n",
            up.url()
        ),
    );
    let routes = "[frontend]\nname = \"web\"\nauth = \"main\"\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\nproxy = { service = \"svc\" }\n";
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    let t = signer.token(&claims(json!({"iss": issuer})));
    let r = call(&gw, "/x", Some(&t), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_jwt_provider_and_counts_outcomes() {
    let up = echo_upstream().await;
    let signer = Signer::rsa("a");
    let jwks = jwks_server(vec![signer.jwk.clone()]).await;
    let jwt = |leeway: &str| {
        format!(
            "algorithms = [\"RS256\"]\njwks_url = \"{}/jwks.json\"\nleeway = \"{leeway}\"",
            jwks.up.url()
        )
    };
    let gw = gateway(&up, &jwt("30s")).await;
    let t = signer.token(&claims(json!({})));
    assert_eq!(call(&gw, "/orders", Some(&t), &[]).await.status, 200);
    let fetched = jwks.hits.load(Ordering::SeqCst);

    // A route file changes; [auth.jwt.main] does not: the provider, its keys and its refresh
    // task are kept (a new one would fetch the JWKS at once).
    gw.write_route("web.toml", &format!("{}\n# edited\n", routes()));
    assert_eq!(admin_reload(&gw).await.status, 200);
    assert_eq!(call(&gw, "/orders", Some(&t), &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        jwks.hits.load(Ordering::SeqCst),
        fetched,
        "the JWKS was not fetched again"
    );

    // Its config changes: a new provider, which fetches.
    let gwt = std::fs::read_to_string(gw.dir.path().join("gateway.toml")).unwrap();
    std::fs::write(
        gw.dir.path().join("gateway.toml"),
        gwt.replace("leeway = \"30s\"", "leeway = \"20s\""),
    )
    .unwrap();
    assert_eq!(admin_reload(&gw).await.status, 200);
    eventually(5, "the new provider fetches the JWKS", || async {
        jwks.hits.load(Ordering::SeqCst) > fetched
    })
    .await;
    assert_eq!(call(&gw, "/orders", Some(&t), &[]).await.status, 200);
    assert_problem(&call(&gw, "/orders", None, &[]).await, 401, "unauthorized");

    let m = get(&gw.admin_url("/metrics")).await.text();
    assert!(
        m.contains(r#"gatehouse_auth_total{outcome="ok",provider="main",route="web/orders"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(
            r#"gatehouse_auth_total{outcome="missing",provider="main",route="web/orders"} 1"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"gatehouse_jwks_fetches_total{provider="main",result="attempt"}"#),
        "{m}"
    );
    // No token or key material in the metrics.
    assert!(!m.contains(&t[..20]));
}

#[tokio::test]
async fn keys_file_and_failing_open_external_auth() {
    let up = echo_upstream().await;
    let dead = closed_port().await;
    let gwt = gateway_toml(
        "",
        &format!(
            r#"[services.svc]
endpoints = ["{}"]
[services.authsvc]
endpoints = ["http://{dead}"]

[auth.api_keys.partners]
keys_file = "partner-keys.toml"

[auth.external.open]
service = "authsvc"
on_error = "allow"
timeout = "2s"
"#,
            up.url()
        ),
    );
    let routes = r#"
[frontend]
name = "p"
auth = "partners"

[[route]]
name = "open"
path = "/open"
auth = "open"
proxy = { service = "svc" }

[[route]]
name = "all"
path = "/{*rest}"
proxy = { service = "svc" }
"#;
    let dir = write_config(&gwt, &[("p.toml", routes)]);
    std::fs::write(
        dir.path().join("partner-keys.toml"),
        format!(
            "[[keys]]\nconsumer = \"globex\"\nsha256 = \"{}\"\n",
            sha256_hex("file-key")
        ),
    )
    .unwrap();
    let server = gatehouse::Server::start(&dir.path().join("gateway.toml"))
        .await
        .unwrap();
    let url = |p: &str| format!("http://{}{p}", server.http_addrs()[0]);
    let with_key = |p: &str, k: &'static str| {
        Request::get(url(p))
            .header("x-api-key", k)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let r = send(with_key("/x", "file-key")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-consumer"], "globex");
    assert_eq!(send(with_key("/x", "other")).await.status, 401);
    // The auth service is down and the provider fails open.
    let r = get(&url("/open")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn every_algorithm_verifies_with_a_key_of_its_family() {
    let up = echo_upstream().await;
    let rsa = Signer::rsa("rsa");
    let mut rsa_jwk = rsa.jwk.clone();
    rsa_jwk.as_object_mut().unwrap().remove("alg"); // one RSA key for RS* and PS*
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let raw = p384.public_key_raw();
    let es384 = Signer {
        alg: Algorithm::ES384,
        kid: "p384".into(),
        key: EncodingKey::from_ec_pem(p384.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "kid": "p384", "crv": "P-384", "x": B64.encode(&raw[1..49]), "y": B64.encode(&raw[49..97])}),
    };
    let (es256, ed) = (Signer::ec("p256"), Signer::ed("ed"));
    let jwks = jwks_server(vec![
        rsa_jwk,
        es384.jwk.clone(),
        es256.jwk.clone(),
        ed.jwk.clone(),
    ])
    .await;
    let gwt = gateway_toml(
        "",
        &format!(
            r#"[services.svc]
endpoints = ["{}"]

[auth.jwt.asym]
algorithms = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
jwks_url = "{}/jwks.json"

[auth.jwt.sym]
algorithms = ["HS256", "HS384", "HS512"]
secret = "${{AUTH_TEST_SECRET:-a-long-shared-secret-0123456789}}"
"#,
            up.url(),
            jwks.up.url()
        ),
    );
    let routes = "[frontend]\nname = \"web\"\nauth = [\"asym\", \"sym\"]\n\n[[route]]\nname = \"all\"\npath = \"/{*rest}\"\nproxy = { service = \"svc\" }\n";
    let gw = TestGateway::start(&gwt, &[("web.toml", routes)]).await;
    let c = claims(json!({}));
    let sign = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, &c, key).unwrap()
    };
    let mut tokens = Vec::new();
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ] {
        tokens.push((alg, sign(alg, "rsa", &rsa.key)));
    }
    tokens.push((Algorithm::ES256, sign(Algorithm::ES256, "p256", &es256.key)));
    tokens.push((Algorithm::ES384, sign(Algorithm::ES384, "p384", &es384.key)));
    tokens.push((Algorithm::EdDSA, sign(Algorithm::EdDSA, "ed", &ed.key)));
    let secret = EncodingKey::from_secret(b"a-long-shared-secret-0123456789");
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        tokens.push((alg, encode(&Header::new(alg), &c, &secret).unwrap()));
    }
    for (alg, t) in &tokens {
        let r = call(&gw, "/x", Some(t), &[]).await;
        assert_eq!(r.status, 200, "{alg:?}: {}", r.text());
    }
    // An ES256 token naming the P-384 key does not verify with it.
    let wrong = sign(Algorithm::ES256, "p384", &es256.key);
    assert_eq!(call(&gw, "/x", Some(&wrong), &[]).await.status, 401);

    // The secret is masked in /admin/config.
    let cfg = get(&gw.admin_url("/admin/config")).await.text();
    assert!(!cfg.contains("a-long-shared-secret"), "{cfg}");
    assert!(cfg.contains("[redacted]"), "{cfg}");
}
