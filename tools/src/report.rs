//! Metrics, tables and CSV files of an evaluation run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::evaluate::{method_values, Category, Evaluation, Method, ScoredSet};
use crate::metrics::{detection_rate, false_alarm_rate, raised_rate, summarize, DetectionSummary};

/// Detection metrics of one method on one anomalous set against the clean held-out frames.
#[derive(Debug, Clone)]
pub struct MetricRow {
    pub set: String,
    pub category: Category,
    pub method: Method,
    pub summary: DetectionSummary,
    /// Fraction of the set's frames above the method's threshold.
    pub detection_rate: f64,
}

/// Computes the metrics of every method on every anomalous set.
pub fn metric_rows(evaluation: &Evaluation) -> Result<Vec<MetricRow>> {
    let mut rows = Vec::new();
    for set in &evaluation.anomalous {
        for &method in &evaluation.methods {
            let normal = method_values(method, &evaluation.clean)?;
            let anomalous = method_values(method, set)?;
            rows.push(MetricRow {
                set: set.name.clone(),
                category: set.category,
                method,
                summary: summarize(&normal, &anomalous)
                    .with_context(|| format!("metrics of {method} on {}", set.name))?,
                detection_rate: detection_rate(&anomalous, evaluation.thresholds[&method])?,
            });
        }
    }
    Ok(rows)
}

/// The figures the evaluation targets are checked against, for the bundle's deciding score.
#[derive(Debug, Clone)]
pub struct TargetSummary {
    /// Mean AUROC over the perturbation and attack sets.
    pub mean_auroc: f64,
    /// Mean FPR at 95% TPR over the same sets.
    pub mean_fpr_at_95_tpr: f64,
    /// Perturbations where the deciding score's AUROC is not above both MSP's and max logit's.
    pub not_better_than_baselines: Vec<String>,
    /// Attacks whose effect on the segmentation is below the configured minimum.
    pub weak_attacks: Vec<String>,
    /// Fraction of clean held-out frames above the deployed threshold.
    pub clean_false_alarm_rate: f64,
    /// Fraction of benign stills above the deployed threshold, per group.
    pub benign_false_alarm_rates: BTreeMap<String, (usize, usize)>,
}

/// Computes the target figures from the metric rows.
pub fn target_summary(evaluation: &Evaluation, rows: &[MetricRow]) -> Result<TargetSummary> {
    let deciding = Method::Daain(evaluation.deciding);
    let scored: Vec<&MetricRow> = rows
        .iter()
        .filter(|row| row.method == deciding)
        .filter(|row| matches!(row.category, Category::Perturbation | Category::Attack))
        .collect();
    let count = scored.len().max(1) as f64;
    let mean_auroc = scored.iter().map(|row| row.summary.auroc).sum::<f64>() / count;
    let mean_fpr_at_95_tpr = scored.iter().map(|row| row.summary.fpr_at_95_tpr).sum::<f64>() / count;

    let auroc_of = |set: &str, method: Method| {
        rows.iter()
            .find(|row| row.set == set && row.method == method)
            .map(|row| row.summary.auroc)
    };
    let not_better_than_baselines = scored
        .iter()
        .filter(|row| row.category == Category::Perturbation)
        .filter(|row| {
            [Method::MaxSoftmax, Method::MaxLogit]
                .iter()
                .any(|&baseline| auroc_of(&row.set, baseline).is_some_and(|auroc| auroc >= row.summary.auroc))
        })
        .map(|row| row.set.clone())
        .collect();
    let weak_attacks = evaluation
        .anomalous
        .iter()
        .filter(|set| set.attack.is_some_and(|effect| effect.strength() < evaluation.min_attack_effect))
        .map(|set| set.name.clone())
        .collect();

    let clean = method_values(deciding, &evaluation.clean)?;
    let clean_false_alarm_rate = false_alarm_rate(&clean, evaluation.deployed_threshold)?;
    let mut benign_false_alarm_rates = BTreeMap::new();
    if let Some(benign) = &evaluation.benign {
        let values = method_values(deciding, benign)?;
        for (value, group) in values.iter().zip(&benign.groups) {
            let entry = benign_false_alarm_rates.entry(group.clone()).or_insert((0, 0));
            entry.1 += 1;
            if *value > evaluation.deployed_threshold {
                entry.0 += 1;
            }
        }
    }
    Ok(TargetSummary {
        mean_auroc,
        mean_fpr_at_95_tpr,
        not_better_than_baselines,
        weak_attacks,
        clean_false_alarm_rate,
        benign_false_alarm_rates,
    })
}

