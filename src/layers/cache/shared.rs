//! The shared tier (`tiers = ["memory", "redis"]`): every stored URL is also written to
//! `[redis]`, so a gateway of a fleet that misses in its own memory finds what another one
//! stored. Each URL is one hash, `gatehouse:cache:{url}`, with the route that stored it and its
//! variants encoded (`encode`/`decode`, below), expiring once the last variant could no longer
//! be served even stale.
//!
//! Only misses in memory ask Redis, within `[redis] timeout`; writes and deletes are sent in
//! the background. Redis failures follow the rate limiter's rules (the same connection): a
//! call that fails or times out marks it down, and while it is down no request waits for it —
//! the cache works from memory alone, one probe per backoff interval. A hit in memory never
//! touches Redis.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::rules::{ResponseDirectives, Timing};
use super::store::{Object, Variants};
use crate::upstream::redis::RedisStore;

const PREFIX: &str = "gatehouse:cache:";
const MAGIC: &[u8; 4] = b"GHC2";
/// How long past its last use as stale a URL is kept in Redis, at least.
const SLACK: Duration = Duration::from_secs(60);
/// A URL is kept at most this long.
const MAX_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// Admin purges scan with their own, longer deadline.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared tier of one `[cache]`.
pub(crate) struct SharedTier {
    pub(crate) redis: Arc<RedisStore>,
    /// URLs invalidated in the last seconds: not read back from Redis while their delete may
    /// still be on its way.
    removed: moka::sync::Cache<Arc<str>, ()>,
}

/// Variants per URL read from Redis, at most (as memory keeps).
const MAX_VARIANTS: u32 = 8;

