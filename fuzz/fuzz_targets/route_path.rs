//! A request path and host (split at the first NUL byte): normalized and routed, parameters
//! captured, the upstream target built.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("route_path", data);
});
