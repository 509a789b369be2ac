//! Layers of a route's stack (see `route/chain.rs` for their order): `cors`, `auth` (authentication: its providers in `auth/`), `rate_limit`, `cache` (response caching), `fallback`.

pub(crate) mod auth;
pub(crate) mod cache;
pub(crate) mod cors;
pub(crate) mod fallback;
pub mod plugins;
pub(crate) mod rate_limit;
