//! `grpc = { service, method, … }`: a route answered by a gRPC service.
//!
//! - **Transcoding** (`method` given): a REST/JSON request becomes the method's request message
//!   (`transcode.rs`, by the method's `google.api.http` bindings in `rule.rs` when one matches
//!   the request, else path parameters and query by field name and the JSON body as the
//!   message), sent as a unary gRPC call through the service's `Proxy` (so discovery,
//!   balancing, retries, breaker, bulkhead and `grpc-timeout` from the route's deadline apply);
//!   the answer becomes JSON, a gRPC status a problem+json with the standard HTTP mapping
//!   (`status.rs`), a server stream NDJSON or Server-Sent Events (`stream.rs`).
//! - **Passthrough** (no `method`): native gRPC goes to the service as it is (streams both
//!   ways, trailers); gRPC-Web (binary and text) is turned into gRPC and its answer back into
//!   gRPC-Web, trailers in the body, so a browser needs no Envoy in between.

mod build;
mod frame;
mod fuzz;
mod protos;
mod rule;
mod status;
mod stream;
mod transcode;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use prost::Message;
use prost_reflect::{DescriptorPool, FieldDescriptor, MessageDescriptor};
use tower::ServiceExt;

use self::rule::{Binding, BodyTo};
use self::status::GrpcStatus;
use self::stream::{Format, JsonStream, WebBody};
use self::transcode::{BadMessage, Input};
use super::proxy::Proxy;
use super::RespBody;
use crate::body::{req_full, ReqBody};
use crate::context::Exchange;
use crate::error::{BoxError, GatewayError, Problem};

pub(crate) use build::{build, GrpcFacts};
pub(crate) use frame::encode as frame_message;
pub(crate) use fuzz::fuzz_transcode;
pub(crate) use protos::{compile as compile_protos, proto_dirs};

static GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
static TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
static NDJSON: HeaderValue = HeaderValue::from_static("application/x-ndjson");
static SSE: HeaderValue = HeaderValue::from_static("text/event-stream");
static JSON: HeaderValue = HeaderValue::from_static("application/json");

#[derive(Clone)]
pub(crate) struct Grpc(Arc<Plan>);

enum Plan {
    Transcode(Transcode),
    Passthrough(Passthrough),
}

/// A route that translates REST/JSON to one method (or to a service's methods by their rules).
struct Transcode {
    pool: DescriptorPool,
    targets: Box<[Target]>,
    /// One named method: when none of its rules matches, parameters fill fields by name.
    by_name: bool,
    /// The frontend's prefix, stripped before a rule's template is matched.
    prefix_len: usize,
    deny_unknown: bool,
    max_message: usize,
    request_headers: Box<[HeaderName]>,
    response_headers: Box<[HeaderName]>,
}

/// One method.
struct Target {
    /// `/package.Service/Method`.
    path: Uri,
    input: MessageDescriptor,
    output: MessageDescriptor,
    server_streaming: bool,
    bindings: Box<[(Binding, Option<FieldDescriptor>)]>,
    /// The service's proxy, idempotent when the method is marked so (or the route is).
    proxy: Proxy,
}

/// A route that passes gRPC through and translates gRPC-Web.
struct Passthrough {
    proxy: Proxy,
}

/// The method a request goes to, the binding that matched it (none: by field name) and the
/// path variables.
type Selected<'a> = (
    &'a Target,
    Option<&'a (Binding, Option<FieldDescriptor>)>,
    Vec<(Vec<&'a str>, String)>,
);

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

impl tower::Service<Request<ReqBody>> for Grpc {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let plan = self.0.clone();
        Box::pin(async move {
            match &*plan {
                Plan::Transcode(t) => t.call(req).await,
                Plan::Passthrough(p) => p.call(req).await,
            }
        })
    }
}

fn bad_message(e: BadMessage) -> BoxError {
    let mut p = Problem::new(
        StatusCode::BAD_REQUEST,
        match e.code {
            "invalid_json" => "invalid_json",
            "unknown_field" => "unknown_field",
            _ => "invalid_field",
        },
        "The request does not fit the method's request message",
    )
    .member("detail", e.detail.clone());
    if let Some(f) = &e.field {
        p = p.member("field", f.clone());
    }
    p.into()
}

fn bad_response(why: impl Into<BoxError>) -> BoxError {
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "grpc_bad_response",
        "The service's answer is not a valid gRPC response",
    )
    .caused_by(why)
    .into()
}

