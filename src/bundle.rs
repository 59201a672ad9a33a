//! The model bundle: one directory that a deployment copies as a unit.
//!
//! ```text
//! manifest.json        format version, input convention, taps, mask, flow, score and
//!                      threshold settings, training provenance, and the SHA-256 of
//!                      every other file
//! backbone.onnx        the segmentation network with the tapped tensors as outputs
//! mask.safetensors     `points`: U32 [n, 3], (channel, y, x) in the sampling space
//! flow.safetensors     coupling-block weights (layout in `crate::flow`)
//! plan.onnx            optional: backbone, mask gather and flow as one ONNX model with
//!                      custom operators (see `crate::plan`)
//! score.safetensors    `hbos.bin_edges` F64 [d, bins + 1], `hbos.log_density` F64
//!                      [d, bins], `mahalanobis.mean` F32 [d], `mahalanobis.components`
//!                      F32 [k, d], `mahalanobis.variances` F64 [k]
//! ```
//!
//! Weight files are safetensors (a JSON header followed by flat little-endian data)
//! and are memory-mapped. Every file's SHA-256 is checked against the manifest before
//! its bytes are parsed or cast, so a truncated or altered bundle is rejected with the
//! file named instead of being read as weights.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::flow::{params_from_safetensors, Flow};
use crate::preprocess::InputConvention;
use crate::sampling::TapShape;
use crate::score::{Hbos, Mahalanobis, ScoreKind};

/// Identifier written in every manifest.
pub const FORMAT: &str = "daain-bundle";
/// Manifest format version this runtime reads.
pub const FORMAT_VERSION: u32 = 1;
/// Manifest file name inside a bundle directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Error while opening or validating a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle directory {0} not found: pass --bundle DIR with a directory made by `daain-tools export`")]
    MissingDirectory(PathBuf),
    #[error("failed to read bundle file {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bundle manifest {path} is invalid: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "bundle file {path} is corrupt or was modified: its SHA-256 is {actual}, the manifest \
         expects {expected}; copy the bundle again or re-export it"
    )]
    Hash {
        path: PathBuf,
        actual: String,
        expected: String,
    },
    #[error("bundle file {path} is not valid safetensors: {message}")]
    Tensors { path: PathBuf, message: String },
    #[error("bundle tensor {name} in {path} is invalid: {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
}

/// A file of the bundle and its content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to the bundle directory.
    pub file: String,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
}

/// The backbone and how to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneManifest {
    #[serde(flatten)]
    pub file: FileEntry,
    /// Name of the logits output.
    pub logits: String,
    pub classes: usize,
    /// Tapped tensors, in the order the sampling space stacks their channels.
    pub taps: Vec<TapShape>,
}

/// The blue-noise mask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskManifest {
    #[serde(flatten)]
    pub file: FileEntry,
    pub seed: u64,
    /// Minimum distance between points, in voxels of the sampling space.
    pub min_distance: f64,
    /// Number of points, which is the flow's dimension.
    pub points: usize,
}

/// The normalizing flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowManifest {
    #[serde(flatten)]
    pub file: FileEntry,
    pub dim: usize,
    pub blocks: usize,
    /// Width of each coupling subnet's hidden layer.
    pub hidden: usize,
    /// Soft clamp of the coupling's log-scale (FrEIA's `affine_clamping`).
    pub clamp: f32,
}

/// HBOS settings and the training statistics `predict_proba` scales against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbosManifest {
    pub bins: usize,
    pub alpha: f64,
    pub tol: f64,
    pub train_decision_min: f64,
    pub train_decision_max: f64,
}

/// The outlier score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreManifest {
    #[serde(flatten)]
    pub file: FileEntry,
    /// The score the threshold applies to.
    pub kind: ScoreKind,
    pub hbos: HbosManifest,
    /// Number of principal components in the Mahalanobis score's covariance.
    pub mahalanobis_components: usize,
    /// Variance of the Mahalanobis covariance outside the principal components.
    pub mahalanobis_residual_variance: f64,
}

/// The decision threshold and how it was calibrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdManifest {
    /// Frames scoring above this value are anomalous.
    pub value: f64,
    /// False-positive rate the threshold was chosen for on the calibration frames.
    pub false_positive_rate: f64,
    /// Number of held-out normal frames used for calibration.
    pub calibration_frames: usize,
    /// Source of the calibration frames.
    pub calibration_source: String,
}

/// Contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub input: InputConvention,
    pub backbone: BackboneManifest,
    pub mask: MaskManifest,
    pub flow: FlowManifest,
    pub score: ScoreManifest,
    pub threshold: ThresholdManifest,
    /// The combined plan (backbone, gather and flow in one ONNX model, see
    /// [`crate::plan`]). Bundles written before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<FileEntry>,
    /// Free-form provenance: training clip, frames, epochs, tool versions.
    #[serde(default)]
    pub training: serde_json::Value,
}

