//! Bundle training: mask generation, activation recording, flow training, score fitting,
//! threshold calibration and bundle export, driven by one TOML file
//! (`configs/train-default.toml` is the shipped default bundle's).
//!
//! Frames of the training clip are split into consecutive chunks that cycle through a
//! pattern of roles (for example train, train, train, calibration, test). Chunks keep
//! neighbouring frames, which are nearly identical, in the same role, so calibration and
//! test frames are never direct neighbours of training frames except at chunk borders.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use daain::bundle::{
    sha256_hex, BackboneManifest, FileEntry, FlowManifest, HbosManifest, Manifest,
    MaskManifest, ScoreManifest, ThresholdManifest, FORMAT, FORMAT_VERSION, MANIFEST_FILE,
};
use daain::preprocess::InputConvention;
use daain::sampling::{poisson_disc, sampling_extent, GatherPlan, TapShape};
use daain::score::{Hbos, Mahalanobis, ScoreKind};
use daain::source::Frame;

use crate::espnet::TAPS;
use crate::flow::{fit_mahalanobis, FlowConfig, TchFlow, TrainConfig};
use crate::record::{
    augment, augmentation_rng, load_backbone, random_crops, random_photometric, read_video, Augmentation,
    PhotometricRanges, Recorder,
};

/// Role of a frame in bundle training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Train,
    Calibration,
    Test,
}

/// Settings of `daain-tools build-bundle`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub data: DataConfig,
    pub mask: MaskConfig,
    pub augment: AugmentConfig,
    pub flow: FlowTrainingConfig,
    pub score: ScoreConfig,
    pub threshold: ThresholdConfig,
}

/// Training clip, frame split and taps.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// ONNX backbone exported by `daain-tools export-onnx`.
    pub backbone: PathBuf,
    /// Training clip.
    pub video: PathBuf,
    /// Frames per chunk of the split.
    pub chunk_frames: usize,
    /// Roles the chunks cycle through.
    pub pattern: Vec<Role>,
    /// Tapped tensors; empty means every PReLU output of ESPNet.
    #[serde(default)]
    pub taps: Vec<String>,
    /// Uses only the first frames of the clip when set.
    #[serde(default)]
    pub max_frames: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaskConfig {
    pub seed: u64,
    /// Minimum distance between mask points, in voxels of the sampling space.
    pub min_distance: f64,
}

/// In-distribution augmentation of training frames.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    pub horizontal_flip: bool,
    /// Random crops per training frame.
    pub crops: usize,
    /// Side length of a crop relative to the frame.
    pub crop_scale: f64,
    pub seed: u64,
    /// Photometric variants per training frame (exposure, white balance, blur, JPEG).
    #[serde(default)]
    pub photometric: usize,
    /// Photometric variants per calibration frame, which then also calibrate the
    /// threshold. The held-out test frames are never augmented.
    #[serde(default)]
    pub calibration_photometric: usize,
    /// Smallest and largest exposure gain of a photometric variant.
    #[serde(default = "default_exposure")]
    pub exposure: [f64; 2],
    /// Largest relative change of the red and of the blue gain against green.
    #[serde(default = "default_white_balance")]
    pub white_balance: f64,
    /// Largest Gaussian blur, in pixels of the source frame.
    #[serde(default = "default_blur_sigma")]
    pub blur_sigma: f64,
    /// Lowest and highest JPEG quality of a photometric variant.
    #[serde(default = "default_jpeg_quality")]
    pub jpeg_quality: [u8; 2],
}

fn default_exposure() -> [f64; 2] {
    [0.8, 1.25]
}

fn default_white_balance() -> f64 {
    0.06
}

fn default_blur_sigma() -> f64 {
    1.0
}

fn default_jpeg_quality() -> [u8; 2] {
    [50, 90]
}

