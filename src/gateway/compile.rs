//! `compile`: checks a loaded config as a whole and builds the immutable `Gateway` snapshot.
//! Services are compiled in `services.rs`; frontends, routes and server TLS here.
//! Every mistake found is collected (with file, line and column) before giving up, so one
//! `gatehouse check` shows them all. Services whose definition did not change are taken over
//! from the previous snapshot, with their connection pools.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use super::{Gateway, Settings};
use crate::config::{ConfigErrors, ConfigView, FrontendFile, LoadedConfig, SourceFile};
use crate::layers::cors::{CorsLayer, CorsPolicy};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;
use crate::route::{self, BuildContext, Built, Frontend, Inherited, Route};
use crate::routing::head::Limits;
use crate::routing::{RouteSpec, Router};

use super::services::compile_services;

pub(crate) fn compile(
    loaded: LoadedConfig,
    previous: Option<&Gateway>,
    metrics: &Metrics,
    generation: u64,
) -> Result<Gateway, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let gfile = &loaded.gateway_file;
    let mut resources = Resources::new();
    let services = compile_services(&loaded, previous, metrics, &mut resources, &mut errors);
    let providers = crate::layers::auth::build_providers(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        metrics,
        &mut errors,
    );
    let limiters = crate::layers::rate_limit::build_limiters(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        metrics,
        &mut errors,
    );
    let cache = crate::layers::cache::build_store(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        metrics,
        &mut errors,
    );
    let protos = crate::backend::grpc::compile_protos(&loaded, &mut errors);
    let brokers = crate::upstream::broker::build_brokers(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        metrics,
        &mut errors,
    );
    let consumers = crate::bridge::build_consumers(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        &brokers,
        metrics,
        &mut errors,
    );
    let replies = crate::backend::publish::build_replies(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        &brokers,
    );
    let plugins = crate::layers::plugins::build_plugins(
        &loaded,
        previous.map(|p| &p.resources),
        &mut resources,
        &mut errors,
    );
    let tls = compile_tls(&loaded, &mut errors);
    let trusted: Arc<[ipnet::IpNet]> = loaded.gateway.server.trusted_proxies.clone().into();

    let server = Inherited {
        timeout: loaded.gateway.server.request_timeout.get(),
        max_request_body: loaded.gateway.server.max_request_body.0,
    };
    let cx = BuildContext {
        resources: &resources,
        defined: loaded.gateway.services.keys().map(String::as_str).collect(),
        metrics,
        providers: &providers,
        limiters: &limiters,
        trusted: trusted.clone(),
        cache,
        protos,
        brokers: &brokers,
        broker_kinds: loaded
            .gateway
            .brokers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    crate::upstream::broker::Kind::of(v.get_ref().url.get_ref()),
                )
            })
            .collect(),
        replies: &replies,
        plugins,
    };
    let mut built = Vec::new();
    // For each route: its file and where its name is, to locate router errors.
    let mut origins: Vec<(usize, Range<usize>)> = Vec::new();
    let mut frontend_names: HashMap<String, String> = HashMap::new();
    for (fi, (file, ff)) in loaded.frontends.iter().enumerate() {
        let from = built.len();
        compile_frontend(
            &cx,
            &server,
            file,
            ff,
            &mut frontend_names,
            &mut built,
            &mut errors,
        );
        origins.extend(built[from..].iter().map(|(_, span)| (fi, span.clone())));
    }
    let (routes, specs): (Vec<Route>, Vec<RouteSpec>) =
        built.into_iter().map(|(b, _)| (b.route, b.spec)).unzip();
    let (router, route_errors) = Router::build(specs);
    for (i, msg) in route_errors {
        let (fi, span) = &origins[i];
        let file = &loaded.frontends[*fi].0;
        errors.push(file.error_at(span.clone(), msg));
    }
    check_admin(&loaded, &mut errors);
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
        head: Limits {
            max_uri: usize::try_from(server.max_uri_length.0).unwrap_or(usize::MAX),
            max_header_line: usize::try_from(server.max_header_size.0).unwrap_or(usize::MAX),
            max_head: usize::try_from(server.max_request_head.0).unwrap_or(usize::MAX),
            max_headers: server.max_header_count,
            underscores: server.underscores_in_headers,
        },
        trusted_proxies: trusted,
        ip_guard: limiters.ip_guard.clone(),
        access_log: loaded.gateway.log.access_log,
    };
    Ok(Gateway {
        generation,
        unmatched: Arc::new(metrics.route("", "")),
        admin_token: loaded
            .gateway
            .admin
            .token
            .as_ref()
            .map(|t| Arc::from(t.get_ref().as_str())),
        config: Arc::new(ConfigView::new(&loaded)),
        router,
        routes,
        services,
        brokers,
        consumers,
        resources,
        settings,
        tls,
    })
}