impl Transcode {
    /// The method and binding a request goes to, with its path variables.
    fn select<'a>(
        &'a self,
        method: &Method,
        path: &'a str,
        x: &'a Exchange,
    ) -> Result<Selected<'a>, BoxError> {
        // Verbs of the bindings whose template matches with another verb: 405's `Allow`.
        let mut allow: Vec<&Method> = Vec::new();
        for t in self.targets.iter() {
            for b in t.bindings.iter() {
                let matched = b.0.template.matches(path);
                if b.0.method != *method {
                    if matched.is_some() && !allow.contains(&&b.0.method) {
                        allow.push(&b.0.method);
                    }
                    continue;
                }
                match matched {
                    None => continue,
                    Some(Err(())) => {
                        return Err(Problem::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_parameter",
                            "A value of the request path is not UTF-8 once decoded",
                        )
                        .into())
                    }
                    Some(Ok(vars)) => {
                        let vars = vars
                            .into_iter()
                            .map(|(f, v)| (f.iter().map(|s| &**s).collect(), v))
                            .collect();
                        return Ok((t, Some(b), vars));
                    }
                }
            }
        }
        // A method with rules is reached by field name only with one of its rules' verbs (a
        // GET must never call a method whose rule says DELETE).
        let by_name = self.by_name
            && self.targets.first().is_some_and(|t| {
                let verbs: Vec<&Method> = t.bindings.iter().map(|b| &b.0.method).collect();
                let ok = verbs.is_empty() || verbs.contains(&method);
                if !ok {
                    for v in verbs {
                        if !allow.contains(&v) {
                            allow.push(v);
                        }
                    }
                }
                ok
            });
        if !by_name && !allow.is_empty() {
            let list: Vec<&str> = allow.iter().map(|m| m.as_str()).collect();
            let allow =
                HeaderValue::from_str(&list.join(", ")).unwrap_or(HeaderValue::from_static("GET"));
            return Err(GatewayError::MethodNotAllowed { allow }.into());
        }
        if by_name {
            let mut vars = Vec::new();
            for (name, raw) in x.params() {
                let Ok(v) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_parameter",
                        "A value of the request path is not UTF-8 once decoded",
                    )
                    .into());
                };
                vars.push((name.split('.').collect(), v.into_owned()));
            }
            return Ok((&self.targets[0], None, vars));
        }
        Err(GatewayError::NoRoute.into())
    }

    async fn call(&self, req: Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let Some(x) = req.extensions().get::<Exchange>().cloned() else {
            return Err("a gRPC request has no exchange".into());
        };
        let full = x.path();
        let path = match full.get(self.prefix_len..) {
            Some(p) if p.starts_with('/') => p,
            _ => "/",
        };
        let (target, binding, vars) = self.select(req.method(), path, &x)?;
        let default_body = if matches!(*req.method(), Method::GET | Method::HEAD | Method::DELETE) {
            BodyTo::None
        } else {
            BodyTo::Message
        };
        let body_to = binding.map_or(&default_body, |b| &b.0.body);
        let response_body = binding.and_then(|b| b.1.as_ref());
        let sse = req.headers().get_all(header::ACCEPT).iter().any(|v| {
            v.as_bytes()
                .windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"text/event-stream"))
        });
        let (parts, body) = req.into_parts();
        let body = if *body_to == BodyTo::None {
            Bytes::new()
        } else {
            body.collect().await?.to_bytes()
        };
        let input = Input {
            vars,
            query: x.query(),
            body: Some(&body),
            body_to,
            deny_unknown: self.deny_unknown,
        };
        let msg = transcode::request_message(&target.input, &input).map_err(bad_message)?;
        let encoded = msg.encode_to_vec();
        if encoded.len() > self.max_message {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "message_too_large",
                "The request message is larger than this route allows",
            )
            .member("max_message_size", self.max_message)
            .into());
        }
        let mut up = Request::new(req_full(frame::encode(&encoded)));
        *up.method_mut() = Method::POST;
        *up.uri_mut() = target.path.clone();
        let h = up.headers_mut();
        for name in self.request_headers.iter() {
            let binary = name.as_str().ends_with("-bin");
            for v in parts.headers.get_all(name) {
                // Binary metadata travels in base64; anything else would reach the service as
                // bytes it did not expect.
                if binary && !is_base64(v.as_bytes()) {
                    return Err(Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_header",
                        "A binary (-bin) header is not base64",
                    )
                    .member("header", name.as_str())
                    .into());
                }
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(header::CONTENT_TYPE, GRPC.clone());
        h.insert(header::TE, TRAILERS.clone());
        up.extensions_mut().insert(x.clone());
        let resp = target.proxy.clone().oneshot(up).await?;
        let (rparts, rbody) = resp.into_parts();
        if rparts.status != StatusCode::OK
            || !rparts
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
        {
            return Err(bad_response(format!(
                "HTTP status {} with content-type {:?}",
                rparts.status,
                rparts.headers.get(header::CONTENT_TYPE)
            )));
        }
        // A trailers-only answer carries its status in the headers.
        let head_status = GrpcStatus::from_headers(&rparts.headers);
        if let Some(s) = head_status.as_ref().filter(|s| s.code != 0) {
            return Err(s.problem(&self.pool).into());
        }
        let mut headers = HeaderMap::new();
        self.copy_metadata(&rparts.headers, &mut headers);
        if target.server_streaming {
            let format = if sse { Format::Sse } else { Format::Ndjson };
            let body = JsonStream::new(
                rbody,
                self.max_message,
                target.output.clone(),
                response_body.cloned(),
                self.pool.clone(),
                format,
            )
            .with_status(head_status);
            headers.insert(
                header::CONTENT_TYPE,
                if sse { SSE.clone() } else { NDJSON.clone() },
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            let mut resp = Response::new(RespBody::Stream(BoxBody::new(body)));
            *resp.headers_mut() = headers;
            return Ok(resp);
        }
        let collected = http_body_util::Limited::new(rbody, self.max_message.saturating_add(5))
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    bad_response("the response message is over max_message_size")
                } else {
                    Box::new(GatewayError::UpstreamFailed(e)) as BoxError
                }
            })?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = GrpcStatus::from_headers(&trailers)
            .or(head_status)
            .ok_or_else(|| bad_response("no grpc-status"))?;
        if status.code != 0 {
            return Err(status.problem(&self.pool).into());
        }
        self.copy_metadata(&trailers, &mut headers);
        // A unary answer is exactly one message, whole.
        let mut dec = frame::Decoder::new(self.max_message);
        dec.push(&collected.to_bytes());
        let message = match dec.next().map_err(bad_response)? {
            Some(frame::Frame::Message(m)) => m,
            _ => return Err(bad_response("a unary answer without its message")),
        };
        if dec.next().map_err(bad_response)?.is_some() {
            return Err(bad_response("a unary answer of more than one message"));
        }
        dec.finish().map_err(bad_response)?;
        let msg = transcode::decode(&target.output, message).map_err(bad_response)?;
        let json = transcode::response_json(&msg, response_body).map_err(bad_response)?;
        headers.insert(header::CONTENT_TYPE, JSON.clone());
        let mut resp = Response::new(super::full(json));
        *resp.headers_mut() = headers;
        Ok(resp)
    }

    /// The allow-listed metadata of `from` as response headers (`-bin` values are base64
    /// already, as gRPC sends them).
    fn copy_metadata(&self, from: &HeaderMap, to: &mut HeaderMap) {
        for name in self.response_headers.iter() {
            for v in from.get_all(name) {
                to.append(name.clone(), v.clone());
            }
        }
    }
}

