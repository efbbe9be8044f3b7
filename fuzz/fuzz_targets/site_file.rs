//! Invariant: any text read as a site file gives sites or an error, never a panic; each
//! site it gives then validates or is refused with a reason, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use roost_registry::{parse_site_file, FsChecks};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(specs) = parse_site_file(text) {
        for spec in specs {
            if let Err(e) = spec.validate(FsChecks::Skip) {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
