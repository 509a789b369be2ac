//! gateway.toml and a route file (split at the first NUL byte): parsed, expanded, compiled.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("config", data);
});
