//! ftvm's virtual machine: KVM memory and vCPU, the exit loop, the buses and
//! devices, and the state each of them saves. Knows nothing of replication:
//! the recorder and the replayer plug into [`hook`].
//!
//! The guest is untrusted, and so is a peer's checkpoint: outside tests the
//! whole crate denies indexing, `unwrap`/`expect`, arithmetic that can
//! overflow and truncating casts (as `replication`'s frame decoder and
//! `heartbeat` do), so nothing a guest or peer sends can panic the VMM.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used, clippy::arithmetic_side_effects)
)]
#![deny(clippy::cast_possible_truncation)]

pub mod boot;
pub mod bus;
pub mod checkpoint;
pub mod cpuid;
pub mod devices;
pub mod digest;
pub mod dirty;
pub mod hook;
pub mod memory;
pub mod state;
pub mod tap;
pub mod testing;
pub mod vcpu;
pub mod vm;
pub mod world;

pub use vm::{BootSettings, Vm, VmConfig, VmError};
