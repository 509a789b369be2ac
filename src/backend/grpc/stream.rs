//! Response bodies made from a gRPC response stream as it arrives:
//! - `JsonStream`: a server-streaming method's messages as NDJSON lines or Server-Sent Events,
//!   each written when its message is whole; a failed call ends with an error object (the
//!   HTTP status has gone out already);
//! - `WebBody`: the gRPC-Web form of a gRPC response: the messages as they are, then the
//!   trailers as a last frame (flag 0x80), all in base64 for `grpc-web-text`.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use prost_reflect::{DescriptorPool, FieldDescriptor, MessageDescriptor};

use super::frame::{self, Decoder};
use super::status::GrpcStatus;
use super::transcode;
use crate::backend::RespBody;
use crate::error::BoxError;

/// How a streamed JSON answer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `application/x-ndjson`: one JSON document a line.
    Ndjson,
    /// `text/event-stream`: `data: {…}` events; a failure is an `event: error`.
    Sse,
}

pub(crate) struct JsonStream {
    inner: RespBody,
    decoder: Decoder,
    output: MessageDescriptor,
    response_body: Option<FieldDescriptor>,
    pool: DescriptorPool,
    format: Format,
    /// The status from the response's headers (a trailers-only answer), if any.
    status: Option<GrpcStatus>,
    done: bool,
}

impl JsonStream {
    pub(crate) fn new(
        inner: RespBody,
        max: usize,
        output: MessageDescriptor,
        response_body: Option<FieldDescriptor>,
        pool: DescriptorPool,
        format: Format,
    ) -> Self {
        JsonStream {
            inner,
            decoder: Decoder::new(max),
            output,
            response_body,
            pool,
            format,
            status: None,
            done: false,
        }
    }

