//! `reply = "async"`: a publish answered 202 with `Location: …/operations/{id}`, and the
//! operation resource served at that path. Each broker with such a route has one `Replies`
//! that files each reply under its operation — on NATS a subscription to this gateway's reply
//! subjects (`_GH_OPS.<instance>.<id>`, sent with the message as its reply subject and as the
//! `Gatehouse-Reply-To` header), on AMQP the broker's direct reply-to consumer (the message's
//! `reply_to` and `correlation_id`, the operation id) — in Redis when `[redis]` exists (every gateway of a
//! fleet can answer a poll) or else in memory (bounded by size, each entry by its route's
//! `result_ttl`).
//!
//! An operation id is 128 random bits: unguessable, so holding the `Location` is what lets a
//! client read the result. When the client was identified (API-key consumer, JWT subject),
//! only that identity reads it: anyone else gets the same 404 as for an unknown id.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use super::{hex, RespBody};
use crate::body::ReqBody;
use crate::context::Exchange;
use crate::error::{BoxError, Problem};
use crate::upstream::broker::Broker;
use crate::upstream::redis::RedisStore;

/// The path parameter of an operation route.
pub(crate) const PARAM: &str = "operation";
/// At most this many bytes of results are kept in memory (the oldest go first).
const MEMORY_BYTES: u64 = 64 << 20;
/// A reply larger than this is filed as a 502 (`reply_too_large`), not kept.
const MAX_RESULT: usize = 1 << 20;

/// The replies of one broker, and where they are kept.
pub(crate) struct Replies {
    /// NATS: the reply subjects' prefix.
    prefix: Option<String>,
    store: Store,
    /// NATS: the subscription's task.
    task: Option<tokio::task::AbortHandle>,
    /// AMQP: the broker whose filer this set, and the filer.
    amqp: Option<(Arc<Broker>, crate::upstream::broker::amqp::Filer)>,
}

impl Drop for Replies {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some((b, f)) = &self.amqp {
            if let crate::upstream::broker::Conn::Amqp(a) = &b.conn {
                a.replies.clear_filer(f);
            }
        }
    }
}

#[derive(Clone)]
enum Store {
    Memory(moka::sync::Cache<Arc<str>, Arc<Entry>>),
    Redis(Arc<RedisStore>),
}

/// One operation.
#[derive(Clone)]
struct Entry {
    /// The identity that may read it (`None`: whoever has the id).
    owner: Option<String>,
    ttl: Duration,
    result: Option<Done>,
}

/// A service's reply.
#[derive(Clone)]
pub(crate) struct Done {
    status: StatusCode,
    content_type: HeaderValue,
    body: Bytes,
}

/// A new operation: its id and (NATS) the subject its reply goes to.
pub(crate) struct Created {
    pub(crate) id: String,
    pub(crate) reply_subject: Option<String>,
}

/// What a poll finds.
enum Lookup {
    Unknown,
    Pending,
    Done(Done),
}

struct PerEntry;

impl moka::Expiry<Arc<str>, Arc<Entry>> for PerEntry {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        e: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(e.ttl)
    }
}