/// Whether `v` is base64 (standard alphabet, padding optional), as gRPC's `-bin` metadata is.
fn is_base64(v: &[u8]) -> bool {
    use base64::Engine;
    let unpadded = v
        .strip_suffix(b"==")
        .or_else(|| v.strip_suffix(b"="))
        .unwrap_or(v);
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(unpadded)
        .is_ok()
}

/// The content types of gRPC-Web: binary or text (`-text`), with an optional `+proto`.
fn web_kind(h: &HeaderMap) -> Option<bool> {
    let ct = h.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let ct = ct.split(';').next()?.trim().to_ascii_lowercase();
    match ct.as_str() {
        "application/grpc-web" | "application/grpc-web+proto" => Some(false),
        "application/grpc-web-text" | "application/grpc-web-text+proto" => Some(true),
        _ => None,
    }
}

impl Passthrough {
    async fn call(&self, req: Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let Some(text) = web_kind(req.headers()) else {
            let grpc = req
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            if !grpc {
                return Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "not_grpc",
                    "This route takes gRPC or gRPC-Web requests",
                )
                .into());
            }
            return self.proxy.clone().oneshot(req).await;
        };
        // gRPC-Web has no client streaming: the request is one message, read whole.
        let (mut parts, body) = req.into_parts();
        let bytes = body.collect().await?.to_bytes();
        let bytes = if text {
            Bytes::from(stream::decode_text(&bytes).map_err(|e| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_grpc_web",
                    "The gRPC-Web text body is not base64",
                )
                .caused_by(e)
            })?)
        } else {
            bytes
        };
        parts.headers.insert(header::CONTENT_TYPE, GRPC.clone());
        parts.headers.insert(header::TE, TRAILERS.clone());
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove("x-grpc-web");
        parts.headers.remove(header::ACCEPT);
        let up = Request::from_parts(parts, req_full(bytes));
        let resp = self.proxy.clone().oneshot(up).await?;
        let (mut rparts, rbody) = resp.into_parts();
        let grpc = rparts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return Ok(Response::from_parts(rparts, rbody));
        }
        rparts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if text {
                "application/grpc-web-text+proto"
            } else {
                "application/grpc-web+proto"
            }),
        );
        rparts.headers.remove(header::CONTENT_LENGTH);
        let body = WebBody::new(rbody, text);
        Ok(Response::from_parts(
            rparts,
            RespBody::Stream(BoxBody::new(body)),
        ))
    }
}
