//! A named backend service: its endpoints and their live state, the choice of endpoint per
//! request (`balance`), active health checks (`health`) and passive outlier detection
//! (`endpoint`), and its pooled HTTP client. An `Upstream` outlives config snapshots: `compile`
//! reuses it when the service's config is unchanged, so pooled connections, endpoint health and
//! ejections survive a reload.

pub mod balance;
pub mod endpoint;
pub mod health;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use balance::{Balancer, HashKey};
pub use endpoint::Endpoint;

use crate::body::ReqBody;
use crate::config::{AllUnhealthy, ServiceConfig, UpstreamProtocol};
use crate::observe::metrics::ServiceMetrics;

pub struct Upstream {
    pub name: Arc<str>,
    /// The definition this was built from; compared by value on reload.
    pub config: ServiceConfig,
    endpoints: Box<[Arc<Endpoint>]>,
    balancer: Balancer,
    pub client: Client<HttpConnector, ReqBody>,
    /// Per attempt, until the response head arrives.
    pub timeout: Option<Duration>,
    pub version: Version,
    pub metrics: ServiceMetrics,
    _health: Option<health::TaskGuard>,
}

impl Upstream {
    pub fn new(
        name: &str,
        config: ServiceConfig,
        endpoints: Vec<Endpoint>,
        hash_key: Option<HashKey>,
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
        let endpoints: Vec<Arc<Endpoint>> = endpoints
            .into_iter()
            .map(|e| {
                let _ = e.counters.set(metrics.endpoint_counters(&e.url));
                Arc::new(e)
            })
            .collect();
        let name: Arc<str> = Arc::from(name);
        let balancer = Balancer::new(config.load_balancing, hash_key, &endpoints);
        let health = config.health_check.as_ref().and_then(|hc| {
            health::spawn(
                name.clone(),
                endpoints.clone(),
                client.clone(),
                hc.get_ref().clone(),
            )
        });
        Upstream {
            name,
            timeout: config.timeout.map(|d| d.get()),
            endpoints: endpoints.into_boxed_slice(),
            balancer,
            client,
            version: if http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            metrics,
            config,
            _health: health,
        }
    }

    /// The endpoint for the next request: an available one chosen by the balancer, or, when
    /// none is available and `all_unhealthy = "use_all"`, any.
    pub fn pick(&self, headers: &HeaderMap) -> Option<&Arc<Endpoint>> {
        self.balancer
            .pick(&self.endpoints, headers, Endpoint::available)
            .or_else(|| match self.config.all_unhealthy {
                AllUnhealthy::UseAll => self.balancer.pick(&self.endpoints, headers, |_| true),
                AllUnhealthy::Reject => None,
            })
    }

    /// Records a request's outcome on its endpoint (for outlier detection and metrics).
    pub fn report(&self, ep: &Endpoint, success: bool) {
        if let Some(c) = ep.counters.get() {
            c[usize::from(!success)].inc();
        }
        let od = self.config.outlier_detection.as_ref().map(|o| o.get_ref());
        if let Some(time) = ep.report(success, od) {
            tracing::warn!(
                service = &*self.name,
                endpoint = &*ep.url,
                ?time,
                "endpoint ejected after consecutive failures"
            );
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn available_endpoints(&self) -> usize {
        self.endpoints.iter().filter(|e| e.available()).count()
    }
}
