//! The incremental request parser: RESP multibulk requests and inline commands.
//!
//! It follows `processMultibulkBuffer` and `processInlineBuffer` in Redis 7.0's
//! `src/networking.c` so that the same bytes give the same commands and the same protocol
//! errors; only the limits are ours (see the crate's limits). Like Redis it keeps partial
//! progress between calls (the argument count still expected, the length of the bulk being
//! read, the arguments read so far), so bytes are examined once however the input is split.
//!
//! Threat note: every byte here comes from a network client. Lengths are parsed with
//! [`parse_i64`] and capped before anything is allocated; every read of the buffer is
//! `get`-checked; the buffered input and the arguments of one request are bounded.

use alloc::vec::Vec;

use crate::int::parse_i64;
use crate::limits::{MAX_ARGS, MAX_BULK_LEN, MAX_INLINE_LEN, MAX_REQUEST_ARG_BYTES};

/// What the parser found at the front of the buffered input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A complete command (at least one argument).
    Command(Vec<Vec<u8>>),
    /// A request with no arguments (`*0`, `*-1`, an empty or blank inline line): Redis
    /// consumes it and replies nothing.
    Empty,
    /// The buffered bytes end inside a request.
    NeedMore,
    /// The stream cannot be parsed further. The text follows `-ERR ` in the reply.
    Error(ProtocolError),
}

/// A protocol error: Redis replies `-ERR Protocol error: ...` and closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProtocolError {
    /// `*` line longer than the inline limit without a CR.
    BigMultibulkCount,
    /// `*` count not an integer, or above [`MAX_ARGS`].
    InvalidMultibulkLength,
    /// `$` line longer than the inline limit without a CR.
    BigBulkCount,
    /// A multibulk element that does not start with `$`: carries the byte found.
    ExpectedDollar(u8),
    /// `$` length not an integer, negative, or above [`MAX_BULK_LEN`].
    InvalidBulkLength,
    /// The arguments of one request add up to more than [`MAX_REQUEST_ARG_BYTES`].
    BigRequest,
    /// An inline line longer than [`MAX_INLINE_LEN`].
    BigInline,
    /// An inline line with a quote left open, or a closing quote followed by a non-space.
    UnbalancedQuotes,
    /// An inline line with more than [`MAX_ARGS`] arguments.
    TooManyInlineArgs,
    /// More input buffered than [`crate::limits::MAX_BUFFERED_INPUT`] (the caller fed a
    /// connection whose output was not drained).
    QueryBufferFull,
}

impl ProtocolError {
    /// The reply line, without the trailing CRLF, as Redis words it where Redis has the case.
    pub(crate) fn write_reply(self, out: &mut Vec<u8>) {
        let text: &[u8] = match self {
            Self::BigMultibulkCount => b"Protocol error: too big mbulk count string",
            Self::InvalidMultibulkLength => b"Protocol error: invalid multibulk length",
            Self::BigBulkCount => b"Protocol error: too big bulk count string",
            Self::ExpectedDollar(c) => {
                // `%c` of a NUL ends Redis's C string there; CR/LF become spaces.
                let got: &[u8] = match c {
                    0 => b"",
                    b'\r' | b'\n' => b" ",
                    _ => core::slice::from_ref(&c),
                };
                crate::reply::error_fmt(
                    out,
                    &[b"Protocol error: expected '$', got '", got, if c == 0 { b"" } else { b"'" }],
                );
                return;
            }
            Self::InvalidBulkLength => b"Protocol error: invalid bulk length",
            Self::BigRequest => b"Protocol error: too big request",
            Self::BigInline => b"Protocol error: too big inline request",
            Self::UnbalancedQuotes => b"Protocol error: unbalanced quotes in request",
            Self::TooManyInlineArgs => b"Protocol error: too many arguments in inline request",
            Self::QueryBufferFull => b"Protocol error: query buffer limit reached",
        };
        crate::reply::error(out, text);
    }
}