/// The admin API may listen beyond loopback only behind a token.
fn check_admin(loaded: &LoadedConfig, errors: &mut ConfigErrors) {
    let admin = &loaded.gateway.admin;
    let gfile = &loaded.gateway_file;
    if let Some(t) = &admin.token {
        if t.get_ref().len() < 16 {
            errors.push(gfile.error_at(t.span(), "[admin] token must be at least 16 characters"));
        }
    } else if !admin.listen.get_ref().ip().is_loopback() {
        errors.push(gfile.error_at(
            admin.listen.span(),
            format!(
                "[admin] listen = \"{}\" is not a loopback address: set [admin] token (like token = \"${{ADMIN_TOKEN}}\") so the admin API is not open to the network",
                admin.listen.get_ref()
            ),
        ));
    }
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

/// Checks a frontend (name, prefix, hosts) and builds each of its routes (`route::build`).
fn compile_frontend(
    cx: &BuildContext<'_>,
    server: &Inherited,
    file: &SourceFile,
    ff: &FrontendFile,
    frontend_names: &mut HashMap<String, String>,
    out: &mut Vec<(Built, Range<usize>)>,
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
    // Settings the routes inherit: the frontend's own over the server's.
    let settings = Inherited {
        timeout: fe.timeout.map_or(server.timeout, |t| t.get()),
        max_request_body: fe.max_request_body.map_or(server.max_request_body, |s| s.0),
    };
    let cors = fe
        .cors
        .as_ref()
        .and_then(|c| match CorsPolicy::from_config(c.get_ref()) {
            Ok(p) => Some(CorsLayer::new(p)),
            Err(e) => {
                errors.push(at(c.span(), e.to_string()));
                None
            }
        });
    // Every header any provider used in this frontend sets from an identity: removed from
    // each request of the frontend, whatever its route's auth.
    let mut strip: Vec<http::HeaderName> = Vec::new();
    let uses = fe
        .auth
        .iter()
        .chain(ff.route.iter().filter_map(|r| r.get_ref().auth.as_ref()));
    for a in uses {
        for n in a.get_ref().names() {
            if let Some(p) = cx.providers.get(n) {
                for h in p.identity_headers() {
                    if !strip.contains(&h) {
                        strip.push(h);
                    }
                }
            }
        }
    }
    let frontend = Frontend {
        name: fname,
        prefix,
        hosts: &hosts,
        settings: &settings,
        file,
        auth: fe.auth.as_ref(),
        require: fe.require.as_ref(),
        strip: strip.into(),
        cors,
        rate_limit: fe.rate_limit.as_ref(),
        cache: fe.cache.as_ref(),
        plugins: fe.plugins.as_ref(),
        plugin_config: &fe.plugin_config,
    };
    let mut route_names = HashSet::new();
    for spanned in &ff.route {
        let rc = spanned.get_ref();
        let rname = rc.name.get_ref().as_str();
        if !route_names.insert(rname) {
            errors.push(at(
                rc.name.span(),
                format!("route `{rname}` is defined twice in frontend `{fname}`"),
            ));
            continue;
        }
        if let Some(mut built) = route::build(cx, &frontend, rc, errors) {
            let also = built.also.take();
            out.push((built, rc.name.span()));
            if let Some(a) = also {
                out.push((*a, rc.name.span()));
            }
        }
    }
}
