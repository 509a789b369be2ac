//! The request body that travels through a route's stack: an enum over concrete types, so the
//! plain proxy path streams hyper's `Incoming` through without boxing or buffering. (The
//! response body, which can be an upstream's stream, is `backend::RespBody`.)
//!
//! The client's stream is wrapped in `ClientBody`, whose errors are `ClientBodyError`s: a
//! failure of the client's own body (it went away mid-upload, or sent invalid chunked framing)
//! is then recognised wherever it surfaces — in an upstream send, say — and is never charged to
//! the backend.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

/// A request body on its way to a backend: the client's stream, capped at the route's
/// `max_request_body`, or bytes the gateway holds.
pub(crate) type ReqBody = Either<Limited<ClientBody>, Full<Bytes>>;

/// A request body the gateway holds (tests, aggregation, retries of buffered bodies).
pub(crate) fn req_full(bytes: impl Into<Bytes>) -> ReqBody {
    Either::Right(Full::new(bytes.into()))
}

/// The client's request body as hyper reads it.
pub(crate) struct ClientBody(pub(crate) Incoming);

/// The client's request body failed.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed: {0}")]
pub(crate) struct ClientBodyError(#[source] hyper::Error);

impl ClientBodyError {
    /// Whether the body was malformed (invalid chunked framing and the like), rather than cut
    /// short by a client that went away.
    pub(crate) fn malformed(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&self.0);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                );
            }
            cur = e.source();
        }
        self.0.is_parse()
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        Pin::new(&mut self.0)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(ClientBodyError)))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}
