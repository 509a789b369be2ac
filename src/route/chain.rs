//! The layers of a route's stack, in one ordered chain. Outermost first:
//!
//! ```text
//! CORS → authentication → rate limit → cache → plugins → fallback → deadline → backend
//! ```
//!
//! - CORS first, so a preflight is answered before anything else and every answer (errors
//!   included) gets its CORS headers.
//! - Authentication before the rate limit, so limits can be per user; the cache after auth, so
//!   private data is never served to the unauthenticated.
//! - Plugins see an authenticated, admitted request that the cache did not answer.
//! - The fallback answers for a failed backend (502/503/504), the deadline included.
//! - The deadline (`tower::timeout`) bounds everything the backend does, retries included.
//! - Retries, circuit breaker and bulkhead are per service, inside the proxy backend
//!   (`backend::proxy`), next to the endpoints they protect; every backend that calls a service
//!   goes through them.
//!
//! Each layer is optional: a route without a feature pays nothing for it (no layer, no box).
//! An inner typed layer is one `option_layer` line at its place below and one field of
//! `Layers`; a plugin is a `BoxLayer` (boxed once per route, so only routes that use plugins
//! pay for the erasure); the outer layers (CORS, authentication, rate limit, cache) wrap the
//! erased stack, so a route without them has not even an `Either` for them.

use std::sync::Arc;
use std::time::Duration;

use tower::timeout::TimeoutLayer;
use tower::{Layer, ServiceBuilder};

use super::{RouteService, RouteStack};
use crate::backend::respond::Respond;
use crate::layers::auth::AuthLayer;
use crate::layers::cache::CacheLayer;
use crate::layers::cors::CorsLayer;
use crate::layers::fallback::FallbackLayer;
use crate::layers::rate_limit::RateLimitLayer;

/// A layer whose type is erased: it wraps a route's stack in another.
pub(crate) type BoxLayer = Arc<dyn Fn(RouteService) -> RouteService + Send + Sync>;

/// The layers of one route, as compiled from its (inherited) settings.
#[derive(Clone)]
pub(crate) struct Layers {
    /// Plugins, in the order the route lists them (the first is outermost).
    pub(crate) plugins: Vec<BoxLayer>,
    /// The frontend's CORS policy.
    pub(crate) cors: Option<CorsLayer>,
    /// Authentication and authorization (and the identity headers stripped).
    pub(crate) auth: Option<AuthLayer>,
    /// The route's rate limits (all must admit).
    pub(crate) rate_limit: Option<RateLimitLayer>,
    /// The route's response cache.
    pub(crate) cache: Option<CacheLayer>,
    /// Served when the backend fails.
    pub(crate) fallback: Option<Respond>,
    /// The route's total deadline.
    pub(crate) deadline: Duration,
}

impl Layers {
    /// Only a deadline.
    pub(crate) fn deadline(deadline: Duration) -> Self {
        Layers {
            plugins: Vec::new(),
            cors: None,
            auth: None,
            rate_limit: None,
            cache: None,
            fallback: None,
            deadline,
        }
    }
}

