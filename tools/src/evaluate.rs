//! `daain-tools evaluate`: scores clean held-out frames, perturbed and attacked versions of
//! them, out-of-distribution footage and benign stills with a bundle, through the
//! runtime's own [`Detector`], and compares DAAIN with baselines computed from the same
//! forward pass.
//!
//! The normal class is the bundle's held-out test frames: frames of its training clip that
//! neither flow training nor threshold calibration saw. They are recovered from the split
//! settings stored in the bundle manifest. Every other score's threshold is calibrated on
//! the bundle's calibration frames at the bundle's false-positive rate, as the bundle's
//! own threshold was.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use daain::bundle::Bundle;
use daain::backbone::BackbonePrecision;
use daain::pipeline::{Detector, DetectorOptions, Scores, StageTimings};
use daain::preprocess::{InputConvention, Preprocessor};
use daain::score::ScoreKind;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

use crate::attack::{self, AttackSpec};
use crate::baseline::{self, LogitScores};
use crate::espnet::Espnet;
use crate::perturb::Perturbation;
use crate::training::{quantile, role_of, Role, TrainingConfig};

/// Settings of `daain-tools evaluate` (TOML), for example `configs/eval-default.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Bundle to evaluate; `--bundle` overrides it.
    pub bundle: PathBuf,
    /// ESPNet weights for the attacks and Monte Carlo dropout (`.safetensors` or `.pth`).
    pub weights: PathBuf,
    /// Seeds perturbations and dropout masks.
    pub seed: u64,
    /// Uses only this many held-out frames, evenly spaced, when set (for quick runs).
    #[serde(default)]
    pub max_test_frames: Option<usize>,
    /// Backbone the runtime's detector runs: "f32" or "int8" (the bundle's quantised copy).
    /// The baselines come from the same forward pass, so they change with it.
    #[serde(default)]
    pub backbone: BackbonePrecision,
    #[serde(default)]
    pub perturbations: Vec<PerturbationRun>,
    #[serde(default)]
    pub attacks: Option<AttackConfig>,
    #[serde(default)]
    pub mc_dropout: Option<McDropoutConfig>,
    #[serde(default)]
    pub out_of_distribution: Option<OutOfDistributionConfig>,
    /// Footage of normal scenes that the bundle never saw, where every alert is false.
    #[serde(default)]
    pub benign: Vec<BenignStill>,
    /// Attacks whose mean effect (changed pixels, or pixels of the target class gained)
    /// stays below this fraction are reported as weak.
    #[serde(default = "default_min_attack_effect")]
    pub min_attack_effect: f64,
}

fn default_min_attack_effect() -> f64 {
    0.1
}

/// One perturbation of every held-out frame.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PerturbationRun {
    /// Name as `daain_tools::perturb::Perturbation` parses it, for example `fog`.
    pub name: String,
    /// 1 (mild) to 5 (strong).
    pub severity: u8,
}

/// Attacks on a subset of the held-out frames.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttackConfig {
    /// Number of held-out frames attacked, evenly spaced over them.
    pub frames: usize,
    pub runs: Vec<AttackSpec>,
}

/// Monte Carlo dropout baseline.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct McDropoutConfig {
    /// Dropout rate on the 256 encoder features before the classifier.
    pub rate: f64,
    /// Forward passes averaged per frame.
    pub passes: usize,
}

/// Real footage unlike the training clip.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutOfDistributionConfig {
    pub video: PathBuf,
    /// Every `step`-th frame is scored, starting at frame 0.
    pub step: usize,
    /// Number of frames scored.
    pub frames: usize,
}

/// A still image of a normal scene.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BenignStill {
    pub path: PathBuf,
    /// Group the false-alarm rate is reported for, for example "same camera".
    pub group: String,
}

