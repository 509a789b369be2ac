//! `google.api.http` rules: which HTTP requests a method answers and how they fill its request
//! message. A rule's path template (`/v1/{name=shelves/*/books/*}:publish`) is parsed at build
//! and matched against the request path (the frontend's prefix stripped); its variables name
//! fields of the request message, possibly nested (`{item.sku}`).

use http::Method;
use prost_reflect::{DynamicMessage, MethodDescriptor, Value};

/// One segment of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path (last only).
    Rest,
}

/// A variable: the field path it fills and the segments it spans (`start..end`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Var {
    field: Box<[Box<str>]>,
    start: usize,
    end: usize,
}

/// What a matching template yields: each variable's field path and value; `Err` when a value
/// is not UTF-8 once decoded.
pub(crate) type Captures<'t> = Result<Vec<(&'t [Box<str>], String)>, ()>;

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segs: Box<[Seg]>,
    vars: Box<[Var]>,
    verb: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path template `{template}`: {why}")]
pub(crate) struct TemplateError {
    template: String,
    why: &'static str,
}

impl Template {
    pub(crate) fn parse(t: &str) -> Result<Template, TemplateError> {
        let err = |why| TemplateError {
            template: t.to_owned(),
            why,
        };
        let rest = t
            .strip_prefix('/')
            .ok_or_else(|| err("must start with `/`"))?;
        // The verb is after the last `:` outside a variable.
        let (body, verb) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('}') && !rest[i..].contains('/') => {
                (&rest[..i], Some(rest[i + 1..].into()))
            }
            _ => (rest, None),
        };
        let mut segs = Vec::new();
        let mut vars = Vec::new();
        let mut i = 0;
        let b = body.as_bytes();
        while i <= b.len() {
            if i < b.len() && b[i] == b'{' {
                let close = body[i..].find('}').ok_or_else(|| err("unclosed `{`"))? + i;
                let inner = &body[i + 1..close];
                let (field, pattern) = inner.split_once('=').unwrap_or((inner, "*"));
                if field.is_empty()
                    || !field.split('.').all(|p| {
                        !p.is_empty() && p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
                    })
                {
                    return Err(err("a variable must name a field (`{name}` or `{a.b}`)"));
                }
                let start = segs.len();
                for p in pattern.split('/') {
                    segs.push(segment(p).ok_or_else(|| {
                        err("a variable's pattern holds an empty segment or a `{`")
                    })?);
                }
                vars.push(Var {
                    field: field.split('.').map(Into::into).collect(),
                    start,
                    end: segs.len(),
                });
                i = close + 1;
                if i < b.len() && b[i] != b'/' {
                    return Err(err("a variable must be a whole segment"));
                }
                i += 1;
            } else {
                let end = body[i..].find('/').map_or(b.len(), |e| e + i);
                let s = &body[i..end];
                if s.contains('{') || s.contains('}') {
                    return Err(err("a variable must be a whole segment"));
                }
                if !(s.is_empty() && end == b.len() && segs.is_empty()) {
                    segs.push(segment(s).ok_or_else(|| err("empty segment"))?);
                }
                i = end + 1;
            }
        }
        if segs.iter().rev().skip(1).any(|s| *s == Seg::Rest) {
            return Err(err("`**` may only be the last segment"));
        }
        Ok(Template {
            segs: segs.into(),
            vars: vars.into(),
            verb,
        })
    }

    /// The variables' values when `path` (no query) matches: each field path with its value,
    /// percent-decoded. `None` when it does not match; `Some(Err)` when a value is not UTF-8.
    pub(crate) fn matches(&self, path: &str) -> Option<Captures<'_>> {
        let rest = path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(v) => rest.strip_suffix(&**v)?.strip_suffix(':')?,
            None => rest,
        };
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        // Where each template segment starts in `parts` (`**` takes what is left).
        let mut at = Vec::with_capacity(self.segs.len() + 1);
        let mut p = 0;
        for s in self.segs.iter() {
            at.push(p);
            match s {
                Seg::Lit(l) => {
                    if parts.get(p) != Some(&&**l) {
                        return None;
                    }
                    p += 1;
                }
                Seg::One => {
                    if parts.get(p).is_none_or(|x| x.is_empty()) {
                        return None;
                    }
                    p += 1;
                }
                Seg::Rest => p = parts.len(),
            }
        }
        at.push(p);
        if p != parts.len() {
            return None;
        }
        let mut out = Vec::with_capacity(self.vars.len());
        for v in self.vars.iter() {
            let raw = parts.get(at[v.start]..at[v.end])?.join("/");
            // A variable over several segments keeps `%2F` encoded (google.api.http): a `/`
            // inside a segment must not look like a segment boundary to the service.
            let multi = v.end - v.start > 1 || self.segs.get(v.start) == Some(&Seg::Rest);
            let Some(value) = decode(&raw, multi) else {
                return Some(Err(()));
            };
            out.push((&*v.field, value));
        }
        Some(Ok(out))
    }

    /// The field paths its variables fill.
    pub(crate) fn fields(&self) -> impl Iterator<Item = &[Box<str>]> {
        self.vars.iter().map(|v| &*v.field)
    }
}

/// Percent-decodes `raw` (UTF-8 only); with `keep_slash`, `%2F` stays as it is.
fn decode(raw: &str, keep_slash: bool) -> Option<String> {
    let whole = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    if !keep_slash {
        return whole(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest
        .as_bytes()
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'2' && (w[2] == b'F' || w[2] == b'f'))
    {
        out.push_str(&whole(&rest[..i])?);
        out.push_str(&rest[i..i + 3]);
        rest = &rest[i + 3..];
    }
    out.push_str(&whole(rest)?);
    Some(out)
}

fn segment(s: &str) -> Option<Seg> {
    match s {
        "" => None,
        "*" => Some(Seg::One),
        "**" => Some(Seg::Rest),
        _ if s.contains('{') || s.contains('}') => None,
        _ => Some(Seg::Lit(s.into())),
    }
}

/// Where the request body goes: nowhere, the whole message, or one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodyTo {
    None,
    Message,
    Field(Box<str>),
}

