//! Invariant: a worker's response head parses or is refused, never panics; what parses
//! has a status from 200 to 599, header names and values that `http` accepts, and
//! Content-Length values that are plain decimal numbers, all the same, and the length
//! it reports is theirs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_wire::ResponseHead;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = ResponseHead::parse(data) {
        assert!((200..=599).contains(&head.status));
        let mut length = None;
        for (name, value) in &head.headers {
            if name.eq_ignore_ascii_case(b"content-length") {
                let n: u64 = std::str::from_utf8(value).unwrap().parse().unwrap();
                assert!(value.iter().all(u8::is_ascii_digit));
                assert!(length.is_none_or(|l| l == n));
                length = Some(n);
            }
            assert!(!name.is_empty());
            assert!(!value.iter().any(|b| *b == b'\r' || *b == b'\n' || *b == 0));
        }
        assert_eq!(head.content_length, length);
    }
});