impl Replies {
    /// Collects the replies of `broker`: on NATS by subscribing to this gateway's reply
    /// subjects, on AMQP by taking the replies no request waits for.
    pub(crate) fn start(broker: &Arc<Broker>, redis: Option<Arc<RedisStore>>) -> Option<Replies> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let store = match redis {
            Some(r) => Store::Redis(r),
            None => Store::Memory(
                moka::sync::Cache::builder()
                    .max_capacity(MEMORY_BYTES)
                    // The oldest go first (not the least used: a new operation is never
                    // refused admission).
                    .eviction_policy(moka::policy::EvictionPolicy::lru())
                    .weigher(|k: &Arc<str>, e: &Arc<Entry>| {
                        let n = k.len()
                            + 128
                            + e.owner.as_ref().map_or(0, String::len)
                            + e.result.as_ref().map_or(0, |d| d.body.len());
                        u32::try_from(n).unwrap_or(u32::MAX)
                    })
                    .expire_after(PerEntry)
                    .build(),
            ),
        };
        if let crate::upstream::broker::Conn::Amqp(a) = &broker.conn {
            let filing = store.clone();
            let name = broker.name.clone();
            let h = handle.clone();
            let filer: crate::upstream::broker::amqp::Filer = Arc::new(move |id: String, r| {
                if !valid_id(&id) {
                    return;
                }
                let (status, content_type) = super::amqp::reply_meta(&r);
                let done = sized(&name, status, content_type, r.body);
                let filing = filing.clone();
                h.spawn(async move { filing.complete(&id, done).await });
            });
            a.replies.set_filer(filer.clone());
            return Some(Replies {
                prefix: None,
                store,
                task: None,
                amqp: Some((broker.clone(), filer)),
            });
        }
        let client = broker.nats()?.client.clone();
        let mut instance = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut instance).ok()?;
        let prefix = format!("_GH_OPS.{}", hex(&instance));
        let filing = store.clone();
        let subject = format!("{prefix}.*");
        let name = broker.name.clone();
        let task = handle
            .spawn(async move {
                let mut sub = match client.subscribe(subject).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(broker = %name, error = %e, "cannot subscribe to the reply subjects: async replies are not collected");
                        return;
                    }
                };
                while let Some(m) = sub.next().await {
                    let Some(id) = m.subject.as_str().rsplit('.').next().filter(|i| valid_id(i))
                    else {
                        continue;
                    };
                    let (status, content_type) = super::nats::reply_meta(m.headers.as_ref());
                    let done = sized(&name, status, content_type, m.payload);
                    filing.complete(id, done).await;
                }
            })
            .abort_handle();
        Some(Replies {
            prefix: Some(prefix),
            store,
            task: Some(task),
            amqp: None,
        })
    }

    /// Files a new pending operation; 503 when it cannot be kept (then nothing is published).
    pub(crate) async fn create(&self, x: &Exchange, ttl: Duration) -> Result<Created, BoxError> {
        let mut raw = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| "no randomness for an operation id")?;
        let id = hex(&raw);
        let entry = Entry {
            owner: owner(x),
            ttl,
            result: None,
        };
        match &self.store {
            Store::Memory(c) => c.insert(Arc::from(id.as_str()), Arc::new(entry)),
            Store::Redis(r) => {
                let key = redis_key(&id);
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                let owner = entry.owner.unwrap_or_default();
                r.call("async operations", |mut conn| async move {
                    redis::pipe()
                        .atomic()
                        .cmd("HSET")
                        .arg(&key)
                        .arg("state")
                        .arg("pending")
                        .arg("owner")
                        .arg(owner)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&key)
                        .arg(ms)
                        .ignore()
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
                .map_err(|_| store_down())?;
            }
        }
        let reply_subject = self.prefix.as_ref().map(|p| format!("{p}.{id}"));
        Ok(Created { id, reply_subject })
    }

    /// Drops an operation (its publish failed).
    pub(crate) async fn forget(&self, id: &str) {
        match &self.store {
            Store::Memory(c) => c.invalidate(id),
            Store::Redis(r) => {
                let key = redis_key(id);
                let _ = r
                    .call("async operations", |mut conn| async move {
                        redis::cmd("DEL")
                            .arg(&key)
                            .query_async::<i64>(&mut conn)
                            .await
                    })
                    .await;
            }
        }
    }

    async fn lookup(&self, id: &str, x: &Exchange) -> Result<Lookup, BoxError> {
        let who = owner(x);
        match &self.store {
            Store::Memory(c) => Ok(match c.get(id) {
                Some(e) if e.owner.is_none() || e.owner == who => match &e.result {
                    Some(d) => Lookup::Done(d.clone()),
                    None => Lookup::Pending,
                },
                _ => Lookup::Unknown,
            }),
            Store::Redis(r) => {
                let key = redis_key(id);
                let map: std::collections::HashMap<String, Vec<u8>> = r
                    .call("async operations", |mut conn| async move {
                        redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await
                    })
                    .await
                    .map_err(|_| store_down())?;
                let field = |k: &str| map.get(k).map(Vec::as_slice);
                let stored_owner = field("owner").filter(|o| !o.is_empty());
                if map.is_empty()
                    || stored_owner.is_some_and(|o| Some(o) != who.as_deref().map(str::as_bytes))
                {
                    return Ok(Lookup::Unknown);
                }
                if field("state") != Some(b"done".as_slice()) {
                    return Ok(Lookup::Pending);
                }
                let status = field("status")
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<u16>().ok())
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::OK);
                let content_type = field("ct")
                    .and_then(|c| HeaderValue::from_bytes(c).ok())
                    .unwrap_or(HeaderValue::from_static("application/octet-stream"));
                Ok(Lookup::Done(Done {
                    status,
                    content_type,
                    body: Bytes::copy_from_slice(field("body").unwrap_or_default()),
                }))
            }
        }
    }
}

