//! The per-request record: a wrapper around the response body that counts the bytes sent and,
//! when the body is finished (or dropped because the client went away), records the request's
//! metrics and writes the one access-log event. So duration and bytes cover the whole response,
//! streamed bodies included, without buffering anything.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};

use super::metrics::RouteMetrics;
use crate::body::RespBody;

/// Which endpoint answered, after how many attempts; put in the upstream response body by the
/// proxy. A bulkhead slot travels with it so it is held until the response body ends.
#[derive(Debug, Clone)]
pub struct UpstreamUsed {
    pub url: Arc<str>,
    pub attempts: u32,
    pub permit: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// What the access log says about one request.
pub struct Record {
    pub metrics: Arc<RouteMetrics>,
    pub method: Method,
    /// Only when the access log is on, its one reader: otherwise the clone (reference counts
    /// taken and dropped on every request) is work for nothing.
    pub uri: Option<Uri>,
    pub status: StatusCode,
    pub request_id: HeaderValue,
    pub upstream: Option<UpstreamUsed>,
    /// A global concurrency slot, released when the body ends.
    pub global_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pub start: Instant,
    pub log: bool,
    /// Counts the request as finished on its connection when dropped (with the body).
    pub in_flight: crate::dispatch::InFlight,
}

/// The response body as the client receives it.
pub struct ObservedBody {
    inner: RespBody,
    record: Record,
    bytes: u64,
}

impl ObservedBody {
    pub fn new(inner: RespBody, record: Record) -> Self {
        ObservedBody {
            inner,
            record,
            bytes: 0,
        }
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let r = &self.record;
        let elapsed = r.start.elapsed();
        r.metrics.record(&r.method, r.status, elapsed.as_secs_f64());
        if r.log {
            tracing::info!(
                target: "gatehouse::access",
                frontend = r.metrics.frontend(),
                route = r.metrics.route(),
                method = r.method.as_str(),
                path = r.uri.as_ref().map_or("-", |u| u.path()),
                status = r.status.as_u16(),
                upstream = r.upstream.as_ref().map_or("-", |u| &*u.url),
                attempts = r.upstream.as_ref().map_or(0, |u| u.attempts),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                bytes = self.bytes,
                request_id = r.request_id.to_str().unwrap_or("-"),
            );
        }
    }
}
