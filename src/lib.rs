//! gatehouse: an edge API gateway and backend-for-frontend.
//!
//! The request path, top to bottom: `server` (listeners) → `conn` (one connection: HTTP/1 or
//! HTTP/2, parking idle HTTP/1 connections) → `dispatch` (snapshot,
//! request id, routing, errors, access log) → `routing` (host, path, method) → `route` (the
//! route's tower stack) → `backend` (proxy, respond) → `upstream` (a service's endpoints and
//! pooled client). `config` and `gateway` build the immutable snapshot the path reads; `admin`
//! and `observe` look at it from the side.

pub mod admin;
pub mod backend;
pub mod body;
pub mod config;
pub mod conn;
pub mod demo;
pub mod dispatch;
pub mod error;
pub mod gateway;
pub mod layers;
pub mod observe;
pub mod route;
pub mod routing;
pub mod server;
pub mod upstream;
pub mod worker;

pub use server::{Server, StartError};
