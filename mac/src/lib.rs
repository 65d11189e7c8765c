//! The MAC primitives of a pair, in one place: the logging channel
//! (`replication`) and the heartbeats (`heartbeat`) both derive their keys
//! from the pair's shared key with HMAC-SHA256, and both refuse a shared key
//! shorter than [`MIN_KEY_LEN`].
#![forbid(unsafe_code)]

pub use hmac::{Hmac, KeyInit, Mac};
pub use sha2::Sha256;

/// The shortest shared key accepted: 32 bytes, 256 bits when random.
pub const MIN_KEY_LEN: usize = 32;

/// HMAC-SHA256 keyed with `key`.
pub fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        // HMAC hashes keys longer than a block and pads shorter ones: every
        // length is valid, and `new_from_slice` is infallible for it.
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    }
}

/// HMAC-SHA256(key, parts concatenated), all 32 bytes.
pub fn hmac_sha256_of(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac_sha256(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let tag = hmac_sha256_of(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