impl AugmentConfig {
    pub fn photometric_ranges(&self) -> PhotometricRanges {
        PhotometricRanges {
            exposure: self.exposure,
            white_balance: self.white_balance,
            blur_sigma: self.blur_sigma,
            jpeg_quality: self.jpeg_quality,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlowTrainingConfig {
    pub blocks: usize,
    pub hidden: usize,
    pub clamp: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// Score the threshold applies to.
    pub kind: ScoreKind,
    pub bins: usize,
    pub alpha: f64,
    pub tol: f64,
    pub mahalanobis_components: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdConfig {
    /// Fraction of calibration frames allowed above the threshold.
    pub false_positive_rate: f64,
}

impl TrainingConfig {
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read training config {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid training config {}: {}", path.display(), e.message()))?;
        config.validate().with_context(|| format!("invalid training config {}", path.display()))?;
        Ok(config)
    }

    /// Checks the values that parsing alone does not.
    pub fn validate(&self) -> Result<()> {
        let config = self;
        ensure!(config.data.chunk_frames > 0, "data.chunk_frames must be at least 1");
        ensure!(
            [Role::Train, Role::Calibration, Role::Test].iter().all(|r| config.data.pattern.contains(r)),
            "data.pattern must contain train, calibration and test"
        );
        ensure!(
            config.threshold.false_positive_rate > 0.0 && config.threshold.false_positive_rate < 1.0,
            "threshold.false_positive_rate {} is invalid: use a value in (0, 1)",
            config.threshold.false_positive_rate
        );
        ensure!(
            config.augment.crop_scale > 0.0 && config.augment.crop_scale <= 1.0,
            "augment.crop_scale {} is invalid: use a value in (0, 1]",
            config.augment.crop_scale
        );
        let augment = &config.augment;
        ensure!(
            augment.exposure[0] > 0.0 && augment.exposure[0] <= augment.exposure[1],
            "augment.exposure {:?} is invalid: use [low, high] with 0 < low <= high",
            augment.exposure
        );
        ensure!(
            (0.0..1.0).contains(&augment.white_balance),
            "augment.white_balance {} is invalid: use a value in [0, 1)",
            augment.white_balance
        );
        ensure!(
            (0.0..=10.0).contains(&augment.blur_sigma),
            "augment.blur_sigma {} is invalid: use 0 to 10 pixels",
            augment.blur_sigma
        );
        ensure!(
            augment.jpeg_quality[0] >= 1 && augment.jpeg_quality[0] <= augment.jpeg_quality[1] && augment.jpeg_quality[1] <= 100,
            "augment.jpeg_quality {:?} is invalid: use [worst, best] within 1 to 100",
            augment.jpeg_quality
        );
        Ok(())
    }

    /// Returns the tap names, defaulting to every ESPNet PReLU output.
    pub fn taps(&self) -> Vec<String> {
        if self.data.taps.is_empty() {
            TAPS.iter().map(|(name, _)| name.to_string()).collect()
        } else {
            self.data.taps.clone()
        }
    }
}

/// Returns the role of frame `index` under the chunked split.
pub fn role_of(index: usize, chunk_frames: usize, pattern: &[Role]) -> Role {
    pattern[(index / chunk_frames) % pattern.len()]
}

/// Activation vectors of the three roles, row-major `[n, dim]`.
#[derive(Debug, Default)]
pub struct Recording {
    pub dim: usize,
    pub train: Vec<f32>,
    pub calibration: Vec<f32>,
    pub test: Vec<f32>,
    pub train_frames: Vec<u64>,
    pub calibration_frames: Vec<u64>,
    pub test_frames: Vec<u64>,
}

impl Recording {
    pub fn rows(data: &[f32], dim: usize) -> usize {
        data.len() / dim
    }
}

fn progress_bar(len: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {elapsed_precise} (eta {eta})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

/// Records activation vectors for every frame of the training clip, augmenting the
/// training frames.
pub fn record_clip(config: &TrainingConfig, frames: &[Frame], recorder: &mut Recorder) -> Result<Recording> {
    let dim = recorder.dim();
    let mut recording = Recording { dim, ..Default::default() };
    let mut rng = augmentation_rng(config.augment.seed);
    let ranges = config.augment.photometric_ranges();
    let mut vector = vec![0.0f32; dim];
    let bar = progress_bar(frames.len() as u64, "recording");
    for (i, frame) in frames.iter().enumerate() {
        let role = role_of(i, config.data.chunk_frames, &config.data.pattern);
        recorder
            .record(&frame.data, frame.width, frame.height, &mut vector)
            .with_context(|| format!("failed to record frame {i}"))?;
        match role {
            Role::Train => {
                recording.train.extend_from_slice(&vector);
                recording.train_frames.push(frame.index);
                let mut variants = Vec::new();
                if config.augment.horizontal_flip {
                    variants.push(Augmentation::HorizontalFlip);
                }
                variants.extend(random_crops(
                    frame.width,
                    frame.height,
                    config.augment.crops,
                    config.augment.crop_scale,
                    &mut rng,
                ));
                variants.extend(random_photometric(config.augment.photometric, &ranges, &mut rng));
                for variant in variants {
                    let changed = augment(frame, variant)?;
                    recorder.record(&changed.data, changed.width, changed.height, &mut vector)?;
                    recording.train.extend_from_slice(&vector);
                    recording.train_frames.push(frame.index);
                }
            }
            Role::Calibration => {
                recording.calibration.extend_from_slice(&vector);
                recording.calibration_frames.push(frame.index);
                for variant in random_photometric(config.augment.calibration_photometric, &ranges, &mut rng) {
                    let changed = augment(frame, variant)?;
                    recorder.record(&changed.data, changed.width, changed.height, &mut vector)?;
                    recording.calibration.extend_from_slice(&vector);
                    recording.calibration_frames.push(frame.index);
                }
            }
            Role::Test => {
                recording.test.extend_from_slice(&vector);
                recording.test_frames.push(frame.index);
            }
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(recording)
}

/// Maps rows through a trained flow; returns the flow outputs and negative
/// log-likelihoods.
pub fn flow_outputs(flow: &TchFlow, rows: &[f32], dim: usize) -> Result<(Vec<f32>, Vec<f64>)> {
    let n = rows.len() / dim;
    let x = Tensor::from_slice(rows).reshape([n as i64, dim as i64]);
    let (z, nll) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
        let (z, log_det) = flow.forward(&x)?;
        let nll = TchFlow::negative_log_likelihood(&z, &log_det);
        Ok((z, nll))
    })?;
    let z: Vec<f32> = Vec::try_from(&z.to_kind(Kind::Float).flatten(0, -1))?;
    let nll: Vec<f64> = Vec::try_from(&nll.to_kind(Kind::Double))?;
    Ok((z, nll))
}

/// Fitted scores and a way to evaluate any kind on flow outputs.
pub struct FittedScores {
    pub hbos: Hbos,
    pub mahalanobis: Mahalanobis,
}

impl FittedScores {
    /// Returns the score of `kind` for each row of `z`, given its negative log-likelihood.
    pub fn evaluate(&self, kind: ScoreKind, z: &[f32], nll: &[f64], dim: usize) -> Result<Vec<f64>> {
        z.chunks_exact(dim)
            .zip(nll)
            .map(|(row, &nll)| {
                Ok(match kind {
                    ScoreKind::Hbos => self.hbos.decision(row)?,
                    ScoreKind::HbosProbability => {
                        let p = self.hbos.probability(self.hbos.decision(row)?);
                        p * p
                    }
                    ScoreKind::NegativeLogLikelihood => nll,
                    ScoreKind::Euclidean => daain::score::euclidean(row),
                    ScoreKind::Mahalanobis => self.mahalanobis.score(row)?,
                })
            })
            .collect()
    }
}

/// Returns the value that `1 - false_positive_rate` of `scores` lie at or below (linear
/// interpolation between order statistics, as numpy's default `quantile`).
pub fn quantile(scores: &[f64], q: f64) -> f64 {
    let mut sorted = scores.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let position = q * (sorted.len() - 1) as f64;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

fn tensor_bytes<T: bytemuck::Pod>(values: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

/// Writes named tensors as a safetensors file (little-endian).
pub fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Result<()> {
    write_safetensors_with_metadata(path, tensors, None)
}

fn write_safetensors_with_metadata(
    path: &Path,
    tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.to_string(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, &metadata, path)
        .with_context(|| format!("failed to write {}", path.display()))
}

fn file_entry(dir: &Path, name: &str) -> Result<FileEntry> {
    let bytes = std::fs::read(dir.join(name)).with_context(|| format!("failed to read {name}"))?;
    Ok(FileEntry { file: name.to_owned(), sha256: sha256_hex(&bytes) })
}

/// Summary of a bundle build, printed at the end and stored as provenance.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub dim: usize,
    pub train_vectors: usize,
    pub calibration_frames: usize,
    pub test_frames: usize,
    /// Mean negative log-likelihood per dimension of the training vectors after training,
    /// in nats.
    pub train_loss: f64,
    pub threshold: f64,
    /// Fraction of held-out test frames above the threshold, per score kind.
    pub test_above_threshold: BTreeMap<String, f64>,
}

/// Everything `record` produces: the mask, the tap shapes and the activation vectors.
pub struct Activations {
    pub taps: Vec<TapShape>,
    pub points: Vec<[u32; 3]>,
    pub recording: Recording,
}

const TAPS_METADATA_KEY: &str = "taps";

impl Activations {
    /// Writes the activations as safetensors: `points` U32 [n, 3], `train`, `calibration`
    /// and `test` F32 [rows, dim], their frame indices as U64, and the tap shapes as JSON
    /// in the header metadata under `taps`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let r = &self.recording;
        let dim = r.dim;
        let flat_points: Vec<u32> = self.points.iter().flatten().copied().collect();
        let tensors = [
            ("points", Dtype::U32, vec![self.points.len(), 3], tensor_bytes(&flat_points)),
            ("train", Dtype::F32, vec![Recording::rows(&r.train, dim), dim], tensor_bytes(&r.train)),
            (
                "calibration",
                Dtype::F32,
                vec![Recording::rows(&r.calibration, dim), dim],
                tensor_bytes(&r.calibration),
            ),
            ("test", Dtype::F32, vec![Recording::rows(&r.test, dim), dim], tensor_bytes(&r.test)),
            ("train_frames", Dtype::U64, vec![r.train_frames.len()], tensor_bytes(&r.train_frames)),
            (
                "calibration_frames",
                Dtype::U64,
                vec![r.calibration_frames.len()],
                tensor_bytes(&r.calibration_frames),
            ),
            ("test_frames", Dtype::U64, vec![r.test_frames.len()], tensor_bytes(&r.test_frames)),
        ];
        let metadata = HashMap::from([(TAPS_METADATA_KEY.to_owned(), serde_json::to_string(&self.taps)?)]);
        write_safetensors_with_metadata(path, &tensors, Some(metadata))
    }

    /// Reads a file written by [`Activations::write`].
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("failed to read activations {}", path.display()))?;
        let invalid = |message: String| anyhow::anyhow!("activations file {} is invalid: {message}", path.display());
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| invalid(e.to_string()))?;
        let taps_json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(TAPS_METADATA_KEY))
            .ok_or_else(|| invalid(format!("header metadata has no `{TAPS_METADATA_KEY}`")))?;
        let taps: Vec<TapShape> = serde_json::from_str(taps_json).map_err(|e| invalid(e.to_string()))?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| invalid(e.to_string()))?;
        let read = |name: &str, dtype: Dtype| -> Result<(Vec<usize>, Vec<u8>)> {
            let view = tensors.tensor(name).map_err(|e| invalid(format!("{name}: {e}")))?;
            ensure!(view.dtype() == dtype, "{name} has dtype {:?}, expected {dtype:?}", view.dtype());
            Ok((view.shape().to_vec(), view.data().to_vec()))
        };
        let f32s = |bytes: Vec<u8>| -> Vec<f32> {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
        };
        let u64s = |bytes: Vec<u8>| -> Vec<u64> {
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
        };
        let (point_shape, point_bytes) = read("points", Dtype::U32)?;
        let points: Vec<[u32; 3]> = point_bytes
            .chunks_exact(12)
            .map(|c| std::array::from_fn(|i| u32::from_le_bytes(c[4 * i..4 * i + 4].try_into().expect("4 bytes"))))
            .collect();
        let dim = point_shape[0];
        let mut recording = Recording { dim, ..Default::default() };
        for (name, target) in [
            ("train", &mut recording.train),
            ("calibration", &mut recording.calibration),
            ("test", &mut recording.test),
        ] {
            let (shape, bytes) = read(name, Dtype::F32)?;
            ensure!(shape.len() == 2 && shape[1] == dim, "{name} has shape {shape:?}, expected [rows, {dim}]");
            *target = f32s(bytes);
        }
        recording.train_frames = u64s(read("train_frames", Dtype::U64)?.1);
        recording.calibration_frames = u64s(read("calibration_frames", Dtype::U64)?.1);
        recording.test_frames = u64s(read("test_frames", Dtype::U64)?.1);
        Ok(Self { taps, points, recording })
    }
}

