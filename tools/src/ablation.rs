//! `daain-tools ablate`: builds one bundle per variant of a training config and evaluates
//! every bundle with the same evaluation settings. One table then shows how one setting
//! (mask density, number of coupling blocks, augmentation) changes detection and false
//! alarms. Every score kind is computed for every bundle, so each row also compares the
//! score kinds.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use daain::score::ScoreKind;

use crate::evaluate::{self, method_values, Category, EvalConfig, Method};
use crate::metrics::false_alarm_rate;
use crate::report::{self, metric_rows, percent};
use crate::training::{self, BuildReport, TrainingConfig};

/// Settings of `daain-tools ablate` (TOML), for example `configs/ablation.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AblationConfig {
    /// Training settings every variant starts from.
    pub train: PathBuf,
    /// Evaluation settings applied to every variant's bundle (its `bundle` is ignored).
    pub evaluate: PathBuf,
    pub variants: Vec<Variant>,
}

/// One bundle to build: the base training settings with some keys replaced.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Row name, also the name of the variant's output directory after every character
    /// other than a letter, a digit or `-` is replaced with `-`.
    pub name: String,
    /// Replaced settings by dotted key, for example `"mask.min_distance" = 30.0`.
    #[serde(default)]
    pub set: toml::Table,
}

impl AblationConfig {
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read ablation config {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid ablation config {}: {}", path.display(), e.message()))?;
        ensure!(!config.variants.is_empty(), "ablation config {} has no [[variants]]", path.display());
        let mut names: Vec<String> = config.variants.iter().map(|v| v.dir_name()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            bail!("two variants share the directory name {}: give them different names", pair[0]);
        }
        Ok(config)
    }
}

impl Variant {
    /// Returns the name of the variant's output directory.
    pub fn dir_name(&self) -> String {
        self.name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
            .collect()
    }

    /// Returns the base training settings with this variant's keys replaced.
    ///
    /// Fails on a key whose parent table does not exist. A misspelt last key fails too,
    /// because the training settings reject unknown fields.
    pub fn apply(&self, base: &toml::Table) -> Result<TrainingConfig> {
        let mut table = base.clone();
        for (key, value) in &self.set {
            let mut parts: Vec<&str> = key.split('.').collect();
            let last = parts.pop().filter(|part| !part.is_empty()).with_context(|| {
                format!("variant {:?}: empty key {key:?}", self.name)
            })?;
            let mut current = &mut table;
            for part in parts {
                current = current
                    .get_mut(part)
                    .and_then(toml::Value::as_table_mut)
                    .with_context(|| {
                        format!("variant {:?} sets {key}, but the training settings have no table [{part}]", self.name)
                    })?;
            }
            current.insert(last.to_owned(), value.clone());
        }
        let config: TrainingConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("variant {:?}: {}", self.name, e.message()))?;
        config.validate().with_context(|| format!("variant {:?}", self.name))?;
        Ok(config)
    }
}

/// Figures of one score kind on one variant's bundle.
#[derive(Debug, Clone)]
pub struct ScoreFigures {
    pub kind: ScoreKind,
    /// Mean AUROC over the perturbation and attack sets.
    pub mean_auroc: f64,
    /// Smallest AUROC over the same sets, and the set it was measured on.
    pub worst: (f64, String),
    /// Mean FPR at 95% TPR over the same sets.
    pub mean_fpr_at_95_tpr: f64,
    /// Share of clean held-out frames above the score's threshold.
    pub clean_false_alarms: f64,
    /// Benign stills above the score's threshold, and their number.
    pub benign_flagged: (usize, usize),
    /// Share of out-of-distribution frames above the threshold, when that set ran.
    pub out_of_distribution_detected: Option<f64>,
}

/// Everything measured on one variant.
#[derive(Debug, Clone)]
pub struct VariantResult {
    pub name: String,
    pub dir: PathBuf,
    pub build: BuildReport,
    pub blocks: usize,
    pub min_distance: f64,
    /// The bundle's deciding score kind.
    pub deciding: ScoreKind,
    pub scores: Vec<ScoreFigures>,
    pub build_seconds: f64,
    pub evaluate_seconds: f64,
}

