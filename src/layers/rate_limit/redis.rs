//! The Redis store: the state of `store = "redis"` policies, shared by every gateway that uses
//! the same Redis. One Lua script per check does every window of the policy in one round trip,
//! atomically, on the Redis server's clock (`TIME`), never the gateways' clocks: gateways
//! whose clocks differ still share one budget exactly.
//!
//! The connection, its `[redis] timeout` and its down-marking (while Redis is down no request
//! waits for it: the policy's `on_store_failure` applies at once) are `upstream::redis`, shared
//! with the response cache's Redis tier; this file is the limiter's script and keys.

use std::fmt::Write as _;
use std::sync::LazyLock;
use std::time::Duration;

pub(crate) use crate::upstream::redis::{RedisStore, StoreError, FAILURE_REASONS};

use super::{Outcome, Raw, WindowState, Windows};

/// GCRA over every window of a policy: admitted when all admit, and then counted in each.
/// KEYS[1]: the key's hash. ARGV: windows, ttl (ms), then per window: field, interval (µs),
/// burst. Returns: admitted (1/0), wait (µs), then per window: remaining, reset (µs).
static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT_TEXT));
const SCRIPT_TEXT: &str = r"
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

/// Checks and counts one request of `key` under `policy`'s windows.
pub(crate) async fn check(
    store: &RedisStore,
    policy: &str,
    key: &Raw<'_>,
    args: &WindowArgs,
) -> Result<Outcome, StoreError> {
    let mut inv = SCRIPT.key(redis_key(policy, key));
    inv.arg(args.windows.len()).arg(args.ttl_ms);
    for (field, us, burst) in &args.windows {
        inv.arg(field.as_str()).arg(*us).arg(*burst);
    }
    let values: Vec<i64> = store
        .call("rate limit store", |mut conn| async move {
            inv.invoke_async::<Vec<i64>>(&mut conn).await
        })
        .await?;
    parse_reply(&values, args.windows.len()).ok_or(StoreError::Error)
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

    #[test]
    fn a_reply_of_the_wrong_shape_is_an_error() {
        assert!(parse_reply(&[1, 0, 5], 1).is_none());
        let out = parse_reply(&[0, 1_500_000, 0, 1_500_000], 1).unwrap();
        assert!(!out.admitted);
        assert_eq!(out.retry_after, Duration::from_millis(1500));
    }
}
