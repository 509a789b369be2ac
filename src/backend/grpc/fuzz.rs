//! The fuzz target `grpc_transcode`: what a client sends to a transcoded route (path, query,
//! JSON body), what a gRPC-Web client sends (a base64 body, frames) and what a service answers
//! (frames, a status with details) go through the same code the request path uses, on a
//! message with every kind of field.

use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use super::frame::{Decoder, Frame};
use super::rule::{BodyTo, Template};
use super::status::GrpcStatus;
use super::transcode::{self, Input};

const PROTO: &str = r#"
syntax = "proto3";
package fuzz;
import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
enum E { E_ZERO = 0; E_ONE = 1; }
message Inner { string s = 1; repeated int64 n = 2; Inner next = 3; }
message M {
  string a = 1; int32 b = 2; int64 c = 3; uint64 d = 4; bool e = 5; double f = 6; float g = 7;
  bytes h = 8; E i = 9; Inner inner = 10; repeated string tags = 11; map<string, int32> m = 12;
  google.protobuf.Timestamp t = 13; google.protobuf.Duration du = 14;
  google.protobuf.Int64Value w = 15; google.protobuf.BoolValue bw = 16;
  google.protobuf.Struct st = 17; google.protobuf.Value v = 18; google.protobuf.Any any = 19;
  google.protobuf.FieldMask fm = 20; sint32 si = 21; fixed64 fx = 22;
  oneof choice { string x = 23; Inner y = 24; }
}
"#;

struct Source;

impl FileResolver for Source {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == "fuzz.proto" {
            File::from_source(name, PROTO)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

pub(super) fn message() -> Option<&'static MessageDescriptor> {
    static M: OnceLock<Option<(DescriptorPool, MessageDescriptor)>> = OnceLock::new();
    M.get_or_init(|| {
        let mut chain = ChainFileResolver::new();
        chain.add(Source);
        chain.add(GoogleFileResolver::new());
        let mut c = protox::Compiler::with_file_resolver(chain);
        c.open_file("fuzz.proto").ok()?;
        let pool = c.descriptor_pool();
        let m = pool.get_message_by_name("fuzz.M")?;
        Some((pool, m))
    })
    .as_ref()
    .map(|(_, m)| m)
}

pub(crate) fn fuzz_transcode(data: &[u8]) {
    let Some(desc) = message() else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let path = parts.next().unwrap_or_default();
    let query = parts.next();
    let body = parts.next().unwrap_or_default();
    // The input as a template (from a .proto: must not panic), and a request path matched.
    let _ = Template::parse(path);
    let vars = Template::parse("/v1/{inner.s}/{a=x/*}/{rest=**}:go")
        .ok()
        .and_then(|t| {
            t.matches(path).and_then(Result::ok).map(|v| {
                v.into_iter()
                    .map(|(f, v)| (f.iter().map(|s| s.to_string()).collect::<Vec<_>>(), v))
                    .collect::<Vec<_>>()
            })
        })
        .unwrap_or_default();
    let vars: Vec<(Vec<&str>, String)> = vars
        .iter()
        .map(|(f, v)| (f.iter().map(String::as_str).collect(), v.clone()))
        .collect();
    for (body_to, deny) in [
        (BodyTo::Message, true),
        (BodyTo::Field("inner".into()), false),
        (BodyTo::None, true),
    ] {
        let input = Input {
            vars: vars.clone(),
            query,
            body: Some(body.as_bytes()),
            body_to: &body_to,
            deny_unknown: deny,
        };
        if let Ok(msg) = transcode::request_message(desc, &input) {
            let wire = msg.encode_to_vec();
            if let Ok(back) = transcode::decode(desc, Bytes::from(wire)) {
                let _ = transcode::response_json(&back, None);
                let _ = transcode::response_json(&back, desc.get_field_by_name("inner").as_ref());
            }
        }
    }
    // What a service sends: frames and messages of any bytes, a status's details.
    let mut d = Decoder::new(1 << 16);
    d.push(data);
    while let Ok(Some(f)) = d.next() {
        if let Frame::Message(m) = f {
            if let Ok(msg) = transcode::decode(desc, m) {
                let _ = transcode::response_json(&msg, None);
            }
        }
    }
    let _ = super::stream::decode_text(data);
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", http::HeaderValue::from_static("3"));
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        h.insert("grpc-message", v.clone());
        h.insert("grpc-status-details-bin", v);
    }
    if let Some(s) = GrpcStatus::from_headers(&h) {
        let _ = s.to_json(desc.parent_pool());
    }
}
