//! Request ids and the W3C trace context. Both are produced into stack buffers; the only
//! allocation is the header value itself.

use http::HeaderValue;

/// Eight hex digits of `x`, most significant first, as the bytes of a big-endian `u64`. All
/// eight are made at once in one register (no table, no loop): each nibble is spread into a
/// byte of its own, then mapped to '0'..'9' or 'a'..'f' by adding an offset.
fn hex8(x: u32) -> u64 {
    let mut v = u64::from(x);
    v = ((v & 0xffff_0000) << 16) | (v & 0xffff);
    v = ((v & 0x0000_ff00_0000_ff00) << 8) | (v & 0x0000_00ff_0000_00ff);
    v = ((v & 0x00f0_00f0_00f0_00f0) << 4) | (v & 0x000f_000f_000f_000f);
    // 1 in each byte whose nibble is 10 or more.
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    v + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)
}

/// Writes `v` as 16 lowercase hex digits into `out[..16]`.
fn hex_into(out: &mut [u8], v: u64) {
    out[..8].copy_from_slice(&hex8((v >> 32) as u32).to_be_bytes());
    out[8..16].copy_from_slice(&hex8(v as u32).to_be_bytes());
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
pub(crate) fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    random_id_into(&mut buf);
    // Hex digits are always a valid header value; the fallback is never taken.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// Accepts a client's request id only if it is short and plain (letters, digits, `-_.:`).
pub(crate) fn valid_request_id(v: &HeaderValue) -> bool {
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
pub(crate) fn next_traceparent(incoming: Option<&HeaderValue>) -> HeaderValue {
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
    // Hex digits and dashes are always a valid header value; the fallback is never taken.
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000001-0000000000000001-01",
    ))
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
        // Every nibble value in every position, the edges (9/a) included, against std's hex.
        let mut v: u64 = 0x9a9a_0f0f_a9a9_f0f0;
        for n in 0..10_000u64 {
            hex_into(&mut out, v);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{v:016x}"));
            v = v.rotate_left(4) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        for v in [0, u64::MAX, 0x9999_9999_9999_9999, 0xaaaa_aaaa_aaaa_aaaa] {
            hex_into(&mut out, v);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{v:016x}"));
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
