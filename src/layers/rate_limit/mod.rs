//! Rate limiting: the route layer (`RateLimitLayer`), the policies it asks (`Limiter`, one per
//! `[rate_limits.NAME]`, a resource that survives reloads while its config is unchanged), the
//! in-memory store (`local.rs`: governor's GCRA over a bounded key store) and the Redis store
//! shared by a fleet (`redis.rs`: one atomic script per check, on the server's clock).
//!
//! A policy has one or more windows (`requests` per `per`, up to `burst` at once); a request is
//! admitted when every window admits it, and then counts in each; a refused request counts in
//! none. A route with several policies is admitted when all of them admit it. The budget is
//! counted by the policy's key; a request with no value for it (no such header, claim or
//! consumer) is counted by its client IP instead, never left unlimited.
//!
//! Refused: 429 `rate_limited` with `Retry-After`; the request never reaches the backend.
//! `RateLimit-Policy` and `RateLimit` (IETF httpapi ratelimit headers, draft 9+) are set on
//! every response of a limited route when the policy says `headers = true`.

pub(crate) mod build;
pub(crate) mod key;
pub(crate) mod local;
pub(crate) mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use tower::{Service, ServiceExt};

use crate::backend::RespBody;
use crate::body::ReqBody;
use crate::config::{OnStoreFailure, RateKey};
use crate::context::Exchange;
use crate::error::{classify, BoxError, Problem};

pub(crate) use build::{build_limiters, Limiters};
use key::claim_text;
pub(crate) use key::{client_ip, forwarded_client, ip_key, KeyValue, Raw};

pub(crate) static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub(crate) static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Windows of one policy at most (a per-second rate, a per-minute one, a daily and a monthly
/// quota is four).
pub(crate) const MAX_WINDOWS: usize = 4;

/// One window, checked: a request every `interval`, up to `burst` at once.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub(crate) interval: Duration,
    pub(crate) burst: u32,
    /// Its name in the headers: `policy` (one window) or `policy-per` (several).
    pub(crate) label: Box<str>,
}

pub(crate) type Windows = Box<[Window]>;

/// A window's state after a check, for the headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WindowState {
    pub(crate) remaining: u32,
    /// Until the window is full again.
    pub(crate) reset: Duration,
}

/// What a policy said of one request.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) admitted: bool,
    /// When refused: how long until it would be admitted.
    pub(crate) retry_after: Duration,
    states: [WindowState; MAX_WINDOWS],
    len: usize,
}

impl Outcome {
    pub(crate) fn admitted() -> Self {
        Outcome {
            admitted: true,
            retry_after: Duration::ZERO,
            states: [WindowState::default(); MAX_WINDOWS],
            len: 0,
        }
    }

    pub(crate) fn refuse(&mut self, wait: Duration) {
        self.admitted = false;
        self.retry_after = wait;
    }

    pub(crate) fn push(&mut self, s: WindowState) {
        if let Some(slot) = self.states.get_mut(self.len) {
            *slot = s;
            self.len += 1;
        }
    }

    pub(crate) fn windows(&self) -> &[WindowState] {
        &self.states[..self.len]
    }
}

/// One `[rate_limits.NAME]`, built: a resource shared by every route that names it.
pub(crate) struct Limiter {
    pub(crate) name: Arc<str>,
    pub(crate) key: RateKey,
    pub(crate) windows: Windows,
    pub(crate) headers: bool,
    /// This policy's part of `RateLimit-Policy`.
    pub(crate) policy_items: Box<str>,
    /// The in-memory store: the policy's own, or the fallback of its Redis store.
    pub(crate) local: local::LocalStore<KeyValue>,
    pub(crate) shared: Option<Shared>,
}

/// The Redis store of a policy with `store = "redis"`.
pub(crate) struct Shared {
    pub(crate) store: Arc<redis::RedisStore>,
    pub(crate) on_failure: OnStoreFailure,
    pub(crate) script_args: redis::WindowArgs,
    pub(crate) failures: [prometheus::IntCounter; 3],
    pub(crate) latency: prometheus::Histogram,
}

/// What a check of a shared store can end in besides an outcome.
enum Checked {
    Outcome(Outcome),
    /// The store failed and the policy says `allow` or `deny`.
    Failed(OnStoreFailure),
}

