//! Discovery: background tasks that find a service's endpoints and publish them to its
//! `EndpointTable`. DNS A/AAAA (`dns`) and SRV (`dns_srv`) are re-resolved when their TTL runs
//! out, bounded by `[dns] min_refresh` and `max_refresh`. A failed lookup or an empty answer
//! never empties a service: the last good set stays, and the failure is logged and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;

use super::table::EndpointTable;
use crate::config::DnsConfig;
use tokio::task::JoinHandle;

/// The system's resolver configuration cannot be read (no `[dns] servers` given).
#[derive(Debug, thiserror::Error)]
#[error("system resolver: {0}")]
pub(crate) struct ResolverError(#[from] hickory_resolver::ResolveError);

/// A resolver for `[dns]`: its servers, or the system's.
pub(crate) fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, ResolverError> {
    let mut builder = if cfg.servers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let mut rc = ResolverConfig::new();
        for s in &cfg.servers {
            rc.add_name_server(NameServerConfig::new(*s, Protocol::Udp));
            rc.add_name_server(NameServerConfig::new(*s, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(rc, TokioConnectionProvider::default())
    };
    let opts = builder.options_mut();
    // Cached answers never outlive max_refresh, so each refresh sees the server's current data.
    opts.positive_max_ttl = Some(cfg.max_refresh.get());
    opts.negative_max_ttl = Some(cfg.min_refresh.get());
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    Ok(builder.build())
}

/// What a DNS discovery task resolves.
#[derive(Debug, Clone)]
pub(crate) enum DnsTarget {
    /// A/AAAA records, each an endpoint `scheme://ip:port`.
    Host {
        name: String,
        port: u16,
        scheme: String,
    },
    /// SRV records: the targets of the lowest priority, with their ports and weights.
    Srv { name: String, scheme: String },
}

pub(crate) fn spawn_dns(
    table: Arc<EndpointTable>,
    resolver: TokioResolver,
    target: DnsTarget,
    cfg: DnsConfig,
) -> Option<JoinHandle<()>> {
    let handle = tokio::runtime::Handle::try_current().ok()?;
    Some(handle.spawn(async move {
        loop {
            let wait = match resolve(&resolver, &target).await {
                Ok((list, valid_until)) => {
                    match table.publish(list) {
                        Ok(true) => {
                            let n = table.snapshot().endpoints.len();
                            tracing::info!(service = &*table.service, endpoints = n, "discovery: endpoints updated");
                            table.metrics.discovery("updated");
                        }
                        Ok(false) => table.metrics.discovery("unchanged"),
                        Err(msg) => {
                            tracing::warn!(service = &*table.service, "discovery: {msg}");
                            table.metrics.discovery("empty");
                        }
                    }
                    valid_until.saturating_duration_since(Instant::now())
                }
                Err(e) => {
                    tracing::warn!(service = &*table.service, error = %e, "discovery: lookup failed; keeping the previous endpoints");
                    table.metrics.discovery("error");
                    cfg.min_refresh.get()
                }
            };
            tokio::time::sleep(refresh_after(wait, &cfg)).await;
        }
    }))
}

/// A lookup's outcome: endpoints (possibly none, for "no such records") and until when they
/// hold; or the error of a lookup that failed.
/// How long to wait before the next lookup: the answer's TTL, bounded by `[dns] min_refresh`
/// and `max_refresh`.
fn refresh_after(ttl: Duration, cfg: &DnsConfig) -> Duration {
    ttl.clamp(cfg.min_refresh.get(), cfg.max_refresh.get())
}

async fn resolve(
    resolver: &TokioResolver,
    target: &DnsTarget,
) -> Result<(Vec<(String, u32)>, Instant), String> {
    let no_records =
        |e: &hickory_resolver::ResolveError| e.is_no_records_found() || e.is_nx_domain();
    match target {
        DnsTarget::Host { name, port, scheme } => {
            let lookup = match resolver.lookup_ip(name.as_str()).await {
                Ok(l) => l,
                Err(e) if no_records(&e) => return Ok((Vec::new(), Instant::now())),
                Err(e) => return Err(e.to_string()),
            };
            let list = lookup
                .iter()
                .map(|ip| (format!("{scheme}://{}", SocketAddr::new(ip, *port)), 1))
                .collect();
            Ok((list, lookup.valid_until()))
        }
        DnsTarget::Srv { name, scheme } => {
            let srv = match resolver.srv_lookup(name.as_str()).await {
                Ok(l) => l,
                Err(e) if no_records(&e) => return Ok((Vec::new(), Instant::now())),
                Err(e) => return Err(e.to_string()),
            };
            let mut valid_until = srv.as_lookup().valid_until();
            let best = srv.iter().map(|r| r.priority()).min();
            let mut list = Vec::new();
            let mut last_err = None;
            for r in srv.iter().filter(|r| Some(r.priority()) == best) {
                // A target that does not resolve is skipped; the others still count.
                let ips = match resolver.lookup_ip(r.target().clone()).await {
                    Ok(ips) => ips,
                    Err(e) => {
                        last_err = Some(format!("SRV target {}: {e}", r.target()));
                        continue;
                    }
                };
                valid_until = valid_until.min(ips.valid_until());
                for ip in ips.iter() {
                    let url = format!("{scheme}://{}", SocketAddr::new(ip, r.port()));
                    list.push((url, u32::from(r.weight()).max(1)));
                }
            }
            match (list.is_empty(), last_err) {
                (true, Some(e)) => Err(e),
                _ => Ok((list, valid_until)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_respected_within_the_bounds() {
        let cfg = DnsConfig {
            servers: Vec::new(),
            min_refresh: crate::config::Duration::from_secs(1),
            max_refresh: crate::config::Duration::from_secs(30),
        };
        assert_eq!(
            refresh_after(Duration::from_secs(10), &cfg),
            Duration::from_secs(10)
        );
        assert_eq!(
            refresh_after(Duration::from_millis(10), &cfg),
            Duration::from_secs(1)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(3600), &cfg),
            Duration::from_secs(30)
        );
    }
}
