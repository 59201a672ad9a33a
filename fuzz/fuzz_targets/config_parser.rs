//! Runtime config parser: TOML, unknown keys and value ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    daain::fuzzing::config_parser(data);
});
