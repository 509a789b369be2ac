//! CORS for a frontend (`cors = { origins, methods, headers, expose_headers, credentials,
//! max_age }`), the outermost layer of its routes. Preflights are answered here and never reach
//! a service (the dispatcher routes a preflight by its `Access-Control-Request-Method`, so it
//! finds the route the real request will take). An allowed origin gets its CORS headers on
//! every answer — on the gateway's own errors too (a 401 the browser app must be able to read):
//! an error on its way to the dispatcher becomes a `Problem` carrying them. A disallowed origin
//! gets none. Written here rather than taken from tower-http because tower-http's layer sees
//! only successful responses, and the gateway's errors travel as `Err` until the dispatcher
//! renders them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::backend::{full, RespBody};
use crate::body::ReqBody;
use crate::error::{classify, BoxError, Problem};

/// A frontend's CORS policy, checked.
pub(crate) struct CorsPolicy {
    /// `None`: any origin (`["*"]`).
    pub(crate) origins: Option<Box<[HeaderValue]>>,
    pub(crate) methods: Box<[Method]>,
    pub(crate) headers: Box<[HeaderName]>,
    pub(crate) allow_methods: HeaderValue,
    pub(crate) allow_headers: Option<HeaderValue>,
    pub(crate) expose: Option<HeaderValue>,
    pub(crate) credentials: bool,
    pub(crate) max_age: Option<HeaderValue>,
}

/// A `cors` table that makes no policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CorsConfigError {
    #[error("cors: `origins` is empty")]
    NoOrigins,
    #[error("cors: origin `{0}` must be `scheme://host[:port]` or `*`")]
    Origin(String),
    #[error("cors: `credentials = true` cannot go with any origin (`*`): list the origins")]
    CredentialsWithAnyOrigin,
    #[error("cors: `{0}` is not a method")]
    Method(String),
    #[error("cors: `{0}` is not a header name")]
    Header(String),
}

impl CorsPolicy {
    pub(crate) fn from_config(c: &crate::config::CorsConfig) -> Result<Self, CorsConfigError> {
        if c.origins.is_empty() {
            return Err(CorsConfigError::NoOrigins);
        }
        let origins = if c.origins.iter().any(|o| o == "*") {
            if c.credentials {
                return Err(CorsConfigError::CredentialsWithAnyOrigin);
            }
            None
        } else {
            let mut list = Vec::new();
            for o in &c.origins {
                let ok = (o.starts_with("https://") || o.starts_with("http://"))
                    && !o.ends_with('/')
                    && o.split_once("://")
                        .is_some_and(|(_, h)| !h.is_empty() && !h.contains('/'));
                match HeaderValue::from_str(o) {
                    Ok(v) if ok => list.push(v),
                    _ => return Err(CorsConfigError::Origin(o.clone())),
                }
            }
            Some(list.into_boxed_slice())
        };
        let methods = c
            .methods
            .iter()
            .map(|m| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| CorsConfigError::Method(m.clone()))
            })
            .collect::<Result<Box<[Method]>, _>>()?;
        let headers = names(&c.headers)?;
        let expose = names(&c.expose_headers)?;
        let join = |items: Vec<&str>| HeaderValue::from_str(&items.join(", ")).ok();
        Ok(CorsPolicy {
            origins,
            allow_methods: join(methods.iter().map(Method::as_str).collect())
                .unwrap_or(HeaderValue::from_static("GET")),
            allow_headers: (!headers.is_empty())
                .then(|| join(headers.iter().map(HeaderName::as_str).collect()))
                .flatten(),
            expose: (!expose.is_empty())
                .then(|| join(expose.iter().map(HeaderName::as_str).collect()))
                .flatten(),
            methods,
            headers,
            credentials: c.credentials,
            max_age: c.max_age.map(|d| HeaderValue::from(d.get().as_secs())),
        })
    }

    /// The `Access-Control-Allow-Origin` value for `origin`, if it is allowed.
    fn allow(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match &self.origins {
            None => Some(HeaderValue::from_static("*")),
            Some(list) => list
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
                .then(|| origin.clone()),
        }
    }

    /// The headers of an answer to an allowed origin (not a preflight).
    fn decorate(&self, allow: HeaderValue, h: &mut HeaderMap) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(e) = &self.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }

    /// The answer to a preflight: 204 with the policy, or 403 without any CORS header.
    fn preflight(&self, req: &Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let origin = req.headers().get(header::ORIGIN);
        let method = req
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        let headers_ok = req
            .headers()
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .all(|h| {
                self.headers
                    .iter()
                    .any(|a| a.as_str().eq_ignore_ascii_case(h))
            });
        let allow = origin.and_then(|o| self.allow(o));
        let method_ok = method.is_some_and(|m| self.methods.contains(&m));
        let Some(allow) = allow.filter(|_| method_ok && headers_ok) else {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "cors_rejected",
                "The cross-origin request is not allowed",
            )
            .into());
        };
        let mut resp = Response::new(full(""));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        if let Some(a) = &self.allow_headers {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, a.clone());
        }
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(m) = &self.max_age {
            h.insert(header::ACCESS_CONTROL_MAX_AGE, m.clone());
        }
        h.insert(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        Ok(resp)
    }
}

