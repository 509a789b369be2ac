//! Compiles `[route.aggregate]`: the calls, their templates (checked against the route's path
//! parameters and the other calls), the dependency graph (unknown names and cycles are errors
//! located at the call), shapes, limits and a `Proxy` per call. Every mistake is reported
//! through `fail`, located in the route file.

use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use serde_json::Value;
use toml::Spanned;

use super::body::{BodyTemplate, JsonTemplate};
use super::shape::{field_path, Shape};
use super::template::{parse_var, JsonPath, Names, Source, Template};
use super::{Aggregate, Call, Plan};
use crate::backend::proxy::{Proxy, ProxyOptions};
use crate::backend::target::UpstreamPath;
use crate::config::{AggregateConfig, CallConfig, MergeMode};
use crate::observe::metrics::Metrics;
use crate::resources::Resources;
use crate::upstream::Upstream;

/// What building an aggregate needs from its route.
pub(crate) struct RouteFacts<'a> {
    pub(crate) id: &'a str,
    pub(crate) params: &'a [String],
    /// The route's total deadline.
    pub(crate) timeout: Duration,
    pub(crate) resources: &'a Resources,
    pub(crate) defined: &'a [&'a str],
    pub(crate) metrics: &'a Metrics,
}

pub(crate) fn build(
    route: &RouteFacts<'_>,
    cfg: &Spanned<AggregateConfig>,
    fail: &mut impl FnMut(Range<usize>, String),
) -> Option<Aggregate> {
    let span = cfg.span();
    let cfg = cfg.get_ref();
    let mut errors = 0usize;
    let mut err = |span: Range<usize>, msg: String| {
        errors += 1;
        fail(span, msg);
    };
    if cfg.call.is_empty() {
        err(
            span.clone(),
            "`aggregate` needs at least one `[[route.aggregate.call]]`".into(),
        );
    }
    if cfg.max_calls == 0 || cfg.max_concurrency == 0 {
        err(
            span.clone(),
            "`max_calls` and `max_concurrency` must be at least 1".into(),
        );
    } else if cfg.max_calls < cfg.call.len() {
        err(
            span.clone(),
            format!(
                "`max_calls` = {} is fewer than the {} calls listed",
                cfg.max_calls,
                cfg.call.len()
            ),
        );
    }
    let names: Vec<&str> = cfg
        .call
        .iter()
        .map(|c| c.get_ref().name.get_ref().as_str())
        .collect();
    for (i, c) in cfg.call.iter().enumerate() {
        let n = &c.get_ref().name;
        let name = n.get_ref();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            err(
                n.span(),
                format!("call name `{name}` must be letters, digits, `_` or `-`"),
            );
        } else if name == "errors" {
            err(
                n.span(),
                "`errors` is the response's list of failed calls: name the call otherwise".into(),
            );
        } else if names[..i].contains(&name.as_str()) {
            err(n.span(), format!("call `{name}` is defined twice"));
        }
    }
    let mut calls = Vec::new();
    let mut needs_body = false;
    for c in &cfg.call {
        if let Some(call) = build_call(route, c, &names, &mut err) {
            needs_body |= matches!(call.body, Some(BodyTemplate::Client));
            calls.push(call);
        }
    }
    if let Some(cycle) = (calls.len() == cfg.call.len())
        .then(|| cycle(&calls))
        .flatten()
    {
        let at = cfg.call[cycle[0]].span();
        let path: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
        err(
            at,
            format!(
                "calls depend on each other in a cycle: {} → {}",
                path.join(" → "),
                path[0]
            ),
        );
    }
    let deadline = match &cfg.timeout {
        Some(t) if t.get_ref().get() > route.timeout => {
            err(
                t.span(),
                format!(
                    "aggregate timeout {} is longer than the route's timeout ({}), which would cut it first",
                    t.get_ref(),
                    humantime::format_duration(route.timeout)
                ),
            );
            route.timeout
        }
        Some(t) => t.get_ref().get(),
        // Just before the route's own deadline, so that the aggregate answers (naming the
        // calls that did not) rather than the route's plain 504.
        None => route
            .timeout
            .saturating_sub(Duration::from_millis(5))
            .max(Duration::from_millis(1)),
    };
    if errors > 0 || calls.len() != cfg.call.len() {
        return None;
    }
    // An answer is parsed only when something needs its value.
    let read: Vec<usize> = calls.iter().flat_map(|c| c.deps.iter().copied()).collect();
    for (i, c) in calls.iter_mut().enumerate() {
        c.as_value = cfg.merge == MergeMode::Root || !c.shape.is_identity() || read.contains(&i);
    }
    Some(Aggregate(Arc::new(Plan {
        calls: calls.into(),
        merge: cfg.merge,
        deadline,
        max_calls: cfg.max_calls,
        max_concurrency: cfg.max_concurrency,
        max_call_body: usize::try_from(cfg.max_call_body.0).unwrap_or(usize::MAX),
        max_body: usize::try_from(cfg.max_body.0).unwrap_or(usize::MAX),
        needs_body,
    })))
}

