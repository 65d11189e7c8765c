//! Lockstep replication: log records, recorder, replayer, output rule,
//! logging channel. `vmm` knows nothing of this crate: the recorder and the
//! replayer are its input sources, the output gate and the suppressor its
//! output sinks.
#![forbid(unsafe_code)]

pub mod log;
pub mod output_rule;
pub mod record;
pub mod recorder;
pub mod replayer;
pub mod suppressed;
