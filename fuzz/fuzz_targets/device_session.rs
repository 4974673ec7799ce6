#![no_main]
//! cargo-fuzz target `device_session`: see `fuzz/README.md` and `fuzz/common/checks.rs` for what it asserts.

use libfuzzer_sys::fuzz_target;

// The checks are shared with the stable replay test (devices/serial-proto/tests/fuzz_corpus.rs);
// each target uses one of them, so the others are dead code here.
#[allow(dead_code)]
mod checks {
    include!("../common/checks.rs");
}

fuzz_target!(|data: &[u8]| {
    checks::device_session(data);
});
