//! Entry points for the fuzz targets in `fuzz/` (`cargo fuzz`): each feeds untrusted input to
//! one parser or checker of the gateway the way the request path or `gatehouse check` would.
//! Any outcome but a panic (or a hang) is fine. Not part of the gateway's API; always compiled,
//! so the targets cannot rot, and the corpus runs as a regression test (`tests/it/fuzz_corpus.rs`).

use std::path::Path;

/// Runs the fuzz target `target` on one input, as `cargo fuzz` would; `false` for an unknown
/// target. The targets: `config`, `env_expand`, `request_head`, `route_path`,
/// `auth_credentials`, `rate_limit_key`, `aggregate_template`, `cache_rules`,
/// `grpc_transcode`.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "config" => {
            let text = String::from_utf8_lossy(data);
            let (gateway, routes) = text.split_once('\0').unwrap_or((&text, ""));
            config(gateway, routes);
        }
        "env_expand" => expand(&String::from_utf8_lossy(data)),
        "request_head" => {
            if let Some(req) = parse_head(data) {
                request(req);
            }
        }
        "route_path" => {
            let text = String::from_utf8_lossy(data);
            let (path, host) = text.split_once('\0').unwrap_or((&text, "shop.example"));
            if let Ok(req) = Request::get(path).header("host", host).body(()) {
                request(req);
            }
        }
        "auth_credentials" => crate::layers::auth::fuzz_credentials(data),
        "rate_limit_key" => crate::layers::rate_limit::key::fuzz_key(data),
        "aggregate_template" => crate::backend::aggregate::fuzz_render(data),
        "cache_rules" => crate::layers::cache::key::fuzz_key(data),
        "grpc_transcode" => crate::backend::grpc::fuzz_transcode(data),
        _ => return false,
    }
    true
}

/// A raw HTTP/1 request head, parsed as hyper parses it (httparse).
fn parse_head(data: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(data).ok()?;
    let version = match parsed.version? {
        0 => http::Version::HTTP_10,
        _ => http::Version::HTTP_11,
    };
    let mut b = Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?)
        .version(version);
    for h in parsed.headers.iter() {
        b = b.header(h.name, h.value);
    }
    b.body(()).ok()
}
use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Request};

use crate::config::source::parse_text;
use crate::config::{FrontendFile, GatewayConfig, LoadedConfig};
use crate::context::{Client, Exchange, Params, Parts};
use crate::observe::metrics::Metrics;
use crate::routing::head::{check_head, Limits};
use crate::routing::{normalize, Found};

/// `${VAR}` expansion of a config file's text (variables: `A`=`x`, `B`=`"quoted\nline"`).
pub fn expand(text: &str) {
    let _ = crate::config::source::expand_env(Path::new("fuzz.toml"), text, |n| match n {
        "A" => Some("x".into()),
        "B" => Some("\"quoted\nline\"".into()),
        _ => None,
    });
}

