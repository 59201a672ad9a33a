//! Detection metrics against values computed by hand on small cases, and properties that
//! every ROC analysis must satisfy on random scores.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use daain_tools::metrics::{
    auroc, average_precision, detection_rate, false_alarm_rate, fpr_at_tpr, raised_rate, roc_curve,
    summarize, RocPoint,
};

const EPSILON: f64 = 1e-12;

fn assert_close(actual: f64, expected: f64, what: &str) {
    assert!(
        (actual - expected).abs() < EPSILON,
        "{what}: got {actual}, expected {expected}"
    );
}

/// Counts (anomalous, normal) pairs where the anomalous score is higher, ties as one half.
fn pairwise_auroc(normal: &[f64], anomalous: &[f64]) -> f64 {
    let mut wins = 0.0;
    for &positive in anomalous {
        for &negative in normal {
            if positive > negative {
                wins += 1.0;
            } else if positive == negative {
                wins += 0.5;
            }
        }
    }
    wins / (normal.len() * anomalous.len()) as f64
}

/// Trapezoidal area under a ROC curve.
fn trapezoid_area(curve: &[RocPoint]) -> f64 {
    curve
        .windows(2)
        .map(|pair| {
            let width = pair[1].false_positive_rate - pair[0].false_positive_rate;
            width * (pair[0].true_positive_rate + pair[1].true_positive_rate) / 2.0
        })
        .sum()
}

fn random_scores(rng: &mut ChaCha8Rng, count: usize, shift: f64) -> Vec<f64> {
    (0..count).map(|_| rng.gen::<f64>() + shift).collect()
}

#[test]
fn scikit_learn_documentation_example() {
    // The example of the scikit-learn documentation for average_precision_score (1.x),
    // y_true = [0, 0, 1, 1] and y_scores = [0.1, 0.4, 0.35, 0.8], where AP is 0.83.
    let normal = [0.1, 0.4];
    let anomalous = [0.35, 0.8];

    assert_close(auroc(&normal, &anomalous).unwrap(), 0.75, "AUROC");
    // Thresholds 0.8, 0.4, 0.35: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    let expected_ap = 0.5 * 1.0 + 0.5 * (2.0 / 3.0);
    assert_close(
        average_precision(&normal, &anomalous).unwrap(),
        expected_ap,
        "AP",
    );
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.95).unwrap(),
        0.5,
        "FPR at 95% TPR",
    );

    let curve = roc_curve(&normal, &anomalous).unwrap();
    let thresholds: Vec<f64> = curve.iter().map(|point| point.threshold).collect();
    let fpr: Vec<f64> = curve
        .iter()
        .map(|point| point.false_positive_rate)
        .collect();
    let tpr: Vec<f64> = curve.iter().map(|point| point.true_positive_rate).collect();
    assert_eq!(thresholds, [f64::INFINITY, 0.8, 0.4, 0.35, 0.1]);
    assert_eq!(fpr, [0.0, 0.0, 0.5, 0.5, 1.0]);
    assert_eq!(tpr, [0.0, 0.5, 0.5, 1.0, 1.0]);
}

#[test]
fn ties_count_one_half() {
    let normal = [1.0, 2.0, 3.0];
    let anomalous = [2.0, 3.0, 4.0];

    // Pairs won by anomalous 2, 3, 4: 1.5, 2.5 and 3 of 3 each.
    assert_close(auroc(&normal, &anomalous).unwrap(), 7.0 / 9.0, "AUROC");
    // Threshold 4: precision 1 at recall 1/3. Threshold 3: 2/3 at 2/3. Threshold 2: 3/5 at 1.
    let expected_ap = 1.0 / 3.0 + (1.0 / 3.0) * (2.0 / 3.0) + (1.0 / 3.0) * (3.0 / 5.0);
    assert_close(
        average_precision(&normal, &anomalous).unwrap(),
        expected_ap,
        "AP",
    );
    // All three anomalous frames are detected only from threshold 2, where normal 2 and 3
    // are false positives.
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.95).unwrap(),
        2.0 / 3.0,
        "FPR at 95% TPR",
    );

    let curve = roc_curve(&normal, &anomalous).unwrap();
    assert_eq!(
        curve.len(),
        5,
        "one point per distinct score plus the first: {curve:?}"
    );
    assert_close(
        trapezoid_area(&curve),
        7.0 / 9.0,
        "area under the ROC points",
    );
}

