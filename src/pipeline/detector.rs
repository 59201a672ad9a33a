//! The detector: wires preprocessing, backbone, sampling, flow and score together. The
//! stages know nothing of each other. The detector owns the buffers that pass between
//! them, allocated once when it is built.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::alert::AlertLevel;
use crate::backbone::{argmax_classes, Backbone, BackboneError, BackbonePrecision, BackboneSpec};
use crate::bundle::{Bundle, BundleError};
use crate::flow::{Flow, FlowError, FlowScratch};
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

/// Time spent in each stage for one frame, in milliseconds.
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
    /// Formats a one-line human-readable report.
    pub fn summary_line(&self) -> String {
        match (&self.error, self.score) {
            (Some(error), _) => format!(
                "frame {:5}  t={:8.3}s  ERROR {error}",
                self.frame, self.time_s
            ),
            (None, Some(score)) => format!(
                "frame {:5}  t={:8.3}s  {} {:12.3}  threshold {:12.3}  {}",
                self.frame,
                self.time_s,
                self.score_kind,
                score,
                self.threshold,
                if self.anomalous { "ANOMALOUS" } else { "ok" }
            ),
            (None, None) => format!("frame {:5}  t={:8.3}s  not scored", self.frame, self.time_s),
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
    /// Threads for tract's matrix multiplications (at least 1).
    pub threads: usize,
}

impl Default for DetectorOptions {
    fn default() -> Self {
        Self {
            threshold: None,
            precision: BackbonePrecision::F32,
            threads: 1,
        }
    }
}

/// Everything needed to score frames, built from a bundle.
pub struct Detector<'b> {
    preprocessor: Preprocessor,
    backbone: Backbone,
    gather: GatherPlan,
    flow: Flow<'b>,
    scratch: FlowScratch<f32>,
    hbos: Hbos,
    mahalanobis: Mahalanobis,
    kind: ScoreKind,
    threshold: f64,
    classes: usize,
    input: Vec<f32>,
    sample: Vec<f32>,
    z: Vec<f32>,
    segmentation: Vec<u8>,
}

impl<'b> Detector<'b> {
    /// Loads the f32 backbone on one thread and builds every stage from the bundle.
    /// `threshold` replaces the bundle's calibrated threshold when given.
    pub fn new(bundle: &'b Bundle, threshold: Option<f64>) -> Result<Self, DetectError> {
        let options = DetectorOptions {
            threshold,
            ..Default::default()
        };
        Self::with_options(bundle, &options)
    }

    /// Loads the backbone of the requested precision and builds every stage from the
    /// bundle.
    pub fn with_options(bundle: &'b Bundle, options: &DetectorOptions) -> Result<Self, DetectError> {
        let threshold = options.threshold;
        let manifest = bundle.manifest();
        let convention = manifest.input.clone();
        let spec = BackboneSpec {
            path: bundle.backbone_path_for(options.precision)?,
            input_height: convention.height,
            input_width: convention.width,
            logits: manifest.backbone.logits.clone(),
            taps: manifest
                .backbone
                .taps
                .iter()
                .map(|t| t.name.clone())
                .collect(),
            threads: options.threads,
        };
        crate::cpu::log_capabilities();
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
        let (hbos, mahalanobis) = bundle.scores()?;
        let classes = manifest.backbone.classes;
        let dim = flow.dim();
        let threshold = threshold.unwrap_or(manifest.threshold.value);
        if threshold != manifest.threshold.value {
            log::info!(
                "threshold {threshold} from the config replaces the bundle's {}",
                manifest.threshold.value
            );
        }
        Ok(Self {
            preprocessor: Preprocessor::new(convention.clone()),
            scratch: flow.scratch(),
            gather,
            flow,
            hbos,
            mahalanobis,
            kind: manifest.score.kind,
            threshold,
            classes,
            input: vec![0.0; convention.tensor_len()],
            sample: vec![0.0; dim],
            z: vec![0.0; dim],
            segmentation: vec![0; convention.height * convention.width],
            backbone,
        })
    }

    /// Copies the flow weights borrowed from the bundle's memory map, so that the detector
    /// no longer borrows the bundle. Costs one copy of the flow file's tensors.
    pub fn into_owned(self) -> Detector<'static> {
        Detector {
            preprocessor: self.preprocessor,
            backbone: self.backbone,
            gather: self.gather,
            flow: self.flow.into_owned(),
            scratch: self.scratch,
            hbos: self.hbos,
            mahalanobis: self.mahalanobis,
            kind: self.kind,
            threshold: self.threshold,
            classes: self.classes,
            input: self.input,
            sample: self.sample,
            z: self.z,
            segmentation: self.segmentation,
        }
    }

    /// Returns the operators and kernels tract chose for the backbone.
    pub fn backbone_kernels(&self) -> &crate::backbone::KernelSummary {
        self.backbone.kernels()
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
    /// vector in [`Detector::sample`]. With `segment`, also fills the class map.
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
        self.preprocessor.run(rgb, width, height, &mut self.input)?;
        let preprocessed = Instant::now();
        let output = self.backbone.run(&self.input)?;
        let ran = Instant::now();
        self.gather
            .gather(&output.tap_slices(), &mut self.sample)
            .map_err(DetectError::Sampling)?;
        if segment {
            argmax_classes(output.logits(), self.classes, &mut self.segmentation);
        }
        let sampled = Instant::now();
        inspect(output.logits());
        timings.preprocess_ms = millis(preprocessed - start);
        timings.backbone_ms = millis(ran - preprocessed);
        timings.sampling_ms = millis(sampled - ran);
        Ok(())
    }

    /// Scores the vector in [`Detector::sample`].
    pub fn score_sample(&mut self, timings: &mut StageTimings) -> Result<Scores, DetectError> {
        let start = Instant::now();
        let log_det = self
            .flow
            .forward(&self.sample, &mut self.z, &mut self.scratch)?;
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
