//! Lockstep replication: log records, recorder, replayer, output rule,
//! logging channel, checkpoints and go-live. Filled in by the "Lockstep
//! replication" issue; the seams it plugs into are `vmm::hook`.
#![forbid(unsafe_code)]
