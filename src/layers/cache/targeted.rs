//! `CDN-Cache-Control` (RFC 9213): a response field for caches at the edge, which they follow
//! instead of `Cache-Control`. It is a Structured Field dictionary (RFC 8941); one that does
//! not parse as one, or whose freshness directives are not integers, is ignored whole.

use http::header::HeaderName;

/// `CDN-Cache-Control` (RFC 9213), the field a gateway at the edge follows instead of
/// `Cache-Control` (and `Expires`) when a response carries it.
pub(crate) static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// Whether a `CDN-Cache-Control` line is a Structured Field dictionary (RFC 8941) whose
/// freshness directives are integers; one that is not is ignored whole (RFC 9213 §2.1).
pub(super) fn targeted_valid(s: &str) -> bool {
    let mut ok = true;
    // Members, split outside quotes.
    let mut in_quotes = false;
    let mut escaped = false;
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut members = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if in_quotes {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_quotes = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_quotes = true,
            b',' => {
                members.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return false;
    }
    members.push(&s[start..]);
    for m in members {
        let m = m.trim_matches([' ', '\t']);
        // The member's own key and value; parameters (`;k=v`) are checked for their keys.
        let mut parts = m.split(';');
        let head = parts.next().unwrap_or("");
        let (key, value) = match head.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (head, None),
        };
        ok &= sf_key(key) && value.is_none_or(sf_bare_item);
        if matches!(
            key,
            "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
        ) {
            ok &= value.is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        }
        for p in parts {
            let p = p.trim_start_matches(' ');
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (p, None),
            };
            ok &= sf_key(k) && v.is_none_or(sf_bare_item);
        }
    }
    ok
}

fn sf_key(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'*')
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-.*".contains(&c))
}

fn sf_bare_item(v: &str) -> bool {
    let b = v.as_bytes();
    match b.first() {
        Some(b'"') => b.len() >= 2 && b[b.len() - 1] == b'"',
        Some(b'?') => v == "?0" || v == "?1",
        Some(b':') => b.len() >= 2 && b[b.len() - 1] == b':',
        Some(c) if c.is_ascii_digit() || *c == b'-' => {
            let digits = v.trim_start_matches('-');
            let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
            !int.is_empty()
                && int.len() <= 15
                && int.bytes().all(|c| c.is_ascii_digit())
                && frac.len() <= 3
                && frac.bytes().all(|c| c.is_ascii_digit())
        }
        Some(c) if c.is_ascii_alphabetic() || *c == b'*' => v
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c)),
        _ => false,
    }
}
