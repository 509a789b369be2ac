//! One client connection from accept to close.
//!
//! HTTP/2 (ALPN `h2`, or the h2c preface without TLS) is handed to hyper for the connection's
//! life. HTTP/1 connections alternate between two states:
//!
//! - **active**: hyper serves it, holding an 8 KiB read and an 8 KiB write buffer, its parser
//!   state and our service;
//! - **parked**: after a whole `park_after` period with no request started and none in flight,
//!   the driver takes the socket back from hyper (graceful shutdown of an idle HTTP/1 connection
//!   without closing the socket, then `into_parts`) and waits for the client's next bytes with
//!   nothing but the socket and a timer. Bytes hyper had read but not parsed are kept and given
//!   back first. The next bytes start a new hyper connection on the same socket.
//!
//! Idle keep-alive connections so cost a few hundred bytes instead of ~25 KiB, which is what
//! lets one gateway hold tens of thousands of them (bench/README.md). A new connection starts
//! parked too: hyper's buffers are only allocated once the client sends something.
//!
//! Shutdown: a parked connection closes at once; an active one is told to finish (hyper's
//! graceful shutdown) within `park_after`.
//!
//! Timeouts: a parked connection is closed after `keep_alive_timeout` (before its first request:
//! after `header_read_timeout`). Once woken, a connection must complete a request head within
//! `header_read_timeout` (checked every `park_after`); a connection idle in the middle of a head
//! is handed back with its partial head and served again at once, so no head outlives this.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::dispatch::{Conn, Dispatcher};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a parked connection waits: at most this many bytes are read before hyper takes over.
const WAKE_READ: usize = 64;

/// The protocol settings every connection is served with; built once at start.
pub(crate) struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    /// An HTTP/1 connection idle for a whole period of this is parked.
    park_after: Duration,
}

impl Protocols {
    /// `max_head` and `max_headers` are hyper's hard caps; the dispatcher enforces the
    /// configured limits (half of these) with problem+json answers.
    pub(crate) fn new(
        header_read_timeout: Duration,
        keep_alive_timeout: Duration,
        max_head: usize,
        max_headers: usize,
    ) -> Self {
        let mut h1 = http1::Builder::new();
        // hyper's minimum buffer is 8 KiB.
        h1.max_buf_size(max_head.max(8192));
        // Up to 100 header fields hyper parses into arrays on the stack; a larger limit makes it
        // allocate both arrays for every request. So its own limit stays at 100 unless more
        // are allowed (the dispatcher answers `max_header_count` below that with problem+json).
        if max_headers > HYPER_DEFAULT_MAX_HEADERS {
            h1.max_headers(max_headers);
        }
        // The header-read timeout is ours (`run_http1`): hyper's would allocate and arm a
        // timer for every request.
        h1.timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            // Flattening head and small bodies into one buffer measured ~4% less CPU per
            // request than vectored writes (bench/README.md).
            .writev(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(1024)
            .max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
        Protocols {
            http1: h1,
            http2: h2,
            header_read_timeout,
            keep_alive_timeout,
            park_after: park_after(header_read_timeout),
        }
    }
}

/// hyper's own header-count limit, with its arrays on the stack.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Parked before hyper's header-read timer (which also runs on an idle connection) can fire.
fn park_after(header_read_timeout: Duration) -> Duration {
    (header_read_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The socket as hyper sees it: bytes read while parked come first, and a shutdown asked for
/// while parking is not done (the socket stays open for the next request).
pub(crate) struct Io<T> {
    pre: Bytes,
    inner: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.conn.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why a connection's driver stopped waiting.
enum Wake {
    Bytes,
    Closed,
}

/// Serves one accepted connection (after TLS, if any) until it closes. `h2` is set when ALPN
/// chose HTTP/2. `drain` turns true when the gateway shuts down: in-flight requests finish, idle
/// connections close.
pub(crate) async fn serve<T>(
    io: T,
    svc: Dispatcher,
    protocols: &Protocols,
    h2: bool,
    mut drain: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = Io {
        pre: Bytes::new(),
        inner: io,
        conn: svc.conn().clone(),
    };
    if h2 {
        return Box::pin(serve_h2(io, svc, protocols, drain)).await;
    }
    // Before the first request: the client has header_read_timeout to start it.
    if let Wake::Closed = park(&mut io, protocols.header_read_timeout, &mut drain).await {
        return close(io).await;
    }
    if !read_past_preface(&mut io, protocols.header_read_timeout).await {
        return close(io).await;
    }
    if io.pre.starts_with(H2_PREFACE) {
        return Box::pin(serve_h2(io, svc, protocols, drain)).await;
    }
    let mut svc = svc;
    loop {
        let state = io.conn.clone();
        let conn = protocols
            .http1
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        let parts = match run_http1(Box::new(conn), &state, protocols, &drain).await {
            Some(parked) => parked,
            None => return,
        };
        io = parts.io.into_inner();
        svc = parts.service;
        if !parts.read_buf.is_empty() {
            // The beginning of the next request head: serve it again at once. `run_http1`'s
            // header-read check then bounds how long the rest may take.
            io.pre = join(std::mem::take(&mut io.pre), parts.read_buf);
            continue;
        }
        if !io.pre.is_empty() {
            continue;
        }
        if let Wake::Closed = park(&mut io, protocols.keep_alive_timeout, &mut drain).await {
            return close(io).await;
        }
    }
}

/// Serves an HTTP/1 connection until it ends (`None`) or has been idle for a whole
/// `park_after` period, in which case it is taken back from hyper, socket open.
async fn run_http1<T>(
    mut conn: Box<http1::UpgradeableConnection<TokioIo<Io<T>>, Dispatcher>>,
    state: &Conn,
    protocols: &Protocols,
    drain: &watch::Receiver<bool>,
) -> Option<http1::Parts<TokioIo<Io<T>>, Dispatcher>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first = state.started();
    let mut seen = first;
    let since = Instant::now();
    // The drain is looked at on this tick, not awaited: a watch's `changed()` would take the
    // channel's lock each time the connection is polled, on every worker.
    let tick = tokio::time::sleep(protocols.park_after);
    tokio::pin!(tick);
    let mut parking = false;
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            r = &mut *conn => {
                state.parking.store(false, Ordering::Relaxed);
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                    return None;
                }
                return if parking { conn.into_parts() } else { None };
            }
            _ = &mut tick, if !parking && !draining => {
                let now = state.started();
                if *drain.borrow() {
                    draining = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                } else if now == seen && now != first && state.is_idle() {
                    // Only between requests is hyper's connection idle (before its first
                    // request it would not close but answer it with `Connection: close`).
                    // hyper closes an idle connection at once; `Io` keeps the socket open.
                    parking = true;
                    state.parking.store(true, Ordering::Relaxed);
                    Pin::new(&mut *conn).graceful_shutdown();
                } else if now == first && since.elapsed() >= protocols.header_read_timeout {
                    // Woken by bytes that have not made a request head in time.
                    tracing::debug!("no complete request head within header_read_timeout; closing");
                    return None;
                } else {
                    seen = now;
                    tick.as_mut().reset(Instant::now() + protocols.park_after);
                }
            }
        }
    }
}

