//! Invariant: any Host header or host pattern parses or is refused, never panics; a
//! normalised host is lower-case, has no port and normalises to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_registry::{normalize_request_host, HostPattern};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(host) = normalize_request_host(text) {
        assert_eq!(host, host.to_ascii_lowercase());
        assert_eq!(normalize_request_host(&host).as_deref(), Ok(host.as_str()));
    }
    if let Ok(pattern) = HostPattern::parse(text) {
        assert_eq!(HostPattern::parse(&pattern.to_string()), Ok(pattern));
    }
});
