//! What a publish sends: the client's `Idempotency-Key`, the message id scoped to the route and
//! the client's identity, and the message headers (forwarding headers and the identity).

use http::header;
use http::{HeaderMap, StatusCode};

use crate::context::Exchange;
use crate::error::{BoxError, Problem};

/// An `Idempotency-Key` usable as a message id: 1–200 visible ASCII characters.
pub(super) fn idempotency_key(h: &HeaderMap) -> Result<Option<String>, BoxError> {
    let Some(v) = h.get("idempotency-key") else {
        return Ok(None);
    };
    let b = v.as_bytes();
    if b.is_empty() || b.len() > 200 || !b.iter().all(|c| c.is_ascii_graphic()) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "The Idempotency-Key must be 1 to 200 visible ASCII characters",
        )
        .into());
    }
    Ok(Some(String::from_utf8_lossy(b).into_owned()))
}

/// The message's headers: its id, the request's content type, the forwarding headers
/// (`X-Request-Id`, `traceparent`, `X-Forwarded-*`) and the identity auth found.
pub(super) fn message_headers(
    h: &HeaderMap,
    x: &Exchange,
    id: &str,
    from_client: bool,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(8);
    // The request's own forwarding headers (a trusted proxy's are extended, others replaced).
    let mut fwd = HeaderMap::new();
    for name in [
        "traceparent",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ] {
        if let Some(v) = h.get(name) {
            fwd.insert(name, v.clone());
        }
    }
    crate::backend::forward::forwarding_headers(&mut fwd, x);
    // NATS header names are case-sensitive: written in their usual spelling.
    for (name, spelled) in [
        ("x-request-id", "X-Request-Id"),
        ("x-forwarded-for", "X-Forwarded-For"),
        ("x-forwarded-proto", "X-Forwarded-Proto"),
        ("x-forwarded-host", "X-Forwarded-Host"),
        ("traceparent", "traceparent"),
    ] {
        if let Some(v) = fwd.get(name).and_then(|v| v.to_str().ok()) {
            insert(&mut out, spelled, v);
        }
    }
    if let Some(ct) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        insert(&mut out, "Content-Type", ct);
    }
    if from_client {
        insert(&mut out, "Idempotency-Key", id);
    }
    if let Some(identity) = x.identity() {
        if let Some(c) = &identity.consumer {
            insert(&mut out, "Gatehouse-Consumer", c);
        }
        if let Some(sub) = identity
            .claims
            .as_ref()
            .and_then(|c| c.get("sub"))
            .and_then(|s| s.as_str())
            .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
        {
            insert(&mut out, "Gatehouse-Subject", sub);
        }
    }
    out
}

/// Sets a message header whose value is visible ASCII or spaces only: nothing from a client
/// can end a header line early and add one of its own (`Nats-Expected-*`, `Nats-Rollup`).
fn insert(out: &mut Vec<(&'static str, String)>, name: &'static str, value: &str) {
    if value
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    {
        out.push((name, value.to_owned()));
    }
}

/// The client's identity for scoping: its API-key consumer or JWT subject; else its address.
fn who(x: &Exchange) -> String {
    x.identity()
        .and_then(|i| {
            i.consumer
                .as_deref()
                .map(|c| format!("consumer:{c}"))
                .or_else(|| {
                    i.claims
                        .as_ref()
                        .and_then(|c| c.get("sub"))
                        .and_then(|s| s.as_str())
                        .map(|s| format!("sub:{s}"))
                })
        })
        .unwrap_or_else(|| {
            format!(
                "ip:{}",
                String::from_utf8_lossy(x.client().peer_ip.as_bytes())
            )
        })
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// The broker's dedup id for a client's `Idempotency-Key`: the key scoped to the route and the
/// client's identity (its API-key consumer or JWT subject; else its address), hashed.
pub(super) fn scoped_id(route: &str, x: &Exchange, key: &str) -> String {
    let who = who(x);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [route, "\n", &who, "\n", key] {
        ctx.update(part.as_bytes());
    }
    hex(ctx.finish().as_ref())
}
