//! Observability: the metrics registry, the access log, logging setup and the W3C trace context.

pub(crate) mod access;
pub mod logging;
pub mod metrics;
pub(crate) mod trace;