/// Generates the mask and records the activation vectors of the training clip.
pub fn record_activations(config: &TrainingConfig) -> Result<Activations> {
    let convention = InputConvention::espnet_cityscapes();
    let taps = config.taps();
    let backbone = load_backbone(&config.data.backbone, "logits", &taps, &convention)?;
    let tap_shapes = backbone.taps().to_vec();
    let extent = sampling_extent(&tap_shapes, convention.height, convention.width);
    let points = poisson_disc(extent, config.mask.min_distance, config.mask.seed)?;
    let gather = GatherPlan::new(&points, &tap_shapes, convention.height, convention.width)?;
    log::info!("mask: {} points in a sampling space of {extent:?}", gather.len());

    let mut frames = read_video(&config.data.video)?;
    if let Some(max) = config.data.max_frames {
        frames.truncate(max);
    }
    let mut recorder = Recorder::new(backbone, gather, convention);
    let recording = record_clip(config, &frames, &mut recorder)?;
    log::info!(
        "recorded {} training vectors, {} calibration and {} test frames",
        Recording::rows(&recording.train, recording.dim),
        recording.calibration_frames.len(),
        recording.test_frames.len()
    );
    let (points, recording) = drop_constant_features(points, recording);
    ensure!(!recording.test_frames.is_empty(), "the split left no test frames; shorten data.chunk_frames");
    ensure!(
        !recording.calibration_frames.is_empty(),
        "the split left no calibration frames; shorten data.chunk_frames"
    );
    Ok(Activations { taps: tap_shapes, points, recording })
}

