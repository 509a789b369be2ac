//! Builds the `[auth.*]` providers when a config is compiled. Each mistake is located in
//! gateway.toml. A JWT provider (its JWKS keys, its verified-token cache and the refresh task)
//! is a resource: a reload with an unchanged `[auth.jwt.NAME]` keeps it.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use http::header::HeaderName;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::api_key::{parse_digest, ApiKeys, KeyFrom};
use super::external::External;
use super::jwks::{self, Jwks, Key};
use super::jwt::{family, token_cache, Family, JwtVerifier, Keys};
use super::{ApiKeysProvider, JwtProvider, Provider, TokenFrom};
use crate::backend::proxy::{Proxy, ProxyOptions};
use crate::backend::target::UpstreamPath;
use crate::config::{
    ApiKeyEntry, ApiKeysConfig, ApiKeysFile, ConfigError, ConfigErrors, ExternalAuthConfig,
    JwtConfig, JwtKeys, LoadedConfig,
};
use crate::observe::metrics::Metrics;
use crate::resources::{Resources, Tasks};
use crate::upstream::Upstream;

/// The providers of one snapshot, by name.
#[derive(Default)]
pub(crate) struct Providers {
    by_name: HashMap<String, Provider>,
}

impl Providers {
    pub(crate) fn get(&self, name: &str) -> Option<&Provider> {
        self.by_name.get(name)
    }

    /// Every provider name, sorted (for error messages).
    pub(crate) fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

/// A JWT provider's config mistake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtConfigError {
    #[error("`none` can never be an algorithm")]
    NoneAlgorithm,
    #[error(
        "unknown algorithm `{0}` (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"
    )]
    Algorithm(String),
    #[error("`algorithms` is empty")]
    NoAlgorithms,
    #[error("algorithm {0:?} does not fit the key ({1})")]
    Mismatch(Algorithm, &'static str),
    #[error("`oidc_discovery` needs `issuer`")]
    DiscoveryWithoutIssuer,
    #[error("`{0}` is not an http(s) URL")]
    Url(String),
    #[error("public_key {0}: {1}")]
    PublicKey(String, String),
    #[error("`secret` is empty")]
    EmptySecret,
    #[error("token_from `{0}` must be `header:NAME`, `cookie:NAME` or `query:NAME`")]
    TokenFrom(String),
    #[error("forward_claims: `{0}` is not a header name")]
    Header(String),
    #[error("jwks_min_refresh must not exceed jwks_max_refresh")]
    Refresh,
    #[error("{0}")]
    Tls(String),
}

pub(crate) fn build_providers(
    loaded: &LoadedConfig,
    previous: Option<&Resources>,
    resources: &mut Resources,
    metrics: &Metrics,
    errors: &mut ConfigErrors,
) -> Providers {
    let gfile = &loaded.gateway_file;
    let auth = &loaded.gateway.auth;
    let mut out = Providers::default();
    let taken = |name: &str, errors: &mut ConfigErrors, span| {
        if out_has(&out_names(auth), name) > 1 {
            errors.push(gfile.error_at(
                span,
                format!("auth provider `{name}` is defined more than once (names are shared by jwt, api_keys and external)"),
            ));
        }
    };
    for (name, spanned) in &auth.jwt {
        taken(name, errors, spanned.span());
        let built = resources.reuse_or_build(previous, name, spanned.get_ref(), |_| {
            jwt_provider(loaded, name, spanned.get_ref(), metrics)
        });
        match built {
            Ok((p, _)) => {
                out.by_name.insert(name.clone(), Provider::Jwt(p));
            }
            Err(list) => {
                for e in list {
                    errors.push(gfile.error_at(spanned.span(), format!("auth.jwt.{name}: {e}")));
                }
            }
        }
    }
    for (name, spanned) in &auth.api_keys {
        taken(name, errors, spanned.span());
        match api_keys(loaded, name, spanned.get_ref()) {
            Ok(p) => {
                out.by_name
                    .insert(name.clone(), Provider::ApiKeys(Arc::new(p)));
            }
            Err(list) => {
                for e in list {
                    errors.push(if e.line == 0 {
                        gfile.error_at(
                            spanned.span(),
                            format!("auth.api_keys.{name}: {}", e.message),
                        )
                    } else {
                        e
                    });
                }
            }
        }
    }
    for (name, spanned) in &auth.external {
        taken(name, errors, spanned.span());
        match external(resources, name, spanned.get_ref()) {
            Ok(p) => {
                out.by_name
                    .insert(name.clone(), Provider::External(Arc::new(p)));
            }
            Err(msg) => {
                let span = if msg.starts_with("unknown service") {
                    spanned.get_ref().service.span()
                } else {
                    spanned.span()
                };
                errors.push(gfile.error_at(span, format!("auth.external.{name}: {msg}")));
            }
        }
    }
    out
}

