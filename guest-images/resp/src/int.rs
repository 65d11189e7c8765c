//! Integers as Redis reads and writes them.
//!
//! Redis parses every integer it receives (multibulk counts, bulk lengths, INCRBY amounts,
//! EX seconds, stored values under INCR) with `string2ll` in `src/util.c`: decimal only, an
//! optional `-`, no `+`, no leading zeros, no spaces, at most 20 characters, within `i64`.
//! [`parse_i64`] is that function, so the same inputs are accepted and refused.

use alloc::vec::Vec;

/// `LONG_STR_SIZE` in Redis: a string this long or longer is never a valid integer.
const LONG_STR_SIZE: usize = 21;

/// Parses `s` exactly as Redis's `string2ll` does; `None` where Redis says "not an integer".
pub(crate) fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= LONG_STR_SIZE {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    // The first digit must be 1-9: "0" alone was handled above, so "-0", "01", "" fail here.
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d.wrapping_sub(b'0')))?;
    }
    if negative {
        // -(i64::MIN) = 2^63 fits u64 but not i64: build the result from the magnitude.
        if v > i64::MIN.unsigned_abs() {
            return None;
        }
        Some(0i64.checked_sub_unsigned(v).unwrap_or(i64::MIN))
    } else {
        i64::try_from(v).ok()
    }
}

/// Appends the decimal form of `v`.
pub(crate) fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        // `v % 10` is below 10, so the cast cannot truncate.
        let digit = b'0'.wrapping_add((v % 10) as u8);
        i = i.saturating_sub(1);
        if let Some(slot) = buf.get_mut(i) {
            *slot = digit;
        }
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(buf.get(i..).unwrap_or(&[]));
}

/// Appends the decimal form of `v`, with a `-` when negative.
pub(crate) fn write_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    write_u64(out, v.unsigned_abs());
}

/// `usize` as `u64`: lossless on every target Rust supports (pointer width at most 64 bits).
pub(crate) fn usize_to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `usize` as `i64`, saturating: counts and lengths in replies never come near `i64::MAX`.
pub(crate) fn usize_to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_i64_matches_string2ll() {
        let ok: &[(&[u8], i64)] = &[
            (b"0", 0),
            (b"1", 1),
            (b"-1", -1),
            (b"10", 10),
            (b"9223372036854775807", i64::MAX),
            (b"-9223372036854775808", i64::MIN),
        ];
        for (s, v) in ok {
            assert_eq!(parse_i64(s), Some(*v), "{:?}", core::str::from_utf8(s));
        }
        let bad: &[&[u8]] = &[
            b"",
            b"-",
            b"-0",
            b"00",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"1a",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"99999999999999999999",
            b"000000000000000000001",
            b"\xff",
        ];
        for s in bad {
            assert_eq!(parse_i64(s), None, "{s:?}");
        }
    }

    #[test]
    fn write_round_trips() {
        for v in [0, 1, -1, 9, 10, -10, 12345, i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            write_i64(&mut out, v);
            assert_eq!(parse_i64(&out), Some(v));
        }
        let mut out = Vec::new();
        write_u64(&mut out, u64::MAX);
        assert_eq!(out, b"18446744073709551615");
    }
}
