//! Feeds arbitrary bytes to the logging channel's frame decoder, as a broken
//! or hostile peer could, and checks that it never panics, never returns a
//! frame after an error, and numbers the frames it returns 0, 1, 2 ….
//!
//! The first input byte picks the mode:
//!
//! - even: the rest is a raw byte stream, pushed in pieces of
//!   `mode / 2 + 1` bytes (header parsing, length cap, CRC, MAC, partial
//!   frames). A fuzzer cannot forge the MAC, so few inputs get further.
//! - odd: the next byte is a frame kind and the rest a payload; the target
//!   seals them into a frame with the decoder's key (valid CRC and MAC), so
//!   the payload parsers see arbitrary input. A payload that decodes must
//!   re-encode to the very same frame (the encoding is canonical), except
//!   records, which have several encodings and must re-encode to a frame
//!   that decodes to the same records.
#![no_main]

use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use replication::frame::{FrameDecoder, FrameEncoder, MacKey, Message, MAC_LEN, MAGIC, PROTOCOL_VERSION};
use sha2::Sha256;

const KEY: &[u8] = b"frame decoder fuzz target key, 32+ bytes";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        raw(rest, usize::from(mode / 2) + 1);
    } else if let Some((&kind, payload)) = rest.split_first() {
        sealed(kind, payload);
    }
});

fn raw(data: &[u8], piece: usize) {
    let mut decoder = FrameDecoder::new(MacKey::new(KEY));
    let mut next_seq = 0;
    let mut failed = false;
    for chunk in data.chunks(piece) {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(!failed, "a frame after an error");
                    assert_eq!(frame.seq, next_seq);
                    next_seq += 1;
                }
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
    }
    if decoder.finish().is_ok() {
        assert!(!failed, "a clean end after an error");
    }
}

fn sealed(kind: u8, payload: &[u8]) {
    let Ok(len) = u32::try_from(payload.len()) else { return };
    let mut frame = Vec::with_capacity(payload.len() + 38);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.push(kind);
    frame.push(0);
    frame.extend_from_slice(&0u64.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(payload);
    let crc = crc32c::crc32c(&frame).to_le_bytes();
    frame.extend_from_slice(&crc);
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(KEY).expect("any key length");
    mac.update(&frame);
    let tag = mac.finalize().into_bytes();
    frame.extend_from_slice(&tag[..MAC_LEN]);

    let mut decoder = FrameDecoder::new(MacKey::new(KEY));
    decoder.push(&frame);
    let Ok(Some(decoded)) = decoder.next_frame() else { return };
    assert_eq!(decoded.seq, 0);
    let mut again = BytesMut::new();
    let mut encoder = FrameEncoder::new(MacKey::new(KEY));
    encoder.encode(&decoded.message, &mut again).expect("a decoded message encodes");
    if let Message::Records { .. } = decoded.message {
        // Records have many encodings (a delta or the literal, a varint
        // with padding): what the encoder makes must decode to the same.
        let mut decoder = FrameDecoder::new(MacKey::new(KEY));
        decoder.push(&again);
        let again = decoder.next_frame().expect("a re-encoded frame decodes").expect("one frame");
        assert_eq!(again.message, decoded.message, "records did not round-trip");
    } else {
        assert_eq!(&again[..], &frame[..], "the encoding is not canonical");
    }
}