/// Removes mask points whose value does not vary over the training vectors (dead units,
/// saturated activations). They carry no information, and a constant flow input can
/// reach the output unchanged, where it gives HBOS a histogram of zero width.
fn drop_constant_features(points: Vec<[u32; 3]>, recording: Recording) -> (Vec<[u32; 3]>, Recording) {
    let dim = recording.dim;
    let keep: Vec<bool> = (0..dim)
        .map(|feature| {
            let column = recording.train.iter().skip(feature).step_by(dim);
            let (min, max) = column.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            max - min > 1e-6 * max.abs().max(1.0)
        })
        .collect();
    let kept = keep.iter().filter(|&&k| k).count();
    if kept == dim {
        return (points, recording);
    }
    log::info!("dropping {} of {dim} mask points whose training activations are constant", dim - kept);
    let select = |rows: &[f32]| -> Vec<f32> {
        rows.chunks_exact(dim)
            .flat_map(|row| row.iter().zip(&keep).filter(|(_, &k)| k).map(|(&v, _)| v))
            .collect()
    };
    let points = points.into_iter().zip(&keep).filter(|(_, &k)| k).map(|(p, _)| p).collect();
    let recording = Recording {
        dim: kept,
        train: select(&recording.train),
        calibration: select(&recording.calibration),
        test: select(&recording.test),
        ..recording
    };
    (points, recording)
}

