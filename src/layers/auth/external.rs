//! External (forward) auth, like nginx `auth_request`: the gateway asks an auth service —
//! a `[services.X]` with its own resilience settings — whether to let a request through.
//! The check is a `GET path` carrying the configured client headers and `X-Forwarded-Method`
//! / `X-Forwarded-Uri`. A 2xx answer lets the request through with the answer's
//! `copy_response_headers` set on it; 401 or 403 is passed to the client; anything else (the
//! service down, slow, failing) is 503 unless `on_error = "allow"`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use tower::ServiceExt;

use super::AuthFailure;
use crate::backend::proxy::Proxy;
use crate::body::{req_full, ReqBody};
use crate::config::OnAuthError;
use crate::context::{Exchange, Identity};

static FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");
static FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");

pub(crate) struct External {
    pub(crate) name: Arc<str>,
    pub(crate) proxy: Proxy,
    pub(crate) forward: Box<[HeaderName]>,
    pub(crate) copy: Box<[HeaderName]>,
    pub(crate) timeout: Duration,
    pub(crate) on_error: OnAuthError,
}

impl External {
    pub(crate) async fn check(
        &self,
        req: &mut Request<ReqBody>,
        exchange: Option<&Exchange>,
    ) -> Result<Identity, AuthFailure> {
        let identity = || Identity {
            provider: self.name.clone(),
            claims: None,
            consumer: None,
        };
        let Some(exchange) = exchange else {
            return Err(AuthFailure::Unavailable("no request context"));
        };
        let mut check = Request::new(req_full(Bytes::new()));
        *check.method_mut() = Method::GET;
        let h = check.headers_mut();
        for name in self.forward.iter() {
            for v in req.headers().get_all(name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(
            FORWARDED_METHOD.clone(),
            HeaderValue::from_str(req.method().as_str()).unwrap_or(HeaderValue::from_static("GET")),
        );
        if let Some(pq) = exchange.original_uri().path_and_query() {
            if let Ok(v) = HeaderValue::from_str(pq.as_str()) {
                h.insert(FORWARDED_URI.clone(), v);
            }
        }
        check.extensions_mut().insert(exchange.sub_request());
        let answer = tokio::time::timeout(self.timeout, self.proxy.clone().oneshot(check)).await;
        let failed = |why: &'static str| match self.on_error {
            OnAuthError::Allow => {
                tracing::warn!(
                    provider = &*self.name,
                    why,
                    "auth service failed; on_error = allow lets the request through"
                );
                Ok(identity())
            }
            OnAuthError::Deny => Err(AuthFailure::Unavailable(why)),
        };
        let resp = match answer {
            Err(_) => return failed("auth service timed out"),
            Ok(Err(_)) => return failed("auth service unreachable"),
            Ok(Ok(resp)) => resp,
        };
        match resp.status() {
            s if s.is_success() => {
                let h = req.headers_mut();
                for name in self.copy.iter() {
                    if let Some(v) = resp.headers().get(name) {
                        h.insert(name.clone(), v.clone());
                    }
                }
                Ok(identity())
            }
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(AuthFailure::Refused(s)),
            _ => failed("auth service failed"),
        }
    }
}
