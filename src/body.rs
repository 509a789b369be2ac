//! The request body that travels through a route's stack: an enum over concrete types, so the
//! plain proxy path streams hyper's `Incoming` through without boxing or buffering. (The
//! response body, which can be an upstream's stream, is `backend::RespBody`.)

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

/// A request body on its way to a backend: the client's stream, capped at
/// `[server] max_request_body`, or bytes the gateway holds.
pub(crate) type ReqBody = Either<Limited<Incoming>, Full<Bytes>>;

/// A request body the gateway holds (tests, aggregation, retries of buffered bodies).
pub(crate) fn req_full(bytes: impl Into<Bytes>) -> ReqBody {
    Either::Right(Full::new(bytes.into()))
}
