//! A custom gatehouse build with a Rust plugin: a tower layer registered under a name, which
//! routes then name like a Lua plugin.
//!
//! ```toml
//! # routes/web.toml
//! [[route]]
//! name = "users"
//! path = "/users/{*rest}"
//! plugins = ["server-timing"]
//! plugin_config.server-timing = { metric = "gw" }
//! proxy = { service = "users" }
//! ```
//!
//! `cargo run --example rust_plugin -- gateway.toml` runs the gateway with it; every response
//! of such a route carries `Server-Timing: gw;dur=<ms spent in the rest of the route>`. In a
//! crate of your own, depend on `gatehouse` and do the same in your `main`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use gatehouse::plugin::{self, BoxError, RequestBody, ResponseBody};
use http::{HeaderValue, Request, Response};

/// The layer: `metric` names the Server-Timing entry.
#[derive(Clone)]
struct ServerTiming {
    metric: Arc<str>,
}

impl<S> tower::Layer<S> for ServerTiming {
    type Service = Timed<S>;
    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            metric: self.metric.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
struct Timed<S> {
    metric: Arc<str>,
    inner: S,
}

impl<S> tower::Service<Request<RequestBody>> for Timed<S>
where
    S: tower::Service<Request<RequestBody>, Response = Response<ResponseBody>, Error = BoxError>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let started = Instant::now();
        let metric = self.metric.clone();
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut resp = call.await?;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if let Ok(v) = HeaderValue::from_str(&format!("{metric};dur={ms:.2}")) {
                resp.headers_mut().append("server-timing", v);
            }
            Ok(resp)
        })
    }
}

fn main() -> std::process::ExitCode {
    plugin::register("server-timing", |config: &toml::Table| {
        let metric = config
            .get("metric")
            .and_then(|v| v.as_str())
            .unwrap_or("gw");
        // A Server-Timing name is a token.
        if metric.is_empty()
            || !metric
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "metric `{metric}` must be letters, digits, `-` or `_`"
            ));
        }
        Ok(ServerTiming {
            metric: metric.into(),
        })
    });
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "gateway.toml".to_owned());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rust_plugin: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let server = match gatehouse::Server::start(std::path::Path::new(&path)).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("rust_plugin: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        println!(
            "listening on {:?}, admin on {}",
            server.http_addrs(),
            server.admin_addr()
        );
        let _ = tokio::signal::ctrl_c().await;
        server.shutdown().await;
        std::process::ExitCode::SUCCESS
    })
}