/// Trains the flow on the training vectors by maximum likelihood. Returns the flow and
/// the mean loss per dimension of the last epoch.
pub fn train_flow(config: &TrainingConfig, activations: &Activations) -> Result<(TchFlow, f64)> {
    tch::manual_seed(config.flow.seed as i64);
    let recording = &activations.recording;
    let dim = recording.dim;
    let n_train = Recording::rows(&recording.train, dim);
    let flow_config = FlowConfig {
        dim,
        hidden: config.flow.hidden,
        blocks: config.flow.blocks,
        clamp: config.flow.clamp,
    };
    let mut flow = TchFlow::new(flow_config, Device::Cpu, config.flow.seed)?;
    let data = Tensor::from_slice(&recording.train).reshape([n_train as i64, dim as i64]);
    let bar = progress_bar(config.flow.epochs as u64, "training");
    let losses = flow.train(
        &data,
        TrainConfig {
            epochs: config.flow.epochs,
            batch_size: config.flow.batch_size,
            learning_rate: config.flow.learning_rate,
            weight_decay: config.flow.weight_decay,
            seed: config.flow.seed,
        },
        |report| {
            bar.set_position(report.epoch as u64 + 1);
            bar.set_message(format!("loss {:.3}", report.loss));
        },
    )?;
    bar.finish();
    let final_loss = *losses.last().unwrap_or(&f64::NAN);
    log::info!("trained the flow for {} epochs, final loss {final_loss:.4} nats per dimension", config.flow.epochs);
    Ok((flow, final_loss))
}

