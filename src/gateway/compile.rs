//! `compile`: checks a loaded config as a whole and builds the immutable `Gateway` snapshot.
//! Services are compiled in `services.rs`; frontends, routes and server TLS here.
//! Every mistake found is collected (with file, line and column) before giving up, so one
//! `gatehouse check` shows them all. Services whose definition did not change are taken over
//! from the previous snapshot, with their connection pools.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

use super::{Gateway, Route, Settings};
use crate::backend::proxy::{Proxy, ProxyOptions};
use crate::backend::respond::Respond;
use crate::config::{ConfigErrors, FrontendFile, LoadedConfig, SourceFile};
use crate::observe::metrics::Metrics;
use crate::route;
use crate::routing::template::{route_params, UpstreamPath};
use crate::routing::{RouteFilter, RouteSpec, Router};
use crate::upstream::retry::RetryPolicy;
use crate::upstream::Upstream;

use super::services::compile_services;

pub fn compile(
    loaded: LoadedConfig,
    previous: Option<&Gateway>,
    metrics: &Metrics,
    generation: u64,
) -> Result<Gateway, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let gfile = &loaded.gateway_file;
    let services = compile_services(&loaded, previous, metrics, &mut errors);
    let tls = compile_tls(&loaded, &mut errors);

    let mut routes = Vec::new();
    let mut specs = Vec::new();
    // For each route: where its name is, to locate router errors.
    let mut origins: Vec<(usize, Range<usize>)> = Vec::new();
    let mut frontend_names: HashMap<String, String> = HashMap::new();
    for (fi, (file, ff)) in loaded.frontends.iter().enumerate() {
        compile_frontend(
            &loaded,
            file,
            ff,
            &services,
            metrics,
            &mut frontend_names,
            &mut routes,
            &mut specs,
            &mut |span| origins.push((fi, span)),
            &mut errors,
        );
    }
    let (router, route_errors) = Router::build(specs);
    for (i, msg) in route_errors {
        let (fi, span) = &origins[i];
        let file = &loaded.frontends[*fi].0;
        errors.push(file.error_at(span.clone(), msg));
    }
    let filter = &loaded.gateway.log.filter;
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter.get_ref()) {
        let msg = format!("[log] filter `{}` is not valid: {e}", filter.get_ref());
        errors.push(gfile.error_at(filter.span(), msg));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let server = &loaded.gateway.server;
    let settings = Settings {
        max_request_body: server.max_request_body.0,
        trusted_proxies: server.trusted_proxies.clone(),
        access_log: loaded.gateway.log.access_log,
    };
    Ok(Gateway {
        generation,
        unmatched: Arc::new(metrics.route("", "")),
        loaded: Arc::new(loaded),
        router,
        routes,
        services,
        settings,
        tls,
    })
}

