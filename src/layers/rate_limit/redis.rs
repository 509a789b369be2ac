//! The Redis store: the state of `store = "redis"` policies, shared by every gateway that uses
//! the same Redis. One Lua script per check does every window of the policy in one round trip,
//! atomically, on the Redis server's clock (`TIME`), never the gateways' clocks: gateways
//! whose clocks differ still share one budget exactly.
//!
//! One multiplexed connection (`redis::aio::ConnectionManager`, which reconnects by itself)
//! per `[redis]`. Each call has `[redis] timeout`; a call that fails or times out marks the
//! store down, and while it is down requests do not wait for it at all (the policy's
//! `on_store_failure` applies at once) — one request every backoff interval (100 ms doubling
//! to `max_backoff`) probes it, and the first that succeeds brings it back.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

use super::{Outcome, Raw, WindowState, Windows};

/// Why a check of the store did not answer. The index of each failure counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreError {
    Timeout = 0,
    Error = 1,
    /// Down since an earlier failure; not asked.
    Down = 2,
}

pub(crate) const FAILURE_REASONS: [&str; 3] = ["timeout", "error", "down"];

/// GCRA over every window of a policy: admitted when all admit, and then counted in each.
/// KEYS[1]: the key's hash. ARGV: windows, ttl (ms), then per window: field, interval (µs),
/// burst. Returns: admitted (1/0), wait (µs), then per window: remaining, reset (µs).
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local fields = {}
for i = 1, n do fields[i] = ARGV[3 * i] end
local tats = redis.call('HMGET', KEYS[1], unpack(fields))
local admitted, wait = 1, 0
local news, counted, asked = {}, {}, {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i + 1])
  local burst = tonumber(ARGV[3 * i + 2])
  local tat = math.max(tonumber(tats[i]) or now, now)
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  if now < allow_at then
    admitted = 0
    wait = math.max(wait, allow_at - now)
    asked[2 * i - 1] = 0
    asked[2 * i] = allow_at - now
  else
    news[#news + 1] = fields[i]
    news[#news + 1] = string.format('%.0f', new_tat)
    local r = math.floor((now - allow_at) / interval)
    counted[2 * i - 1] = r
    counted[2 * i] = new_tat - now
    local r1 = math.min(r + 1, burst)
    asked[2 * i - 1] = r1
    asked[2 * i] = interval * (burst - r1)
  end
end
local states = asked
if admitted == 1 then
  redis.call('HSET', KEYS[1], unpack(news))
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  states = counted
end
local res = {admitted, wait}
for i = 1, 2 * n do res[#res + 1] = states[i] end
return res
";

/// A policy's windows as the script takes them, made once.
pub(crate) struct WindowArgs {
    /// Per window: its field (interval and burst: a changed window starts afresh, an
    /// unchanged one keeps its state), interval (µs), burst.
    windows: Vec<(String, u64, u32)>,
    ttl_ms: u64,
}

impl WindowArgs {
    pub(crate) fn new(windows: &Windows) -> Self {
        let mut ttl = Duration::from_secs(1);
        let windows = windows
            .iter()
            .map(|w| {
                let us = u64::try_from(w.interval.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                ttl = ttl.max(w.interval.saturating_mul(w.burst));
                (format!("{us}:{}", w.burst), us, w.burst)
            })
            .collect();
        WindowArgs {
            windows,
            ttl_ms: u64::try_from(ttl.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_add(1000),
        }
    }
}

/// One `[redis]`: a connection shared by every policy that uses it.
pub(crate) struct RedisStore {
    /// `None` outside a runtime (`gatehouse check` builds the config without serving it).
    conn: Option<ConnectionManager>,
    timeout: Duration,
    max_backoff: Duration,
    script: redis::Script,
    base: Instant,
    /// While down: when the next call may probe (ms since `base`); 0 while up.
    retry_at: AtomicU64,
    failures: AtomicU32,
}

impl RedisStore {
    pub(crate) fn new(
        url: &str,
        timeout: Duration,
        connect_timeout: Duration,
        max_backoff: Duration,
    ) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("[redis] url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(connect_timeout.max(timeout)))
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(max_backoff)
            .set_number_of_retries(2);
        let conn = match tokio::runtime::Handle::try_current() {
            Ok(_) => Some(
                ConnectionManager::new_lazy_with_config(client, config)
                    .map_err(|e| format!("[redis]: {e}"))?,
            ),
            Err(_) => None,
        };
        Ok(RedisStore {
            conn,
            timeout,
            max_backoff,
            script: redis::Script::new(SCRIPT),
            base: Instant::now(),
            retry_at: AtomicU64::new(0),
            failures: AtomicU32::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    fn backoff(&self, failures: u32) -> u64 {
        let ms = 100u64.saturating_mul(1 << failures.min(16));
        ms.min(u64::try_from(self.max_backoff.as_millis()).unwrap_or(u64::MAX))
    }

    /// Whether this call may ask the store: it is up, or this call is the one probe of the
    /// current backoff interval.
    fn may_call(&self) -> bool {
        let at = self.retry_at.load(Ordering::Acquire);
        if at == 0 {
            return true;
        }
        let now = self.now_ms();
        let next = now + self.backoff(self.failures.load(Ordering::Relaxed));
        now >= at
            && self
                .retry_at
                .compare_exchange(at, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// A call failed. Only the one that finds the store up (the switch to down) or a probe
    /// (the store already down) moves the backoff: the calls in flight when it went down all
    /// fail at once, and must not push it to `max_backoff` at once. Whether this call was the
    /// switch (to log it once).
    fn failed(&self, probe: bool) -> bool {
        let at = self.now_ms() + self.backoff(self.failures.load(Ordering::Relaxed));
        let switched = self
            .retry_at
            .compare_exchange(0, at, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if switched || probe {
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if probe {
                self.retry_at
                    .store(self.now_ms() + self.backoff(n), Ordering::Release);
            }
        }
        switched
    }

    fn succeeded(&self, what: &str) {
        if self.retry_at.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
            self.retry_at.store(0, Ordering::Release);
            tracing::info!("{what} (Redis) is reachable again");
        }
    }

    /// The connection, for callers with deadlines of their own (admin purges); `None` outside
    /// a runtime.
    pub(crate) fn connection(&self) -> Option<ConnectionManager> {
        self.conn.clone()
    }

    /// Whether the store answered its last call.
    pub(crate) fn is_up(&self) -> bool {
        self.retry_at.load(Ordering::Relaxed) == 0
    }

    /// Checks and counts one request of `key` under `policy`'s windows.
    pub(crate) async fn check(
        &self,
        policy: &str,
        key: &Raw<'_>,
        args: &WindowArgs,
    ) -> Result<Outcome, StoreError> {
        let mut inv = self.script.key(redis_key(policy, key));
        inv.arg(args.windows.len()).arg(args.ttl_ms);
        for (field, us, burst) in &args.windows {
            inv.arg(field.as_str()).arg(*us).arg(*burst);
        }
        let values: Vec<i64> = self
            .call("rate limit store", |mut conn| async move {
                inv.invoke_async::<Vec<i64>>(&mut conn).await
            })
            .await?;
        parse_reply(&values, args.windows.len()).ok_or(StoreError::Error)
    }

    /// Runs one call on the connection, within `[redis] timeout`, unless the store is down
    /// (then only the probe of the current backoff interval calls). `what` names the user in
    /// the log lines of a switch to down and back.
    pub(crate) async fn call<T, F>(
        &self,
        what: &'static str,
        f: impl FnOnce(ConnectionManager) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = &self.conn else {
            return Err(StoreError::Down);
        };
        let probe = !self.is_up();
        if !self.may_call() {
            return Err(StoreError::Down);
        }
        match tokio::time::timeout(self.timeout, f(conn.clone())).await {
            Ok(Ok(v)) => {
                self.succeeded(what);
                Ok(v)
            }
            Ok(Err(e)) => {
                if self.failed(probe) {
                    tracing::warn!(error = %e, "{what} (Redis) failed; its fallback applies until it answers again");
                }
                Err(StoreError::Error)
            }
            Err(_) => {
                if self.failed(probe) {
                    tracing::warn!(timeout = ?self.timeout, "{what} (Redis) timed out; its fallback applies until it answers again");
                }
                Err(StoreError::Timeout)
            }
        }
    }
}

fn parse_reply(v: &[i64], windows: usize) -> Option<Outcome> {
    let (&admitted, rest) = v.split_first()?;
    let (&wait, states) = rest.split_first()?;
    if states.len() != 2 * windows {
        return None;
    }
    let us = |x: i64| Duration::from_micros(u64::try_from(x).unwrap_or(0));
    let mut out = Outcome::admitted();
    if admitted != 1 {
        out.refuse(us(wait));
    }
    for pair in states.chunks_exact(2) {
        out.push(WindowState {
            remaining: u32::try_from(pair[0]).unwrap_or(0),
            reset: us(pair[1]),
        });
    }
    Some(out)
}

/// `gatehouse:rl:{policy}:{key}`. Header values (which may be credentials) are stored as a
/// SHA-256 digest (its first 128 bits), and so is any other value that is long or not
/// printable; the rest is kept readable for operators.
pub(crate) fn redis_key(policy: &str, key: &Raw<'_>) -> Vec<u8> {
    let mut k = String::with_capacity(64);
    let _ = write!(k, "gatehouse:rl:{policy}:");
    let hashed = |k: &mut String, tag: &str, bytes: &[u8]| {
        let d = ring::digest::digest(&ring::digest::SHA256, bytes);
        k.push_str(tag);
        k.push('#');
        for b in &d.as_ref()[..16] {
            let _ = write!(k, "{b:02x}");
        }
    };
    let readable = |t: &str| t.len() <= 128 && t.bytes().all(|b| b.is_ascii_graphic());
    match key {
        Raw::Ip(ip) => {
            let _ = write!(k, "ip:{ip}");
        }
        Raw::Header(v) => hashed(&mut k, "h", v),
        Raw::Text(t) if readable(t) => {
            let _ = write!(k, "t:{t}");
        }
        Raw::Text(t) => hashed(&mut k, "t", t.as_bytes()),
        Raw::Route(r) if readable(r) => {
            let _ = write!(k, "r:{r}");
        }
        Raw::Route(r) => hashed(&mut k, "r", r.as_bytes()),
        Raw::Global => k.push('g'),
    }
    k.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hash_what_may_be_secret() {
        let h = redis_key("p", &Raw::Header(b"sk_live_123"));
        let s = String::from_utf8(h).unwrap();
        assert!(s.starts_with("gatehouse:rl:p:h#"), "{s}");
        assert_eq!(s.len(), "gatehouse:rl:p:h#".len() + 32);
        assert!(!s.contains("sk_live"));
        let t = redis_key("p", &Raw::Text("user-1".into()));
        assert_eq!(t, b"gatehouse:rl:p:t:user-1");
        let spaced = redis_key("p", &Raw::Text("a b\r\nDEL x".into()));
        assert!(String::from_utf8(spaced)
            .unwrap()
            .starts_with("gatehouse:rl:p:t#"));
        assert_eq!(
            redis_key("p", &Raw::Ip("203.0.113.9".parse().unwrap())),
            b"gatehouse:rl:p:ip:203.0.113.9"
        );
    }

    /// Down-marking: the calls in flight when the store goes down fail together and move the
    /// backoff once; while down, one call per interval probes; a success brings it back.
    #[test]
    fn the_backoff_moves_on_the_switch_and_on_failed_probes_only() {
        let s = RedisStore::new(
            "redis://127.0.0.1:1",
            Duration::from_millis(5),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(s.is_up() && s.may_call());
        assert!(s.failed(false), "the first failure is the switch");
        for _ in 0..100 {
            assert!(!s.failed(false), "calls in flight at the switch");
        }
        assert_eq!(s.failures.load(Ordering::Relaxed), 1);
        assert!(!s.is_up());
        assert!(
            !s.may_call(),
            "within the backoff interval nothing is asked"
        );
        // Past the interval, exactly one call probes.
        s.retry_at.store(1, Ordering::Release);
        assert!(s.may_call());
        assert!(!s.may_call());
        s.failed(true);
        assert_eq!(s.failures.load(Ordering::Relaxed), 2);
        assert!(s.backoff(2) > s.backoff(1) && s.backoff(40) == 5000);
        s.succeeded("test");
        assert!(s.is_up() && s.may_call());
        assert_eq!(s.failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error() {
        assert!(parse_reply(&[1, 0, 5], 1).is_none());
        let out = parse_reply(&[0, 1_500_000, 0, 1_500_000], 1).unwrap();
        assert!(!out.admitted);
        assert_eq!(out.retry_after, Duration::from_millis(1500));
    }
}
