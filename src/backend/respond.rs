//! `respond = { status, body, content_type, headers }`: a static response built once at compile.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};

use super::{full, RespBody};
use crate::body::ReqBody;
use crate::error::BoxError;

#[derive(Clone)]
pub(crate) struct Respond {
    inner: Arc<(StatusCode, HeaderMap, Bytes)>,
}

impl Respond {
    pub(crate) fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Respond {
            inner: Arc::new((status, headers, body)),
        }
    }
}

impl tower::Service<Request<ReqBody>> for Respond {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = Ready<Result<Response<RespBody>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<ReqBody>) -> Self::Future {
        let (status, headers, body) = &*self.inner;
        let mut resp = Response::new(full(body.clone()));
        *resp.status_mut() = *status;
        *resp.headers_mut() = headers.clone();
        ready(Ok::<_, Infallible>(resp).map_err(|e| match e {}))
    }
}
