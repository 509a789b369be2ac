#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
//! Integration tests: a real gateway on real sockets in front of real upstream servers.

mod aggregate;
mod auth;
mod balance;
mod brokers;
mod cache;
mod check;
mod dns;
mod errors;
mod etcd;
mod fuzz_corpus;
mod grpc;
mod hardening;
mod parking;
mod plugins;
mod pool;
mod process;
mod protocols;
mod proxy;
mod publish;
mod rate_limit;
mod reload;
mod resilience;
mod shutdown;
mod streaming;
mod support;
mod upstream_tls;
mod workers;