fn build_call(
    route: &RouteFacts<'_>,
    spanned: &Spanned<CallConfig>,
    names: &[&str],
    err: &mut impl FnMut(Range<usize>, String),
) -> Option<Call> {
    let c = spanned.get_ref();
    let name = c.name.get_ref();
    let mut ok = true;
    let mut bad = |span: Range<usize>, msg: String| {
        ok = false;
        err(span, format!("call `{name}`: {msg}"));
    };
    let method = match Method::from_str(c.method.get_ref()) {
        Ok(m) if !c.method.get_ref().bytes().any(|b| b.is_ascii_lowercase()) => Some(m),
        _ => {
            bad(
                c.method.span(),
                format!(
                    "`{}` is not an HTTP method (upper case, like \"GET\")",
                    c.method.get_ref()
                ),
            );
            None
        }
    };
    let names_in = Names {
        params: route.params,
        calls: names,
        item: c.for_each.is_some(),
    };
    let parse =
        |t: &Spanned<String>, bad: &mut dyn FnMut(Range<usize>, String)| match Template::parse(
            t.get_ref(),
            &names_in,
        ) {
            Ok(t) => Some(t),
            Err(e) => {
                bad(t.span(), e);
                None
            }
        };
    if !c.path.get_ref().starts_with('/') {
        bad(
            c.path.span(),
            format!("path `{}` must start with `/`", c.path.get_ref()),
        );
    }
    // The template's own text is the path's structure: no query, fragment or odd bytes in it
    // (parameters go in `query`).
    let mut literal = String::new();
    let mut depth = 0u32;
    for ch in c.path.get_ref().chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            _ if depth == 0 => literal.push(ch),
            _ => {}
        }
    }
    if literal.contains(['?', '#', ' ']) || literal.chars().any(char::is_control) {
        bad(
            c.path.span(),
            format!(
                "path `{}` may hold no `?`, `#`, spaces or control characters (put parameters in `query`)",
                c.path.get_ref()
            ),
        );
    }
    let path = parse(&c.path, &mut bad);
    let mut query = Vec::new();
    for (k, v) in &c.query {
        if let Some(t) = parse(v, &mut bad) {
            query.push((k.as_str().into(), t));
        }
    }
    let mut headers = Vec::new();
    for (k, v) in &c.headers {
        match HeaderName::from_str(k) {
            Ok(h) => {
                if let Some(t) = parse(v, &mut bad) {
                    headers.push((h, t));
                }
            }
            Err(_) => bad(v.span(), format!("`{k}` is not a header name")),
        }
    }
    let body = c.body.as_ref().and_then(|b| {
        if b.get_ref() == "{body}" {
            return Some(BodyTemplate::Client);
        }
        let json: Value = match serde_json::from_str(b.get_ref()) {
            Ok(v) => v,
            Err(e) => {
                bad(
                    b.span(),
                    format!("`body` is `\"{{body}}\"` or a JSON template: {e}"),
                );
                return None;
            }
        };
        match json_template(&json, &names_in) {
            Ok(t) => Some(BodyTemplate::Json(t)),
            Err(e) => {
                bad(b.span(), e);
                None
            }
        }
    });
    // Dependencies: the named ones must exist; every call a template reads must be among them.
    let mut deps = Vec::new();
    for d in &c.depends_on {
        match names.iter().position(|n| n == d.get_ref()) {
            Some(i) if names[i] == name => bad(d.span(), "a call cannot depend on itself".into()),
            Some(i) => deps.push(i),
            None => bad(
                d.span(),
                format!(
                    "`depends_on` names `{}`, which is not a call (calls: {})",
                    d.get_ref(),
                    names.join(", ")
                ),
            ),
        }
    }
    let for_each = c
        .for_each
        .as_ref()
        .and_then(|f| match for_each(f.get_ref(), names) {
            Ok(fe) => Some(fe),
            Err(e) => {
                bad(f.span(), e);
                None
            }
        });
    let mut reads: Vec<usize> = path.iter().flat_map(Template::calls).collect();
    reads.extend(query.iter().flat_map(|(_, t)| t.calls()));
    reads.extend(headers.iter().flat_map(|(_, t)| t.calls()));
    if let Some(BodyTemplate::Json(t)) = &body {
        t.calls(&mut reads);
    }
    reads.extend(for_each.iter().map(|(i, _)| *i));
    for r in reads {
        if names.get(r).is_some_and(|n| *n == name) {
            bad(
                spanned.span(),
                format!("reads its own answer (`calls.{name}`), which it cannot have yet"),
            );
            continue;
        }
        if !deps.contains(&r) {
            bad(
                spanned.span(),
                format!(
                    "reads `calls.{}`, so `depends_on` must list `{}`",
                    names[r], names[r]
                ),
            );
        }
    }
    let shape = c.shape.as_ref().map_or_else(
        || Some(Shape::default()),
        |s| {
            let sc = s.get_ref();
            let mut shape = Shape {
                flatten: sc.flatten,
                ..Shape::default()
            };
            let mut fine = true;
            if let Some(t) = &sc.target {
                match JsonPath::parse(t) {
                    Ok(p) if !p.has_each() => shape.target = Some(p),
                    Ok(_) => {
                        bad(
                            s.span(),
                            format!("shape target `{t}`: `[*]` belongs in `for_each`"),
                        );
                        fine = false;
                    }
                    Err(e) => {
                        bad(s.span(), format!("shape target {e}"));
                        fine = false;
                    }
                }
            }
            for (list, out) in [(&sc.allow, &mut shape.allow), (&sc.deny, &mut shape.deny)] {
                for f in list {
                    match field_path(f) {
                        Ok(p) => out.push(p),
                        Err(e) => {
                            bad(s.span(), format!("shape: {e}"));
                            fine = false;
                        }
                    }
                }
            }
            for (from, to) in &sc.rename {
                match field_path(from) {
                    Ok(p) if !to.is_empty() => shape.rename.push((p, to.clone())),
                    _ => {
                        bad(
                            s.span(),
                            format!(
                                "shape rename `{from}` = `{to}` is not a field path and a name"
                            ),
                        );
                        fine = false;
                    }
                }
            }
            fine.then_some(shape)
        },
    );
    let sname = c.service.get_ref();
    if !route.defined.iter().any(|d| d == sname) {
        let known = if route.defined.is_empty() {
            "none".to_owned()
        } else {
            route.defined.join(", ")
        };
        bad(
            c.service.span(),
            format!("unknown service `{sname}` (defined services: {known})"),
        );
    }
    let up = route.resources.get::<Upstream>(sname);
    if !ok {
        return None;
    }
    // A defined service that did not compile has its own errors.
    let up = up?;
    let opts = ProxyOptions {
        upgrades: Arc::from(Vec::new()),
        target: UpstreamPath::AsRequested,
        forward_query: true,
        preserve_host: false,
        retry: up.retry.clone(),
        idempotent: c.idempotent,
        deadline: Some(route.timeout),
    };
    Some(Call {
        name: Arc::from(name.as_str()),
        method: method?,
        path: path?,
        query: query.into(),
        headers: headers.into(),
        body,
        deps: deps.into(),
        required: c.required,
        shape: shape?,
        for_each,
        as_value: true,
        proxy: Proxy::new(up.clone(), opts),
        duration: route
            .metrics
            .aggregate_call_seconds
            .with_label_values(&[route.id, name]),
        outcomes: route.metrics.aggregate_calls_total.clone(),
        route: Arc::from(route.id),
    })
}