fn out_names(auth: &crate::config::AuthConfig) -> Vec<&str> {
    auth.jwt
        .keys()
        .chain(auth.api_keys.keys())
        .chain(auth.external.keys())
        .map(String::as_str)
        .collect()
}

fn out_has(names: &[&str], name: &str) -> usize {
    names.iter().filter(|n| **n == name).count()
}

fn jwt_provider(
    loaded: &LoadedConfig,
    name: &str,
    c: &JwtConfig,
    metrics: &Metrics,
) -> Result<JwtProvider, Vec<JwtConfigError>> {
    let mut errs = Vec::new();
    let mut algorithms = Vec::new();
    for a in &c.algorithms {
        let a = a.get_ref();
        if a.eq_ignore_ascii_case("none") {
            errs.push(JwtConfigError::NoneAlgorithm);
        } else {
            match Algorithm::from_str(a) {
                Ok(alg) => algorithms.push(alg),
                Err(_) => errs.push(JwtConfigError::Algorithm(a.clone())),
            }
        }
    }
    if c.algorithms.is_empty() {
        errs.push(JwtConfigError::NoAlgorithms);
    }
    if c.jwks.min_refresh > c.jwks.max_refresh {
        errs.push(JwtConfigError::Refresh);
    }
    let mut token_from = Vec::new();
    for t in &c.token_from {
        let t = t.get_ref();
        let parsed = match t.split_once(':') {
            Some(("header", h)) => HeaderName::from_str(&h.to_ascii_lowercase())
                .ok()
                .map(TokenFrom::Header),
            Some(("cookie", n)) if !n.is_empty() => Some(TokenFrom::Cookie(n.into())),
            Some(("query", n)) if !n.is_empty() => Some(TokenFrom::Query(n.into())),
            _ => None,
        };
        match parsed {
            Some(p) => token_from.push(p),
            None => errs.push(JwtConfigError::TokenFrom(t.clone())),
        }
    }
    let mut forward = Vec::new();
    for (claim, header) in &c.forward_claims {
        match HeaderName::from_str(&header.to_ascii_lowercase()) {
            Ok(h) => forward.push((Box::from(claim.as_str()), h)),
            Err(_) => errs.push(JwtConfigError::Header(header.clone())),
        }
    }
    let mut tasks = Tasks::default();
    let fits = |fam: Family, what: &'static str, errs: &mut Vec<JwtConfigError>| {
        for a in &algorithms {
            if family(*a) != fam {
                errs.push(JwtConfigError::Mismatch(*a, what));
            }
        }
    };
    let keys = match &c.keys {
        JwtKeys::Secret(s) => {
            if s.is_empty() {
                errs.push(JwtConfigError::EmptySecret);
            }
            fits(
                Family::Hmac,
                "a shared secret verifies only HS256/384/512",
                &mut errs,
            );
            Some(Keys::Static(Arc::new(Key {
                key: DecodingKey::from_secret(s.as_bytes()),
                family: Family::Hmac,
                alg: None,
            })))
        }
        JwtKeys::PublicKey(path) => {
            let path = loaded.resolve(path);
            match std::fs::read(&path) {
                Err(e) => {
                    errs.push(JwtConfigError::PublicKey(
                        path.display().to_string(),
                        e.to_string(),
                    ));
                    None
                }
                Ok(pem) => {
                    let key = DecodingKey::from_rsa_pem(&pem)
                        .map(|k| (k, Family::Rsa, "an RSA key verifies RS* and PS*"))
                        .or_else(|_| {
                            DecodingKey::from_ec_pem(&pem)
                                .map(|k| (k, Family::Ec, "an EC key verifies ES256/384"))
                        })
                        .or_else(|_| {
                            DecodingKey::from_ed_pem(&pem)
                                .map(|k| (k, Family::Ed, "an Ed25519 key verifies EdDSA"))
                        });
                    match key {
                        Ok((key, fam, what)) => {
                            fits(fam, what, &mut errs);
                            Some(Keys::Static(Arc::new(Key {
                                key,
                                family: fam,
                                alg: None,
                            })))
                        }
                        Err(_) => {
                            errs.push(JwtConfigError::PublicKey(
                                path.display().to_string(),
                                "not a PEM RSA, EC or Ed25519 public key".into(),
                            ));
                            None
                        }
                    }
                }
            }
        }
        JwtKeys::JwksUrl(_) | JwtKeys::OidcDiscovery => {
            for a in &algorithms {
                if family(*a) == Family::Hmac {
                    errs.push(JwtConfigError::Mismatch(
                        *a,
                        "HS* keys are never taken from a JWKS; use `secret`",
                    ));
                }
            }
            let (url, discovery) = match &c.keys {
                JwtKeys::JwksUrl(u) => (Some(u.clone()), false),
                _ => match &c.issuer {
                    Some(iss) => (
                        Some(format!(
                            "{}/.well-known/openid-configuration",
                            iss.trim_end_matches('/')
                        )),
                        true,
                    ),
                    None => {
                        errs.push(JwtConfigError::DiscoveryWithoutIssuer);
                        (None, true)
                    }
                },
            };
            let uri = url.and_then(|u| match u.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.authority().is_some() =>
                {
                    Some(uri)
                }
                _ => {
                    errs.push(JwtConfigError::Url(u));
                    None
                }
            });
            match uri {
                None => None,
                Some(uri) => {
                    let counters = [
                        metrics
                            .jwks_fetches_total
                            .with_label_values(&[name, "attempt"]),
                        metrics
                            .jwks_fetches_total
                            .with_label_values(&[name, "failure"]),
                    ];
                    match Jwks::new(uri, discovery, c.jwks.clone(), counters) {
                        Ok(j) => {
                            let j = Arc::new(j);
                            tasks.extend(jwks::spawn_refresh(&j));
                            Some(Keys::Jwks(j))
                        }
                        Err(e) => {
                            errs.push(JwtConfigError::Tls(e.to_string()));
                            None
                        }
                    }
                }
            }
        }
    };
    let Some(keys) = keys.filter(|_| errs.is_empty()) else {
        return Err(errs);
    };
    Ok(JwtProvider {
        name: Arc::from(name),
        verifier: JwtVerifier {
            algorithms: algorithms.into(),
            issuer: c.issuer.clone(),
            audiences: c.audiences.clone().into(),
            leeway: c.leeway,
            required: c.required_claims.clone().into(),
            max_token: usize::try_from(c.max_token_size.0).unwrap_or(usize::MAX),
            keys,
            cache: token_cache(c.cache_max_entries, c.cache_max_age.get()),
        },
        token_from: token_from.into(),
        forward: forward.into(),
        strip_authorization: c.strip_authorization,
        _tasks: tasks,
    })
}