impl SharedTier {
    pub(crate) fn new(redis: Arc<RedisStore>) -> Self {
        SharedTier {
            redis,
            removed: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(2))
                .build(),
        }
    }

    pub(crate) fn recently_removed(&self, key: &str) -> bool {
        self.removed.contains_key(key)
    }

    fn redis_key(key: &str) -> String {
        format!("{PREFIX}{key}")
    }

    /// The variants another gateway stored for `key` (`None` when there are none, or Redis is
    /// down, slow or holds something this version cannot read or larger than `max_body`).
    pub(crate) async fn get(&self, key: &str, max_body: usize) -> Option<Vec<Arc<Object>>> {
        let rkey = Self::redis_key(key);
        let data: Option<Vec<u8>> = self
            .redis
            .call("response cache tier", |mut conn| async move {
                redis::cmd("HGET")
                    .arg(&rkey)
                    .arg("data")
                    .query_async(&mut conn)
                    .await
            })
            .await
            .ok()?;
        decode(&data?, SystemTime::now(), Instant::now(), max_body)
    }

    /// Writes a URL's variants, in the background.
    pub(crate) fn put(&self, key: &str, v: &Variants) {
        let now = Instant::now();
        let keep = v
            .list
            .iter()
            .map(|o| {
                let usable = o.timing.lifetime + o.stale_while_revalidate.max(o.stale_if_error);
                usable.saturating_sub(o.age(now))
            })
            .max()
            .unwrap_or(Duration::ZERO)
            .saturating_add(SLACK)
            .min(MAX_KEEP);
        let data = encode(&v.list, SystemTime::now(), now);
        let route = v
            .list
            .first()
            .map_or_else(|| Arc::from(""), |o| o.route.clone());
        let (rkey, redis) = (Self::redis_key(key), self.redis.clone());
        let ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        tokio::spawn(async move {
            let _ = redis
                .call("response cache tier", |mut conn| async move {
                    redis::pipe()
                        .atomic()
                        .cmd("HSET")
                        .arg(&rkey)
                        .arg("route")
                        .arg(&*route)
                        .arg("data")
                        .arg(data)
                        .ignore()
                        .cmd("PEXPIRE")
                        .arg(&rkey)
                        .arg(ms)
                        .ignore()
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await;
        });
    }

    /// Drops a URL (within `[redis] timeout`; marked removed here first, so that no miss on
    /// this gateway reads it back meanwhile).
    pub(crate) async fn remove(&self, key: &str) {
        self.removed.insert(Arc::from(key), ());
        let rkey = Self::redis_key(key);
        let _ = self
            .redis
            .call("response cache tier", |mut conn| async move {
                redis::cmd("DEL")
                    .arg(&rkey)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
    }

    /// Drops the URL `key` (`exact`), or every URL whose key starts with it; when `route` is
    /// given, only what that route stored. How many. (An admin call: it scans, with a
    /// deadline of its own.)
    pub(crate) async fn purge(
        &self,
        key: &str,
        exact: bool,
        route: Option<&str>,
    ) -> Result<usize, String> {
        let Some(mut conn) = self.redis.connection() else {
            return Err("no connection".into());
        };
        let mut pattern = glob_escape(&Self::redis_key(key));
        if !exact {
            pattern.push('*');
        }
        let work = async move {
            let mut cursor: u64 = 0;
            let mut purged = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut conn)
                    .await?;
                for k in keys {
                    if let Some(r) = route {
                        let stored: Option<String> = redis::cmd("HGET")
                            .arg(&k)
                            .arg("route")
                            .query_async(&mut conn)
                            .await?;
                        if stored.as_deref() != Some(r) {
                            continue;
                        }
                    }
                    let n: usize = redis::cmd("DEL").arg(&k).query_async(&mut conn).await?;
                    purged += n;
                }
                if next == 0 {
                    return Ok::<usize, redis::RedisError>(purged);
                }
                cursor = next;
            }
        };
        match tokio::time::timeout(PURGE_TIMEOUT, work).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }
}

/// A literal for a Redis `MATCH` pattern.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b);
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A URL's variants as bytes. Times travel as the wall-clock time the response arrived, so
/// another gateway computes the same age (give or take the two clocks' difference).
pub(crate) fn encode(list: &[Arc<Object>], wall: SystemTime, now: Instant) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + list.iter().map(|o| o.body.len() + 256).sum::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(list.len()).unwrap_or(0).to_be_bytes());
    for o in list {
        let arrived = wall
            .checked_sub(now.saturating_duration_since(o.stored_at))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let arrived_ms = millis(
            arrived
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        out.extend_from_slice(&o.status.as_u16().to_be_bytes());
        for v in [
            arrived_ms,
            millis(o.timing.lifetime),
            millis(o.timing.initial_age),
            millis(o.stale_while_revalidate),
            millis(o.stale_if_error),
        ] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        put_bytes(&mut out, o.route.as_bytes());
        match &o.identity {
            Some(id) => {
                out.push(1);
                put_bytes(&mut out, id.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&u32::try_from(o.selected.len()).unwrap_or(0).to_be_bytes());
        for (name, values) in o.selected.iter() {
            put_bytes(&mut out, name.as_str().as_bytes());
            out.extend_from_slice(&u32::try_from(values.len()).unwrap_or(0).to_be_bytes());
            for v in values.iter() {
                put_bytes(&mut out, v.as_bytes());
            }
        }
        out.extend_from_slice(&u32::try_from(o.headers.len()).unwrap_or(0).to_be_bytes());
        for (name, v) in &o.headers {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, v.as_bytes());
        }
        put_bytes(&mut out, &o.body);
    }
    out
}

/// Reads what `encode` wrote. Redis is outside the gateway: anything malformed is `None`.
pub(crate) fn decode(
    data: &[u8],
    wall: SystemTime,
    now: Instant,
    max_body: usize,
) -> Option<Vec<Arc<Object>>> {
    let mut r = Reader(data);
    if r.take(4)? != MAGIC {
        return None;
    }
    let n = r.u32()?;
    if n > MAX_VARIANTS {
        return None;
    }
    let mut out = Vec::new();
    for _ in 0..n {
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let arrived_ms = r.u64()?;
        let lifetime = Duration::from_millis(r.u64()?);
        let initial_age = Duration::from_millis(r.u64()?);
        let swr = Duration::from_millis(r.u64()?);
        let sie = Duration::from_millis(r.u64()?);
        let route: Arc<str> = Arc::from(std::str::from_utf8(r.bytes()?).ok()?);
        let identity = match r.u8()? {
            0 => None,
            1 => Some(Box::from(std::str::from_utf8(r.bytes()?).ok()?)),
            _ => return None,
        };
        let mut selected = Vec::new();
        for _ in 0..r.u32()? {
            let name = HeaderName::from_bytes(r.bytes()?).ok()?;
            let mut values = Vec::new();
            for _ in 0..r.u32()? {
                values.push(HeaderValue::from_bytes(r.bytes()?).ok()?);
            }
            selected.push((name, values.into_boxed_slice()));
        }
        let mut headers = HeaderMap::new();
        for _ in 0..r.u32()? {
            let name = HeaderName::from_bytes(r.bytes()?).ok()?;
            headers.append(name, HeaderValue::from_bytes(r.bytes()?).ok()?);
        }
        let body = r.bytes()?;
        if body.len() > max_body {
            return None;
        }
        let body = Bytes::copy_from_slice(body);
        // Its resident time so far, on this gateway's clock.
        let arrived = SystemTime::UNIX_EPOCH + Duration::from_millis(arrived_ms);
        let resident = wall.duration_since(arrived).unwrap_or(Duration::ZERO);
        let stored_at = now.checked_sub(resident).unwrap_or(now);
        out.push(Arc::new(Object {
            status,
            cc: ResponseDirectives::parse(&headers),
            headers,
            body,
            selected: selected.into_boxed_slice(),
            identity,
            route,
            timing: Timing {
                lifetime,
                initial_age,
            },
            stored_at,
            stale_while_revalidate: swr,
            stale_if_error: sie,
        }));
    }
    (r.0.is_empty() && !out.is_empty()).then_some(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.take(n)
    }
}

/// Fuzzing entry: any bytes decode to objects or to nothing, and what decodes encodes back to
/// the same bytes.
pub(crate) fn fuzz_decode(data: &[u8]) {
    let (wall, now) = (SystemTime::now(), Instant::now());
    if let Some(objects) = decode(data, wall, now, usize::MAX) {
        let again = encode(&objects, wall, now);
        assert!(decode(&again, wall, now, usize::MAX).is_some_and(|o| o.len() == objects.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_garbage_is_refused() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut headers = HeaderMap::new();
        headers.insert(
            "cache-control",
            HeaderValue::from_static("max-age=60, public"),
        );
        headers.append("x-two", HeaderValue::from_static("a"));
        headers.append("x-two", HeaderValue::from_static("b"));
        let o = Arc::new(Object {
            status: StatusCode::NOT_FOUND,
            cc: ResponseDirectives::parse(&headers),
            headers,
            body: Bytes::from_static(b"body"),
            selected: vec![(
                HeaderName::from_static("accept-language"),
                vec![HeaderValue::from_static("de")].into_boxed_slice(),
            )]
            .into_boxed_slice(),
            identity: Some("p\0consumer\0ann".into()),
            route: "web/all".into(),
            timing: Timing {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::from_secs(3),
            },
            stored_at: now,
            stale_while_revalidate: Duration::from_secs(10),
            stale_if_error: Duration::ZERO,
        });
        let data = encode(std::slice::from_ref(&o), wall, now);
        // Read 5 s later elsewhere: 5 s older.
        let back = decode(&data, wall + Duration::from_secs(5), now, 1024).unwrap();
        assert!(
            decode(&data, wall, now, 3).is_none(),
            "a body over the limit"
        );
        let b = &back[0];
        assert_eq!(
            (b.status, &b.body, &b.identity),
            (o.status, &o.body, &o.identity)
        );
        assert_eq!(b.headers, o.headers);
        assert_eq!(b.selected, o.selected);
        assert!(b.cc.public && b.cc.max_age == Some(60));
        assert_eq!(b.timing, o.timing);
        let age = b.age(now).as_secs();
        assert!((8..=9).contains(&age), "initial 3 s + 5 s resident: {age}");
        for cut in [0, 3, 10, data.len() - 1] {
            assert!(
                decode(&data[..cut], wall, now, 1024).is_none(),
                "cut at {cut}"
            );
        }
        let mut extra = data.clone();
        extra.push(0);
        assert!(decode(&extra, wall, now, 1024).is_none(), "trailing bytes");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