/// `calls.NAME.body.PATH` with exactly one `[*]`.
fn for_each(expr: &str, names: &[&str]) -> Result<(usize, JsonPath), String> {
    let bad = || {
        format!("for_each `{expr}` must be `calls.CALL.body.PATH` with one `[*]` (like `calls.orders.body.items[*].sku`)")
    };
    let rest = expr.strip_prefix("calls.").ok_or_else(bad)?;
    let (call, path) = rest.split_once(".body").ok_or_else(bad)?;
    if !(path.is_empty() || path.starts_with('.') || path.starts_with('[')) {
        return Err(bad());
    }
    let idx = names
        .iter()
        .position(|n| *n == call)
        .ok_or_else(|| format!("for_each `{expr}`: no call named `{call}`"))?;
    let path = JsonPath::parse(path.strip_prefix('.').unwrap_or(path))?;
    if path
        .0
        .iter()
        .filter(|s| **s == super::template::Step::Each)
        .count()
        != 1
    {
        return Err(bad());
    }
    Ok((idx, path))
}

fn json_template(v: &Value, names: &Names<'_>) -> Result<JsonTemplate, String> {
    Ok(match v {
        Value::String(s) => {
            let inner = s.strip_prefix('{').and_then(|r| r.strip_suffix('}'));
            match inner {
                // One whole `{…}`: the value keeps its JSON type.
                Some(expr) if !expr.contains(['{', '}']) => {
                    let var = parse_var(expr, names)?;
                    if var.source == Source::Body {
                        return Err("`{body}` is only a whole `body`".into());
                    }
                    JsonTemplate::Whole(var)
                }
                _ => JsonTemplate::Text(Template::parse(s, names)?),
            }
        }
        Value::Array(items) => JsonTemplate::Array(
            items
                .iter()
                .map(|i| json_template(i, names))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => JsonTemplate::Object(
            m.iter()
                .map(|(k, v)| Ok((k.clone(), json_template(v, names)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => JsonTemplate::Other(other.clone()),
    })
}

impl JsonTemplate {
    fn calls(&self, out: &mut Vec<usize>) {
        match self {
            JsonTemplate::Whole(v) => {
                if let Source::Call(i, _) = v.source {
                    out.push(i);
                }
            }
            JsonTemplate::Text(t) => out.extend(t.calls()),
            JsonTemplate::Array(items) => items.iter().for_each(|i| i.calls(out)),
            JsonTemplate::Object(fields) => fields.iter().for_each(|(_, v)| v.calls(out)),
            JsonTemplate::Other(_) => {}
        }
    }
}

/// A cycle of the dependency graph, if there is one (call indexes, in order).
fn cycle(calls: &[Call]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        i: usize,
        calls: &[Call],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[i] = Mark::Open;
        stack.push(i);
        for &d in calls[i].deps.iter() {
            match marks.get(d) {
                Some(Mark::Open) => {
                    let from = stack.iter().position(|&s| s == d).unwrap_or(0);
                    return Some(stack[from..].to_vec());
                }
                Some(Mark::New) => {
                    if let Some(c) = visit(d, calls, marks, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; calls.len()];
    for i in 0..calls.len() {
        if marks[i] == Mark::New {
            if let Some(c) = visit(i, calls, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}
