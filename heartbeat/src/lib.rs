//! UDP heartbeats, the failure detector and the split-brain arbiter.
//! Filled in by the "Failover" issue.
#![forbid(unsafe_code)]
