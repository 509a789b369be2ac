//! Errors the gateway itself answers with. Everything that fails inside a route's stack travels
//! as a `BoxError`. A module with errors of its own maps each to a `Problem` (status, stable
//! `code`, title, any response headers such as `WWW-Authenticate` or `RateLimit-*`) and returns
//! that `Problem`, boxed, with its own error as the source; the core's failures are
//! `GatewayError`s. `classify` finds the `Problem` in an error chain, and `problem_response` is
//! the one place that turns it into an HTTP response: `application/problem+json` with the
//! `code` and the request id, never internal text.

use std::error::Error as StdError;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// A failure with a known HTTP meaning.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatewayError {
    #[error("no route matches the request")]
    NoRoute,
    #[error("method not allowed")]
    MethodNotAllowed { allow: HeaderValue },
    #[error("request body larger than the limit")]
    BodyTooLarge,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// The client went away before the answer (nginx's 499).
    #[error("the client closed the request")]
    ClientClosed,
    #[error("request target longer than the limit")]
    UriTooLong,
    #[error("request header fields larger than the limits")]
    HeadersTooLarge,
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("could not connect to the backend")]
    UpstreamConnect(#[source] BoxError),
    #[error("the backend connection failed")]
    UpstreamFailed(#[source] BoxError),
    #[error("the backend did not answer in time")]
    UpstreamTimeout,
    #[error("the service has no endpoint to send to")]
    NoHealthyEndpoint,
    #[error("the service's circuit is open")]
    CircuitOpen { retry_after_secs: u64 },
    #[error("too many requests in flight")]
    Overloaded,
}

/// What a client is told about an error. Also an error itself: a module returns its failure
/// as a `Problem` (boxed), keeping its own error as the source for the log.
#[derive(Debug, Clone)]
pub(crate) struct Problem {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) title: &'static str,
    /// Set on the response (`Allow`, `Retry-After`, `WWW-Authenticate`, `RateLimit-*` …).
    pub(crate) headers: HeaderMap,
    /// Members of the body beyond the standard ones (`detail`, an aggregate's `call` …).
    members: Option<Arc<serde_json::Map<String, serde_json::Value>>>,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl Problem {
    pub(crate) fn new(status: StatusCode, code: &'static str, title: &'static str) -> Self {
        Problem {
            status,
            code,
            title,
            headers: HeaderMap::new(),
            members: None,
            source: None,
        }
    }

    /// Adds a member to the problem body (`detail`, or an extension member). Its value must
    /// hold nothing the client should not see.
    pub(crate) fn member(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        let mut map = self.members.as_deref().cloned().unwrap_or_default();
        map.insert(key.to_owned(), value.into());
        self.members = Some(Arc::new(map));
        self
    }

    /// Adds a response header.
    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// `Retry-After` in seconds.
    pub(crate) fn retry_after(self, secs: u64) -> Self {
        self.header(header::RETRY_AFTER, HeaderValue::from(secs))
    }

    /// Keeps the error that caused this, for the log (never shown to the client).
    pub(crate) fn caused_by(mut self, e: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(e.into()));
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.title, self.code)
    }
}

impl StdError for Problem {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl GatewayError {
    pub(crate) fn problem(&self) -> Problem {
        use GatewayError::*;
        match self {
            NoRoute => Problem::new(
                StatusCode::NOT_FOUND,
                "route_not_found",
                "No route matches this request",
            ),
            MethodNotAllowed { allow } => Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed for this route",
            )
            .header(header::ALLOW, allow.clone()),
            BodyTooLarge => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "Request body too large",
            ),
            BadRequest(_) => {
                Problem::new(StatusCode::BAD_REQUEST, "bad_request", "Malformed request")
            }
            ClientClosed => Problem::new(
                // nginx's "client closed request": only logs and metrics see it.
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "client_closed",
                "The client closed the request",
            ),
            UriTooLong => Problem::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                "Request target too long",
            ),
            HeadersTooLarge => Problem::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                "Request header fields too large",
            ),
            NotImplemented(_) => Problem::new(
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                "Not implemented by the gateway",
            ),
            UpstreamConnect(_) => Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream_connect_failed",
                "Could not connect to the backend service",
            ),
            UpstreamFailed(_) => Problem::new(
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                "The backend service failed to answer",
            ),
            UpstreamTimeout => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "The backend service did not answer in time",
            ),
            NoHealthyEndpoint => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_healthy_endpoint",
                "No healthy endpoint for the backend service",
            ),
            CircuitOpen { retry_after_secs } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "circuit_open",
                "The backend service is failing; its circuit is open",
            )
            .retry_after(*retry_after_secs),
            Overloaded => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Too many requests in flight; try again shortly",
            )
            .retry_after(1),
        }
    }
}

