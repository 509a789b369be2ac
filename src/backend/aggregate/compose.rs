//! The composed response: each call's answer (shaped) under its name or merged at the root,
//! the optional calls that failed in `errors`, written as one JSON document. An answer nothing
//! reads is copied in as the checked JSON it came as.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{Plan, State, GATEHOUSE_COMPLETE};
use crate::backend::{full, RespBody};
use crate::config::MergeMode;
use crate::error::{BoxError, Problem};

/// A call's answer: parsed, or (when nothing reads it) checked JSON copied as it came.
pub(crate) enum Answer {
    Value(Value),
    Raw(Box<RawValue>),
    /// A `for_each` call's raw answers, in input order.
    List(Vec<Answer>),
}

impl Answer {
    pub(super) fn into_value(self) -> Value {
        match self {
            Answer::Value(v) => v,
            Answer::Raw(r) => serde_json::from_str(r.get()).unwrap_or(Value::Null),
            Answer::List(items) => {
                Value::Array(items.into_iter().map(Answer::into_value).collect())
            }
        }
    }

    fn write(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        match self {
            Answer::Value(v) => serde_json::to_writer(&mut *out, v),
            Answer::Raw(r) => {
                out.extend_from_slice(r.get().as_bytes());
                Ok(())
            }
            Answer::List(items) => {
                out.push(b'[');
                for (i, a) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    a.write(out)?;
                }
                out.push(b']');
                Ok(())
            }
        }
    }
}

/// The response's members in order; a later member of the same name replaces an earlier one
/// (found through an index once there are many: a backend object merged at the root may have
/// thousands of fields).
#[derive(Default)]
struct Composed(
    Vec<(String, Answer)>,
    Option<std::collections::HashMap<String, usize>>,
);

impl Composed {
    fn insert(&mut self, key: String, value: Answer) {
        if self.1.is_none() && self.0.len() >= 16 {
            self.1 = Some(
                self.0
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (k.clone(), i))
                    .collect(),
            );
        }
        let at = match &self.1 {
            Some(index) => index.get(&key).copied(),
            None => self.0.iter().position(|(k, _)| *k == key),
        };
        match at {
            Some(i) => self.0[i].1 = value,
            None => {
                if let Some(index) = &mut self.1 {
                    index.insert(key.clone(), self.0.len());
                }
                self.0.push((key, value));
            }
        }
    }

    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        out.push(b'{');
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, k)?;
            out.push(b':');
            v.write(&mut out)?;
        }
        out.push(b'}');
        Ok(out)
    }
}

impl Plan {
    /// The response: every answer under its call's name (or merged at the root), and the
    /// optional calls that failed in `errors`.
    pub(super) fn compose(
        &self,
        state: &[State],
        mut answers: Vec<Option<Value>>,
        mut raws: Vec<Option<Answer>>,
    ) -> Result<Response<RespBody>, BoxError> {
        let mut root = Composed::default();
        let mut errors = Vec::new();
        for (i, call) in self.calls.iter().enumerate() {
            match &state[i] {
                State::Done => {
                    if let Some(raw) = raws[i].take() {
                        root.insert(call.name.to_string(), raw);
                        continue;
                    }
                    let v = match (answers[i].take().unwrap_or(Value::Null), &call.for_each) {
                        (Value::Array(items), Some(_)) => {
                            Value::Array(items.into_iter().map(|v| call.shape.apply(v)).collect())
                        }
                        (v, _) => call.shape.apply(v),
                    };
                    match (self.merge == MergeMode::Root || call.shape.flatten, v) {
                        (true, Value::Object(m)) => {
                            // `errors` at the root is the gateway's list of failed calls.
                            for (k, v) in m.into_iter().filter(|(k, _)| k != "errors") {
                                root.insert(k, Answer::Value(v));
                            }
                        }
                        (_, v) => root.insert(call.name.to_string(), Answer::Value(v)),
                    }
                }
                State::Failed(e) => {
                    let mut entry = Map::new();
                    entry.insert("call".into(), Value::from(&*call.name));
                    entry.insert("status".into(), Value::from(e.status));
                    entry.insert("code".into(), Value::from(e.code));
                    if let Some(m) = &e.missing {
                        entry.insert("detail".into(), Value::from(&**m));
                    }
                    errors.push(Value::Object(entry));
                }
                State::Waiting | State::Running => {}
            }
        }
        let complete = errors.is_empty();
        if !complete {
            root.insert("errors".into(), Answer::Value(Value::Array(errors)));
        }
        let bytes = root.to_json()?;
        if bytes.len() > self.max_body {
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "aggregate_too_large",
                "The composed response is larger than this route allows",
            )
            .into());
        }
        let mut resp = Response::new(full(bytes));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !complete {
            h.insert(
                GATEHOUSE_COMPLETE.clone(),
                HeaderValue::from_static("false"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        Ok(resp)
    }
}
