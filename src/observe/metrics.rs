//! The Prometheus registry and the gateway's metric families. Per-route and per-service handles
//! are resolved when a config is compiled, so recording on the request path is a few atomic adds:
//! no label formatting and no lookups by name.

use std::sync::OnceLock;

use http::{Method, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// All metric families; one per process, shared by every config generation so that counters
/// survive reloads.
pub struct Metrics {
    pub(crate) registry: Registry,
    requests_total: IntCounterVec,
    request_duration: HistogramVec,
    upstream_requests_total: IntCounterVec,
    endpoint_requests_total: IntCounterVec,
    discovery_total: IntCounterVec,
    resilience_total: IntCounterVec,
    /// Circuit state per service (0 closed, 1 open, 2 half-open); set when /metrics is scraped.
    pub(crate) circuit_state: prometheus::IntGaugeVec,
    /// Endpoints per service and state; set when /metrics is scraped.
    pub(crate) upstream_endpoints: prometheus::IntGaugeVec,
    pub(crate) config_reloads_total: IntCounterVec,
    pub(crate) config_generation: IntGauge,
    /// Client connections accepted, by worker thread.
    pub(crate) connections_total: IntCounterVec,
    /// Idle HTTP/1 client connections parked without hyper's buffers (`conn.rs`).
    pub(crate) connections_parked: IntGauge,
    /// Authentication outcomes by route, provider and outcome (`ok` or the reason).
    pub(crate) auth_total: IntCounterVec,
    /// JWKS fetches by provider and result.
    pub(crate) jwks_fetches_total: IntCounterVec,
    pub(crate) rate_limit_total: IntCounterVec,
    pub(crate) rate_limit_store_failures: IntCounterVec,
    pub(crate) rate_limit_store_seconds: prometheus::HistogramVec,
    pub(crate) ip_rate_limited: prometheus::IntCounter,
    pub(crate) aggregate_calls_total: IntCounterVec,
    pub(crate) aggregate_call_seconds: prometheus::HistogramVec,
    /// Cache lookups by route and result (hit, miss, stale, revalidated, coalesced, bypass).
    pub(crate) cache_total: IntCounterVec,
    pub(crate) cache_evictions: prometheus::IntCounter,
    pub(crate) cache_bytes: prometheus::IntGauge,
    pub(crate) cache_objects: prometheus::IntGauge,
    /// Messages published by `publish` routes, by broker and outcome.
    pub(crate) broker_publishes_total: IntCounterVec,
    /// Lua plugins: calls by phase, failed calls, time spent (`layers/plugins`).
    pub(crate) plugin_calls_total: IntCounterVec,
    pub(crate) plugin_errors_total: IntCounterVec,
    pub(crate) plugin_seconds_total: prometheus::CounterVec,
    /// Messages of `[[consumer]]` bridges by consumer and outcome.
    pub(crate) consumer_deliveries_total: IntCounterVec,
    /// Messages of a `[[consumer]]`'s subject not yet delivered (its lag), as JetStream last
    /// reported it with a delivery.
    pub(crate) consumer_pending: prometheus::IntGaugeVec,
}

impl Metrics {
    // The families' names, help texts and labels are constants, valid and distinct: building
    // and registering them cannot fail (`tests::every_family_is_registered` builds them).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_requests_total",
                "Requests answered, by route and status",
            ),
            &["frontend", "route", "method", "status"],
        )
        .expect("static metric definition is valid");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "gatehouse_request_duration_seconds",
                "Time from request head to the end of the response body",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["frontend", "route"],
        )
        .expect("static metric definition is valid");
        let upstream_requests_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_upstream_requests_total",
                "Requests sent to backend services, by outcome (status code or error kind)",
            ),
            &["service", "outcome"],
        )
        .expect("static metric definition is valid");
        let endpoint_requests_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_upstream_endpoint_requests_total",
                "Requests per endpoint: success, or failure (connect error, reset, timeout, 5xx)",
            ),
            &["service", "endpoint", "outcome"],
        )
        .expect("static metric definition is valid");
        let upstream_endpoints = prometheus::IntGaugeVec::new(
            Opts::new(
                "gatehouse_upstream_endpoints",
                "Endpoints per service by state: available, unhealthy (active checks), ejected (outlier detection)",
            ),
            &["service", "state"],
        )
        .expect("static metric definition is valid");
        let discovery_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_discovery_updates_total",
                "Discovery lookups by result: updated, unchanged, empty (kept the previous set), error",
            ),
            &["service", "result"],
        )
        .expect("static metric definition is valid");
        let resilience_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_upstream_resilience_total",
                "Resilience events per service: retry, retry_budget_exhausted, circuit_open (refused), overloaded (refused)",
            ),
            &["service", "event"],
        )
        .expect("static metric definition is valid");
        let circuit_state = prometheus::IntGaugeVec::new(
            Opts::new(
                "gatehouse_circuit_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            ),
            &["service"],
        )
        .expect("static metric definition is valid");
        let config_reloads_total = IntCounterVec::new(
            Opts::new("gatehouse_config_reloads_total", "Config reloads by result"),
            &["result"],
        )
        .expect("static metric definition is valid");
        let config_generation = IntGauge::new(
            "gatehouse_config_generation",
            "Generation of the config now serving (1 at start, +1 per successful reload)",
        )
        .expect("static metric definition is valid");
        let connections_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_connections_total",
                "Client connections accepted, by worker thread",
            ),
            &["worker"],
        )
        .expect("static metric definition is valid");
        let connections_parked = IntGauge::new(
            "gatehouse_connections_parked",
            "Idle HTTP/1 client connections waiting for their next request without per-connection buffers",
        )
        .expect("static metric definition is valid");
        let auth_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_auth_total",
                "Authentication outcomes by route, provider and outcome (ok, or why not)",
            ),
            &["route", "provider", "outcome"],
        )
        .expect("static metric definition is valid");
        let jwks_fetches_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_jwks_fetches_total",
                "JWKS fetches by provider and result (attempt, failure)",
            ),
            &["provider", "result"],
        )
        .expect("static metric definition is valid");
        let rate_limit_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_rate_limit_total",
                "Rate limit decisions by route, policy and outcome (admitted, limited, failed_open, failed_closed)",
            ),
            &["route", "policy", "outcome"],
        )
        .expect("static metric definition is valid");
        let rate_limit_store_failures = IntCounterVec::new(
            Opts::new(
                "gatehouse_rate_limit_store_failures_total",
                "Calls to a shared rate limit store that failed, by policy and reason (timeout, error, down)",
            ),
            &["policy", "reason"],
        )
        .expect("static metric definition is valid");
        let rate_limit_store_seconds = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "gatehouse_rate_limit_store_seconds",
                "Round trip of one call to a shared rate limit store, by policy",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
            ]),
            &["policy"],
        )
        .expect("static metric definition is valid");
        let ip_rate_limited = prometheus::IntCounter::new(
            "gatehouse_ip_rate_limited_total",
            "Requests refused by [server] ip_rate_limit before routing",
        )
        .expect("static metric definition is valid");
        let aggregate_calls_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_aggregate_calls_total",
                "Backend calls of aggregate routes by route, call and outcome (ok, or why not)",
            ),
            &["route", "call", "outcome"],
        )
        .expect("static metric definition is valid");
        let aggregate_call_seconds = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new(
                "gatehouse_aggregate_call_duration_seconds",
                "Backend calls of aggregate routes, from sent to answer read, by route and call",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route", "call"],
        )
        .expect("static metric definition is valid");
        let broker_publishes_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_broker_publishes_total",
                "Messages of publish routes by broker and outcome (confirmed, duplicate, replied, unavailable, timeout, no_responders)",
            ),
            &["broker", "outcome"],
        )
        .expect("valid metric");
        let plugin_calls_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_plugin_calls_total",
                "Calls of Lua plugin phase functions, by plugin and phase (request, response, log)",
            ),
            &["plugin", "phase"],
        )
        .expect("valid metric");
        let plugin_errors_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_plugin_errors_total",
                "Lua plugin calls that failed (an error, the time budget or the memory limit), by plugin",
            ),
            &["plugin"],
        )
        .expect("valid metric");
        let plugin_seconds_total = prometheus::CounterVec::new(
            Opts::new(
                "gatehouse_plugin_seconds_total",
                "Time spent in Lua plugin calls, by plugin",
            ),
            &["plugin"],
        )
        .expect("valid metric");
        let consumer_deliveries_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_consumer_deliveries_total",
                "Messages delivered by [[consumer]] bridges, by consumer and outcome (acked, retried, dead_lettered)",
            ),
            &["consumer", "outcome"],
        )
        .expect("valid metric");
        let consumer_pending = prometheus::IntGaugeVec::new(
            Opts::new(
                "gatehouse_consumer_pending",
                "Messages a [[consumer]] bridge has not been delivered yet (its lag), as of its last delivery",
            ),
            &["consumer"],
        )
        .expect("valid metric");
        let cache_total = IntCounterVec::new(
            Opts::new(
                "gatehouse_cache_total",
                "Response cache results by route: hit, miss, stale (served stale), revalidated, coalesced (waited for another request's fill), bypass",
            ),
            &["route", "result"],
        )
        .expect("static metric definition is valid");
        let cache_evictions = prometheus::IntCounter::new(
            "gatehouse_cache_evictions_total",
            "Cached objects evicted to stay within [cache] max_size",
        )
        .expect("static metric definition is valid");
        let cache_bytes = prometheus::IntGauge::new(
            "gatehouse_cache_bytes",
            "Bytes held by the response cache (bodies, headers and per-object overhead)",
        )
        .expect("static metric definition is valid");
        let cache_objects =
            prometheus::IntGauge::new("gatehouse_cache_objects", "URLs held by the response cache")
                .expect("static metric definition is valid");
        for c in [
            Box::new(requests_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cache_total.clone()),
            Box::new(broker_publishes_total.clone()),
            Box::new(plugin_calls_total.clone()),
            Box::new(plugin_errors_total.clone()),
            Box::new(plugin_seconds_total.clone()),
            Box::new(consumer_deliveries_total.clone()),
            Box::new(consumer_pending.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_objects.clone()),
            Box::new(aggregate_calls_total.clone()),
            Box::new(aggregate_call_seconds.clone()),
            Box::new(rate_limit_total.clone()),
            Box::new(rate_limit_store_failures.clone()),
            Box::new(rate_limit_store_seconds.clone()),
            Box::new(ip_rate_limited.clone()),
            Box::new(auth_total.clone()),
            Box::new(jwks_fetches_total.clone()),
            Box::new(connections_total.clone()),
            Box::new(connections_parked.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_requests_total.clone()),
            Box::new(endpoint_requests_total.clone()),
            Box::new(discovery_total.clone()),
            Box::new(resilience_total.clone()),
            Box::new(circuit_state.clone()),
            Box::new(upstream_endpoints.clone()),
            Box::new(config_reloads_total.clone()),
            Box::new(config_generation.clone()),
        ] {
            registry
                .register(c)
                .expect("each family is registered once, in this constructor");
        }
        // Make both results visible from the start.
        config_reloads_total.with_label_values(&["success"]);
        config_reloads_total.with_label_values(&["failure"]);
        Metrics {
            registry,
            auth_total,
            jwks_fetches_total,
            rate_limit_total,
            rate_limit_store_failures,
            rate_limit_store_seconds,
            ip_rate_limited,
            aggregate_calls_total,
            aggregate_call_seconds,
            cache_total,
            broker_publishes_total,
            plugin_calls_total,
            plugin_errors_total,
            plugin_seconds_total,
            consumer_deliveries_total,
            consumer_pending,
            cache_evictions,
            cache_bytes,
            cache_objects,
            connections_total,
            connections_parked,
            requests_total,
            request_duration,
            upstream_requests_total,
            endpoint_requests_total,
            discovery_total,
            resilience_total,
            circuit_state,
            upstream_endpoints,
            config_reloads_total,
            config_generation,
        }
    }

    /// Handles for one route (or for requests that matched no route: `frontend=""`, `route=""`).
    pub(crate) fn route(&self, frontend: &str, route: &str) -> RouteMetrics {
        RouteMetrics {
            frontend: frontend.into(),
            route: route.into(),
            duration: self.request_duration.with_label_values(&[frontend, route]),
            family: self.requests_total.clone(),
            counters: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    pub(crate) fn service(&self, service: &str) -> ServiceMetrics {
        ServiceMetrics {
            service: service.into(),
            family: self.upstream_requests_total.clone(),
            endpoints: self.endpoint_requests_total.clone(),
            discovery: self.discovery_total.clone(),
            resilience: std::array::from_fn(|i| {
                self.resilience_total
                    .with_label_values(&[service, Resilience::ALL[i].label()])
            }),
            counters: std::array::from_fn(|_| OnceLock::new()),
            errors: std::array::from_fn(|i| {
                self.upstream_requests_total
                    .with_label_values(&[service, UpstreamErrorKind::ALL[i].label()])
            }),
        }
    }

    /// The Prometheus text exposition of every family.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Methods and statuses that get a pre-resolved counter slot; others take the slower labelled
/// path (a lookup inside the prometheus crate), which is correct, only not free.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];
const STATUSES: [u16; 24] = [
    200, 201, 202, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429, 500,
    501, 502, 503, 504, 101,
];

fn method_slot(m: &Method) -> Option<usize> {
    METHODS.iter().position(|x| x == m)
}

fn status_slot(s: u16) -> Option<usize> {
    STATUSES.iter().position(|&x| x == s)
}

fn status_label(s: &StatusCode) -> &str {
    s.as_str()
}

pub(crate) struct RouteMetrics {
    frontend: Box<str>,
    route: Box<str>,
    duration: prometheus::Histogram,
    family: IntCounterVec,
    counters: [OnceLock<IntCounter>; METHODS.len() * STATUSES.len()],
}

impl RouteMetrics {
    pub(crate) fn frontend(&self) -> &str {
        &self.frontend
    }
    pub(crate) fn route(&self) -> &str {
        &self.route
    }

    pub(crate) fn record(&self, method: &Method, status: StatusCode, seconds: f64) {
        self.duration.observe(seconds);
        match (method_slot(method), status_slot(status.as_u16())) {
            (Some(m), Some(s)) => self.counters[m * STATUSES.len() + s]
                .get_or_init(|| {
                    self.family.with_label_values(&[
                        &*self.frontend,
                        &*self.route,
                        method.as_str(),
                        status_label(&status),
                    ])
                })
                .inc(),
            _ => self
                .family
                .with_label_values(&[
                    &*self.frontend,
                    &*self.route,
                    method.as_str(),
                    status_label(&status),
                ])
                .inc(),
        }
    }
}

/// Why a request to a backend did not produce a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] = [Self::Connect, Self::Timeout, Self::Reset];
    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect_error",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
        }
    }
}

