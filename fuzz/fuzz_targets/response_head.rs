//! Invariant: a worker's response head parses or is refused, never panics; what parses
//! has a status from 100 to 599 and header names and values that `http` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_wire::ResponseHead;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = ResponseHead::parse(data) {
        assert!((100..=599).contains(&head.status));
        for (name, value) in head.headers {
            assert!(!name.is_empty());
            assert!(!value.iter().any(|b| *b == b'\r' || *b == b'\n' || *b == 0));
        }
    }
});
