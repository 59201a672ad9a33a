//! Inputs shared by the benchmarks: the shipped bundle and a real frame of the shipped
//! clip.

use std::path::Path;

use daain::bundle::Bundle;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

/// Decodes the first frame of `data/footage/solidWhiteRight.mp4`.
pub fn first_frame() -> Frame {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/footage/solidWhiteRight.mp4");
    let mut source = open_source(&SourceSpec::Video(path), &SourceOptions::default()).unwrap();
    let mut frame = Frame::new();
    assert!(source.next_frame(&mut frame).unwrap());
    frame
}

/// Opens the default bundle in `models/default`.
pub fn open_bundle() -> Bundle {
    // As the daain binary does; without it the time per run depends on glibc's state.
    daain::heap::tune_allocator();
    Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default")).unwrap()
}