/// Finds what a client should be told about `err`, looking through its chain of sources.
pub(crate) fn classify(err: &(dyn StdError + 'static)) -> Problem {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(p) = e.downcast_ref::<Problem>() {
            return p.clone();
        }
        if let Some(g) = e.downcast_ref::<GatewayError>() {
            return g.problem();
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return GatewayError::UpstreamTimeout.problem();
        }
        if e.is::<crate::body::BodyTooLarge>() {
            return GatewayError::BodyTooLarge.problem();
        }
        if let Some(b) = e.downcast_ref::<crate::body::ClientBodyError>() {
            return client_body(b).problem();
        }
        cur = e.source();
    }
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "The gateway failed to handle the request",
    )
}

/// The one mapping from an error to an HTTP response.
pub(crate) fn problem_response(
    problem: &Problem,
    request_id: &HeaderValue,
) -> Response<Full<Bytes>> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(rename = "type")]
        kind: String,
        title: &'a str,
        status: u16,
        code: &'a str,
        request_id: &'a str,
        #[serde(flatten)]
        members: Option<&'a serde_json::Map<String, serde_json::Value>>,
    }
    let body = Body {
        kind: format!("urn:gatehouse:problem:{}", problem.code),
        title: problem.title,
        status: problem.status.as_u16(),
        code: problem.code,
        request_id: request_id.to_str().unwrap_or(""),
        members: problem.members.as_deref(),
    };
    // Serializing a struct of strings and a number cannot fail.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = problem.status;
    let h = resp.headers_mut();
    for (name, value) in &problem.headers {
        h.append(name, value.clone());
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// What a failed client body means: malformed (400) or cut short by the client (499).
pub(crate) fn client_body(e: &crate::body::ClientBodyError) -> GatewayError {
    if e.malformed() {
        GatewayError::BadRequest("request body")
    } else {
        GatewayError::ClientClosed
    }
}

/// The first `T` in an error chain.
pub(crate) fn find_in_chain<'a, T: StdError + 'static>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a T> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

/// Whether an error chain contains a `T`.
pub(crate) fn chain_has<T: StdError + 'static>(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<T>() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn problem_json_has_contract_fields() {
        let err: BoxError = Box::new(GatewayError::MethodNotAllowed {
            allow: HeaderValue::from_static("GET, HEAD"),
        });
        let p = classify(&*err);
        let resp = problem_response(&p, &HeaderValue::from_static("req-1"));
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()["allow"], "GET, HEAD");
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], 405);
        assert_eq!(v["code"], "method_not_allowed");
        assert_eq!(v["request_id"], "req-1");
        assert!(v["type"].as_str().unwrap().ends_with("method_not_allowed"));
        assert!(v["title"].is_string());
    }

    #[tokio::test]
    async fn a_module_problem_carries_its_headers_and_hides_its_source() {
        // What a module of its own (auth, say) returns: a Problem with a header and a cause.
        let cause: BoxError = "token signature did not verify: key kid-7".into();
        let err: BoxError = Box::new(
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authentication required",
            )
            .header(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"api\""),
            )
            .caused_by(cause),
        );
        assert!(err.source().unwrap().to_string().contains("kid-7"));
        let p = classify(&*err);
        let resp = problem_response(&p, &HeaderValue::from_static("r"));
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"api\"");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("\"code\":\"unauthorized\""), "{text}");
        assert!(!text.contains("kid-7"), "{text}");
    }

    #[test]
    fn unknown_errors_do_not_leak_text() {
        let err: BoxError = "secret internal detail".into();
        let p = classify(&*err);
        assert_eq!(p.status, 500);
        assert_eq!(p.code, "internal_error");
    }

    #[test]
    fn sources_are_searched() {
        let inner: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        let err: BoxError = Box::new(GatewayError::UpstreamFailed(inner));
        // The outer GatewayError decides.
        assert_eq!(classify(&*err).code, "upstream_failed");
        let bare: BoxError = Box::new(tower::timeout::error::Elapsed::new());
        assert_eq!(classify(&*bare).status, 504);
    }
}