impl EvalConfig {
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read evaluation config {}", path.display()))?;
        let config: Self = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("invalid evaluation config {}: {}", path.display(), e.message())
        })?;
        config
            .validate()
            .with_context(|| format!("invalid evaluation config {}", path.display()))?;
        Ok(config)
    }

    /// Checks every setting that would otherwise fail part way through a long run.
    pub fn validate(&self) -> Result<()> {
        for run in &self.perturbations {
            run.name.parse::<Perturbation>()?;
            ensure!(
                (crate::perturb::MIN_SEVERITY..=crate::perturb::MAX_SEVERITY).contains(&run.severity),
                "invalid severity {} for {}: expected 1 to 5",
                run.severity,
                run.name
            );
        }
        if let Some(attacks) = &self.attacks {
            ensure!(attacks.frames > 0, "attacks.frames is 0: attack at least 1 frame or remove [attacks]");
            for spec in &attacks.runs {
                spec.validate()?;
            }
        }
        if let Some(mc) = &self.mc_dropout {
            ensure!(mc.passes > 0, "mc_dropout.passes is 0: use at least 1 pass");
            ensure!(
                (0.0..1.0).contains(&mc.rate),
                "invalid mc_dropout.rate {}: expected a value in [0, 1)",
                mc.rate
            );
        }
        if let Some(ood) = &self.out_of_distribution {
            ensure!(ood.step > 0 && ood.frames > 0, "out_of_distribution.step and .frames must be at least 1");
        }
        if let Some(max) = self.max_test_frames {
            ensure!(max >= 2, "max_test_frames {max} is too small: use at least 2");
        }
        ensure!(
            (0.0..=1.0).contains(&self.min_attack_effect),
            "invalid min_attack_effect {}: expected a fraction in [0, 1]",
            self.min_attack_effect
        );
        Ok(())
    }
}

/// An anomaly score under evaluation. Every method's score is higher for more anomalous
/// frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// A DAAIN score computed by the runtime.
    Daain(ScoreKind),
    /// Negative mean maximum softmax probability.
    MaxSoftmax,
    /// Negative mean max logit.
    MaxLogit,
    /// Mean predictive entropy under Monte Carlo dropout.
    McDropout,
}

impl Method {
    /// Returns the column name used in tables and CSV files.
    pub fn name(self) -> String {
        match self {
            Method::Daain(kind) => format!("daain-{kind}"),
            Method::MaxSoftmax => "max-softmax".to_owned(),
            Method::MaxLogit => "max-logit".to_owned(),
            Method::McDropout => "mc-dropout".to_owned(),
        }
    }

    /// Returns the method's score of one frame; `None` when it was not computed.
    pub fn value(self, scores: &FrameScores) -> Option<f64> {
        match self {
            Method::Daain(kind) => Some(scores.daain.get(kind)),
            Method::MaxSoftmax => Some(scores.logits.max_softmax),
            Method::MaxLogit => Some(scores.logits.max_logit),
            Method::McDropout => scores.mc_dropout_entropy,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Every score of one frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameScores {
    pub daain: Scores,
    pub logits: LogitScores,
    /// Mean predictive entropy in nats; `None` without `[mc_dropout]`.
    pub mc_dropout_entropy: Option<f64>,
}

/// Kind of a set of frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    Calibration,
    Clean,
    Perturbation,
    Attack,
    /// The attacked frames resized to the network size without an attack: separates the
    /// effect of the attack from that of rounding the resized frame to `u8`.
    Control,
    OutOfDistribution,
    Benign,
}

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Calibration => "calibration",
            Category::Clean => "clean",
            Category::Perturbation => "perturbation",
            Category::Attack => "attack",
            Category::Control => "control",
            Category::OutOfDistribution => "out-of-distribution",
            Category::Benign => "benign",
        }
    }
}

/// Effect of an attack on the frames and their segmentation, averaged over frames.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttackEffect {
    /// Fraction of pixels whose class differs from the clean frame's.
    pub changed_fraction: f64,
    /// Target class share of the pixels before and after the attack.
    pub target_fraction: Option<(f64, f64)>,
    /// Largest absolute change of a channel value over all frames, in pixel units.
    pub max_abs_change: u8,
    pub mean_abs_change: f64,
}

impl AttackEffect {
    /// Returns the fraction the report checks against `min_attack_effect`: the changed
    /// pixels of an untargeted attack, the share of the target class gained otherwise.
    pub fn strength(&self) -> f64 {
        match self.target_fraction {
            Some((before, after)) => after - before,
            None => self.changed_fraction,
        }
    }
}