fn names(list: &[String]) -> Result<Box<[HeaderName]>, CorsConfigError> {
    list.iter()
        .map(|h| {
            HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                .map_err(|_| CorsConfigError::Header(h.clone()))
        })
        .collect()
}

/// Whether `req` is a CORS preflight.
pub(crate) fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[derive(Clone)]
pub(crate) struct CorsLayer(Arc<CorsPolicy>);

impl CorsLayer {
    pub(crate) fn new(p: CorsPolicy) -> Self {
        CorsLayer(Arc::new(p))
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;
    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            policy: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Cors<S> {
    policy: Arc<CorsPolicy>,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

impl<S> Service<Request<ReqBody>> for Cors<S>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let policy = self.policy.clone();
        if is_preflight(&req) {
            let answer = policy.preflight(&req);
            return Box::pin(std::future::ready(answer));
        }
        let allow = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| policy.allow(o));
        let inner = self.inner.clone();
        Box::pin(async move {
            let result = inner.oneshot(req).await;
            let vary = policy.origins.is_some();
            match result {
                Ok(mut resp) => {
                    let h = resp.headers_mut();
                    if vary {
                        h.append(header::VARY, HeaderValue::from_static("origin"));
                    }
                    if let Some(a) = allow {
                        policy.decorate(a, h);
                    }
                    Ok(resp)
                }
                Err(e) => {
                    let Some(a) = allow else { return Err(e) };
                    let mut p = classify(&*e);
                    policy.decorate(a, &mut p.headers);
                    if vary {
                        p.headers
                            .append(header::VARY, HeaderValue::from_static("origin"));
                    }
                    Err(p.caused_by(e).into())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CorsConfig;

    fn policy(origins: &[&str], credentials: bool) -> Result<CorsPolicy, CorsConfigError> {
        CorsPolicy::from_config(&CorsConfig {
            origins: origins.iter().map(|o| o.to_string()).collect(),
            methods: vec!["GET".into(), "POST".into()],
            headers: vec!["Authorization".into(), "content-type".into()],
            expose_headers: vec!["x-request-id".into()],
            credentials,
            max_age: None,
        })
    }

    #[test]
    fn policies_are_checked() {
        assert_eq!(
            policy(&["*"], true).err(),
            Some(CorsConfigError::CredentialsWithAnyOrigin)
        );
        assert!(matches!(
            policy(&["app.example.com"], false),
            Err(CorsConfigError::Origin(_))
        ));
        assert!(matches!(
            policy(&["https://app.example.com/"], false),
            Err(CorsConfigError::Origin(_))
        ));
        let p = policy(&["https://app.example.com"], true).unwrap();
        assert_eq!(
            p.allow(&HeaderValue::from_static("https://app.example.com")),
            Some(HeaderValue::from_static("https://app.example.com"))
        );
        assert_eq!(
            p.allow(&HeaderValue::from_static("https://evil.example")),
            None
        );
        assert_eq!(p.allow_headers.unwrap(), "authorization, content-type");
    }
}
