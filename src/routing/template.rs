//! Path templates: the route path (`/users/{id}`, `/api/{*rest}`) that requests are matched
//! against, and the upstream path (`/v1/users/{id}`) a proxy route sends, filled from the
//! captured parameters. Both are parsed and checked when a config is compiled.

/// The names a route path captures, in order. Errors say what is wrong with the template.
pub fn route_params(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') {
        return Err(format!("path `{path}` must start with `/`"));
    }
    let mut names = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        if !seg.contains(['{', '}']) {
            continue;
        }
        let inner = seg
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .filter(|s| !s.contains(['{', '}']))
            .ok_or_else(|| {
                format!("in path `{path}`: a parameter must be a whole segment, like `{{id}}`")
            })?;
        let (name, catch_all) = match inner.strip_prefix('*') {
            Some(n) => (n, true),
            None => (inner, false),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "in path `{path}`: `{seg}` is not a valid parameter name"
            ));
        }
        if catch_all && i + 1 != segments.len() {
            return Err(format!(
                "in path `{path}`: `{{*{name}}}` must be the last segment"
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(format!(
                "in path `{path}`: parameter `{name}` appears twice"
            ));
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Lit(Box<str>),
    Param(Box<str>),
}

/// How a proxy route builds the upstream path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamPath {
    /// The request path with this many leading bytes (the frontend's prefix) removed.
    StripPrefix(usize),
    Template(Box<[Part]>),
}

impl UpstreamPath {
    /// Parses an upstream template; every `{name}` must be captured by the route path.
    pub fn template(tpl: &str, captured: &[String]) -> Result<Self, String> {
        if !tpl.starts_with('/') {
            return Err(format!("upstream path `{tpl}` must start with `/`"));
        }
        let mut parts = Vec::new();
        let mut rest = tpl;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Lit(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("upstream path `{tpl}`: unclosed `{{`"))?;
            let raw = &rest[open + 1..open + close];
            let name = raw.strip_prefix('*').unwrap_or(raw);
            if !captured.iter().any(|c| c == name) {
                return Err(format!(
                    "upstream path `{tpl}` uses `{{{raw}}}`, which the route path does not capture (it captures: {})",
                    if captured.is_empty() { "nothing".to_owned() } else { captured.join(", ") }
                ));
            }
            parts.push(Part::Param(name.into()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("upstream path `{tpl}`: stray `}}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.into()));
        }
        Ok(UpstreamPath::Template(parts.into_boxed_slice()))
    }

    /// The origin-form target (path and query) to send upstream.
    pub fn build(
        &self,
        path: &str,
        params: &matchit::Params<'_, '_>,
        query: Option<&str>,
    ) -> String {
        let mut out = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1) + 16);
        match self {
            UpstreamPath::StripPrefix(n) => {
                let rest = path.get(*n..).unwrap_or("");
                if !rest.starts_with('/') {
                    out.push('/');
                }
                out.push_str(rest);
            }
            UpstreamPath::Template(parts) => {
                for p in parts.iter() {
                    match p {
                        Part::Lit(s) => out.push_str(s),
                        Part::Param(name) => out.push_str(params.get(&**name).unwrap_or("")),
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

    #[test]
    fn route_templates() {
        assert_eq!(
            route_params("/users/{id}/orders/{oid}").unwrap(),
            ["id", "oid"]
        );
        assert_eq!(route_params("/api/{*rest}").unwrap(), ["rest"]);
        assert!(route_params("users").is_err());
        assert!(route_params("/a/{*rest}/b").is_err());
        assert!(route_params("/a/x{id}").is_err());
        assert!(route_params("/a/{}").is_err());
        assert!(route_params("/a/{id}/{id}").is_err());
    }

    #[test]
    fn rewrites() {
        let mut r = matchit::Router::new();
        r.insert("/web/users/{id}/{*rest}", ()).unwrap();
        let m = r.at("/web/users/42/a/b").unwrap();
        let captured = vec!["id".to_owned(), "rest".to_owned()];
        let t = UpstreamPath::template("/v1/u/{id}/x/{rest}", &captured).unwrap();
        assert_eq!(
            t.build("/web/users/42/a/b", &m.params, Some("q=1")),
            "/v1/u/42/x/a/b?q=1"
        );
        let s = UpstreamPath::StripPrefix(4);
        assert_eq!(
            s.build("/web/users/42/a/b", &m.params, None),
            "/users/42/a/b"
        );
        assert_eq!(s.build("/web", &m.params, None), "/");
        assert!(UpstreamPath::template("/v1/{nope}", &captured)
            .unwrap_err()
            .contains("does not capture"));
        assert!(UpstreamPath::template("v1", &captured).is_err());
    }
}
