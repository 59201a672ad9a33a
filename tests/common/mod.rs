//! Helpers shared by the test files that run the shipped bundle on frames of the shipped
//! clip.
//!
//! `DAAIN_TEST_FRAMES` caps the number of frames such a test scores. Under emulation one
//! ESPNet frame takes 10 to 50 s, so `targets/cross-test.sh` sets the cap to 2. Natively
//! the tests use their full counts.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use daain::bundle::Bundle;
use daain::pipeline::Detector;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

/// The training clip of the shipped bundle.
pub const CLIP: &str = "data/footage/solidWhiteRight.mp4";

/// Environment variable that caps the frames a test scores.
pub const FRAME_LIMIT_VAR: &str = "DAAIN_TEST_FRAMES";

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Returns `count`, or the cap from `DAAIN_TEST_FRAMES` when that is smaller.
///
/// Panics when the variable is set to something other than a positive whole number.
pub fn frame_limit(count: usize) -> usize {
    match std::env::var(FRAME_LIMIT_VAR) {
        Err(_) => count,
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(limit) if limit > 0 => count.min(limit),
            _ => panic!("{FRAME_LIMIT_VAR}={text:?} is invalid: set it to a number of frames, 1 or more, or unset it"),
        },
    }
}

/// Returns `count` items of `items`, evenly spaced from the first, or all of them.
pub fn evenly_spaced<T: Copy>(items: &[T], count: usize) -> Vec<T> {
    if count >= items.len() {
        return items.to_vec();
    }
    (0..count).map(|i| items[i * items.len() / count]).collect()
}

/// Frame indices of the clip that the bundle's training left out as test frames.
pub fn held_out_indices(bundle: &Bundle) -> Vec<u64> {
    let frames = &bundle.manifest().training["test_frames"];
    serde_json::from_value(frames.clone()).expect("manifest lists training.test_frames")
}

/// Decodes the frames of the clip with the given indices, in clip order.
pub fn read_clip_frames(indices: &[u64]) -> Vec<Frame> {
    let spec = SourceSpec::Video(repo_path(CLIP));
    let mut source = open_source(&spec, &SourceOptions::default()).unwrap();
    let mut frames = Vec::new();
    let mut frame = Frame::new();
    // Decoding stops at the last requested frame: under emulation every frame counts.
    while frames.len() < indices.len() && source.next_frame(&mut frame).unwrap() {
        if indices.contains(&frame.index) {
            frames.push(frame.clone());
        }
    }
    assert_eq!(
        frames.len(),
        indices.len(),
        "not every requested frame of {CLIP} was decoded"
    );
    frames
}

/// Returns the frame mirrored top to bottom.
pub fn vertical_flip(frame: &Frame) -> Frame {
    let mut out = frame.clone();
    let stride = frame.width * 3;
    for y in 0..frame.height {
        let target = (frame.height - 1 - y) * stride;
        out.data[target..target + stride]
            .copy_from_slice(&frame.data[y * stride..(y + 1) * stride]);
    }
    out
}

/// Returns the frame blended halfway towards light grey, a dense uniform fog.
pub fn fog(frame: &Frame) -> Frame {
    let mut out = frame.clone();
    for value in out.data.iter_mut() {
        *value = ((*value as f32) * 0.5 + 220.0 * 0.5).round() as u8;
    }
    out
}

/// Copies the shipped bundle into a temporary directory.
pub fn copy_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_path("models/default")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Returns a command that starts the `daain` binary, through the runner in
/// `DAAIN_TEST_RUNNER` when one is set. The qemu runner sets it for cross-built tests,
/// because an emulated process cannot execute a binary of its own architecture itself.
pub fn daain_command() -> Command {
    match std::env::var_os("DAAIN_TEST_RUNNER") {
        Some(runner) => {
            let mut command = Command::new(runner);
            command.arg(env!("CARGO_BIN_EXE_daain"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_daain")),
    }
}

/// Returns a watchdog period for tests of stalls: four times the time the detector takes
/// for a frame after warm-up, and at least 1.5 s. Natively that is 1.5 s; under emulation,
/// where a frame takes 10 to 50 s, a fixed period would fire between every two frames.
pub fn watchdog_for(detector: &mut Detector<'_>) -> Duration {
    let frame = read_clip_frames(&[0])
        .pop()
        .expect("frame 0 of the clip decodes");
    detector.score_frame(&frame, false).unwrap();
    let start = Instant::now();
    detector.score_frame(&frame, false).unwrap();
    (start.elapsed() * 4).max(Duration::from_millis(1500))
}
