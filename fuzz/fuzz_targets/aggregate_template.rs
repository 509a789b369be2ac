//! A value from a client or a backend put into an aggregate call's path, query and header
//! through templates: it can never change the target's structure.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("aggregate_template", data);
});