/// Loading and checking a config: `gateway` as gateway.toml, `routes` as one route file, parsed
/// with located errors and compiled as `gatehouse check` does (without reading TLS files).
pub fn config(gateway: &str, routes: &str) {
    let parsed = parse_text::<GatewayConfig>(Path::new("gateway.toml"), gateway, |_| None);
    let Ok((gateway_file, mut gateway)) = parsed else {
        return;
    };
    // Files named by the input are not read: a fuzzer could name /dev/zero.
    gateway.server.tls = None;
    for s in gateway.services.values_mut() {
        s.get_mut().tls = None;
    }
    let mut frontends = Vec::new();
    if let Ok(f) = parse_text::<FrontendFile>(Path::new("routes/fuzz.toml"), routes, |_| None) {
        frontends.push(f);
    }
    let loaded = LoadedConfig {
        gateway_ok: true,
        root: "/nonexistent".into(),
        gateway_file,
        gateway,
        frontends,
    };
    let _ = crate::gateway::compile(loaded, None, metrics(), 1);
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// The request head as the dispatcher sees it: the head checks (limits, one authority,
/// codings, underscores), path normalization, routing, the `Exchange` and the forwarding
/// headers, and a proxy's upstream target.
pub fn request(mut req: Request<()>) {
    let limits = Limits {
        max_uri: 8192,
        max_header_line: 8192,
        max_head: 32768,
        max_headers: 100,
        underscores: crate::config::Underscores::Drop,
    };
    let Ok(authority) = check_head(&mut req, &limits) else {
        return;
    };
    let Ok(path) = normalize(req.uri().path()) else {
        return;
    };
    let gw = gateway();
    let host = authority
        .as_ref()
        .map_or(std::borrow::Cow::Borrowed(""), |a| a.host());
    let Found::Route { index, params } = gw.router.find(&host, &path, req.method(), req.headers())
    else {
        return;
    };
    let route = &gw.routes[index];
    let mut captured = Params::default();
    for (_, v) in params.iter() {
        assert!(
            captured.push(&path, v),
            "matchit values are slices of the path"
        );
    }
    let normalized = match &path {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(p) => Some(p.clone().into_boxed_str()),
    };
    let x = Exchange::new(Parts {
        route: route.info.clone(),
        uri: req.uri().clone(),
        normalized,
        params: captured,
        host: authority.map(|a| a.into_value()),
        request_id: HeaderValue::from_static("fuzz"),
        client: Client {
            peer: ([127, 0, 0, 1], 1).into(),
            peer_ip: HeaderValue::from_static("127.0.0.1"),
            tls: false,
            trusted: req.headers().contains_key("x-trusted"),
        },
        started: std::time::Instant::now(),
        wants_upstream: false,
    });
    for (name, value) in x.params() {
        assert!(x.path().contains(value) || value.is_empty(), "{name}");
    }
    crate::backend::forward::forwarding_headers(req.headers_mut(), &x);
    for tpl in ["/v1/{id}/{rest}", "/x"] {
        let names: Vec<String> = x.params().map(|(n, _)| n.to_owned()).collect();
        if let Ok(t) = crate::backend::target::UpstreamPath::template(tpl, &names) {
            let target = t.build(&x, x.query());
            // What the proxy does with it: it must be a request target or be refused.
            let _ = http::Uri::try_from(target);
        }
    }
}

/// A gateway with a few routes (hosts, a prefix, parameters, a catch-all) to route against.
fn gateway() -> &'static crate::gateway::Gateway {
    static GW: OnceLock<Arc<crate::gateway::Gateway>> = OnceLock::new();
    GW.get_or_init(|| {
        let g = parse_text::<GatewayConfig>(
            Path::new("gateway.toml"),
            "[services.s]\nendpoints = [\"http://127.0.0.1:1\"]\n",
            |_| None,
        );
        let f = parse_text::<FrontendFile>(
            Path::new("routes/web.toml"),
            r#"
[frontend]
name = "web"
path_prefix = "/web"
hosts = ["shop.example", "*.shop.example"]

[[route]]
name = "user"
path = "/users/{id}/{*rest}"
proxy = { service = "s", path = "/v1/{id}/{rest}" }

[[route]]
name = "any"
path = "/{*rest}"
methods = ["GET", "POST"]
proxy = { service = "s" }
"#,
            |_| None,
        );
        let (Ok((gateway_file, gateway)), Ok(front)) = (g, f) else {
            unreachable!("the fixed fuzz config parses")
        };
        let loaded = LoadedConfig {
            gateway_ok: true,
            root: "/nonexistent".into(),
            gateway_file,
            gateway,
            frontends: vec![front],
        };
        match crate::gateway::compile(loaded, None, metrics(), 1) {
            Ok(g) => Arc::new(g),
            Err(e) => unreachable!("the fixed fuzz config compiles: {e}"),
        }
    })
}