fn compile_tls(
    loaded: &LoadedConfig,
    errors: &mut ConfigErrors,
) -> Option<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let spanned = loaded.gateway.server.tls.as_ref()?;
    let tls = spanned.get_ref();
    let err = |msg: String| loaded.gateway_file.error_at(spanned.span(), msg);
    let cert_path = loaded.resolve(&tls.cert);
    let key_path = loaded.resolve(&tls.key);
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        CertificateDer::pem_file_iter(&cert_path).and_then(|it| it.collect());
    let certs = match certs {
        Ok(c) if !c.is_empty() => Some(c),
        Ok(_) => {
            errors.push(err(format!(
                "[server] tls.cert {}: no certificate in the file",
                cert_path.display()
            )));
            None
        }
        Err(e) => {
            errors.push(err(format!(
                "[server] tls.cert {}: cannot read a PEM certificate: {e}",
                cert_path.display()
            )));
            None
        }
    };
    let key = match PrivateKeyDer::from_pem_file(&key_path) {
        Ok(k) => Some(k),
        Err(e) => {
            errors.push(err(format!(
                "[server] tls.key {}: cannot read a PEM private key: {e}",
                key_path.display()
            )));
            None
        }
    };
    let (certs, key) = (certs?, key?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let built = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key));
    match built {
        Ok(mut cfg) => {
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Some(Arc::new(cfg))
        }
        Err(e) => {
            errors.push(err(format!(
                "[server] tls: certificate and key do not form a usable pair: {e}"
            )));
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compile_frontend(
    loaded: &LoadedConfig,
    file: &SourceFile,
    ff: &FrontendFile,
    services: &BTreeMap<String, Arc<Upstream>>,
    metrics: &Metrics,
    frontend_names: &mut HashMap<String, String>,
    routes: &mut Vec<Route>,
    specs: &mut Vec<RouteSpec>,
    origin: &mut dyn FnMut(Range<usize>),
    errors: &mut ConfigErrors,
) {
    let fe = &ff.frontend;
    let fname = fe.name.get_ref().as_str();
    let at = |span: Range<usize>, msg: String| file.error_at(span, msg);
    let location = |span: Range<usize>| {
        let (line, _) = file.locate(span.start);
        format!("{}:{line}", file.path.display())
    };
    if fname.is_empty()
        || !fname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        errors.push(at(
            fe.name.span(),
            format!("frontend name `{fname}` must be letters, digits, `-` or `_`"),
        ));
    }
    if let Some(first) = frontend_names.get(fname) {
        errors.push(at(
            fe.name.span(),
            format!("frontend `{fname}` is already defined at {first}"),
        ));
    } else {
        frontend_names.insert(fname.to_owned(), location(fe.name.span()));
    }
    let prefix = match &fe.path_prefix {
        None => "",
        Some(p) => {
            let s = p.get_ref().as_str();
            let s = if s == "/" { "" } else { s };
            if !s.is_empty()
                && (!s.starts_with('/') || s.ends_with('/') || s.contains(['{', '}', '?', '#']))
            {
                errors.push(at(p.span(), format!(
                    "path_prefix `{s}` must start with `/`, not end with `/`, and hold no parameters"
                )));
            }
            s
        }
    };
    let mut hosts = Vec::new();
    for h in &fe.hosts {
        let host = h.get_ref().to_ascii_lowercase();
        let bare = host.strip_prefix("*.").unwrap_or(&host);
        let ok = !bare.is_empty()
            && bare.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if ok {
            hosts.push(host);
        } else {
            errors.push(at(
                h.span(),
                format!(
                    "host `{}` is not a host name (a wildcard is written `*.example.com`)",
                    h.get_ref()
                ),
            ));
        }
    }
    let server = &loaded.gateway.server;
    let mut route_names = HashSet::new();
    for spanned in &ff.route {
        let rc = spanned.get_ref();
        let rname = rc.name.get_ref().as_str();
        let id = format!("{fname}/{rname}");
        let mut ok = true;
        let mut fail = |span: Range<usize>, msg: String| {
            ok = false;
            errors.push(file.error_at(span, msg));
        };
        if rname.is_empty() || rname.contains('/') {
            fail(
                rc.name.span(),
                format!("route name `{rname}` must be non-empty and hold no `/`"),
            );
        }
        if !route_names.insert(rname) {
            fail(
                rc.name.span(),
                format!("route `{rname}` is defined twice in frontend `{fname}`"),
            );
        }
        let params = match route_params(rc.path.get_ref()) {
            Ok(p) => p,
            Err(msg) => {
                fail(rc.path.span(), msg);
                Vec::new()
            }
        };
        let methods = match &rc.methods {
            None => None,
            Some(list) if list.is_empty() => {
                fail(
                    rc.name.span(),
                    "`methods` is empty; leave it out to allow every method".into(),
                );
                None
            }
            Some(list) => {
                let mut out = Vec::new();
                for m in list {
                    let s = m.get_ref();
                    match Method::from_str(s) {
                        Ok(mm) if s.bytes().all(|b| !b.is_ascii_lowercase()) => out.push(mm),
                        _ => fail(m.span(), format!("`{s}` is not an HTTP method (write methods in upper case, like \"GET\")")),
                    }
                }
                Some(out.into_boxed_slice())
            }
        };
        let mut match_headers = Vec::new();
        for (k, v) in &rc.headers {
            match (HeaderName::from_str(k), HeaderValue::from_str(v)) {
                (Ok(k), Ok(v)) => match_headers.push((k, v)),
                _ => fail(spanned.span(), format!("route `{rname}`: `headers` entry `{k}` is not a valid header name and value")),
            }
        }
        let timeout = rc
            .timeout
            .or(fe.timeout)
            .unwrap_or(server.request_timeout)
            .get();

        let backend_count = rc.proxy.is_some() as u8 + rc.respond.is_some() as u8;
        if backend_count != 1 {
            fail(rc.name.span(), format!(
                "route `{rname}` must have exactly one backend: `proxy` or `respond` (it has {backend_count})"
            ));
        }
        let route_retry = rc
            .retry
            .as_ref()
            .and_then(|r| match RetryPolicy::parse(r.get_ref()) {
                Ok(p) => Some(p),
                Err(msg) => {
                    fail(r.span(), format!("route `{rname}` retry: {msg}"));
                    None
                }
            });
        let fallback = rc.fallback.as_ref().and_then(|f| {
            let fc = f.get_ref();
            let as_respond = crate::config::RespondConfig {
                status: fc.status,
                body: fc.body.clone(),
                content_type: fc.content_type.clone(),
                headers: fc.headers.clone(),
            };
            match respond_backend(&as_respond) {
                Ok(r) => Some(r),
                Err(msg) => {
                    fail(f.span(), format!("route `{rname}` fallback: {msg}"));
                    None
                }
            }
        });
        let mut built = None;
        if let Some(p) = &rc.proxy {
            let pc = p.get_ref();
            let sname = pc.service.get_ref();
            let upstream_path = match &pc.path {
                None => Some(UpstreamPath::StripPrefix(prefix.len())),
                Some(t) => match UpstreamPath::template(t.get_ref(), &params) {
                    Ok(u) => Some(u),
                    Err(msg) => {
                        fail(t.span(), msg);
                        None
                    }
                },
            };
            if !loaded.gateway.services.contains_key(sname) {
                let known: Vec<&str> = loaded.gateway.services.keys().map(String::as_str).collect();
                fail(
                    pc.service.span(),
                    format!(
                        "unknown service `{sname}` (defined services: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            } else if let (Some(up), Some(path)) = (services.get(sname), upstream_path) {
                let opts = ProxyOptions {
                    preserve_host: pc.preserve_host,
                    retry: route_retry.clone().or_else(|| up.retry.clone()),
                    idempotent: rc.idempotent,
                    deadline: Some(timeout),
                };
                let svc = route::stack(Proxy::new(up.clone(), opts), timeout, fallback.clone());
                built = Some((svc, Some(path), pc.forward_query));
            }
        }
        if let Some(r) = &rc.respond {
            match respond_backend(r.get_ref()) {
                Ok(b) => built = Some((route::stack(b, timeout, fallback.clone()), None, false)),
                Err(msg) => fail(r.span(), format!("route `{rname}`: {msg}")),
            }
        }
        let full_path = if rc.path.get_ref() == "/" && !prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}{}", rc.path.get_ref())
        };
        if let (true, Some((service, upstream_path, forward_query))) = (ok, built) {
            origin(rc.name.span());
            specs.push(RouteSpec {
                full_path,
                hosts: hosts.clone(),
                filter: RouteFilter {
                    methods,
                    headers: match_headers.into_boxed_slice(),
                },
                label: format!("route `{id}` ({})", location(rc.name.span())),
            });
            routes.push(Route {
                metrics: Arc::new(metrics.route(fname, rname)),
                id: Arc::from(id),
                upstream_path,
                forward_query,
                service,
            });
        }
    }
}

fn respond_backend(r: &crate::config::RespondConfig) -> Result<Respond, String> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| s.as_u16() >= 200 && s.as_u16() <= 599)
        .ok_or_else(|| format!("respond status {} must be between 200 and 599", r.status))?;
    let mut headers = HeaderMap::new();
    for (k, v) in &r.headers {
        let name = HeaderName::from_str(k)
            .map_err(|_| format!("respond header name `{k}` is not valid"))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| format!("respond header `{k}` has an invalid value"))?;
        headers.append(name, value);
    }
    if let Some(ct) = &r.content_type {
        let v = HeaderValue::from_str(ct)
            .map_err(|_| format!("content_type `{ct}` is not a valid header value"))?;
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    Ok(Respond::new(status, headers, Bytes::from(r.body.clone())))
}