#[test]
fn perfect_separation() {
    let normal = [0.0, 1.0, 2.0];
    let anomalous = [3.0, 4.0];

    assert_close(auroc(&normal, &anomalous).unwrap(), 1.0, "AUROC");
    assert_close(average_precision(&normal, &anomalous).unwrap(), 1.0, "AP");
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.95).unwrap(),
        0.0,
        "FPR at 95% TPR",
    );
    assert_close(
        false_alarm_rate(&normal, 2.5).unwrap(),
        0.0,
        "false-alarm rate",
    );
    assert_close(
        detection_rate(&anomalous, 2.5).unwrap(),
        1.0,
        "detection rate",
    );
}

#[test]
fn inverted_separation() {
    let normal = [3.0, 4.0];
    let anomalous = [0.0, 1.0, 2.0];

    assert_close(auroc(&normal, &anomalous).unwrap(), 0.0, "AUROC");
    // Thresholds 4 and 3 add no recall. Threshold 2: precision 1/3 at recall 1/3,
    // threshold 1: 2/4 at 2/3, threshold 0: 3/5 at 1.
    let expected_ap = (1.0 / 3.0) * (1.0 / 3.0) + (1.0 / 3.0) * 0.5 + (1.0 / 3.0) * 0.6;
    assert_close(
        average_precision(&normal, &anomalous).unwrap(),
        expected_ap,
        "AP",
    );
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.95).unwrap(),
        1.0,
        "FPR at 95% TPR",
    );
}

#[test]
fn all_equal_scores() {
    let normal = [5.0, 5.0, 5.0];
    let anomalous = [5.0, 5.0];

    assert_close(auroc(&normal, &anomalous).unwrap(), 0.5, "AUROC");
    // One threshold, where precision is the fraction of anomalous frames.
    assert_close(average_precision(&normal, &anomalous).unwrap(), 0.4, "AP");
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.95).unwrap(),
        1.0,
        "FPR at 95% TPR",
    );
    let curve = roc_curve(&normal, &anomalous).unwrap();
    let expected = [
        RocPoint {
            threshold: f64::INFINITY,
            false_positive_rate: 0.0,
            true_positive_rate: 0.0,
        },
        RocPoint {
            threshold: 5.0,
            false_positive_rate: 1.0,
            true_positive_rate: 1.0,
        },
    ];
    assert_eq!(curve, expected);
    assert_close(
        false_alarm_rate(&normal, 5.0).unwrap(),
        0.0,
        "nothing strictly above",
    );
}

#[test]
fn fpr_at_exactly_95_percent() {
    // 19 of 20 anomalous frames detected is exactly 95%, reached at threshold 2.
    let anomalous: Vec<f64> = (1..=20).map(f64::from).collect();
    let normal = [1.5, 10.5, 30.0];
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.95).unwrap(),
        2.0 / 3.0,
        "FPR at 95% TPR",
    );
    // 100% needs threshold 1, where every normal frame is a false positive.
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 1.0).unwrap(),
        1.0,
        "FPR at 100% TPR",
    );
    // 50% needs 10 detections, reached at threshold 11, above normal 10.5.
    assert_close(
        fpr_at_tpr(&normal, &anomalous, 0.5).unwrap(),
        1.0 / 3.0,
        "FPR at 50% TPR",
    );
}

