//! Request-path normalization, done once before matching: percent-encoded unreserved characters
//! are decoded, other escapes get upper-case hex, duplicate slashes collapse, and `.`/`..`
//! segments are resolved (never above the root). So `/web/%2e%2e/admin` and `/web/../admin`
//! both become `/admin` and are routed as that — they cannot reach a route under `/web`.
//! An already-normal path (the common case) is returned borrowed, without allocating.

use std::borrow::Cow;

/// The path has a `%` not followed by two hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidPath;

pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let trailing_slash = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "."
        || decoded == "..";
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing_slash && !out.ends_with('/')) {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') || b.contains(&b'%') {
        return false;
    }
    // Look for "//", "/." followed by "/" or end, "/.." followed by "/" or end.
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' {
            let rest = &b[i + 1..];
            if rest.first() == Some(&b'/') {
                return false;
            }
            if rest.first() == Some(&b'.') {
                let after = if rest.get(1) == Some(&b'.') { 2 } else { 1 };
                if matches!(rest.get(after), None | Some(b'/')) {
                    return false;
                }
            }
        }
        i += 1;
    }
    true
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(path: &str) -> Result<String, InvalidPath> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len() + 1);
    if b.first() != Some(&b'/') {
        out.push('/');
    }
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).copied().and_then(hex_val).ok_or(InvalidPath)?;
            let lo = b.get(i + 2).copied().and_then(hex_val).ok_or(InvalidPath)?;
            let c = hi << 4 | lo;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[(c >> 4) as usize] as char);
                out.push(HEX[(c & 0xf) as usize] as char);
            }
            i += 3;
        } else {
            // The path of an http::Uri is ASCII; copy byte runs as they are.
            let start = i;
            while i < b.len() && b[i] != b'%' {
                i += 1;
            }
            out.push_str(&path[start..i]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).unwrap().into_owned()
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/a/b", "/a/b/", "/a/.hidden", "/a/..b", "/a.b/c..d"] {
            assert!(matches!(normalize(p).unwrap(), Cow::Borrowed(_)), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(n("/web/../admin"), "/admin");
        assert_eq!(n("/web/./users//1"), "/web/users/1");
        assert_eq!(n("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("//a///b/"), "/a/b/");
        assert_eq!(n("/.."), "/");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(n("/web/%2e%2e/admin"), "/admin");
        assert_eq!(n("/web/%2E%2E/admin"), "/admin");
        assert_eq!(n("/%75sers/%7Ebob"), "/users/~bob");
        // Reserved characters stay encoded (a %2F is not a path separator).
        assert_eq!(n("/a%2fb/%3f"), "/a%2Fb/%3F");
        assert_eq!(normalize("/bad%zz"), Err(InvalidPath));
        assert_eq!(normalize("/bad%4"), Err(InvalidPath));
    }
}