/// Fits the scores on the training outputs, calibrates the threshold on the calibration
/// frames, measures the test frames and writes the bundle into `output`.
pub fn export_bundle(
    config: &TrainingConfig,
    config_path: &Path,
    activations: &Activations,
    flow: &TchFlow,
    output: &Path,
) -> Result<BuildReport> {
    let recording = &activations.recording;
    let dim = recording.dim;
    ensure!(
        flow.config().dim == dim,
        "the flow has dimension {}, the activations {dim}; train the flow on these activations",
        flow.config().dim
    );
    let n_train = Recording::rows(&recording.train, dim);
    let (z_train, nll_train) = flow_outputs(flow, &recording.train, dim)?;
    let train_loss = nll_train.iter().sum::<f64>() / (nll_train.len() * dim) as f64;
    let hbos = Hbos::fit(&z_train, n_train, dim, config.score.bins, config.score.alpha, config.score.tol)?;
    let z_train_tensor = Tensor::from_slice(&z_train).reshape([n_train as i64, dim as i64]);
    let mahalanobis_fit = fit_mahalanobis(&z_train_tensor, config.score.mahalanobis_components)?;
    let mahalanobis = mahalanobis_fit.clone().into_score()?;
    let scores = FittedScores { hbos, mahalanobis };

    let (z_cal, nll_cal) = flow_outputs(flow, &recording.calibration, dim)?;
    let (z_test, nll_test) = flow_outputs(flow, &recording.test, dim)?;
    // Every kind is calibrated the same way so the report can compare them; the
    // configured kind's threshold goes into the bundle.
    let mut threshold = f64::NAN;
    let mut test_above_threshold = BTreeMap::new();
    for kind in [
        ScoreKind::Hbos,
        ScoreKind::HbosProbability,
        ScoreKind::NegativeLogLikelihood,
        ScoreKind::Euclidean,
        ScoreKind::Mahalanobis,
    ] {
        let cal = scores.evaluate(kind, &z_cal, &nll_cal, dim)?;
        let kind_threshold = quantile(&cal, 1.0 - config.threshold.false_positive_rate);
        if kind == config.score.kind {
            threshold = kind_threshold;
        }
        let test = scores.evaluate(kind, &z_test, &nll_test, dim)?;
        let above = test.iter().filter(|&&s| s > kind_threshold).count() as f64 / test.len() as f64;
        test_above_threshold.insert(kind.to_string(), above);
    }

    std::fs::create_dir_all(output).with_context(|| format!("failed to create {}", output.display()))?;
    let backbone_file = "backbone.onnx";
    std::fs::copy(&config.data.backbone, output.join(backbone_file))
        .with_context(|| format!("failed to copy {}", config.data.backbone.display()))?;
    let flat_points: Vec<u32> = activations.points.iter().flatten().copied().collect();
    write_safetensors(
        &output.join("mask.safetensors"),
        &[("points", Dtype::U32, vec![activations.points.len(), 3], tensor_bytes(&flat_points))],
    )?;
    flow.write_safetensors(output.join("flow.safetensors"))?;
    let k = config.score.mahalanobis_components;
    write_safetensors(
        &output.join("score.safetensors"),
        &[
            ("hbos.bin_edges", Dtype::F64, vec![dim, config.score.bins + 1], tensor_bytes(scores.hbos.bin_edges())),
            ("hbos.log_density", Dtype::F64, vec![dim, config.score.bins], tensor_bytes(scores.hbos.log_density())),
            ("mahalanobis.mean", Dtype::F32, vec![dim], tensor_bytes(&mahalanobis_fit.mean)),
            ("mahalanobis.components", Dtype::F32, vec![k, dim], tensor_bytes(&mahalanobis_fit.components)),
            ("mahalanobis.variances", Dtype::F64, vec![k], tensor_bytes(&mahalanobis_fit.variances)),
        ],
    )?;
    let (decision_min, decision_max) = scores.hbos.decision_range();
    let report = BuildReport {
        dim,
        train_vectors: n_train,
        calibration_frames: recording.calibration_frames.len(),
        test_frames: recording.test_frames.len(),
        train_loss,
        threshold,
        test_above_threshold,
    };
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        format_version: FORMAT_VERSION,
        input: InputConvention::espnet_cityscapes(),
        backbone: BackboneManifest {
            file: file_entry(output, backbone_file)?,
            logits: "logits".to_owned(),
            classes: crate::espnet::NUM_CLASSES,
            taps: activations.taps.clone(),
            int8: None,
        },
        mask: MaskManifest {
            file: file_entry(output, "mask.safetensors")?,
            seed: config.mask.seed,
            min_distance: config.mask.min_distance,
            points: dim,
        },
        flow: FlowManifest {
            file: file_entry(output, "flow.safetensors")?,
            dim,
            blocks: config.flow.blocks,
            hidden: config.flow.hidden,
            clamp: config.flow.clamp as f32,
        },
        score: ScoreManifest {
            file: file_entry(output, "score.safetensors")?,
            kind: config.score.kind,
            hbos: HbosManifest {
                bins: config.score.bins,
                alpha: config.score.alpha,
                tol: config.score.tol,
                train_decision_min: decision_min,
                train_decision_max: decision_max,
            },
            mahalanobis_components: k,
            mahalanobis_residual_variance: mahalanobis_fit.residual_variance,
        },
        plan: None,
        threshold: ThresholdManifest {
            value: threshold,
            false_positive_rate: config.threshold.false_positive_rate,
            calibration_frames: recording.calibration_frames.len(),
            calibration_source: format!(
                "{} frames {:?}",
                config.data.video.display(),
                recording.calibration_frames
            ),
        },
        training: serde_json::json!({
            "config": config_path.display().to_string(),
            "settings": config,
            "train_frames": recording.train_frames,
            "test_frames": recording.test_frames,
            "report": &report,
            "tool": format!("daain-tools {}", env!("CARGO_PKG_VERSION")),
        }),
    };
    let text = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(output.join(MANIFEST_FILE), text + "\n")?;
    crate::plan::export_plan(output)?;
    Ok(report)
}

/// Runs record, train and export in one go and writes the bundle into `output`.
pub fn build_bundle(config: &TrainingConfig, config_path: &Path, output: &Path) -> Result<BuildReport> {
    let activations = record_activations(config)?;
    let (flow, _) = train_flow(config, &activations)?;
    export_bundle(config, config_path, &activations, &flow, output)
}
