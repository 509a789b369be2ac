//! Rust plugins, for teams that build their own binary on gatehouse as a library: a tower
//! `Layer` registered under a name (before the gateway starts) is named by routes and
//! frontends like a Lua plugin — `plugins = ["my-layer"]` — and built for each route with
//! that route's `plugin_config.my-layer` table. A Lua script of the same name in `plugins/`
//! comes first. `examples/rust_plugin.rs` is a complete example.
//!
//! ```no_run
//! use gatehouse::plugin::{self, PluginService};
//! # #[derive(Clone)] struct AddHeader(http::HeaderValue);
//! # impl<S> tower::Layer<S> for AddHeader { type Service = S; fn layer(&self, s: S) -> S { s } }
//! plugin::register("add-header", |config: &toml::Table| {
//!     let v = config.get("value").and_then(|v| v.as_str()).unwrap_or("yes");
//!     Ok(AddHeader(http::HeaderValue::from_str(v).map_err(|e| e.to_string())?))
//! });
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use crate::backend::RespBody;
use crate::body::ReqBody;

/// The error type of the gateway's services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as a plugin sees it: the client's stream (or bytes the gateway holds).
pub struct RequestBody(pub(crate) ReqBody);

/// A response body as a plugin sees it: the backend's stream (or bytes the gateway made).
pub struct ResponseBody(pub(crate) RespBody);

impl RequestBody {
    /// A body of these bytes (for a plugin that replaces the request body).
    pub fn from_bytes(b: impl Into<Bytes>) -> Self {
        RequestBody(crate::body::req_full(b))
    }
}

impl ResponseBody {
    /// A body of these bytes (for a plugin that answers by itself).
    pub fn from_bytes(b: impl Into<Bytes>) -> Self {
        ResponseBody(crate::backend::full(b))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().0)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// The service a plugin's layer wraps: the rest of the route (the next plugins, the deadline
/// and the backend).
pub type PluginService =
    BoxCloneSyncService<Request<RequestBody>, Response<ResponseBody>, BoxError>;

/// Builds a route's layer from its `plugin_config` table, around the rest of the route.
type Factory = dyn Fn(&toml::Table, PluginService) -> Result<PluginService, String> + Send + Sync;

fn registry() -> &'static RwLock<HashMap<String, Arc<Factory>>> {
    static R: OnceLock<RwLock<HashMap<String, Arc<Factory>>>> = OnceLock::new();
    R.get_or_init(|| RwLock::new(HashMap::new()))
}

/// Registers a layer under `name`. `make` gets a route's `plugin_config.NAME` table (empty
/// when the route has none) and returns the layer, or an error shown as a config error of the
/// route. Call it before the gateway loads its config; a second registration of a name
/// replaces the first.
pub fn register<L, F>(name: &str, make: F)
where
    F: Fn(&toml::Table) -> Result<L, String> + Send + Sync + 'static,
    L: Layer<PluginService>,
    L::Service: Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as Service<Request<RequestBody>>>::Future: Send + 'static,
{
    let factory: Arc<Factory> = Arc::new(move |cfg: &toml::Table, inner: PluginService| {
        let layer = make(cfg)?;
        Ok(BoxCloneSyncService::new(layer.layer(inner)))
    });
    let mut r = registry().write().unwrap_or_else(|e| e.into_inner());
    r.insert(name.to_owned(), factory);
}

/// A registered layer's builder, by name (read when routes are compiled, never per request).
pub(crate) fn registered(name: &str) -> Option<Arc<Factory>> {
    let r = registry().read().unwrap_or_else(|e| e.into_inner());
    r.get(name).cloned()
}
