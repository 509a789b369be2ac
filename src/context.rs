//! What the gateway knows about one request, as a typed request extension: the `Exchange`.
//! The dispatcher makes it once per routed request (the matched route, its captured
//! parameters, the client's original URI and authority, the client connection), and every
//! layer and backend below reads it from `req.extensions()`. It also carries what the gateway
//! learns about the response (`ResponseMeta`: the upstream used, attempts, guards that must
//! live until the client's body ends), so that a layer that buffers or replaces the response
//! body loses none of it: the access record holds the same `Exchange` until the body ends.
//!
//! One allocation per request (the `Arc`); the metadata cells are written once, without locks.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Uri};

/// The context of one request. Cloned by reference count.
#[derive(Clone)]
pub(crate) struct Exchange(Arc<Inner>);

struct Inner {
    route: Arc<RouteInfo>,
    uri: Uri,
    /// The normalized path when it differs from the URI's path.
    normalized: Option<Box<str>>,
    params: Params,
    host: Option<HeaderValue>,
    request_id: HeaderValue,
    client: Client,
    started: std::time::Instant,
    /// Who the request is from, once authentication has said so.
    identity: OnceLock<Identity>,
    /// The path a plugin rewrote the request to (the upstream path is built from it).
    rewritten: OnceLock<Box<str>>,
    meta: ResponseMeta,
}

/// Who a request is from, as authentication established it.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// The provider that accepted the request (`[auth.*.NAME]`).
    pub(crate) provider: Arc<str>,
    /// The claims of a JWT.
    pub(crate) claims: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    /// The consumer of an API key.
    pub(crate) consumer: Option<Arc<str>>,
}

/// The client connection a request came on.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    #[allow(dead_code)]
    // API of the seam: read by the layers and backends to come (auth, cache, aggregate, plugins)
    pub(crate) peer: SocketAddr,
    /// The peer's IP as a header value, made once per connection.
    pub(crate) peer_ip: HeaderValue,
    pub(crate) tls: bool,
    /// Whether the peer is one of `[server] trusted_proxies`.
    pub(crate) trusted: bool,
}

/// What a request's context knows of its route: one shared value per compiled route.
#[derive(Debug)]
pub(crate) struct RouteInfo {
    /// `frontend/route`.
    pub(crate) id: Box<str>,
    /// The names the route's path captures, in order — when something in the route reads
    /// them (a proxy's path template; the layers and backends to come say so when they are
    /// built). Empty otherwise, and then the dispatcher does not collect their values: matchit
    /// hands them over as `&str`, checking each one's UTF-8 (~200 instructions a request).
    pub(crate) params: Box<[Box<str>]>,
}

/// Everything the dispatcher found out before the route's stack runs.
pub(crate) struct Parts {
    pub(crate) route: Arc<RouteInfo>,
    pub(crate) uri: Uri,
    pub(crate) normalized: Option<Box<str>>,
    pub(crate) params: Params,
    pub(crate) host: Option<HeaderValue>,
    pub(crate) request_id: HeaderValue,
    pub(crate) client: Client,
    /// When the dispatcher took the request (before the route's deadline started).
    pub(crate) started: std::time::Instant,
    /// Whether anything reads which upstream answered (the access log does): when nothing
    /// does, the proxy does not record it.
    pub(crate) wants_upstream: bool,
}

impl Exchange {
    pub(crate) fn new(p: Parts) -> Self {
        Exchange(Arc::new(Inner {
            route: p.route,
            uri: p.uri,
            normalized: p.normalized,
            params: p.params,
            host: p.host,
            request_id: p.request_id,
            client: p.client,
            started: p.started,
            identity: OnceLock::new(),
            rewritten: OnceLock::new(),
            meta: ResponseMeta {
                wants_upstream: p.wants_upstream,
                ..ResponseMeta::default()
            },
        }))
    }

    /// `frontend/route`.
    #[allow(dead_code)] // API of the seam: read by the layers and backends to come (auth, cache, aggregate, plugins)
    pub(crate) fn route(&self) -> &str {
        &self.0.route.id
    }

    /// The request target as the client sent it.
    #[allow(dead_code)] // API of the seam: read by the layers and backends to come (auth, cache, aggregate, plugins)
    pub(crate) fn original_uri(&self) -> &Uri {
        &self.0.uri
    }

    /// The normalized path the route matched.
    pub(crate) fn path(&self) -> &str {
        if let Some(p) = self.0.rewritten.get() {
            return p;
        }
        self.0.normalized.as_deref().unwrap_or(self.0.uri.path())
    }

    /// The path the route matched (normalized), whatever a plugin rewrote since.
    fn matched_path(&self) -> &str {
        self.0.normalized.as_deref().unwrap_or(self.0.uri.path())
    }

