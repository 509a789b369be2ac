//! One route: its compiled form (`Route`), its tower stack behind one shared handle
//! (`RouteService`), the ordered chain of layers every route's stack is made of (`chain.rs`) and
//! the builder that makes a route from its config in one place (`build.rs`).

mod build;
mod chain;
mod layers;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Service, ServiceExt};

use crate::backend::RespBody;
pub(crate) use crate::backend::RouteStack;
use crate::body::ReqBody;
use crate::context::RouteInfo;
use crate::error::BoxError;
use crate::observe::metrics::RouteMetrics;

pub(crate) use build::{build, BuildContext, Built, Frontend, Inherited};
pub(crate) use chain::{chain, Layers};

/// One compiled route.
pub(crate) struct Route {
    /// Its id and parameter names, shared with each request's `Exchange`.
    pub(crate) info: Arc<RouteInfo>,
    /// Request bodies larger than this get 413.
    pub(crate) max_request_body: u64,
    /// Whether its frontend has a CORS policy: a preflight is then routed to it by the
    /// method it asks for, and answered by its CORS layer.
    pub(crate) cors: bool,
    pub(crate) service: RouteService,
    pub(crate) metrics: Arc<RouteMetrics>,
}

/// A request on its way through a route's stack.
pub(crate) type RouteCall =
    Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

/// A route's whole stack behind one shared handle. It is called by reference: a request costs
/// one boxed future, where tower's `BoxCloneSyncService` would also box a clone of the stack
/// and box the future a second time.
#[derive(Clone)]
pub(crate) struct RouteService(Arc<dyn Stack>);

/// A built stack, type-erased.
trait Stack: Send + Sync {
    fn call(&self, req: Request<ReqBody>) -> RouteCall;
}

impl<S: RouteStack> Stack for S {
    fn call(&self, req: Request<ReqBody>) -> RouteCall {
        // A clone of the concrete stack is a few reference counts, kept in the future itself.
        let svc = self.clone();
        Box::pin(svc.oneshot(req))
    }
}

/// A stack that is a call function: for an outer layer whose call already returns the boxed
/// future (`chain` wraps the erased stack in it), so the request pays for no second box, no
/// `Oneshot` and no clone of the layer.
struct FnStack<F>(F);

impl<F> Stack for FnStack<F>
where
    F: Fn(Request<ReqBody>) -> RouteCall + Send + Sync,
{
    fn call(&self, req: Request<ReqBody>) -> RouteCall {
        (self.0)(req)
    }
}

impl RouteService {
    pub(crate) fn new<S: RouteStack>(stack: S) -> Self {
        RouteService(Arc::new(stack))
    }

    /// The stack `f` is: each request is `f(req)`.
    pub(crate) fn from_fn<F>(f: F) -> Self
    where
        F: Fn(Request<ReqBody>) -> RouteCall + Send + Sync + 'static,
    {
        RouteService(Arc::new(FnStack(f)))
    }

    /// Runs one request through the stack (readiness first, as tower requires).
    pub(crate) fn call(&self, req: Request<ReqBody>) -> RouteCall {
        self.0.call(req)
    }
}

/// So that a layer given as a `BoxLayer` (a plugin) can wrap an erased stack.
impl Service<Request<ReqBody>> for RouteService {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = RouteCall;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> RouteCall {
        RouteService::call(self, req)
    }
}
