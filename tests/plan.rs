//! The combined plan of the shipped bundle (`plan.onnx`: ESPNet, the mask gather and the
//! flow as one tract model) against the stages run one after the other, on real frames:
//! same sample, same flow output, same scores. Also the errors for bundles without a
//! plan or with an altered one.

mod common;

use daain::bundle::{Bundle, BundleError, Manifest, MANIFEST_FILE};
use daain::backbone::BackbonePrecision;
use daain::pipeline::{DetectError, Detector, DetectorOptions, ExecutionMode};
use daain::plan::{CombinedPlan, PlanSpec};
use daain::sampling::SamplingError;
use daain::source::Frame;

use common::{copy_bundle, frame_limit, read_clip_frames, repo_path};

/// Decodes every `step`-th frame of the training clip, `count` frames in all.
fn clip_frames(step: u64, count: usize) -> Vec<Frame> {
    let indices: Vec<u64> = (0..count as u64).map(|i| i * step).collect();
    read_clip_frames(&indices)
}

/// Returns the largest `|a - b| / max(1, |b|)` over the two vectors.
fn max_relative_difference(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs() / f64::from(y).abs().max(1.0))
        .fold(0.0, f64::max)
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1.0)
}

#[test]
fn in_plan_matches_out_of_plan_on_clip() {
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    assert!(
        bundle.plan_path().is_some(),
        "the shipped bundle has no plan.onnx; run `daain-tools export-plan --bundle models/default`"
    );
    let mut separate = Detector::with_mode(&bundle, None, ExecutionMode::OutOfPlan).unwrap();
    let mut combined = Detector::with_mode(&bundle, None, ExecutionMode::InPlan).unwrap();
    assert_eq!(separate.mode(), ExecutionMode::OutOfPlan);
    assert_eq!(combined.mode(), ExecutionMode::InPlan);

    let mut worst_sample = 0.0f64;
    let mut worst_z = 0.0f64;
    for frame in clip_frames(37, frame_limit(6)) {
        let (expected, _) = separate.score_frame(&frame, true).unwrap();
        let (actual, timings) = combined.score_frame(&frame, true).unwrap();
        let sample = max_relative_difference(combined.sample(), separate.sample());
        let z = max_relative_difference(combined.flow_output(), separate.flow_output());
        eprintln!(
            "frame {:3}: sample {sample:.2e}, z {z:.2e}, nll {} vs {}, plan {:.1} ms",
            frame.index, actual.nll, expected.nll, timings.backbone_ms
        );
        worst_sample = worst_sample.max(sample);
        worst_z = worst_z.max(z);

        assert!(relative(actual.nll, expected.nll) < 1e-5, "nll {actual:?} vs {expected:?}");
        assert!(relative(actual.hbos, expected.hbos) < 1e-5, "hbos {actual:?} vs {expected:?}");
        assert!(
            relative(actual.mahalanobis, expected.mahalanobis) < 1e-5,
            "mahalanobis {actual:?} vs {expected:?}"
        );
        assert!(
            relative(actual.euclidean, expected.euclidean) < 1e-5,
            "euclidean {actual:?} vs {expected:?}"
        );
        let kind = separate.score_kind();
        assert_eq!(
            actual.get(kind) > combined.threshold(),
            expected.get(kind) > separate.threshold(),
            "the two modes decide frame {} differently",
            frame.index
        );
        assert_eq!(
            combined.segmentation(),
            separate.segmentation(),
            "class maps differ on frame {}",
            frame.index
        );
    }
    eprintln!("worst relative difference: sample {worst_sample:.2e}, z {worst_z:.2e}");
    assert!(worst_sample < 1e-5, "samples differ by {worst_sample:.2e}");
    assert!(worst_z < 1e-4, "flow outputs differ by {worst_z:.2e}");
}

#[test]
fn in_plan_without_plan_names_the_fix() {
    let dir = copy_bundle();
    let manifest_path = dir.path().join(MANIFEST_FILE);
    let mut manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest.plan = None;
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();

    let bundle = Bundle::open(dir.path()).unwrap();
    let error = Detector::with_mode(&bundle, None, ExecutionMode::InPlan)
        .err()
        .expect("in-plan needs plan.onnx");
    assert!(matches!(error, DetectError::MissingPlan { .. }), "{error}");
    assert!(error.to_string().contains("export-plan"), "{error}");
    // The same bundle still runs out of plan.
    Detector::with_mode(&bundle, None, ExecutionMode::OutOfPlan).unwrap();
}

#[test]
fn altered_plan_is_rejected() {
    let dir = copy_bundle();
    let plan = dir.path().join("plan.onnx");
    let mut bytes = std::fs::read(&plan).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&plan, bytes).unwrap();
    let error = Bundle::open(dir.path()).err().expect("altered plan must be rejected");
    assert!(matches!(error, BundleError::Hash { .. }), "{error}");
    assert!(error.to_string().contains("plan.onnx"), "{error}");
}

#[test]
fn in_plan_with_int8_backbone_names_both_settings() {
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    let options = DetectorOptions {
        precision: BackbonePrecision::Int8,
        execution: ExecutionMode::InPlan,
        ..Default::default()
    };
    let error = Detector::with_options(&bundle, &options)
        .err()
        .expect("the combined plan holds the f32 backbone");
    assert!(matches!(error, DetectError::InPlanPrecision { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("detector.backbone = \"int8\""), "{message}");
    assert!(message.contains("detector.execution = \"out-of-plan\""), "{message}");
}

#[test]
fn plan_of_older_flow_is_rejected() {
    // A retrained flow with its manifest hash updated, and the plan left as it was.
    let dir = copy_bundle();
    let flow_path = dir.path().join("flow.safetensors");
    let mut bytes = std::fs::read(&flow_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&flow_path, &bytes).unwrap();
    let manifest_path = dir.path().join(MANIFEST_FILE);
    let mut manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest.flow.file.sha256 = daain::bundle::sha256_hex(&bytes);
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();

    let bundle = Bundle::open(dir.path()).unwrap();
    let error = Detector::with_mode(&bundle, None, ExecutionMode::InPlan)
        .err()
        .expect("a plan made from another flow must be rejected");
    assert!(matches!(error, DetectError::PlanLoad { .. }), "{error}");
    let message = format!("{error}");
    assert!(message.contains("flow file"), "{message}");
    assert!(message.contains("export-plan"), "{message}");
}

#[test]
fn failed_plan_run_releases_input() {
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    let manifest = bundle.manifest();
    let mut plan = CombinedPlan::load(&PlanSpec {
        path: bundle.plan_path().unwrap(),
        input_height: manifest.input.height,
        input_width: manifest.input.width,
        logits: manifest.backbone.logits.clone(),
        dim: manifest.flow.dim,
        threads: 1,
        mask_sha256: manifest.mask.file.sha256.clone(),
        flow_sha256: manifest.flow.file.sha256.clone(),
    })
    .unwrap();
    let address = plan.input_mut().as_ptr();

    plan.input_mut().fill(f32::NAN);
    let error = plan.run().err().expect("NaN activations must fail the run");
    assert!(
        error.downcast_ref::<SamplingError>().is_some(),
        "the gather must reject the NaN activations: {error:#}"
    );

    // The next frame reuses the input tensor and runs.
    plan.input_mut().fill(0.0);
    assert_eq!(plan.input_mut().as_ptr(), address);
    let output = plan.run().unwrap();
    assert!(output.z().iter().all(|v| v.is_finite()));
}