#[test]
fn false_alarms_count_scores_above_threshold() {
    let normal = [1.0, 2.0, 3.0, 4.0];
    assert_close(
        false_alarm_rate(&normal, 2.5).unwrap(),
        0.5,
        "threshold 2.5",
    );
    assert_close(
        false_alarm_rate(&normal, 3.0).unwrap(),
        0.25,
        "threshold equal to a score",
    );
    assert_close(
        false_alarm_rate(&normal, 0.0).unwrap(),
        1.0,
        "threshold below all",
    );
    assert_close(
        false_alarm_rate(&normal, 9.0).unwrap(),
        0.0,
        "threshold above all",
    );
    assert_close(
        detection_rate(&normal, 1.0).unwrap(),
        0.75,
        "detection rate",
    );
}

#[test]
fn auroc_of_negated_scores() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (normal_count, anomalous_count) in [(1, 1), (5, 3), (40, 60), (200, 17)] {
        let normal = random_scores(&mut rng, normal_count, 0.0);
        let anomalous = random_scores(&mut rng, anomalous_count, 0.3);
        let negated_normal: Vec<f64> = normal.iter().map(|score| -score).collect();
        let negated_anomalous: Vec<f64> = anomalous.iter().map(|score| -score).collect();

        let forward = auroc(&normal, &anomalous).unwrap();
        let negated = auroc(&negated_normal, &negated_anomalous).unwrap();
        assert!(
            (forward - (1.0 - negated)).abs() < 1e-12,
            "{normal_count} normal, {anomalous_count} anomalous: AUROC {forward}, \
             negated {negated}"
        );
    }
}

#[test]
fn auroc_matches_pairs_and_curve() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (normal_count, anomalous_count) in [(3, 4), (50, 30), (120, 80)] {
        // Rounding to tenths makes many ties, within and across the classes.
        let normal: Vec<f64> = random_scores(&mut rng, normal_count, 0.0)
            .iter()
            .map(|score| (score * 10.0).round() / 10.0)
            .collect();
        let anomalous: Vec<f64> = random_scores(&mut rng, anomalous_count, 0.2)
            .iter()
            .map(|score| (score * 10.0).round() / 10.0)
            .collect();

        let by_ranks = auroc(&normal, &anomalous).unwrap();
        let by_pairs = pairwise_auroc(&normal, &anomalous);
        let by_curve = trapezoid_area(&roc_curve(&normal, &anomalous).unwrap());
        assert!(
            (by_ranks - by_pairs).abs() < 1e-12,
            "ranks {by_ranks}, pairs {by_pairs}"
        );
        assert!(
            (by_ranks - by_curve).abs() < 1e-12,
            "ranks {by_ranks}, curve {by_curve}"
        );
    }
}

#[test]
fn roc_curve_is_monotone() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let normal = random_scores(&mut rng, 80, 0.0);
    let anomalous = random_scores(&mut rng, 40, 0.4);
    let curve = roc_curve(&normal, &anomalous).unwrap();

    assert_eq!(curve.len(), 121, "120 distinct scores plus the first point");
    let last = curve.last().unwrap();
    assert_eq!(last.false_positive_rate, 1.0);
    assert_eq!(last.true_positive_rate, 1.0);
    for pair in curve.windows(2) {
        assert!(
            pair[1].threshold < pair[0].threshold,
            "thresholds fall: {pair:?}"
        );
        assert!(
            pair[1].false_positive_rate >= pair[0].false_positive_rate,
            "{pair:?}"
        );
        assert!(
            pair[1].true_positive_rate >= pair[0].true_positive_rate,
            "{pair:?}"
        );
    }

    let summary = summarize(&normal, &anomalous).unwrap();
    assert!(
        summary.auroc > 0.5,
        "shifted anomalous scores: AUROC {}",
        summary.auroc
    );
    assert!(
        summary.average_precision > 40.0 / 120.0,
        "AP {}",
        summary.average_precision
    );
    assert!(
        summary.fpr_at_95_tpr < 1.0,
        "FPR at 95% TPR {}",
        summary.fpr_at_95_tpr
    );
}

