//! ftvm's virtual machine: KVM memory and vCPU, the exit loop, the buses and
//! devices, and the state each of them saves. Knows nothing of replication:
//! the recorder and the replayer plug into [`hook`].

pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod devices;
pub mod digest;
pub mod hook;
pub mod memory;
pub mod state;
pub mod tap;
pub mod testing;
pub mod vcpu;
pub mod vm;
pub mod world;

pub use vm::{BootSettings, Vm, VmConfig, VmError};
