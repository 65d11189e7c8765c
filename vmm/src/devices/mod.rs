//! The devices, one type per file. Each sits on a bus range and sees only
//! offsets; each takes inputs and emits outputs only through the
//! [`ExitCtx`](crate::hook::ExitCtx) of the exit it is handling; each saves
//! and restores its state as a plain versioned struct
//! ([`Persist`](crate::state::Persist)).

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
    let bytes = value.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&bytes[..n]);
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
