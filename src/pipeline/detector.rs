//! The detector: wires preprocessing, backbone, sampling, flow and score together. The
//! stages know nothing of each other. The detector owns the buffers that pass between
//! them, allocated once when it is built, so that scoring a frame allocates nothing of
//! its own after the first frame (tract allocates its node outputs on every run).
//!
//! Backbone, gather and flow run either out of plan, as three stages one after the
//! other, or in plan, as one tract model with custom operators (see [`crate::plan`]).
//! Both compute the same values. [`ExecutionMode`] gives the reasons for the default.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::alert::AlertLevel;
use crate::backbone::{argmax_classes, Backbone, BackboneError, BackbonePrecision, BackboneSpec};
use crate::bundle::{Bundle, BundleError};
use crate::flow::{check_output, Flow, FlowError, FlowScratch};
use crate::plan::{CombinedPlan, PlanSpec};
use crate::preprocess::{PreprocessError, Preprocessor};
use crate::sampling::{GatherPlan, SamplingError};
use crate::score::{Hbos, Mahalanobis, ScoreError, ScoreKind};
use crate::source::Frame;

/// Error while building the detector or scoring a frame.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    #[error("bundle mask does not fit the backbone: {0}")]
    Mask(SamplingError),
    #[error(transparent)]
    Sampling(SamplingError),
    #[error(transparent)]
    Flow(#[from] FlowError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(
        "execution mode in-plan needs a bundle with plan.onnx, and {} has none; add it \
         with `daain-tools export-plan --bundle {}` or set detector.execution = \"out-of-plan\"",
        dir.display(),
        dir.display()
    )]
    MissingPlan { dir: std::path::PathBuf },
    #[error(
        "execution mode in-plan runs the bundle's plan.onnx, which holds the f32 backbone, \
         so detector.backbone = \"{precision}\" cannot run in plan; set detector.backbone = \
         \"f32\" or detector.execution = \"out-of-plan\""
    )]
    InPlanPrecision { precision: BackbonePrecision },
    #[error(
        "combined plan of bundle {} does not fit the bundle: {}; re-create it with \
         `daain-tools export-plan --bundle {}`",
        dir.display(),
        causes(source),
        dir.display()
    )]
    PlanLoad {
        dir: std::path::PathBuf,
        #[source]
        source: BackboneError,
    },
}

/// Returns the causes of a plan load error joined by ": ". The outer message names a
/// backbone model and is left out. An error without a cause is returned whole.
fn causes(error: &BackboneError) -> String {
    let mut parts = Vec::new();
    let mut cause = std::error::Error::source(error);
    while let Some(error) = cause {
        parts.push(error.to_string());
        cause = error.source();
    }
    if parts.is_empty() {
        error.to_string()
    } else {
        parts.join(": ")
    }
}

/// Placement of the gather and the flow.
///
/// `out-of-plan` is the default. It runs the backbone plan, then the gather and the flow
/// as separate stages, and works with every bundle. `in-plan` runs the bundle's
/// `plan.onnx`, in which tract evaluates gather and flow as custom operators after the
/// backbone. Both give the same flow output, and `benches/frame.rs` times them
/// alternately in the same run. In a release build on a 2-core x86_64 machine, a frame
/// took 51.8 ms in plan and 54.9 ms out of plan. Out of plan stays the default because it
/// needs no extra bundle file, runs the int8 backbone too, and reports the gather and
/// flow times on their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutionMode {
    /// Backbone plan, then gather and flow as separate stages.
    #[default]
    OutOfPlan,
    /// Backbone, gather and flow as one tract plan (`plan.onnx`).
    InPlan,
}

impl std::fmt::Display for ExecutionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecutionMode::OutOfPlan => "out-of-plan",
            ExecutionMode::InPlan => "in-plan",
        })
    }
}

/// The stages between the input tensor and the flow output.
enum Stages<'b> {
    OutOfPlan {
        backbone: Backbone,
        gather: GatherPlan,
        flow: Flow<'b>,
        scratch: FlowScratch<f32>,
    },
    InPlan {
        plan: CombinedPlan,
    },
}

