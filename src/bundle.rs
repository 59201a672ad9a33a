//! The model bundle: one directory that a deployment copies as a unit.
//!
//! ```text
//! manifest.json        format version, input convention, taps, mask, flow, score and
//!                      threshold settings, training provenance, and the SHA-256 of
//!                      every other file
//! backbone.onnx        the segmentation network with the tapped tensors as outputs
//! backbone_int8.onnx   optional: the same network with int8 convolutions, written by
//!                      `daain-tools quantize --bundle DIR`
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
use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backbone::BackbonePrecision;
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
    #[error(
        "bundle {dir} has no int8 backbone: add one with `daain-tools quantize --bundle {dir}` \
         or set detector.backbone = \"f32\""
    )]
    MissingInt8Backbone { dir: PathBuf },
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
    /// The quantised copy of the backbone; absent in bundles made before quantisation
    /// existed and in bundles that were never quantised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8: Option<QuantizedBackboneManifest>,
}

/// The int8 copy of the backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizedBackboneManifest {
    #[serde(flatten)]
    pub file: FileEntry,
    /// Free-form record of the calibration (method, frames) and of the agreement with
    /// the f32 backbone that `daain-tools quantize` measured.
    #[serde(default)]
    pub quantization: serde_json::Value,
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

/// Parses `manifest.json` and checks what can be checked without the other files: format,
/// version, file names, and that the mask and the flow agree on the dimension.
fn parse_manifest(text: &[u8], path: &Path) -> Result<Manifest, BundleError> {
    let invalid = |message: String| BundleError::Manifest {
        path: path.to_owned(),
        message,
    };
    let manifest: Manifest = serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
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
    let optional = [
        manifest.backbone.int8.as_ref().map(|int8| &int8.file),
        manifest.plan.as_ref(),
    ];
    for entry in [
        &manifest.backbone.file,
        &manifest.mask.file,
        &manifest.flow.file,
        &manifest.score.file,
    ]
    .into_iter()
    .chain(optional.into_iter().flatten())
    {
        // A bundle is copied as one directory, so a name that leaves it (an absolute path
        // or `..`) would read a file that is not part of the bundle.
        let inside = !entry.file.is_empty()
            && Path::new(&entry.file)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(invalid(format!(
                "file name {:?} is not a relative path inside the bundle directory",
                entry.file
            )));
        }
    }
    if manifest.mask.points != manifest.flow.dim {
        return Err(invalid(format!(
            "mask has {} points but the flow dimension is {}",
            manifest.mask.points, manifest.flow.dim
        )));
    }
    check_input(&manifest.input).map_err(invalid)?;
    Ok(manifest)
}

/// Checks the input convention, which the preprocessor divides by and sizes its tables
/// with.
fn check_input(input: &InputConvention) -> Result<(), String> {
    if input.height == 0 || input.width == 0 {
        return Err(format!(
            "input size {}x{} is empty",
            input.width, input.height
        ));
    }
    if let Some(channel) = (0..3).find(|&c| !input.mean[c].is_finite()) {
        return Err(format!(
            "input.mean[{channel}] = {} is not finite",
            input.mean[channel]
        ));
    }
    if let Some(channel) = (0..3).find(|&c| !(input.std[c].is_finite() && input.std[c] > 0.0)) {
        return Err(format!(
            "input.std[{channel}] = {} is invalid: use a finite value above 0",
            input.std[channel]
        ));
    }
    if !(input.scale.is_finite() && input.scale != 0.0) {
        return Err(format!(
            "input.scale = {} is invalid: use a finite non-zero value",
            input.scale
        ));
    }
    Ok(())
}

/// The bytes of a bundle file: memory-mapped from disk, or an in-memory copy aligned to
/// 8 bytes so that tensor data can be borrowed as `f32`, `f64` and `u32` as from a map.
enum FileBytes {
    Mapped(Mmap),
    Owned { words: Vec<u64>, len: usize },
}

