//! JWT verification with `jsonwebtoken`: the token's `alg` must be on the provider's allow-list
//! and of the key's family (no HS256 "signed" with an RSA public key; `none` cannot be listed or
//! parsed); `kid` is only a lookup key; `jku`, `x5u` and an embedded `jwk` are never used.
//! `exp`, `nbf` (and `iat` not in the future) are checked with the leeway, `iss` and `aud` as
//! configured, and `required_claims` must be present. Tokens over `max_token_size` are refused
//! before any parsing.
//!
//! Verified tokens are cached (same bytes → same claims) until their `exp`, bounded by
//! `cache_max_age` and `cache_max_entries`; a cached token whose key has left the JWKS is
//! verified again (and so rejected).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::{Jwks, Key};
use super::AuthFailure;

/// Key families: an algorithm verifies only with a key of its family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

pub(crate) fn family(alg: Algorithm) -> Family {
    use Algorithm::*;
    match alg {
        HS256 | HS384 | HS512 => Family::Hmac,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        ES256 | ES384 => Family::Ec,
        EdDSA => Family::Ed,
    }
}

pub(crate) fn family_of_jwk(jwk: &Jwk) -> Option<Family> {
    Some(match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Family::Rsa,
        AlgorithmParameters::EllipticCurve(_) => Family::Ec,
        AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
        // Symmetric keys are never taken from a JWKS: anyone who can read it could sign.
        AlgorithmParameters::OctetKey(_) => return None,
    })
}

/// Where a provider's keys are.
pub(crate) enum Keys {
    /// `public_key` or `secret`: one key.
    Static(Arc<Key>),
    Jwks(Arc<Jwks>),
}

/// What a verified token says.
pub(crate) struct Verified {
    /// The token itself: the cache is keyed by a fingerprint, and a hit must be this token.
    token: Box<str>,
    pub(crate) claims: Arc<Map<String, Value>>,
    /// The provider's `forward_claims` as header values, made at the first use of this
    /// token (not on each request that repeats it).
    pub(crate) forwarded: std::sync::OnceLock<Box<[Option<http::HeaderValue>]>>,
    /// Seconds since the epoch.
    exp: Option<u64>,
    kid: Option<String>,
}

pub(crate) struct JwtVerifier {
    pub(crate) algorithms: Box<[Algorithm]>,
    pub(crate) issuer: Option<String>,
    pub(crate) audiences: Box<[String]>,
    pub(crate) leeway: Duration,
    pub(crate) required: Box<[String]>,
    pub(crate) max_token: usize,
    pub(crate) keys: Keys,
    pub(crate) cache: TokenCache,
}

/// Verified tokens, keyed by a 64-bit fingerprint: the token's last 8 bytes (the end of its
/// signature, which no one can choose for a token that verifies) with its length. A hit
/// counts only if the stored token is the same bytes, so a fingerprint shared by another
/// token is a miss, never another token's claims — and only verified tokens are inserted, so
/// a client cannot push entries out with made-up ones. (Keyed by the token itself, the cache
/// hashed all of its ~300 bytes on every lookup: ~1 300 instructions with SipHash, ~600 with
/// XXH3; this costs a few.)
pub(crate) struct TokenCache {
    map: moka::sync::Cache<u64, Arc<Verified>, SeededXx>,
}

impl TokenCache {
    fn fingerprint(&self, b: &[u8]) -> u64 {
        let mut tail = [0u8; 8];
        let n = b.len().min(8);
        tail[8 - n..].copy_from_slice(&b[b.len() - n..]);
        u64::from_le_bytes(tail) ^ ((b.len() as u64) << 48)
    }

    fn get(&self, token: &[u8]) -> Option<Arc<Verified>> {
        self.map
            .get(&self.fingerprint(token))
            .filter(|v| v.token.as_bytes() == token)
    }

    fn insert(&self, v: Arc<Verified>) {
        self.map.insert(self.fingerprint(v.token.as_bytes()), v);
    }

    fn invalidate(&self, token: &[u8]) {
        self.map.invalidate(&self.fingerprint(token));
    }
}

/// Hashes the (already random) fingerprints for the cache's table.
#[derive(Clone)]
pub(crate) struct SeededXx(u64);

