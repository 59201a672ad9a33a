//! The `daain` command line on real footage and on bad input.

mod common;

use std::process::{Command, Output};

use common::{daain_command, repo_path};

fn daain(args: &[&str]) -> Output {
    daain_command()
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("daain binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn json_output_has_one_object_per_frame() {
    let dir = tempfile::tempdir().unwrap();
    let segmentation = dir.path().join("seg");
    let output = daain(&[
        "run",
        "--video",
        "data/footage/solidWhiteRight.mp4",
        "--json",
        "--max-frames",
        "3",
        "--segmentation-out",
        segmentation.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["frame"], i as u64);
        assert!(value["score"].is_f64(), "{line}");
        assert!(value["threshold"].is_f64(), "{line}");
        assert!(value["anomalous"].is_boolean(), "{line}");
    }

    for i in 0..3 {
        let path = segmentation.join(format!("{i:06}.png"));
        let image = image::open(&path).unwrap().to_luma8();
        assert_eq!(image.dimensions(), (512, 256));
        assert!(
            image.pixels().all(|p| p.0[0] < 20),
            "class index out of range in {}",
            path.display()
        );
        // A highway frame: road (class 0) covers a good part of the image.
        let road = image.pixels().filter(|p| p.0[0] == 0).count();
        assert!(
            road > 512 * 256 / 10,
            "only {road} road pixels in {}",
            path.display()
        );
    }
}

#[test]
fn missing_video_is_named() {
    let output = daain(&["run", "--video", "data/footage/no-such-clip.mp4"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no-such-clip.mp4"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn corrupt_video_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.mp4");
    let bytes: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    let output = daain(&["run", "--video", path.to_str().unwrap(), "--json"]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("noise.mp4"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[detector]\nthreshhold = 3.0\n").unwrap();
    let output = daain(&[
        "run",
        "--video",
        "data/footage/solidWhiteRight.mp4",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("threshhold"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn bundle_from_other_model_is_rejected() {
    // The default bundle with its backbone replaced by a copy whose bytes differ.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_path("models/default")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let onnx = dir.path().join("backbone.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&onnx, bytes).unwrap();
    let output = daain(&[
        "run",
        "--video",
        "data/footage/solidWhiteRight.mp4",
        "--bundle",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("backbone.onnx"), "{message}");
    assert!(message.contains("SHA-256"), "{message}");
}

#[test]
fn threshold_override_applies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("low.toml");
    std::fs::write(&path, "[detector]\nthreshold = -1e300\n").unwrap();
    let output = daain(&[
        "run",
        "--video",
        "data/footage/solidWhiteRight.mp4",
        "--config",
        path.to_str().unwrap(),
        "--json",
        "--max-frames",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value =
        serde_json::from_str(String::from_utf8(output.stdout).unwrap().trim()).unwrap();
    assert_eq!(value["threshold"], -1e300);
    assert_eq!(value["anomalous"], true);
}

#[test]
fn unknown_overload_policy_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[pipeline]\noverload = \"skip\"\n").unwrap();
    let output = daain(&[
        "run",
        "--video",
        "data/footage/solidWhiteRight.mp4",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("skip"), "{message}");
    assert!(message.contains("drop-oldest"), "{message}");
}

#[test]
fn summary_counts_every_frame() {
    let output = daain(&[
        "run",
        "--video",
        "data/footage/solidWhiteRight.mp4",
        "--json",
        "--max-frames",
        "5",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let message = stderr(&output);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert!(
        message.contains("summary: decoded=5 scored=5 dropped=0"),
        "{message}"
    );
}

#[test]
fn sigterm_stops_realtime_run_cleanly() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;

    // 1000 links to one still, replayed at the still interval (100 ms): a run of 100 s,
    // far longer than the test waits for its first frame, even under emulation, where one
    // frame takes 10 to 50 s.
    const STILLS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let still = repo_path("data/footage/solidWhiteCurve.jpg");
    for i in 0..STILLS {
        std::os::unix::fs::symlink(&still, dir.path().join(format!("{i:04}.jpg"))).unwrap();
    }
    let mut child = daain_command()
        .args(["run", "--images"])
        .arg(dir.path())
        .args(["--realtime", "--json"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daain binary runs");
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr_pipe.read_to_string(&mut text).unwrap();
        text
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap());

    // The signal comes after the first scored frame, mid-run.
    let mut lines = Vec::new();
    let mut line = String::new();
    assert!(stdout.read_line(&mut line).unwrap() > 0, "stdout ended early");
    lines.push(line.trim_end().to_owned());
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    for rest in stdout.lines() {
        lines.push(rest.unwrap());
    }
    let exit = child.wait().unwrap();
    let message = stderr_reader.join().unwrap();
    assert!(exit.success(), "exit {exit:?}: {message}");

    assert!(
        lines.len() < STILLS,
        "the run was not stopped: {} frames",
        lines.len()
    );
    let mut previous = None;
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("incomplete JSON line {line:?}: {e}"));
        let frame = value["frame"].as_u64().expect("frame is a number");
        assert!(
            previous.is_none_or(|p| p < frame),
            "frame {frame} after {previous:?}"
        );
        previous = Some(frame);
    }
    assert!(message.contains("stopped=true"), "{message}");
    assert!(
        message.contains(&format!("scored={} ", lines.len())),
        "summary disagrees with {} JSON lines: {message}",
        lines.len()
    );
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn damaged_still_is_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_path("data/footage/solidWhiteCurve.jpg"),
        dir.path().join("a.jpg"),
    )
    .unwrap();
    // A JPEG cut off after its first kilobyte.
    let bytes = std::fs::read(repo_path("data/footage/solidYellowCurve.jpg")).unwrap();
    std::fs::write(dir.path().join("b.jpg"), &bytes[..1024]).unwrap();
    std::fs::copy(
        repo_path("data/footage/whiteCarLaneSwitch.jpg"),
        dir.path().join("c.jpg"),
    )
    .unwrap();

    let output = daain(&["run", "--images", dir.path().to_str().unwrap(), "--json"]);
    assert!(!output.status.success(), "a lost frame must fail the run");
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let frames: Vec<u64> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["frame"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(frames.len(), 2, "both intact stills are scored: {stdout}");
    let message = stderr(&output);
    assert!(message.contains("b.jpg"), "{message}");
    assert!(message.contains("source_errors=1"), "{message}");
}

#[test]
fn alerts_out_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alerts.jsonl");
    // Every frame of the pedestrian clip is out of distribution for the dashcam bundle.
    let output = daain(&[
        "run",
        "--video",
        "data/footage/vtest.avi",
        "--max-frames",
        "3",
        "--alerts-out",
        path.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = std::fs::read_to_string(&path).unwrap();
    let alerts: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(alerts.len(), 3, "one alert per anomalous frame: {text}");
    for (i, alert) in alerts.iter().enumerate() {
        assert_eq!(alert["frame"], i as u64, "{text}");
        assert_eq!(alert["level"], "WARN", "{text}");
        assert!(alert["score"].as_f64().unwrap() > alert["threshold"].as_f64().unwrap());
    }
}
