//! Authentication and authorization at the edge: the route layer (`AuthLayer`) and the
//! providers it asks — JWT (`jwt.rs`, keys from a JWKS in `jwks.rs`, OIDC discovery, a PEM key
//! or a secret), API keys (`api_key.rs`) and external auth services (`external.rs`).
//!
//! A route's policy names providers (any one suffices) and what the identity must have
//! (`require`). Before anything, the headers any provider of the frontend forwards identity in
//! are removed from the client's request, on every route of the frontend (`auth = "none"`
//! ones too), so a client can never send its own `x-user-id`. The identity is recorded on the
//! request's `Exchange` for the layers and backends after it.
//!
//! Failures: no or bad credentials → 401 with `WWW-Authenticate: Bearer` (RFC 6750), a
//! missing scope or claim → 403 `insufficient_scope`, no way to check (no JWKS keys, the auth
//! service down) → 503. Tokens, keys and secrets are never logged.

pub(crate) mod api_key;
pub(crate) mod build;
pub(crate) mod external;
pub(crate) mod jwks;
pub(crate) mod jwt;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use serde_json::Value;
use tower::{Layer, Service, ServiceExt};

use crate::backend::RespBody;
use crate::body::ReqBody;
use crate::context::{Exchange, Identity};
use crate::error::{BoxError, Problem};

pub(crate) use build::{build_providers, Providers};

/// Why one provider did not accept a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    /// No credentials of its kind.
    Missing,
    /// Credentials that are not valid (the reason is for the log, never the client).
    Invalid(&'static str),
    /// Credentials that cannot be checked now.
    Unavailable(&'static str),
    /// Refused by an external auth service with this status (401 or 403).
    Refused(StatusCode),
}

impl AuthFailure {
    fn rank(&self) -> u8 {
        match self {
            AuthFailure::Missing => 0,
            AuthFailure::Invalid(_) => 1,
            AuthFailure::Refused(_) => 2,
            AuthFailure::Unavailable(_) => 3,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Invalid(r) | AuthFailure::Unavailable(r) => r,
            AuthFailure::Refused(_) => "refused",
        }
    }

    fn problem(&self) -> Problem {
        match self {
            AuthFailure::Missing => Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication is required",
            )
            .header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
            AuthFailure::Invalid(_) => Problem::new(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "The credentials are not valid",
            )
            .header(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            ),
            AuthFailure::Refused(s) if *s == StatusCode::FORBIDDEN => Problem::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "The request is not allowed",
            ),
            AuthFailure::Refused(_) => Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication is required",
            ),
            AuthFailure::Unavailable(_) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                "Authentication cannot be checked right now",
            )
            .retry_after(1),
        }
    }
}

/// One configured provider.
#[derive(Clone)]
pub(crate) enum Provider {
    Jwt(Arc<JwtProvider>),
    ApiKeys(Arc<ApiKeysProvider>),
    External(Arc<external::External>),
}

pub(crate) struct JwtProvider {
    pub(crate) name: Arc<str>,
    pub(crate) verifier: jwt::JwtVerifier,
    pub(crate) token_from: Box<[TokenFrom]>,
    /// Claim → request header.
    pub(crate) forward: Box<[(Box<str>, HeaderName)]>,
    pub(crate) strip_authorization: bool,
    pub(crate) _tasks: crate::resources::Tasks,
}

pub(crate) struct ApiKeysProvider {
    pub(crate) name: Arc<str>,
    pub(crate) keys: api_key::ApiKeys,
    pub(crate) forward_consumer: HeaderName,
}

/// Where a JWT is looked for.
pub(crate) enum TokenFrom {
    /// `Authorization: Bearer …` (or another header holding the bare token).
    Header(HeaderName),
    Cookie(Box<str>),
    Query(Box<str>),
}

/// What a route asks of the identity.
#[derive(Default)]
pub(crate) struct Require {
    pub(crate) scopes: Box<[String]>,
    pub(crate) claims: Box<[(String, Box<[String]>)]>,
}

