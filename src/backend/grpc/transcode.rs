//! REST/JSON ⇄ protobuf messages, by reflection and the proto3 JSON mapping (prost-reflect's
//! serde support: well-known types, `Any` through the pool, enums by name, 64-bit integers as
//! strings). A request message is the JSON body (the whole message, or one field of it), then
//! the query's parameters, then the path's variables, each naming a field (`a.b` for a nested
//! one). A value from the path or the query is read the way its field is read in JSON: a
//! one-field JSON object is parsed into the message that holds the field, so every field kind,
//! `Timestamp` and wrappers included, takes the same text a JSON body would.

use std::collections::HashMap;

use bytes::Bytes;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    SerializeOptions,
};
use serde_json::{Map, Value};

use super::rule::BodyTo;

/// Why a request cannot become the method's request message: a 400 for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub(crate) struct BadMessage {
    /// `invalid_json`, `invalid_field`, `unknown_field`.
    pub(crate) code: &'static str,
    /// The field (`item.price`) or query parameter at fault, when one is.
    pub(crate) field: Option<String>,
    pub(crate) detail: String,
}

impl BadMessage {
    fn new(code: &'static str, field: Option<String>, detail: impl Into<String>) -> Self {
        BadMessage {
            code,
            field,
            detail: detail.into(),
        }
    }
}

/// What fills a request message.
pub(crate) struct Input<'a> {
    /// Path variables: a field path and its (decoded) value.
    pub(crate) vars: Vec<(Vec<&'a str>, String)>,
    /// The raw query string.
    pub(crate) query: Option<&'a str>,
    pub(crate) body: Option<&'a [u8]>,
    pub(crate) body_to: &'a BodyTo,
    /// JSON fields and query parameters the message does not have are refused.
    pub(crate) deny_unknown: bool,
}

/// Builds the request message of `desc` from `input`.
pub(crate) fn request_message(
    desc: &MessageDescriptor,
    input: &Input<'_>,
) -> Result<DynamicMessage, BadMessage> {
    let opts = DeserializeOptions::new().deny_unknown_fields(input.deny_unknown);
    let mut msg = match (input.body_to, input.body.filter(|b| !b.is_empty())) {
        (BodyTo::None, _) | (_, None) => DynamicMessage::new(desc.clone()),
        (BodyTo::Message, Some(body)) => {
            let mut de = serde_json::Deserializer::from_slice(body);
            let m = deserialize(desc, &mut de, &opts, "")?;
            de.end()
                .map_err(|e| BadMessage::new("invalid_json", None, e.to_string()))?;
            m
        }
        (BodyTo::Field(f), Some(body)) => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| BadMessage::new("invalid_json", None, e.to_string()))?;
            let field = find(desc, f).ok_or_else(|| {
                BadMessage::new("unknown_field", Some(f.to_string()), "no such field")
            })?;
            let mut obj = Map::new();
            obj.insert(field.json_name().to_owned(), v);
            deserialize(desc, Value::Object(obj), &opts, "")?
        }
    };
    let bound: Vec<String> = input.vars.iter().map(|(p, _)| p.join(".")).collect();
    if *input.body_to != BodyTo::Message {
        if let Some(q) = input.query {
            // By name, in the order first seen (a repeated field takes all of a name's values).
            let mut params: Vec<(String, Vec<String>)> = Vec::new();
            let mut index: HashMap<String, usize> = HashMap::new();
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                match index.get(k.as_ref()) {
                    Some(&i) => params[i].1.push(v.into_owned()),
                    None => {
                        index.insert(k.clone().into_owned(), params.len());
                        params.push((k.into_owned(), vec![v.into_owned()]));
                    }
                }
            }
            for (name, values) in params {
                if bound.contains(&name)
                    || matches!(input.body_to, BodyTo::Field(f) if **f == *name || name.starts_with(&format!("{f}.")))
                {
                    continue;
                }
                let path: Vec<&str> = name.split('.').collect();
                match set(&mut msg, &path, &values) {
                    Err(e) if e.code == "unknown_field" && !input.deny_unknown => {}
                    r => r?,
                }
            }
        }
    }
    for (path, value) in &input.vars {
        set(&mut msg, path, std::slice::from_ref(value))?;
    }
    Ok(msg)
}