async fn serve_h2<T>(
    io: Io<T>,
    svc: Dispatcher,
    protocols: &Protocols,
    drain: watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = protocols.http2.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // As for HTTP/1: the drain is looked at on a tick.
    let tick = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(tick);
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = &mut tick, if !draining => {
                if *drain.borrow() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                } else {
                    tick.as_mut().reset(Instant::now() + protocols.park_after);
                }
            }
        }
    }
}

/// Waits for the client's next bytes (into `io.pre`), at most `limit`, counted in
/// `gatehouse_connections_parked`; gives up at once when the gateway drains.
async fn park<T>(io: &mut Io<T>, limit: Duration, drain: &mut watch::Receiver<bool>) -> Wake
where
    T: AsyncRead + Unpin,
{
    let gauge = io.conn.parked_gauge().clone();
    gauge.inc();
    let woke = wait_for_bytes(io, limit, drain).await;
    gauge.dec();
    woke
}

async fn wait_for_bytes<T>(
    io: &mut Io<T>,
    limit: Duration,
    drain: &mut watch::Receiver<bool>,
) -> Wake
where
    T: AsyncRead + Unpin,
{
    if *drain.borrow() {
        return Wake::Closed;
    }
    let mut buf = [0u8; WAKE_READ];
    tokio::select! {
        r = io.inner.read(&mut buf) => match r {
            Ok(0) | Err(_) => Wake::Closed,
            Ok(n) => {
                io.pre = Bytes::copy_from_slice(&buf[..n]);
                Wake::Bytes
            }
        },
        _ = tokio::time::sleep(limit) => Wake::Closed,
        _ = drain.changed() => Wake::Closed,
    }
}

/// Reads until `io.pre` is either not a beginning of the HTTP/2 preface or holds all of it.
/// False if the client went away or stalled past `limit`.
async fn read_past_preface<T>(io: &mut Io<T>, limit: Duration) -> bool
where
    T: AsyncRead + Unpin,
{
    let deadline = Instant::now() + limit;
    while io.pre.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&io.pre) {
        let mut more = BytesMut::from(&io.pre[..]);
        match tokio::time::timeout_at(deadline, io.inner.read_buf(&mut more)).await {
            Ok(Ok(n)) if n > 0 => io.pre = more.freeze(),
            _ => return false,
        }
    }
    true
}

fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    let mut v = BytesMut::with_capacity(a.len() + b.len());
    v.extend_from_slice(&a);
    v.extend_from_slice(&b);
    v.freeze()
}

async fn close<T: AsyncWrite + Unpin>(mut io: Io<T>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), io.inner.shutdown()).await;
}
