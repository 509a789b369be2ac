//! Request ids and the W3C trace context. Both are produced into stack buffers; the only
//! allocation is the header value itself.

use http::HeaderValue;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `v` as 16 hex digits into `out[..16]`, a byte (two digits) at a time.
fn hex_into(out: &mut [u8], v: u64) {
    for (pair, b) in out[..16].chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// A random 128-bit id, never zero, as 32 hex digits into `out[..32]`.
fn random_id_into(out: &mut [u8]) {
    let (hi, mut lo) = (fastrand::u64(..), fastrand::u64(..));
    if hi == 0 && lo == 0 {
        lo = 1;
    }
    hex_into(&mut out[..16], hi);
    hex_into(&mut out[16..32], lo);
}

/// A new random request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    random_id_into(&mut buf);
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
        _ => random_id_into(&mut out[3..35]),
    }
    let span = fastrand::u64(..).max(1);
    hex_into(&mut out[36..52], span);
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
    fn hex_digits_in_order() {
        let mut out = [0u8; 16];
        hex_into(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(&out, b"0123456789abcdef");
        hex_into(&mut out, 0xf);
        assert_eq!(&out, b"000000000000000f");
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