/// Every score the detector computes for a frame, whichever one it decides on.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Scores {
    /// HBOS decision value (higher is more anomalous).
    pub hbos: f64,
    /// PyOD's `predict_proba` outlier probability of the HBOS decision value.
    pub hbos_probability: f64,
    /// Negative log-likelihood under the flow, in nats.
    pub nll: f64,
    /// Distance of the flow output from the origin.
    pub euclidean: f64,
    pub mahalanobis: f64,
}

impl Scores {
    /// Returns the score of the given kind.
    pub fn get(&self, kind: ScoreKind) -> f64 {
        match kind {
            ScoreKind::Hbos => self.hbos,
            ScoreKind::HbosProbability => self.hbos_probability * self.hbos_probability,
            ScoreKind::NegativeLogLikelihood => self.nll,
            ScoreKind::Euclidean => self.euclidean,
            ScoreKind::Mahalanobis => self.mahalanobis,
        }
    }
}

/// Time spent in each stage for one frame, in milliseconds. In plan, `backbone_ms`
/// covers backbone, gather and flow, and `sampling_ms` and `flow_ms` only copying and
/// checking the plan's outputs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StageTimings {
    /// Wait in the frame queue, from delivery by the source to the start of detection.
    pub queue_ms: f64,
    pub preprocess_ms: f64,
    pub backbone_ms: f64,
    pub sampling_ms: f64,
    pub flow_ms: f64,
    pub score_ms: f64,
}

/// Result for one frame, as printed by `daain run --json`.
#[derive(Debug, Clone, Serialize)]
pub struct FrameOutcome {
    /// 0-based frame index in the source.
    pub frame: u64,
    /// Presentation time in seconds since the start of the source.
    pub time_s: f64,
    /// The deciding score; `null` in JSON when the frame could not be scored.
    pub score: Option<f64>,
    pub score_kind: ScoreKind,
    pub threshold: f64,
    /// Whether the score is above the threshold; also true for frames that failed.
    pub anomalous: bool,
    pub level: AlertLevel,
    pub scores: Option<Scores>,
    pub timings: StageTimings,
    /// Time from delivery by the source until the score was ready, in milliseconds.
    pub latency_ms: f64,
    /// Whether `latency_ms` exceeded the configured per-frame deadline.
    pub deadline_missed: bool,
    /// Cause of the failure when the frame could not be scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Size of the segmentation map, (height, width).
    #[serde(skip)]
    pub segmentation_size: (usize, usize),
}

impl FrameOutcome {
    /// Creates the outcome of `frame` before it is scored: no score, and counted as failed
    /// (anomalous, level ERROR) until the caller fills in the result.
    pub fn unscored(frame: &Frame, detector: &Detector<'_>) -> Self {
        Self {
            frame: frame.index,
            time_s: frame.timestamp.as_secs_f64(),
            score: None,
            score_kind: detector.score_kind(),
            threshold: detector.threshold(),
            anomalous: true,
            level: AlertLevel::Error,
            scores: None,
            timings: StageTimings::default(),
            latency_ms: 0.0,
            deadline_missed: false,
            error: None,
            segmentation_size: detector.segmentation_size(),
        }
    }

    /// Formats a one-line human-readable report.
    pub fn summary_line(&self) -> String {
        self.summary().to_string()
    }

    /// Returns the one-line report as a [`Display`](std::fmt::Display) value, which
    /// writes it without building a `String`.
    pub fn summary(&self) -> SummaryLine<'_> {
        SummaryLine(self)
    }
}

/// The one-line human-readable report of a [`FrameOutcome`].
pub struct SummaryLine<'a>(&'a FrameOutcome);

impl std::fmt::Display for SummaryLine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let outcome = self.0;
        match (&outcome.error, outcome.score) {
            (Some(error), _) => write!(
                f,
                "frame {:5}  t={:8.3}s  ERROR {error}",
                outcome.frame, outcome.time_s
            ),
            (None, Some(score)) => write!(
                f,
                "frame {:5}  t={:8.3}s  {} {:12.3}  threshold {:12.3}  {}",
                outcome.frame,
                outcome.time_s,
                outcome.score_kind,
                score,
                outcome.threshold,
                if outcome.anomalous { "ANOMALOUS" } else { "ok" }
            ),
            (None, None) => write!(
                f,
                "frame {:5}  t={:8.3}s  not scored",
                outcome.frame, outcome.time_s
            ),
        }
    }
}

