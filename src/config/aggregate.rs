//! `[route.aggregate]`: one client request, many backend calls, one composed JSON response
//! (the BFF pattern). The keys are a contract; docs/CONFIG.md documents each.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::units::{Duration, Size};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AggregateConfig {
    /// The deadline of the whole composition; default: the route's timeout. Calls still
    /// running when it passes are cancelled.
    pub(crate) timeout: Option<Spanned<Duration>>,
    /// `named` (default): each call's body under its name; `root`: each call's body (an
    /// object) merged at the root of the response.
    #[serde(default)]
    pub(crate) merge: MergeMode,
    /// Backend calls per request at most, `for_each` expansions included.
    #[serde(default = "thirty_two")]
    pub(crate) max_calls: usize,
    /// Backend calls in flight per request at most.
    #[serde(default = "eight")]
    pub(crate) max_concurrency: usize,
    /// The largest body one call may answer with.
    #[serde(default = "one_mib")]
    pub(crate) max_call_body: Size,
    /// The largest composed response.
    #[serde(default = "four_mib")]
    pub(crate) max_body: Size,
    pub(crate) call: Vec<Spanned<CallConfig>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum MergeMode {
    #[default]
    Named,
    Root,
}

/// One `[[route.aggregate.call]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallConfig {
    pub(crate) name: Spanned<String>,
    pub(crate) service: Spanned<String>,
    #[serde(default = "get")]
    pub(crate) method: Spanned<String>,
    /// Path template: `/v1/users/{claims.sub}`.
    pub(crate) path: Spanned<String>,
    /// Query parameters, each value a template.
    #[serde(default)]
    pub(crate) query: BTreeMap<String, Spanned<String>>,
    /// Request headers, each value a template.
    #[serde(default)]
    pub(crate) headers: BTreeMap<String, Spanned<String>>,
    /// The request body: a template (`"{body}"` is the client's body as it came).
    pub(crate) body: Option<Spanned<String>>,
    /// Calls whose answers this one needs (it starts when they have answered).
    #[serde(default)]
    pub(crate) depends_on: Vec<Spanned<String>>,
    /// A required call that fails fails the request (502/504); an optional one is listed in
    /// the response's `errors`.
    #[serde(default = "yes")]
    pub(crate) required: bool,
    /// Lets the service's retry policy retry this call even when its method is not
    /// idempotent (GET, HEAD, PUT, DELETE, OPTIONS are retried anyway).
    #[serde(default)]
    pub(crate) idempotent: bool,
    pub(crate) shape: Option<Spanned<ShapeConfig>>,
    /// `calls.NAME.body.PATH[*].FIELD`: one call per element (`{item}` in the templates),
    /// the answers collected into an array in input order.
    pub(crate) for_each: Option<Spanned<String>>,
}

/// How a call's JSON answer is shaped before it is composed. Applied in this order:
/// `target`, `deny`, `allow`, `rename`; `flatten` says where the result goes.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShapeConfig {
    /// Take this subtree of the answer (a dotted path: `data.items`).
    pub(crate) target: Option<String>,
    /// Keep only these fields (dotted paths; through arrays, of each element).
    #[serde(default)]
    pub(crate) allow: Vec<String>,
    /// Remove these fields (dotted paths; through arrays, of each element).
    #[serde(default)]
    pub(crate) deny: Vec<String>,
    /// Rename fields: `{ "old.path" = "new_name" }` (the last segment is renamed in place).
    #[serde(default)]
    pub(crate) rename: BTreeMap<String, String>,
    /// Merge the (object) result into the response's root instead of under the call's name.
    #[serde(default)]
    pub(crate) flatten: bool,
}

fn thirty_two() -> usize {
    32
}
fn eight() -> usize {
    8
}
fn one_mib() -> Size {
    Size(1024 * 1024)
}
fn four_mib() -> Size {
    Size(4 * 1024 * 1024)
}
fn get() -> Spanned<String> {
    Spanned::new(0..0, "GET".to_owned())
}
fn yes() -> bool {
    true
}