impl Limiter {
    /// The outcome of one request under this policy's key value.
    async fn check(&self, key: &Raw<'_>) -> Checked {
        let Some(shared) = &self.shared else {
            return Checked::Outcome(self.local.check(&key.local()));
        };
        let started = std::time::Instant::now();
        match redis::check(&shared.store, &self.name, key, &shared.script_args).await {
            Ok(out) => {
                shared.latency.observe(started.elapsed().as_secs_f64());
                Checked::Outcome(out)
            }
            Err(e) => {
                shared.failures[e as usize].inc();
                match shared.on_failure {
                    OnStoreFailure::Local => Checked::Outcome(self.local.check(&key.local())),
                    other => Checked::Failed(other),
                }
            }
        }
    }

    /// The value this request is counted by; the client IP when the request has none (an
    /// empty one counts as none).
    fn key_value<'a>(
        &self,
        req: &'a Request<ReqBody>,
        x: Option<&'a Exchange>,
        cx: &'a RoutePolicy,
    ) -> Raw<'a> {
        let value = match &self.key {
            RateKey::Ip => None,
            RateKey::Global => return Raw::Global,
            RateKey::Route => return Raw::Route(&cx.route),
            RateKey::Header(h) => req
                .headers()
                .get(h)
                .map(HeaderValue::as_bytes)
                .filter(|b| !b.is_empty())
                .map(Raw::Header),
            RateKey::Claim(c) => x
                .and_then(Exchange::identity)
                .and_then(|id| id.claims.as_ref())
                .and_then(|claims| claims.get(c.as_str()))
                .and_then(claim_text)
                .map(Raw::Text),
            RateKey::Consumer => x
                .and_then(Exchange::identity)
                .and_then(|id| id.consumer.as_deref())
                .map(|c| Raw::Text(std::borrow::Cow::Borrowed(c))),
        };
        value.unwrap_or_else(|| Raw::Ip(ip_key(client_ip(req, x, &cx.trusted))))
    }
}

/// A route's rate limits: the policies (all must admit) and their counters.
pub(crate) struct RoutePolicy {
    pub(crate) limiters: Box<[RouteLimiter]>,
    pub(crate) route: Arc<str>,
    pub(crate) trusted: Arc<[ipnet::IpNet]>,
    /// `RateLimit-Policy`, made when the route was built; `None` when no policy sets headers.
    pub(crate) policy_header: Option<HeaderValue>,
    /// Whether a check can finish without waiting (no policy uses Redis).
    pub(crate) local_only: bool,
}

pub(crate) struct RouteLimiter {
    pub(crate) limiter: Arc<Limiter>,
    /// admitted, limited, failed_open, failed_closed.
    pub(crate) counters: [prometheus::IntCounter; 4],
}

pub(crate) const OUTCOMES: [&str; 4] = ["admitted", "limited", "failed_open", "failed_closed"];

/// The decision on one request under all of a route's policies.
enum Decision {
    Admit(Option<HeaderValue>),
    Refuse(Box<Problem>),
}

