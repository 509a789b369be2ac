//! A named backend service: its endpoints, the choice of endpoint per request, and its pooled
//! HTTP client. An `Upstream` outlives config snapshots: `compile` reuses it when the service's
//! config is unchanged, so pooled keep-alive connections survive a reload.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ReqBody;
use crate::config::{ServiceConfig, UpstreamProtocol};
use crate::observe::metrics::ServiceMetrics;

/// One address of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// As configured, for logs and the admin API.
    pub url: Arc<str>,
    pub scheme: Scheme,
    pub authority: Authority,
}

impl Endpoint {
    /// Parses an endpoint URL: `http://host:port` with no path.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("endpoint `{url}` is not a valid URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("endpoint `{url}` needs a scheme, like `http://{url}`"))?;
        if scheme == Scheme::HTTPS {
            return Err(format!(
                "endpoint `{url}`: https endpoints are not supported yet (upstream TLS comes with the services issue); use http"
            ));
        }
        if scheme != Scheme::HTTP {
            return Err(format!("endpoint `{url}`: scheme must be http"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("endpoint `{url}` has no host"))?;
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!(
                "endpoint `{url}` must not have a path or query; put the path in the route's `proxy.path`"
            ));
        }
        Ok(Endpoint {
            url: Arc::from(url),
            scheme,
            authority,
        })
    }
}

pub struct Upstream {
    pub name: Arc<str>,
    /// The definition this was built from; compared by value on reload.
    pub config: ServiceConfig,
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
    pub client: Client<HttpConnector, ReqBody>,
    /// Per attempt, until the response head arrives.
    pub timeout: Option<Duration>,
    pub version: Version,
    pub metrics: ServiceMetrics,
}

impl Upstream {
    pub fn new(
        name: &str,
        config: ServiceConfig,
        endpoints: Vec<Endpoint>,
        metrics: ServiceMetrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout.get()));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let http2 = config.protocol == UpstreamProtocol::Http2;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout.get())
            .pool_max_idle_per_host(config.pool_max_idle_per_endpoint)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(http2)
            .build(connector);
        Upstream {
            name: Arc::from(name),
            timeout: config.timeout.map(|d| d.get()),
            config,
            endpoints: endpoints.into_boxed_slice(),
            next: AtomicUsize::new(0),
            client,
            version: if http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            metrics,
        }
    }

    /// The endpoint for the next request (round robin).
    pub fn pick(&self) -> Option<&Endpoint> {
        match self.endpoints.len() {
            0 => None,
            1 => self.endpoints.first(),
            n => {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                self.endpoints.get(i % n)
            }
        }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let e = Endpoint::parse("http://127.0.0.1:8081").unwrap();
        assert_eq!(e.authority.as_str(), "127.0.0.1:8081");
        assert!(Endpoint::parse("127.0.0.1:8081")
            .unwrap_err()
            .contains("scheme"));
        assert!(Endpoint::parse("http://h:1/v1")
            .unwrap_err()
            .contains("path"));
        assert!(Endpoint::parse("ftp://h:1").is_err());
        assert!(Endpoint::parse("http://h:1/").is_ok());
    }
}
