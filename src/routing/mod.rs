//! Request routing: host index → path router (matchit) → method and header filters.
//!
//! Each distinct host named by a frontend gets one path table holding its own routes plus the
//! routes of frontends that name no host; requests for other hosts use the table of host-less
//! frontends. Per request that is one hash lookup (or a short wildcard scan), one path match and
//! a scan of the few routes sharing that path.

pub(crate) mod head;
mod normalize;
pub(crate) mod template;

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

pub(crate) use normalize::normalize;

/// The method and header conditions of one route.
#[derive(Debug, Clone)]
pub(crate) struct RouteFilter {
    /// `None`: every method. `GET` implies `HEAD`.
    pub(crate) methods: Option<Box<[Method]>>,
    pub(crate) headers: Box<[(HeaderName, HeaderValue)]>,
}

impl RouteFilter {
    fn method_ok(&self, m: &Method) -> bool {
        match &self.methods {
            None => true,
            Some(list) => {
                list.iter().any(|x| x == m) || (*m == Method::HEAD && list.contains(&Method::GET))
            }
        }
    }

    fn headers_ok(&self, h: &HeaderMap) -> bool {
        self.headers.iter().all(|(k, v)| h.get(k) == Some(v))
    }

    fn overlaps(&self, other: &RouteFilter) -> bool {
        let methods = match (&self.methods, &other.methods) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
        };
        let mut ha: Vec<_> = self.headers.iter().collect();
        let mut hb: Vec<_> = other.headers.iter().collect();
        ha.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        hb.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        methods && ha == hb
    }
}

/// What the router needs to know of one route.
pub(crate) struct RouteSpec {
    /// The frontend's prefix joined with the route's path template.
    pub(crate) full_path: String,
    /// The frontend's hosts, lower case; `*.example.com` is a wildcard. Empty: any host.
    pub(crate) hosts: Vec<String>,
    pub(crate) filter: RouteFilter,
    /// For error messages: `web/user (routes/web.toml:12)`.
    pub(crate) label: String,
}

struct Group {
    /// Route indices, most header conditions first.
    candidates: Vec<usize>,
    allow: HeaderValue,
}

#[derive(Default)]
struct Table {
    paths: matchit::Router<usize>,
    groups: Vec<Group>,
}

pub(crate) struct Router {
    exact: HashMap<Box<str>, usize>,
    /// (suffix with its leading dot, table), longest suffix first.
    wildcard: Vec<(Box<str>, usize)>,
    fallback: usize,
    tables: Vec<Table>,
    filters: Vec<RouteFilter>,
}

/// The outcome of routing one request.
pub(crate) enum Found<'r, 'p> {
    Route {
        index: usize,
        params: matchit::Params<'r, 'p>,
    },
    NoRoute,
    MethodNotAllowed(&'r HeaderValue),
}

impl Router {
    /// Builds the index. Returns, for each route that cannot be added, its index and why.
    pub(crate) fn build(specs: Vec<RouteSpec>) -> (Router, Vec<(usize, String)>) {
        let mut errors = Vec::new();
        let mut hosts: Vec<&str> = specs
            .iter()
            .flat_map(|s| s.hosts.iter().map(String::as_str))
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        let hostless: Vec<usize> = (0..specs.len())
            .filter(|&i| specs[i].hosts.is_empty())
            .collect();

        let mut tables = Vec::new();
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        // The host-less table is built first so that its conflicts are reported once, there.
        tables.push(build_table(&specs, &hostless, &[], &mut errors));
        for host in hosts {
            let own: Vec<usize> = (0..specs.len())
                .filter(|&i| specs[i].hosts.iter().any(|h| h == host))
                .collect();
            let idx = tables.len();
            tables.push(build_table(&specs, &own, &hostless, &mut errors));
            match host.strip_prefix('*') {
                Some(suffix) => wildcard.push((Box::from(suffix), idx)),
                None => {
                    exact.insert(Box::from(host), idx);
                }
            }
        }
        wildcard.sort_by_key(|w: &(Box<str>, usize)| std::cmp::Reverse(w.0.len()));
        errors.sort();
        errors.dedup();
        let filters = specs.into_iter().map(|s| s.filter).collect();
        let router = Router {
            exact,
            wildcard,
            fallback: 0,
            tables,
            filters,
        };
        (router, errors)
    }

    /// Whether any route is chosen by host: if not, `find` needs no host.
    pub(crate) fn routes_by_host(&self) -> bool {
        !self.exact.is_empty() || !self.wildcard.is_empty()
    }

    /// Routes a request. `host` is lower case without port; `path` is normalized.
    pub(crate) fn find<'r, 'p>(
        &'r self,
        host: &str,
        path: &'p str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Found<'r, 'p> {
        let table = &self.tables[self.table_for(host)];
        let Ok(m) = table.paths.at(path) else {
            return Found::NoRoute;
        };
        let group = &table.groups[*m.value];
        let mut method_matched = false;
        for &idx in &group.candidates {
            let f = &self.filters[idx];
            if f.method_ok(method) {
                method_matched = true;
                if f.headers_ok(headers) {
                    return Found::Route {
                        index: idx,
                        params: m.params,
                    };
                }
            }
        }
        if method_matched {
            Found::NoRoute
        } else {
            Found::MethodNotAllowed(&group.allow)
        }
    }

