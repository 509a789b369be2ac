//! Layers of a route's stack (see `route.rs` for their order).

pub(crate) mod cors;
pub(crate) mod fallback;
