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
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A request body on its way to a backend: the client's stream (capped at the route's
/// `max_request_body`), or bytes the gateway holds.
pub(crate) type ReqBody = Either<ClientBody, Full<Bytes>>;

/// A request body the gateway holds (tests, aggregation, retries of buffered bodies).
pub(crate) fn req_full(bytes: impl Into<Bytes>) -> ReqBody {
    Either::Right(Full::new(bytes.into()))
}

/// The client's request body as hyper reads it, capped at a limit. When the cap is crossed the
/// body fails with `BodyTooLarge` (a 413 for the client), and when it is dropped after that,
/// what the client still sends is read and thrown away for a while (`linger`), so that the
/// client reads the 413 rather than a reset connection.
pub(crate) struct ClientBody {
    inner: Option<Incoming>,
    /// Bytes still allowed.
    left: u64,
    over: bool,
}

impl ClientBody {
    pub(crate) fn new(inner: Incoming, limit: u64) -> Self {
        ClientBody {
            inner: Some(inner),
            left: limit,
            over: false,
        }
    }
}

/// The client's body crossed the route's `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit")]
pub(crate) struct BodyTooLarge;

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
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.over {
            return Poll::Ready(Some(Err(BodyTooLarge.into())));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.over = true;
                        return Poll::Ready(Some(Err(BodyTooLarge.into())));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ClientBodyError(e).into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if self.over {
            if let Some(inner) = self.inner.take() {
                linger(inner);
            }
        }
    }
}

/// How long, and how much, of a refused body is read before the connection may close.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);
const LINGER_BYTES: u64 = 64 * 1024 * 1024;

/// Reads and discards a refused request body, at most `LINGER_TIME` and `LINGER_BYTES` (like
/// nginx's lingering close): closing a socket with unread data resets it, and a client still
/// writing its body would get a write error instead of the response.
pub(crate) fn linger(mut body: Incoming) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let drained = async {
            let mut read = 0u64;
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                let Ok(frame) = frame else { return };
                if let Some(d) = frame.data_ref() {
                    read += d.len() as u64;
                    if read > LINGER_BYTES {
                        return;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drained).await;
    });
}