impl FileBytes {
    fn copy_aligned(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self::Owned {
            words,
            len: bytes.len(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

/// A bundle file whose hash has been checked, memory-mapped or held in memory.
pub struct BundleFile {
    path: PathBuf,
    bytes: FileBytes,
}

impl BundleFile {
    fn map(dir: &Path, entry: &FileEntry) -> Result<Self, BundleError> {
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
        Self::checked(path, FileBytes::Mapped(map), entry)
    }

    /// Checks the bytes against the manifest's hash before anything parses them.
    fn checked(path: PathBuf, bytes: FileBytes, entry: &FileEntry) -> Result<Self, BundleError> {
        let actual = sha256_hex(bytes.as_slice());
        if actual != entry.sha256.to_ascii_lowercase() {
            return Err(BundleError::Hash {
                path,
                actual,
                expected: entry.sha256.clone(),
            });
        }
        Ok(Self { path, bytes })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Parses the file as safetensors.
    pub fn tensors(&self) -> Result<Tensors<'_>, BundleError> {
        let inner = SafeTensors::deserialize(self.bytes()).map_err(|e| BundleError::Tensors {
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

/// An opened bundle: the manifest plus its hash-checked files.
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
    mask: BundleFile,
    flow: BundleFile,
    score: BundleFile,
}

impl Bundle {
    /// Opens a bundle directory, checking format version and every file's hash. The
    /// weight files are memory-mapped.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::MissingDirectory(dir.to_owned()));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&manifest_path).map_err(|source| BundleError::Io {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = parse_manifest(&text, &manifest_path)?;
        let backbone = BundleFile::map(dir, &manifest.backbone.file)?;
        drop(backbone);
        log::debug!(
            "bundle backbone {} hash checked",
            dir.join(&manifest.backbone.file.file).display()
        );
        if let Some(int8) = &manifest.backbone.int8 {
            drop(BundleFile::map(dir, &int8.file)?);
            log::debug!("bundle int8 backbone {} hash checked", int8.file.file);
        }
        if let Some(plan) = &manifest.plan {
            drop(BundleFile::map(dir, plan)?);
            log::debug!("bundle plan {} hash checked", plan.file);
        }
        Ok(Self {
            dir: dir.to_owned(),
            mask: BundleFile::map(dir, &manifest.mask.file)?,
            flow: BundleFile::map(dir, &manifest.flow.file)?,
            score: BundleFile::map(dir, &manifest.score.file)?,
            manifest,
        })
    }

    /// Opens a bundle from the bytes of its files, with the same checks as
    /// [`Bundle::open`]. `files` maps each file name of the manifest to its contents, and
    /// the bytes are copied.
    ///
    /// `dir` names the bundle in error messages and is the directory that
    /// [`Bundle::backbone_path`] resolves against: [`crate::pipeline::Detector`] loads the
    /// backbone from that file, so its bytes here are only hash-checked.
    pub fn from_memory(
        dir: &Path,
        manifest: &[u8],
        files: &HashMap<String, Vec<u8>>,
    ) -> Result<Self, BundleError> {
        let manifest = parse_manifest(manifest, &dir.join(MANIFEST_FILE))?;
        let load = |entry: &FileEntry| {
            let path = dir.join(&entry.file);
            let bytes = files.get(&entry.file).ok_or_else(|| BundleError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file among the bundle's in-memory files",
                ),
            })?;
            BundleFile::checked(path, FileBytes::copy_aligned(bytes), entry)
        };
        load(&manifest.backbone.file)?;
        if let Some(int8) = &manifest.backbone.int8 {
            load(&int8.file)?;
        }
        if let Some(plan) = &manifest.plan {
            load(plan)?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            mask: load(&manifest.mask.file)?,
            flow: load(&manifest.flow.file)?,
            score: load(&manifest.score.file)?,
            manifest,
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

    /// Returns the path of the backbone ONNX model of the given precision.
    pub fn backbone_path_for(&self, precision: BackbonePrecision) -> Result<PathBuf, BundleError> {
        match precision {
            BackbonePrecision::F32 => Ok(self.backbone_path()),
            BackbonePrecision::Int8 => match &self.manifest.backbone.int8 {
                Some(int8) => Ok(self.dir.join(&int8.file.file)),
                None => Err(BundleError::MissingInt8Backbone {
                    dir: self.dir.clone(),
                }),
            },
        }
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
        let edges = bins
            .checked_add(1)
            .ok_or_else(|| invalid(format!("hbos.bins {bins} in the manifest is too large")))?;
        let hbos = Hbos::from_parts(
            dim,
            bins,
            manifest.hbos.tol,
            tensors.f64("hbos.bin_edges", &[dim, edges])?.into_owned(),
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