fn api_keys(
    loaded: &LoadedConfig,
    name: &str,
    c: &ApiKeysConfig,
) -> Result<ApiKeysProvider, Vec<ConfigError>> {
    // Errors with line 0 are placed at the table by the caller.
    let here = |msg: String| ConfigError {
        file: Default::default(),
        line: 0,
        col: 0,
        message: msg,
    };
    let mut errs = Vec::new();
    let from = match (&c.header, &c.query) {
        (Some(_), Some(_)) => {
            errs.push(here("give `header` or `query`, not both".into()));
            None
        }
        (None, Some(q)) if !q.is_empty() => Some(KeyFrom::Query(q.as_str().into())),
        (None, Some(_)) => {
            errs.push(here("`query` is empty".into()));
            None
        }
        (h, None) => {
            let h = h.as_deref().unwrap_or("x-api-key").to_ascii_lowercase();
            match HeaderName::from_str(&h) {
                Ok(h) => Some(KeyFrom::Header(h)),
                Err(_) => {
                    errs.push(here(format!("`{h}` is not a header name")));
                    None
                }
            }
        }
    };
    let forward_consumer = match HeaderName::from_str(&c.forward_consumer.to_ascii_lowercase()) {
        Ok(h) => Some(h),
        Err(_) => {
            errs.push(here(format!(
                "forward_consumer `{}` is not a header name",
                c.forward_consumer
            )));
            None
        }
    };
    let mut entries: Vec<ApiKeyEntry> = c.keys.clone();
    if let Some(f) = &c.keys_file {
        let path = loaded.resolve(f.get_ref());
        match std::fs::read_to_string(&path) {
            Err(e) => errs.push(loaded.gateway_file.error_at(
                f.span(),
                format!("auth.api_keys.{name}: keys_file {}: {e}", path.display()),
            )),
            Ok(text) => match toml::from_str::<ApiKeysFile>(&text) {
                Ok(file) => entries.extend(file.keys),
                Err(e) => {
                    let file = crate::config::SourceFile {
                        path: Arc::from(path.as_path()),
                        text: Arc::from(text.as_str()),
                    };
                    errs.push(file.error_at(e.span().unwrap_or(0..0), e.message()));
                }
            },
        }
    }
    let mut keys = HashMap::new();
    for e in &entries {
        let Ok(header) = http::HeaderValue::from_str(&e.consumer) else {
            errs.push(here(format!(
                "consumer `{}` is not a valid header value (it is forwarded in `{}`)",
                e.consumer.escape_debug(),
                c.forward_consumer
            )));
            continue;
        };
        let consumer = super::api_key::Consumer {
            name: Arc::from(e.consumer.as_str()),
            header,
        };
        match parse_digest(&e.sha256) {
            Some(d) => {
                if keys.insert(d, consumer).is_some() {
                    errs.push(here(format!(
                        "the key of consumer `{}` is listed twice",
                        e.consumer
                    )));
                }
            }
            None => errs.push(here(format!(
                "the sha256 of consumer `{}` is not 64 hex digits",
                e.consumer
            ))),
        }
    }
    match (from, forward_consumer) {
        (Some(from), Some(forward_consumer)) if errs.is_empty() => Ok(ApiKeysProvider {
            name: Arc::from(name),
            keys: ApiKeys { from, keys },
            forward_consumer,
        }),
        _ => Err(errs),
    }
}

fn external(resources: &Resources, name: &str, c: &ExternalAuthConfig) -> Result<External, String> {
    let service = c.service.get_ref();
    let Some(up) = resources.get::<Upstream>(service) else {
        return Err(format!("unknown service `{service}`"));
    };
    let target = UpstreamPath::template(&c.path, &[]).map_err(|e| e.to_string())?;
    let names = |list: &[String]| -> Result<Box<[HeaderName]>, String> {
        list.iter()
            .map(|h| {
                HeaderName::from_str(&h.to_ascii_lowercase())
                    .map_err(|_| format!("`{h}` is not a header name"))
            })
            .collect()
    };
    let opts = ProxyOptions {
        target,
        forward_query: false,
        preserve_host: false,
        retry: up.retry.clone(),
        idempotent: false,
        deadline: Some(c.timeout.get()),
        upgrades: Arc::from([]),
    };
    Ok(External {
        name: Arc::from(name),
        proxy: Proxy::new(up, opts),
        forward: names(&c.forward_headers)?,
        copy: names(&c.copy_response_headers)?,
        timeout: c.timeout.get(),
        on_error: c.on_error,
    })
}
