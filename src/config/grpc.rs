//! `[protos]` (the services' `.proto` files, compiled at load) and a route's
//! `grpc = { service, method, … }` backend.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::units::Size;

/// `[protos]`: where the gateway finds the services' message definitions.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProtosConfig {
    /// `.proto` files to compile (relative to gateway.toml's folder, or to an `include` folder).
    #[serde(default)]
    pub(crate) files: Vec<Spanned<String>>,
    /// Folders imports are resolved from (relative to gateway.toml's folder). The folders of
    /// `files` need not be listed when the files import nothing of each other.
    #[serde(default)]
    pub(crate) include: Vec<Spanned<String>>,
    /// Compiled descriptor sets (`protoc --descriptor_set_out --include_imports`, `buf build`).
    #[serde(default)]
    pub(crate) descriptor_sets: Vec<Spanned<String>>,
}

/// What a request body's JSON may hold beyond the message's fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UnknownFields {
    /// 400 naming the field.
    #[default]
    Reject,
    /// Dropped.
    Ignore,
}

/// A route's `grpc = { … }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrpcConfig {
    /// The `[services.NAME]` that serves the gRPC service (HTTP/2: `protocol = "http2"`).
    pub(crate) service: Spanned<String>,
    /// `package.Service/Method`: REST/JSON translated to this method. `package.Service/*`:
    /// every method of the service with a `google.api.http` rule, chosen by the rules.
    /// Absent: gRPC and gRPC-Web requests are passed to the service as they are.
    pub(crate) method: Option<Spanned<String>>,
    /// JSON fields the message does not have: `reject` (400) or `ignore`.
    #[serde(default)]
    pub(crate) unknown_fields: UnknownFields,
    /// Largest request or response message (default 4 MiB, gRPC's own default).
    pub(crate) max_message_size: Option<Size>,
    /// Request headers sent to the service as metadata (besides the forwarding headers).
    #[serde(default)]
    pub(crate) request_headers: Vec<Spanned<String>>,
    /// Response metadata (headers or trailers) returned to the client as headers.
    #[serde(default)]
    pub(crate) response_headers: Vec<Spanned<String>>,
}
