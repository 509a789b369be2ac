//! A gRPC status as the client of a REST route sees it: the HTTP status of the standard
//! mapping (google.rpc.Code), and a problem+json body with the service's `grpc-message` and the
//! `google.rpc.Status` details of `grpc-status-details-bin`, each detail as JSON when its type
//! is in `[protos]`.

use base64::Engine;
use http::{HeaderMap, StatusCode};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{json, Value};

use crate::error::Problem;

/// The codes, by number: name, HTTP status, the problem's stable code.
const CODES: [(&str, u16, &str); 17] = [
    ("OK", 200, "grpc_ok"),
    ("CANCELLED", 499, "grpc_cancelled"),
    ("UNKNOWN", 500, "grpc_unknown"),
    ("INVALID_ARGUMENT", 400, "grpc_invalid_argument"),
    ("DEADLINE_EXCEEDED", 504, "grpc_deadline_exceeded"),
    ("NOT_FOUND", 404, "grpc_not_found"),
    ("ALREADY_EXISTS", 409, "grpc_already_exists"),
    ("PERMISSION_DENIED", 403, "grpc_permission_denied"),
    ("RESOURCE_EXHAUSTED", 429, "grpc_resource_exhausted"),
    ("FAILED_PRECONDITION", 400, "grpc_failed_precondition"),
    ("ABORTED", 409, "grpc_aborted"),
    ("OUT_OF_RANGE", 400, "grpc_out_of_range"),
    ("UNIMPLEMENTED", 501, "grpc_unimplemented"),
    ("INTERNAL", 500, "grpc_internal"),
    ("UNAVAILABLE", 503, "grpc_unavailable"),
    ("DATA_LOSS", 500, "grpc_data_loss"),
    ("UNAUTHENTICATED", 401, "grpc_unauthenticated"),
];

/// A status the service ended a call with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GrpcStatus {
    pub(crate) code: u32,
    /// `grpc-message`, percent-decoded (lossy where it is not UTF-8).
    pub(crate) message: String,
    /// `grpc-status-details-bin`, decoded from base64.
    pub(crate) details: Option<Vec<u8>>,
}

/// `google.rpc.Status`, to read the details (prost's own derive: no reflection needed).
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_reflect::prost_types::Any>,
}

impl GrpcStatus {
    /// The status in `h` (trailers, or the headers of a trailers-only answer).
    pub(crate) fn from_headers(h: &HeaderMap) -> Option<GrpcStatus> {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<u32>().ok()?;
        let message = h
            .get("grpc-message")
            .map(|m| {
                percent_encoding::percent_decode(m.as_bytes())
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        let details = h.get("grpc-status-details-bin").and_then(|v| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(v.as_bytes().strip_suffix(b"==").unwrap_or(v.as_bytes()))
                .ok()
                .or_else(|| {
                    base64::engine::general_purpose::STANDARD
                        .decode(v.as_bytes())
                        .ok()
                })
        });
        Some(GrpcStatus {
            code,
            message,
            details,
        })
    }

    /// The code's name (`NOT_FOUND`), `UNKNOWN` for a code gRPC does not define.
    pub(crate) fn name(&self) -> &'static str {
        entry(self.code).0
    }

    /// The HTTP status of the standard mapping.
    pub(crate) fn http_status(&self) -> StatusCode {
        StatusCode::from_u16(entry(self.code).1).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The problem a REST client gets for this status.
    pub(crate) fn problem(&self, pool: &DescriptorPool) -> Problem {
        let (name, _, code) = entry(self.code);
        let mut p = Problem::new(self.http_status(), code, "The service refused the call")
            .member("grpc_status", self.code)
            .member("grpc_code", name);
        if !self.message.is_empty() {
            p = p.member("detail", self.message.clone());
        }
        if let Some(details) = self.details_json(pool) {
            p = p.member("details", details);
        }
        p
    }

    /// The status as a JSON object: what a streamed answer ends with when the call failed.
    pub(crate) fn to_json(&self, pool: &DescriptorPool) -> Value {
        let mut v = json!({
            "code": self.code,
            "status": self.name(),
            "message": self.message,
        });
        if let Some(d) = self.details_json(pool) {
            v["details"] = d;
        }
        v
    }

    /// Each detail as its message in JSON (`@type` and fields) when `[protos]` knows its
    /// type, else `@type` and the bytes in base64.
    fn details_json(&self, pool: &DescriptorPool) -> Option<Value> {
        let status = RpcStatus::decode(self.details.as_deref()?).ok()?;
        if status.details.is_empty() {
            return None;
        }
        let list = status
            .details
            .iter()
            .map(|any| {
                let name = any.type_url.rsplit('/').next().unwrap_or_default();
                let known = pool
                    .get_message_by_name(name)
                    .and_then(|d| DynamicMessage::decode(d, any.value.as_slice()).ok())
                    .and_then(|m| serde_json::to_value(&m).ok());
                match known {
                    Some(Value::Object(mut fields)) => {
                        fields.insert("@type".into(), Value::String(any.type_url.clone()));
                        Value::Object(fields)
                    }
                    _ => json!({
                        "@type": any.type_url,
                        "value": base64::engine::general_purpose::STANDARD.encode(&any.value),
                    }),
                }
            })
            .collect();
        Some(Value::Array(list))
    }
}

fn entry(code: u32) -> (&'static str, u16, &'static str) {
    usize::try_from(code)
        .ok()
        .and_then(|i| CODES.get(i))
        .copied()
        .unwrap_or(CODES[2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_its_http_status() {
        let table = [
            (0, 200),
            (1, 499),
            (2, 500),
            (3, 400),
            (4, 504),
            (5, 404),
            (6, 409),
            (7, 403),
            (8, 429),
            (9, 400),
            (10, 409),
            (11, 400),
            (12, 501),
            (13, 500),
            (14, 503),
            (15, 500),
            (16, 401),
            (17, 500),
            (99, 500),
        ];
        for (code, http) in table {
            let s = GrpcStatus {
                code,
                message: String::new(),
                details: None,
            };
            assert_eq!(s.http_status().as_u16(), http, "code {code}");
        }
    }

    #[test]
    fn the_message_is_percent_decoded_and_details_read() {
        let status = RpcStatus {
            code: 5,
            message: "gone".into(),
            details: vec![prost_reflect::prost_types::Any {
                type_url: "type.googleapis.com/unknown.Thing".into(),
                value: vec![1, 2, 3],
            }],
        };
        let bin = base64::engine::general_purpose::STANDARD_NO_PAD.encode(status.encode_to_vec());
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert(
            "grpc-message",
            "no%20such%20item%3A%20%C3%A9".parse().unwrap(),
        );
        h.insert("grpc-status-details-bin", bin.parse().unwrap());
        let s = GrpcStatus::from_headers(&h).unwrap();
        assert_eq!(s.name(), "NOT_FOUND");
        assert_eq!(s.message, "no such item: é");
        let v = s.to_json(&DescriptorPool::new());
        assert_eq!(
            v["details"][0]["@type"],
            "type.googleapis.com/unknown.Thing"
        );
        assert_eq!(v["details"][0]["value"], "AQID");
    }
}