/// Wraps a backend in the route's layers.
pub(crate) fn chain<S: RouteStack>(backend: S, layers: Layers) -> RouteService {
    let Layers {
        plugins,
        cors,
        auth,
        rate_limit,
        cache,
        fallback,
        deadline,
    } = layers;
    // Innermost part, typed: no box between the backend and the dispatcher's one call.
    let inner = ServiceBuilder::new()
        .option_layer(fallback.map(FallbackLayer::new))
        .layer(TimeoutLayer::new(deadline))
        .service(backend);
    let mut svc = RouteService::new(inner);
    for plugin in plugins.iter().rev() {
        svc = plugin(svc);
    }
    // The outer layers wrap the erased stack: a route without them has no `Either` for them
    // in its stack (measured: ~250 instructions a request for the two), and one with them
    // pays one more boxed future, next to the network work they do. The cache wraps it too:
    // its background refreshes call the erased stack below it.
    if let Some(cache) = cache {
        let inner = svc;
        svc = RouteService::from_fn(move |req| cache.call(&inner, req));
    }
    if let Some(rl) = rate_limit {
        let inner = svc;
        svc = RouteService::from_fn(move |req| rl.call(&inner, req));
    }
    if let Some(auth) = auth {
        svc = RouteService::new(auth.layer(svc));
    }
    if let Some(cors) = cors {
        svc = RouteService::new(cors.layer(svc));
    }
    svc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{full, RespBody};
    use crate::body::{req_full, ReqBody};
    use crate::error::{classify, BoxError};
    use http::{HeaderValue, Request, Response};
    use std::sync::Mutex;

    fn request() -> Request<ReqBody> {
        Request::new(req_full(bytes::Bytes::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_deadline_cuts_a_slow_backend_with_504() {
        let slow = tower::service_fn(|_req: Request<ReqBody>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, BoxError>(Response::new(full("late")))
        });
        let svc = chain(slow, Layers::deadline(Duration::from_secs(2)));
        let call = tokio::spawn(svc.call(request()));
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
        let layers = Layers {
            fallback: Some(fallback),
            ..Layers::deadline(Duration::from_secs(1))
        };
        let svc = chain(slow, layers);
        let call = tokio::spawn(svc.call(request()));
        tokio::time::advance(Duration::from_millis(1001)).await;
        let resp = call.await.unwrap().unwrap();
        assert_eq!(resp.headers()["x-gatehouse-fallback"], "upstream_timeout");
    }

    /// The seam: a new layer and a new backend, each added in one place, compose with the
    /// route's other layers in the documented order.
    #[tokio::test(start_paused = true)]
    async fn a_new_layer_and_a_new_backend_plug_in_at_one_place() {
        // A trivial backend: answers with the path it was called with.
        let echo = tower::service_fn(|req: Request<ReqBody>| async move {
            let body: RespBody = full(req.uri().path().to_owned());
            Ok::<_, BoxError>(Response::new(body))
        });
        // A trivial layer, from a route setting: sets a response header.
        let order = Arc::new(Mutex::new(Vec::new()));
        let header_layer =
            |value: &'static str, order: Arc<Mutex<Vec<&'static str>>>| -> BoxLayer {
                Arc::new(move |inner: RouteService| {
                    let order = order.clone();
                    let svc = tower::service_fn(move |req: Request<ReqBody>| {
                        order.lock().unwrap().push(value);
                        let call = inner.call(req);
                        async move {
                            let mut resp = call.await?;
                            resp.headers_mut()
                                .append("x-plugin", HeaderValue::from_static(value));
                            Ok::<_, BoxError>(resp)
                        }
                    });
                    RouteService::new(svc)
                })
            };
        let layers = Layers {
            plugins: vec![
                header_layer("first", order.clone()),
                header_layer("second", order.clone()),
            ],
            ..Layers::deadline(Duration::from_secs(1))
        };
        let svc = chain(echo, layers);
        let mut req = request();
        *req.uri_mut() = "/hello".parse().unwrap();
        let resp = svc.call(req).await.unwrap();
        let seen: Vec<_> = resp.headers().get_all("x-plugin").iter().collect();
        // The first plugin is outermost: it sees the request first and the response last.
        assert_eq!(seen, ["second", "first"]);
        assert_eq!(*order.lock().unwrap(), ["first", "second"]);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), "/hello");

        // And the deadline still bounds the new backend under the plugins.
        let stuck = tower::service_fn(|_req: Request<ReqBody>| async {
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(Response::new(full("never")))
        });
        let layers = Layers {
            plugins: vec![header_layer("p", order.clone())],
            ..Layers::deadline(Duration::from_secs(1))
        };
        let call = tokio::spawn(chain(stuck, layers).call(request()));
        tokio::time::advance(Duration::from_millis(1001)).await;
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(classify(&*err).code, "upstream_timeout");
    }
}
