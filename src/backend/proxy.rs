//! `proxy = { service, path }`: forwards the request to one endpoint of a service and streams
//! both bodies through. The dispatcher has already set the upstream path and the forwarding
//! headers; here the endpoint is chosen, hop-by-hop headers are removed in both directions, and
//! WebSocket (or any HTTP/1.1) upgrades are spliced into a byte tunnel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, PathAndQuery};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper_util::rt::TokioIo;

use crate::body::{ReqBody, RespBody};
use crate::error::{chain_has, BoxError, GatewayError};
use crate::observe::access::UpstreamUsed;
use crate::observe::metrics::UpstreamErrorKind;
use crate::upstream::Upstream;

#[derive(Clone)]
pub struct Proxy {
    upstream: Arc<Upstream>,
    preserve_host: bool,
}

impl Proxy {
    pub fn new(upstream: Arc<Upstream>, preserve_host: bool) -> Self {
        Proxy {
            upstream,
            preserve_host,
        }
    }
}

impl tower::Service<Request<ReqBody>> for Proxy {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.forward(req).await })
    }
}

impl Proxy {
    async fn forward(self, mut req: Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let up = &*self.upstream;
        let ep = up
            .pick(req.headers())
            .ok_or(GatewayError::NoHealthyEndpoint)?;
        let _in_flight = ep.start();
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        let mut uri = uri::Parts::default();
        uri.scheme = Some(ep.scheme.clone());
        uri.authority = Some(ep.authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        parts.uri = Uri::from_parts(uri).map_err(|_| GatewayError::BadRequest("request target"))?;
        parts.version = up.version;
        strip_hop_by_hop(&mut parts.headers, upgrade);
        if !self.preserve_host {
            parts.headers.remove(header::HOST);
        }

        let sent = up.client.request(Request::from_parts(parts, body));
        let result = match up.timeout {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r,
                Err(_) => {
                    up.metrics().error(UpstreamErrorKind::Timeout);
                    up.report(&ep, false);
                    return Err(GatewayError::UpstreamTimeout.into());
                }
            },
            None => sent.await,
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                let err = classify_client_error(up, e);
                // A body over the limit is the client's fault, not the endpoint's.
                if !matches!(
                    err.downcast_ref::<GatewayError>(),
                    Some(GatewayError::BodyTooLarge)
                ) {
                    up.report(&ep, false);
                }
                return Err(err);
            }
        };
        up.metrics().response(resp.status());
        up.report(&ep, !resp.status().is_server_error());

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            if let Some(client_side) = client_upgrade {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client_side, upstream_side));
            }
        }
        strip_hop_by_hop(resp.headers_mut(), switching);
        resp.extensions_mut().insert(UpstreamUsed(ep.url.clone()));
        Ok(resp.map(Either::Left))
    }
}

fn classify_client_error(up: &Upstream, e: hyper_util::client::legacy::Error) -> BoxError {
    if chain_has::<http_body_util::LengthLimitError>(&e) {
        return GatewayError::BodyTooLarge.into();
    }
    if e.is_connect() {
        up.metrics().error(UpstreamErrorKind::Connect);
        tracing::debug!(service = &*up.name, error = %e, "upstream connect failed");
        GatewayError::UpstreamConnect(e.into()).into()
    } else {
        up.metrics().error(UpstreamErrorKind::Reset);
        tracing::debug!(service = &*up.name, error = %e, "upstream request failed");
        GatewayError::UpstreamFailed(e.into()).into()
    }
}

/// Copies bytes both ways between the client and the upstream once both sides switched.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection closed with an error");
            }
        }
        (Err(e), _) | (_, Err(e)) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"upgrade"))
}

fn has_token(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// including any the `Connection` header names. For an upgrade, `Upgrade` and
/// `Connection: upgrade` are kept, since they must reach the other side.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    // `TE: trailers` is allowed through (gRPC needs it); other TE values are hop-by-hop.
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    fn upgrade_headers_survive_an_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("trailers"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["te"], "trailers");
    }
}
