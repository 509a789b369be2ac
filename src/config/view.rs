//! The effective configuration as `GET /admin/config` shows it: rendered once when a snapshot
//! is compiled, with secrets masked, so that a snapshot holds a document rather than the raw
//! config types it was built from.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use super::LoadedConfig;

/// The rendered `gateway` and `frontends` parts of `/admin/config`.
#[derive(Debug, Serialize)]
pub(crate) struct ConfigView {
    pub(crate) gateway: Box<RawValue>,
    /// Keyed by route file path.
    pub(crate) frontends: Box<RawValue>,
    #[serde(skip)]
    pub(crate) frontend_count: usize,
}

impl ConfigView {
    pub(crate) fn new(loaded: &LoadedConfig) -> Self {
        let mut frontends = serde_json::Map::new();
        for (file, ff) in &loaded.frontends {
            frontends.insert(
                file.path.display().to_string(),
                serde_json::to_value(ff).unwrap_or(Value::Null),
            );
        }
        let mut gateway = serde_json::to_value(&loaded.gateway).unwrap_or(Value::Null);
        redact(&mut gateway);
        let mut frontends = Value::Object(frontends);
        redact(&mut frontends);
        ConfigView {
            gateway: raw(&gateway),
            frontends: raw(&frontends),
            frontend_count: loaded.frontends.len(),
        }
    }
}

fn raw(v: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_default()
}

/// Replaces values whose key suggests a secret. Secrets reach the config through `${VAR}`, and
/// the keys that carry them (tokens, passwords, keys, secrets) are masked wherever they are.
fn redact(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                // A rate limit's `key` says what it counts by (`claim:sub`): no secret.
                if k == "rate_limits" {
                    if let Value::Object(policies) = val {
                        for p in policies.values_mut() {
                            let kept = p.get("key").cloned();
                            redact(p);
                            if let (Some(kept), Value::Object(p)) = (kept, p) {
                                p.insert("key".into(), kept);
                            }
                        }
                    }
                    continue;
                }
                let k = k.to_ascii_lowercase();
                if k == "url" || k.ends_with("_url") {
                    if let Value::String(u) = val {
                        *u = mask_userinfo(u);
                    }
                    continue;
                }
                let secret = [
                    "secret",
                    "password",
                    "token",
                    "authorization",
                    "api_key",
                    "apikey",
                    "credential",
                    "private",
                ]
                .iter()
                .any(|s| k.contains(s))
                    || k == "key";
                if secret && !val.is_object() && !val.is_null() {
                    *val = Value::String("[redacted]".into());
                } else {
                    redact(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// `scheme://user:password@host…` with the password masked (a URL's credentials come in
/// through `${VAR}` like any secret); each of a comma-separated list of URLs (a NATS cluster).
pub(crate) fn mask_userinfo(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(mask_one).collect::<Vec<_>>().join(",");
    }
    mask_one(url)
}

fn mask_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = rest[..at].split_once(':').map_or(&rest[..at], |(u, _)| u);
    let masked = if rest[..at].contains(':') {
        format!("{user}:[redacted]")
    } else {
        "[redacted]".to_owned()
    };
    format!("{scheme}://{masked}{}", &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_url_of_a_list_is_masked() {
        assert_eq!(
            mask_userinfo("nats://gw:pw1@a:4222,nats://gw:pw2@b:4222"),
            "nats://gw:[redacted]@a:4222,nats://gw:[redacted]@b:4222"
        );
    }

    #[test]
    fn redacts_secret_keys() {
        let mut v = json!({"a": {"client_secret": "s", "password": "p", "name": "n", "tls": {"key": "k.pem"}}, "list": [{"token": "t"}]});
        redact(&mut v);
        assert_eq!(v["a"]["client_secret"], "[redacted]");
        assert_eq!(v["a"]["password"], "[redacted]");
        assert_eq!(v["a"]["name"], "n");
        assert_eq!(v["a"]["tls"]["key"], "[redacted]");
        assert_eq!(v["list"][0]["token"], "[redacted]");
    }

    #[test]
    fn urls_lose_their_password_and_rate_limit_keys_stay() {
        let mut v = json!({
            "redis": {"url": "redis://app:s3cret@redis.internal:6379/0"},
            "auth": {"jwt": {"a": {"jwks_url": "https://token@id.example/jwks"}}},
            "rate_limits": {"per_user": {"key": "claim:sub", "secret_thing": "x"}},
        });
        redact(&mut v);
        assert_eq!(
            v["redis"]["url"],
            "redis://app:[redacted]@redis.internal:6379/0"
        );
        assert_eq!(
            v["auth"]["jwt"]["a"]["jwks_url"],
            "https://[redacted]@id.example/jwks"
        );
        assert_eq!(v["rate_limits"]["per_user"]["key"], "claim:sub");
        assert_eq!(v["rate_limits"]["per_user"]["secret_thing"], "[redacted]");
        assert_eq!(
            mask_userinfo("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
