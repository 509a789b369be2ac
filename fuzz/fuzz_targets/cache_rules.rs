//! What the response cache reads from clients and services: a request's host, path and query
//! made a cache key, header values matched against a stored variant, and `Cache-Control`,
//! `Expires` and `Age` values worked into a storage decision.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("cache_rules", data);
});
