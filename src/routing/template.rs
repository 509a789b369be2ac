//! Route path templates (`/users/{id}`, `/api/{*rest}`): the names a route captures, checked when
//! a config is compiled. (A proxy's upstream path is `backend::target`.)

/// The names a route path captures, in order. Errors say what is wrong with the template.
pub(crate) fn route_params(path: &str) -> Result<Vec<String>, String> {
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
}