impl std::hash::BuildHasher for SeededXx {
    type Hasher = twox_hash::XxHash64;
    fn build_hasher(&self) -> twox_hash::XxHash64 {
        twox_hash::XxHash64::with_seed(self.0)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl JwtVerifier {
    /// Verifies `token`, from the cache when it was verified before. Bytes: a cached token is
    /// found without checking its UTF-8 (~300 instructions for a 300-byte token).
    pub(crate) async fn verify(&self, token: &[u8]) -> Result<Arc<Verified>, AuthFailure> {
        if token.len() > self.max_token {
            return Err(AuthFailure::Invalid("token too large"));
        }
        if let Some(v) = self.cache.get(token) {
            let fresh = v
                .exp
                .is_none_or(|exp| exp + self.leeway.as_secs() > now_secs());
            if fresh && self.key_still_there(v.kid.as_deref()) {
                return Ok(v);
            }
            self.cache.invalidate(token);
        }
        let token =
            std::str::from_utf8(token).map_err(|_| AuthFailure::Invalid("malformed token"))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthFailure::Invalid("malformed token"))?;
        let alg = header.alg;
        if !self.algorithms.contains(&alg) {
            return Err(AuthFailure::Invalid("algorithm not allowed"));
        }
        let key = self.key_for(header.kid.as_deref(), alg).await?;
        let claims = self.check(token, alg, &key.key)?;
        let exp = claims.get("exp").and_then(Value::as_u64);
        let verified = Arc::new(Verified {
            forwarded: std::sync::OnceLock::new(),
            token: Box::from(token),
            claims: Arc::new(claims),
            exp,
            kid: header.kid,
        });
        self.cache.insert(verified.clone());
        Ok(verified)
    }

    fn key_still_there(&self, kid: Option<&str>) -> bool {
        match (&self.keys, kid) {
            (Keys::Static(_), _) => true,
            (Keys::Jwks(j), Some(kid)) => j.keys().by_kid.contains_key(kid),
            (Keys::Jwks(j), None) => !j.keys().unnamed.is_empty(),
        }
    }

    /// The key to verify a token of `alg` with `kid`: a JWKS is refetched (single flight,
    /// cooldown) when it does not know the kid.
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<Arc<Key>, AuthFailure> {
        let fits = |k: &Arc<Key>| k.family == family(alg) && k.alg.is_none_or(|a| a == alg);
        let jwks = match &self.keys {
            Keys::Static(k) if fits(k) => return Ok(k.clone()),
            Keys::Static(_) => return Err(AuthFailure::Invalid("algorithm does not fit the key")),
            Keys::Jwks(j) => j,
        };
        let pick = |set: &super::jwks::KeySet| match kid {
            Some(kid) => set.by_kid.get(kid).filter(|k| fits(k)).cloned(),
            None => set.unnamed.iter().find(|k| fits(k)).cloned(),
        };
        if let Some(k) = pick(&jwks.keys()) {
            return Ok(k);
        }
        let have_keys = jwks.refetch().await;
        if let Some(k) = pick(&jwks.keys()) {
            return Ok(k);
        }
        if have_keys {
            Err(AuthFailure::Invalid("unknown key"))
        } else {
            Err(AuthFailure::Unavailable("no verification keys"))
        }
    }

    fn check(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
    ) -> Result<Map<String, Value>, AuthFailure> {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.required_spec_claims.clear();
        v.required_spec_claims.insert("exp".to_owned());
        match &self.issuer {
            Some(iss) => v.set_issuer(&[iss]),
            None => v.iss = None,
        }
        if self.audiences.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audiences);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            AuthFailure::Invalid(match e.kind() {
                ExpiredSignature => "token expired",
                ImmatureSignature => "token not yet valid",
                InvalidIssuer => "wrong issuer",
                InvalidAudience => "wrong audience",
                InvalidSignature => "bad signature",
                MissingRequiredClaim(_) => "missing claim",
                InvalidAlgorithm => "algorithm does not fit the key",
                _ => "invalid token",
            })
        })?;
        let claims = data.claims;
        if self.issuer.is_some() && !claims.contains_key("iss") {
            return Err(AuthFailure::Invalid("wrong issuer"));
        }
        if let Some(iat) = claims.get("iat").and_then(Value::as_u64) {
            if iat > now_secs() + self.leeway.as_secs() {
                return Err(AuthFailure::Invalid("token issued in the future"));
            }
        }
        if let Some(missing) = self.required.iter().find(|c| !claims.contains_key(*c)) {
            tracing::debug!(claim = %missing, "token lacks a required claim");
            return Err(AuthFailure::Invalid("missing claim"));
        }
        Ok(claims)
    }
}

/// A token cache bounded in entries, each entry kept at most `max_age`.
pub(crate) fn token_cache(entries: u64, max_age: Duration) -> TokenCache {
    TokenCache {
        map: moka::sync::Cache::builder()
            .max_capacity(entries)
            .time_to_live(max_age)
            .build_with_hasher(SeededXx(fastrand::u64(..))),
    }
}