/// Resilience events, counted per service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resilience {
    Retry,
    BudgetExhausted,
    CircuitOpen,
    Overloaded,
}

impl Resilience {
    const ALL: [Resilience; 4] = [
        Self::Retry,
        Self::BudgetExhausted,
        Self::CircuitOpen,
        Self::Overloaded,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Retry => "retry",
            Self::BudgetExhausted => "retry_budget_exhausted",
            Self::CircuitOpen => "circuit_open",
            Self::Overloaded => "overloaded",
        }
    }
}

pub(crate) struct ServiceMetrics {
    service: Box<str>,
    family: IntCounterVec,
    endpoints: IntCounterVec,
    discovery: IntCounterVec,
    resilience: [IntCounter; 4],
    counters: [OnceLock<IntCounter>; STATUSES.len()],
    errors: [IntCounter; 3],
}

impl ServiceMetrics {
    pub(crate) fn response(&self, status: StatusCode) {
        match status_slot(status.as_u16()) {
            Some(s) => self.counters[s]
                .get_or_init(|| {
                    self.family
                        .with_label_values(&[&*self.service, status_label(&status)])
                })
                .inc(),
            None => self
                .family
                .with_label_values(&[&*self.service, status_label(&status)])
                .inc(),
        }
    }

    pub(crate) fn error(&self, kind: UpstreamErrorKind) {
        self.errors[kind as usize].inc();
    }

    pub(crate) fn resilience(&self, event: Resilience) {
        self.resilience[event as usize].inc();
    }

    /// Counts one discovery lookup (off the request path).
    pub(crate) fn discovery(&self, result: &str) {
        self.discovery
            .with_label_values(&[&*self.service, result])
            .inc();
    }

    /// The success and failure counters of one endpoint, resolved once when it is built.
    pub(crate) fn endpoint_counters(&self, url: &str) -> [IntCounter; 2] {
        [
            self.endpoints
                .with_label_values(&[&*self.service, url, "success"]),
            self.endpoints
                .with_label_values(&[&*self.service, url, "failure"]),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_registered() {
        let m = Metrics::new();
        // Families without a labelled child show up once a child exists.
        m.route("web", "x")
            .record(&Method::GET, StatusCode::OK, 0.01);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "gatehouse_requests_total",
            "gatehouse_request_duration_seconds",
            "gatehouse_config_generation",
            "gatehouse_connections_parked",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
