//! A transcoded gRPC route's inputs (request path, query, JSON body), gRPC-Web text bodies,
//! and a service's frames and status details: decoded without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gatehouse::fuzz::run("grpc_transcode", data);
});