    /// Rewrites the path the backend builds its target from (once per request: false when a
    /// rewrite was made already).
    pub(crate) fn rewrite_path(&self, path: &str) -> bool {
        self.0.rewritten.set(path.into()).is_ok()
    }

    /// The query as the client sent it.
    pub(crate) fn query(&self) -> Option<&str> {
        self.0.uri.query()
    }

    /// A captured path parameter by name.
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        self.params().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every captured parameter, in the order of the route's path.
    #[allow(dead_code)] // API of the seam: read by the layers and backends to come (auth, cache, aggregate, plugins)
    pub(crate) fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        // The values are spans of the path the route matched (not of a plugin's rewrite).
        let path = self.matched_path();
        self.0
            .route
            .params
            .iter()
            .zip(self.0.params.spans())
            .map(move |(n, (s, e))| (&**n, path.get(s as usize..e as usize).unwrap_or("")))
    }

    /// The authority the request was routed by (Host, or HTTP/2 `:authority`).
    pub(crate) fn host(&self) -> Option<&HeaderValue> {
        self.0.host.as_ref()
    }

    pub(crate) fn request_id(&self) -> &HeaderValue {
        &self.0.request_id
    }

    pub(crate) fn client(&self) -> &Client {
        &self.0.client
    }

    /// When the dispatcher took the request: before the route's deadline started its timer.
    pub(crate) fn started(&self) -> std::time::Instant {
        self.0.started
    }

    /// What the gateway learned about the response.
    pub(crate) fn meta(&self) -> &ResponseMeta {
        &self.0.meta
    }

    /// Who the request is from (set once, by authentication).
    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.0.identity.get()
    }

    pub(crate) fn set_identity(&self, id: Identity) {
        let _ = self.0.identity.set(id);
    }

    /// The context of a call the gateway makes on this request's behalf (external auth,
    /// an aggregate's calls): the same route, URI and client, a response record of its own.
    pub(crate) fn sub_request(&self) -> Exchange {
        let i = &self.0;
        Exchange(Arc::new(Inner {
            route: i.route.clone(),
            uri: i.uri.clone(),
            normalized: i.normalized.clone(),
            params: i.params.clone(),
            host: i.host.clone(),
            request_id: i.request_id.clone(),
            client: i.client.clone(),
            started: i.started,
            identity: OnceLock::new(),
            rewritten: OnceLock::new(),
            meta: ResponseMeta::default(),
        }))
    }
}

/// Which upstream endpoint answered, after how many attempts.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamUsed {
    pub(crate) url: Arc<str>,
    pub(crate) attempts: u32,
}

/// Response metadata, each cell written at most once by the part of the stack that knows it.
#[derive(Default)]
pub(crate) struct ResponseMeta {
    wants_upstream: bool,
    upstream: OnceLock<UpstreamUsed>,
    /// Held until the client's response body ends (the service's bulkhead slot).
    guard: OnceLock<tokio::sync::OwnedSemaphorePermit>,
    /// An aggregate's calls and how each ended (`user:ok orders:timeout`), for the log.
    calls: OnceLock<Box<str>>,
}

impl ResponseMeta {
    /// Whether `upstream` is read by anything (a part that knows it may skip recording it).
    pub(crate) fn wants_upstream(&self) -> bool {
        self.wants_upstream
    }

    pub(crate) fn set_upstream(&self, used: UpstreamUsed) {
        let _ = self.upstream.set(used);
    }

    pub(crate) fn upstream(&self) -> Option<&UpstreamUsed> {
        self.upstream.get()
    }

    pub(crate) fn set_calls(&self, summary: Box<str>) {
        let _ = self.calls.set(summary);
    }

    pub(crate) fn calls(&self) -> Option<&str> {
        self.calls.get().map(|s| &**s)
    }

    /// Keeps `permit` until the exchange ends (the response body ended or was dropped).
    pub(crate) fn hold(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        let _ = self.guard.set(permit);
    }
}

/// The path parameters a route captured, as byte ranges of the matched path (the names are the
/// route's, in `RouteInfo`). Up to `INLINE` parameters are kept without allocating.
#[derive(Clone, Default)]
pub(crate) struct Params {
    inline: [(u32, u32); INLINE],
    len: u8,
    more: Vec<(u32, u32)>,
}

const INLINE: usize = 4;

impl Params {
    /// Records the next parameter's value, `value` being a slice of `path`. A value that is
    /// not part of `path` is refused (`false`).
    pub(crate) fn push(&mut self, path: &str, value: &str) -> bool {
        let base = path.as_ptr() as usize;
        let at = value.as_ptr() as usize;
        let Some(start) = at.checked_sub(base) else {
            return false;
        };
        if start + value.len() > path.len() {
            return false;
        }
        let span = (start as u32, (start + value.len()) as u32);
        if usize::from(self.len) < INLINE {
            self.inline[usize::from(self.len)] = span;
            self.len += 1;
        } else {
            self.more.push(span);
        }
        true
    }