/// Scores of one set of frames.
#[derive(Debug, Clone)]
pub struct ScoredSet {
    pub name: String,
    pub category: Category,
    /// One label per frame: the frame index in its clip, or the file name of a still.
    pub labels: Vec<String>,
    /// Group of each frame (benign stills only).
    pub groups: Vec<String>,
    pub scores: Vec<FrameScores>,
    pub attack: Option<AttackEffect>,
    /// Wall time spent producing and scoring the set, in seconds.
    pub seconds: f64,
}

/// Everything an evaluation run measured.
pub struct Evaluation {
    pub bundle: PathBuf,
    /// Backbone model the detector ran.
    pub backbone: BackbonePrecision,
    pub video: PathBuf,
    pub deciding: ScoreKind,
    pub deployed_threshold: f64,
    pub false_positive_rate: f64,
    pub methods: Vec<Method>,
    /// Threshold of every method: the bundle's for the deciding score, calibrated on the
    /// calibration frames for every other.
    pub thresholds: HashMap<Method, f64>,
    pub calibration: ScoredSet,
    pub clean: ScoredSet,
    /// Perturbed, attacked, control and out-of-distribution sets, each compared with
    /// `clean`.
    pub anomalous: Vec<ScoredSet>,
    pub benign: Option<ScoredSet>,
    pub min_attack_effect: f64,
    pub seconds: f64,
}

/// Frame split of the bundle's training clip, read back from its manifest.
pub struct HeldOutFrames {
    pub video: PathBuf,
    pub calibration: Vec<u64>,
    pub test: Vec<u64>,
}

/// Recovers the calibration and test frame indices from the training settings stored in
/// the bundle manifest, and checks them against the frames the manifest lists.
pub fn held_out_frames(bundle: &Bundle) -> Result<HeldOutFrames> {
    let training = &bundle.manifest().training;
    let settings: TrainingConfig = serde_json::from_value(training["settings"].clone()).with_context(|| {
        format!(
            "bundle {} has no readable training settings in its manifest; evaluate needs a bundle built by daain-tools",
            bundle.dir().display()
        )
    })?;
    let listed_test: Vec<u64> = serde_json::from_value(training["test_frames"].clone())
        .context("bundle manifest lists no training.test_frames")?;
    let last = listed_test.iter().max().copied().context("bundle manifest lists no test frames")? as usize;
    // The clip length is not stored, but a full cycle of the pattern past the last test
    // frame reaches every calibration frame the bundle can have used. Calibration frames
    // past the end of the clip are cut off by the count the manifest stores.
    let bound = settings
        .data
        .max_frames
        .unwrap_or(last + 1 + settings.data.chunk_frames * settings.data.pattern.len());
    let mut calibration = Vec::new();
    let mut test = Vec::new();
    for index in 0..bound {
        match role_of(index, settings.data.chunk_frames, &settings.data.pattern) {
            Role::Calibration => calibration.push(index as u64),
            Role::Test => test.push(index as u64),
            Role::Train => {}
        }
    }
    test.truncate(listed_test.len());
    ensure!(
        test == listed_test,
        "the split settings in the manifest give test frames {test:?}, but it lists {listed_test:?}"
    );
    // Photometric variants of calibration frames count as calibration vectors too.
    let vectors_per_frame = 1 + settings.augment.calibration_photometric;
    let calibration_count = bundle.manifest().threshold.calibration_frames / vectors_per_frame;
    ensure!(
        calibration.len() >= calibration_count,
        "the split settings give {} calibration frames, but the threshold was calibrated on {calibration_count}",
        calibration.len()
    );
    calibration.truncate(calibration_count);
    Ok(HeldOutFrames {
        video: settings.data.video,
        calibration,
        test,
    })
}

/// Decodes the frames of a video whose indices are in `indices`, stopping after the last.
pub fn read_video_frames(path: &Path, indices: &[u64]) -> Result<Vec<Frame>> {
    let last = indices.iter().max().copied().context("no frame indices requested")?;
    let mut source = open_source(&SourceSpec::Video(path.to_owned()), &SourceOptions::default())
        .with_context(|| format!("failed to open video {}", path.display()))?;
    let mut frames = Vec::with_capacity(indices.len());
    let mut frame = Frame::new();
    while source.next_frame(&mut frame)? {
        if indices.contains(&frame.index) {
            frames.push(frame.clone());
        }
        if frame.index >= last {
            break;
        }
    }
    ensure!(
        frames.len() == indices.len(),
        "video {} has {} of the {} requested frames (last requested {last})",
        path.display(),
        frames.len(),
        indices.len()
    );
    Ok(frames)
}

