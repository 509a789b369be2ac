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
                let k = k.to_ascii_lowercase();
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}