    fn spans(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.inline[..usize::from(self.len)]
            .iter()
            .chain(self.more.iter())
            .copied()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An exchange for `uri` whose route captured `names` with `values` (each found in the
    /// path in turn, as matchit hands them over: slices of the path).
    pub(crate) fn exchange(uri: &str, names: &[&str], values: &[&str]) -> Exchange {
        with_client(uri, names, values, None, false, false)
    }

    pub(crate) fn with_client(
        uri: &str,
        names: &[&str],
        values: &[&str],
        host: Option<&'static str>,
        trusted: bool,
        tls: bool,
    ) -> Exchange {
        let uri: Uri = uri.parse().unwrap();
        let path = uri.path().to_owned();
        let mut params = Params::default();
        let mut rest = 0;
        for v in values {
            let at = rest + path[rest..].find(v).unwrap();
            assert!(params.push(&path, &path[at..at + v.len()]));
            rest = at + v.len();
        }
        Exchange::new(Parts {
            route: Arc::new(RouteInfo {
                id: "web/x".into(),
                params: names.iter().map(|n| Box::from(*n)).collect(),
            }),
            uri,
            normalized: None,
            params,
            host: host.map(HeaderValue::from_static),
            request_id: HeaderValue::from_static("rid-1"),
            client: Client {
                peer: "10.0.0.9:5000".parse().unwrap(),
                peer_ip: HeaderValue::from_static("10.0.0.9"),
                tls,
                trusted,
            },
            started: std::time::Instant::now(),
            wants_upstream: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(uri: &str, normalized: Option<&str>, names: &[&str], values: &[&str]) -> Exchange {
        let uri: Uri = uri.parse().unwrap();
        let normalized: Option<Box<str>> = normalized.map(Box::from);
        let path = normalized.as_deref().unwrap_or(uri.path()).to_owned();
        let mut params = Params::default();
        // Values as matchit hands them over: slices of the path it matched.
        let mut rest = path.as_str();
        for v in values {
            let at = rest.find(v).unwrap();
            let slice = &rest[at..at + v.len()];
            assert!(params.push(&path, slice));
            rest = &rest[at + v.len()..];
        }
        // The exchange keeps its own copy of the path: the spans must index into that one.
        Exchange::new(Parts {
            route: Arc::new(RouteInfo {
                id: "web/user".into(),
                params: names.iter().map(|n| Box::from(*n)).collect(),
            }),
            uri,
            normalized,
            params,
            host: None,
            request_id: HeaderValue::from_static("id"),
            client: Client {
                peer: "127.0.0.1:1".parse().unwrap(),
                peer_ip: HeaderValue::from_static("127.0.0.1"),
                tls: false,
                trusted: false,
            },
            started: std::time::Instant::now(),
            wants_upstream: true,
        })
    }

    #[test]
    fn parameters_are_read_back_by_name_and_in_order() {
        let x = exchange(
            "/web/users/42/files/a/b?x=1",
            None,
            &["id", "a", "b", "c", "rest"],
            &["42", "f", "i", "l", "a/b"],
        );
        assert_eq!(x.param("id"), Some("42"));
        assert_eq!(x.param("rest"), Some("a/b"), "the fifth one spills");
        assert_eq!(x.param("nope"), None);
        let all: Vec<_> = x.params().collect();
        assert_eq!(all.len(), 5);
        assert_eq!(all[0], ("id", "42"));
        assert_eq!(x.query(), Some("x=1"));
        assert_eq!(x.path(), "/web/users/42/files/a/b");
    }

    #[test]
    fn a_normalized_path_is_the_one_parameters_index() {
        let x = exchange("/web/./users//7", Some("/web/users/7"), &["id"], &["7"]);
        assert_eq!(x.path(), "/web/users/7");
        assert_eq!(x.original_uri().path(), "/web/./users//7");
        assert_eq!(x.param("id"), Some("7"));
    }

    #[test]
    fn a_value_outside_the_path_is_refused() {
        let mut p = Params::default();
        let other = String::from("elsewhere");
        assert!(!p.push("/a/b", &other));
        assert_eq!(p.len, 0);
    }

    #[test]
    fn metadata_is_written_once() {
        let x = exchange("/", None, &[], &[]);
        x.meta().set_upstream(UpstreamUsed {
            url: Arc::from("http://a"),
            attempts: 2,
        });
        x.meta().set_upstream(UpstreamUsed {
            url: Arc::from("http://b"),
            attempts: 1,
        });
        let u = x.clone().meta().upstream().cloned().unwrap();
        assert_eq!((&*u.url, u.attempts), ("http://a", 2));
    }
}
