//! The request body of a proxied request, replayable when the request may be retried: a body
//! that is small enough (`retry.max_body_buffer`) and of known size is buffered once and
//! cloned for each attempt (a reference count); any other body streams once and its request
//! is never retried.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};

use crate::body::ReqBody;
use crate::body::{BodyTooLarge, ClientBodyError};
use crate::error::{chain_has, client_body, find_in_chain, GatewayError};

/// A request body for one or more attempts.
pub(crate) enum Replay {
    /// Buffered: every attempt gets a copy.
    Kept(Full<Bytes>),
    /// Streamed: the first attempt takes it.
    Once(Option<ReqBody>),
}

impl Replay {
    /// A body sent at most once.
    pub(crate) fn once(body: ReqBody) -> Self {
        Replay::Once(Some(body))
    }

    /// Buffers `body` if it is at most `max` bytes and its size is known; otherwise it will be
    /// sent once. A client whose body fails or exceeds the limit while it is read gets a 4xx.
    pub(crate) async fn buffer(
        headers: &HeaderMap,
        body: ReqBody,
        max: u64,
    ) -> Result<Self, GatewayError> {
        if buffered_len(headers, &body, max).is_none() {
            return Ok(Replay::once(body));
        }
        if let Either::Right(full) = body {
            return Ok(Replay::Kept(full));
        }
        let bytes = body.collect().await.map_err(|e| {
            if chain_has::<BodyTooLarge>(&*e) {
                GatewayError::BodyTooLarge
            } else if let Some(b) = find_in_chain::<ClientBodyError>(&*e) {
                client_body(b)
            } else {
                GatewayError::BadRequest("request body")
            }
        })?;
        Ok(Replay::Kept(Full::new(bytes.to_bytes())))
    }

    /// Whether the body can be sent more than once.
    pub(crate) fn replayable(&self) -> bool {
        matches!(self, Replay::Kept(_))
    }

    /// The body for the next attempt; `None` once a streamed body was taken.
    pub(crate) fn next(&mut self) -> Option<ReqBody> {
        match self {
            Replay::Kept(full) => Some(Either::Right(full.clone())),
            Replay::Once(body) => body.take(),
        }
    }
}

/// The body length if it can be buffered for retries: known and at most `max`.
fn buffered_len(headers: &HeaderMap, body: &ReqBody, max: u64) -> Option<u64> {
    if body.is_end_stream() {
        return Some(0);
    }
    // A body the gateway made (a gRPC message, an aggregate call's body) knows its length.
    if let Either::Right(full) = body {
        let len = full.size_hint().exact()?;
        return (len <= max).then_some(len);
    }
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    (len <= max).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::req_full;
    use http::HeaderValue;

    async fn bytes_of(b: ReqBody) -> Bytes {
        b.collect().await.unwrap().to_bytes()
    }

    fn with_length(n: usize) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        h
    }

    #[tokio::test]
    async fn a_small_body_of_known_size_is_sent_again_and_again() {
        let mut r = Replay::buffer(&with_length(5), req_full("hello"), 10)
            .await
            .unwrap();
        assert!(r.replayable());
        for _ in 0..3 {
            assert_eq!(bytes_of(r.next().unwrap()).await, "hello");
        }
    }

    #[tokio::test]
    async fn a_large_body_streams_once_and_a_made_body_knows_its_size() {
        let mut big = Replay::buffer(&with_length(11), req_full("hello world"), 10)
            .await
            .unwrap();
        assert!(!big.replayable());
        assert_eq!(bytes_of(big.next().unwrap()).await, "hello world");
        assert!(big.next().is_none(), "a streamed body is sent once");
        // A body the gateway made (a gRPC message) knows its size without a Content-Length;
        // over the limit it is still sent once.
        let mut made = Replay::buffer(&HeaderMap::new(), req_full("x"), 10)
            .await
            .unwrap();
        assert!(made.replayable());
        assert_eq!(bytes_of(made.next().unwrap()).await, "x");
        assert_eq!(bytes_of(made.next().unwrap()).await, "x");
        let mut made_big = Replay::buffer(&HeaderMap::new(), req_full("hello world"), 10)
            .await
            .unwrap();
        assert!(!made_big.replayable());
        assert!(made_big.next().is_some());
        assert!(made_big.next().is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable_without_a_length() {
        let mut r = Replay::buffer(&HeaderMap::new(), req_full(""), 10)
            .await
            .unwrap();
        assert!(r.replayable());
        assert_eq!(bytes_of(r.next().unwrap()).await, "");
        assert_eq!(bytes_of(r.next().unwrap()).await, "");
    }
}
