//! Backends: the innermost service of a route's stack. Each kind (proxy, static response; later
//! aggregate, grpc, publish) is a tower `Service<Request<ReqBody>>` returning a
//! `Response<RespBody>`, so every layer applies to every kind alike. A new kind is a module
//! here, a variant of `config::BackendConfig`, and one match arm in `route::build`.

pub(crate) mod aggregate;
pub(crate) mod forward;
pub(crate) mod grpc;
pub(crate) mod proxy;
pub(crate) mod publish;
pub(crate) mod respond;
pub(crate) mod target;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::Full;

use crate::body::ReqBody;
use crate::error::BoxError;
pub(crate) use crate::upstream::UpstreamBody;
use http::{Request, Response};

/// A response body: an upstream's stream, bytes the gateway made, or a stream a layer made of
/// another (the cache filling an object as the client reads it). An enum over concrete types,
/// so the plain proxy path streams the upstream's body without a box; only a layer that
/// rewrites a stream pays for one.
pub(crate) enum RespBody {
    Upstream(UpstreamBody),
    Full(Full<Bytes>),
    Stream(BoxBody<Bytes, BoxError>),
}

/// What a route's stack (and each backend) is: a tower service of the gateway's request and
/// response bodies, cheap to clone and shareable between workers.
pub(crate) trait RouteStack:
    tower::Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> RouteStack for S where
    S: tower::Service<
            Request<ReqBody>,
            Response = Response<RespBody>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A response body the gateway produced itself.
pub(crate) fn full(bytes: impl Into<Bytes>) -> RespBody {
    RespBody::Full(Full::new(bytes.into()))
}

impl std::fmt::Debug for RespBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RespBody::Upstream(_) => "RespBody::Upstream",
            RespBody::Full(_) => "RespBody::Full",
            RespBody::Stream(_) => "RespBody::Stream",
        })
    }
}

impl From<UpstreamBody> for RespBody {
    fn from(b: UpstreamBody) -> Self {
        RespBody::Upstream(b)
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RespBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            RespBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Upstream(b) => b.is_end_stream(),
            RespBody::Full(b) => b.is_end_stream(),
            RespBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Upstream(b) => b.size_hint(),
            RespBody::Full(b) => b.size_hint(),
            RespBody::Stream(b) => b.size_hint(),
        }
    }
}
