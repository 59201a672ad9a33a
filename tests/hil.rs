//! The hardware-in-the-loop benchmark: the looping replay on a real recording, and a short
//! soak of `daain bench-hil` on the shipped clip with the real model.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use daain::hil::{LoopingReplay, OpenClip};
use daain::source::{Frame, FrameSource, RawFrames};

use common::{daain_command, repo_path};

fn recording_opener(path: PathBuf) -> OpenClip {
    Box::new(move || Ok(Box::new(RawFrames::open_yuyv(&path, 320, 180, 30.0)?)))
}

#[test]
fn replay_loops_with_camera_timestamps() {
    let opener = recording_opener(repo_path("tests/data/sources/yuyv422_320x180_3frames.raw"));
    let mut replay = LoopingReplay::open(opener, 10.0).unwrap();
    let mut frame = Frame::new();
    for expected in 0..8u64 {
        assert!(replay.next_frame(&mut frame).unwrap());
        assert_eq!(frame.index, expected);
        assert_eq!(frame.timestamp, Duration::from_millis(100 * expected));
        assert_eq!((frame.width, frame.height), (320, 180));
    }
    // Three frames per pass: frames 6 and 7 come from the third pass.
    assert_eq!(replay.passes(), 3);
    assert_eq!(replay.nominal_frame_rate(), Some(10.0));
}

#[test]
fn replay_of_empty_clip_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.yuyv");
    std::fs::write(&path, b"").unwrap();
    let mut replay = LoopingReplay::open(recording_opener(path), 10.0).unwrap();
    assert!(!replay.next_frame(&mut Frame::new()).unwrap());
}

#[test]
fn replay_rejects_invalid_rate() {
    let opener = recording_opener(repo_path("tests/data/sources/yuyv422_320x180_3frames.raw"));
    let error = LoopingReplay::open(opener, 0.0)
        .err()
        .expect("rate 0 is rejected");
    assert!(error.to_string().contains("frame rate 0"), "{error}");
}

/// A short soak: 6 s of camera time at 5 fps on the real model. Checks that the report
/// accounts for every frame and that both report files are written.
#[test]
fn bench_hil_short_soak() {
    let dir = tempfile::tempdir().unwrap();
    let report_dir = dir.path().join("report");
    let output = daain_command()
        .args([
            "bench-hil",
            "--video",
            "data/footage/solidWhiteRight.mp4",
            "--seconds",
            "6",
            "--fps",
            "5",
            "--report",
            report_dir.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("daain runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("p99"), "{stderr}");

    let text = std::fs::read_to_string(report_dir.join("report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let summary = &report["summary"];
    let decoded = summary["decoded"].as_u64().unwrap();
    let scored = summary["scored"].as_u64().unwrap();
    let dropped = summary["dropped"].as_u64().unwrap();
    assert_eq!(decoded, 30, "6 s at 5 fps: {text}");
    assert_eq!(scored + dropped, decoded, "{text}");
    assert!(scored > 0, "{text}");
    assert_eq!(summary["source_errors"].as_u64(), Some(0), "{text}");
    assert_eq!(report["frame_rate"].as_f64(), Some(5.0));
    assert_eq!(
        report["detector"].as_str(),
        Some("f32 backbone, 1 thread(s), out-of-plan"),
        "{text}"
    );
    // Camera pacing: 30 frames at 5 fps take about 6 s.
    let elapsed = report["elapsed_s"].as_f64().unwrap();
    assert!(elapsed >= 5.5, "paced run took only {elapsed} s");

    let stages = &report["stages"];
    for stage in [
        "queue",
        "preprocess",
        "backbone",
        "sampling",
        "flow",
        "score",
        "latency",
    ] {
        let stats = &stages[stage];
        assert_eq!(stats["samples"].as_u64(), Some(scored), "{stage}: {text}");
        let p50 = stats["p50_ms"].as_f64().unwrap();
        let p99 = stats["p99_ms"].as_f64().unwrap();
        let max = stats["max_ms"].as_f64().unwrap();
        assert!(p50 <= p99, "{stage}: {stats}");
        assert!(p99 <= max, "{stage}: {stats}");
    }
    assert!(stages["backbone"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert!(
        report["peak_rss_bytes"].as_u64().unwrap() > 10 << 20,
        "{text}"
    );

    let image = image::open(report_dir.join("latency.png")).unwrap();
    assert_eq!((image.width(), image.height()), (960, 540));
}

#[test]
fn bench_hil_rejects_bad_length() {
    let output = daain_command()
        .args([
            "bench-hil",
            "--video",
            "data/footage/solidWhiteRight.mp4",
            "--seconds",
            "0",
            "--report",
            "/tmp/unused",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("daain runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--seconds 0"), "{stderr}");
}
