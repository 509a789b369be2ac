//! Builds a route's `grpc` backend from its config and `[protos]`: the method (or the
//! service's methods) looked up in the descriptor pool, their `google.api.http` bindings
//! parsed, metadata allow-lists checked, one `Proxy` per idempotency. Mistakes are located at
//! the route's keys.

use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::Uri;
use prost_reflect::{DescriptorPool, Kind, MethodDescriptor};
use toml::Spanned;

use super::rule::{self, BodyTo};
use super::{Grpc, Passthrough, Plan, Target, Transcode};
use crate::backend::proxy::{Proxy, ProxyOptions};
use crate::backend::target::UpstreamPath;
use crate::config::{GrpcConfig, UnknownFields};
use crate::upstream::retry::RetryPolicy;
use crate::upstream::Upstream;

/// gRPC's default largest message.
const DEFAULT_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// What the route builder knows that a `grpc` backend needs.
pub(crate) struct GrpcFacts<'a> {
    pub(crate) route: &'a str,
    /// The compiled `[protos]`, when there are any.
    pub(crate) pool: Option<&'a DescriptorPool>,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) retry: Option<RetryPolicy>,
    /// The route says POST may be retried.
    pub(crate) idempotent: bool,
    pub(crate) deadline: Duration,
    pub(crate) prefix_len: usize,
    /// The route path's parameters (they fill fields by name when no rule matches).
    pub(crate) params: &'a [String],
}