impl RoutePolicy {
    /// Asks each policy in turn; the first that refuses decides.
    async fn decide(&self, req: &Request<ReqBody>) -> Decision {
        let x = req.extensions().get::<Exchange>();
        let mut header = Vec::new();
        for rl in self.limiters.iter() {
            let key = rl.limiter.key_value(req, x, self);
            match rl.limiter.check(&key).await {
                Checked::Outcome(out) => {
                    if rl.limiter.headers {
                        rl.limiter.write_state(&out, &mut header);
                    }
                    if !out.admitted {
                        rl.counters[1].inc();
                        return Decision::Refuse(Box::new(self.limited(&out, header)));
                    }
                    rl.counters[0].inc();
                }
                Checked::Failed(OnStoreFailure::Deny) => {
                    rl.counters[3].inc();
                    return Decision::Refuse(Box::new(
                        Problem::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "rate_limit_unavailable",
                            "The rate limit cannot be checked right now",
                        )
                        .retry_after(1),
                    ));
                }
                Checked::Failed(_) => rl.counters[2].inc(),
            }
        }
        Decision::Admit(header_value(header))
    }

    /// The same, for policies that never wait: no future to build. With several policies,
    /// each is asked first without counting, so that a request one of them refuses counts in
    /// none of them.
    fn decide_now(&self, req: &Request<ReqBody>) -> Decision {
        let x = req.extensions().get::<Exchange>();
        let mut header = Vec::new();
        if self.limiters.len() > 1 {
            let mut refused: Option<(usize, Outcome)> = None;
            let asked: Vec<Outcome> = self
                .limiters
                .iter()
                .map(|rl| {
                    rl.limiter
                        .local
                        .peek(&rl.limiter.key_value(req, x, self).local())
                })
                .collect();
            for (i, out) in asked.iter().enumerate() {
                let later = refused
                    .as_ref()
                    .map_or(Duration::ZERO, |(_, r)| r.retry_after);
                if !out.admitted && out.retry_after >= later {
                    refused = Some((i, out.clone()));
                }
            }
            if let Some((i, out)) = refused {
                self.limiters[i].counters[1].inc();
                for (rl, o) in self.limiters.iter().zip(&asked) {
                    if rl.limiter.headers {
                        rl.limiter.write_state(o, &mut header);
                    }
                }
                return Decision::Refuse(Box::new(self.limited(&out, header)));
            }
        }
        for rl in self.limiters.iter() {
            let key = rl.limiter.key_value(req, x, self).local();
            let out = rl.limiter.local.check(&key);
            if rl.limiter.headers {
                rl.limiter.write_state(&out, &mut header);
            }
            if !out.admitted {
                rl.counters[1].inc();
                return Decision::Refuse(Box::new(self.limited(&out, header)));
            }
            rl.counters[0].inc();
        }
        Decision::Admit(header_value(header))
    }

    fn limited(&self, out: &Outcome, header: Vec<u8>) -> Problem {
        let mut p = too_many(out);
        if let Some(policy) = &self.policy_header {
            p = p.header(RATELIMIT_POLICY.clone(), policy.clone());
        }
        if let Some(v) = header_value(header) {
            p = p.header(RATELIMIT.clone(), v);
        }
        p
    }
}

/// 429 `rate_limited`, with `Retry-After` in whole seconds, rounded up: a client that waits
/// what it is told is admitted.
pub(crate) fn too_many(out: &Outcome) -> Problem {
    let secs = out.retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "Too many requests",
    )
    .retry_after(u64::try_from(secs).unwrap_or(u64::MAX))
}

impl Limiter {
    /// Appends this policy's windows to a `RateLimit` field value. By hand, with `itoa`:
    /// `write!` cost ~1 900 instructions a request for one window.
    fn write_state(&self, out: &Outcome, header: &mut Vec<u8>) {
        let mut num = itoa::Buffer::new();
        for (w, s) in self.windows.iter().zip(out.windows()) {
            if header.is_empty() {
                header.reserve(32);
            } else {
                header.extend_from_slice(b", ");
            }
            header.push(b'"');
            header.extend_from_slice(w.label.as_bytes());
            header.extend_from_slice(b"\";r=");
            header.extend_from_slice(num.format(s.remaining).as_bytes());
            header.extend_from_slice(b";t=");
            let t = s.reset.as_nanos().div_ceil(1_000_000_000);
            header.extend_from_slice(num.format(t).as_bytes());
        }
    }
}

fn header_value(s: Vec<u8>) -> Option<HeaderValue> {
    if s.is_empty() {
        return None;
    }
    HeaderValue::from_maybe_shared(Bytes::from(s)).ok()
}

#[derive(Clone)]
pub(crate) struct RateLimitLayer(Arc<RoutePolicy>);

impl RateLimitLayer {
    pub(crate) fn new(policy: RoutePolicy) -> Self {
        RateLimitLayer(Arc::new(policy))
    }

    /// One request through the rate limit and then `inner` (cloned only when admitted): what
    /// the layer's service does, for a caller that holds the inner stack itself.
    pub(crate) fn call<S>(&self, inner: &S, req: Request<ReqBody>) -> BoxFuture
    where
        S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        call(&self.0, inner, req)
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

fn call<S>(policy: &Arc<RoutePolicy>, inner: &S, req: Request<ReqBody>) -> BoxFuture
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    if policy.local_only {
        return match policy.decide_now(&req) {
            Decision::Refuse(p) => Box::pin(std::future::ready(Err(p as BoxError))),
            Decision::Admit(state) => Box::pin(respond(inner.clone(), req, policy.clone(), state)),
        };
    }
    let (policy, inner) = (policy.clone(), inner.clone());
    Box::pin(async move {
        match policy.decide(&req).await {
            Decision::Refuse(p) => Err(p as BoxError),
            Decision::Admit(state) => respond(inner, req, policy, state).await,
        }
    })
}

