//! One client connection: its parse buffer, its client state, and the feed loop.

use alloc::vec::Vec;

use crate::command::{self, Client, Ctx};
use crate::limits::{MAX_BUFFERED_INPUT, OUTPUT_HIGH_WATER};
use crate::parse::{Parser, ProtocolError, Step};
use crate::store::Store;

/// What the caller does with the connection after [`Conn::feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnStatus {
    /// Keep the connection; send what was appended to `out`.
    Open,
    /// Send what was appended to `out` (the `+OK` of QUIT, or a protocol error), then close
    /// the connection. Further feeds do nothing and return `Close` again.
    Close,
    /// SHUTDOWN: close the connection and power the server off.
    Shutdown,
}

/// One client connection's protocol state: the bytes received but not yet parsed, the
/// request being read, and the client's id and name.
#[derive(Debug)]
pub struct Conn {
    parser: Parser,
    client: Client,
    closed: bool,
    /// Requests are buffered but were not executed because the output buffer was full.
    pending: bool,
}

impl Default for Conn {
    fn default() -> Self {
        Self::new()
    }
}

impl Conn {
    /// A new connection, before any byte has arrived.
    pub fn new() -> Self {
        Self { parser: Parser::new(), client: Client::default(), closed: false, pending: false }
    }

    /// Consumes `input` (any fragment of the byte stream: part of a request, many requests)
    /// and appends to `out` the reply to every request completed so far, in order.
    ///
    /// `input` is copied into the connection's buffer, so pass what one socket read gave
    /// (the receive buffer bounds it), not an unbounded backlog.
    ///
    /// `now_ns` is the guest clock, used for key deadlines; the engine reads no clock itself.
    /// `out` should be the connection's buffer of output not yet sent: while it holds
    /// [`crate::limits::OUTPUT_HIGH_WATER`] bytes or more, complete requests stay buffered
    /// unexecuted and [`Conn::has_pending_input`] is true. The caller then stops reading from
    /// the socket (TCP flow control makes the client wait), drains `out`, and calls `feed`
    /// again with no new input. A caller that keeps feeding instead gets the connection
    /// closed once [`crate::limits::MAX_BUFFERED_INPUT`] bytes are buffered.
    pub fn feed(&mut self, input: &[u8], store: &mut Store, now_ns: u64, out: &mut Vec<u8>) -> ConnStatus {
        if self.closed {
            return ConnStatus::Close;
        }
        // On the first byte, not the first call: how the stream is split must not matter.
        if self.client.id == 0 && !input.is_empty() {
            self.client.id = store.next_client_id();
        }
        self.parser.push(input);
        self.pending = false;
        loop {
            if out.len() >= OUTPUT_HIGH_WATER {
                self.pending = self.parser.unparsed_len() > 0;
                break;
            }
            match self.parser.next() {
                Step::NeedMore => break,
                Step::Empty => {}
                Step::Command(argv) => {
                    let mut ctx = Ctx { store, now: now_ns, out, client: &mut self.client };
                    command::execute(&argv, &mut ctx);
                    if self.client.shutdown {
                        self.close();
                        return ConnStatus::Shutdown;
                    }
                    if self.client.close_after_reply {
                        return self.close();
                    }
                }
                Step::Error(e) => {
                    e.write_reply(out);
                    return self.close();
                }
            }
        }
        self.parser.compact();
        if self.parser.unparsed_len() > MAX_BUFFERED_INPUT {
            ProtocolError::QueryBufferFull.write_reply(out);
            return self.close();
        }
        ConnStatus::Open
    }

    /// True when complete requests wait unexecuted because the output buffer reached
    /// [`crate::limits::OUTPUT_HIGH_WATER`]: drain the output and call [`Conn::feed`] again.
    pub fn has_pending_input(&self) -> bool {
        self.pending
    }

    /// Bytes this connection holds: unparsed input plus the arguments of a partly read
    /// request.
    pub fn buffered_bytes(&self) -> usize {
        self.parser.buffered_len()
    }

    /// Whether the connection has returned [`ConnStatus::Close`].
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn close(&mut self) -> ConnStatus {
        self.closed = true;
        self.pending = false;
        self.parser.clear();
        ConnStatus::Close
    }
}
