//! `${VAR}` and `${VAR:-default}` expansion of a config file's text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("env_expand", data);
});
