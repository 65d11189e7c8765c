//! The primary's shipper: hands the log tail to the logging channel, in
//! position order whoever calls it (its own thread every
//! [`SHIP_PERIOD`](crate::queues::SHIP_PERIOD), or the vCPU thread at once
//! when an output waits), and reports how far outputs have been released.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use replication::channel::{ChannelError, PrimaryChannel};
use replication::log::LogShared;
use replication::record::{LogPosition, Record};
use replication::suppressed::RELEASE_REPORT_DELAY;

use crate::primary::{Phase, PrimaryShared, SharedReleaser};
use crate::queues::{SHIP_BACKOFF, SHIP_PERIOD};
use crate::status::Board;

#[derive(Default)]
struct ShipState {
    /// Records the channel refused (backpressure), sent again first.
    backlog: Option<(LogPosition, Vec<Record>)>,
    /// Released-through positions and when they were reached, not yet
    /// reported: a position is reported once this primary has lived
    /// [`RELEASE_REPORT_DELAY`] past it (replication::suppressed explains).
    unreported: VecDeque<(Instant, LogPosition)>,
    /// The last position reported released.
    reported: LogPosition,
}

pub(crate) struct Shipper {
    log: Arc<LogShared>,
    chan: Mutex<Option<Arc<PrimaryChannel>>>,
    board: Arc<Board>,
    releaser: SharedReleaser,
    shared: Arc<PrimaryShared>,
    state: Mutex<ShipState>,
}

impl Shipper {
    pub(crate) fn new(
        log: Arc<LogShared>,
        chan: Option<Arc<PrimaryChannel>>,
        board: Arc<Board>,
        releaser: SharedReleaser,
        shared: Arc<PrimaryShared>,
    ) -> Arc<Shipper> {
        Arc::new(Shipper {
            log,
            chan: Mutex::new(chan),
            board,
            releaser,
            shared,
            state: Mutex::new(ShipState::default()),
        })
    }

    fn chan(&self) -> Option<Arc<PrimaryChannel>> {
        self.chan.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Paired again (repair): ship to `chan` from now on, the records kept
    /// since the transfer's checkpoint first, and switch to protected.
    /// Under the shipping lock, so no batch goes to the old channel after.
    pub(crate) fn rejoin(&self, chan: Arc<PrimaryChannel>) {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *self.chan.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(chan);
        st.unreported.clear();
        st.reported = LogPosition::NONE;
        self.shared.set_phase(Phase::Protected);
        self.shared.keep_after(None);
    }

    /// Ship what the log holds; `Ok(true)` when the channel refused it for
    /// backpressure (kept, retried on the next call).
    pub(crate) fn ship(&self, flush: bool) -> Result<bool, ChannelError> {
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (first, records, asked) = self.log.take();
        if self.shared.phase() == Phase::Alone {
            // Alone since the secondary was lost: the log is dropped, but
            // for what follows a repair transfer's checkpoint, which the new
            // secondary replays from.
            match self.shared.kept_after() {
                Some(mark) => {
                    // What the old channel refused before the loss lies
                    // before the mark (the new secondary's state covers it):
                    // only what follows the mark is kept, in order.
                    let (at, mut kept) = st.backlog.take().unwrap_or((first, Vec::new()));
                    kept.extend(records);
                    let skip = mark.saturating_add(1).saturating_sub(at.0).min(kept.len() as u64) as usize;
                    kept.drain(..skip);
                    if !kept.is_empty() {
                        st.backlog = Some((LogPosition(at.0 + skip as u64), kept));
                    }
                }
                None => st.backlog = None,
            }
            return Ok(false);
        }
        let (first, batch) = match st.backlog.take() {
            Some((f, mut old)) => {
                old.extend(records);
                (f, old)
            }
            None => (first, records),
        };
        let Some(chan) = self.chan() else {
            // Never paired yet (a copy that went live): nothing to ship to.
            return Ok(false);
        };
        if !batch.is_empty() {
            match chan.send_records(first, &batch) {
                Ok(()) => {
                    let upto = first.0.saturating_add(u64::try_from(batch.len()).unwrap_or(u64::MAX)).saturating_sub(1);
                    self.board.ack_rtt.sent(upto, Instant::now());
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
            chan.flush();
        }
        let (payload, wire) = chan.log_bytes();
        self.board.log_bytes.store(payload, Ordering::Relaxed);
        self.board.log_wire_bytes.store(wire, Ordering::Relaxed);
        self.board.outputs_held.store(self.releaser.held() as u64, Ordering::Relaxed);
        self.board.outputs_held_bytes.store(self.releaser.held_bytes() as u64, Ordering::Relaxed);
        self.report_released(&mut st, &chan)
    }

    /// Tell the secondary how far outputs are out (it forgets what it holds
    /// up to there), for positions released at least
    /// [`RELEASE_REPORT_DELAY`] ago: the report proves this host outlived
    /// its outputs' way out.
    fn report_released(&self, st: &mut ShipState, chan: &PrimaryChannel) -> Result<bool, ChannelError> {
        let now = Instant::now();
        // Only positions whose outputs are all out.
        let released = self.releaser.released_through();
        if st.unreported.back().map_or(st.reported, |&(_, p)| p) < released {
            st.unreported.push_back((now, released));
            self.board.released_position.store(released.0, Ordering::SeqCst);
        }
        let mut due = None;
        while st.unreported.front().is_some_and(|&(t, _)| now.saturating_duration_since(t) >= RELEASE_REPORT_DELAY) {
            due = st.unreported.pop_front().map(|(_, p)| p);
        }
        if let Some(p) = due {
            chan.send_released(p)?;
            st.reported = p;
        }
        Ok(false)
    }

    /// The shipper thread: ships every [`SHIP_PERIOD`] or when asked, until
    /// the session winds down; then a last flush.
    pub(crate) fn spawn(self: &Arc<Self>) -> std::io::Result<JoinHandle<Result<(), ChannelError>>> {
        let me = self.clone();
        std::thread::Builder::new().name("shipper".into()).spawn(move || {
            // The channel's first failure, returned at the end. The thread
            // goes on after it: a copy that then runs alone still takes the
            // log (dropped, or kept past a repair's mark), and a repair
            // ships on the new channel through it.
            let mut failed = None;
            loop {
                let running = me.shared.shipping();
                me.log.wait_flush(SHIP_PERIOD);
                match me.ship(false) {
                    Ok(true) => {
                        std::thread::sleep(SHIP_BACKOFF);
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        if failed.is_none() {
                            tracing::debug!(error = %e, "shipping the log failed");
                            failed = Some(e);
                        }
                        std::thread::sleep(SHIP_BACKOFF);
                    }
                }
                if !running {
                    if let Some(chan) = me.chan() {
                        chan.flush();
                    }
                    return failed.map_or(Ok(()), Err);
                }
            }
        })
    }
}
