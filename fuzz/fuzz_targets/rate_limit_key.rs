//! What a rate limit counts by, from client input: X-Forwarded-For read into a client IP, a
//! header value or a claim made a key, and each key made a Redis key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("rate_limit_key", data);
});
