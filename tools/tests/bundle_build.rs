//! The bundle build steps on a short stretch of the real clip: `record`, `train` and
//! `export` as separate commands, then the runtime loads and runs the bundle they wrote,
//! out of plan and in plan. Also `export-plan` on a bundle that has no plan.

use std::path::{Path, PathBuf};
use std::process::Command;

use daain::bundle::{Bundle, Manifest, MANIFEST_FILE};
use daain::pipeline::{Detector, ExecutionMode};
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tools(args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_daain-tools"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
}

const SMALL_CONFIG: &str = r#"
[data]
backbone = "models/espnet/espnet_p2_q8_256x512.onnx"
video = "data/footage/solidWhiteRight.mp4"
max_frames = 25
chunk_frames = 5
pattern = ["train", "train", "train", "calibration", "test"]

[mask]
seed = 3
min_distance = 80.0

[augment]
horizontal_flip = true
crops = 1
crop_scale = 0.9
seed = 7

[flow]
blocks = 2
hidden = 10
clamp = 2.0
epochs = 3
batch_size = 16
learning_rate = 0.001
weight_decay = 0.0
seed = 1

[score]
kind = "hbos"
bins = 10
alpha = 0.1
tol = 0.5
mahalanobis_components = 4

[threshold]
false_positive_rate = 0.2
"#;

#[test]
fn record_train_export_gives_loadable_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("small.toml");
    std::fs::write(&config, SMALL_CONFIG).unwrap();
    let activations = dir.path().join("activations.safetensors");
    let flow = dir.path().join("flow.safetensors");
    let bundle_dir = dir.path().join("bundle");
    let config = config.to_str().unwrap();

    tools(&["record", "--config", config, "--output", activations.to_str().unwrap()]);
    tools(&[
        "train",
        "--config",
        config,
        "--activations",
        activations.to_str().unwrap(),
        "--output",
        flow.to_str().unwrap(),
    ]);
    tools(&[
        "export",
        "--config",
        config,
        "--activations",
        activations.to_str().unwrap(),
        "--flow",
        flow.to_str().unwrap(),
        "--output",
        bundle_dir.to_str().unwrap(),
    ]);

    let bundle = Bundle::open(&bundle_dir).unwrap();
    let manifest = bundle.manifest();
    assert_eq!(manifest.flow.blocks, 2);
    assert_eq!(manifest.mask.points, manifest.flow.dim);
    assert_eq!(manifest.backbone.taps.len(), 20);
    assert!(manifest.threshold.value.is_finite());
    // 15 training frames, each also flipped and cropped once.
    assert_eq!(manifest.training["train_frames"].as_array().unwrap().len(), 45);
    assert_eq!(manifest.threshold.calibration_frames, 5);

    let mut detector = Detector::new(&bundle, None).unwrap();
    let spec = SourceSpec::Video(repo_root().join("data/footage/solidWhiteRight.mp4"));
    let mut source = open_source(&spec, &SourceOptions::default()).unwrap();
    let mut frame = Frame::new();
    assert!(source.next_frame(&mut frame).unwrap());
    let (scores, _) = detector.score_frame(&frame, false).unwrap();
    assert!(scores.hbos.is_finite());
    assert!(scores.nll.is_finite());

    assert_eq!(manifest.plan.as_ref().map(|plan| plan.file.as_str()), Some("plan.onnx"));
    let mut in_plan = Detector::with_mode(&bundle, None, ExecutionMode::InPlan).unwrap();
    let (plan_scores, _) = in_plan.score_frame(&frame, false).unwrap();
    let difference = (plan_scores.nll - scores.nll).abs() / scores.nll.abs().max(1.0);
    assert!(difference < 1e-5, "nll in plan {} vs {}", plan_scores.nll, scores.nll);
}

#[test]
fn export_plan_adds_plan_to_bundle() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo_root().join("models/default")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "plan.onnx" {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let manifest_path = dir.path().join(MANIFEST_FILE);
    let mut manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest.plan = None;
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    let before = manifest;

    tools(&["export-plan", "--bundle", dir.path().to_str().unwrap()]);

    let bundle = Bundle::open(dir.path()).unwrap();
    let after = bundle.manifest();
    assert!(after.plan.is_some(), "the manifest lists no plan");
    assert!(dir.path().join("plan.onnx").is_file());
    assert_eq!(Manifest { plan: None, ..after.clone() }, before, "other manifest entries changed");
    Detector::with_mode(&bundle, None, ExecutionMode::InPlan).unwrap();
}

#[test]
fn unknown_training_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, SMALL_CONFIG.replace("max_frames", "max_frame")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_daain-tools"))
        .args(["record", "--config", config.to_str().unwrap(), "--output", "/tmp/unused"])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("max_frame"), "{message}");
}
