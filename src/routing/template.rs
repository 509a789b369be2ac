//! Route path templates (`/users/{id}`, `/api/{*rest}`): the names a route captures, checked when
//! a config is compiled. (A proxy's upstream path is `backend::target`.)

/// What is wrong with a route path template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    #[error("path `{0}` must start with `/`")]
    NoSlash(String),
    #[error("in path `{0}`: a parameter must be a whole segment, like `{{id}}`")]
    Partial(String),
    #[error("in path `{0}`: `{1}` is not a valid parameter name")]
    Name(String, String),
    #[error("in path `{0}`: `{{*{1}}}` must be the last segment")]
    CatchAllNotLast(String, String),
    #[error("in path `{0}`: parameter `{1}` appears twice")]
    Twice(String, String),
}

/// The names a route path captures, in order. Errors say what is wrong with the template.
pub(crate) fn route_params(path: &str) -> Result<Vec<String>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NoSlash(path.to_owned()));
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
            .ok_or_else(|| PathError::Partial(path.to_owned()))?;
        let (name, catch_all) = match inner.strip_prefix('*') {
            Some(n) => (n, true),
            None => (inner, false),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(PathError::Name(path.to_owned(), (*seg).to_owned()));
        }
        if catch_all && i + 1 != segments.len() {
            return Err(PathError::CatchAllNotLast(path.to_owned(), name.to_owned()));
        }
        if names.iter().any(|n| n == name) {
            return Err(PathError::Twice(path.to_owned(), name.to_owned()));
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
        assert!(matches!(route_params("users"), Err(PathError::NoSlash(_))));
        assert!(matches!(
            route_params("/a/{*rest}/b"),
            Err(PathError::CatchAllNotLast(..))
        ));
        assert!(matches!(
            route_params("/a/x{id}"),
            Err(PathError::Partial(_))
        ));
        assert!(matches!(route_params("/a/{}"), Err(PathError::Name(..))));
        assert!(matches!(
            route_params("/a/{id}/{id}"),
            Err(PathError::Twice(..))
        ));
    }
}
