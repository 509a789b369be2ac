//! Filling an object while the client reads it: the response body passes through frame by
//! frame, and a copy of each chunk (a reference count, not a copy of the bytes) is kept until
//! the body ends; then the object is stored and the requests waiting for it are answered. A
//! body that grows past `max_object_size`, fails, carries trailers or is dropped unfinished is
//! passed on without being stored.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use super::store::{CacheStore, FlightGuard, Object, Outcome};
use crate::backend::RespBody;
use crate::error::BoxError;

/// An object being filled: everything but its body, and the body so far.
pub(crate) struct Filling {
    pub(crate) store: Arc<CacheStore>,
    pub(crate) key: Arc<str>,
    /// The object, with an empty body.
    pub(crate) object: Object,
    pub(crate) guard: Option<FlightGuard>,
    chunks: Vec<Bytes>,
    size: usize,
}

impl Filling {
    pub(crate) fn new(
        store: Arc<CacheStore>,
        key: Arc<str>,
        object: Object,
        guard: Option<FlightGuard>,
    ) -> Self {
        Filling {
            store,
            key,
            object,
            guard,
            chunks: Vec::new(),
            size: 0,
        }
    }

    /// Keeps a chunk; `false` once the object is too large to store.
    fn push(&mut self, chunk: &Bytes) -> bool {
        self.size += chunk.len();
        if self.size > self.store.max_object_size {
            return false;
        }
        if !chunk.is_empty() {
            self.chunks.push(chunk.clone());
        }
        true
    }

    /// The body ended: store the object and answer the waiters.
    fn complete(self) {
        let Filling {
            store,
            key,
            mut object,
            guard,
            chunks,
            size,
        } = self;
        object.body = match chunks.len() {
            0 => Bytes::new(),
            // A copy of its own: a chunk is a slice of the buffer hyper read it into, which a
            // stored slice would keep alive whole.
            1 => Bytes::copy_from_slice(&chunks[0]),
            _ => {
                let mut b = BytesMut::with_capacity(size);
                for c in &chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        let object = Arc::new(object);
        store.put(&key, object.clone());
        if let Some(g) = guard {
            g.finish(Outcome::Stored(object));
        }
    }
}

/// A response body that fills an object as it is read.
pub(crate) struct FillBody {
    inner: RespBody,
    filling: Option<Filling>,
    /// Read by nobody but the fill (a background refresh): it ends as soon as the object
    /// cannot be stored, rather than reading the rest of the body for nothing.
    background: bool,
}

impl FillBody {
    pub(crate) fn new(inner: RespBody, filling: Filling) -> Self {
        Self::with(inner, filling, false)
    }

    /// A fill no client reads.
    pub(crate) fn background(inner: RespBody, filling: Filling) -> Self {
        Self::with(inner, filling, true)
    }

    fn with(inner: RespBody, filling: Filling, background: bool) -> Self {
        let mut body = FillBody {
            inner,
            filling: Some(filling),
            background,
        };
        // An empty body (204, `Content-Length: 0`) is complete before it is read.
        if body.inner.is_end_stream() {
            if let Some(f) = body.filling.take() {
                f.complete();
            }
        }
        body
    }
}

impl Body for FillBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(f) = this.filling.as_mut() {
                    // Trailers are not stored: an object is its head and its bytes.
                    let keep = frame.data_ref().is_some_and(|d| f.push(d));
                    if !keep {
                        this.filling = None;
                        if this.background {
                            return Poll::Ready(None);
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    if let Some(f) = this.filling.take() {
                        f.complete();
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.filling.take() {
                    f.complete();
                }
            }
            Poll::Ready(Some(Err(_))) => this.filling = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        (self.background && self.filling.is_none()) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a fill no client reads to its end (which stores it), keeping no frame.
pub(crate) async fn drain(mut body: FillBody) {
    use http_body_util::BodyExt;
    while let Some(Ok(_)) = body.frame().await {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;
    use crate::layers::cache::store::Join;
    use http_body_util::BodyExt;

    fn object() -> Object {
        Object {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: Bytes::new(),
            selected: Box::new([]),
            identity: None,
            route: "web/a".into(),
            cc: Default::default(),
            timing: super::super::rules::Timing {
                lifetime: std::time::Duration::from_secs(60),
                initial_age: std::time::Duration::ZERO,
            },
            stored_at: tokio::time::Instant::now(),
            stale_while_revalidate: std::time::Duration::ZERO,
            stale_if_error: std::time::Duration::ZERO,
        }
    }

    /// A body of `chunks`, one frame each, from a channel.
    fn streamed(
        chunks: usize,
    ) -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        RespBody,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(chunks.max(1));
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let body = http_body_util::StreamBody::new(stream);
        (
            tx,
            RespBody::Stream(http_body_util::combinators::BoxBody::new(body)),
        )
    }

    #[tokio::test]
    async fn a_fill_stores_at_the_end_and_a_dropped_one_releases_its_waiters() {
        let store = Arc::new(CacheStore::new(
            &CacheConfig::default(),
            &crate::observe::metrics::Metrics::new(),
            None,
        ));
        let key: Arc<str> = "http://x/a".into();
        // Completed: the waiter gets the stored object, with the whole body.
        let Join::Lead(guard) = store.join(&key) else {
            panic!("the first request leads")
        };
        let Join::Follow(flight) = store.join(&key) else {
            panic!("the second one waits")
        };
        let waiter = tokio::spawn({
            let (store, flight) = (store.clone(), flight.clone());
            async move { flight.wait(&store).await }
        });
        let (tx, body) = streamed(2);
        let filling = Filling::new(store.clone(), key.clone(), object(), Some(guard));
        let mut fill = FillBody::new(body, filling);
        tx.send(Ok(Frame::data(Bytes::from("ab")))).await.unwrap();
        tx.send(Ok(Frame::data(Bytes::from("cd")))).await.unwrap();
        drop(tx);
        let all = (&mut fill).collect().await.unwrap().to_bytes();
        assert_eq!(all, "abcd");
        match waiter.await.unwrap() {
            Some(Outcome::Stored(o)) => assert_eq!(o.body, "abcd"),
            _ => panic!("the waiter is answered from the stored object"),
        }
        assert!(store.get(&key).is_some());
        // Dropped half-read: nothing stored, the waiter asks the service itself.
        let key2: Arc<str> = "http://x/b".into();
        let Join::Lead(guard) = store.join(&key2) else {
            panic!("a new flight")
        };
        let Join::Follow(flight) = store.join(&key2) else {
            panic!("waits")
        };
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { flight.wait(&store).await }
        });
        let (tx, body) = streamed(2);
        let filling = Filling::new(store.clone(), key2.clone(), object(), Some(guard));
        let mut fill = FillBody::new(body, filling);
        tx.send(Ok(Frame::data(Bytes::from("half")))).await.unwrap();
        let first = fill.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "half");
        drop(fill);
        assert!(matches!(waiter.await.unwrap(), Some(Outcome::NotStored)));
        assert!(store.get(&key2).is_none());
        // The flight ended: the next request leads again.
        assert!(matches!(store.join(&key2), Join::Lead(_)));
    }
}
