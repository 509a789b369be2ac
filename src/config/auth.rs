//! `[auth.*]` in gateway.toml (JWT providers, API-key sets, external auth services), and what a
//! frontend or route says about authentication: `auth`, `require` and a frontend's `cors`.
//! A JWT provider's key source is one tagged enum (`JwtKeys`): exactly one of `jwks_url`,
//! `oidc_discovery`, `public_key` or `secret`, decided by serde at the provider's table.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::units::{Duration, Size};

/// `[auth]`: named authentication providers, referred to by `auth = "NAME"`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthConfig {
    #[serde(default)]
    pub(crate) jwt: BTreeMap<String, Spanned<JwtConfig>>,
    #[serde(default)]
    pub(crate) api_keys: BTreeMap<String, Spanned<ApiKeysConfig>>,
    #[serde(default)]
    pub(crate) external: BTreeMap<String, Spanned<ExternalAuthConfig>>,
}

/// `[auth.jwt.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "RawJwt", into = "RawJwt")]
pub(crate) struct JwtConfig {
    pub(crate) issuer: Option<String>,
    pub(crate) audiences: Vec<String>,
    pub(crate) algorithms: Vec<Spanned<String>>,
    pub(crate) keys: JwtKeys,
    pub(crate) leeway: std::time::Duration,
    pub(crate) token_from: Vec<Spanned<String>>,
    pub(crate) forward_claims: BTreeMap<String, String>,
    pub(crate) strip_authorization: bool,
    pub(crate) required_claims: Vec<String>,
    pub(crate) max_token_size: Size,
    pub(crate) jwks: JwksSettings,
    pub(crate) cache_max_entries: u64,
    pub(crate) cache_max_age: Duration,
}

/// Where a JWT provider's verification keys come from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JwtKeys {
    /// A JWKS document, fetched and refreshed.
    JwksUrl(String),
    /// `{issuer}/.well-known/openid-configuration` names the JWKS.
    OidcDiscovery,
    /// A PEM public key file (RSA, EC or Ed25519).
    PublicKey(PathBuf),
    /// A shared secret (HS256/384/512).
    Secret(String),
}

/// How a JWKS is kept fresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct JwksSettings {
    /// Bounds on the refresh interval the JWKS's `Cache-Control: max-age` asks for.
    pub(crate) min_refresh: Duration,
    pub(crate) max_refresh: Duration,
    /// An unknown `kid` refetches the JWKS at most once per this.
    pub(crate) refetch_cooldown: Duration,
    /// Per fetch.
    pub(crate) timeout: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    #[serde(skip_serializing_if = "Option::is_none")]
    issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    audiences: Vec<String>,
    algorithms: Vec<Spanned<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    oidc_discovery: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
    #[serde(default = "leeway")]
    leeway: Duration,
    #[serde(default = "token_from")]
    token_from: Vec<Spanned<String>>,
    #[serde(default)]
    forward_claims: BTreeMap<String, String>,
    #[serde(default)]
    strip_authorization: bool,
    #[serde(default)]
    required_claims: Vec<String>,
    #[serde(default = "max_token")]
    max_token_size: Size,
    #[serde(default = "min_refresh")]
    jwks_min_refresh: Duration,
    #[serde(default = "max_refresh")]
    jwks_max_refresh: Duration,
    #[serde(default = "cooldown")]
    jwks_refetch_cooldown: Duration,
    #[serde(default = "fetch_timeout")]
    jwks_timeout: Duration,
    #[serde(default = "cache_entries")]
    cache_max_entries: u64,
    #[serde(default = "cache_age")]
    cache_max_age: Duration,
}

fn leeway() -> Duration {
    Duration::from_secs(30)
}
fn token_from() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "header:authorization".to_owned())]
}
fn max_token() -> Size {
    Size(8 * 1024)
}
fn min_refresh() -> Duration {
    Duration::from_secs(60)
}
fn max_refresh() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn cooldown() -> Duration {
    Duration::from_secs(10)
}
fn fetch_timeout() -> Duration {
    Duration::from_secs(5)
}
fn cache_entries() -> u64 {
    10_000
}
fn cache_age() -> Duration {
    Duration::from_secs(300)
}

/// A JWT provider without exactly one key source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a JWT provider needs exactly one of `jwks_url`, `oidc_discovery = true`, `public_key` or `secret` (it has {0})")]
pub(crate) struct KeySourceError(usize);

impl TryFrom<RawJwt> for JwtConfig {
    type Error = KeySourceError;

