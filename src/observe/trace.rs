//! Request ids and the W3C trace context. Both are produced into stack buffers; the only
//! allocation is the header value itself.

use http::HeaderValue;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(out: &mut [u8], mut v: u128, digits: usize) {
    for i in (0..digits).rev() {
        out[i] = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// A new random request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    hex_into(&mut buf, fastrand::u128(..), 32);
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).expect("hex is a valid header value")
}

/// Accepts a client's request id only if it is short and plain (letters, digits, `-_.:`).
pub fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The `traceparent` to send upstream: the client's trace continued with a new span id for this
/// hop, or a new trace when the client sent none or an invalid one.
pub fn next_traceparent(incoming: Option<&HeaderValue>) -> HeaderValue {
    // version(2) - trace-id(32) - parent-id(16) - flags(2)
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match incoming.map(|v| v.as_bytes()) {
        Some(b) if parse_traceparent(b) => {
            out[3..35].copy_from_slice(&b[3..35]);
            out[53..55].copy_from_slice(&b[53..55]);
        }
        _ => {
            let mut id = fastrand::u128(..);
            if id == 0 {
                id = 1;
            }
            hex_into(&mut out[3..35], id, 32);
        }
    }
    let mut span = fastrand::u64(..);
    if span == 0 {
        span = 1;
    }
    hex_into(&mut out[36..52], span as u128, 16);
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}

/// Whether `b` is a valid version-00 traceparent (or a future version with the same prefix).
fn parse_traceparent(b: &[u8]) -> bool {
    if b.len() < 55 || (b.len() > 55 && b[55] != b'-') {
        return false;
    }
    let (ver, trace, parent, flags) = (&b[0..2], &b[3..35], &b[36..52], &b[53..55]);
    b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && is_lower_hex(ver)
        && ver != b"ff"
        && (ver != b"00" || b.len() == 55)
        && is_lower_hex(trace)
        && trace.iter().any(|&c| c != b'0')
        && is_lower_hex(parent)
        && parent.iter().any(|&c| c != b'0')
        && is_lower_hex(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace() {
        let inc =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let out = next_traceparent(Some(&inc));
        let s = out.to_str().unwrap();
        assert_eq!(&s[..36], "00-4bf92f3577b34da6a3ce929d0e0e4736-");
        assert_ne!(&s[36..52], "00f067aa0ba902b7");
        assert!(s.ends_with("-01"));
        assert!(parse_traceparent(s.as_bytes()));
    }

    #[test]
    fn starts_a_new_trace_for_invalid_input() {
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let out = next_traceparent(Some(&HeaderValue::from_static(bad)));
            let s = out.to_str().unwrap();
            assert!(parse_traceparent(s.as_bytes()), "{s}");
            assert!(!s.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        }
    }

    #[test]
    fn request_ids() {
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_request_id());
        assert!(valid_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
    }
}