/// A route's authentication: the providers to try (empty: `auth = "none"`, only the identity
/// headers are stripped), what the identity must have, and the headers to strip.
pub(crate) struct AuthPolicy {
    pub(crate) providers: Vec<Provider>,
    pub(crate) require: Require,
    pub(crate) strip: Arc<[HeaderName]>,
    /// `gatehouse_auth_total{outcome="ok"}` of each provider, resolved when built.
    pub(crate) ok: Box<[prometheus::IntCounter]>,
    pub(crate) outcomes: prometheus::IntCounterVec,
    pub(crate) route: Arc<str>,
}

#[derive(Clone)]
pub(crate) struct AuthLayer(Arc<AuthPolicy>);

impl AuthLayer {
    pub(crate) fn new(policy: AuthPolicy) -> Self {
        AuthLayer(Arc::new(policy))
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            policy: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct AuthService<S> {
    policy: Arc<AuthPolicy>,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

impl<S> Service<Request<ReqBody>> for AuthService<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> BoxFuture {
        let policy = self.policy.clone();
        let inner = self.inner.clone();
        for h in policy.strip.iter() {
            req.headers_mut().remove(h);
        }
        Box::pin(async move {
            if policy.providers.is_empty() {
                return inner.oneshot(req).await;
            }
            let exchange = req.extensions().get::<Exchange>().cloned();
            let mut worst: Option<(AuthFailure, &str)> = None;
            for (i, p) in policy.providers.iter().enumerate() {
                match authenticate(p, &mut req, exchange.as_ref()).await {
                    Ok(identity) => {
                        if let Err(p) = policy.require.check(&identity) {
                            policy.count(&identity.provider, "insufficient_scope");
                            return Err(p as BoxError);
                        }
                        if let Some(c) = policy.ok.get(i) {
                            c.inc();
                        }
                        if let Some(x) = &exchange {
                            x.set_identity(identity);
                        }
                        return inner.oneshot(req).await;
                    }
                    Err(f) => {
                        if worst.is_none_or(|(w, _)| f.rank() > w.rank()) {
                            worst = Some((f, p.name()));
                        }
                    }
                }
            }
            let (failure, provider) = worst.unwrap_or((AuthFailure::Missing, ""));
            policy.count(provider, failure.reason());
            Err(failure.problem().into())
        })
    }
}

impl Provider {
    pub(crate) fn name(&self) -> &str {
        match self {
            Provider::Jwt(j) => &j.name,
            Provider::ApiKeys(k) => &k.name,
            Provider::External(e) => &e.name,
        }
    }

    /// The headers this provider sets from an identity (stripped from client requests).
    pub(crate) fn identity_headers(&self) -> Vec<HeaderName> {
        match self {
            Provider::Jwt(j) => j.forward.iter().map(|(_, h)| h.clone()).collect(),
            Provider::ApiKeys(k) => vec![k.forward_consumer.clone()],
            Provider::External(e) => e.copy.to_vec(),
        }
    }
}

impl AuthPolicy {
    fn count(&self, provider: &str, outcome: &str) {
        self.outcomes
            .with_label_values(&[&*self.route, provider, outcome])
            .inc();
    }
}

async fn authenticate(
    p: &Provider,
    req: &mut Request<ReqBody>,
    exchange: Option<&Exchange>,
) -> Result<Identity, AuthFailure> {
    match p {
        Provider::Jwt(j) => {
            let (verified, from_authorization) = {
                let (token, from_authorization) = find_token(&j.token_from, req)?;
                (j.verifier.verify(&token).await?, from_authorization)
            };
            let values = verified.forwarded.get_or_init(|| {
                j.forward
                    .iter()
                    .map(|(claim, _)| verified.claims.get(&**claim).and_then(claim_header))
                    .collect()
            });
            let h = req.headers_mut();
            for ((_, name), value) in j.forward.iter().zip(values.iter()) {
                if let Some(v) = value {
                    h.insert(name.clone(), v.clone());
                }
            }
            let claims = verified.claims.clone();
            if j.strip_authorization && from_authorization {
                h.remove(header::AUTHORIZATION);
            }
            Ok(Identity {
                provider: j.name.clone(),
                claims: Some(claims),
                consumer: None,
            })
        }
        Provider::ApiKeys(k) => {
            let consumer = k.keys.authenticate(req)?;
            req.headers_mut()
                .insert(k.forward_consumer.clone(), consumer.header);
            Ok(Identity {
                provider: k.name.clone(),
                claims: None,
                consumer: Some(consumer.name),
            })
        }
        Provider::External(e) => e.check(req, exchange).await,
    }
}

/// The token a request carries (borrowed from its headers where it can be), and whether it
/// came from `Authorization`.
fn find_token<'r, B>(
    from: &[TokenFrom],
    req: &'r Request<B>,
) -> Result<(Cow<'r, [u8]>, bool), AuthFailure> {
    for f in from {
        match f {
            TokenFrom::Header(name) => {
                let Some(v) = req.headers().get(name) else {
                    continue;
                };
                // Bytes: `HeaderValue::to_str` checks each byte on its own (~2 instructions a
                // byte of a 300-byte token), and a cached token needs no check at all.
                let bytes = v.as_bytes();
                if *name == header::AUTHORIZATION {
                    let scheme = bytes.get(..7);
                    if scheme.is_some_and(|s| s.eq_ignore_ascii_case(b"bearer ")) {
                        return Ok((Cow::Borrowed(bytes[7..].trim_ascii()), true));
                    }
                    continue;
                }
                return Ok((Cow::Borrowed(bytes.trim_ascii()), false));
            }
            TokenFrom::Cookie(name) => {
                for v in req.headers().get_all(header::COOKIE) {
                    let Ok(v) = v.to_str() else { continue };
                    for pair in v.split(';') {
                        if let Some((k, val)) = pair.trim().split_once('=') {
                            if k == &**name {
                                return Ok((Cow::Borrowed(val.as_bytes()), false));
                            }
                        }
                    }
                }
            }
            TokenFrom::Query(name) => {
                if let Some(v) = api_key::query_value(req.uri(), name) {
                    return Ok((Cow::Owned(v), false));
                }
            }
        }
    }
    Err(AuthFailure::Missing)
}

/// A claim as a header value: strings as they are, numbers and booleans written out, arrays
/// joined with spaces; nothing that would not be a valid header value (control characters,
/// non-ASCII) is forwarded.
fn claim_header(v: &Value) -> Option<HeaderValue> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => items
            .iter()
            .filter_map(|i| match i {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    if s.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
        return None;
    }
    HeaderValue::from_str(&s).ok()
}

/// The scopes of a token: `scope` (space-separated) or `scp` (a list or a string).
fn scopes(claims: &serde_json::Map<String, Value>) -> Vec<&str> {
    let mut out = Vec::new();
    for key in ["scope", "scp"] {
        match claims.get(key) {
            Some(Value::String(s)) => out.extend(s.split(' ').filter(|s| !s.is_empty())),
            Some(Value::Array(a)) => out.extend(a.iter().filter_map(Value::as_str)),
            _ => {}
        }
    }
    out
}

impl Require {
    fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.claims.is_empty()
    }