/// Builds and evaluates every variant, writing each variant's bundle and evaluation under
/// `output/NAME/`, then `ablation.md` and `ablation.csv` into `output`.
pub fn run(config: &AblationConfig, config_path: &Path, output: &Path) -> Result<Vec<VariantResult>> {
    let text = std::fs::read_to_string(&config.train)
        .with_context(|| format!("failed to read training config {}", config.train.display()))?;
    let base: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid training config {}: {}", config.train.display(), e.message()))?;
    let eval_config = EvalConfig::from_path(&config.evaluate)?;
    // Every variant's settings are checked before the first, long, build starts.
    let variants = config
        .variants
        .iter()
        .map(|variant| Ok((variant, variant.apply(&base)?)))
        .collect::<Result<Vec<_>>>()?;

    let mut results = Vec::new();
    for (variant, settings) in variants {
        let dir = output.join(variant.dir_name());
        let bundle_dir = dir.join("bundle");
        log::info!("variant {:?}: building {}", variant.name, bundle_dir.display());
        std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
        let settings_path = dir.join("train.toml");
        let settings_text = toml::to_string(&settings).context("failed to write the variant's training settings")?;
        std::fs::write(&settings_path, settings_text)
            .with_context(|| format!("failed to write {}", settings_path.display()))?;

        let start = Instant::now();
        let build = training::build_bundle(&settings, &settings_path, &bundle_dir)
            .with_context(|| format!("variant {:?}: failed to build its bundle", variant.name))?;
        let build_seconds = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let evaluation = evaluate::evaluate(&eval_config, &bundle_dir)
            .with_context(|| format!("variant {:?}: failed to evaluate its bundle", variant.name))?;
        evaluate::check_complete(&evaluation)?;
        let command = format!(
            "daain-tools ablate --config {} --output {}",
            config_path.display(),
            output.display()
        );
        report::write_all(&evaluation, &dir, &command)?;
        let evaluate_seconds = start.elapsed().as_secs_f64();

        let rows = metric_rows(&evaluation)?;
        let mut scores = Vec::new();
        for &method in &evaluation.methods {
            let Method::Daain(kind) = method else {
                continue;
            };
            let scored: Vec<_> = rows
                .iter()
                .filter(|row| row.method == method)
                .filter(|row| matches!(row.category, Category::Perturbation | Category::Attack))
                .collect();
            ensure!(!scored.is_empty(), "the evaluation settings {} have no perturbation or attack", config.evaluate.display());
            let count = scored.len() as f64;
            let worst = scored
                .iter()
                .min_by(|a, b| a.summary.auroc.total_cmp(&b.summary.auroc))
                .map(|row| (row.summary.auroc, row.set.clone()))
                .expect("checked non-empty");
            let threshold = evaluation.thresholds[&method];
            let benign_flagged = match &evaluation.benign {
                Some(set) => {
                    let values = method_values(method, set)?;
                    (values.iter().filter(|&&v| v > threshold).count(), values.len())
                }
                None => (0, 0),
            };
            let out_of_distribution_detected = rows
                .iter()
                .find(|row| row.method == method && row.category == Category::OutOfDistribution)
                .map(|row| row.detection_rate);
            scores.push(ScoreFigures {
                kind,
                mean_auroc: scored.iter().map(|row| row.summary.auroc).sum::<f64>() / count,
                worst,
                mean_fpr_at_95_tpr: scored.iter().map(|row| row.summary.fpr_at_95_tpr).sum::<f64>() / count,
                clean_false_alarms: false_alarm_rate(&method_values(method, &evaluation.clean)?, threshold)?,
                benign_flagged,
                out_of_distribution_detected,
            });
        }
        let result = VariantResult {
            name: variant.name.clone(),
            dir,
            build,
            blocks: settings.flow.blocks,
            min_distance: settings.mask.min_distance,
            deciding: evaluation.deciding,
            scores,
            build_seconds,
            evaluate_seconds,
        };
        log::info!(
            "variant {:?}: dim {}, built in {:.0} s, evaluated in {:.0} s",
            result.name,
            result.build.dim,
            build_seconds,
            evaluate_seconds
        );
        results.push(result);
        // The tables are rewritten after every variant, so a long run that stops early
        // keeps what it measured.
        write_tables(&results, config, config_path, output)?;
    }
    Ok(results)
}