/// Settings of a detector that are not in the bundle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorOptions {
    /// Replaces the bundle's calibrated threshold when set.
    pub threshold: Option<f64>,
    /// Backbone model of the bundle to run: f32 or int8.
    pub precision: BackbonePrecision,
    /// Threads that run preprocessing and the backbone (at least 1): the size of the
    /// plan's pool.
    pub threads: usize,
    /// Placement of gather and flow.
    pub execution: ExecutionMode,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        Self {
            threshold: None,
            precision: BackbonePrecision::F32,
            threads: 1,
            execution: ExecutionMode::OutOfPlan,
        }
    }
}

/// Everything needed to score frames, built from a bundle.
pub struct Detector<'b> {
    preprocessor: Preprocessor,
    stages: Stages<'b>,
    hbos: Hbos,
    mahalanobis: Mahalanobis,
    kind: ScoreKind,
    threshold: f64,
    classes: usize,
    sample: Vec<f32>,
    z: Vec<f32>,
    /// log|det dz/dx| of the last in-plan run, which computes it with the flow.
    plan_log_det: f32,
    segmentation: Vec<u8>,
}

impl<'b> Detector<'b> {
    /// Loads the f32 backbone on one thread and builds every stage from the bundle, out
    /// of plan. `threshold` replaces the bundle's calibrated threshold when given.
    pub fn new(bundle: &'b Bundle, threshold: Option<f64>) -> Result<Self, DetectError> {
        Self::with_mode(bundle, threshold, ExecutionMode::default())
    }

    /// Builds the detector like [`Detector::new`], with gather and flow placed by
    /// `mode`. [`ExecutionMode::InPlan`] needs a bundle with a combined plan.
    pub fn with_mode(
        bundle: &'b Bundle,
        threshold: Option<f64>,
        mode: ExecutionMode,
    ) -> Result<Self, DetectError> {
        let options = DetectorOptions {
            threshold,
            execution: mode,
            ..Default::default()
        };
        Self::with_options(bundle, &options)
    }

    /// Loads the backbone of the requested precision, placed as requested, and builds
    /// every stage from the bundle.
    pub fn with_options(
        bundle: &'b Bundle,
        options: &DetectorOptions,
    ) -> Result<Self, DetectError> {
        let threshold = options.threshold;
        let mode = options.execution;
        let manifest = bundle.manifest();
        let convention = manifest.input.clone();
        crate::cpu::log_capabilities();
        let dim = manifest.flow.dim;
        let stages = match mode {
            ExecutionMode::OutOfPlan => Self::out_of_plan_stages(bundle, options)?,
            ExecutionMode::InPlan => {
                if options.precision != BackbonePrecision::F32 {
                    return Err(DetectError::InPlanPrecision {
                        precision: options.precision,
                    });
                }
                let path = bundle.plan_path().ok_or_else(|| DetectError::MissingPlan {
                    dir: bundle.dir().to_owned(),
                })?;
                let plan = CombinedPlan::load(&PlanSpec {
                    path,
                    input_height: convention.height,
                    input_width: convention.width,
                    logits: manifest.backbone.logits.clone(),
                    dim,
                    threads: options.threads,
                    mask_sha256: manifest.mask.file.sha256.clone(),
                    flow_sha256: manifest.flow.file.sha256.clone(),
                })
                .map_err(|source| DetectError::PlanLoad {
                    dir: bundle.dir().to_owned(),
                    source,
                })?;
                Stages::InPlan { plan }
            }
        };
        log::info!("detector: gather and flow run {mode}");
        let (hbos, mahalanobis) = bundle.scores()?;
        let classes = manifest.backbone.classes;
        let threshold = threshold.unwrap_or(manifest.threshold.value);
        if threshold != manifest.threshold.value {
            log::info!(
                "threshold {threshold} from the config replaces the bundle's {}",
                manifest.threshold.value
            );
        }
        Ok(Self {
            preprocessor: Preprocessor::new(convention.clone()),
            stages,
            hbos,
            mahalanobis,
            kind: manifest.score.kind,
            threshold,
            classes,
            sample: vec![0.0; dim],
            z: vec![0.0; dim],
            plan_log_det: 0.0,
            segmentation: vec![0; convention.height * convention.width],
        })
    }

