//! The templates of an aggregate's calls: `{id}` (the route's path parameters), and the
//! namespaced `{query.NAME}`, `{headers.NAME}`, `{claims.NAME}`, `{calls.CALL.body.PATH}`,
//! `{item.PATH}` (the element of a `for_each`) and `{body}` (the client's body), each with an
//! optional `:-default`. Parsed once when the route is built; rendered per call.
//!
//! Every value is encoded for where it goes: in a path, one segment, percent-encoded (every
//! byte but the unreserved ones: `/`, `?`, `#`, `%` and `..` can never change the path's
//! structure; a value that is `.` or `..` or empty is refused), in a query percent-encoded, in
//! a header checked (no control characters). A missing value is an error naming it, never an
//! empty string.

use serde_json::Value;

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Source {
    Param(Box<str>),
    Query(Box<str>),
    Header(http::HeaderName),
    Claim(Box<str>),
    /// A call (by index) and a path into its JSON answer.
    Call(usize, JsonPath),
    Item(JsonPath),
    /// The client's request body (only as a whole `body`).
    Body,
}

impl Source {
    /// Whether the value comes from the client's request (a missing one is the client's
    /// fault: 400) rather than from a backend's answer.
    pub(crate) fn is_client_input(&self) -> bool {
        !matches!(self, Source::Call(..) | Source::Item(_))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Var {
    pub(crate) source: Source,
    pub(crate) default: Option<Box<str>>,
    /// As written, for errors (`query.limit`).
    pub(crate) raw: Box<str>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Piece {
    Lit(Box<str>),
    Var(Var),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Template(pub(crate) Box<[Piece]>);

/// A path into a JSON value: `items[0].sku`, `data.user`; `[*]` only in `for_each`.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct JsonPath(pub(crate) Box<[Step]>);

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Key(Box<str>),
    Index(usize),
    Each,
}

impl JsonPath {
    pub(crate) fn parse(s: &str) -> Result<JsonPath, String> {
        let mut steps = Vec::new();
        if s.is_empty() {
            return Ok(JsonPath::default());
        }
        for part in s.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !key.is_empty() {
                steps.push(Step::Key(key.into()));
            } else if rest.is_empty() {
                return Err(format!("`{s}`: empty segment"));
            }
            while let Some(r) = rest.strip_prefix('[') {
                let close = r.find(']').ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
                let idx = &r[..close];
                steps.push(if idx == "*" {
                    Step::Each
                } else {
                    Step::Index(
                        idx.parse()
                            .map_err(|_| format!("`{s}`: `[{idx}]` is not an index"))?,
                    )
                });
                rest = &r[close + 1..];
            }
            if !rest.is_empty() {
                return Err(format!("`{s}`: unexpected `{rest}`"));
            }
        }
        Ok(JsonPath(steps.into()))
    }

    pub(crate) fn has_each(&self) -> bool {
        self.0.contains(&Step::Each)
    }

    /// The value at this path (no `[*]`).
    pub(crate) fn get<'v>(&self, mut v: &'v Value) -> Option<&'v Value> {
        for step in self.0.iter() {
            v = match step {
                Step::Key(k) => v.get(&**k)?,
                Step::Index(i) => v.get(*i)?,
                Step::Each => return None,
            };
        }
        Some(v)
    }

    /// Every value at this path, `[*]` expanded, in order; elements where the rest of the path
    /// leads nowhere are skipped.
    pub(crate) fn all<'v>(&self, v: &'v Value, out: &mut Vec<&'v Value>) {
        fn walk<'v>(steps: &[Step], v: &'v Value, out: &mut Vec<&'v Value>) {
            let Some((first, rest)) = steps.split_first() else {
                out.push(v);
                return;
            };
            match first {
                Step::Key(k) => {
                    if let Some(n) = v.get(&**k) {
                        walk(rest, n, out);
                    }
                }
                Step::Index(i) => {
                    if let Some(n) = v.get(*i) {
                        walk(rest, n, out);
                    }
                }
                Step::Each => {
                    if let Some(a) = v.as_array() {
                        for n in a {
                            walk(rest, n, out);
                        }
                    }
                }
            }
        }
        walk(&self.0, v, out);
    }
}

/// What a template may refer to, to check it when the route is built.
pub(crate) struct Names<'a> {
    /// The route path's parameters.
    pub(crate) params: &'a [String],
    /// Every call of the aggregate, in order.
    pub(crate) calls: &'a [&'a str],
    /// Whether `{item}` exists (the call has `for_each`).
    pub(crate) item: bool,
}