/// One binding of a rule (the rule itself or one of its `additional_bindings`).
#[derive(Debug, Clone)]
pub(crate) struct Binding {
    pub(crate) method: Method,
    pub(crate) template: Template,
    pub(crate) body: BodyTo,
    /// The response field sent instead of the whole response message.
    pub(crate) response_body: Option<Box<str>>,
}

/// The `google.api.http` bindings of a method, in the order written; empty without a rule.
pub(crate) fn bindings(m: &MethodDescriptor) -> Result<Vec<Binding>, String> {
    let pool = m.parent_pool();
    let Some(ext) = pool.get_extension_by_name("google.api.http") else {
        return Ok(Vec::new());
    };
    let opts = m.options();
    if !opts.has_extension(&ext) {
        return Ok(Vec::new());
    }
    let rule = opts.get_extension(&ext);
    let Some(rule) = rule.as_message() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    binding(rule, &mut out)?;
    if let Some(extra) = rule.get_field_by_name("additional_bindings") {
        for r in extra.as_list().unwrap_or_default() {
            if let Some(r) = r.as_message() {
                binding(r, &mut out)?;
            }
        }
    }
    Ok(out)
}

fn binding(rule: &DynamicMessage, out: &mut Vec<Binding>) -> Result<(), String> {
    let text = |name: &str| {
        rule.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .filter(|s| !s.is_empty())
    };
    let mut found = None;
    for (field, method) in [
        ("get", Method::GET),
        ("put", Method::PUT),
        ("post", Method::POST),
        ("delete", Method::DELETE),
        ("patch", Method::PATCH),
    ] {
        if rule.has_field_by_name(field) {
            if let Some(t) = text(field) {
                found = Some((method, t));
            }
        }
    }
    if found.is_none() && rule.has_field_by_name("custom") {
        if let Some(Value::Message(c)) = rule.get_field_by_name("custom").map(|c| c.into_owned()) {
            let kind = c
                .get_field_by_name("kind")
                .and_then(|v| v.as_str().map(str::to_owned));
            let path = c
                .get_field_by_name("path")
                .and_then(|v| v.as_str().map(str::to_owned));
            if let (Some(k), Some(p)) = (kind, path) {
                let m = Method::from_bytes(k.as_bytes())
                    .map_err(|_| format!("custom method `{k}` is not an HTTP method"))?;
                found = Some((m, p));
            }
        }
    }
    let Some((method, path)) = found else {
        return Ok(());
    };
    let template = Template::parse(&path).map_err(|e| e.to_string())?;
    let body = match text("body").as_deref() {
        None => BodyTo::None,
        Some("*") => BodyTo::Message,
        Some(f) => BodyTo::Field(f.into()),
    };
    out.push(Binding {
        method,
        template,
        body,
        response_body: text("response_body").map(Into::into),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        let t = Template::parse(t).unwrap();
        t.matches(path).map(|r| {
            r.unwrap()
                .into_iter()
                .map(|(f, v)| (f.join("."), v))
                .collect()
        })
    }

    #[test]
    fn templates_match_and_capture() {
        assert_eq!(
            vars("/v1/items/{sku}", "/v1/items/a%20b"),
            Some(vec![("sku".into(), "a b".into())])
        );
        assert_eq!(vars("/v1/items/{sku}", "/v1/items/a/b"), None);
        assert_eq!(vars("/v1/items/{sku}", "/v1/items/"), None);
        assert_eq!(
            vars("/v1/{name=shelves/*/books/*}", "/v1/shelves/1/books/2"),
            Some(vec![("name".into(), "shelves/1/books/2".into())])
        );
        assert_eq!(
            vars("/v1/{item.sku}/{rest=**}", "/v1/x/a/b/c"),
            Some(vec![
                ("item.sku".into(), "x".into()),
                ("rest".into(), "a/b/c".into())
            ])
        );
        assert_eq!(
            vars("/v1/items/{sku}:restock", "/v1/items/7:restock"),
            Some(vec![("sku".into(), "7".into())])
        );
        assert_eq!(vars("/v1/items/{sku}:restock", "/v1/items/7"), None);
        assert_eq!(vars("/v1/items", "/v1/items"), Some(vec![]));
        // One segment decodes `%2F`; a variable over several keeps it.
        assert_eq!(
            vars("/v1/items/{sku}", "/v1/items/a%2Fb"),
            Some(vec![("sku".into(), "a/b".into())])
        );
        assert_eq!(
            vars("/v1/{name=shelves/*}", "/v1/shelves/a%2fb%20c"),
            Some(vec![("name".into(), "shelves/a%2fb c".into())])
        );
        assert_eq!(
            vars("/v1/{rest=**}", "/v1/x%2Fy/z"),
            Some(vec![("rest".into(), "x%2Fy/z".into())])
        );
        assert_eq!(vars("/", "/"), Some(vec![]));
    }

    #[test]
    fn bad_templates_are_refused() {
        for t in [
            "v1",
            "/v1/{",
            "/v1/{a}b",
            "/v1/**/x",
            "/v1/{}",
            "/v1/{a-b}",
            "/v1//x",
        ] {
            assert!(Template::parse(t).is_err(), "{t}");
        }
    }
}