    fn out_of_plan_stages(
        bundle: &'b Bundle,
        options: &DetectorOptions,
    ) -> Result<Stages<'b>, DetectError> {
        let manifest = bundle.manifest();
        let convention = &manifest.input;
        let spec = BackboneSpec::from_bundle(bundle, options.precision, options.threads)?;
        log::info!("backbone precision: {}", options.precision);
        let backbone = Backbone::load(&spec)?;
        backbone.check_taps(&manifest.backbone.taps)?;

        let points = bundle.mask_points()?;
        let gather = GatherPlan::new(
            &points,
            backbone.taps(),
            convention.height,
            convention.width,
        )
        .map_err(DetectError::Mask)?;
        let flow = bundle.flow()?;
        Ok(Stages::OutOfPlan {
            backbone,
            gather,
            scratch: flow.scratch(),
            flow,
        })
    }

    /// Copies the flow weights borrowed from the bundle's memory map, so that the detector
    /// no longer borrows the bundle. Costs one copy of the flow file's tensors.
    pub fn into_owned(self) -> Detector<'static> {
        let stages = match self.stages {
            Stages::OutOfPlan {
                backbone,
                gather,
                flow,
                scratch,
            } => Stages::OutOfPlan {
                backbone,
                gather,
                flow: flow.into_owned(),
                scratch,
            },
            Stages::InPlan { plan } => Stages::InPlan { plan },
        };
        Detector {
            preprocessor: self.preprocessor,
            stages,
            hbos: self.hbos,
            mahalanobis: self.mahalanobis,
            kind: self.kind,
            threshold: self.threshold,
            classes: self.classes,
            sample: self.sample,
            z: self.z,
            plan_log_det: self.plan_log_det,
            segmentation: self.segmentation,
        }
    }

    /// Returns the operators and kernels tract chose for the backbone, or for the
    /// combined plan in plan.
    pub fn backbone_kernels(&self) -> &crate::backbone::KernelSummary {
        match &self.stages {
            Stages::OutOfPlan { backbone, .. } => backbone.kernels(),
            Stages::InPlan { plan } => plan.kernels(),
        }
    }

    /// Returns where gather and flow run.
    pub fn mode(&self) -> ExecutionMode {
        match self.stages {
            Stages::OutOfPlan { .. } => ExecutionMode::OutOfPlan,
            Stages::InPlan { .. } => ExecutionMode::InPlan,
        }
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn score_kind(&self) -> ScoreKind {
        self.kind
    }

    /// Returns the sampled activation vector of the last scored frame.
    pub fn sample(&self) -> &[f32] {
        &self.sample
    }

    /// Returns the flow output of the last scored frame.
    pub fn flow_output(&self) -> &[f32] {
        &self.z
    }

    /// Returns the class map of the last frame scored with `segment` set.
    pub fn segmentation(&self) -> &[u8] {
        &self.segmentation
    }

    /// Returns the segmentation map size, (height, width).
    pub fn segmentation_size(&self) -> (usize, usize) {
        let convention = self.preprocessor.convention();
        (convention.height, convention.width)
    }

    /// Runs preprocessing, backbone and sampling on a frame and leaves the sampled
    /// vector in [`Detector::sample`]. With `segment`, also fills the class map. In
    /// plan, the flow runs here too and [`Detector::score_sample`] reads its output.
    pub fn sample_frame(
        &mut self,
        frame: &Frame,
        segment: bool,
        timings: &mut StageTimings,
    ) -> Result<(), DetectError> {
        self.sample_rgb(&frame.data, frame.width, frame.height, segment, timings)
    }

    /// Runs [`Detector::sample_frame`] on packed RGB24 pixels, `width * height * 3` bytes
    /// with no row padding.
    pub fn sample_rgb(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
        segment: bool,
        timings: &mut StageTimings,
    ) -> Result<(), DetectError> {
        self.sample_rgb_with_logits(rgb, width, height, segment, timings, |_| {})
    }

    /// Runs [`Detector::sample_frame`] and passes the class logits (classes x H x W,
    /// row-major) to `inspect`. The backbone output is released on return, so this is
    /// the only way to read the logits, for example to compute baseline scores from the
    /// same forward pass.
    pub fn sample_frame_with_logits(
        &mut self,
        frame: &Frame,
        segment: bool,
        timings: &mut StageTimings,
        inspect: impl FnOnce(&[f32]),
    ) -> Result<(), DetectError> {
        self.sample_rgb_with_logits(
            &frame.data,
            frame.width,
            frame.height,
            segment,
            timings,
            inspect,
        )
    }

    fn sample_rgb_with_logits(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
        segment: bool,
        timings: &mut StageTimings,
        inspect: impl FnOnce(&[f32]),
    ) -> Result<(), DetectError> {
        let start = Instant::now();
        let preprocessor = &mut self.preprocessor;
        let preprocess = |input: &mut [f32]| preprocessor.run(rgb, width, height, input);
        match &mut self.stages {
            Stages::OutOfPlan { backbone, .. } => backbone.write_input(preprocess),
            Stages::InPlan { plan } => plan.write_input(preprocess),
        }?;
        let preprocessed = Instant::now();
        let ran;
        // Taken before `inspect`, so that the caller's work is not counted as sampling.
        let sampled;
        match &mut self.stages {
            Stages::OutOfPlan {
                backbone, gather, ..
            } => {
                let output = backbone.run_in_place()?;
                ran = Instant::now();
                gather
                    .gather(&output.tap_slices(), &mut self.sample)
                    .map_err(DetectError::Sampling)?;
                if segment {
                    argmax_classes(output.logits(), self.classes, &mut self.segmentation);
                }
                sampled = Instant::now();
                inspect(output.logits());
            }
            Stages::InPlan { plan } => {
                let output = plan.run().map_err(plan_error)?;
                ran = Instant::now();
                self.sample.copy_from_slice(output.sample());
                self.z.copy_from_slice(output.z());
                self.plan_log_det = output.log_det();
                if segment {
                    argmax_classes(output.logits(), self.classes, &mut self.segmentation);
                }
                sampled = Instant::now();
                inspect(output.logits());
            }
        }
        timings.preprocess_ms = millis(preprocessed - start);
        timings.backbone_ms = millis(ran - preprocessed);
        timings.sampling_ms = millis(sampled - ran);
        Ok(())
    }

    /// Scores the vector in [`Detector::sample`]: runs the flow on it out of plan, or
    /// takes the flow output of the last in-plan run.
    pub fn score_sample(&mut self, timings: &mut StageTimings) -> Result<Scores, DetectError> {
        let start = Instant::now();
        let log_det = match &mut self.stages {
            Stages::OutOfPlan { flow, scratch, .. } => {
                flow.forward(&self.sample, &mut self.z, scratch)?
            }
            Stages::InPlan { .. } => {
                check_output(&self.z, self.plan_log_det)?;
                self.plan_log_det
            }
        };
        let flowed = Instant::now();
        let hbos = self.hbos.decision(&self.z)?;
        let scores = Scores {
            hbos,
            hbos_probability: self.hbos.probability(hbos),
            nll: Flow::negative_log_likelihood(&self.z, log_det),
            euclidean: crate::score::euclidean(&self.z),
            mahalanobis: self.mahalanobis.score(&self.z)?,
        };
        timings.flow_ms = millis(flowed - start);
        timings.score_ms = millis(flowed.elapsed());
        Ok(scores)
    }

    /// Scores one frame end to end.
    pub fn score_frame(
        &mut self,
        frame: &Frame,
        segment: bool,
    ) -> Result<(Scores, StageTimings), DetectError> {
        let mut timings = StageTimings::default();
        self.sample_frame(frame, segment, &mut timings)?;
        let scores = self.score_sample(&mut timings)?;
        Ok((scores, timings))
    }
}

/// Maps a failed combined run to the gather's error when a non-finite activation
/// caused it, and to a backbone error otherwise.
fn plan_error(error: anyhow::Error) -> DetectError {
    match error.downcast::<SamplingError>() {
        Ok(sampling) => DetectError::Sampling(sampling),
        Err(other) => DetectError::Backbone(BackboneError::Run(other)),
    }
}

pub(crate) fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Writes a class map as an 8-bit greyscale PNG whose pixel values are class indices.
pub fn write_class_png(path: &Path, classes: &[u8], size: (usize, usize)) -> anyhow::Result<()> {
    let (height, width) = size;
    let image = image::GrayImage::from_raw(width as u32, height as u32, classes.to_vec())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "class map has {} values, expected {width}x{height}",
                classes.len()
            )
        })?;
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| anyhow::anyhow!("failed to write segmentation {}: {e}", path.display()))
}