/// Parses one `{…}` expression.
pub(crate) fn parse_var(expr: &str, names: &Names<'_>) -> Result<Var, String> {
    let (name, default) = match expr.split_once(":-") {
        Some((n, d)) => (n, Some(d.into())),
        None => (expr, None),
    };
    let source = if let Some(q) = name.strip_prefix("query.") {
        Source::Query(nonempty(q, expr)?.into())
    } else if let Some(h) = name.strip_prefix("headers.") {
        Source::Header(
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("`{{{expr}}}`: `{h}` is not a header name"))?,
        )
    } else if let Some(c) = name.strip_prefix("claims.") {
        Source::Claim(nonempty(c, expr)?.into())
    } else if let Some(rest) = name.strip_prefix("calls.") {
        let (call, path) = rest.split_once('.').unwrap_or((rest, ""));
        let idx = names
            .calls
            .iter()
            .position(|c| *c == call)
            .ok_or_else(|| format!("`{{{expr}}}`: no call named `{call}`"))?;
        let path = match path.strip_prefix("body") {
            Some("") => JsonPath::default(),
            Some(p) if p.starts_with('.') => JsonPath::parse(&p[1..])?,
            _ => {
                return Err(format!(
                    "`{{{expr}}}`: write `calls.{call}.body` or `calls.{call}.body.PATH`"
                ))
            }
        };
        if path.has_each() {
            return Err(format!("`{{{expr}}}`: `[*]` belongs in `for_each`"));
        }
        Source::Call(idx, path)
    } else if name == "item" || name.starts_with("item.") {
        if !names.item {
            return Err(format!(
                "`{{{expr}}}`: `item` exists only in a call with `for_each`"
            ));
        }
        Source::Item(JsonPath::parse(name.strip_prefix("item.").unwrap_or(""))?)
    } else if name == "body" {
        Source::Body
    } else if names.params.iter().any(|p| p == name) {
        Source::Param(name.into())
    } else {
        return Err(format!(
            "`{{{expr}}}` is not a path parameter of the route ({}) nor one of query.NAME, headers.NAME, claims.NAME, calls.CALL.body.PATH, item",
            if names.params.is_empty() { "it has none".to_owned() } else { names.params.join(", ") }
        ));
    };
    Ok(Var {
        source,
        default,
        raw: name.into(),
    })
}

fn nonempty<'a>(s: &'a str, expr: &str) -> Result<&'a str, String> {
    if s.is_empty() {
        Err(format!("`{{{expr}}}` names nothing"))
    } else {
        Ok(s)
    }
}

