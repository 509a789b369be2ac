//! `aggregate`: one client request, many backend calls, one JSON response shaped for the
//! frontend (the BFF pattern). The calls form a graph (`depends_on`); a call starts as soon as
//! the calls it depends on have answered, so the latency is the critical path's. Each call
//! goes through its service's `Proxy` (retries, breaker, bulkhead, timeouts, discovery,
//! balancing all apply) with a sub-request `Exchange` (the request id, a child trace context).
//!
//! Composition: each call's (shaped) answer under its name, or merged at the root. A required
//! call that fails fails the request (502/504 naming the call; 400 when the client's request
//! lacks a value a template needs); an optional one is listed in `errors` and the response
//! says `Gatehouse-Complete: false`. The aggregate's deadline cancels the calls still running.

mod body;
mod build;
mod compose;
mod shape;
mod template;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tower::ServiceExt;

use self::body::BodyTemplate;
use self::compose::Answer;
use self::shape::Shape;
use self::template::{Encoding, Missing, Scope, Template};
use super::proxy::Proxy;
use super::RespBody;
use crate::body::{req_full, ReqBody};
use crate::config::MergeMode;
use crate::context::Exchange;
use crate::error::{classify, BoxError, Problem};

pub(crate) use build::{build, RouteFacts};
pub(crate) use template::fuzz_render;

pub(crate) static GATEHOUSE_COMPLETE: HeaderName = HeaderName::from_static("gatehouse-complete");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The compiled aggregate of one route.
pub(crate) struct Plan {
    calls: Box<[Call]>,
    merge: MergeMode,
    deadline: Duration,
    max_calls: usize,
    max_concurrency: usize,
    max_call_body: usize,
    max_body: usize,
    /// Whether a call sends the client's body (it is then read once, up front).
    needs_body: bool,
}

/// One `[[route.aggregate.call]]`, compiled.
pub(crate) struct Call {
    name: Arc<str>,
    method: Method,
    path: Template,
    query: Box<[(Box<str>, Template)]>,
    headers: Box<[(HeaderName, Template)]>,
    body: Option<BodyTemplate>,
    deps: Box<[usize]>,
    required: bool,
    shape: Shape,
    /// The call (by index) whose answer is walked, and the path with its `[*]`.
    for_each: Option<(usize, template::JsonPath)>,
    /// Whether its answer is needed as a JSON value (a later call reads it, it is shaped or
    /// merged at the root); otherwise it is only checked to be JSON and copied into the
    /// response as it came (parsing ~200 bytes into a `Value` and writing it out again cost
    /// ~20 000 instructions).
    as_value: bool,
    proxy: Proxy,
    duration: prometheus::Histogram,
    outcomes: prometheus::IntCounterVec,
    route: Arc<str>,
}

/// Why a call has no answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CallError {
    pub(crate) status: u16,
    pub(crate) code: &'static str,
    /// The template value that was missing, when that is why.
    pub(crate) missing: Option<Box<str>>,
    /// Whether the per-call metric already counts it (a backend call was made).
    pub(crate) counted: bool,
}

impl CallError {
    fn new(status: u16, code: &'static str) -> Self {
        CallError {
            status,
            code,
            missing: None,
            counted: false,
        }
    }

