//! The request target a proxy route sends upstream: its upstream path template
//! (`/v1/users/{id}`) filled from the captured parameters, or the matched path with the
//! frontend's prefix stripped, plus the client's query unless the route drops it. Built by the
//! proxy backend from the request's `Exchange`, so every layer above it sees the client's URI.

use crate::context::Exchange;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Part {
    Lit(Box<str>),
    Param(Box<str>),
}

/// How a proxy route builds the upstream path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UpstreamPath {
    /// The request path with this many leading bytes (the frontend's prefix) removed.
    StripPrefix(usize),
    Template(Box<[Part]>),
    /// The request's own target, as made by the backend that sends it (an aggregate's call).
    AsRequested,
}

/// An upstream path template that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("upstream path `{0}` must start with `/`")]
    NoSlash(String),
    #[error("upstream path `{0}`: unclosed `{{`")]
    Unclosed(String),
    #[error("upstream path `{0}`: stray `}}`")]
    Stray(String),
    #[error("upstream path `{tpl}` uses `{{{name}}}`, which the route path does not capture (it captures: {captured})")]
    NotCaptured {
        tpl: String,
        name: String,
        captured: String,
    },
}

impl UpstreamPath {
    /// Parses an upstream template; every `{name}` must be captured by the route path.
    pub(crate) fn template(tpl: &str, captured: &[String]) -> Result<Self, TemplateError> {
        if !tpl.starts_with('/') {
            return Err(TemplateError::NoSlash(tpl.to_owned()));
        }
        let mut parts = Vec::new();
        let mut rest = tpl;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| TemplateError::Unclosed(tpl.to_owned()))?;
            let raw = &rest[open + 1..open + close];
            let name = raw.strip_prefix('*').unwrap_or(raw);
            if !captured.iter().any(|c| c == name) {
                return Err(TemplateError::NotCaptured {
                    tpl: tpl.to_owned(),
                    name: raw.to_owned(),
                    captured: if captured.is_empty() {
                        "nothing".to_owned()
                    } else {
                        captured.join(", ")
                    },
                });
            }
            parts.push(Part::Param(name.into()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::Stray(tpl.to_owned()));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.into()));
        }
        Ok(UpstreamPath::Template(parts.into_boxed_slice()))
    }

    /// The origin-form target to send upstream: this template's path and `query` (the
    /// request's query as it reaches the backend: a layer above may have removed a parameter,
    /// like an API key).
    pub(crate) fn build(&self, x: &Exchange, query: Option<&str>) -> String {
        let path = x.path();
        let mut out = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1) + 16);
        match self {
            UpstreamPath::StripPrefix(n) => {
                let rest = path.get(*n..).unwrap_or("");
                if !rest.starts_with('/') {
                    out.push('/');
                }
                out.push_str(rest);
            }
            UpstreamPath::AsRequested => {
                if let Some(pq) = x.original_uri().path_and_query() {
                    out.push_str(pq.path());
                }
            }
            UpstreamPath::Template(parts) => {
                for p in parts.iter() {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Param(name) => out.push_str(x.param(name).unwrap_or("")),
                    }
                }
            }
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::testing::exchange;

    #[test]
    fn rewrites() {
        let captured = vec!["id".to_owned(), "rest".to_owned()];
        let x = exchange("/web/users/42/a/b?q=1", &["id", "rest"], &["42", "a/b"]);
        let t = UpstreamPath::template("/v1/u/{id}/x/{rest}", &captured).unwrap();
        assert_eq!(t.build(&x, x.query()), "/v1/u/42/x/a/b?q=1");
        assert_eq!(t.build(&x, None), "/v1/u/42/x/a/b");
        let s = UpstreamPath::StripPrefix(4);
        assert_eq!(s.build(&x, None), "/users/42/a/b");
        assert_eq!(s.build(&exchange("/web", &[], &[]), None), "/");
        assert!(matches!(
            UpstreamPath::template("/v1/{nope}", &captured),
            Err(TemplateError::NotCaptured { name, .. }) if name == "nope"
        ));
        assert_eq!(
            UpstreamPath::template("v1", &captured),
            Err(TemplateError::NoSlash("v1".into()))
        );
    }
}
