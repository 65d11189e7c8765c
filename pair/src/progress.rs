//! Once-a-second replication progress, as debug events (`RUST_LOG=debug`):
//! records/s, bytes/s, replay lag, outputs held, the last output's wait.
//! No thread is started when debug events are off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::log::LogShared;

use crate::primary::SharedReleaser;
use crate::status::Board;

fn every_second(name: &str, mut tick: impl FnMut(f64) + Send + 'static) -> std::io::Result<()> {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return Ok(());
    }
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let mut last = Instant::now();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            tick(last.elapsed().as_secs_f64());
            last = Instant::now();
        }
    })?;
    Ok(())
}

pub(crate) fn primary(board: &Arc<Board>, log: &Arc<LogShared>, releaser: &SharedReleaser) -> std::io::Result<()> {
    let (board, log, releaser) = (board.clone(), log.clone(), releaser.clone());
    let mut last = (0u64, 0u64);
    every_second("progress", move |secs| {
        let (pos, bytes) = (log.appended().0, board.log_bytes.load(Ordering::Relaxed));
        let acked = log.acked().map_or(0, |a| a.0);
        tracing::debug!(
            role = "primary",
            records_per_s = (pos.saturating_sub(last.0) as f64 / secs) as u64,
            bytes_per_s = (bytes.saturating_sub(last.1) as f64 / secs) as u64,
            log_position = pos,
            acked,
            replay_lag = pos.saturating_sub(acked),
            outputs_held = releaser.held(),
            ack_wait_us = releaser.last_wait_us(),
            "replication progress"
        );
        last = (pos, bytes);
    })
}

pub(crate) fn secondary(board: &Arc<Board>, consumed: &Arc<AtomicU64>) -> std::io::Result<()> {
    let (board, consumed) = (board.clone(), consumed.clone());
    let mut last = 0u64;
    every_second("progress", move |secs| {
        let done = consumed.load(Ordering::Relaxed);
        let received = board.received.load(Ordering::Relaxed);
        tracing::debug!(
            role = "secondary",
            records_per_s = (done.saturating_sub(last) as f64 / secs) as u64,
            received,
            replayed = done,
            replay_lag = received.saturating_sub(done),
            outputs_held = board.outputs_held.load(Ordering::Relaxed),
            "replication progress"
        );
        last = done;
    })
}
