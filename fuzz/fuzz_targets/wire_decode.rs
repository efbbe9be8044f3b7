//! Invariant: any bytes from a worker decode to frames, "need more" or an error, never
//! a panic; what decodes re-encodes to exactly the bytes it consumed; and a refused
//! length never makes the decoder reserve memory for it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use roost_wire::{decode_from_worker, encode, MAX_BODY_CHUNK};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match decode_from_worker(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = before.len() - buf.len();
                let mut again = BytesMut::new();
                encode(&mut again, &frame);
                assert_eq!(&again[..], &before[..consumed]);
            }
            Ok(None) => {
                assert!(buf.capacity() <= data.len() + MAX_BODY_CHUNK + 16);
                break;
            }
            Err(_) => break,
        }
    }
});