fn find<'a>(rows: &'a [MetricRow], set: &str, method: Method) -> Option<&'a MetricRow> {
    rows.iter().find(|row| row.set == set && row.method == method)
}

/// Formats a fraction as a percentage with one decimal.
pub(crate) fn percent(value: f64) -> String {
    format!("{:.1}%", 100.0 * value)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

/// Formats the report as Markdown: targets, the main table, AUROC and FPR of every score,
/// attack effects, false alarms on clean and benign footage.
pub fn markdown(evaluation: &Evaluation, rows: &[MetricRow], targets: &TargetSummary) -> String {
    let deciding = Method::Daain(evaluation.deciding);
    let mut out = String::new();
    let _ = writeln!(out, "## Targets (deciding score `{}`)\n", evaluation.deciding);
    let _ = writeln!(out, "| target | measured | met |\n|---|---|---|");
    let _ = writeln!(
        out,
        "| mean AUROC over perturbations and attacks >= 0.95 | {:.3} | {} |",
        targets.mean_auroc,
        met(targets.mean_auroc >= 0.95)
    );
    let _ = writeln!(
        out,
        "| mean FPR at 95% TPR <= 0.10 | {:.3} | {} |",
        targets.mean_fpr_at_95_tpr,
        met(targets.mean_fpr_at_95_tpr <= 0.10)
    );
    let _ = writeln!(
        out,
        "| AUROC above MSP and max logit on every perturbation | not above on: {} | {} |",
        list_or_none(&targets.not_better_than_baselines),
        met(targets.not_better_than_baselines.is_empty())
    );
    let _ = writeln!(
        out,
        "| every attack changes the segmentation (effect >= {}) | weak: {} | {} |",
        percent(evaluation.min_attack_effect),
        list_or_none(&targets.weak_attacks),
        met(targets.weak_attacks.is_empty())
    );
    let _ = writeln!(
        out,
        "\nFalse alarms at the deployed threshold ({:.3}) on the {} clean held-out frames: {}.",
        evaluation.deployed_threshold,
        evaluation.clean.scores.len(),
        percent(targets.clean_false_alarm_rate)
    );
    for (group, (flagged, total)) in &targets.benign_false_alarm_rates {
        let _ = writeln!(out, "Benign stills, {group}: {flagged} of {total} flagged.");
    }

    let _ = writeln!(out, "\n## Detection per set\n");
    let _ = writeln!(
        out,
        "AUROC, AUPR (average precision) and FPR at 95% TPR against the {} clean held-out frames. \
         \"Detected\" is the share of frames above the deployed threshold. \"Seg. change\" is the \
         share of pixels whose class differs from the clean frame's; for targeted attacks the \
         target class share before and after follows.\n",
        evaluation.clean.scores.len()
    );
    let baselines: Vec<Method> = evaluation
        .methods
        .iter()
        .copied()
        .filter(|method| !matches!(method, Method::Daain(_)))
        .collect();
    let mut header = format!("| set | frames | seg. change | {deciding} AUROC | AUPR | FPR@95 | detected |");
    let mut rule = "|---|---|---|---|---|---|---|".to_owned();
    for method in &baselines {
        let _ = write!(header, " {method} AUROC |");
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for set in &evaluation.anomalous {
        let Some(row) = find(rows, &set.name, deciding) else {
            continue;
        };
        let _ = write!(
            out,
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {} |",
            set.name,
            set.scores.len(),
            effect_text(set),
            row.summary.auroc,
            row.summary.average_precision,
            row.summary.fpr_at_95_tpr,
            percent(row.detection_rate)
        );
        for &method in &baselines {
            let auroc = find(rows, &set.name, method).map_or_else(|| "-".to_owned(), |r| format!("{:.3}", r.summary.auroc));
            let _ = write!(out, " {auroc} |");
        }
        out.push('\n');
    }

    for (title, pick) in [
        ("AUROC of every score", 0usize),
        ("FPR at 95% TPR of every score", 1usize),
    ] {
        let _ = writeln!(out, "\n## {title}\n");
        let mut header = "| set |".to_owned();
        let mut rule = "|---|".to_owned();
        for method in &evaluation.methods {
            let _ = write!(header, " {method} |");
            rule.push_str("---|");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for set in &evaluation.anomalous {
            let _ = write!(out, "| {} |", set.name);
            for &method in &evaluation.methods {
                let value = find(rows, &set.name, method).map_or(f64::NAN, |row| {
                    if pick == 0 {
                        row.summary.auroc
                    } else {
                        row.summary.fpr_at_95_tpr
                    }
                });
                let _ = write!(out, " {value:.3} |");
            }
            out.push('\n');
        }
    }

    let attacks: Vec<&ScoredSet> = evaluation.anomalous.iter().filter(|set| set.attack.is_some()).collect();
    if !attacks.is_empty() {
        let _ = writeln!(out, "\n## Attacks\n");
        let _ = writeln!(
            out,
            "| attack | frames | max abs. pixel change | mean abs. pixel change | pixels changed | target share clean -> attacked |\n|---|---|---|---|---|---|"
        );
        for set in attacks {
            let effect = set.attack.expect("filtered on attack");
            let target = effect
                .target_fraction
                .map_or_else(|| "-".to_owned(), |(before, after)| format!("{} -> {}", percent(before), percent(after)));
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.2} | {} | {} |",
                set.name,
                set.scores.len(),
                effect.max_abs_change,
                effect.mean_abs_change,
                percent(effect.changed_fraction),
                target
            );
        }
    }

    let _ = writeln!(out, "\n## False alarms at each score's threshold\n");
    let _ = writeln!(
        out,
        "Thresholds pass {} of the {} calibration frames; the deciding score uses the bundle's own. \
         Rates are the share of frames above the threshold.\n",
        percent(evaluation.false_positive_rate),
        evaluation.calibration.scores.len()
    );
    let _ = writeln!(out, "| score | threshold | clean held-out | benign stills |\n|---|---|---|---|");
    for &method in &evaluation.methods {
        let threshold = evaluation.thresholds[&method];
        let clean = method_values(method, &evaluation.clean)
            .ok()
            .and_then(|values| false_alarm_rate(&values, threshold).ok())
            .map_or_else(|| "-".to_owned(), percent);
        let benign = evaluation
            .benign
            .as_ref()
            .and_then(|set| method_values(method, set).ok())
            .map_or_else(
                || "-".to_owned(),
                |values| {
                    let flagged = values.iter().filter(|&&v| v > threshold).count();
                    format!("{flagged} of {}", values.len())
                },
            );
        let _ = writeln!(out, "| {method} | {threshold:.4} | {clean} | {benign} |");
    }

    smoothing_section(&mut out, evaluation);

    if let Some(benign) = &evaluation.benign {
        let _ = writeln!(out, "\n## Benign stills\n");
        let _ = writeln!(out, "| image | group | {deciding} | flagged |\n|---|---|---|---|");
        for ((label, group), scores) in benign.labels.iter().zip(&benign.groups).zip(&benign.scores) {
            let value = deciding.value(scores).unwrap_or(f64::NAN);
            let flagged = if value > evaluation.deployed_threshold { "yes" } else { "no" };
            let _ = writeln!(out, "| {label} | {group} | {value:.1} | {flagged} |");
        }
    }
    out
}

/// Alert settings `raise_after` compared in the temporal smoothing table.
const RAISE_AFTER: [usize; 4] = [1, 2, 3, 5];

/// Writes the share of frames at a raised alert level for several `raise_after` settings,
/// on the clean held-out frames and on every set of consecutive clip frames.
fn smoothing_section(out: &mut String, evaluation: &Evaluation) {
    let deciding = Method::Daain(evaluation.deciding);
    let sets = std::iter::once(&evaluation.clean).chain(
        evaluation
            .anomalous
            .iter()
            .filter(|set| matches!(set.category, Category::Perturbation | Category::OutOfDistribution)),
    );
    let _ = writeln!(out, "\n## Temporal smoothing\n");
    let _ = writeln!(
        out,
        "The runtime raises its alert level after `alerts.raise_after` consecutive frames above \
         the threshold. Share of frames at a raised level, deciding score at the deployed \
         threshold, frames in time order; a gap in the frame numbers starts a new run. On the \
         clean held-out frames every raised frame is a false alarm.\n"
    );
    let mut header = "| set | frames | runs |".to_owned();
    let mut rule = "|---|---|---|".to_owned();
    for k in RAISE_AFTER {
        let _ = write!(header, " raise_after {k} |");
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for set in sets {
        let Ok(values) = method_values(deciding, set) else {
            continue;
        };
        let sequences = consecutive_runs(&set.labels, &values);
        let _ = write!(out, "| {} | {} | {} |", set.name, values.len(), sequences.len());
        for k in RAISE_AFTER {
            let rate = raised_rate(&sequences, evaluation.deployed_threshold, k).map_or_else(|_| "-".to_owned(), percent);
            let _ = write!(out, " {rate} |");
        }
        out.push('\n');
    }
}

/// Splits scores into runs of frames whose numbers advance by the set's smallest step.
/// Labels that are not frame numbers give one run per frame.
fn consecutive_runs(labels: &[String], values: &[f64]) -> Vec<Vec<f64>> {
    let numbers: Option<Vec<u64>> = labels.iter().map(|label| label.parse().ok()).collect();
    let Some(numbers) = numbers else {
        return values.iter().map(|&value| vec![value]).collect();
    };
    let step = numbers.windows(2).filter_map(|pair| pair[1].checked_sub(pair[0])).filter(|&d| d > 0).min();
    let mut runs: Vec<Vec<f64>> = Vec::new();
    for (i, &value) in values.iter().enumerate() {
        let continues = i > 0 && step.is_some_and(|step| numbers[i].checked_sub(numbers[i - 1]) == Some(step));
        match runs.last_mut() {
            Some(run) if continues => run.push(value),
            _ => runs.push(vec![value]),
        }
    }
    runs
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn effect_text(set: &ScoredSet) -> String {
    match set.attack {
        None => "-".to_owned(),
        Some(effect) => match effect.target_fraction {
            None => percent(effect.changed_fraction),
            Some((before, after)) => format!(
                "{} ({} -> {})",
                percent(effect.changed_fraction),
                percent(before),
                percent(after)
            ),
        },
    }
}

/// Writes one CSV row per (set, method) with the metrics and the attack effect.
pub fn write_results_csv(path: &Path, evaluation: &Evaluation, rows: &[MetricRow]) -> Result<()> {
    let mut out = String::from(
        "set,category,method,frames,auroc,aupr,fpr_at_95_tpr,threshold,detection_rate,changed_fraction,target_share_clean,target_share_attacked,max_abs_pixel_change\n",
    );
    for row in rows {
        let set = evaluation
            .anomalous
            .iter()
            .find(|set| set.name == row.set)
            .context("metric row of an unknown set")?;
        let (changed, before, after, max_change) = match set.attack {
            None => (String::new(), String::new(), String::new(), String::new()),
            Some(effect) => (
                format!("{:.6}", effect.changed_fraction),
                effect.target_fraction.map_or_else(String::new, |(b, _)| format!("{b:.6}")),
                effect.target_fraction.map_or_else(String::new, |(_, a)| format!("{a:.6}")),
                effect.max_abs_change.to_string(),
            ),
        };
        let _ = writeln!(
            out,
            "{},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{changed},{before},{after},{max_change}",
            row.set,
            row.category.name(),
            row.method,
            set.scores.len(),
            row.summary.auroc,
            row.summary.average_precision,
            row.summary.fpr_at_95_tpr,
            evaluation.thresholds[&row.method],
            row.detection_rate,
        );
    }
    std::fs::write(path, out).with_context(|| format!("failed to write {}", path.display()))
}

/// Writes one CSV row per scored frame with every method's score, so tables and plots
/// can be recomputed without scoring again.
pub fn write_frames_csv(path: &Path, evaluation: &Evaluation) -> Result<()> {
    let mut out = String::from("set,category,frame,group");
    for method in &evaluation.methods {
        let _ = write!(out, ",{method}");
    }
    out.push('\n');
    let sets = [&evaluation.calibration, &evaluation.clean]
        .into_iter()
        .chain(&evaluation.anomalous)
        .chain(evaluation.benign.as_ref());
    for set in sets {
        for (i, scores) in set.scores.iter().enumerate() {
            let group = set.groups.get(i).map_or("", String::as_str);
            let _ = write!(out, "{},{},{},{group}", set.name, set.category.name(), set.labels[i]);
            for &method in &evaluation.methods {
                match method.value(scores) {
                    Some(value) => {
                        let _ = write!(out, ",{value:.6}");
                    }
                    None => out.push(','),
                }
            }
            out.push('\n');
        }
    }
    std::fs::write(path, out).with_context(|| format!("failed to write {}", path.display()))
}

/// Writes `results.md`, `results.csv`, `frames.csv`, one `roc-SET.png` per anomalous set
/// and `timeline.png` into `dir`. `command` is the command line quoted in `results.md`.
pub fn write_all(evaluation: &Evaluation, dir: &Path, command: &str) -> Result<TargetSummary> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let rows = metric_rows(evaluation)?;
    let targets = target_summary(evaluation, &rows)?;

    let mut text = String::from("# Evaluation results\n\n");
    let _ = writeln!(
        text,
        "Bundle `{}` with its {} backbone, normal class: {} held-out frames of `{}` (frames {}). Written by\n\n```sh\n{command}\n```\n\nin {:.0} s.\n",
        evaluation.bundle.display(),
        evaluation.backbone,
        evaluation.clean.scores.len(),
        evaluation.video.display(),
        evaluation.clean.labels.join(", "),
        evaluation.seconds
    );
    text.push_str(&markdown(evaluation, &rows, &targets));
    let _ = writeln!(text, "\n## Time per set\n\n| set | frames | seconds |\n|---|---|---|");
    let sets = [&evaluation.calibration, &evaluation.clean]
        .into_iter()
        .chain(&evaluation.anomalous)
        .chain(evaluation.benign.as_ref());
    for set in sets {
        let _ = writeln!(text, "| {} | {} | {:.1} |", set.name, set.scores.len(), set.seconds);
    }
    let path = dir.join("results.md");
    std::fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    write_results_csv(&dir.join("results.csv"), evaluation, &rows)?;
    write_frames_csv(&dir.join("frames.csv"), evaluation)?;

    let deciding = Method::Daain(evaluation.deciding);
    let mut plotted = vec![deciding];
    if deciding != Method::Daain(daain::score::ScoreKind::Hbos) {
        plotted.push(Method::Daain(daain::score::ScoreKind::Hbos));
    }
    plotted.extend(evaluation.methods.iter().filter(|m| !matches!(m, Method::Daain(_))));
    for set in &evaluation.anomalous {
        let mut curves = Vec::new();
        for &method in &plotted {
            let normal = method_values(method, &evaluation.clean)?;
            let anomalous = method_values(method, set)?;
            curves.push((method.name(), crate::metrics::roc_curve(&normal, &anomalous)?));
        }
        let file = format!("roc-{}.png", set.name);
        crate::plot::roc_plot(&dir.join(file), &format!("ROC: {} vs clean", set.name), &curves)?;
    }

    let mut segments = vec![crate::plot::TimelineSegment {
        label: "held-out clip frames".to_owned(),
        scores: method_values(deciding, &evaluation.clean)?,
    }];
    if let Some(set) = evaluation.anomalous.iter().find(|set| set.category == Category::OutOfDistribution) {
        segments.push(crate::plot::TimelineSegment {
            label: set.name.clone(),
            scores: method_values(deciding, set)?,
        });
    }
    crate::plot::timeline_plot(
        &dir.join("timeline.png"),
        &format!("{} per frame, threshold {:.1}", evaluation.deciding, evaluation.deployed_threshold),
        &segments,
        evaluation.deployed_threshold,
    )?;
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::consecutive_runs;

    fn labels(numbers: &[u64]) -> Vec<String> {
        numbers.iter().map(u64::to_string).collect()
    }

    #[test]
    fn runs_break_at_gaps_in_frame_numbers() {
        let values = [1.0, 2.0, 3.0, 4.0, 5.0];
        let runs = consecutive_runs(&labels(&[80, 81, 82, 180, 181]), &values);
        assert_eq!(runs, vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0]]);
        // A set sampled every 20th frame is one run.
        let runs = consecutive_runs(&labels(&[0, 20, 40, 60, 80]), &values);
        assert_eq!(runs, vec![values.to_vec()]);
        // Still images have no frame numbers: one run each.
        let stills = ["a.jpg".to_owned(), "b.jpg".to_owned()];
        assert_eq!(consecutive_runs(&stills, &[1.0, 2.0]), vec![vec![1.0], vec![2.0]]);
    }
}