/// Where the parser is inside the current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests.
    Idle,
    /// Inside a multibulk request: `remaining` arguments to read; `bulk` is the length of
    /// the one being read once its `$` line was parsed.
    Multibulk { remaining: usize, bulk: Option<usize> },
}

/// The parser and its buffer of received, not yet consumed bytes.
#[derive(Debug)]
pub(crate) struct Parser {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Bytes in `buf[pos..scanned]` are known to hold no terminator of the line being read:
    /// a long line fed one byte at a time is scanned once, not once per byte. Inline lines
    /// end at LF and header lines at CR, but one request is read with one kind only (its
    /// first byte decides), and once a line is found `pos` moves past it, so the two
    /// searches never share a scanned range.
    scanned: usize,
    state: State,
    argv: Vec<Vec<u8>>,
    /// Sum of the argument lengths announced so far in the current request.
    argv_bytes: usize,
}

impl Parser {
    pub(crate) fn new() -> Self {
        Self { buf: Vec::new(), pos: 0, scanned: 0, state: State::Idle, argv: Vec::new(), argv_bytes: 0 }
    }

    /// Appends received bytes.
    pub(crate) fn push(&mut self, input: &[u8]) {
        self.buf.extend_from_slice(input);
    }

    /// Received bytes not yet consumed by a complete request or argument.
    pub(crate) fn unparsed_len(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Bytes held for the connection: the unconsumed input and the arguments of a partly
    /// read request.
    pub(crate) fn buffered_len(&self) -> usize {
        self.unparsed_len().saturating_add(self.argv.iter().map(Vec::len).sum::<usize>())
    }

    /// Drops consumed bytes from the front of the buffer. Called once per feed, not per
    /// request, so that a pipeline of many small requests is not copied once per request.
    pub(crate) fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos.min(self.buf.len()));
            self.scanned = self.scanned.saturating_sub(self.pos);
            self.pos = 0;
        }
        // A 64 KiB value leaves a 64 KiB allocation behind; give it back once it is idle.
        if self.buf.is_empty() && self.buf.capacity() > 4 * 1024 {
            self.buf = Vec::new();
        }
    }

    /// Releases everything (the connection is closing).
    pub(crate) fn clear(&mut self) {
        *self = Self::new();
    }

    fn rest(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    fn advance(&mut self, n: usize) {
        self.pos = self.pos.saturating_add(n).min(self.buf.len());
        self.scanned = self.scanned.max(self.pos);
    }

    /// Offset from `pos` of the first `needle`, remembering how far the search got.
    fn find(&mut self, needle: u8) -> Option<usize> {
        let from = self.scanned.max(self.pos);
        let tail = self.buf.get(from..).unwrap_or(&[]);
        match tail.iter().position(|&b| b == needle) {
            Some(i) => Some(from.saturating_add(i).saturating_sub(self.pos)),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Parses the next request, if complete.
    pub(crate) fn next(&mut self) -> Step {
        match self.state {
            State::Idle => match self.rest().first() {
                None => Step::NeedMore,
                Some(b'*') => self.multibulk_header(),
                Some(_) => self.inline(),
            },
            State::Multibulk { .. } => self.multibulk_args(),
        }
    }

    /// Reads a `\r`-terminated header line (`*n` or `$n`): `Ok(Some((line, consumed)))`
    /// with the line without its first byte, `Ok(None)` when incomplete.
    ///
    /// As in Redis, the line ends at the first CR and the byte after it is skipped
    /// unchecked; a line with no CR within the inline limit is an error.
    fn header_line(&mut self, too_big: ProtocolError) -> Result<Option<(Vec<u8>, usize)>, ProtocolError> {
        let Some(cr) = self.find(b'\r') else {
            if self.unparsed_len() > MAX_INLINE_LEN {
                return Err(too_big);
            }
            return Ok(None);
        };
        // The byte after the CR must have arrived too.
        if cr.saturating_add(2) > self.unparsed_len() {
            return Ok(None);
        }
        let line = self.rest().get(1..cr).unwrap_or(&[]).to_vec();
        Ok(Some((line, cr.saturating_add(2))))
    }

    fn multibulk_header(&mut self) -> Step {
        let (line, consumed) = match self.header_line(ProtocolError::BigMultibulkCount) {
            Ok(Some(l)) => l,
            Ok(None) => return Step::NeedMore,
            Err(e) => return Step::Error(e),
        };
        let count = match parse_i64(&line) {
            None => return Step::Error(ProtocolError::InvalidMultibulkLength),
            Some(n) if n > i64::from(i32::MAX) => return Step::Error(ProtocolError::InvalidMultibulkLength),
            Some(n) => n,
        };
        self.advance(consumed);
        if count <= 0 {
            return Step::Empty;
        }
        let count = match usize::try_from(count) {
            Ok(c) if c <= MAX_ARGS => c,
            _ => return Step::Error(ProtocolError::InvalidMultibulkLength),
        };
        self.argv = Vec::with_capacity(count);
        self.argv_bytes = 0;
        self.state = State::Multibulk { remaining: count, bulk: None };
        self.multibulk_args()
    }

    fn multibulk_args(&mut self) -> Step {
        loop {
            let State::Multibulk { remaining, bulk } = self.state else {
                return Step::NeedMore;
            };
            if remaining == 0 {
                self.state = State::Idle;
                self.argv_bytes = 0;
                return Step::Command(core::mem::take(&mut self.argv));
            }
            let len = match bulk {
                Some(len) => len,
                None => {
                    let (line, consumed) = match self.header_line(ProtocolError::BigBulkCount) {
                        Ok(Some(l)) => l,
                        Ok(None) => return Step::NeedMore,
                        Err(e) => return Step::Error(e),
                    };
                    match self.rest().first() {
                        Some(b'$') => {}
                        Some(&c) => return Step::Error(ProtocolError::ExpectedDollar(c)),
                        None => return Step::NeedMore,
                    }
                    let len = match parse_i64(&line).map(usize::try_from) {
                        Some(Ok(n)) if n <= MAX_BULK_LEN => n,
                        _ => return Step::Error(ProtocolError::InvalidBulkLength),
                    };
                    self.argv_bytes = match self.argv_bytes.checked_add(len) {
                        Some(total) if total <= MAX_REQUEST_ARG_BYTES => total,
                        _ => return Step::Error(ProtocolError::BigRequest),
                    };
                    self.advance(consumed);
                    self.state = State::Multibulk { remaining, bulk: Some(len) };
                    len
                }
            };
            // The data and the two bytes after it, which Redis skips without checking.
            let need = len.saturating_add(2);
            if self.unparsed_len() < need {
                return Step::NeedMore;
            }
            let arg = self.rest().get(..len).unwrap_or(&[]).to_vec();
            self.argv.push(arg);
            self.advance(need);
            self.state = State::Multibulk { remaining: remaining.saturating_sub(1), bulk: None };
        }
    }

    fn inline(&mut self) -> Step {
        let Some(lf) = self.find(b'\n') else {
            if self.unparsed_len() > MAX_INLINE_LEN {
                return Step::Error(ProtocolError::BigInline);
            }
            return Step::NeedMore;
        };
        let rest = self.rest();
        let mut end = lf;
        if lf > 0 && rest.get(lf.saturating_sub(1)) == Some(&b'\r') {
            end = lf.saturating_sub(1);
        }
        let args = split_args(rest.get(..end).unwrap_or(&[]));
        self.advance(lf.saturating_add(1));
        match args {
            Err(e) => Step::Error(e),
            Ok(args) if args.is_empty() => Step::Empty,
            Ok(args) => Step::Command(args),
        }
    }
}

/// C's `isspace` in the "C" locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b.wrapping_sub(b'0')),
        b'a'..=b'f' => Some(b.wrapping_sub(b'a').wrapping_add(10)),
        b'A'..=b'F' => Some(b.wrapping_sub(b'A').wrapping_add(10)),
        _ => None,
    }
}