/// Returns the lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A memory-mapped bundle file whose hash has been checked.
pub struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    fn open(dir: &Path, entry: &FileEntry) -> Result<Self, BundleError> {
        let path = dir.join(&entry.file);
        let file = File::open(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only and private to this process. A bundle file that
        // another process truncates while mapped would fault on access; deployments copy
        // bundles as a unit and never edit them in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let actual = sha256_hex(&map);
        if actual != entry.sha256.to_ascii_lowercase() {
            return Err(BundleError::Hash {
                path,
                actual,
                expected: entry.sha256.clone(),
            });
        }
        Ok(Self { path, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Parses the file as safetensors.
    pub fn tensors(&self) -> Result<Tensors<'_>, BundleError> {
        let inner = SafeTensors::deserialize(&self.map).map_err(|e| BundleError::Tensors {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        Ok(Tensors {
            path: &self.path,
            inner,
        })
    }
}

/// Typed access to the tensors of one safetensors file.
pub struct Tensors<'a> {
    path: &'a Path,
    inner: SafeTensors<'a>,
}

impl<'a> Tensors<'a> {
    fn error(&self, name: &str, message: String) -> BundleError {
        BundleError::Tensor {
            path: self.path.to_owned(),
            name: name.to_owned(),
            message,
        }
    }

    pub fn inner(&self) -> &SafeTensors<'a> {
        &self.inner
    }

    /// Returns the raw little-endian bytes of `name` after checking dtype and shape.
    fn raw(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&'a [u8], BundleError> {
        let view = self
            .inner
            .tensor(name)
            .map_err(|e| self.error(name, e.to_string()))?;
        if view.dtype() != dtype {
            return Err(self.error(
                name,
                format!("dtype {:?}, expected {dtype:?}", view.dtype()),
            ));
        }
        if view.shape() != shape {
            return Err(self.error(
                name,
                format!("shape {:?}, expected {shape:?}", view.shape()),
            ));
        }
        Ok(view.data())
    }

    /// Returns an F32 tensor, borrowed when the mapped data is 4-byte aligned.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Cow<'a, [f32]>, BundleError> {
        let bytes = self.raw(name, Dtype::F32, shape)?;
        Ok(cast_or_copy(bytes, f32::from_le_bytes))
    }

    /// Returns an F64 tensor, borrowed when the mapped data is 8-byte aligned.
    pub fn f64(&self, name: &str, shape: &[usize]) -> Result<Cow<'a, [f64]>, BundleError> {
        let bytes = self.raw(name, Dtype::F64, shape)?;
        Ok(cast_or_copy(bytes, f64::from_le_bytes))
    }

    /// Returns a U32 tensor, borrowed when the mapped data is 4-byte aligned.
    pub fn u32(&self, name: &str, shape: &[usize]) -> Result<Cow<'a, [u32]>, BundleError> {
        let bytes = self.raw(name, Dtype::U32, shape)?;
        Ok(cast_or_copy(bytes, u32::from_le_bytes))
    }

    /// Returns an I32 tensor as u32 after checking every value is in `0..limit`.
    pub fn index(
        &self,
        name: &str,
        shape: &[usize],
        limit: usize,
    ) -> Result<Cow<'a, [u32]>, BundleError> {
        let bytes = self.raw(name, Dtype::I32, shape)?;
        let values = cast_or_copy(bytes, i32::from_le_bytes);
        if let Some((i, v)) = values
            .iter()
            .enumerate()
            .find(|(_, &v)| v < 0 || v as usize >= limit)
        {
            return Err(self.error(name, format!("value {v} at {i} is outside 0..{limit}")));
        }
        Ok(match values {
            Cow::Borrowed(slice) => Cow::Borrowed(bytemuck::cast_slice(slice)),
            Cow::Owned(vec) => Cow::Owned(vec.into_iter().map(|v| v as u32).collect()),
        })
    }
}

/// Reinterprets little-endian bytes as `T` without copying when alignment allows, and
/// copies otherwise.
fn cast_or_copy<T, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Cow<'_, [T]>
where
    T: bytemuck::Pod,
{
    if cfg!(target_endian = "little") {
        if let Ok(slice) = bytemuck::try_cast_slice::<u8, T>(bytes) {
            return Cow::Borrowed(slice);
        }
    }
    Cow::Owned(
        bytes
            .chunks_exact(N)
            .map(|c| from_le(c.try_into().expect("chunk of N bytes")))
            .collect(),
    )
}

/// An opened bundle: the manifest plus its memory-mapped, hash-checked files.
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    mask: MappedFile,
    flow: MappedFile,
    score: MappedFile,
}