    fn missing(m: Missing) -> Self {
        CallError {
            status: if m.from_client { 400 } else { 502 },
            code: if m.from_client {
                "missing_parameter"
            } else {
                "missing_value"
            },
            missing: Some(format!("{} {}", m.var, m.why).into()),
            counted: false,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Aggregate(Arc<Plan>);

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

impl tower::Service<Request<ReqBody>> for Aggregate {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        Box::pin(self.0.clone().run(req))
    }
}

enum State {
    Waiting,
    Running,
    Done,
    Failed(CallError),
}

/// What the templates read, taken from the client's request once.
struct Input {
    exchange: Exchange,
    query: Vec<(String, String)>,
    headers: http::HeaderMap,
    claims: Option<Arc<Map<String, Value>>>,
    body: Option<Bytes>,
}

impl Plan {
    async fn run(self: Arc<Self>, req: Request<ReqBody>) -> Result<Response<RespBody>, BoxError> {
        let Some(exchange) = req.extensions().get::<Exchange>().cloned() else {
            return Err("an aggregated request has no exchange".into());
        };
        // From when the gateway took the request, like the route's own deadline (which
        // starts a little later): the aggregate answers first.
        let deadline_at = tokio::time::Instant::from_std(exchange.started()) + self.deadline;
        let (parts, body) = req.into_parts();
        let body = if self.needs_body {
            match tokio::time::timeout_at(deadline_at, body.collect()).await {
                Ok(b) => Some(b?.to_bytes()),
                Err(_) => return Err(crate::error::GatewayError::UpstreamTimeout.into()),
            }
        } else {
            None
        };
        let query = exchange
            .query()
            .map(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let input = Input {
            claims: exchange.identity().and_then(|i| i.claims.clone()),
            exchange,
            query,
            headers: parts.headers,
            body,
        };
        let n = self.calls.len();
        let mut answers: Vec<Option<Value>> = vec![None; n];
        let mut raws: Vec<Option<Answer>> = (0..n).map(|_| None).collect();
        let mut state: Vec<State> = (0..n).map(|_| State::Waiting).collect();
        let permits = tokio::sync::Semaphore::new(self.max_concurrency);
        let mut issued = 0usize;
        let mut running = FuturesUnordered::new();
        let deadline = tokio::time::sleep_until(deadline_at);
        tokio::pin!(deadline);
        // One trace for the whole composition: the client's, or one started here.
        let trace = input
            .headers
            .get(&TRACEPARENT)
            .cloned()
            .unwrap_or_else(|| crate::observe::trace::next_traceparent(None));
        loop {
            // Start every call whose dependencies have answered, until nothing changes (a call
            // listed before the dependency that just failed must see that failure now).
            let mut changed = true;
            while changed {
                changed = false;
                for i in 0..n {
                    if !matches!(state[i], State::Waiting) {
                        continue;
                    }
                    let call = &self.calls[i];
                    if let Some(d) = call
                        .deps
                        .iter()
                        .find(|d| matches!(state[**d], State::Failed(_)))
                    {
                        let mut e = CallError::new(424, "dependency_failed");
                        e.missing = Some(format!("{} failed", self.calls[*d].name).into());
                        state[i] = State::Failed(e);
                        changed = true;
                        continue;
                    }
                    if !call.deps.iter().all(|d| matches!(state[*d], State::Done)) {
                        continue;
                    }
                    changed = true;
                    match self.requests(call, &input, &answers, &trace) {
                        Ok(reqs) if issued + reqs.len() > self.max_calls => {
                            state[i] = State::Failed(CallError::new(502, "too_many_calls"));
                        }
                        Ok(reqs) => {
                            issued += reqs.len();
                            state[i] = State::Running;
                            running.push(self.send(i, reqs, &permits));
                        }
                        Err(e) => state[i] = State::Failed(e),
                    }
                }
            }
            // A failed required call decides at once: the others are cancelled.
            if let Some((i, e)) = self.first_required_failure(&state) {
                self.finish(&input.exchange, &state);
                return Err(self.failure(i, e).into());
            }
            if running.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((i, result)) = running.next() => match result {
                    Ok(Answer::Value(v)) => {
                        answers[i] = Some(v);
                        state[i] = State::Done;
                    }
                    Ok(raw) => {
                        raws[i] = Some(raw);
                        state[i] = State::Done;
                    }
                    Err(e) => state[i] = State::Failed(e),
                },
                () = &mut deadline => {
                    // Dropping `running` cancels the calls still in flight.
                    for s in state.iter_mut() {
                        if matches!(s, State::Running | State::Waiting) {
                            *s = State::Failed(CallError::new(504, "timeout"));
                        }
                    }
                    if let Some((i, e)) = self.first_required_failure(&state) {
                        self.finish(&input.exchange, &state);
                        return Err(self.failure(i, e).into());
                    }
                    break;
                }
            }
        }
        drop(running);
        self.finish(&input.exchange, &state);
        self.compose(&state, answers, raws)
    }

    /// Counts the failures no backend call counted (cut by the deadline, a missing value,
    /// a failed dependency, too many calls), and records the calls and how each ended for the
    /// access log: `user:ok orders:timeout`.
    fn finish(&self, x: &Exchange, state: &[State]) {
        for (call, st) in self.calls.iter().zip(state) {
            if let State::Failed(e) = st {
                if !e.counted {
                    call.outcomes
                        .with_label_values(&[&*call.route, &*call.name, e.code])
                        .inc();
                }
            }
        }
        let meta = x.meta();
        if !meta.wants_upstream() {
            return;
        }
        let mut s = String::new();
        for (call, st) in self.calls.iter().zip(state) {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(&call.name);
            s.push(':');
            s.push_str(match st {
                State::Done => "ok",
                State::Failed(e) => e.code,
                State::Waiting | State::Running => "cancelled",
            });
        }
        meta.set_calls(s.into());
    }

    fn first_required_failure(&self, state: &[State]) -> Option<(usize, CallError)> {
        state.iter().enumerate().find_map(|(i, s)| match s {
            State::Failed(e) if self.calls[i].required => Some((i, e.clone())),
            _ => None,
        })
    }

    /// The problem of a request whose required call `i` failed.
    fn failure(&self, i: usize, e: CallError) -> Problem {
        let name = &*self.calls[i].name;
        let p = match e.code {
            "missing_parameter" => Problem::new(
                StatusCode::BAD_REQUEST,
                "missing_parameter",
                "The request lacks a value this route needs",
            ),
            "invalid_parameter" => Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                "A value of the request cannot be used by this route",
            ),
            "timeout" | "upstream_timeout" => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "aggregate_call_timeout",
                "A backend call of this route did not answer in time",
            ),
            _ => Problem::new(
                StatusCode::BAD_GATEWAY,
                "aggregate_call_failed",
                "A backend call of this route failed",
            ),
        };
        let mut p = p
            .member("call", name)
            .member("call_status", e.status)
            .member("call_code", e.code);
        if let Some(m) = e.missing {
            p = p.member("detail", format!("`{name}`: {m}"));
        }
        p
    }