impl Template {
    pub(crate) fn parse(tpl: &str, names: &Names<'_>) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = tpl;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Lit(rest[..open].into()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{tpl}`: unclosed `{{`"))?;
            let var = parse_var(&rest[open + 1..open + close], names)?;
            if var.source == Source::Body {
                return Err(format!("`{tpl}`: `{{body}}` is only a whole `body`"));
            }
            pieces.push(Piece::Var(var));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{tpl}`: stray `}}`"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Lit(rest.into()));
        }
        Ok(Template(pieces.into()))
    }

    /// Whether a value of the client's request goes into it.
    pub(crate) fn reads_client(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Var(v) if v.source.is_client_input()))
    }

    /// The calls this template reads.
    pub(crate) fn calls(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().filter_map(|p| match p {
            Piece::Var(Var {
                source: Source::Call(i, _),
                ..
            }) => Some(*i),
            _ => None,
        })
    }

    /// Renders the template, each value encoded for `enc`.
    pub(crate) fn render(&self, scope: &Scope<'_>, enc: Encoding) -> Result<String, Missing> {
        let mut out = String::new();
        for p in self.0.iter() {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(v) => {
                    let value = scope.text(v)?;
                    encode(&value, enc, &mut out).map_err(|why| Missing::of(v, why))?;
                }
            }
        }
        Ok(out)
    }
}

/// Where a rendered value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    PathSegment,
    Query,
    Header,
    /// A JSON string's content (the text of a string leaf of a body template).
    Text,
}

/// A value a template needs and does not have (or cannot use there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Missing {
    pub(crate) var: Box<str>,
    pub(crate) why: &'static str,
    pub(crate) from_client: bool,
}

impl Missing {
    fn of(v: &Var, why: &'static str) -> Self {
        Missing {
            var: v.raw.clone(),
            why,
            from_client: v.source.is_client_input(),
        }
    }
}

fn encode(value: &str, enc: Encoding, out: &mut String) -> Result<(), &'static str> {
    match enc {
        Encoding::PathSegment => {
            if value.is_empty() || value == "." || value == ".." {
                return Err("is empty, `.` or `..` (not a path segment)");
            }
            percent(value, out);
        }
        Encoding::Query => percent(value, out),
        Encoding::Header => {
            if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
                return Err("holds control characters (not a header value)");
            }
            out.push_str(value);
        }
        Encoding::Text => out.push_str(value),
    }
    Ok(())
}

/// Every byte but the unreserved ones (RFC 3986: letters, digits, `-._~`) percent-encoded.
const ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn percent(value: &str, out: &mut String) {
    out.extend(percent_encoding::utf8_percent_encode(value, ENCODE));
}

/// What the templates of one call read from.
pub(crate) struct Scope<'a> {
    pub(crate) params: &'a dyn Fn(&str) -> Option<String>,
    pub(crate) query: &'a [(String, String)],
    pub(crate) headers: &'a http::HeaderMap,
    pub(crate) claims: Option<&'a serde_json::Map<String, Value>>,
    /// Each call's answer, once it has one.
    pub(crate) calls: &'a [Option<Value>],
    pub(crate) item: Option<&'a Value>,
}

impl Scope<'_> {
    /// The value of `v` as JSON (a string for the request's own values).
    pub(crate) fn value(&self, v: &Var) -> Result<Value, Missing> {
        let found = match &v.source {
            Source::Param(p) => (self.params)(p).map(Value::String),
            Source::Query(q) => self
                .query
                .iter()
                .find(|(k, _)| k == &**q)
                .map(|(_, v)| Value::String(v.clone())),
            Source::Header(h) => self
                .headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(|s| Value::String(s.to_owned())),
            Source::Claim(c) => self.claims.and_then(|m| m.get(&**c)).cloned(),
            Source::Call(i, path) => self
                .calls
                .get(*i)
                .and_then(Option::as_ref)
                .and_then(|body| path.get(body))
                .cloned(),
            Source::Item(path) => self.item.and_then(|i| path.get(i)).cloned(),
            Source::Body => None,
        };
        // As in a shell's `:-`, an empty value takes the default too.
        let empty = |x: &Option<Value>| match x {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        match (empty(&found), found, &v.default) {
            (true, _, Some(d)) => Ok(Value::String(d.to_string())),
            (true, None | Some(Value::Null), None) => Err(Missing::of(v, "has no value")),
            (_, Some(x), _) => Ok(x),
            (_, None, _) => Err(Missing::of(v, "has no value")),
        }
    }

    /// The value of `v` as text: strings as they are, numbers and booleans written out.
    fn text(&self, v: &Var) -> Result<String, Missing> {
        match self.value(v)? {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(Missing::of(v, "is an object or a list, not text")),
        }
    }
}

/// The fuzz target `aggregate_template`: a value from a client or a backend (the input) put
/// into a path, a query and a header through templates; the path keeps its structure (as many
/// `/` as the template's own, no `?` or `#`), the query no `&`, `=` or `#` of the value's.
pub(crate) fn fuzz_render(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let names = Names {
        params: &[],
        calls: &["c"],
        item: true,
    };
    // The input is also parsed as a template (from config: must not panic).
    let _ = Template::parse(&text, &names);
    let path = Template::parse("/v1/{query.v}/x/{calls.c.body.v}/{item}", &names);
    let Ok(path) = path else {
        return;
    };
    let Ok(query) = Template::parse("{headers.v}", &names) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        headers.insert("v", v);
    }
    let value = Value::String(text.to_string());
    let body = serde_json::json!({ "v": value });
    let calls = [Some(body)];
    let none = |_: &str| None;
    let q = [("v".to_owned(), text.to_string())];
    let scope = Scope {
        params: &none,
        query: &q,
        headers: &headers,
        claims: None,
        calls: &calls,
        item: Some(&value),
    };
    if let Ok(p) = path.render(&scope, Encoding::PathSegment) {
        assert_eq!(p.matches('/').count(), 5, "{p}");
        assert!(!p.contains(['?', '#', ' ']), "{p}");
        assert!(p.bytes().all(|b| b.is_ascii_graphic()), "{p}");
    }
    if let Ok(v) = query.render(&scope, Encoding::Query) {
        assert!(!v.contains(['&', '=', '#', '+', ' ']), "{v}");
    }
    if let Ok(v) = query.render(&scope, Encoding::Header) {
        assert!(http::HeaderValue::from_str(&v).is_ok(), "{v:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names<'a>(params: &'a [String], calls: &'a [&'a str]) -> Names<'a> {
        Names {
            params,
            calls,
            item: true,
        }
    }

    #[test]
    fn values_stay_one_segment_whatever_they_hold() {
        let params = ["id".to_owned()];
        let calls = ["user"];
        let t = Template::parse(
            "/v1/users/{calls.user.body.id}/x/{id}",
            &names(&params, &calls),
        )
        .unwrap();
        let headers = http::HeaderMap::new();
        let answers = [Some(json!({"id": "../../admin?x=1#f%2F"}))];
        let param = |_: &str| Some("a/b c".to_owned());
        let scope = Scope {
            params: &param,
            query: &[],
            headers: &headers,
            claims: None,
            calls: &answers,
            item: None,
        };
        assert_eq!(
            t.render(&scope, Encoding::PathSegment).unwrap(),
            "/v1/users/..%2F..%2Fadmin%3Fx%3D1%23f%252F/x/a%2Fb%20c"
        );
        // A whole `..` is refused, not sent.
        let dots = [Some(json!({"id": ".."}))];
        let scope = Scope {
            calls: &dots,
            ..scope
        };
        let e = t.render(&scope, Encoding::PathSegment).unwrap_err();
        assert_eq!((&*e.var, e.from_client), ("calls.user.body.id", false));
    }

    #[test]
    fn missing_values_are_errors_and_defaults_fill_them() {
        let t = Template::parse("{query.limit:-5}-{headers.x-a}", &names(&[], &[])).unwrap();
        let headers = http::HeaderMap::new();
        let none = |_: &str| None;
        let scope = Scope {
            params: &none,
            query: &[],
            headers: &headers,
            claims: None,
            calls: &[],
            item: None,
        };
        let e = t.render(&scope, Encoding::Query).unwrap_err();
        assert_eq!((&*e.var, e.from_client), ("headers.x-a", true));
        let mut with = http::HeaderMap::new();
        with.insert("x-a", http::HeaderValue::from_static("v 1"));
        let scope = Scope {
            headers: &with,
            ..scope
        };
        assert_eq!(t.render(&scope, Encoding::Query).unwrap(), "5-v%201");
    }

    #[test]
    fn header_values_cannot_carry_a_line_break() {
        let t = Template::parse("{claims.sub}", &names(&[], &[])).unwrap();
        let claims = json!({"sub": "x\r\nSet-Cookie: a=b"});
        let none = |_: &str| None;
        let headers = http::HeaderMap::new();
        let scope = Scope {
            params: &none,
            query: &[],
            headers: &headers,
            claims: claims.as_object(),
            calls: &[],
            item: None,
        };
        assert!(t.render(&scope, Encoding::Header).is_err());
        assert_eq!(
            t.render(&scope, Encoding::Query).unwrap(),
            "x%0D%0ASet-Cookie%3A%20a%3Db"
        );
    }

    #[test]
    fn bad_templates_say_why() {
        let n = names(&[], &["user"]);
        for (tpl, says) in [
            ("/{nope}", "not a path parameter"),
            ("/{calls.order.body}", "no call named `order`"),
            ("/{calls.user.id}", "write `calls.user.body`"),
            ("/{calls.user.body.items[*]}", "belongs in `for_each`"),
            ("/{query.a", "unclosed"),
            ("/a}", "stray"),
            ("/{headers.bad name}", "not a header name"),
        ] {
            let e = Template::parse(tpl, &n).unwrap_err();
            assert!(e.contains(says), "{tpl}: {e}");
        }
    }

    #[test]
    fn json_paths() {
        let v = json!({"items": [{"sku": "a"}, {"x": 1}, {"sku": "c"}], "n": [1, 2]});
        let p = JsonPath::parse("items[*].sku").unwrap();
        let mut out = Vec::new();
        p.all(&v, &mut out);
        assert_eq!(out, [&json!("a"), &json!("c")]);
        assert_eq!(JsonPath::parse("n[1]").unwrap().get(&v), Some(&json!(2)));
        assert!(JsonPath::parse("a[x]").is_err());
    }
}