impl Store {
    /// Files a reply under its operation, if the operation is known (a late reply to an
    /// expired one is dropped).
    async fn complete(&self, id: &str, done: Done) {
        match self {
            Store::Memory(c) => {
                if let Some(e) = c.get(id) {
                    let mut e = (*e).clone();
                    e.result = Some(done);
                    c.insert(Arc::from(id), Arc::new(e));
                }
            }
            Store::Redis(r) => {
                let key = redis_key(id);
                let filed = r
                    .call("async operations", |mut conn| async move {
                        redis::Script::new(
                            "if redis.call('EXISTS', KEYS[1]) == 1 then \
                             redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[1], 'ct', ARGV[2], 'body', ARGV[3]) \
                             return 1 end return 0",
                        )
                        .key(&key)
                        .arg(done.status.as_u16())
                        .arg(done.content_type.as_bytes())
                        .arg(done.body.as_ref())
                        .invoke_async::<i64>(&mut conn)
                        .await
                    })
                    .await;
                if filed.is_err() {
                    tracing::warn!(operation = %id, "an async reply could not be filed in Redis: the operation stays pending");
                }
            }
        }
    }
}

/// A reply as filed: over 1 MiB it is a 502 `reply_too_large` instead.
fn sized(broker: &str, status: StatusCode, content_type: HeaderValue, body: Bytes) -> Done {
    if body.len() > MAX_RESULT {
        tracing::warn!(broker = %broker, size = body.len(), "an async reply is larger than 1 MiB: filed as 502");
        return Done {
            status: StatusCode::BAD_GATEWAY,
            content_type: HeaderValue::from_static("application/problem+json"),
            body: Bytes::from_static(b"{\"type\":\"about:blank\",\"title\":\"The reply was too large to keep\",\"status\":502,\"code\":\"reply_too_large\"}"),
        };
    }
    Done {
        status,
        content_type,
        body,
    }
}

/// The operations store (Redis) does not answer: 503, nothing published or read.
fn store_down() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "operations_unavailable",
        "The store of operations does not answer",
    )
    .retry_after(1)
}

fn redis_key(id: &str) -> String {
    format!("gatehouse:op:{id}")
}

/// An operation id: 32 lower-case hex digits.
fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The identity an operation belongs to, when the client was identified.
fn owner(x: &Exchange) -> Option<String> {
    let i = x.identity()?;
    if let Some(c) = &i.consumer {
        return Some(format!("consumer:{c}"));
    }
    i.claims
        .as_ref()
        .and_then(|c| c.get("sub"))
        .and_then(|s| s.as_str())
        .map(|s| format!("sub:{s}"))
}

/// The backend of `GET …/operations/{operation}`.
#[derive(Clone)]
pub(crate) struct Operation(pub(crate) Arc<Replies>);

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<RespBody>, BoxError>> + Send>>;

impl tower::Service<Request<ReqBody>> for Operation {
    type Response = Response<RespBody>;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> BoxFuture {
        let replies = self.0.clone();
        Box::pin(async move {
            let Some(x) = req.extensions().get::<Exchange>().cloned() else {
                return Err("an operation request has no exchange".into());
            };
            let id = x.param(PARAM).unwrap_or_default();
            let found = if valid_id(id) {
                replies.lookup(id, &x).await?
            } else {
                Lookup::Unknown
            };
            let mut resp = match found {
                Lookup::Unknown => {
                    return Err(Problem::new(
                        StatusCode::NOT_FOUND,
                        "operation_not_found",
                        "No such operation (it may have expired)",
                    )
                    .into())
                }
                Lookup::Pending => {
                    let body = format!("{{\"id\":\"{id}\",\"status\":\"pending\"}}");
                    let mut r = Response::new(crate::backend::full(body));
                    *r.status_mut() = StatusCode::ACCEPTED;
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    r
                }
                Lookup::Done(d) => {
                    let mut r = Response::new(crate::backend::full(d.body));
                    *r.status_mut() = d.status;
                    r.headers_mut().insert(header::CONTENT_TYPE, d.content_type);
                    r
                }
            };
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_ids_are_32_hex_digits() {
        assert!(valid_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid_id("0123456789abcdef"));
        assert!(!valid_id("../../etc/passwd0123456789abcdef"));
    }
}
