//! The evaluation on real frames: a small run of `evaluate` with the shipped bundle,
//! adversarial attacks on a real frame scored by the runtime, and the baseline scores on
//! hand-computed cases.

use std::path::{Path, PathBuf};

use daain::bundle::Bundle;
use daain::pipeline::Detector;
use daain::preprocess::{InputConvention, Preprocessor};
use daain_tools::attack::{
    self, attack, changed_fraction, class_fraction, resize_to_network, AttackMethod, AttackSpec,
};
use daain_tools::baseline::{logit_scores, mean_entropy};
use daain_tools::espnet::Espnet;
use daain_tools::evaluate::{
    evaluate, held_out_frames, read_video_frames, EvalConfig, Method, PerturbationRun,
};
use daain_tools::plot::signed_log_distance;
use daain_tools::report::{metric_rows, target_summary, write_all};
use tch::{Kind, Tensor};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

fn small_config() -> EvalConfig {
    EvalConfig {
        bundle: repo_path("models/default"),
        weights: repo_path("models/espnet/espnet_p_2_q_8.safetensors"),
        seed: 5,
        max_test_frames: Some(6),
        backbone: Default::default(),
        perturbations: vec![
            PerturbationRun {
                name: "vertical-flip".to_owned(),
                severity: 1,
            },
            PerturbationRun {
                name: "fog".to_owned(),
                severity: 3,
            },
        ],
        attacks: None,
        mc_dropout: None,
        out_of_distribution: None,
        benign: Vec::new(),
        min_attack_effect: 0.1,
    }
}

/// Reads the first held-out test frame of the default bundle, resized to the network input.
fn held_out_network_frame() -> daain::source::Frame {
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    let split = held_out_frames(&bundle).unwrap();
    let frame = read_video_frames(&repo_path(split.video.to_str().unwrap()), &split.test[..1])
        .unwrap()
        .remove(0);
    resize_to_network(&frame, &InputConvention::espnet_cityscapes()).unwrap()
}

#[test]
fn small_evaluation_separates_flip_and_fog() {
    let config = small_config();
    // The manifest stores the clip path relative to the repository root.
    std::env::set_current_dir(repo_path("")).unwrap();
    let evaluation = evaluate(&config, &config.bundle).unwrap();
    assert_eq!(evaluation.clean.scores.len(), 6);
    assert_eq!(evaluation.calibration.scores.len(), 40);
    assert_eq!(evaluation.anomalous.len(), 2);

    let rows = metric_rows(&evaluation).unwrap();
    let deciding = Method::Daain(evaluation.deciding);
    for set in ["vertical-flip", "fog-3"] {
        let row = rows
            .iter()
            .find(|row| row.set == set && row.method == deciding)
            .unwrap();
        eprintln!("{set}: {:?}, detected {}", row.summary, row.detection_rate);
        assert!(row.summary.auroc >= 0.9, "{set}: AUROC {}", row.summary.auroc);
        assert!(row.detection_rate >= 0.5, "{set}: detected {}", row.detection_rate);
    }
    let targets = target_summary(&evaluation, &rows).unwrap();
    assert!(
        targets.clean_false_alarm_rate <= 1.0 / 6.0,
        "clean false alarms {}",
        targets.clean_false_alarm_rate
    );

    let dir = tempfile::tempdir().unwrap();
    write_all(&evaluation, dir.path(), "daain-tools evaluate (test)").unwrap();
    let table = std::fs::read_to_string(dir.path().join("results.md")).unwrap();
    assert!(table.contains("| vertical-flip |"), "{table}");
    // The smoothing table lists the clean frames and each perturbation of them.
    let smoothing = &table[table.find("## Temporal smoothing").expect("no smoothing table")..];
    assert!(smoothing.contains("| clean | 6 |"), "{smoothing}");
    assert!(smoothing.contains("| fog-3 | 6 |"), "{smoothing}");
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    // A header and one row per set and method.
    assert_eq!(csv.lines().count(), 1 + 2 * evaluation.methods.len());
    for name in ["roc-fog-3.png", "roc-vertical-flip.png", "timeline.png"] {
        let image = image::open(dir.path().join(name)).unwrap().to_rgb8();
        let dark = image.pixels().filter(|p| p.0.iter().all(|&c| c < 64)).count();
        // Axis lines alone give a few thousand dark pixels; labels and captions add more.
        assert!(dark > 2000, "{name}: only {dark} dark pixels, text or axes missing");
    }
}

