//! gatehouse: an edge API gateway and backend-for-frontend.
//!
//! The request path, top to bottom: `server` (listeners) → `conn` (one connection: HTTP/1 or
//! HTTP/2, parking idle HTTP/1 connections) → `dispatch` (snapshot,
//! request id, routing, errors, access log) → `routing` (host, path, method) → `route` (the
//! route's tower stack) → `backend` (proxy, respond) → `upstream` (a service's endpoints and
//! pooled client). `config` and `gateway` build the immutable snapshot the path reads; `admin`
//! and `observe` look at it from the side.

mod admin;
mod backend;
mod body;
mod bridge;
pub mod config;
mod conn;
mod context;
pub mod demo;
mod dispatch;
mod error;
pub mod fuzz;
pub mod gateway;
mod layers;
pub use layers::plugins::rust as plugin;
pub mod observe;
mod per_worker;
mod resources;
mod route;
mod routing;
mod server;
mod upstream;
mod worker;

pub use server::{Server, StartError};