pub(crate) fn build(
    f: &GrpcFacts<'_>,
    cfg: &Spanned<GrpcConfig>,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<Grpc> {
    let g = cfg.get_ref();
    let route = f.route;
    if f.upstream.is_http1() {
        fail(
            g.service.span(),
            format!(
                "route `{route}`: service `{}` must have protocol = \"http2\" (gRPC runs over HTTP/2)",
                g.service.get_ref()
            ),
        );
        return None;
    }
    let proxy = |target: UpstreamPath, idempotent: bool, forward_query: bool| {
        Proxy::new(
            f.upstream.clone(),
            ProxyOptions {
                target,
                forward_query,
                preserve_host: false,
                retry: f.retry.clone(),
                idempotent,
                deadline: Some(f.deadline),
                upgrades: Arc::from(Vec::new()),
            },
        )
    };
    let Some(method) = &g.method else {
        return Some(Grpc(Arc::new(Plan::Passthrough(Passthrough {
            proxy: proxy(UpstreamPath::StripPrefix(f.prefix_len), f.idempotent, true),
        }))));
    };
    let Some(pool) = f.pool else {
        fail(
            method.span(),
            format!("route `{route}`: `grpc.method` needs the service's .proto files in [protos]"),
        );
        return None;
    };
    let headers = |list: &[Spanned<String>], fail: &mut dyn FnMut(Range<usize>, String)| {
        let mut out = Vec::new();
        for h in list {
            match HeaderName::from_str(h.get_ref()) {
                Ok(n) => out.push(n),
                Err(_) => fail(
                    h.span(),
                    format!("route `{route}`: `{}` is not a header name", h.get_ref()),
                ),
            }
        }
        out.into_boxed_slice()
    };
    let request_headers = headers(&g.request_headers, fail);
    let response_headers = headers(&g.response_headers, fail);
    let name = method.get_ref();
    let Some((service, mname)) = name.split_once('/') else {
        fail(
            method.span(),
            format!("route `{route}`: `{name}` is not `package.Service/Method` (or `package.Service/*`)"),
        );
        return None;
    };
    let Some(sd) = pool.get_service_by_name(service) else {
        let known: Vec<String> = pool.services().map(|s| s.full_name().to_owned()).collect();
        fail(
            method.span(),
            format!(
                "route `{route}`: unknown gRPC service `{service}` (in [protos]: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ),
        );
        return None;
    };
    let methods: Vec<MethodDescriptor> = if mname == "*" {
        sd.methods().collect()
    } else {
        match sd.methods().find(|m| m.name() == mname) {
            Some(m) => vec![m],
            None => {
                let known: Vec<String> = sd.methods().map(|m| m.name().to_owned()).collect();
                let names = known.join(", ");
                fail(
                    method.span(),
                    format!("route `{route}`: service `{service}` has no method `{mname}` (it has: {names})"),
                );
                return None;
            }
        }
    };
    let mut targets = Vec::new();
    let mut ok = true;
    for m in methods {
        if m.is_client_streaming() {
            if mname != "*" {
                fail(
                    method.span(),
                    format!("route `{route}`: `{}` takes a client stream, which REST cannot send; route it without `method` (passthrough)", m.full_name()),
                );
                ok = false;
            }
            continue;
        }
        let bindings = match rule::bindings(&m) {
            Ok(b) => b,
            Err(e) => {
                fail(
                    method.span(),
                    format!(
                        "route `{route}`: the google.api.http rule of `{}`: {e}",
                        m.full_name()
                    ),
                );
                ok = false;
                continue;
            }
        };
        if mname == "*" && bindings.is_empty() {
            continue;
        }
        let input = m.input();
        let output = m.output();
        let mut checked = Vec::new();
        for b in bindings {
            let mut good = true;
            for field in b.template.fields() {
                if let Err(e) = field_path(&input, field) {
                    fail(
                        method.span(),
                        format!("route `{route}`: `{}`: {e}", m.full_name()),
                    );
                    good = false;
                }
            }
            if let BodyTo::Field(fname) = &b.body {
                if input.get_field_by_name(fname).is_none() {
                    fail(
                        method.span(),
                        format!(
                            "route `{route}`: `{}`: body field `{fname}` is not a field of {}",
                            m.full_name(),
                            input.full_name()
                        ),
                    );
                    good = false;
                }
            }
            let response = match &b.response_body {
                None => None,
                Some(r) => {
                    match output.get_field_by_name(r) {
                        Some(fd) => Some(fd),
                        None => {
                            fail(method.span(), format!("route `{route}`: `{}`: response_body `{r}` is not a field of {}", m.full_name(), output.full_name()));
                            good = false;
                            None
                        }
                    }
                }
            };
            ok &= good;
            checked.push((b, response));
        }
        // `idempotency_level`: NO_SIDE_EFFECTS (1) or IDEMPOTENT (2) may be retried.
        let marked = m
            .options()
            .get_field_by_name("idempotency_level")
            .and_then(|v| v.as_enum_number())
            .is_some_and(|level| level > 0);
        let Ok(path) = Uri::from_str(&format!("/{}/{}", sd.full_name(), m.name())) else {
            fail(
                method.span(),
                format!(
                    "route `{route}`: `{}` cannot be a request path",
                    m.full_name()
                ),
            );
            ok = false;
            continue;
        };
        targets.push(Target {
            path,
            input,
            output,
            server_streaming: m.is_server_streaming(),
            bindings: checked.into_boxed_slice(),
            proxy: proxy(UpstreamPath::AsRequested, f.idempotent || marked, false),
        });
    }
    // With one named method, the route's parameters fill fields by name: each must name one.
    if mname != "*" {
        if let Some(t) = targets.first() {
            for p in f.params {
                if t.input.get_field_by_name(p).is_none()
                    && t.input.get_field_by_json_name(p).is_none()
                {
                    let names: Vec<String> =
                        t.input.fields().map(|x| x.name().to_owned()).collect();
                    fail(
                        method.span(),
                        format!(
                            "route `{route}`: path parameter `{p}` names no field of {} (its fields: {}); name the parameter after a field",
                            t.input.full_name(),
                            names.join(", ")
                        ),
                    );
                    ok = false;
                }
            }
        }
    }
    if targets.is_empty() && ok {
        fail(
            method.span(),
            format!(
                "route `{route}`: no method of `{service}` has a google.api.http rule to route by"
            ),
        );
        return None;
    }
    if !ok {
        return None;
    }
    let max_message = g.max_message_size.map_or(DEFAULT_MAX_MESSAGE, |s| {
        usize::try_from(s.0).unwrap_or(usize::MAX)
    });
    Some(Grpc(Arc::new(Plan::Transcode(Transcode {
        pool: pool.clone(),
        targets: targets.into_boxed_slice(),
        by_name: mname != "*",
        prefix_len: f.prefix_len,
        deny_unknown: g.unknown_fields == UnknownFields::Reject,
        max_message,
        request_headers,
        response_headers,
    }))))
}

/// Checks that a variable's field path names fields, nested through message fields.
fn field_path(desc: &prost_reflect::MessageDescriptor, path: &[Box<str>]) -> Result<(), String> {
    let mut d = desc.clone();
    for (i, p) in path.iter().enumerate() {
        let Some(f) = d.get_field_by_name(p) else {
            return Err(format!(
                "`{}` is not a field of {}",
                path.join("."),
                desc.full_name()
            ));
        };
        if i + 1 < path.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() => d = m,
                _ => {
                    return Err(format!(
                        "`{p}` in `{}` is not a message field",
                        path.join(".")
                    ))
                }
            }
        }
    }
    Ok(())
}