#[test]
fn fgsm_budget_8_changes_segmentation() {
    let convention = InputConvention::espnet_cityscapes();
    let model = Espnet::load(&repo_path("models/espnet/espnet_p_2_q_8.safetensors")).unwrap();
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    let mut detector = Detector::new(&bundle, None).unwrap();
    std::env::set_current_dir(repo_path("")).unwrap();
    let clean = held_out_network_frame();

    detector.score_frame(&clean, true).unwrap();
    let clean_classes = detector.segmentation().to_vec();
    let spec = AttackSpec {
        method: AttackMethod::Fgsm,
        epsilon: 8.0,
        target: None,
        steps: 1,
        step_size: None,
    };
    let outcome = attack(&model, &clean, &spec, &convention).unwrap();
    let largest = clean
        .data
        .iter()
        .zip(&outcome.frame.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(largest <= 8, "a pixel changed by {largest}, over the budget of 8");
    assert_eq!(largest, outcome.max_abs_change);
    assert!(outcome.mean_abs_change > 4.0, "mean change {}", outcome.mean_abs_change);

    detector.score_frame(&outcome.frame, true).unwrap();
    let changed = changed_fraction(&clean_classes, detector.segmentation()).unwrap();
    eprintln!("FGSM eps 8: {changed:.3} of pixels changed class");
    assert!(changed >= 0.2, "FGSM eps 8 changed only {changed} of the pixels");
}

#[test]
fn targeted_fgsm_adds_target_class() {
    let convention = InputConvention::espnet_cityscapes();
    let model = Espnet::load(&repo_path("models/espnet/espnet_p_2_q_8.safetensors")).unwrap();
    std::env::set_current_dir(repo_path("")).unwrap();
    let clean = held_out_network_frame();
    let spec = AttackSpec {
        method: AttackMethod::IterativeFgsm,
        epsilon: 8.0,
        target: Some(11),
        steps: 3,
        step_size: Some(4.0),
    };
    let outcome = attack(&model, &clean, &spec, &convention).unwrap();
    assert!(outcome.max_abs_change <= 8);
    let classes = |frame| -> Vec<u8> {
        let predicted = attack::predict_classes(&model, frame, &convention).unwrap();
        Vec::<i64>::try_from(&predicted.flatten(0, -1))
            .unwrap()
            .into_iter()
            .map(|c| c as u8)
            .collect()
    };
    let before = class_fraction(&classes(&clean), 11);
    let after = class_fraction(&classes(&outcome.frame), 11);
    eprintln!("person share {before:.3} -> {after:.3}");
    assert!(after >= before + 0.2, "person share only went from {before} to {after}");
}

#[test]
fn pixel_normalisation_matches_preprocessor() {
    let convention = InputConvention::espnet_cityscapes();
    std::env::set_current_dir(repo_path("")).unwrap();
    let frame = held_out_network_frame();
    let mut expected = vec![0.0f32; convention.tensor_len()];
    Preprocessor::new(convention.clone())
        .run(&frame.data, frame.width, frame.height, &mut expected)
        .unwrap();
    let actual = attack::normalise(&attack::pixels_to_tensor(&frame), &convention);
    let actual: Vec<f32> = Vec::try_from(&actual.flatten(0, -1)).unwrap();
    let largest = expected
        .iter()
        .zip(&actual)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(largest < 1e-5, "normalisation differs by {largest}");
}

#[test]
fn invalid_attack_settings_are_rejected() {
    let mut spec = AttackSpec {
        method: AttackMethod::Fgsm,
        epsilon: 0.0,
        target: None,
        steps: 1,
        step_size: None,
    };
    let message = spec.validate().unwrap_err().to_string();
    assert!(message.contains("epsilon 0"), "{message}");
    spec.epsilon = 8.0;
    spec.target = Some(25);
    let message = spec.validate().unwrap_err().to_string();
    assert!(message.contains("target 25"), "{message}");
    spec.target = Some(0);
    assert_eq!(spec.name(), "fgsm-eps8-road");
}

#[test]
fn logit_scores_by_hand() {
    // Two classes, two pixels, laid out classes x pixels: pixel 0 has logits (0, ln 3),
    // pixel 1 has (2, 2). Softmax maxima are 3/4 and 1/2, logit maxima ln 3 and 2.
    let logits = [0.0f32, 2.0, 3.0f32.ln(), 2.0];
    let scores = logit_scores(&logits, 2).unwrap();
    assert!((scores.max_softmax - -(0.75 + 0.5) / 2.0).abs() < 1e-6, "{scores:?}");
    assert!((scores.max_logit - -(3.0f64.ln() + 2.0) / 2.0).abs() < 1e-6, "{scores:?}");
    let message = logit_scores(&logits[..3], 2).unwrap_err().to_string();
    assert!(message.contains("3 values"), "{message}");
    let message = logit_scores(&[0.0, f32::NAN], 2).unwrap_err().to_string();
    assert!(message.contains("NaN"), "{message}");
}

#[test]
fn mean_entropy_by_hand() {
    // [1, 2, 1, 2]: one pixel certain (entropy 0), one uniform over 2 classes (ln 2).
    let probabilities = Tensor::from_slice(&[1.0f32, 0.5, 0.0, 0.5]).view([1, 2, 1, 2]);
    let entropy = mean_entropy(&probabilities);
    assert!((entropy - 2.0f64.ln() / 2.0).abs() < 1e-9, "{entropy}");
}

#[test]
fn mc_dropout_at_rate_zero_is_softmax() {
    let model = Espnet::load(&repo_path("models/espnet/espnet_p_2_q_8.safetensors")).unwrap();
    let input = Tensor::randn([1, 3, 64, 128], (Kind::Float, tch::Device::Cpu));
    let expected = tch::no_grad(|| model.forward(&input).unwrap().softmax(1, Kind::Float));
    let averaged = model.mc_dropout_probabilities(&input, 0.0, 2).unwrap();
    let difference = (&expected - &averaged).abs().max().double_value(&[]);
    assert!(difference < 1e-5, "rate 0 differs from softmax by {difference}");
    tch::manual_seed(1);
    let dropped = model.mc_dropout_probabilities(&input, 0.5, 2).unwrap();
    let difference = (&expected - &dropped).abs().max().double_value(&[]);
    assert!(difference > 1e-3, "dropout at 0.5 changed nothing");
    assert!(model.mc_dropout_probabilities(&input, 1.0, 2).is_err());
}

#[test]
fn changed_and_class_fractions() {
    assert_eq!(changed_fraction(&[0, 1, 2, 3], &[0, 1, 5, 5]).unwrap(), 0.5);
    assert!(changed_fraction(&[0, 1], &[0]).is_err());
    assert_eq!(class_fraction(&[11, 11, 0, 13], 11), 0.5);
    assert_eq!(class_fraction(&[], 11), 0.0);
}

#[test]
fn signed_log_distance_centres_threshold() {
    assert_eq!(signed_log_distance(5.0, 5.0), 0.0);
    assert!((signed_log_distance(104.0, 5.0) - 2.0).abs() < 1e-12);
    assert!((signed_log_distance(-94.0, 5.0) + 2.0).abs() < 1e-12);
}

#[test]
fn invalid_evaluation_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eval.toml");
    std::fs::write(
        &path,
        "bundle = \"models/default\"\nweights = \"w\"\nseed = 1\n[[perturbations]]\nname = \"smog\"\nseverity = 3\n",
    )
    .unwrap();
    let message = format!("{:#}", EvalConfig::from_path(&path).unwrap_err());
    assert!(message.contains("smog"), "{message}");
    std::fs::write(&path, "bundle = \"b\"\nweights = \"w\"\nseed = 1\nsede = 2\n").unwrap();
    let message = format!("{:#}", EvalConfig::from_path(&path).unwrap_err());
    assert!(message.contains("sede"), "{message}");
}
