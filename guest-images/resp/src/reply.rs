//! RESP2 reply encoders, byte for byte as Redis 7.0 writes them (`src/networking.c`).

use alloc::vec::Vec;

use crate::int::{write_i64, write_u64};

/// `+OK`.
pub(crate) fn ok(out: &mut Vec<u8>) {
    out.extend_from_slice(b"+OK\r\n");
}

/// A status reply, `+text`; `text` is one of ours and holds no CR or LF.
pub(crate) fn status(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'+');
    out.extend_from_slice(text);
    out.extend_from_slice(b"\r\n");
}

/// The null bulk string, `$-1`.
pub(crate) fn nil(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// An integer reply, `:n`.
pub(crate) fn int(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    write_i64(out, n);
    out.extend_from_slice(b"\r\n");
}

/// A bulk string, `$len` then the bytes.
pub(crate) fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    write_u64(out, crate::int::usize_to_u64(data.len()));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A bulk string or the null bulk string.
pub(crate) fn bulk_or_nil(out: &mut Vec<u8>, data: Option<&[u8]>) {
    match data {
        Some(d) => bulk(out, d),
        None => nil(out),
    }
}

/// The header of an array of `n` elements, `*n`.
pub(crate) fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    write_u64(out, crate::int::usize_to_u64(n));
    out.extend_from_slice(b"\r\n");
}

/// How many bytes [`bulk`] writes for `len` bytes of data: for bounding a reply before it is
/// built.
pub(crate) fn bulk_size(len: usize) -> usize {
    // `$` + at most 20 digits + CRLF + data + CRLF.
    len.saturating_add(25)
}

/// An error reply from a fixed text: `-ERR text`, or `-text` when the text carries its own
/// code (`-NOPROTO ...`), as Redis's `addReplyError` does.
pub(crate) fn error(out: &mut Vec<u8>, text: &[u8]) {
    if text.first() == Some(&b'-') {
        out.extend_from_slice(text);
    } else {
        out.extend_from_slice(b"-ERR ");
        out.extend_from_slice(text);
    }
    out.extend_from_slice(b"\r\n");
}

/// An error reply whose text quotes client bytes, as Redis's `addReplyErrorFormat` builds it:
/// the parts are joined, CR and LF are trimmed from both ends, and any left inside become
/// spaces, so a client cannot inject a second reply through an error message.
pub(crate) fn error_fmt(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let mut msg: Vec<u8> = parts.concat();
    while matches!(msg.last(), Some(b'\r' | b'\n')) {
        msg.pop();
    }
    let lead = msg.iter().position(|b| !matches!(b, b'\r' | b'\n')).unwrap_or(msg.len());
    msg.drain(..lead);
    for b in &mut msg {
        if matches!(*b, b'\r' | b'\n') {
            *b = b' ';
        }
    }
    error(out, &msg);
}

/// `s` cut as C's `%.Ns` cuts it: at most `max` bytes, and nothing from the first NUL on.
/// Redis formats client bytes into error texts this way, so ours do too.
pub(crate) fn c_str_prefix(s: &[u8], max: usize) -> &[u8] {
    let nul = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    s.get(..nul.min(max)).unwrap_or(&[])
}

/// Redis's shared error replies used by several commands.
pub(crate) mod errs {
    pub(crate) const SYNTAX: &[u8] = b"syntax error";
    pub(crate) const NOT_INTEGER: &[u8] = b"value is not an integer or out of range";
    pub(crate) const OVERFLOW: &[u8] = b"increment or decrement would overflow";
    pub(crate) const OOM: &[u8] = b"-OOM command not allowed when used memory > 'maxmemory'.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoders() {
        let mut out = Vec::new();
        ok(&mut out);
        nil(&mut out);
        int(&mut out, -3);
        bulk(&mut out, b"");
        bulk(&mut out, b"ab");
        array(&mut out, 2);
        error(&mut out, b"x");
        error(&mut out, b"-NOPROTO y");
        assert_eq!(out, b"+OK\r\n$-1\r\n:-3\r\n$0\r\n\r\n$2\r\nab\r\n*2\r\n-ERR x\r\n-NOPROTO y\r\n");
    }

    #[test]
    fn error_fmt_neutralises_newlines() {
        let mut out = Vec::new();
        error_fmt(&mut out, &[b"\r\nunknown '", b"a\r\nb", b"'\n"]);
        assert_eq!(out, b"-ERR unknown 'a  b'\r\n");
    }

    #[test]
    fn c_str_prefix_stops_at_nul_and_max() {
        assert_eq!(c_str_prefix(b"abc\0def", 10), b"abc");
        assert_eq!(c_str_prefix(b"abcdef", 2), b"ab");
    }
}