    fn check(&self, id: &Identity) -> Result<(), Box<Problem>> {
        if self.is_empty() {
            return Ok(());
        }
        let empty = serde_json::Map::new();
        let claims = id.claims.as_deref().unwrap_or(&empty);
        let have = scopes(claims);
        let scopes_ok = self.scopes.iter().all(|s| have.contains(&s.as_str()));
        let claims_ok = self.claims.iter().all(|(name, allowed)| {
            let matches = |v: &Value| match v {
                Value::String(s) => allowed.contains(s),
                Value::Number(n) => allowed.contains(&n.to_string()),
                Value::Bool(b) => allowed.contains(&b.to_string()),
                _ => false,
            };
            match claims.get(name) {
                Some(Value::Array(items)) => items.iter().any(matches),
                Some(v) => matches(v),
                None => false,
            }
        });
        if scopes_ok && claims_ok {
            return Ok(());
        }
        let mut challenge = String::from("Bearer error=\"insufficient_scope\"");
        if !self.scopes.is_empty() {
            challenge.push_str(&format!(", scope=\"{}\"", self.scopes.join(" ")));
        }
        let mut p = Problem::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "The credentials do not allow this request",
        );
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            p = p.header(header::WWW_AUTHENTICATE, v);
        }
        Err(Box::new(p))
    }
}