    fn write(&self, out: &mut BytesMut, json: &[u8], error: bool) {
        match self.format {
            Format::Ndjson => {
                out.extend_from_slice(json);
                out.extend_from_slice(b"\n");
            }
            Format::Sse => {
                if error {
                    out.extend_from_slice(b"event: error\n");
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(json);
                out.extend_from_slice(b"\n\n");
            }
        }
    }

    /// The messages decoded so far, written out.
    fn drain(&mut self, out: &mut BytesMut) -> Result<(), BoxError> {
        while let Some(f) = self.decoder.next()? {
            if let frame::Frame::Message(m) = f {
                let msg = transcode::decode(&self.output, m)?;
                let json = transcode::response_json(&msg, self.response_body.as_ref())?;
                self.write(out, &json, false);
            }
        }
        Ok(())
    }

    /// The end of the call: an error object when it did not end with OK.
    fn end(&mut self, out: &mut BytesMut, trailers: Option<&HeaderMap>) {
        self.done = true;
        let status = trailers
            .and_then(GrpcStatus::from_headers)
            .or_else(|| self.status.take())
            .unwrap_or(GrpcStatus {
                code: 2,
                message: "the service ended the stream without a status".into(),
                details: None,
            });
        if status.code != 0 {
            let v = serde_json::json!({ "error": status.to_json(&self.pool) });
            let json = serde_json::to_vec(&v).unwrap_or_default();
            self.write(out, &json, true);
        }
    }

    /// Ends the stream with a status of the gateway's own.
    fn fail(&mut self, out: &mut BytesMut, code: u32, message: &str) {
        self.status = Some(GrpcStatus {
            code,
            message: message.to_owned(),
            details: None,
        });
        self.end(out, None);
    }

    pub(crate) fn with_status(mut self, status: Option<GrpcStatus>) -> Self {
        self.status = status;
        self
    }
}

impl Body for JsonStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let mut out = BytesMut::new();
            // A stream that breaks still ends with an error object after what was whole: the
            // client can tell it from a stream that ended well.
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => {
                        this.decoder.push(&data);
                        if this.drain(&mut out).is_err() {
                            this.fail(
                                &mut out,
                                13,
                                "the service sent a message that cannot be read",
                            );
                        }
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            this.end(&mut out, Some(&t));
                        }
                    }
                },
                Some(Err(_)) => this.fail(&mut out, 14, "the service's stream broke off"),
                None => {
                    if this.decoder.finish().is_err() {
                        this.fail(&mut out, 14, "the service's stream broke off");
                    } else {
                        this.end(&mut out, None);
                    }
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// A gRPC response body in gRPC-Web's form.
pub(crate) struct WebBody {
    inner: RespBody,
    text: bool,
    /// `grpc-web-text`: bytes not yet encoded (fewer than 3, so the base64 has no padding
    /// until the end).
    pending: BytesMut,
    done: bool,
}

impl WebBody {
    pub(crate) fn new(inner: RespBody, text: bool) -> Self {
        WebBody {
            inner,
            text,
            pending: BytesMut::new(),
            done: false,
        }
    }

    fn out(&mut self, bytes: &[u8], last: bool) -> Bytes {
        if !self.text {
            return Bytes::copy_from_slice(bytes);
        }
        self.pending.extend_from_slice(bytes);
        let n = if last {
            self.pending.len()
        } else {
            self.pending.len() / 3 * 3
        };
        let chunk = self.pending.split_to(n);
        Bytes::from(base64::engine::general_purpose::STANDARD.encode(&chunk))
    }
}

/// Trailers as gRPC-Web's header block: `name:value\r\n` each, names in lower case.
pub(crate) fn trailer_block(t: &HeaderMap) -> Vec<u8> {
    let mut block = Vec::new();
    for (k, v) in t {
        block.extend_from_slice(k.as_str().as_bytes());
        block.push(b':');
        block.extend_from_slice(v.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    block
}

impl Body for WebBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => {
                        let out = this.out(&data, false);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            this.done = true;
                            let framed = frame::encode_trailers(&trailer_block(&t));
                            let out = this.out(&framed, true);
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Some(Err(_)) => {
                    // The service's stream broke: the client still gets a status.
                    this.done = true;
                    let framed = frame::encode_trailers(
                        b"grpc-status:14\r\ngrpc-message:the%20service%27s%20stream%20broke%20off\r\n",
                    );
                    let out = this.out(&framed, true);
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                None => {
                    this.done = true;
                    let out = this.out(&[], true);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// A `grpc-web-text` request body (base64, possibly several padded chunks) as bytes.
pub(crate) fn decode_text(body: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    let clean: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    // Each chunk ends at its padding (or at the end).
    let mut rest = clean.as_slice();
    while !rest.is_empty() {
        let end = match rest.iter().position(|b| *b == b'=') {
            Some(i) => {
                let mut e = i;
                while e < rest.len() && rest[e] == b'=' {
                    e += 1;
                }
                e
            }
            None => rest.len(),
        };
        base64::engine::general_purpose::STANDARD.decode_vec(&rest[..end], &mut out)?;
        rest = &rest[end..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use prost::Message;
    use prost_reflect::DynamicMessage;

    /// A response body of these frames (a `None` is the stream breaking).
    fn upstream(frames: Vec<Option<Frame<Bytes>>>) -> RespBody {
        let items = frames
            .into_iter()
            .map(|f| f.ok_or_else(|| BoxError::from("reset")));
        RespBody::Stream(http_body_util::combinators::BoxBody::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(items)),
        ))
    }

    fn item(a: &str) -> Bytes {
        let desc = crate::backend::grpc::fuzz::message().unwrap().clone();
        let mut m = DynamicMessage::new(desc.clone());
        m.set_field_by_name("a", prost_reflect::Value::String(a.into()));
        frame::encode(&m.encode_to_vec())
    }

    async fn text(body: JsonStream) -> String {
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn json_stream(inner: RespBody, format: Format) -> JsonStream {
        let desc = crate::backend::grpc::fuzz::message().unwrap().clone();
        let pool = desc.parent_pool().clone();
        JsonStream::new(inner, 1024, desc, None, pool, format)
    }

    #[tokio::test]
    async fn a_stream_that_breaks_ends_with_an_error_after_what_was_whole() {
        let mut whole = BytesMut::from(&item("one")[..]);
        let two = item("two");
        whole.extend_from_slice(&two[..3]);
        let body = upstream(vec![Some(Frame::data(whole.freeze())), None]);
        assert_eq!(
            text(json_stream(body, Format::Ndjson)).await,
            "{\"a\":\"one\"}\n{\"error\":{\"code\":14,\"message\":\"the service's stream broke off\",\"status\":\"UNAVAILABLE\"}}\n"
        );
        // Ended without trailers, in the middle of a frame.
        let body = upstream(vec![Some(Frame::data(two.slice(..4)))]);
        assert!(text(json_stream(body, Format::Sse))
            .await
            .starts_with("event: error\ndata: {\"error\":{\"code\":14"));
        // A message that does not decode.
        let body = upstream(vec![Some(Frame::data(frame::encode(&[0xff, 0xff])))]);
        assert!(text(json_stream(body, Format::Ndjson))
            .await
            .contains("\"code\":13"));
        // Ended well: no error object.
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        let body = upstream(vec![Some(Frame::data(item("x"))), Some(Frame::trailers(t))]);
        assert_eq!(
            text(json_stream(body, Format::Ndjson)).await,
            "{\"a\":\"x\"}\n"
        );
    }

    #[test]
    fn text_bodies_of_several_padded_chunks_decode() {
        let e = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let body = format!("{}{}\n{}", e(b"ab"), e(b"cde"), e(b"f"));
        assert_eq!(decode_text(body.as_bytes()).unwrap(), b"abcdef");
        assert!(decode_text(b"@@@@").is_err());
    }
}