/// Calls the route's stack, and sets the rate limit headers on its answer. A mapped future
/// rather than an `async fn`: that would hold the request twice (its argument and the call's
/// state), and each move of the future copies both.
fn respond<S>(
    inner: S,
    req: Request<ReqBody>,
    policy: Arc<RoutePolicy>,
    state: Option<HeaderValue>,
) -> impl Future<Output = Result<Response<RespBody>, BoxError>>
where
    S: Service<Request<ReqBody>, Response = Response<RespBody>, Error = BoxError>,
{
    inner.oneshot(req).map(move |result| {
        let Some(p) = &policy.policy_header else {
            return result;
        };
        match result {
            Ok(mut resp) => {
                let h = resp.headers_mut();
                h.insert(RATELIMIT_POLICY.clone(), p.clone());
                if let Some(s) = state {
                    h.insert(RATELIMIT.clone(), s);
                }
                Ok(resp)
            }
            // The gateway's own answer for the route (502, 504 …) carries them too.
            Err(e) => {
                let mut problem = classify(&*e).header(RATELIMIT_POLICY.clone(), p.clone());
                if let Some(s) = state {
                    problem = problem.header(RATELIMIT.clone(), s);
                }
                Err(Box::new(problem.caused_by(e)) as BoxError)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With several policies, a request one refuses counts in none of them.
    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_one_policy_is_not_counted_by_the_others() {
        let w = |label: &str, ms: u64, burst: u32| -> Windows {
            vec![Window {
                interval: Duration::from_millis(ms),
                burst,
                label: label.into(),
            }]
            .into()
        };
        let quota = Arc::new(build::test_limiter(w("quota", 60_000, 3)));
        let fast = Arc::new(build::test_limiter(w("fast", 1000, 1)));
        let counters = || OUTCOMES.map(|o| prometheus::IntCounter::new(o, o).unwrap());
        let policy = RoutePolicy {
            limiters: vec![
                RouteLimiter {
                    limiter: quota.clone(),
                    counters: counters(),
                },
                RouteLimiter {
                    limiter: fast,
                    counters: counters(),
                },
            ]
            .into(),
            route: Arc::from("web/a"),
            trusted: Arc::from(Vec::new()),
            policy_header: None,
            local_only: true,
        };
        let req = || Request::new(crate::body::req_full(Bytes::new()));
        let admitted = |n: usize| {
            (0..n)
                .filter(|_| matches!(policy.decide_now(&req()), Decision::Admit(_)))
                .count()
        };
        // `fast` admits one a second: of ten at once, one; the quota counted only that one.
        assert_eq!(admitted(10), 1);
        assert_eq!(
            quota.local.peek(&KeyValue::Global).windows()[0].remaining,
            2
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(admitted(10), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(admitted(10), 1);
        // The quota (3 a minute) is spent now: `fast` refills in vain.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(admitted(10), 0);
    }

    #[test]
    fn the_state_header_lists_each_window() {
        let mut out = Outcome::admitted();
        out.push(WindowState {
            remaining: 4,
            reset: Duration::from_millis(1500),
        });
        out.push(WindowState {
            remaining: 9990,
            reset: Duration::from_secs(600),
        });
        let windows: Windows = vec![
            Window {
                interval: Duration::from_millis(100),
                burst: 10,
                label: "per_user-1s".into(),
            },
            Window {
                interval: Duration::from_secs(8),
                burst: 10000,
                label: "per_user-1d".into(),
            },
        ]
        .into();
        let mut s = Vec::new();
        let lim = build::test_limiter(windows);
        lim.write_state(&out, &mut s);
        assert_eq!(
            String::from_utf8(s).unwrap(),
            "\"per_user-1s\";r=4;t=2, \"per_user-1d\";r=9990;t=600"
        );
    }
}
