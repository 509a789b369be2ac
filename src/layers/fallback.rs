//! `fallback = { status, body, content_type, headers }`: when the backend fails — 502, 503 or
//! 504 (circuit open, no endpoint, overloaded, timeout, upstream error) — the route answers with
//! this static response instead, marked `x-gatehouse-fallback: <error code>`. Client errors
//! (413, 400) are not hidden. Serving a stale cached response on failure plugs in here too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::backend::respond::Respond;
use crate::backend::RespBody;
use crate::body::ReqBody;
use crate::error::{classify, BoxError};

/// Marks a response the fallback served (a response extension): the cache serves a stale
/// object in its place when it may, and never stores it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served;

#[derive(Clone)]
pub(crate) struct FallbackLayer {
    response: Respond,
}

impl FallbackLayer {
    pub(crate) fn new(response: Respond) -> Self {
        FallbackLayer { response }
    }
}

impl<S> Layer<S> for FallbackLayer {
    type Service = Fallback<S>;
    fn layer(&self, inner: S) -> Fallback<S> {
        Fallback {
            inner,
            response: self.response.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Fallback<S> {
    inner: S,
    response: Respond,
}

impl<S> Service<Request<ReqBody>> for Fallback<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        let mut fallback = self.response.clone();
        Box::pin(async move {
            match fut.await {
                Ok(resp) => Ok(resp),
                Err(e) => {
                    let problem = classify(&*e);
                    let backend_failed = matches!(
                        problem.status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    );
                    if !backend_failed {
                        return Err(e);
                    }
                    tracing::debug!(
                        code = problem.code,
                        "backend failed; serving the route's fallback"
                    );
                    let mut resp = fallback.ready().await?.call(empty_request()).await?;
                    resp.headers_mut().insert(
                        "x-gatehouse-fallback",
                        HeaderValue::from_static(problem.code),
                    );
                    resp.extensions_mut().insert(Served);
                    Ok(resp)
                }
            }
        })
    }
}

fn empty_request() -> Request<ReqBody> {
    Request::new(crate::body::req_full(bytes::Bytes::new()))
}