    /// The backend requests of a call: one, or one per `for_each` element.
    fn requests(
        &self,
        call: &Call,
        input: &Input,
        answers: &[Option<Value>],
        trace: &HeaderValue,
    ) -> Result<Vec<Request<ReqBody>>, CallError> {
        // A parameter that is not UTF-8 once decoded counts as absent (400, never mangled).
        let params = |name: &str| {
            input.exchange.param(name).and_then(|v| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8()
                    .ok()
                    .map(|c| c.into_owned())
            })
        };
        let base = Scope {
            params: &params,
            query: &input.query,
            headers: &input.headers,
            claims: input.claims.as_deref(),
            calls: answers,
            item: None,
        };
        let Some((src, path)) = &call.for_each else {
            return Ok(vec![self.request(call, input, &base, trace)?]);
        };
        let mut items = Vec::new();
        if let Some(v) = answers.get(*src).and_then(Option::as_ref) {
            path.all(v, &mut items);
        }
        if items.len() > self.max_calls {
            return Err(CallError::new(502, "too_many_calls"));
        }
        items
            .into_iter()
            .map(|item| {
                let scope = Scope {
                    item: Some(item),
                    ..Scope {
                        ..base_clone(&base)
                    }
                };
                self.request(call, input, &scope, trace)
            })
            .collect()
    }

    fn request(
        &self,
        call: &Call,
        input: &Input,
        scope: &Scope<'_>,
        trace: &HeaderValue,
    ) -> Result<Request<ReqBody>, CallError> {
        let mut target = call
            .path
            .render(scope, Encoding::PathSegment)
            .map_err(CallError::missing)?;
        // Values next to each other (`/{a}{b}`) could still make a `.` or `..` segment.
        if target.split('/').any(|seg| seg == "." || seg == "..") {
            let client = call.path.reads_client();
            return Err(CallError::new(
                if client { 400 } else { 502 },
                if client {
                    "invalid_parameter"
                } else {
                    "bad_target"
                },
            ));
        }
        for (i, (k, v)) in call.query.iter().enumerate() {
            target.push(if i == 0 { '?' } else { '&' });
            target.extend(form_urlencoded::byte_serialize(k.as_bytes()));
            target.push('=');
            target.push_str(
                &v.render(scope, Encoding::Query)
                    .map_err(CallError::missing)?,
            );
        }
        let uri = Uri::from_maybe_shared(Bytes::from(target))
            .map_err(|_| CallError::new(502, "bad_target"))?;
        let (body, json) = match &call.body {
            None => (Bytes::new(), false),
            Some(BodyTemplate::Client) => (input.body.clone().unwrap_or_default(), false),
            Some(BodyTemplate::Json(t)) => {
                let v = t.render(scope).map_err(CallError::missing)?;
                (
                    Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
                    true,
                )
            }
        };
        let mut req = Request::new(req_full(body));
        *req.method_mut() = call.method.clone();
        *req.uri_mut() = uri;
        let h = req.headers_mut();
        for (name, t) in call.headers.iter() {
            let v = t
                .render(scope, Encoding::Header)
                .map_err(CallError::missing)?;
            let v = HeaderValue::from_str(&v).map_err(|_| CallError::new(502, "bad_header"))?;
            h.insert(name.clone(), v);
        }
        if json {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        } else if matches!(call.body, Some(BodyTemplate::Client)) {
            if let Some(ct) = input.headers.get(header::CONTENT_TYPE) {
                h.insert(header::CONTENT_TYPE, ct.clone());
            }
        }
        // The call continues the composition's trace (the proxy makes it a child span).
        h.insert(TRACEPARENT.clone(), trace.clone());
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        req.extensions_mut().insert(input.exchange.sub_request());
        Ok(req)
    }

    /// Sends a call's requests (each waiting for a slot of the request's concurrency) and
    /// reads their answers: one, or a list of them in input order. Unshaped: later calls'
    /// templates read the whole answer; the shape is for the response.
    fn send<'a>(
        &'a self,
        i: usize,
        reqs: Vec<Request<ReqBody>>,
        permits: &'a tokio::sync::Semaphore,
    ) -> impl Future<Output = (usize, Result<Answer, CallError>)> + Send + 'a {
        let call = &self.calls[i];
        let each = call.for_each.is_some();
        async move {
            // The first failure ends the call: the other requests of a `for_each` are dropped.
            let mut out = match futures_util::future::try_join_all(
                reqs.into_iter().map(|r| self.one(call, r, permits)),
            )
            .await
            {
                Ok(out) => out,
                Err(e) => return (i, Err(e)),
            };
            let answer = match (each, call.as_value) {
                (true, true) => Answer::Value(Value::Array(
                    out.into_iter().map(Answer::into_value).collect(),
                )),
                (true, false) => Answer::List(out),
                (false, _) => out.pop().unwrap_or(Answer::Value(Value::Null)),
            };
            (i, Ok(answer))
        }
    }

    async fn one(
        &self,
        call: &Call,
        req: Request<ReqBody>,
        permits: &tokio::sync::Semaphore,
    ) -> Result<Answer, CallError> {
        let _slot = permits.acquire().await;
        let started = Instant::now();
        let mut status = 0u16;
        let result = self.fetch(call, req, &mut status).await;
        call.duration.observe(started.elapsed().as_secs_f64());
        // The service's status when its answer was usable or refused (`200`, `503`); else
        // why there was none (`upstream_timeout`, `invalid_json` …).
        let mut num = itoa::Buffer::new();
        let outcome = match &result {
            Ok(_) => num.format(status),
            Err(e) if e.code == "upstream_status" => num.format(e.status),
            Err(e) => e.code,
        };
        call.outcomes
            .with_label_values(&[&*call.route, &*call.name, outcome])
            .inc();
        result.map_err(|mut e| {
            e.counted = true;
            e
        })
    }

    async fn fetch(
        &self,
        call: &Call,
        req: Request<ReqBody>,
        answered: &mut u16,
    ) -> Result<Answer, CallError> {
        // The sub-request's exchange holds the service's bulkhead slot: kept until the answer
        // has been read.
        let _exchange = req.extensions().get::<Exchange>().cloned();
        let resp = match call.proxy.clone().oneshot(req).await {
            Ok(r) => r,
            Err(e) => {
                let p = classify(&*e);
                return Err(CallError::new(p.status.as_u16(), p.code));
            }
        };
        let status = resp.status();
        *answered = status.as_u16();
        if !status.is_success() {
            return Err(CallError::new(status.as_u16(), "upstream_status"));
        }
        let limited = http_body_util::Limited::new(resp.into_body(), self.max_call_body);
        let bytes = match limited.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(CallError::new(502, "call_body_too_large"))
            }
            Err(_) => return Err(CallError::new(502, "upstream_failed")),
        };
        if bytes.is_empty() {
            return Ok(Answer::Value(Value::Null));
        }
        let invalid = |_| CallError::new(502, "invalid_json");
        if call.as_value {
            serde_json::from_slice(&bytes)
                .map(Answer::Value)
                .map_err(invalid)
        } else {
            serde_json::from_slice::<Box<RawValue>>(&bytes)
                .map(Answer::Raw)
                .map_err(invalid)
        }
    }
}

fn base_clone<'a>(s: &Scope<'a>) -> Scope<'a> {
    Scope {
        params: s.params,
        query: s.query,
        headers: s.headers,
        claims: s.claims,
        calls: s.calls,
        item: s.item,
    }
}
