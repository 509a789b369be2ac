//! A call's `shape`: what of its JSON answer goes into the composed response. In order:
//! `target` (take a subtree), `deny` (remove fields), `allow` (keep only fields), `rename`.
//! Field paths are dotted (`address.city`); through an array they apply to each element.

use serde_json::{Map, Value};

use super::template::{JsonPath, Step};

#[derive(Debug, Clone, Default)]
pub(crate) struct Shape {
    pub(crate) target: Option<JsonPath>,
    pub(crate) deny: Vec<Vec<String>>,
    pub(crate) allow: Vec<Vec<String>>,
    pub(crate) rename: Vec<(Vec<String>, String)>,
    pub(crate) flatten: bool,
}

/// A dotted field path, checked: `a.b.c` (no indices: arrays are walked through).
pub(crate) fn field_path(s: &str) -> Result<Vec<String>, String> {
    let parts: Vec<String> = s.split('.').map(str::to_owned).collect();
    if parts.iter().any(|p| p.is_empty() || p.contains(['[', ']'])) {
        return Err(format!("`{s}` is not a field path (write `a.b.c`)"));
    }
    Ok(parts)
}

impl Shape {
    /// Whether it leaves an answer as it is.
    pub(crate) fn is_identity(&self) -> bool {
        self.target.is_none()
            && self.deny.is_empty()
            && self.allow.is_empty()
            && self.rename.is_empty()
            && !self.flatten
    }

    pub(crate) fn apply(&self, v: Value) -> Value {
        let mut v = match &self.target {
            Some(t) if !t.0.contains(&Step::Each) => t.get(&v).cloned().unwrap_or(Value::Null),
            _ => v,
        };
        for path in &self.deny {
            remove(&mut v, path);
        }
        if !self.allow.is_empty() {
            v = keep(
                &v,
                &self.allow.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            );
        }
        for (path, to) in &self.rename {
            rename(&mut v, path, to);
        }
        v
    }
}

fn remove(v: &mut Value, path: &[String]) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| remove(i, path)),
        Value::Object(map) => match path {
            [last] => {
                map.remove(last);
            }
            [first, rest @ ..] => {
                if let Some(child) = map.get_mut(first) {
                    remove(child, rest);
                }
            }
            [] => {}
        },
        _ => {}
    }
}

/// Only the fields on `paths` (a field whose path ends there is kept whole).
fn keep(v: &Value, paths: &[&[String]]) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|i| keep(i, paths)).collect()),
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, child) in map {
                let below: Vec<&[String]> = paths
                    .iter()
                    .filter(|p| p.first().is_some_and(|f| f == k))
                    .map(|p| &p[1..])
                    .collect();
                if below.is_empty() {
                    continue;
                }
                if below.iter().any(|p| p.is_empty()) {
                    out.insert(k.clone(), child.clone());
                } else {
                    out.insert(k.clone(), keep(child, &below));
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

fn rename(v: &mut Value, path: &[String], to: &str) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| rename(i, path, to)),
        Value::Object(map) => match path {
            [last] => {
                if let Some(x) = map.remove(last) {
                    map.insert(to.to_owned(), x);
                }
            }
            [first, rest @ ..] => {
                if let Some(child) = map.get_mut(first) {
                    rename(child, rest, to);
                }
            }
            [] => {}
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Vec<String> {
        field_path(s).unwrap()
    }

    #[test]
    fn every_operator() {
        let body = json!({"data": {"items": [
            {"id": 1, "status": "paid", "total": 9, "secret": "x", "addr": {"city": "Oslo", "zip": "0150"}},
            {"id": 2, "status": "open", "total": 5, "secret": "y", "addr": {"city": "Rome", "zip": "00100"}}
        ]}});
        let shape = Shape {
            target: Some(JsonPath::parse("data.items").unwrap()),
            deny: vec![p("secret")],
            allow: vec![p("id"), p("status"), p("addr.city")],
            rename: vec![
                (p("status"), "state".into()),
                (p("addr.city"), "town".into()),
            ],
            flatten: false,
        };
        assert_eq!(
            shape.apply(body),
            json!([
                {"id": 1, "state": "paid", "addr": {"town": "Oslo"}},
                {"id": 2, "state": "open", "addr": {"town": "Rome"}}
            ])
        );
        // A target that is not there is null.
        let none = Shape {
            target: Some(JsonPath::parse("nope").unwrap()),
            ..Shape::default()
        };
        assert_eq!(none.apply(json!({"a": 1})), Value::Null);
        assert!(field_path("a..b").is_err());
        assert!(field_path("a[0]").is_err());
    }
}
