//! The body types that travel through a route's stack. Both are enums over concrete types, so
//! the plain proxy path streams hyper's `Incoming` through without boxing or buffering.

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

/// A request body on its way to a backend: the client's stream, capped at
/// `[server] max_request_body`, or bytes the gateway holds.
pub type ReqBody = Either<Limited<Incoming>, Full<Bytes>>;

/// A response body: an upstream's stream, or bytes the gateway made.
pub type RespBody = Either<crate::upstream::UpstreamBody, Full<Bytes>>;

/// A response body the gateway produced itself.
pub fn full(bytes: impl Into<Bytes>) -> RespBody {
    Either::Right(Full::new(bytes.into()))
}

pub fn empty() -> RespBody {
    Either::Right(Full::new(Bytes::new()))
}

/// A request body the gateway holds (tests, aggregation, retries of buffered bodies).
pub fn req_full(bytes: impl Into<Bytes>) -> ReqBody {
    Either::Right(Full::new(bytes.into()))
}
