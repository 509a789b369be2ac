//! A named backend service: where its endpoints come from (`discovery`, or a static list), its
//! live endpoint set (`table`), the choice of endpoint per request (`balance`), active health
//! checks (`health`), passive outlier detection (`endpoint`), and its pooled HTTP client. An
//! `Upstream` outlives config snapshots: `compile` reuses it when its definition is unchanged,
//! so pooled connections, endpoint health and ejections survive a reload. Its background tasks
//! end when it is dropped.

pub(crate) mod balance;
pub(crate) mod breaker;
pub(crate) mod broker;
pub(crate) mod bulkhead;
pub(crate) mod client;
pub(crate) mod discovery;
pub(crate) mod endpoint;
pub(crate) mod etcd;
pub(crate) mod health;
pub(crate) mod pool;
pub(crate) mod redis;
pub(crate) mod retry;
pub(crate) mod table;
pub(crate) mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future;
use http::{HeaderMap, Request, Response, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub(crate) use balance::HashKey;
pub(crate) use client::Clients;
pub(crate) use endpoint::Endpoint;
pub(crate) use pool::{SendError, UpstreamBody};
pub(crate) use table::{EndpointSet, EndpointTable};

use crate::body::ReqBody;
use crate::config::{AllUnhealthy, DnsConfig, LoadBalancing, ServiceConfig, UpstreamProtocol};
use crate::observe::metrics::ServiceMetrics;
use crate::resources::Tasks;

/// Where a service's endpoints come from, as compiled.
pub(crate) enum Source {
    Static(Vec<Endpoint>),
    Dns {
        resolver: Box<hickory_resolver::TokioResolver>,
        target: discovery::DnsTarget,
    },
    Etcd {
        urls: Vec<String>,
        prefix: String,
    },
}

/// How a service connects to an endpoint: TCP, and TLS for `https` endpoints.
pub(crate) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// hyper-util's pooled client: HTTP/2 services and health checks use it.
pub(crate) type HttpClient = Client<Connector, ReqBody>;

/// TLS settings of a service, compiled.
pub(crate) struct TlsSettings {
    pub(crate) config: rustls::ClientConfig,
    pub(crate) server_name: Option<rustls::pki_types::ServerName<'static>>,
}

/// What `compile` checked and built for a service.
pub(crate) struct Parts {
    pub(crate) source: Source,
    /// For discovered services: the endpoints the previous build of this service knew, so a
    /// reload neither empties the service until the next answer nor forgets endpoint state.
    pub(crate) seed: Vec<Arc<Endpoint>>,
    pub(crate) hash_key: Option<HashKey>,
    pub(crate) tls: TlsSettings,
    pub(crate) retry: Option<retry::RetryPolicy>,
    pub(crate) breaker: Option<breaker::Settings>,
    pub(crate) health: Option<health::Probe>,
    pub(crate) outlier: Option<endpoint::Outlier>,
    pub(crate) bulkhead: Option<bulkhead::Limits>,
}

pub(crate) struct Upstream {
    pub(crate) name: Arc<str>,
    /// What to do when no endpoint is available.
    all_unhealthy: AllUnhealthy,
    /// Passive ejection of failing endpoints.
    outlier: Option<endpoint::Outlier>,
    /// `/readyz` waits for this service to have an available endpoint.
    pub(crate) required: bool,
    pub(crate) load_balancing: LoadBalancing,
    table: Arc<EndpointTable>,
    /// hyper-util clients, one per worker (`client.get()` is the calling thread's): HTTP/2
    /// requests and health checks.
    pub(crate) client: Clients,
    /// HTTP/1.1 requests (`protocol = "http1"`, the default): per-worker pools.
    http1: Option<pool::Http1Pool>,
    /// Per attempt, until the response head arrives.
    pub(crate) timeout: Option<Duration>,
    pub(crate) version: Version,
    /// The service's retry policy (a route may override it).
    pub(crate) retry: Option<retry::RetryPolicy>,
    /// Bounds retries to a share of the original requests.
    pub(crate) budget: tower::retry::budget::TpsBudget,
    pub(crate) breaker: Option<breaker::Breaker>,
    pub(crate) bulkhead: Option<bulkhead::Bulkhead>,
    /// Discovery and health-check tasks, aborted when the service is dropped.
    _tasks: Tasks,
}

impl Upstream {
    pub(crate) fn new(
        name: &str,
        config: ServiceConfig,
        dns: DnsConfig,
        parts: Parts,
        metrics: ServiceMetrics,
    ) -> Self {
        let Parts {
            source,
            seed,
            hash_key,
            tls,
            retry,
            breaker,
            health,
            outlier,
            bulkhead,
        } = parts;
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout.get()));
        http.set_nodelay(true);
        http.enforce_http(false);
        let http2 = config.protocol == UpstreamProtocol::Http2;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.config)
            .https_or_http();
        let builder = match tls.server_name {
            Some(name) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        // `protocol = "http2"` offers h2 through ALPN; HTTP/1.1 offers no ALPN, which servers
        // take as HTTP/1.1.
        let connector = if http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        };
        let idle = config.pool_idle_timeout.get();
        let max_idle = config.pool_max_idle_per_endpoint;
        let http1 = (!http2).then(|| {
            pool::Http1Pool::new(
                connector.clone(),
                config.pool_idle_timeout.get(),
                config.pool_max_idle_per_endpoint,
            )
        });
        let client = Clients::new(move || {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .pool_max_idle_per_host(max_idle)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(http2)
                // Flattened writes measured cheaper than vectored ones (see server.rs).
                .http1_writev(false)
                .build(connector.clone())
        });
        let name: Arc<str> = Arc::from(name);
        let (initial, dns_source, etcd_source) = match source {
            Source::Static(list) => (list, None, None),
            Source::Dns { resolver, target } => (Vec::new(), Some((resolver, target)), None),
            Source::Etcd { urls, prefix } => (Vec::new(), None, Some((urls, prefix))),
        };
        let table = Arc::new(EndpointTable::new(
            name.clone(),
            config.load_balancing,
            hash_key,
            metrics,
            initial,
        ));
        table.seed(seed);
        let mut tasks = Tasks::default();
        if let Some((resolver, target)) = dns_source {
            tasks.extend(discovery::spawn_dns(
                table.clone(),
                *resolver,
                target,
                dns.clone(),
            ));
        }
        if let Some((urls, prefix)) = etcd_source {
            tasks.extend(etcd::spawn(table.clone(), urls, prefix));
        }
        if let Some(probe) = health {
            tasks.extend(health::spawn(table.clone(), client.get().clone(), probe));
        }
        let (percent, min_per_sec) = config.retry.as_ref().map_or((20, 10), |r| {
            (
                r.get_ref().budget_percent,
                r.get_ref().min_retries_per_second,
            )
        });
        let budget = tower::retry::budget::TpsBudget::new(
            Duration::from_secs(10),
            min_per_sec,
            percent as f32 / 100.0,
        );
        let breaker = breaker.map(breaker::Breaker::new);
        let bulkhead = bulkhead.map(bulkhead::Bulkhead::new);
        Upstream {
            retry,
            budget,
            breaker,
            bulkhead,
            name,
            timeout: config.timeout.map(|d| d.get()),
            table,
            client,
            http1,
            version: if http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            all_unhealthy: config.all_unhealthy,
            outlier,
            required: config.required,
            load_balancing: config.load_balancing,
            _tasks: tasks,
        }
    }

    /// Whether requests go out as HTTP/1.1 through the per-worker pools (their target in origin
    /// form), rather than through hyper-util's client (absolute form).
    pub(crate) fn is_http1(&self) -> bool {
        self.http1.is_some()
    }

    /// Sends one request to `ep`.
    /// Not an `async fn`: that would keep `req` in its own state as well as in the pool's
    /// future, which is then moved into it.
    pub(crate) fn send<'a>(
        &'a self,
        ep: &'a Endpoint,
        req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        match &self.http1 {
            Some(pool) => future::Either::Left(pool.send(ep, req)),
            // hyper-util's future is boxed so that it does not size the HTTP/1 path's.
            None => {
                let sent = Box::pin(self.client.get().request(req));
                future::Either::Right(async move {
                    match sent.await {
                        Ok(r) => Ok(r.map(UpstreamBody::plain)),
                        Err(e) if e.is_connect() => Err(SendError::Connect(e.into())),
                        Err(e) => Err(SendError::Request(e.into())),
                    }
                })
            }
        }
    }

    pub(crate) fn metrics(&self) -> &ServiceMetrics {
        &self.table.metrics
    }

    /// The endpoint for the next request: an available one chosen by the balancer, or, when
    /// none is available and `all_unhealthy = "use_all"`, any.
    pub(crate) fn pick(&self, headers: &HeaderMap) -> Option<Arc<Endpoint>> {
        let set = self.table.current();
        set.balancer
            .pick(&set.endpoints, headers, Endpoint::available)
            .or_else(|| match self.all_unhealthy {
                AllUnhealthy::UseAll => set.balancer.pick(&set.endpoints, headers, |_| true),
                AllUnhealthy::Reject => None,
            })
            .cloned()
    }

    /// Like `pick`, but avoids the endpoints already tried when another one is available.
    pub(crate) fn pick_untried(
        &self,
        headers: &HeaderMap,
        tried: &[Arc<Endpoint>],
    ) -> Option<Arc<Endpoint>> {
        if tried.is_empty() {
            return self.pick(headers);
        }
        let set = self.table.current();
        let fresh = |e: &Endpoint| e.available() && !tried.iter().any(|t| std::ptr::eq(&**t, e));
        match set.balancer.pick(&set.endpoints, headers, fresh) {
            Some(e) => Some(e.clone()),
            None => {
                drop(set);
                self.pick(headers)
            }
        }
    }

    /// Records a request's outcome on its endpoint (for outlier detection and metrics).
    pub(crate) fn report(&self, ep: &Endpoint, success: bool) {
        if let Some(c) = ep.counters.get() {
            c[usize::from(!success)].inc();
        }
        if let Some(time) = ep.report(success, self.outlier.as_ref()) {
            tracing::warn!(
                service = &*self.name,
                endpoint = &*ep.url,
                ?time,
                "endpoint ejected after consecutive failures"
            );
        }
    }

    /// The current endpoint set.
    pub(crate) fn endpoints(&self) -> Arc<EndpointSet> {
        self.table.snapshot()
    }

    pub(crate) fn available_endpoints(&self) -> usize {
        self.table
            .current()
            .endpoints
            .iter()
            .filter(|e| e.available())
            .count()
    }
}
