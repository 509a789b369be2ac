//! A raw HTTP/1.1 request head, parsed as hyper does (httparse), then checked, routed and
//! given its forwarding headers and upstream target.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("request_head", data);
});
