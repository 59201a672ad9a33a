//! The ONNX export of ESPNet run through tract against the libtorch model, on real frames.

use std::path::{Path, PathBuf};
use std::process::Command;

use daain::preprocess::{InputConvention, Preprocessor};
use daain_tools::espnet::{
    tap_stride, Espnet, Weights, INPUT_HEIGHT, INPUT_WIDTH, NUM_CLASSES, TAPS,
};
use daain_tools::onnx;
use tract_onnx::prelude::*;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn weights_path() -> PathBuf {
    repo_path("models/espnet/espnet_p_2_q_8.safetensors")
}

/// Decodes a JPEG and returns the 3x256x512 network input.
fn frame_input(relative: &str) -> Vec<f32> {
    let image = image::open(repo_path(relative)).unwrap().to_rgb8();
    let (width, height) = image.dimensions();
    let mut preprocessor = Preprocessor::new(InputConvention::espnet_cityscapes());
    let mut input = vec![0.0; 3 * INPUT_HEIGHT * INPUT_WIDTH];
    preprocessor
        .run(image.as_raw(), width as usize, height as usize, &mut input)
        .unwrap();
    input
}

fn tract_values(tensor: &Tensor) -> Vec<f32> {
    tensor
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn tensor_to_vec(tensor: &tch::Tensor) -> Vec<f32> {
    let flat = tensor.flatten(0, -1);
    Vec::<f32>::try_from(&flat).unwrap()
}

/// Per-pixel argmax over the class axis of `[classes, height * width]` logits.
fn argmax_classes(logits: &[f32], pixels: usize) -> Vec<usize> {
    (0..pixels)
        .map(|p| {
            (0..NUM_CLASSES)
                .max_by(|&a, &b| logits[a * pixels + p].total_cmp(&logits[b * pixels + p]))
                .unwrap()
        })
        .collect()
}

fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn value_range(values: &[f32]) -> f32 {
    let max = values.iter().copied().fold(f32::MIN, f32::max);
    let min = values.iter().copied().fold(f32::MAX, f32::min);
    max - min
}

#[test]
fn export_matches_libtorch_on_real_frames() {
    let weights = Weights::load(&weights_path()).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let onnx_path = directory.path().join("espnet.onnx");
    let op_counts = onnx::export_espnet(&weights, &onnx_path).unwrap();
    println!("op counts: {op_counts:?}");
    assert_eq!(op_counts["Conv"], 82);
    assert_eq!(op_counts["Add"], 49);
    assert_eq!(op_counts["PRelu"], 20);
    assert_eq!(op_counts["Concat"], 18);
    assert_eq!(op_counts["BatchNormalization"], 21);
    assert_eq!(op_counts["ConvTranspose"], 3);
    assert_eq!(op_counts["AveragePool"], 2);

    let model = tract_onnx::onnx()
        .model_for_path(&onnx_path)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let espnet = Espnet::new(&weights).unwrap();
    let pixels = INPUT_HEIGHT * INPUT_WIDTH;

    for frame in ["data/footage/test1.jpg", "data/footage/solidWhiteCurve.jpg"] {
        let input = frame_input(frame);
        let shape = [1, 3, INPUT_HEIGHT, INPUT_WIDTH];
        let tract_input = Tensor::from_shape(&shape, &input).unwrap();
        let start = std::time::Instant::now();
        let outputs = model.run(tvec!(tract_input.into())).unwrap();
        println!("{frame}: tract run {:?}", start.elapsed());
        assert_eq!(outputs.len(), 1 + TAPS.len());

        let tch_input = tch::Tensor::from_slice(&input).reshape([1, 3, 256, 512]);
        let (logits, taps) = tch::no_grad(|| espnet.forward_with_taps(&tch_input)).unwrap();

        let tract_logits = tract_values(&outputs[0]);
        assert_eq!(
            outputs[0].shape(),
            [1, NUM_CLASSES, INPUT_HEIGHT, INPUT_WIDTH]
        );
        let torch_logits = tensor_to_vec(&logits);
        let difference = max_abs_difference(&tract_logits, &torch_logits);
        let range = value_range(&torch_logits);
        println!("{frame}: max |logit difference| {difference:e}, logit range {range}");
        assert!(
            difference < 1e-4 * range,
            "{frame}: logits differ by {difference} (range {range})"
        );

        let tract_classes = argmax_classes(&tract_logits, pixels);
        let torch_classes = argmax_classes(&torch_logits, pixels);
        let agreeing = tract_classes
            .iter()
            .zip(&torch_classes)
            .filter(|(a, b)| a == b)
            .count();
        let agreement = agreeing as f64 / pixels as f64;
        println!("{frame}: argmax agreement {agreement}");
        assert!(
            agreement >= 0.999,
            "{frame}: argmax agrees on {agreement} of the pixels"
        );

        for (index, ((name, channels), torch_tap)) in TAPS.iter().zip(&taps).enumerate() {
            let stride = tap_stride(index);
            let expected_shape = [1, *channels, INPUT_HEIGHT / stride, INPUT_WIDTH / stride];
            let tract_tap = &outputs[1 + index];
            assert_eq!(tract_tap.shape(), expected_shape, "shape of tap {name}");
            let torch_shape: Vec<usize> = torch_tap.size().iter().map(|&d| d as usize).collect();
            assert_eq!(torch_shape, expected_shape, "libtorch shape of tap {name}");
            let torch_values = tensor_to_vec(torch_tap);
            let difference = max_abs_difference(&tract_values(tract_tap), &torch_values);
            let range = value_range(&torch_values);
            assert!(
                difference < 1e-4 * range,
                "{frame}: tap {name} differs by {difference} (range {range})"
            );
        }

        assert_sensible_segmentation(frame, &torch_classes);
    }
}

/// Counts the pixels per class.
fn class_histogram(classes: &[usize]) -> [usize; NUM_CLASSES] {
    let mut histogram = [0usize; NUM_CLASSES];
    for &class in classes {
        histogram[class] += 1;
    }
    histogram
}

/// Checks that void (class 19) does not dominate, and on `solidWhiteCurve.jpg` that road
/// (class 0) is among the three most frequent classes.
///
/// NOTE: at 256x512 the released weights label no pixel of `test1.jpg` as road (its bright
/// asphalt becomes building), while at their training size 1024x512 about 14% of the frame
/// is road. The road check therefore uses `solidWhiteCurve.jpg`, where road covers about 20%.
fn assert_sensible_segmentation(frame: &str, classes: &[usize]) {
    let histogram = class_histogram(classes);
    println!("{frame}: class histogram {histogram:?}");
    let void_share = histogram[19] as f64 / classes.len() as f64;
    assert!(
        void_share < 0.5,
        "{frame}: void covers {void_share} of the frame"
    );
    if frame.ends_with("solidWhiteCurve.jpg") {
        let mut ranked: Vec<usize> = (0..NUM_CLASSES).collect();
        ranked.sort_by_key(|&class| std::cmp::Reverse(histogram[class]));
        assert!(
            ranked[..3].contains(&0),
            "{frame}: road is not among the top 3 classes: {ranked:?}"
        );
    }
}

#[test]
fn export_from_pth_equals_safetensors() {
    let directory = tempfile::tempdir().unwrap();
    let from_safetensors = directory.path().join("a.onnx");
    let from_pth = directory.path().join("b.onnx");
    onnx::export_espnet(&Weights::load(&weights_path()).unwrap(), &from_safetensors).unwrap();
    let pth_weights = Weights::load(&repo_path("models/espnet/espnet_p_2_q_8.pth")).unwrap();
    onnx::export_espnet(&pth_weights, &from_pth).unwrap();
    let a = std::fs::read(from_safetensors).unwrap();
    let b = std::fs::read(from_pth).unwrap();
    assert!(a == b, "the exports from .safetensors and .pth differ");
}

#[test]
fn export_rejects_missing_weight() {
    let mut weights = Weights::load(&weights_path()).unwrap();
    weights.tensors.remove("encoder.level3.4.d8.conv.weight");
    let path = tempfile::tempdir().unwrap().path().join("espnet.onnx");
    let error = onnx::export_espnet(&weights, &path).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("encoder.level3.4.d8.conv.weight"),
        "{error}"
    );
}

#[test]
fn model_rejects_wrong_shape() {
    let mut weights = Weights::load(&weights_path()).unwrap();
    weights.tensors.get_mut("conv.conv.weight").unwrap().shape = vec![20, 39, 3, 3];
    let error = Espnet::new(&weights).unwrap_err();
    assert!(error.to_string().contains("conv.conv.weight"), "{error}");
}

#[test]
fn cli_exports_onnx() {
    let directory = tempfile::tempdir().unwrap();
    let output_path = directory.path().join("espnet.onnx");
    let output = Command::new(env!("CARGO_BIN_EXE_daain-tools"))
        .args(["export-onnx", "--weights"])
        .arg(repo_path("models/espnet/espnet_p_2_q_8.pth"))
        .arg("--output")
        .arg(&output_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("PRelu\t20"), "{stdout}");
    assert!(output_path.metadata().unwrap().len() > 1_000_000);
}

#[test]
fn cli_rejects_missing_weights_file() {
    let output = Command::new(env!("CARGO_BIN_EXE_daain-tools"))
        .args([
            "export-onnx",
            "--weights",
            "missing.safetensors",
            "--output",
            "out.onnx",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing.safetensors"), "{stderr}");
}