    fn table_for(&self, host: &str) -> usize {
        if let Some(&t) = self.exact.get(host) {
            return t;
        }
        for (suffix, t) in &self.wildcard {
            if host.len() > suffix.len() && host.ends_with(&**suffix) {
                return *t;
            }
        }
        self.fallback
    }
}

fn build_table(
    specs: &[RouteSpec],
    primary: &[usize],
    secondary: &[usize],
    errors: &mut Vec<(usize, String)>,
) -> Table {
    let mut table = Table::default();
    let mut by_path: HashMap<&str, usize> = HashMap::new();
    for (&i, report) in primary
        .iter()
        .map(|i| (i, true))
        .chain(secondary.iter().map(|i| (i, false)))
    {
        let spec = &specs[i];
        if let Some(&g) = by_path.get(spec.full_path.as_str()) {
            let clash = table.groups[g]
                .candidates
                .iter()
                .find(|&&c| specs[c].filter.overlaps(&spec.filter));
            match clash {
                Some(&c) if report => errors.push((
                    i,
                    format!(
                        "route matches the same host, path and method as {}",
                        specs[c].label
                    ),
                )),
                // A host's own route shadows a host-less one on the same path.
                Some(_) => {}
                None => table.groups[g].candidates.push(i),
            }
            continue;
        }
        match table
            .paths
            .insert(spec.full_path.clone(), table.groups.len())
        {
            Ok(()) => {
                by_path.insert(&spec.full_path, table.groups.len());
                table.groups.push(Group {
                    candidates: vec![i],
                    allow: HeaderValue::from_static(""),
                });
            }
            Err(e) if report => errors.push((
                i,
                format!("path `{}` cannot be routed: {e}", spec.full_path),
            )),
            Err(_) => {}
        }
    }
    for g in &mut table.groups {
        g.candidates
            .sort_by_key(|&c| std::cmp::Reverse(specs[c].filter.headers.len()));
        g.allow = allow_header(g.candidates.iter().map(|&c| &specs[c].filter));
    }
    table
}

fn allow_header<'a>(filters: impl Iterator<Item = &'a RouteFilter>) -> HeaderValue {
    let mut methods: Vec<&str> = Vec::new();
    for f in filters {
        if let Some(list) = &f.methods {
            for m in list.iter() {
                methods.push(m.as_str());
                if *m == Method::GET {
                    methods.push("HEAD");
                }
            }
        }
    }
    methods.sort_unstable();
    methods.dedup();
    HeaderValue::from_str(&methods.join(", ")).unwrap_or(HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        path: &str,
        hosts: &[&str],
        methods: Option<&[Method]>,
        headers: &[(&str, &str)],
    ) -> RouteSpec {
        RouteSpec {
            full_path: path.into(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            filter: RouteFilter {
                methods: methods.map(|m| m.to_vec().into_boxed_slice()),
                headers: headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            HeaderName::from_bytes(k.as_bytes()).unwrap(),
                            HeaderValue::from_str(v).unwrap(),
                        )
                    })
                    .collect(),
            },
            label: path.into(),
        }
    }

    fn idx(r: &Router, host: &str, path: &str, m: Method, h: &HeaderMap) -> Option<usize> {
        match r.find(host, path, &m, h) {
            Found::Route { index, .. } => Some(index),
            _ => None,
        }
    }

    #[test]
    fn hosts_paths_methods_headers() {
        let get: &[Method] = &[Method::GET];
        let post: &[Method] = &[Method::POST];
        let (r, errs) = Router::build(vec![
            spec("/web/users/{id}", &[], Some(get), &[]),
            spec("/web/users/{id}", &[], Some(post), &[]),
            spec("/api/{*rest}", &["api.example.com"], None, &[]),
            spec("/api/{*rest}", &["*.example.com"], None, &[]),
            spec("/web/users/{id}", &[], Some(get), &[("x-version", "2")]),
        ]);
        assert!(errs.is_empty(), "{errs:?}");
        let none = HeaderMap::new();
        let mut v2 = HeaderMap::new();
        v2.insert("x-version", HeaderValue::from_static("2"));
        assert_eq!(idx(&r, "any", "/web/users/1", Method::GET, &none), Some(0));
        assert_eq!(idx(&r, "any", "/web/users/1", Method::HEAD, &none), Some(0));
        assert_eq!(idx(&r, "any", "/web/users/1", Method::GET, &v2), Some(4));
        assert_eq!(idx(&r, "any", "/web/users/1", Method::POST, &none), Some(1));
        assert_eq!(
            idx(&r, "api.example.com", "/api/x/y", Method::GET, &none),
            Some(2)
        );
        assert_eq!(
            idx(&r, "eu.example.com", "/api/x", Method::GET, &none),
            Some(3)
        );
        assert_eq!(idx(&r, "example.com", "/api/x", Method::GET, &none), None);
        // Host-less routes are reachable on a named host too.
        assert_eq!(
            idx(&r, "api.example.com", "/web/users/1", Method::GET, &none),
            Some(0)
        );
        match r.find("any", "/web/users/1", &Method::DELETE, &none) {
            Found::MethodNotAllowed(allow) => assert_eq!(allow, "GET, HEAD, POST"),
            _ => panic!("expected 405"),
        }
        assert!(matches!(
            r.find("any", "/nope", &Method::GET, &none),
            Found::NoRoute
        ));
    }

    #[test]
    fn duplicates_and_conflicts_are_reported() {
        let get: &[Method] = &[Method::GET];
        let (_, errs) = Router::build(vec![
            spec("/a/{id}", &[], Some(get), &[]),
            spec("/a/{id}", &[], None, &[]),
            spec("/a/{name}", &[], Some(get), &[]),
            spec("/h", &["x.com"], None, &[]),
            spec("/h", &["x.com"], None, &[]),
        ]);
        let which: Vec<usize> = errs.iter().map(|e| e.0).collect();
        assert_eq!(which, vec![1, 2, 4], "{errs:?}");
    }
}
