//! A JWKS key set: fetched over HTTP(S) (the upstream TLS stack, system roots), refreshed in
//! the background at the interval the document's `Cache-Control: max-age` asks for (bounded by
//! `jwks_min_refresh` and `jwks_max_refresh`), and refetched on an unknown `kid` — one fetch
//! at a time (single flight) and at most one per `jwks_refetch_cooldown`, so a flood of random
//! kids cannot flood the identity provider. A failed refresh keeps the last good keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

use super::jwt::{family_of_jwk, Family};
use crate::config::JwksSettings;

type FetchClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One verification key.
pub(crate) struct Key {
    pub(crate) key: DecodingKey,
    pub(crate) family: Family,
    /// The JWK's `alg`, when it names one: the token's must then be the same.
    pub(crate) alg: Option<Algorithm>,
}

/// The keys of one fetch, by `kid` (keys without a `kid` are tried in turn).
#[derive(Default)]
pub(crate) struct KeySet {
    pub(crate) by_kid: HashMap<String, Arc<Key>>,
    pub(crate) unnamed: Vec<Arc<Key>>,
}

impl KeySet {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_kid.is_empty() && self.unnamed.is_empty()
    }
}

/// Why keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("JWKS fetch failed: {0}")]
    Http(String),
    #[error("JWKS answered {0}")]
    Status(u16),
    #[error("JWKS document is not valid: {0}")]
    Document(String),
    #[error("JWKS fetch timed out")]
    Timeout,
}

pub(crate) struct Jwks {
    /// The document's URL; for OIDC discovery, found through the issuer's metadata.
    source: Source,
    settings: JwksSettings,
    keys: ArcSwap<KeySet>,
    /// When the last fetch started; held while one runs (single flight).
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    client: FetchClient,
    pub(crate) fetches: prometheus::IntCounter,
    pub(crate) failures: prometheus::IntCounter,
}

enum Source {
    Url(Uri),
    /// `{issuer}/.well-known/openid-configuration`, read for its `jwks_uri`.
    Discovery(Uri),
}

impl Jwks {
    pub(crate) fn new(
        url: Uri,
        discovery: bool,
        settings: JwksSettings,
        counters: [prometheus::IntCounter; 2],
    ) -> Result<Self, crate::upstream::tls::TlsConfigError> {
        let tls = crate::upstream::tls::client_config(None, |p| p.to_path_buf())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.timeout.get()));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let [fetches, failures] = counters;
        Ok(Jwks {
            source: if discovery {
                Source::Discovery(url)
            } else {
                Source::Url(url)
            },
            settings,
            keys: ArcSwap::from_pointee(KeySet::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            client,
            fetches,
            failures,
        })
    }

    /// The current keys (possibly empty: never fetched yet, or every fetch failed).
    pub(crate) fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Fetches the keys again unless a fetch ran within the cooldown (or is running: then
    /// this waits for it). Returns whether keys are there afterwards.
    pub(crate) async fn refetch(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        let cooldown = self.settings.refetch_cooldown.get();
        if last.is_some_and(|t| t.elapsed() < cooldown) {
            return !self.keys.load().is_empty();
        }
        *last = Some(Instant::now());
        let _ = self.fetch_and_store().await;
        !self.keys.load().is_empty()
    }

    /// One fetch; on success the keys are replaced. Returns the refresh interval asked for.
    async fn fetch_and_store(&self) -> Result<Duration, FetchError> {
        self.fetches.inc();
        let result = tokio::time::timeout(self.settings.timeout.get(), self.fetch())
            .await
            .unwrap_or(Err(FetchError::Timeout));
        match result {
            Ok((set, max_age)) => {
                self.keys.store(Arc::new(set));
                Ok(self.bounded(max_age))
            }
            Err(e) => {
                self.failures.inc();
                tracing::warn!(error = %e, "JWKS refresh failed; the last good keys stay");
                Err(e)
            }
        }
    }

    fn bounded(&self, max_age: Option<Duration>) -> Duration {
        let (min, max) = (
            self.settings.min_refresh.get(),
            self.settings.max_refresh.get(),
        );
        max_age.unwrap_or(max).clamp(min, max.max(min))
    }

    async fn fetch(&self) -> Result<(KeySet, Option<Duration>), FetchError> {
        let url = match &self.source {
            Source::Url(u) => u.clone(),
            Source::Discovery(meta) => {
                #[derive(serde::Deserialize)]
                struct Metadata {
                    jwks_uri: String,
                }
                let (body, _) = self.get(meta.clone()).await?;
                let m: Metadata = serde_json::from_slice(&body)
                    .map_err(|e| FetchError::Document(e.to_string()))?;
                m.jwks_uri
                    .parse()
                    .map_err(|_| FetchError::Document("jwks_uri is not a URL".into()))?
            }
        };
        let (body, max_age) = self.get(url).await?;
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| FetchError::Document(e.to_string()))?;
        Ok((key_set(&set.keys), max_age))
    }

    async fn get(&self, url: Uri) -> Result<(Bytes, Option<Duration>), FetchError> {
        let req = Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "gatehouse-jwks")
            .body(Full::new(Bytes::new()))
            .map_err(|e| FetchError::Http(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let max_age = resp
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        // A key set is small: more than 1 MiB is not one.
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?
            .to_bytes();
        Ok((body, max_age))
    }
}

/// Keeps a key set fresh: the first fetch at once, then at the interval each answer asks for
/// (after a failure, the minimum). Holds only a weak reference, so it ends with the provider.
pub(crate) fn spawn_refresh(jwks: &Arc<Jwks>) -> Option<tokio::task::JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    let weak = Arc::downgrade(jwks);
    Some(handle.spawn(async move {
        loop {
            let Some(jwks) = weak.upgrade() else { return };
            let wait = {
                let mut last = jwks.last_fetch.lock().await;
                *last = Some(Instant::now());
                match jwks.fetch_and_store().await {
                    Ok(interval) => interval,
                    Err(_) => jwks.settings.min_refresh.get(),
                }
            };
            drop(jwks);
            tokio::time::sleep(wait).await;
        }
    }))
}

/// `max-age` of a `Cache-Control` value (`no-store`/`no-cache` ask for the minimum).
fn max_age(v: &str) -> Option<Duration> {
    let mut out = None;
    for d in v.split(',') {
        let d = d.trim();
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if let Some((k, n)) = d.split_once('=') {
            if k.trim().eq_ignore_ascii_case("max-age") {
                out = n
                    .trim()
                    .trim_matches('"')
                    .parse()
                    .ok()
                    .map(Duration::from_secs);
            }
        }
    }
    out
}

/// The usable keys of a JWKS (keys for encryption, or of unknown types, are skipped).
pub(crate) fn key_set(keys: &[Jwk]) -> KeySet {
    let mut set = KeySet::default();
    for jwk in keys {
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        let Some(family) = family_of_jwk(jwk) else {
            continue;
        };
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let key = Arc::new(Key { key, family, alg });
        match &jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid.clone(), key);
            }
            None => set.unnamed.push(key),
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age("public, max-age=600"),
            Some(Duration::from_secs(600))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=abc"), None);
    }
}
