//! Detection metrics over anomaly scores.
//!
//! Every function takes the scores of normal frames and of anomalous frames separately.
//! Anomalous frames are the positive class, and a higher score means more anomalous. On the
//! ROC curve a frame counts as detected when its score is at or above the threshold, as in
//! scikit-learn. [`false_alarm_rate`] and [`detection_rate`] instead count scores strictly
//! above the threshold, as the runtime does when it raises an alert.
//!
//! Scores must be finite. Empty score lists and NaN or infinite scores are rejected with an
//! error.

use anyhow::{anyhow, bail, ensure, Result};

/// Tolerance when a true-positive rate is compared with a requested one, so that, for
/// example, 19 of 20 detected counts as reaching 0.95 despite rounding in `0.95`.
const RATE_TOLERANCE: f64 = 1e-12;

/// One point of the ROC curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RocPoint {
    /// Frames with a score at or above this value count as detected. The first point of a
    /// curve has `f64::INFINITY`, where nothing is detected.
    pub threshold: f64,
    /// Fraction of normal frames at or above the threshold.
    pub false_positive_rate: f64,
    /// Fraction of anomalous frames at or above the threshold.
    pub true_positive_rate: f64,
}

/// The threshold-free summary metrics of one normal set against one anomalous set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectionSummary {
    /// Area under the ROC curve, see [`auroc`].
    pub auroc: f64,
    /// Average precision (AUPR), see [`average_precision`].
    pub average_precision: f64,
    /// False-positive rate at 95% true-positive rate, see [`fpr_at_tpr`].
    pub fpr_at_95_tpr: f64,
}

/// Computes AUROC, average precision and the FPR at 95% TPR.
pub fn summarize(normal: &[f64], anomalous: &[f64]) -> Result<DetectionSummary> {
    Ok(DetectionSummary {
        auroc: auroc(normal, anomalous)?,
        average_precision: average_precision(normal, anomalous)?,
        fpr_at_95_tpr: fpr_at_tpr(normal, anomalous, 0.95)?,
    })
}

/// Computes the area under the ROC curve as the Mann-Whitney U statistic divided by the
/// number of (normal, anomalous) pairs: the probability that an anomalous frame scores
/// higher than a normal one, with ties counting one half.
pub fn auroc(normal: &[f64], anomalous: &[f64]) -> Result<f64> {
    check_scores("normal", normal)?;
    check_scores("anomalous", anomalous)?;

    let mut all: Vec<(f64, bool)> = normal.iter().map(|&score| (score, false)).collect();
    all.extend(anomalous.iter().map(|&score| (score, true)));
    all.sort_by(|a, b| a.0.total_cmp(&b.0));

    // Sum of the 1-based ranks of the anomalous scores, tied scores sharing their mean rank.
    let mut anomalous_rank_sum = 0.0;
    let mut start = 0;
    while start < all.len() {
        let mut end = start;
        while end < all.len() && all[end].0 == all[start].0 {
            end += 1;
        }
        let mean_rank = (start + 1 + end) as f64 / 2.0;
        let tied_anomalous = all[start..end]
            .iter()
            .filter(|(_, is_anomalous)| *is_anomalous);
        anomalous_rank_sum += mean_rank * tied_anomalous.count() as f64;
        start = end;
    }

    let positives = anomalous.len() as f64;
    let negatives = normal.len() as f64;
    let u = anomalous_rank_sum - positives * (positives + 1.0) / 2.0;
    Ok(u / (positives * negatives))
}

/// Computes the average precision, the usual estimate of the area under the
/// precision-recall curve (AUPR), as scikit-learn's `average_precision_score` does: the sum
/// over distinct thresholds, from the highest down, of the precision at the threshold times
/// the recall gained there. It is not interpolated.
pub fn average_precision(normal: &[f64], anomalous: &[f64]) -> Result<f64> {
    let counts = threshold_counts(normal, anomalous)?;
    let positives = anomalous.len() as f64;
    let mut previous_recall = 0.0;
    let mut sum = 0.0;
    for count in counts {
        let recall = count.true_positives as f64 / positives;
        let precision =
            count.true_positives as f64 / (count.true_positives + count.false_positives) as f64;
        sum += (recall - previous_recall) * precision;
        previous_recall = recall;
    }
    Ok(sum)
}

/// Computes the ROC curve: one point per distinct score, from the highest down, after a
/// first point at an infinite threshold with both rates 0. No point is dropped, so the
/// curve has one more point than there are distinct scores.
pub fn roc_curve(normal: &[f64], anomalous: &[f64]) -> Result<Vec<RocPoint>> {
    let counts = threshold_counts(normal, anomalous)?;
    let negatives = normal.len() as f64;
    let positives = anomalous.len() as f64;
    let mut curve = Vec::with_capacity(counts.len() + 1);
    curve.push(RocPoint {
        threshold: f64::INFINITY,
        false_positive_rate: 0.0,
        true_positive_rate: 0.0,
    });
    curve.extend(counts.iter().map(|count| RocPoint {
        threshold: count.threshold,
        false_positive_rate: count.false_positives as f64 / negatives,
        true_positive_rate: count.true_positives as f64 / positives,
    }));
    Ok(curve)
}