#[test]
fn empty_score_lists_are_rejected() {
    let scores = [1.0, 2.0];
    let no_normal = auroc(&[], &scores).unwrap_err().to_string();
    assert!(no_normal.contains("no normal scores"), "{no_normal}");
    let no_anomalous = average_precision(&scores, &[]).unwrap_err().to_string();
    assert!(
        no_anomalous.contains("no anomalous scores"),
        "{no_anomalous}"
    );
    assert!(roc_curve(&[], &[]).is_err());
    assert!(fpr_at_tpr(&scores, &[], 0.95).is_err());
    assert!(false_alarm_rate(&[], 1.0).is_err());
    assert!(detection_rate(&[], 1.0).is_err());
    assert!(summarize(&[], &scores).is_err());
}

#[test]
fn invalid_values_are_rejected() {
    let scores = [1.0, 2.0];
    let nan = auroc(&[1.0, f64::NAN], &scores).unwrap_err().to_string();
    assert!(nan.contains("invalid normal score NaN at index 1"), "{nan}");
    let infinite = roc_curve(&scores, &[f64::INFINITY])
        .unwrap_err()
        .to_string();
    assert!(
        infinite.contains("invalid anomalous score inf at index 0"),
        "{infinite}"
    );
    for target in [0.0, -0.1, 1.5, f64::NAN] {
        let error = fpr_at_tpr(&scores, &scores, target)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("invalid target true-positive rate"),
            "{error}"
        );
    }
    let threshold = false_alarm_rate(&scores, f64::NAN).unwrap_err().to_string();
    assert!(threshold.contains("invalid threshold"), "{threshold}");
}

#[test]
fn raised_rate_counts_frames_after_consecutive_runs_above() {
    // Above the threshold 1.0: frames 1, 2, 3 and 5 of the first run, frame 0 of the second.
    let sequences = vec![vec![0.0, 2.0, 3.0, 4.0, 0.5, 2.0], vec![5.0, 0.0]];
    // raise_after 1: every frame above, 5 of 8.
    assert!((raised_rate(&sequences, 1.0, 1).unwrap() - 5.0 / 8.0).abs() < EPSILON);
    // raise_after 2: frames 2 and 3 of the first run; the second run restarts the count.
    assert!((raised_rate(&sequences, 1.0, 2).unwrap() - 2.0 / 8.0).abs() < EPSILON);
    // raise_after 3: frame 3 only.
    assert!((raised_rate(&sequences, 1.0, 3).unwrap() - 1.0 / 8.0).abs() < EPSILON);
    assert_eq!(raised_rate(&sequences, 1.0, 4).unwrap(), 0.0);
    // A run split in two never reaches three in a row.
    let split = vec![vec![2.0, 2.0], vec![2.0, 2.0]];
    assert_eq!(raised_rate(&split, 1.0, 3).unwrap(), 0.0);
    assert_eq!(raised_rate(&split, 1.0, 2).unwrap(), 0.5);
    // With raise_after 1 it is the plain false-alarm rate.
    let flat = [0.0, 2.0, 3.0, 4.0, 0.5, 2.0];
    assert_eq!(raised_rate(&[flat.to_vec()], 1.0, 1).unwrap(), false_alarm_rate(&flat, 1.0).unwrap());

    let zero = raised_rate(&sequences, 1.0, 0).unwrap_err().to_string();
    assert!(zero.contains("invalid raise_after 0"), "{zero}");
    let nan = raised_rate(&[vec![1.0, f64::NAN]], 1.0, 1).unwrap_err().to_string();
    assert!(nan.contains("invalid sequence score NaN at index 1"), "{nan}");
    assert!(raised_rate(&[], 1.0, 1).is_err());
}
