//! Backends: the innermost service of a route's stack. Each kind (proxy, static response; later
//! aggregate, grpc, publish) is a tower `Service<Request<ReqBody>>` returning a
//! `Response<RespBody>`, so every layer applies to every kind alike. A new kind is a module
//! here, a variant of `config::BackendConfig`, and one match arm in `route::build`.

pub(crate) mod aggregate;
pub(crate) mod forward;
pub(crate) mod proxy;
pub(crate) mod respond;
pub(crate) mod target;

use bytes::Bytes;
use http_body_util::{Either, Full};

pub(crate) use crate::upstream::UpstreamBody;

/// A response body: an upstream's stream, or bytes the gateway made.
pub(crate) type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// A response body the gateway produced itself.
pub(crate) fn full(bytes: impl Into<Bytes>) -> RespBody {
    Either::Right(Full::new(bytes.into()))
}
