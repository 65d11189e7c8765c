//! The devices, one type per file. Each sits on a bus range and sees only
//! offsets; each takes inputs and emits outputs only through the
//! [`ExitCtx`](crate::hook::ExitCtx) of the exit it is handling; each saves
//! and restores its state as a plain versioned struct
//! ([`Persist`](crate::state::Persist)), from which the bus gets its
//! snapshot ([`Snapshot`](crate::state::Snapshot)) with no code of its own.
//! The errors they report to the bus live in [`error`], which depends on no
//! device, so `bus` and the devices do not depend on each other.

pub mod clock;
pub mod entropy;
pub mod error;
pub mod halt;
pub mod health;
pub mod power;
pub mod pvpanic;
pub mod serial;
pub mod testdev;
pub mod timer;
pub mod virtio_mmio;
pub mod virtio_net;

#[cfg(test)]
pub(crate) mod testing;

pub use error::DeviceError;

/// Read `data.len()` (1, 2 or 4) little-endian bytes of `value`, as a
/// 32-bit register read: narrower reads return the low bytes.
pub(crate) fn read_u32_reg(value: u32, data: &mut [u8]) {
    // zip stops at the shorter side: bytes past the fourth are left as given.
    for (dst, src) in data.iter_mut().zip(value.to_le_bytes()) {
        *dst = src;
    }
}

/// The low 32 bits of `value` (the register half a 32-bit read of a 64-bit
/// value returns first).
pub(crate) fn low_half(value: u64) -> u32 {
    let [a, b, c, d, ..] = value.to_le_bytes();
    u32::from_le_bytes([a, b, c, d])
}

/// The value of a register write of 1, 2 or 4 bytes, zero-extended. `None`
/// for any other width.
pub(crate) fn write_u32_reg(data: &[u8]) -> Option<u32> {
    match *data {
        [a] => Some(u32::from(a)),
        [a, b] => Some(u32::from(u16::from_le_bytes([a, b]))),
        [a, b, c, d] => Some(u32::from_le_bytes([a, b, c, d])),
        _ => None,
    }
}