/// Decodes one still image with the runtime's image source.
pub fn read_still(path: &Path) -> Result<Frame> {
    let mut source = open_source(&SourceSpec::Stills(vec![path.to_owned()]), &SourceOptions::default())
        .with_context(|| format!("failed to open image {}", path.display()))?;
    let mut frame = Frame::new();
    ensure!(source.next_frame(&mut frame)?, "image {} has no frame", path.display());
    Ok(frame)
}

/// Returns `count` indices evenly spaced over `0..len` (all of them when `count >= len`).
pub fn evenly_spaced(len: usize, count: usize) -> Vec<usize> {
    if count >= len {
        return (0..len).collect();
    }
    (0..count).map(|i| i * len / count).collect()
}

/// Scores frames with the runtime's detector and the baselines.
pub struct FrameScorer<'b> {
    detector: Detector<'b>,
    classes: usize,
    mc_dropout: Option<(McDropoutConfig, &'b Espnet)>,
    preprocessor: Preprocessor,
    input: Vec<f32>,
    seed: u64,
}

impl<'b> FrameScorer<'b> {
    pub fn new(
        bundle: &'b Bundle,
        precision: BackbonePrecision,
        mc_dropout: Option<(McDropoutConfig, &'b Espnet)>,
        seed: u64,
    ) -> Result<Self> {
        let convention = bundle.manifest().input.clone();
        let options = DetectorOptions {
            precision,
            ..Default::default()
        };
        Ok(Self {
            detector: Detector::with_options(bundle, &options)?,
            classes: bundle.manifest().backbone.classes,
            mc_dropout,
            input: vec![0.0; convention.tensor_len()],
            preprocessor: Preprocessor::new(convention),
            seed,
        })
    }

    pub fn detector(&self) -> &Detector<'b> {
        &self.detector
    }

    /// Scores one frame. With `segment`, the class map is left in
    /// [`Detector::segmentation`].
    pub fn score(&mut self, frame: &Frame, segment: bool) -> Result<FrameScores> {
        let mut timings = StageTimings::default();
        let mut logits = None;
        let classes = self.classes;
        self.detector
            .sample_frame_with_logits(frame, segment, &mut timings, |values| {
                logits = Some(baseline::logit_scores(values, classes));
            })?;
        let logits = logits.context("the detector passed no logits")??;
        let daain = self.detector.score_sample(&mut timings)?;
        let mc_dropout_entropy = match &self.mc_dropout {
            Some((config, model)) => {
                self.preprocessor
                    .run(&frame.data, frame.width, frame.height, &mut self.input)?;
                let convention = self.preprocessor.convention();
                let input = Tensor::from_slice(&self.input).view([
                    1,
                    3,
                    convention.height as i64,
                    convention.width as i64,
                ]);
                // One seed per frame, so a frame's dropout masks do not depend on the
                // order in which sets are scored.
                tch::manual_seed((self.seed ^ frame.index) as i64);
                let probabilities = model.mc_dropout_probabilities(&input, config.rate, config.passes)?;
                Some(baseline::mean_entropy(&probabilities))
            }
            None => None,
        };
        Ok(FrameScores {
            daain,
            logits,
            mc_dropout_entropy,
        })
    }

