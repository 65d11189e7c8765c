//! The primary's shipper: hands the log tail to the logging channel, in
//! position order whoever calls it (its own thread every
//! [`SHIP_PERIOD`](crate::queues::SHIP_PERIOD), or the vCPU thread at once
//! when an output waits), and reports how far outputs have been released.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use replication::channel::{ChannelError, PrimaryChannel};
use replication::log::LogShared;
use replication::record::{LogPosition, Record};

use crate::primary::{Phase, PrimaryShared, SharedReleaser};
use crate::queues::{SHIP_BACKOFF, SHIP_PERIOD};
use crate::status::Board;

#[derive(Default)]
struct ShipState {
    /// Records the channel refused (backpressure), sent again first.
    backlog: Option<(LogPosition, Vec<Record>)>,
    released: LogPosition,
}

pub(crate) struct Shipper {
    log: Arc<LogShared>,
    chan: Arc<PrimaryChannel>,
    board: Arc<Board>,
    releaser: SharedReleaser,
    shared: Arc<PrimaryShared>,
    state: Mutex<ShipState>,
}

impl Shipper {
    pub(crate) fn new(
        log: Arc<LogShared>,
        chan: Arc<PrimaryChannel>,
        board: Arc<Board>,
        releaser: SharedReleaser,
        shared: Arc<PrimaryShared>,
    ) -> Arc<Shipper> {
        Arc::new(Shipper { log, chan, board, releaser, shared, state: Mutex::new(ShipState::default()) })
    }

    /// Ship what the log holds; `Ok(true)` when the channel refused it for
    /// backpressure (kept, retried on the next call).
    pub(crate) fn ship(&self, flush: bool) -> Result<bool, ChannelError> {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (first, records, asked) = self.log.take();
        if self.shared.phase() == Phase::Alone {
            // Alone since the secondary was lost: the log is dropped.
            return Ok(false);
        }
        let (first, batch) = match st.backlog.take() {
            Some((f, mut old)) => {
                old.extend(records);
                (f, old)
            }
            None => (first, records),
        };
        if !batch.is_empty() {
            match self.chan.send_records(first, &batch) {
                Ok(()) => {
                    let bytes: usize = batch.iter().map(replication::frame::encoded_record_len).sum();
                    self.board.log_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                }
                // The secondary is too far behind: keep the records here
                // (the vCPU never waits) and try again when acks caught up.
                Err(ChannelError::Backpressure { .. }) => {
                    st.backlog = Some((first, batch));
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
        if flush || asked {
            self.chan.flush();
        }
        self.board.outputs_held.store(self.releaser.held() as u64, Ordering::Relaxed);
        self.board.outputs_held_bytes.store(self.releaser.held_bytes() as u64, Ordering::Relaxed);
        // Only positions whose outputs are all out: the secondary forgets
        // what it holds up to there.
        let now_released = self.releaser.released_through();
        if now_released > st.released {
            self.chan.send_released(now_released)?;
            st.released = now_released;
            self.board.released_position.store(now_released.0, Ordering::SeqCst);
        }
        Ok(false)
    }

    /// The shipper thread: ships every [`SHIP_PERIOD`] or when asked, until
    /// the session winds down; then a last flush.
    pub(crate) fn spawn(self: &Arc<Self>) -> std::io::Result<JoinHandle<Result<(), ChannelError>>> {
        let me = self.clone();
        std::thread::Builder::new().name("shipper".into()).spawn(move || loop {
            let running = me.shared.shipping();
            me.log.wait_flush(SHIP_PERIOD);
            if me.ship(false)? {
                std::thread::sleep(SHIP_BACKOFF);
                continue;
            }
            if !running {
                me.chan.flush();
                return Ok(());
            }
        })
    }
}
