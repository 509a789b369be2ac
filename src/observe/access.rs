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
use crate::context::Exchange;

/// Counts a request as finished on its connection when dropped (with the response body). The
/// connection driver parks a connection only while every request it started has finished.
pub(crate) struct InFlight(std::sync::Arc<dyn Finish>);

/// Whatever counts finished requests (the dispatcher's connection state).
pub(crate) trait Finish: Send + Sync {
    fn finish(&self);
}

impl InFlight {
    pub(crate) fn new(counter: std::sync::Arc<dyn Finish>) -> Self {
        InFlight(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// What the access log says about one request.
pub(crate) struct Record {
    pub(crate) metrics: Arc<RouteMetrics>,
    pub(crate) method: Method,
    /// Only when the access log is on, its one reader: otherwise the clone (reference counts
    /// taken and dropped on every request) is work for nothing.
    pub(crate) uri: Option<Uri>,
    pub(crate) status: StatusCode,
    /// The problem code when the gateway answered with an error (`client_closed`,
    /// `bad_request`, `upstream_failed` …).
    pub(crate) code: Option<&'static str>,
    /// Response body bytes sent so far.
    pub(crate) bytes: u64,
    pub(crate) request_id: HeaderValue,
    /// The request's context, with what the stack learned about the response (the upstream
    /// used, guards such as the bulkhead slot): kept until the body ends. `None` for requests
    /// that matched no route.
    pub(crate) exchange: Option<Exchange>,
    /// A global concurrency slot, released when the body ends.
    pub(crate) _global_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pub(crate) start: Instant,
    pub(crate) log: bool,
    /// Counts the request as finished on its connection when dropped (with the body).
    pub(crate) _in_flight: InFlight,
}

/// The response body as the client receives it.
pub(crate) struct ObservedBody<B> {
    inner: B,
    record: Record,
}

impl<B> ObservedBody<B> {
    pub(crate) fn new(inner: B, record: Record) -> Self {
        ObservedBody { inner, record }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.record.bytes += data.len() as u64;
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

/// Recorded when the response body ends or is dropped — or, if the client went away before the
/// response began, when the request is dropped (status 499, `client_closed`).
impl Drop for Record {
    fn drop(&mut self) {
        let r = &*self;
        let upstream = r.exchange.as_ref().and_then(|x| x.meta().upstream());
        let elapsed = r.start.elapsed();
        r.metrics.record(&r.method, r.status, elapsed.as_secs_f64());
        if r.log {
            let identity = r.exchange.as_ref().and_then(|x| x.identity());
            tracing::info!(
                target: "gatehouse::access",
                frontend = r.metrics.frontend(),
                route = r.metrics.route(),
                method = r.method.as_str(),
                path = r.uri.as_ref().map_or("-", |u| u.path()),
                status = r.status.as_u16(),
                code = r.code.unwrap_or("-"),
                upstream = upstream.map_or("-", |u| &*u.url),
                attempts = upstream.map_or(0, |u| u.attempts),
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                bytes = r.bytes,
                request_id = r.request_id.to_str().unwrap_or("-"),
                auth = identity.map_or("-", |i| &*i.provider),
                consumer = identity.and_then(|i| i.consumer.as_deref()).unwrap_or("-"),
                calls = r.exchange.as_ref().and_then(|x| x.meta().calls()).unwrap_or("-"),
            );
        }
    }
}
