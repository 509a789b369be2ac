//! HTTP/1.1 connections to endpoints, pooled per worker thread, over hyper's connection API.
//!
//! Each worker (see `per_worker`) keeps its idle connections in a thread-local map keyed by
//! (pool, endpoint), so a checkout is a lookup in a map no other thread touches: no lock, no
//! atomic beyond hyper's own. A connection goes back to the pool when its response body has
//! ended cleanly (`UpstreamBody`); a body dropped half-read takes its connection with it, so a
//! connection in an unknown state is never reused. Idle connections are closed after the
//! service's `pool_idle_timeout` (checked at checkout and by a sweep every few seconds on each
//! worker) and at most `pool_max_idle_per_endpoint` are kept per worker.
//!
//! Compared with hyper-util's pooled client this does not convert the target to absolute form
//! and back, hash the scheme and authority per request, or spawn a task per request to return
//! the connection (bench/README.md).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use tokio::time::Instant;
use tower::ServiceExt;

use super::{Connector, Endpoint};
use crate::body::ReqBody;
use crate::error::BoxError;

type Tx = http1::SendRequest<ReqBody>;
/// (pool id, endpoint id).
type Key = (u64, u64);

struct Idle {
    tx: Tx,
    expires: Instant,
}

/// One service's idle connections to one endpoint, in one worker.
struct Idles {
    /// Cleared when the service is dropped (a reload changed it): the sweep then closes these.
    alive: Arc<AtomicBool>,
    list: Vec<Idle>,
    /// Used since the last sweep; an entry left empty and unused is removed by the sweep.
    touched: bool,
}

/// The keys are ids the process made itself, never client input: a fast hash will do where
/// std's SipHash would cost two hashings per request.
type FastHash = std::hash::BuildHasherDefault<twox_hash::XxHash64>;

thread_local! {
    static IDLE: RefCell<HashMap<Key, Idles, FastHash>> = RefCell::new(HashMap::default());
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh id for a pool or an endpoint.
pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made (refused, timed out, TLS handshake failed).
    #[error("connect: {0}")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or the response awaited.
    #[error("request: {0}")]
    Request(#[source] BoxError),
}

/// One service's HTTP/1.1 pool (its idle connections live in each worker's map).
pub(crate) struct Http1Pool {
    id: u64,
    alive: Arc<AtomicBool>,
    connector: Connector,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Http1Pool {
    pub(crate) fn new(connector: Connector, idle_timeout: Duration, max_idle: usize) -> Self {
        Http1Pool {
            id: next_id(),
            alive: Arc::new(AtomicBool::new(true)),
            connector,
            idle_timeout,
            max_idle,
        }
    }

    /// Sends `req` (its target already in origin form) to `ep` on an idle connection of this
    /// worker, or on a new one.
    /// Not an `async fn`: that would move `req` into a second slot of its state; the block
    /// below keeps (and, on a retry, replaces) the one it captured.
    pub(crate) fn send<'a>(
        &'a self,
        ep: &'a Endpoint,
        mut req: Request<ReqBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + 'a {
        let key = (self.id, ep.id);
        async move {
            loop {
                let (mut tx, reused) = match take(key, &self.alive) {
                    Some(tx) => (tx, true),
                    // Boxed: the connect state is large and rare; inline, every request's future
                    // would carry it.
                    None => (Box::pin(self.connect(ep)).await?, false),
                };
                match tx.try_send_request(req).await {
                    Ok(resp) => {
                        // After a protocol switch the connection belongs to the tunnel.
                        let back =
                            (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Return {
                                tx,
                                key,
                                idle_timeout: self.idle_timeout,
                                max_idle: self.max_idle,
                            });
                        return Ok(resp.map(|b| UpstreamBody::pooled(b, back)));
                    }
                    Err(mut e) => match e.take_message() {
                        // A pooled connection closed before it took the request (the server
                        // timed it out): nothing was sent, so another connection may take it.
                        Some(r) if reused => req = r,
                        _ => return Err(SendError::Request(e.into_error().into())),
                    },
                }
            }
        }
    }

    async fn connect(&self, ep: &Endpoint) -> Result<Tx, SendError> {
        let uri = Uri::builder()
            .scheme(ep.scheme.clone())
            .authority(ep.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))?;
        let io = self
            .connector
            .clone()
            .oneshot(uri)
            .await
            .map_err(SendError::Connect)?;
        let (tx, conn) = http1::Builder::new()
            // Flattened writes measured cheaper than vectored ones (see server.rs).
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let url = ep.url.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(endpoint = &*url, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

impl Drop for Http1Pool {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// An idle connection of this worker for `key` that can take a request now. Closed and expired
/// ones met on the way are dropped; one still finishing its last response is left for later.
fn take(key: Key, alive: &Arc<AtomicBool>) -> Option<Tx> {
    IDLE.with(|m| {
        let mut m = m.borrow_mut();
        // Made on the first request of this worker to this endpoint, so that `put` finds it.
        let idles = m.entry(key).or_insert_with(|| Idles {
            alive: alive.clone(),
            list: Vec::new(),
            touched: true,
        });
        idles.touched = true;
        let list = &mut idles.list;
        if list.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let e = &list[i];
            if e.tx.is_closed() || e.expires <= now {
                list.swap_remove(i);
            } else if e.tx.is_ready() {
                return Some(list.swap_remove(i).tx);
            }
        }
        None
    })
}

/// Drops this worker's idle connections that expired or closed, and those of services that no
/// longer exist. Each worker runs it every few seconds, so an idle connection outlives
/// `pool_idle_timeout` by at most that much.
pub(crate) fn sweep() {
    IDLE.with(|m| {
        let now = Instant::now();
        m.borrow_mut().retain(|_, idles| {
            if !idles.alive.load(Ordering::Relaxed) {
                return false;
            }
            idles.list.retain(|e| !e.tx.is_closed() && e.expires > now);
            // An endpoint nobody asked for since the last sweep (gone from discovery, say).
            let keep = idles.touched || !idles.list.is_empty();
            idles.touched = false;
            keep
        });
    })
}

/// How often each worker sweeps its idle connections.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A connection on its way back to the pool once its response body has ended.
struct Return {
    tx: Tx,
    key: Key,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Return {
    fn put(self) {
        if self.max_idle == 0 || self.tx.is_closed() {
            return;
        }
        let expires = Instant::now() + self.idle_timeout;
        IDLE.with(|m| {
            // Missing only when the body ended on another thread than the request started on:
            // the connection is then closed rather than pooled where it was not made.
            if let Some(idles) = m.borrow_mut().get_mut(&self.key) {
                if idles.list.len() < self.max_idle {
                    idles.list.push(Idle {
                        tx: self.tx,
                        expires,
                    });
                }
            }
        })
    }
}

/// A response body from an upstream. A pooled HTTP/1.1 connection goes back to its worker's
/// pool when the body has ended; if the body is dropped before its end, the connection closes.
pub(crate) struct UpstreamBody {
    inner: Incoming,
    back: Option<Return>,
    ended: bool,
}

impl UpstreamBody {
    fn pooled(inner: Incoming, back: Option<Return>) -> Self {
        let mut body = UpstreamBody {
            inner,
            back,
            ended: false,
        };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }

    /// A body whose connection is not ours to pool (HTTP/2, or hyper-util's client).
    pub(crate) fn plain(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            back: None,
            ended: false,
        }
    }

    fn give_back(&mut self) {
        if let Some(r) = self.back.take() {
            r.put();
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                this.ended = true;
                this.give_back();
            }
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.ended = true;
                this.give_back();
            }
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pooled", &self.back.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.ended || self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