fn deserialize<'de, D: serde::Deserializer<'de, Error = serde_json::Error>>(
    desc: &MessageDescriptor,
    de: D,
    opts: &DeserializeOptions,
    prefix: &str,
) -> Result<DynamicMessage, BadMessage> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(de, &mut track);
    DynamicMessage::deserialize_with_options(desc.clone(), de, opts).map_err(|e| {
        let path = track.path().to_string();
        let field = match (prefix.is_empty(), path.as_str()) {
            (_, ".") => (!prefix.is_empty()).then(|| prefix.to_owned()),
            (true, p) => Some(p.to_owned()),
            (false, p) => Some(format!("{prefix}.{p}")),
        };
        let text = e.to_string();
        if matches!(
            e.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        ) {
            return BadMessage::new("invalid_json", None, text);
        }
        let code = if text.starts_with("unknown field") || text.contains("unrecognized field") {
            "unknown_field"
        } else {
            "invalid_field"
        };
        BadMessage::new(code, field, text)
    })
}

/// A field by its proto name or its JSON name.
fn find(desc: &MessageDescriptor, name: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(name)
        .or_else(|| desc.get_field_by_json_name(name))
}

/// The deepest field path a parameter may name: a recursive message type would otherwise let a
/// client nest messages as deep as its query is long (and encoding recurses per level).
const MAX_DEPTH: usize = 32;

/// Sets the field at `path` from text values (several for a repeated field).
fn set(msg: &mut DynamicMessage, path: &[&str], values: &[String]) -> Result<(), BadMessage> {
    if path.len() > MAX_DEPTH {
        return Err(BadMessage::new(
            "invalid_field",
            None,
            format!("a field path of more than {MAX_DEPTH} names"),
        ));
    }
    let name = path.join(".");
    let unknown = || BadMessage::new("unknown_field", Some(name.clone()), "no such field");
    let Some((last, parents)) = path.split_last() else {
        return Err(unknown());
    };
    let mut m = msg;
    for p in parents {
        let f = find(&m.descriptor(), p).ok_or_else(unknown)?;
        if f.is_list() || f.is_map() || !matches!(f.kind(), Kind::Message(_)) {
            return Err(BadMessage::new(
                "invalid_field",
                Some(name.clone()),
                format!("`{p}` is not a message field"),
            ));
        }
        m = match m.get_field_mut(&f).as_message_mut() {
            Some(inner) => inner,
            None => return Err(unknown()),
        };
    }
    let desc = m.descriptor();
    let f = find(&desc, last).ok_or_else(unknown)?;
    if f.is_map() {
        return Err(BadMessage::new(
            "invalid_field",
            Some(name),
            "a map field cannot be set from the path or the query",
        ));
    }
    let json = if f.is_list() {
        Value::Array(values.iter().map(|v| text_json(&f, v)).collect())
    } else {
        text_json(&f, values.last().map_or("", String::as_str))
    };
    let mut obj = Map::new();
    obj.insert(f.json_name().to_owned(), json);
    let one = deserialize(&desc, Value::Object(obj), &DeserializeOptions::new(), &name).map_err(
        |mut e| {
            e.field = Some(name.clone());
            e
        },
    )?;
    m.set_field(&f, one.get_field(&f).into_owned());
    Ok(())
}

/// The JSON a text value stands for in a field: a boolean for `bool` fields (and
/// `BoolValue`), a string otherwise (the JSON mapping reads numbers, enums, bytes, timestamps
/// and durations from strings).
fn text_json(f: &FieldDescriptor, v: &str) -> Value {
    let boolean = match f.kind() {
        Kind::Bool => true,
        Kind::Message(m) => m.full_name() == "google.protobuf.BoolValue",
        _ => false,
    };
    match (boolean, v) {
        (true, "true") => Value::Bool(true),
        (true, "false") => Value::Bool(false),
        _ => Value::String(v.to_owned()),
    }
}