    fn try_from(r: RawJwt) -> Result<Self, KeySourceError> {
        let mut found = Vec::new();
        if let Some(u) = r.jwks_url {
            found.push(JwtKeys::JwksUrl(u));
        }
        if r.oidc_discovery {
            found.push(JwtKeys::OidcDiscovery);
        }
        if let Some(p) = r.public_key {
            found.push(JwtKeys::PublicKey(p));
        }
        if let Some(s) = r.secret {
            found.push(JwtKeys::Secret(s));
        }
        if found.len() != 1 {
            return Err(KeySourceError(found.len()));
        }
        Ok(JwtConfig {
            issuer: r.issuer,
            audiences: r.audiences,
            algorithms: r.algorithms,
            keys: found.remove(0),
            leeway: r.leeway.get(),
            token_from: r.token_from,
            forward_claims: r.forward_claims,
            strip_authorization: r.strip_authorization,
            required_claims: r.required_claims,
            max_token_size: r.max_token_size,
            jwks: JwksSettings {
                min_refresh: r.jwks_min_refresh,
                max_refresh: r.jwks_max_refresh,
                refetch_cooldown: r.jwks_refetch_cooldown,
                timeout: r.jwks_timeout,
            },
            cache_max_entries: r.cache_max_entries,
            cache_max_age: r.cache_max_age,
        })
    }
}

impl From<JwtConfig> for RawJwt {
    fn from(c: JwtConfig) -> RawJwt {
        let (mut jwks_url, mut oidc_discovery, mut public_key, mut secret) =
            (None, false, None, None);
        match c.keys {
            JwtKeys::JwksUrl(u) => jwks_url = Some(u),
            JwtKeys::OidcDiscovery => oidc_discovery = true,
            JwtKeys::PublicKey(p) => public_key = Some(p),
            JwtKeys::Secret(s) => secret = Some(s),
        }
        RawJwt {
            issuer: c.issuer,
            audiences: c.audiences,
            algorithms: c.algorithms,
            jwks_url,
            oidc_discovery,
            public_key,
            secret,
            leeway: Duration(c.leeway.max(std::time::Duration::from_millis(1))),
            token_from: c.token_from,
            forward_claims: c.forward_claims,
            strip_authorization: c.strip_authorization,
            required_claims: c.required_claims,
            max_token_size: c.max_token_size,
            jwks_min_refresh: c.jwks.min_refresh,
            jwks_max_refresh: c.jwks.max_refresh,
            jwks_refetch_cooldown: c.jwks.refetch_cooldown,
            jwks_timeout: c.jwks.timeout,
            cache_max_entries: c.cache_max_entries,
            cache_max_age: c.cache_max_age,
        }
    }
}

/// `[auth.api_keys.NAME]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiKeysConfig {
    /// The request header that carries the key (default `x-api-key`)…
    pub(crate) header: Option<String>,
    /// …or the query parameter (removed before the request is forwarded).
    pub(crate) query: Option<String>,
    #[serde(default)]
    pub(crate) keys: Vec<ApiKeyEntry>,
    /// A TOML file with more `[[keys]]` entries (read with the config, and reloaded with it).
    pub(crate) keys_file: Option<Spanned<PathBuf>>,
    /// The header the consumer's name is forwarded in (removed from client requests first).
    #[serde(default = "consumer_header")]
    pub(crate) forward_consumer: String,
}

fn consumer_header() -> String {
    "x-consumer".to_owned()
}

/// One API key: who it belongs to and the SHA-256 of the key (hex).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiKeyEntry {
    pub(crate) consumer: String,
    pub(crate) sha256: String,
}

/// A `keys_file`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApiKeysFile {
    #[serde(default)]
    pub(crate) keys: Vec<ApiKeyEntry>,
}

/// `[auth.external.NAME]`: forward auth (asks a service, like nginx `auth_request`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExternalAuthConfig {
    pub(crate) service: Spanned<String>,
    #[serde(default = "check_path")]
    pub(crate) path: String,
    /// Request headers sent to the auth service.
    #[serde(default = "forwarded")]
    pub(crate) forward_headers: Vec<String>,
    /// Headers of the auth service's 2xx answer copied onto the request (and removed from
    /// client requests first).
    #[serde(default)]
    pub(crate) copy_response_headers: Vec<String>,
    #[serde(default = "external_timeout")]
    pub(crate) timeout: Duration,
    /// When the auth service cannot answer: `deny` (503, the default) or `allow`.
    #[serde(default)]
    pub(crate) on_error: OnAuthError,
}

fn check_path() -> String {
    "/".to_owned()
}
fn forwarded() -> Vec<String> {
    vec!["authorization".to_owned(), "cookie".to_owned()]
}
fn external_timeout() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OnAuthError {
    #[default]
    Deny,
    Allow,
}

/// `auth = "NAME"`, `auth = ["A", "B"]` (any one suffices) or `auth = "none"`.
pub(crate) type AuthRef = super::names::Names<super::names::AuthNames>;

/// `require = { scopes = [...], claims = { NAME = [allowed values] } }`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequireConfig {
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
    #[serde(default)]
    pub(crate) claims: BTreeMap<String, Vec<String>>,
}

/// A frontend's `cors = { … }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CorsConfig {
    /// Allowed origins (`https://app.example.com`), or `["*"]`.
    pub(crate) origins: Vec<String>,
    #[serde(default = "cors_methods")]
    pub(crate) methods: Vec<String>,
    #[serde(default)]
    pub(crate) headers: Vec<String>,
    #[serde(default)]
    pub(crate) expose_headers: Vec<String>,
    #[serde(default)]
    pub(crate) credentials: bool,
    pub(crate) max_age: Option<Duration>,
}

fn cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
        .map(String::from)
        .to_vec()
}
