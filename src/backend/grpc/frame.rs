//! gRPC's length-prefixed messages: one flag byte (bit 0: compressed; gRPC-Web's bit 7:
//! trailers), a 4-byte big-endian length, the message. The gateway sends uncompressed messages
//! and asks for none (no `grpc-accept-encoding`), so a compressed message is refused.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A message framed for the wire.
pub(crate) fn encode(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
    out.freeze()
}

/// gRPC-Web's trailer frame: flag 0x80 and the trailers as an HTTP/1 header block.
pub(crate) fn encode_trailers(block: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + block.len());
    out.put_u8(0x80);
    out.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    out.put_slice(block);
    out.freeze()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("a compressed message (the gateway asks for none)")]
    Compressed,
    #[error("a message of {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("the stream ended inside a message")]
    Truncated,
}

/// Reads messages out of a byte stream as it arrives, a message at most `max` bytes.
pub(crate) struct Decoder {
    buf: BytesMut,
    max: usize,
}

/// One frame: a message, or (gRPC-Web) a trailer block.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Message(Bytes),
    Trailers(Bytes),
}

impl Decoder {
    pub(crate) fn new(max: usize) -> Self {
        Decoder {
            buf: BytesMut::new(),
            max,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived.
    pub(crate) fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max {
            return Err(FrameError::TooLarge(len));
        }
        if flag & 0x01 != 0 {
            return Err(FrameError::Compressed);
        }
        if self.buf.len() - 5 < len {
            return Ok(None);
        }
        self.buf.advance(5);
        let body = self.buf.split_to(len).freeze();
        Ok(Some(if flag & 0x80 != 0 {
            Frame::Trailers(body)
        } else {
            Frame::Message(body)
        }))
    }

    /// At the end of the stream: whether bytes of an unfinished frame are left.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_read_whole() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(b"hello"));
        wire.extend_from_slice(&encode(b""));
        wire.extend_from_slice(&encode_trailers(b"grpc-status:0\r\n"));
        for cut in 0..wire.len() {
            let mut d = Decoder::new(100);
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                d.push(part);
                while let Some(f) = d.next().unwrap() {
                    got.push(f);
                }
            }
            d.finish().unwrap();
            assert_eq!(
                got,
                vec![
                    Frame::Message(Bytes::from_static(b"hello")),
                    Frame::Message(Bytes::new()),
                    Frame::Trailers(Bytes::from_static(b"grpc-status:0\r\n")),
                ]
            );
        }
    }

    #[test]
    fn large_compressed_and_cut_frames_are_refused() {
        let mut d = Decoder::new(4);
        d.push(&encode(b"hello"));
        assert_eq!(d.next(), Err(FrameError::TooLarge(5)));
        let mut d = Decoder::new(100);
        d.push(&[1, 0, 0, 0, 1, b'x']);
        assert_eq!(d.next(), Err(FrameError::Compressed));
        let mut d = Decoder::new(100);
        d.push(&[0, 0, 0, 0, 3, b'x']);
        assert_eq!(d.next(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
    }
}