/// The JSON of a response message (proto3 mapping: lowerCamelCase names, 64-bit integers as
/// strings, default values left out), or of one of its fields (`response_body`).
pub(crate) fn response_json(
    msg: &DynamicMessage,
    response_body: Option<&FieldDescriptor>,
) -> Result<Vec<u8>, serde_json::Error> {
    let opts = SerializeOptions::new();
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::new(&mut out);
    match response_body {
        None => msg.serialize_with_options(&mut ser, &opts)?,
        Some(f) => {
            // The field alone, in a message of its own: written as the whole message would
            // write it; a field with its default value (left out there) as its JSON default.
            let mut one = DynamicMessage::new(msg.descriptor());
            one.set_field(f, msg.get_field(f).into_owned());
            let mut whole = Vec::new();
            one.serialize_with_options(&mut serde_json::Serializer::new(&mut whole), &opts)?;
            let mut v: Map<String, Value> = serde_json::from_slice(&whole)?;
            let field = match v.remove(f.json_name()) {
                Some(v) => v,
                None if f.is_list() => Value::Array(Vec::new()),
                None if f.is_map() || matches!(f.kind(), Kind::Message(_)) => {
                    Value::Object(Map::new())
                }
                None => {
                    let mut whole = Vec::new();
                    let all = opts.skip_default_fields(false);
                    one.serialize_with_options(&mut serde_json::Serializer::new(&mut whole), &all)?;
                    let mut v: Map<String, Value> = serde_json::from_slice(&whole)?;
                    v.remove(f.json_name()).unwrap_or(Value::Null)
                }
            };
            serde::Serialize::serialize(&field, &mut ser)?;
        }
    }
    Ok(out)
}

/// A message decoded from the wire.
pub(crate) fn decode(
    desc: &MessageDescriptor,
    bytes: Bytes,
) -> Result<DynamicMessage, prost::DecodeError> {
    DynamicMessage::decode(desc.clone(), bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> MessageDescriptor {
        crate::backend::grpc::fuzz::message().unwrap().clone()
    }

    fn json(msg: &DynamicMessage, field: Option<&str>) -> String {
        let f = field.map(|f| msg.descriptor().get_field_by_name(f).unwrap());
        String::from_utf8(response_json(msg, f.as_ref()).unwrap()).unwrap()
    }

    #[test]
    fn response_body_writes_the_field_as_the_message_would() {
        let d = desc();
        let body = BodyTo::Message;
        let input = Input {
            vars: vec![],
            query: None,
            body: Some(br#"{"inner":{"s":"q"},"c":"0"}"#),
            body_to: &body,
            deny_unknown: true,
        };
        let m = request_message(&d, &input).unwrap();
        assert_eq!(
            json(&m, Some("inner")),
            r#"{"s":"q"}"#,
            "nested defaults left out"
        );
        assert_eq!(json(&m, Some("b")), "0", "an unset scalar is its default");
        assert_eq!(json(&m, Some("tags")), "[]");
        assert_eq!(json(&m, Some("y")), "{}");
        assert_eq!(json(&m, None), r#"{"inner":{"s":"q"}}"#);
    }

    #[test]
    fn path_query_and_body_fill_the_message_in_order() {
        let d = desc();
        let body = BodyTo::Field("inner".into());
        let input = Input {
            vars: vec![(vec!["inner", "s"], "from-path".into())],
            query: Some("inner.s=from-query&b=7&e=true&tags=x&tags=y&t=2024-01-01T00:00:00Z"),
            body: Some(br#"{"s":"from-body","n":["5"]}"#),
            body_to: &body,
            deny_unknown: true,
        };
        let m = request_message(&d, &input).unwrap();
        assert_eq!(
            json(&m, None),
            r#"{"b":7,"e":true,"inner":{"s":"from-path","n":["5"]},"tags":["x","y"],"t":"2024-01-01T00:00:00Z"}"#
        );
        let bad = Input {
            query: Some("b=seven"),
            vars: vec![],
            body: None,
            body_to: &BodyTo::None,
            deny_unknown: true,
        };
        let e = request_message(&d, &bad).unwrap_err();
        assert_eq!((e.code, e.field.as_deref()), ("invalid_field", Some("b")));
    }
}
