//! One route's tower stack, built once per config generation. Outermost first:
//! fallback → total timeout → backend. The timeout bounds every attempt and backoff of the
//! backend together; the fallback also answers for a timeout. (Metrics, the access log and the error-to-response mapping wrap every
//! route in the dispatcher, so they also see requests that match no route.) Later concerns —
//! auth, rate limit, cache, retry — slot in here as layers.

use std::time::Duration;

use http::{Request, Response};
use tower::timeout::TimeoutLayer;
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder};

use crate::backend::respond::Respond;
use crate::body::{ReqBody, RespBody};
use crate::error::BoxError;
use crate::layers::fallback::FallbackLayer;

/// A route's whole stack behind one cheap-to-clone handle.
pub type RouteService = BoxCloneSyncService<Request<ReqBody>, Response<RespBody>, BoxError>;

/// Wraps a backend in the route's layers.
pub fn stack<S>(backend: S, timeout: Duration, fallback: Option<Respond>) -> RouteService
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .option_layer(fallback.map(FallbackLayer::new))
            .layer(TimeoutLayer::new(timeout))
            .service(backend),
    )
}
