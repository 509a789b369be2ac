//! What a cached object is found by. The primary key is the URL: scheme, host (lowercased),
//! the normalized path the route matched, and the query — only the route's `key_query`
//! parameters in their order, or all of them sorted. Under one URL, each stored variant
//! records the request header values it was selected by (the route's `vary` and the
//! service's `Vary`) and, on a per-identity route, who it is for (§4.1).

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The URL key of a request.
pub(crate) fn primary(
    tls: bool,
    host: &str,
    path: &str,
    query: Option<&str>,
    key_query: Option<&[Box<str>]>,
) -> String {
    let mut key = String::with_capacity(8 + host.len() + path.len() + query.map_or(0, str::len));
    key.push_str(if tls { "https://" } else { "http://" });
    for c in host.chars() {
        key.push(c.to_ascii_lowercase());
    }
    key.push_str(path);
    let Some(q) = query.filter(|q| !q.is_empty()) else {
        return key;
    };
    let mut pairs: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
    match key_query {
        Some(names) => {
            let name_of = |p: &str| p.split_once('=').map_or(p, |(n, _)| n).to_owned();
            let mut kept = Vec::new();
            for n in names {
                kept.extend(pairs.iter().filter(|p| name_of(p) == **n).copied());
            }
            pairs = kept;
        }
        None => pairs.sort_unstable(),
    }
    for (i, p) in pairs.iter().enumerate() {
        key.push(if i == 0 { '?' } else { '&' });
        key.push_str(p);
    }
    key
}

/// The key of an absolute URL as a client would request it (`None` when it is not one);
/// `normalize` is the router's path normalization.
pub(crate) fn from_url(url: &str, normalize: impl Fn(&str) -> Option<String>) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let tls = match uri.scheme_str()? {
        "https" => true,
        "http" => false,
        _ => return None,
    };
    let path = normalize(uri.path())?;
    Some(primary(
        tls,
        uri.authority()?.as_str(),
        &path,
        uri.query(),
        None,
    ))
}

/// A URL prefix as keys begin: the scheme and host lowercased.
pub(crate) fn prefix_of(prefix: &str) -> String {
    match prefix.split_once("://") {
        Some((scheme, rest)) => {
            let (host, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
            format!(
                "{}://{}{path}",
                scheme.to_ascii_lowercase(),
                host.to_ascii_lowercase()
            )
        }
        None => prefix.to_owned(),
    }
}

/// The request header values a variant was selected by.
pub(crate) type Selected = Box<[(HeaderName, Box<[HeaderValue]>)]>;

/// The values of `names` in `headers` (absent is an empty list).
pub(crate) fn select<'a>(
    headers: &HeaderMap,
    names: impl Iterator<Item = &'a HeaderName>,
) -> Selected {
    names
        .map(|n| (n.clone(), headers.get_all(n).iter().cloned().collect()))
        .collect()
}

/// Whether a request has the header values a variant was selected by (§4.1: the same values,
/// compared as lists: whitespace around each member does not count).
pub(crate) fn selected_by(selected: &Selected, headers: &HeaderMap) -> bool {
    selected.iter().all(|(name, want)| {
        let mut have = headers.get_all(name).iter();
        want.iter()
            .all(|w| have.next().is_some_and(|h| same_list(h, w)))
            && have.next().is_none()
    })
}

fn same_list(a: &HeaderValue, b: &HeaderValue) -> bool {
    fn members(v: &HeaderValue) -> impl Iterator<Item = &[u8]> {
        v.as_bytes().split(|c| *c == b',').map(<[u8]>::trim_ascii)
    }
    a.as_bytes() == b.as_bytes() || members(a).eq(members(b))
}

/// Fuzzing entry: any query and host make a key, the same each time, without panicking; any
/// header value is parsed as Cache-Control, Expires and Age; any bytes are read as a shared
/// tier's object.
pub(crate) fn fuzz_key(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let (host, rest) = s.split_once('/').unwrap_or((&s, ""));
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let names: Vec<Box<str>> = query.split('&').take(3).map(Box::from).collect();
    let a = primary(false, host, path, Some(query), None);
    assert_eq!(a, primary(false, host, path, Some(query), None));
    let _ = primary(true, host, path, Some(query), Some(&names));
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(data) {
        headers.append(http::header::ACCEPT, v);
    }
    let sel = select(&headers, [http::header::ACCEPT].iter());
    assert!(selected_by(&sel, &headers));
    let mut cc = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(data) {
        cc.append(http::header::CACHE_CONTROL, v.clone());
        cc.append(http::header::EXPIRES, v.clone());
        cc.append(http::header::AGE, v);
    }
    let d = super::rules::ResponseDirectives::parse(&cc);
    let _ = super::rules::RequestDirectives::parse(&cc);
    let now = std::time::SystemTime::UNIX_EPOCH;
    let a = super::rules::Assumptions {
        ttl: None,
        heuristic: true,
        store_set_cookie: false,
        per_identity: false,
    };
    let _ = super::rules::storable(http::StatusCode::OK, &cc, &d, false, &a, now, now);
    super::shared::fuzz_decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_sorted_or_selected() {
        assert_eq!(
            primary(false, "Example.COM", "/a", Some("b=2&a=1&&c"), None),
            "http://example.com/a?a=1&b=2&c"
        );
        let names: Vec<Box<str>> = vec!["page".into(), "sort".into()];
        assert_eq!(
            primary(true, "x", "/l", Some("utm=1&sort=asc&page=2"), Some(&names)),
            "https://x/l?page=2&sort=asc"
        );
        assert_eq!(
            primary(true, "x", "/l", Some("utm=1"), Some(&names)),
            "https://x/l"
        );
        assert_eq!(primary(false, "x", "/", Some(""), None), "http://x/");
    }

    #[test]
    fn variants_match_on_the_same_values() {
        let mut a = HeaderMap::new();
        a.append("accept-language", HeaderValue::from_static("de"));
        let names = [HeaderName::from_static("accept-language")];
        let sel = select(&a, names.iter());
        assert!(selected_by(&sel, &a));
        let mut b = HeaderMap::new();
        b.append("accept-language", HeaderValue::from_static(" de "));
        assert!(selected_by(&sel, &b));
        b.insert("accept-language", HeaderValue::from_static("fr"));
        assert!(!selected_by(&sel, &b));
        assert!(!selected_by(&sel, &HeaderMap::new()), "absent is not `de`");
        let mut list = HeaderMap::new();
        list.append("accept-language", HeaderValue::from_static("de,fr"));
        let sel_list = select(&list, names.iter());
        list.insert("accept-language", HeaderValue::from_static("de , fr"));
        assert!(
            selected_by(&sel_list, &list),
            "whitespace around members does not count"
        );
        let none = select(&HeaderMap::new(), names.iter());
        assert!(selected_by(&none, &HeaderMap::new()));
    }
}
