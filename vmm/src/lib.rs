//! ftvm's virtual machine: KVM memory and vCPU, the exit loop, the buses and
//! devices, and the state each of them saves. Knows nothing of replication:
//! the recorder and the replayer plug into [`hook`].

pub mod bus;
pub mod devices;
pub mod hook;
pub mod memory;
pub mod state;
