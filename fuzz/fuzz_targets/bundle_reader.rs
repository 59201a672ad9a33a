//! Bundle reader: manifest, hash checks, safetensors headers and weights of the mask,
//! flow and score files. The input layout is described at `daain::fuzzing::BundleInput`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    daain::fuzzing::bundle_reader(data);
});