    /// Scores frames as one set.
    pub fn score_set(&mut self, name: &str, category: Category, frames: &[Frame]) -> Result<ScoredSet> {
        let start = Instant::now();
        let mut scores = Vec::with_capacity(frames.len());
        for frame in frames {
            scores.push(
                self.score(frame, false)
                    .with_context(|| format!("failed to score frame {} of {name}", frame.index))?,
            );
        }
        Ok(ScoredSet {
            name: name.to_owned(),
            category,
            labels: frames.iter().map(|f| f.index.to_string()).collect(),
            groups: Vec::new(),
            scores,
            attack: None,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// Runs the evaluation that `config` describes on the bundle in `bundle_dir`.
pub fn evaluate(config: &EvalConfig, bundle_dir: &Path) -> Result<Evaluation> {
    config.validate()?;
    let start = Instant::now();
    let bundle = Bundle::open(bundle_dir)?;
    let manifest = bundle.manifest();
    let convention = manifest.input.clone();
    let split = held_out_frames(&bundle)?;
    let mut test_indices = split.test.clone();
    if let Some(max) = config.max_test_frames {
        test_indices = evenly_spaced(test_indices.len(), max)
            .into_iter()
            .map(|i| test_indices[i])
            .collect();
    }
    let mut requested: Vec<u64> = split.calibration.iter().chain(&test_indices).copied().collect();
    requested.sort_unstable();
    log::info!(
        "reading {} calibration and {} held-out frames of {}",
        split.calibration.len(),
        test_indices.len(),
        split.video.display()
    );
    let frames = read_video_frames(&split.video, &requested)?;
    let calibration_frames: Vec<Frame> =
        frames.iter().filter(|f| split.calibration.contains(&f.index)).cloned().collect();
    let test_frames: Vec<Frame> = frames.into_iter().filter(|f| test_indices.contains(&f.index)).collect();

    let needs_model = config.mc_dropout.is_some() || config.attacks.as_ref().is_some_and(|a| !a.runs.is_empty());
    let model = if needs_model {
        Some(Espnet::load(&config.weights)?)
    } else {
        None
    };
    let mc_dropout = match (&config.mc_dropout, &model) {
        (Some(mc), Some(model)) => Some((mc.clone(), model)),
        _ => None,
    };
    let mut scorer = FrameScorer::new(&bundle, config.backbone, mc_dropout, config.seed)?;

    let calibration = scorer.score_set("calibration", Category::Calibration, &calibration_frames)?;
    log_set(&calibration);
    let clean = scorer.score_set("clean", Category::Clean, &test_frames)?;
    log_set(&clean);

    let mut anomalous = Vec::new();
    for run in &config.perturbations {
        let perturbation: Perturbation = run.name.parse()?;
        let set_start = Instant::now();
        let perturbed = test_frames
            .iter()
            .map(|frame| perturbation.apply(frame, run.severity, config.seed.wrapping_add(frame.index)))
            .collect::<Result<Vec<_>>>()?;
        let name = if perturbation == Perturbation::VerticalFlip {
            perturbation.to_string()
        } else {
            format!("{perturbation}-{}", run.severity)
        };
        let mut set = scorer.score_set(&name, Category::Perturbation, &perturbed)?;
        set.seconds = set_start.elapsed().as_secs_f64();
        log_set(&set);
        anomalous.push(set);
    }

    if let (Some(attacks), Some(model)) = (&config.attacks, &model) {
        anomalous.extend(run_attacks(attacks, model, &mut scorer, &test_frames, &convention)?);
    }

    if let Some(ood) = &config.out_of_distribution {
        let indices: Vec<u64> = (0..ood.frames).map(|i| (i * ood.step) as u64).collect();
        let set_start = Instant::now();
        let frames = read_video_frames(&ood.video, &indices)?;
        let name = ood
            .video
            .file_stem()
            .map_or_else(|| "out-of-distribution".to_owned(), |stem| stem.to_string_lossy().into_owned());
        let mut set = scorer.score_set(&name, Category::OutOfDistribution, &frames)?;
        set.seconds = set_start.elapsed().as_secs_f64();
        log_set(&set);
        anomalous.push(set);
    }

    let benign = if config.benign.is_empty() {
        None
    } else {
        let set_start = Instant::now();
        let frames = config
            .benign
            .iter()
            .map(|still| read_still(&still.path))
            .collect::<Result<Vec<_>>>()?;
        let mut set = scorer.score_set("benign", Category::Benign, &frames)?;
        set.labels = config
            .benign
            .iter()
            .map(|still| still.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()))
            .collect();
        set.groups = config.benign.iter().map(|still| still.group.clone()).collect();
        set.seconds = set_start.elapsed().as_secs_f64();
        log_set(&set);
        Some(set)
    };

    let mut methods: Vec<Method> = ScoreKind::ALL.iter().map(|&kind| Method::Daain(kind)).collect();
    methods.extend([Method::MaxSoftmax, Method::MaxLogit]);
    if config.mc_dropout.is_some() {
        methods.push(Method::McDropout);
    }
    let deciding = manifest.score.kind;
    let deployed_threshold = manifest.threshold.value;
    let false_positive_rate = manifest.threshold.false_positive_rate;
    let mut thresholds = HashMap::new();
    for &method in &methods {
        let threshold = if method == Method::Daain(deciding) {
            deployed_threshold
        } else {
            let values = method_values(method, &calibration)?;
            quantile(&values, 1.0 - false_positive_rate)
        };
        thresholds.insert(method, threshold);
    }

    Ok(Evaluation {
        bundle: bundle_dir.to_owned(),
        backbone: config.backbone,
        video: split.video,
        deciding,
        deployed_threshold,
        false_positive_rate,
        methods,
        thresholds,
        calibration,
        clean,
        anomalous,
        benign,
        min_attack_effect: config.min_attack_effect,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn log_set(set: &ScoredSet) {
    log::info!("scored {} ({} frames) in {:.1} s", set.name, set.scores.len(), set.seconds);
}

/// Attacks evenly spaced held-out frames with every configured attack and scores them.
/// The first set returned is the control: the same frames resized to the network size,
/// not attacked.
fn run_attacks(
    attacks: &AttackConfig,
    model: &Espnet,
    scorer: &mut FrameScorer<'_>,
    test_frames: &[Frame],
    convention: &InputConvention,
) -> Result<Vec<ScoredSet>> {
    let set_start = Instant::now();
    let resized = evenly_spaced(test_frames.len(), attacks.frames)
        .into_iter()
        .map(|i| attack::resize_to_network(&test_frames[i], convention))
        .collect::<Result<Vec<_>>>()?;
    let mut control_scores = Vec::with_capacity(resized.len());
    let mut clean_classes = Vec::with_capacity(resized.len());
    for frame in &resized {
        control_scores.push(scorer.score(frame, true)?);
        clean_classes.push(scorer.detector().segmentation().to_vec());
    }
    let mut sets = vec![ScoredSet {
        name: "resized-control".to_owned(),
        category: Category::Control,
        labels: resized.iter().map(|f| f.index.to_string()).collect(),
        groups: Vec::new(),
        scores: control_scores,
        attack: None,
        seconds: set_start.elapsed().as_secs_f64(),
    }];
    log_set(&sets[0]);

    for spec in &attacks.runs {
        let set_start = Instant::now();
        let mut scores = Vec::with_capacity(resized.len());
        let mut changed = 0.0;
        let mut target_before = 0.0;
        let mut target_after = 0.0;
        let mut max_abs_change = 0u8;
        let mut mean_abs_change = 0.0;
        for (frame, clean) in resized.iter().zip(&clean_classes) {
            let outcome = attack::attack(model, frame, spec, convention)
                .with_context(|| format!("attack {spec} failed on frame {}", frame.index))?;
            scores.push(scorer.score(&outcome.frame, true)?);
            let attacked = scorer.detector().segmentation();
            changed += attack::changed_fraction(clean, attacked)?;
            if let Some(target) = spec.target {
                target_before += attack::class_fraction(clean, target);
                target_after += attack::class_fraction(attacked, target);
            }
            max_abs_change = max_abs_change.max(outcome.max_abs_change);
            mean_abs_change += outcome.mean_abs_change;
        }
        let n = resized.len() as f64;
        let set = ScoredSet {
            name: spec.name(),
            category: Category::Attack,
            labels: resized.iter().map(|f| f.index.to_string()).collect(),
            groups: Vec::new(),
            scores,
            attack: Some(AttackEffect {
                changed_fraction: changed / n,
                target_fraction: spec.target.map(|_| (target_before / n, target_after / n)),
                max_abs_change,
                mean_abs_change: mean_abs_change / n,
            }),
            seconds: set_start.elapsed().as_secs_f64(),
        };
        log_set(&set);
        sets.push(set);
    }
    Ok(sets)
}

/// Returns a method's scores over a set, failing when the method was not computed.
pub fn method_values(method: Method, set: &ScoredSet) -> Result<Vec<f64>> {
    set.scores
        .iter()
        .map(|scores| method.value(scores))
        .collect::<Option<Vec<f64>>>()
        .with_context(|| format!("{method} was not computed for {}", set.name))
}

/// Checks that an evaluation has every set a report needs.
pub fn check_complete(evaluation: &Evaluation) -> Result<()> {
    if evaluation.anomalous.is_empty() {
        bail!("the evaluation has no perturbation, attack or out-of-distribution set; add one to the config");
    }
    Ok(())
}
