//! One route's tower stack, built once per config generation. Outermost first:
//! fallback → total timeout → backend. The timeout bounds every attempt and backoff of the
//! backend together; the fallback also answers for a timeout. (Metrics, the access log and the error-to-response mapping wrap every
//! route in the dispatcher, so they also see requests that match no route.) Later concerns —
//! auth, rate limit, cache, retry — slot in here as layers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tower::timeout::TimeoutLayer;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::backend::respond::Respond;
use crate::body::{ReqBody, RespBody};
use crate::error::BoxError;
use crate::layers::fallback::FallbackLayer;

/// A request on its way through a route's stack.
pub type RouteCall = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

/// A route's whole stack behind one shared handle. It is called by reference: a request costs
/// one boxed future, where tower's `BoxCloneSyncService` would also box a clone of the stack
/// and box the future a second time.
#[derive(Clone)]
pub struct RouteService(Arc<dyn Stack>);

/// A built stack, type-erased.
trait Stack: Send + Sync {
    fn call(&self, req: Request<ReqBody>) -> RouteCall;
}

/// What a route's stack (and each backend) is: a tower service of the gateway's request and
/// response bodies, cheap to clone and shareable between workers.
pub trait RouteStack:
    Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError, Future: Send>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> RouteStack for S where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError, Future: Send>
        + Clone
        + Send
        + Sync
        + 'static
{
}

impl<S: RouteStack> Stack for S {
    fn call(&self, req: Request<ReqBody>) -> RouteCall {
        // A clone of the concrete stack is a few reference counts, kept in the future itself.
        let svc = self.clone();
        Box::pin(svc.oneshot(req))
    }
}

impl RouteService {
    pub fn new<S: RouteStack>(stack: S) -> Self {
        RouteService(Arc::new(stack))
    }

    /// Runs one request through the stack (readiness first, as tower requires).
    pub fn call(&self, req: Request<ReqBody>) -> RouteCall {
        self.0.call(req)
    }
}

/// Wraps a backend in the route's layers.
pub fn stack<S: RouteStack>(
    backend: S,
    timeout: Duration,
    fallback: Option<Respond>,
) -> RouteService {
    RouteService::new(
        ServiceBuilder::new()
            .option_layer(fallback.map(FallbackLayer::new))
            .layer(TimeoutLayer::new(timeout))
            .service(backend),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{full, req_full};
    use crate::error::classify;

    #[tokio::test(start_paused = true)]
    async fn the_total_deadline_cuts_a_slow_backend_with_504() {
        let slow = tower::service_fn(|_req: Request<ReqBody>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, BoxError>(Response::new(full("late")))
        });
        let svc = stack(slow, Duration::from_secs(2), None);
        let call = tokio::spawn(svc.call(Request::new(req_full(bytes::Bytes::new()))));
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!call.is_finished());
        tokio::time::advance(Duration::from_millis(2)).await;
        let err = call.await.unwrap().unwrap_err();
        let p = classify(&*err);
        assert_eq!((p.status.as_u16(), p.code), (504, "upstream_timeout"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fallback_answers_for_the_deadline() {
        let slow = tower::service_fn(|_req: Request<ReqBody>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, BoxError>(Response::new(full("late")))
        });
        let fallback = Respond::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from("fallback"),
        );
        let svc = stack(slow, Duration::from_secs(1), Some(fallback));
        let call = tokio::spawn(svc.call(Request::new(req_full(bytes::Bytes::new()))));
        tokio::time::advance(Duration::from_millis(1001)).await;
        let resp = call.await.unwrap().unwrap();
        assert_eq!(resp.headers()["x-gatehouse-fallback"], "upstream_timeout");
    }
}
