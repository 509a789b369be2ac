//! A service's current endpoint set, swapped as a whole when discovery publishes a new list.
//! Endpoints that stay in the list keep their state (health, in-flight count, ejection), so a
//! re-listing never resets what the gateway learned about them.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::balance::{Balancer, HashKey};
use super::endpoint::Endpoint;
use crate::config::LoadBalancing;
use crate::observe::metrics::ServiceMetrics;

/// One published endpoint list with the balancer built for it.
pub(crate) struct EndpointSet {
    pub(crate) endpoints: Box<[Arc<Endpoint>]>,
    pub(crate) balancer: Balancer,
}

/// Weights above this are capped (they size the round-robin schedule and the hash ring).
pub(crate) const MAX_WEIGHT: u32 = 1000;

pub(crate) struct EndpointTable {
    pub(crate) service: Arc<str>,
    set: ArcSwap<EndpointSet>,
    kind: LoadBalancing,
    key: Option<HashKey>,
    pub(crate) metrics: ServiceMetrics,
}

impl EndpointTable {
    pub(crate) fn new(
        service: Arc<str>,
        kind: LoadBalancing,
        key: Option<HashKey>,
        metrics: ServiceMetrics,
        initial: Vec<Endpoint>,
    ) -> Self {
        let endpoints: Vec<Arc<Endpoint>> = initial
            .into_iter()
            .map(|e| {
                let _ = e.counters.set(metrics.endpoint_counters(&e.url));
                Arc::new(e)
            })
            .collect();
        let balancer = Balancer::new(kind, key.clone(), &endpoints);
        EndpointTable {
            service,
            set: ArcSwap::from_pointee(EndpointSet {
                endpoints: endpoints.into_boxed_slice(),
                balancer,
            }),
            kind,
            key,
            metrics,
        }
    }

    /// Starts with endpoints shared with a previous table, keeping their state.
    pub(crate) fn seed(&self, endpoints: Vec<Arc<Endpoint>>) {
        if endpoints.is_empty() {
            return;
        }
        let balancer = Balancer::new(self.kind, self.key.clone(), &endpoints);
        self.set.store(Arc::new(EndpointSet {
            endpoints: endpoints.into_boxed_slice(),
            balancer,
        }));
    }

    /// The set in use (lock-free).
    pub(crate) fn current(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.set.load()
    }

    pub(crate) fn snapshot(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }

    /// Publishes a new list of `(url, weight)`. Known endpoints keep their state. An empty list
    /// is refused: discovery keeps the last good set rather than emptying a service. Returns
    /// whether the set changed.
    pub(crate) fn publish(&self, mut list: Vec<(String, u32)>) -> Result<bool, String> {
        if list.is_empty() {
            return Err("empty endpoint list; keeping the previous one".into());
        }
        // One endpoint per URL; if discovery lists a URL twice, its larger weight wins.
        list.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        list.dedup_by(|later, first| later.0 == first.0);
        let old = self.snapshot();
        let unchanged = old.endpoints.len() == list.len()
            && old
                .endpoints
                .iter()
                .zip(&list)
                .all(|(e, (url, w))| &*e.url == url && e.weight == *w);
        if unchanged {
            return Ok(false);
        }
        let known: HashMap<&str, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (&*e.url, e)).collect();
        let mut endpoints = Vec::with_capacity(list.len());
        for (url, weight) in &list {
            let weight = (*weight).clamp(1, MAX_WEIGHT);
            match known.get(url.as_str()) {
                Some(e) if e.weight == weight => endpoints.push(Arc::clone(e)),
                _ => match Endpoint::parse(url) {
                    Ok(e) => {
                        let e = e.with_weight(weight);
                        let _ = e.counters.set(self.metrics.endpoint_counters(&e.url));
                        endpoints.push(Arc::new(e));
                    }
                    // One bad entry does not block the others.
                    Err(msg) => tracing::warn!(
                        service = &*self.service,
                        "discovery: skipping an endpoint: {msg}"
                    ),
                },
            }
        }
        if endpoints.is_empty() {
            return Err("no valid endpoint in the list; keeping the previous one".into());
        }
        let balancer = Balancer::new(self.kind, self.key.clone(), &endpoints);
        self.set.store(Arc::new(EndpointSet {
            endpoints: endpoints.into_boxed_slice(),
            balancer,
        }));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relisting_keeps_endpoint_state() {
        let m = crate::observe::metrics::Metrics::new();
        let t = EndpointTable::new(
            Arc::from("svc"),
            LoadBalancing::RoundRobin,
            None,
            m.service("svc"),
            vec![Endpoint::parse("http://10.0.0.1:80").unwrap()],
        );
        let first = t.snapshot().endpoints[0].clone();
        let _busy = first.start();
        assert!(t
            .publish(vec![
                ("http://10.0.0.2:80".into(), 1),
                ("http://10.0.0.1:80".into(), 1)
            ])
            .unwrap());
        let set = t.snapshot();
        assert_eq!(set.endpoints.len(), 2);
        let again = set
            .endpoints
            .iter()
            .find(|e| &*e.url == "http://10.0.0.1:80")
            .unwrap();
        assert!(Arc::ptr_eq(again, &first));
        assert_eq!(again.in_flight(), 1);
        assert!(!t
            .publish(vec![
                ("http://10.0.0.1:80".into(), 1),
                ("http://10.0.0.2:80".into(), 1)
            ])
            .unwrap());
        assert!(t.publish(Vec::new()).is_err());
        assert_eq!(t.snapshot().endpoints.len(), 2);
        // The same URL twice is one endpoint, with the larger weight.
        t.publish(vec![
            ("http://10.0.0.3:80".into(), 2),
            ("http://10.0.0.3:80".into(), 5),
        ])
        .unwrap();
        let set = t.snapshot();
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(set.endpoints[0].weight, 5);
    }
}