/// Returns the smallest false-positive rate among the ROC points whose true-positive rate
/// reaches `target_tpr`, which must lie in (0, 1]. With 0.95 this is the "FPR at 95% TPR"
/// of the out-of-distribution detection literature.
pub fn fpr_at_tpr(normal: &[f64], anomalous: &[f64], target_tpr: f64) -> Result<f64> {
    ensure!(
        target_tpr > 0.0 && target_tpr <= 1.0,
        "invalid target true-positive rate {target_tpr}: expected a value in (0, 1]"
    );
    let curve = roc_curve(normal, anomalous)?;
    // The false-positive rate never falls as the threshold falls, so the first point that
    // reaches the target has the smallest one.
    let point = curve
        .iter()
        .find(|point| point.true_positive_rate >= target_tpr - RATE_TOLERANCE);
    point
        .map(|point| point.false_positive_rate)
        .ok_or_else(|| anyhow!("no ROC point reaches a true-positive rate of {target_tpr}"))
}

/// Returns the fraction of normal scores strictly above `threshold`: the false alarms that
/// the runtime would raise at that threshold.
pub fn false_alarm_rate(normal: &[f64], threshold: f64) -> Result<f64> {
    check_scores("normal", normal)?;
    fraction_above(normal, threshold)
}

/// Returns the fraction of anomalous scores strictly above `threshold`: the anomalous frames
/// that the runtime would flag at that threshold.
pub fn detection_rate(anomalous: &[f64], threshold: f64) -> Result<f64> {
    check_scores("anomalous", anomalous)?;
    fraction_above(anomalous, threshold)
}

/// Returns the fraction of frames at which an alert level is raised, when it rises
/// after `raise_after` consecutive frames strictly above `threshold` and falls at the
/// first frame at or below it, as the runtime's alert tracker does with `clear_after = 1`.
///
/// Each sequence is a run of consecutive frames in time order; the count of frames above
/// restarts at the start of every sequence. With `raise_after = 1` this is the share of
/// frames above the threshold.
pub fn raised_rate(sequences: &[Vec<f64>], threshold: f64, raise_after: usize) -> Result<f64> {
    ensure!(raise_after >= 1, "invalid raise_after 0: use 1 or more frames");
    ensure!(!threshold.is_nan(), "invalid threshold: NaN");
    let mut frames = 0usize;
    let mut raised = 0usize;
    for sequence in sequences {
        check_scores("sequence", sequence)?;
        let mut run = 0usize;
        for &score in sequence {
            run = if score > threshold { run + 1 } else { 0 };
            raised += usize::from(run >= raise_after);
        }
        frames += sequence.len();
    }
    ensure!(frames > 0, "no frames to rate");
    Ok(raised as f64 / frames as f64)
}

fn fraction_above(scores: &[f64], threshold: f64) -> Result<f64> {
    ensure!(!threshold.is_nan(), "invalid threshold: NaN");
    let above = scores.iter().filter(|&&score| score > threshold).count();
    Ok(above as f64 / scores.len() as f64)
}

fn check_scores(kind: &str, scores: &[f64]) -> Result<()> {
    if scores.is_empty() {
        bail!("no {kind} scores: every metric needs at least one score of each class");
    }
    if let Some(index) = scores.iter().position(|score| !score.is_finite()) {
        bail!(
            "invalid {kind} score {} at index {index}: scores must be finite",
            scores[index]
        );
    }
    Ok(())
}

/// Cumulative counts of frames at or above one threshold.
struct ThresholdCount {
    threshold: f64,
    true_positives: usize,
    false_positives: usize,
}

/// Returns the cumulative counts at every distinct score, from the highest down.
fn threshold_counts(normal: &[f64], anomalous: &[f64]) -> Result<Vec<ThresholdCount>> {
    check_scores("normal", normal)?;
    check_scores("anomalous", anomalous)?;

    let mut all: Vec<(f64, bool)> = normal.iter().map(|&score| (score, false)).collect();
    all.extend(anomalous.iter().map(|&score| (score, true)));
    all.sort_by(|a, b| b.0.total_cmp(&a.0));

    let mut counts = Vec::new();
    let mut true_positives = 0;
    let mut false_positives = 0;
    for (i, &(score, is_anomalous)) in all.iter().enumerate() {
        if is_anomalous {
            true_positives += 1;
        } else {
            false_positives += 1;
        }
        let last_of_tie = all.get(i + 1).map_or(true, |next| next.0 != score);
        if last_of_tie {
            counts.push(ThresholdCount {
                threshold: score,
                true_positives,
                false_positives,
            });
        }
    }
    Ok(counts)
}
