//! A token or API key from a client: read from a bearer header, a cookie and the query, its
//! JWT header parsed, an API key looked up and removed from the query, claims made header
//! values.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("auth_credentials", data);
});
