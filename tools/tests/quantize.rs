//! The input equalisation of `daain-tools quantize` on the shipped ESPNet: it rescales
//! channels between convolutions without changing what the f32 model computes.

use std::path::{Path, PathBuf};

use daain::preprocess::InputConvention;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};
use daain_tools::onnx::write_model;
use daain_tools::quantize::{
    calibrate, equalize_inputs, fold_batch_norms, quantised_convs, read_model, CalibrationMethod,
    ConvSelection, QuantizeOptions,
};
use daain_tools::record::load_backbone;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// Decodes frames 0 and 100 of the shipped clip.
fn frames() -> Vec<Frame> {
    let spec = SourceSpec::Video(repo_path("data/footage/solidWhiteRight.mp4"));
    let mut source = open_source(&spec, &SourceOptions::default()).unwrap();
    let mut frame = Frame::new();
    let mut out = Vec::new();
    while source.next_frame(&mut frame).unwrap() {
        if [0, 100].contains(&frame.index) {
            out.push(frame.clone());
        }
    }
    out
}

#[test]
fn equalisation_keeps_f32_model() {
    let convention = InputConvention::espnet_cityscapes();
    let mut model = read_model(&repo_path("models/default/backbone.onnx")).unwrap();
    fold_batch_norms(&mut model).unwrap();
    let options = QuantizeOptions {
        method: CalibrationMethod::Mse,
        convs: ConvSelection::Dilated3x3,
        equalize: 0.5,
        bias_correction: false,
        keep_f32: Vec::new(),
    };
    let (convs, values) = quantised_convs(&model, &options).unwrap();
    assert_eq!(convs.len(), 66, "3x3 convolutions of stride 1 in ESPNet");
    let frames = frames();
    let stats = calibrate(&model, &values, &frames, &convention, None).unwrap();
    let mut equalized = model.clone();
    let count = equalize_inputs(&mut equalized, &convs, &stats, options.equalize).unwrap();
    assert_eq!(count, 13, "one reduction per ESP block");

    let dir = tempfile::tempdir().unwrap();
    let (before, after) = (
        dir.path().join("before.onnx"),
        dir.path().join("after.onnx"),
    );
    write_model(&model, &before).unwrap();
    write_model(&equalized, &after).unwrap();
    let taps = ["encoder.level3.7".to_string()];
    let mut before = load_backbone(&before, "logits", &taps, &convention).unwrap();
    let mut after = load_backbone(&after, "logits", &taps, &convention).unwrap();
    let mut input = vec![0.0f32; convention.tensor_len()];
    let frame = &frames[1];
    daain::preprocess::Preprocessor::new(convention.clone())
        .run(&frame.data, frame.width, frame.height, &mut input)
        .unwrap();
    let a = before.run(&input).unwrap().logits().to_vec();
    let b = after.run(&input).unwrap().logits().to_vec();
    let range = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let largest = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(
        largest <= 1e-4 * range,
        "equalised model differs by {largest} (logit range {range})"
    );
    assert!(a != b, "equalisation changed no weight");
}

#[test]
fn equalisation_strength_above_one_rejected() {
    let mut model = read_model(&repo_path("models/default/backbone.onnx")).unwrap();
    let error = equalize_inputs(&mut model, &[], &Default::default(), 1.5).unwrap_err();
    assert!(error.to_string().contains("--equalize 1.5"), "{error}");
}