/// The fuzz target `auth_credentials`: `data` as a token in each place a token or key is read
/// from (a bearer header, a cookie, the query), the JWT header parsed, the API key looked up
/// and removed from the query, and claims of the input made header values.
pub(crate) fn fuzz_credentials(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let from = [
        TokenFrom::Header(header::AUTHORIZATION),
        TokenFrom::Cookie("session".into()),
        TokenFrom::Query("token".into()),
    ];
    let mut b = Request::get(format!("/x?token={}&api_key={}", text, text).as_str());
    if let Ok(v) = HeaderValue::from_bytes(data) {
        b = b
            .header(header::AUTHORIZATION, v.clone())
            .header(header::COOKIE, v);
    }
    if let Ok(mut req) = b.body(()) {
        if let Ok((token, _)) = find_token(&from, &req) {
            if let Ok(t) = std::str::from_utf8(&token) {
                let _ = jsonwebtoken::decode_header(t);
            }
        }
        let keys = api_key::ApiKeys {
            from: api_key::KeyFrom::Query("api_key".into()),
            keys: std::collections::HashMap::new(),
        };
        let _ = keys.authenticate(&mut req);
        let left = req.uri().query().unwrap_or("").split('&');
        assert!(!left
            .map(|p| p.split('=').next())
            .any(|k| k == Some("api_key")));
    }
    let _ = jsonwebtoken::decode_header(&text);
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        if let Some(h) = claim_header(&v) {
            assert!(!h.as_bytes().iter().any(|b| *b == b'\r' || *b == b'\n'));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokens_are_found_where_configured() {
        let from = [
            TokenFrom::Header(header::AUTHORIZATION),
            TokenFrom::Cookie("session".into()),
        ];
        let req = Request::get("/")
            .header("authorization", "Bearer abc.def.ghi")
            .body(())
            .unwrap();
        assert_eq!(
            find_token(&from, &req).unwrap(),
            (Cow::Borrowed(&b"abc.def.ghi"[..]), true)
        );
        let req = Request::get("/")
            .header("authorization", "Basic xyz")
            .header("cookie", "a=1; session=tok")
            .body(())
            .unwrap();
        assert_eq!(
            find_token(&from, &req).unwrap(),
            (Cow::Borrowed(&b"tok"[..]), false)
        );
        let req = Request::get("/").body(()).unwrap();
        assert_eq!(find_token(&from, &req).unwrap_err(), AuthFailure::Missing);
    }

    #[test]
    fn claims_become_header_values_only_when_safe() {
        assert_eq!(claim_header(&json!("u-1")).unwrap(), "u-1");
        assert_eq!(claim_header(&json!(42)).unwrap(), "42");
        assert_eq!(claim_header(&json!(["a", "b"])).unwrap(), "a b");
        assert!(claim_header(&json!("a\r\nx-admin: 1")).is_none());
        assert!(claim_header(&json!("é")).is_none());
        assert!(claim_header(&json!({"a": 1})).is_none());
    }

    #[test]
    fn require_checks_scopes_and_claims() {
        let req = Require {
            scopes: Box::new(["orders:read".to_owned()]),
            claims: Box::new([(
                "tier".to_owned(),
                Box::new(["gold".to_owned()]) as Box<[String]>,
            )]),
        };
        let id = |claims: Value| Identity {
            provider: Arc::from("main"),
            claims: Some(Arc::new(claims.as_object().unwrap().clone())),
            consumer: None,
        };
        assert!(req
            .check(&id(json!({"scope": "a orders:read", "tier": "gold"})))
            .is_ok());
        assert!(req
            .check(&id(json!({"scp": ["orders:read"], "tier": ["x", "gold"]})))
            .is_ok());
        let p = req
            .check(&id(json!({"scope": "a", "tier": "gold"})))
            .unwrap_err();
        assert_eq!((p.status.as_u16(), p.code), (403, "insufficient_scope"));
        assert!(p.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .contains("scope=\"orders:read\""));
        assert!(req
            .check(&id(json!({"scope": "orders:read", "tier": "silver"})))
            .is_err());
    }
}