/// Writes `ablation.md` and `ablation.csv`.
pub fn write_tables(results: &[VariantResult], config: &AblationConfig, config_path: &Path, output: &Path) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(md, "# Ablation\n");
    let _ = writeln!(
        md,
        "Regenerate with `daain-tools ablate --config {} --output {}`. Every variant starts from \
         `{}` and is evaluated with `{}`; each variant's full results are in its own directory.\n",
        config_path.display(),
        output.display(),
        config.train.display(),
        config.evaluate.display()
    );
    let _ = writeln!(
        md,
        "Mean AUROC and FPR at 95% TPR are over the perturbation and attack sets. False alarms \
         are at each score's threshold (the bundle's own for the deciding score, calibrated at \
         the same rate for the others).\n"
    );
    let _ = writeln!(
        md,
        "| variant | min distance | dim | blocks | train vectors | score | mean AUROC | worst AUROC | mean FPR@95 | clean false alarms | benign flagged | OOD detected | build s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from(
        "variant,min_distance,dim,blocks,train_vectors,score,deciding,mean_auroc,worst_auroc,worst_set,mean_fpr_at_95_tpr,clean_false_alarms,benign_flagged,benign_total,ood_detected,build_seconds,evaluate_seconds\n",
    );
    for result in results {
        for score in &result.scores {
            let deciding = score.kind == result.deciding;
            let mark = if deciding { " (deciding)" } else { "" };
            let ood = score.out_of_distribution_detected.map_or_else(|| "-".to_owned(), percent);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {}{mark} | {:.3} | {:.3} ({}) | {:.3} | {} | {} of {} | {ood} | {:.0} |",
                result.name,
                result.min_distance,
                result.build.dim,
                result.blocks,
                result.build.train_vectors,
                score.kind,
                score.mean_auroc,
                score.worst.0,
                score.worst.1,
                score.mean_fpr_at_95_tpr,
                percent(score.clean_false_alarms),
                score.benign_flagged.0,
                score.benign_flagged.1,
                result.build_seconds
            );
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{deciding},{:.6},{:.6},{},{:.6},{:.6},{},{},{},{:.1},{:.1}",
                result.name,
                result.min_distance,
                result.build.dim,
                result.blocks,
                result.build.train_vectors,
                score.kind,
                score.mean_auroc,
                score.worst.0,
                score.worst.1,
                score.mean_fpr_at_95_tpr,
                score.clean_false_alarms,
                score.benign_flagged.0,
                score.benign_flagged.1,
                score.out_of_distribution_detected.map_or_else(String::new, |v| format!("{v:.6}")),
                result.build_seconds,
                result.evaluate_seconds
            );
        }
    }
    std::fs::create_dir_all(output).with_context(|| format!("failed to create {}", output.display()))?;
    for (name, text) in [("ablation.md", md), ("ablation.csv", csv)] {
        let path = output.join(name);
        std::fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = include_str!("../../configs/train-default.toml");

    fn variant(text: &str) -> Variant {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn variant_replaces_dotted_keys() {
        let base: toml::Table = toml::from_str(BASE).unwrap();
        let v = variant("name = \"blocks 4\"\nset = { \"flow.blocks\" = 4, \"mask.min_distance\" = 30.0 }");
        let config = v.apply(&base).unwrap();
        assert_eq!(config.flow.blocks, 4);
        assert_eq!(config.mask.min_distance, 30.0);
        assert_eq!(v.dir_name(), "blocks-4");
        // Keys the variant does not set keep the base value.
        assert_eq!(config.flow.hidden, 10);
    }

    #[test]
    fn variant_with_unknown_key_is_rejected() {
        let base: toml::Table = toml::from_str(BASE).unwrap();
        let error = variant("name = \"x\"\nset = { \"flow.blocs\" = 4 }").apply(&base).unwrap_err().to_string();
        assert!(error.contains("blocs"), "{error}");
        let error = variant("name = \"x\"\nset = { \"flows.blocks\" = 4 }").apply(&base).unwrap_err().to_string();
        assert!(error.contains("no table [flows]"), "{error}");
        let error = variant("name = \"x\"\nset = { \"flow.blocks\" = \"four\" }").apply(&base).unwrap_err().to_string();
        assert!(error.contains("variant \"x\""), "{error}");
    }
}