impl Bundle {
    /// Opens a bundle directory, checking format version and every file's hash.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::MissingDirectory(dir.to_owned()));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).map_err(|source| BundleError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| BundleError::Manifest {
                path: manifest_path.clone(),
                message: e.to_string(),
            })?;
        let invalid = |message: String| BundleError::Manifest {
            path: manifest_path.clone(),
            message,
        };
        if manifest.format != FORMAT {
            return Err(invalid(format!(
                "format is {:?}, expected {FORMAT:?}",
                manifest.format
            )));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(invalid(format!(
                "format version {} is not supported by this runtime (it reads version \
                 {FORMAT_VERSION}); re-export the bundle with a matching daain-tools",
                manifest.format_version
            )));
        }
        if manifest.mask.points != manifest.flow.dim {
            return Err(invalid(format!(
                "mask has {} points but the flow dimension is {}",
                manifest.mask.points, manifest.flow.dim
            )));
        }

        let backbone_path = dir.join(&manifest.backbone.file.file);
        let backbone = MappedFile::open(dir, &manifest.backbone.file)?;
        drop(backbone);
        log::debug!("bundle backbone {} hash checked", backbone_path.display());
        if let Some(plan) = &manifest.plan {
            drop(MappedFile::open(dir, plan)?);
            log::debug!("bundle plan {} hash checked", dir.join(&plan.file).display());
        }
        let mask = MappedFile::open(dir, &manifest.mask.file)?;
        let flow = MappedFile::open(dir, &manifest.flow.file)?;
        let score = MappedFile::open(dir, &manifest.score.file)?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            mask,
            flow,
            score,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Returns the path of the backbone ONNX model.
    pub fn backbone_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.backbone.file.file)
    }

    /// Returns the path of the combined plan, if the bundle has one.
    pub fn plan_path(&self) -> Option<PathBuf> {
        self.manifest.plan.as_ref().map(|plan| self.dir.join(&plan.file))
    }

    /// Returns the mask points, `(channel, y, x)` in the sampling space.
    pub fn mask_points(&self) -> Result<Vec<[u32; 3]>, BundleError> {
        let n = self.manifest.mask.points;
        let tensors = self.mask.tensors()?;
        let flat = tensors.u32("points", &[n, 3])?;
        Ok(flat.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())
    }

    /// Builds the flow, borrowing its weights from the memory-mapped file.
    pub fn flow(&self) -> Result<Flow<'_>, BundleError> {
        let invalid = |message: String| BundleError::Tensors {
            path: self.flow.path.clone(),
            message,
        };
        let params =
            params_from_safetensors(self.flow.bytes()).map_err(|e| invalid(e.to_string()))?;
        let expected = &self.manifest.flow;
        if params.dim != expected.dim
            || params.blocks.len() != expected.blocks
            || params.hidden != expected.hidden
        {
            return Err(invalid(format!(
                "flow has dim {}, {} blocks, hidden {}; the manifest expects dim {}, {} blocks, hidden {}",
                params.dim,
                params.blocks.len(),
                params.hidden,
                expected.dim,
                expected.blocks,
                expected.hidden
            )));
        }
        Flow::new(params.dim, params.hidden, expected.clamp, params.blocks)
            .map_err(|e| invalid(e.to_string()))
    }

    /// Builds the HBOS and Mahalanobis scores from the score file.
    pub fn scores(&self) -> Result<(Hbos, Mahalanobis), BundleError> {
        let manifest = &self.manifest.score;
        let dim = self.manifest.flow.dim;
        let bins = manifest.hbos.bins;
        let k = manifest.mahalanobis_components;
        let tensors = self.score.tensors()?;
        let invalid = |message: String| BundleError::Tensors {
            path: self.score.path.clone(),
            message,
        };
        let hbos = Hbos::from_parts(
            dim,
            bins,
            manifest.hbos.tol,
            tensors
                .f64("hbos.bin_edges", &[dim, bins + 1])?
                .into_owned(),
            tensors.f64("hbos.log_density", &[dim, bins])?.into_owned(),
            manifest.hbos.train_decision_min,
            manifest.hbos.train_decision_max,
        )
        .map_err(|e| invalid(e.to_string()))?;
        let mahalanobis = Mahalanobis::new(
            tensors.f32("mahalanobis.mean", &[dim])?.into_owned(),
            tensors
                .f32("mahalanobis.components", &[k, dim])?
                .into_owned(),
            tensors.f64("mahalanobis.variances", &[k])?.into_owned(),
            manifest.mahalanobis_residual_variance,
        )
        .map_err(|e| invalid(e.to_string()))?;
        Ok((hbos, mahalanobis))
    }
}