/// Splits an inline command line as Redis's `sdssplitargs` does: blanks separate arguments;
/// `"..."` understands `\n \r \t \b \a \xHH` and `\<any>`; `'...'` understands `\'`; a
/// closing quote must be followed by a blank or the end. The line ends at its first NUL, as
/// the C string it is in Redis.
pub(crate) fn split_args(line: &[u8]) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let line = crate::reply::c_str_prefix(line, line.len());
    // Reads past the end give 0, the C string's terminator.
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut args: Vec<Vec<u8>> = Vec::new();
    let mut p = 0usize;
    loop {
        while at(p) != 0 && is_space(at(p)) {
            p = p.saturating_add(1);
        }
        if at(p) == 0 {
            return Ok(args);
        }
        if args.len() >= MAX_ARGS {
            return Err(ProtocolError::TooManyInlineArgs);
        }
        let mut current = Vec::new();
        let (mut in_dq, mut in_sq, mut done) = (false, false, false);
        while !done {
            let c = at(p);
            let next = at(p.saturating_add(1));
            if in_dq {
                let hex = (hex_value(at(p.saturating_add(2))), hex_value(at(p.saturating_add(3))));
                if let (b'\\', b'x', (Some(hi), Some(lo))) = (c, next, hex) {
                    current.push(hi.wrapping_mul(16).wrapping_add(lo));
                    p = p.saturating_add(3);
                } else if c == b'\\' && next != 0 {
                    p = p.saturating_add(1);
                    current.push(match next {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if next != 0 && !is_space(next) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    done = true;
                } else if c == 0 {
                    return Err(ProtocolError::UnbalancedQuotes);
                } else {
                    current.push(c);
                }
            } else if in_sq {
                if c == b'\\' && next == b'\'' {
                    p = p.saturating_add(1);
                    current.push(b'\'');
                } else if c == b'\'' {
                    if next != 0 && !is_space(next) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    done = true;
                } else if c == 0 {
                    return Err(ProtocolError::UnbalancedQuotes);
                } else {
                    current.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    _ => current.push(c),
                }
            }
            if at(p) != 0 {
                p = p.saturating_add(1);
            }
        }
        args.push(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn parse_all(input: &[u8]) -> Vec<Step> {
        let mut p = Parser::new();
        p.push(input);
        let mut steps = Vec::new();
        loop {
            match p.next() {
                Step::NeedMore => break,
                s @ Step::Error(_) => {
                    steps.push(s);
                    break;
                }
                s => steps.push(s),
            }
        }
        steps
    }

    fn cmd(args: &[&[u8]]) -> Step {
        Step::Command(args.iter().map(|a| a.to_vec()).collect())
    }

    #[test]
    fn multibulk_and_inline() {
        assert_eq!(
            parse_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n\r\n*0\r\necho  \"a b\"\n"),
            vec![cmd(&[b"GET", b"k"]), cmd(&[b"PING"]), Step::Empty, Step::Empty, cmd(&[b"echo", b"a b"])]
        );
    }

    #[test]
    fn split_args_quotes() {
        assert_eq!(
            split_args(b"set \"a\\x41\\n\" 'it\\'s' x\"y z\""),
            Ok(vec![b"set".to_vec(), b"aA\n".to_vec(), b"it's".to_vec(), b"xy z".to_vec()])
        );
        assert_eq!(split_args(b"\"abc"), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(split_args(b"'abc'd"), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(split_args(b"  "), Ok(vec![]));
        assert_eq!(split_args(b"a\0b"), Ok(vec![b"a".to_vec()]));
    }

    #[test]
    fn header_errors() {
        assert_eq!(parse_all(b"*x\r\n"), vec![Step::Error(ProtocolError::InvalidMultibulkLength)]);
        assert_eq!(parse_all(b"*1\r\n$-1\r\n"), vec![Step::Error(ProtocolError::InvalidBulkLength)]);
        assert_eq!(parse_all(b"*1\r\n:1\r\n"), vec![Step::Error(ProtocolError::ExpectedDollar(b':'))]);
        assert_eq!(parse_all(b"*1025\r\n"), vec![Step::Error(ProtocolError::InvalidMultibulkLength)]);
        assert_eq!(parse_all(b"*-5\r\n"), vec![Step::Empty]);
    }
}
