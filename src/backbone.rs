//! The segmentation backbone, run through tract.
//!
//! The ONNX model is loaded once, its input fixed to `1x3xHxW`, its outputs narrowed to
//! the logits plus the tapped activations the mask needs, and then optimised into one
//! plan. Tapping a tensor keeps it alive in the plan, so tap tensors that the optimiser
//! would otherwise fold away (a BatchNorm output followed by an activation, say) cost
//! extra work; the exported ESPNet taps the PReLU outputs, which survive optimisation.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;
use tract_onnx::tract_core::tract_linalg::multithread::{multithread_tract_scope, Executor};

use crate::cpu::MatmulKernel;
use crate::sampling::{TapShape, MAX_TAPS};

/// Error while loading or running the backbone.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error("failed to load backbone model {path}")]
    Load {
        path: PathBuf,
        source: anyhow::Error,
    },
    #[error(
        "backbone model {path} has no tensor named {name:?}: the bundle was made for another \
         model; re-export the bundle for this backbone"
    )]
    MissingTensor { path: PathBuf, name: String },
    #[error(
        "backbone output {name:?} has shape {actual:?}, expected {expected:?}: the bundle \
         does not match this backbone"
    )]
    ShapeMismatch {
        name: String,
        actual: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("input tensor has {actual} values, expected {expected} (1x3x{height}x{width})")]
    InputLength {
        actual: usize,
        expected: usize,
        height: usize,
        width: usize,
    },
    #[error("backbone inference failed: {0:#}")]
    Run(anyhow::Error),
}

/// Numeric precision of the backbone model that a detector runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackbonePrecision {
    /// The exported f32 model.
    #[default]
    F32,
    /// The quantised copy written by `daain-tools quantize`: int8 convolutions
    /// (`QLinearConv`), every other operator in f32.
    Int8,
}

impl std::str::FromStr for BackbonePrecision {
    type Err = String;

    /// Parses the names that `Display` writes: `f32` or `int8`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "f32" => Ok(Self::F32),
            "int8" => Ok(Self::Int8),
            other => Err(format!("invalid backbone {other:?}: use f32 or int8")),
        }
    }
}

impl std::fmt::Display for BackbonePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
        })
    }
}

/// Backbone file, tensors to read back and input size.
#[derive(Debug, Clone)]
pub struct BackboneSpec {
    pub path: PathBuf,
    pub input_height: usize,
    pub input_width: usize,
    /// Name of the class-logit output (1 x classes x H x W).
    pub logits: String,
    /// Names of the tapped tensors, in the order the mask's sampling space stacks them.
    pub taps: Vec<String>,
    /// Threads of the pool that runs the plan; 1 runs everything on the calling thread.
    /// tract splits its matrix multiplications among them and the runtime's operators
    /// their rows, while tract's other operators run on the thread that runs the plan.
    pub threads: usize,
}

impl BackboneSpec {
    /// Returns the spec of `bundle`'s backbone of `precision`, with its input size, logits
    /// and taps from the manifest, run on `threads` threads.
    pub fn from_bundle(
        bundle: &crate::bundle::Bundle,
        precision: BackbonePrecision,
        threads: usize,
    ) -> Result<Self, crate::bundle::BundleError> {
        let manifest = bundle.manifest();
        Ok(BackboneSpec {
            path: bundle.backbone_path_for(precision)?,
            input_height: manifest.input.height,
            input_width: manifest.input.width,
            logits: manifest.backbone.logits.clone(),
            taps: manifest
                .backbone
                .taps
                .iter()
                .map(|t| t.name.clone())
                .collect(),
            threads,
        })
    }
}

/// A loaded, optimised backbone plan.
pub struct Backbone {
    runner: PlanRunner,
    logits_shape: Vec<usize>,
    taps: Vec<TapShape>,
    kernels: KernelSummary,
}

/// The operators and matrix-multiplication kernels of an optimised tract plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSummary {
    /// Number of nodes per tract operator name, for example `OptMatMul` or `DeconvSum`.
    pub operators: std::collections::BTreeMap<String, usize>,
    /// Number of matrix multiplications per tract-linalg kernel name, for example
    /// `fma_mmm_f32_16x6` or `avx2_mmm_i32_8x8`.
    pub matmul_kernels: std::collections::BTreeMap<String, usize>,
    /// The matmul kernels that are tract's portable Rust fallback rather than code written
    /// for this CPU architecture (assembly or intrinsics).
    pub portable_matmul_kernels: std::collections::BTreeSet<String>,
}

/// Makes an optimised model runnable, on `threads` threads (1 or 0: the calling thread).
///
/// With more than one thread it also returns the rayon pool that tract and the rewritten
/// operators split their work over. [`PlanRunner`] runs the whole plan on that pool, so
/// `threads` threads work in all. Had the plan run on the calling thread, as tract does by
/// default, that thread would compete for the cores with the pool's workers, which keep
/// spinning for a while after each parallel operator. On two cores, two threads were then
/// slower than one.
pub(crate) fn runnable(
    typed: TypedModel,
    threads: usize,
) -> anyhow::Result<(Arc<TypedRunnableModel>, Option<Arc<rayon::ThreadPool>>)> {
    if threads <= 1 {
        return Ok((typed.into_runnable()?, None));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("daain-tract-{index}"))
        .build()
        .with_context(|| format!("failed to start {threads} threads for the plan"))?;
    let pool = Arc::new(pool);
    let options = RunOptions {
        executor: Some(Executor::MultiThread(pool.clone())),
        ..Default::default()
    };
    Ok((typed.into_runnable_with_options(&options)?, Some(pool)))
}

impl KernelSummary {
    pub(crate) fn of(model: &TypedModel) -> Self {
        let mut summary = Self::default();
        for node in model.nodes() {
            *summary
                .operators
                .entry(node.op().name().to_string())
                .or_default() += 1;
            if let Some(matmul) = node.op_as::<OptMatMul>() {
                for kernel in &matmul.mmm {
                    let kernel = MatmulKernel::of(&**kernel);
                    if !kernel.native {
                        summary.portable_matmul_kernels.insert(kernel.name.clone());
                    }
                    *summary.matmul_kernels.entry(kernel.name).or_default() += 1;
                }
            }
        }
        summary
    }

    /// Returns the number of nodes of a tract operator.
    pub fn operator_count(&self, name: &str) -> usize {
        self.operators.get(name).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for KernelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |map: &std::collections::BTreeMap<String, usize>| {
            map.iter()
                .map(|(name, count)| format!("{name} x{count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "matmul kernels: {}", list(&self.matmul_kernels))?;
        if !self.portable_matmul_kernels.is_empty() {
            let portable: Vec<&str> = self
                .portable_matmul_kernels
                .iter()
                .map(String::as_str)
                .collect();
            write!(f, " (portable fallback: {})", portable.join(", "))?;
        }
        write!(f, "; operators: {}", list(&self.operators))
    }
}

/// Outputs of one backbone run: logits first, then one tensor per tap.
pub struct BackboneOutput {
    outputs: TVec<TValue>,
}

/// An optimised plan with one f32 input, run through a state and an input tensor that
/// live as long as the plan, so that a run allocates only what tract allocates itself.
pub(crate) struct PlanRunner {
    state: TypedSimpleState,
    /// The pool the plan runs on when it has more than one thread.
    pool: Option<Arc<rayon::ThreadPool>>,
    /// The input, shared with the plan during a run and written in place between runs.
    input: Arc<Tensor>,
    input_shape: [usize; 4],
}

/// Runs `f` on one of `pool`'s threads and returns its result.
///
/// tract's executor scope is not restored when the code inside it panics, and a worker
/// would then keep its own pool alive through it. The scope around `f` here restores it
/// once the panic is caught, and the panic goes on to the caller.
fn install<R: Send>(pool: &rayon::ThreadPool, f: impl FnOnce() -> R + Send) -> R {
    pool.install(|| {
        let result = multithread_tract_scope(Executor::SingleThread, || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        });
        result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl PlanRunner {
    pub(crate) fn new(
        (plan, pool): (Arc<TypedRunnableModel>, Option<Arc<rayon::ThreadPool>>),
        input_shape: [usize; 4],
    ) -> anyhow::Result<Self> {
        let state = TypedSimpleState::new(&plan)?;
        let input = Arc::new(Tensor::zero::<f32>(&input_shape)?);
        Ok(Self {
            state,
            pool,
            input,
            input_shape,
        })
    }

    pub(crate) fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    /// Returns the input tensor's values for writing, CHW row-major.
    ///
    /// The plan releases its reference to the input at the end of every run, so this
    /// allocates only if a caller kept a run's input alive, which nothing in this crate
    /// does.
    pub(crate) fn input_mut(&mut self) -> &mut [f32] {
        if Arc::get_mut(&mut self.input).is_none() {
            log::debug!("plan input still shared after a run; allocating a new one");
            let fresh = Tensor::zero::<f32>(&self.input_shape).expect("an f32 shape");
            self.input = Arc::new(fresh);
        }
        let tensor = Arc::get_mut(&mut self.input).expect("the input has one reference");
        tensor
            .to_plain_array_view_mut::<f32>()
            .ok()
            .and_then(|view| view.into_slice())
            .expect("the input is a contiguous f32 tensor in host memory")
    }

    /// Runs the plan on the current input, timing every node, and returns the time per
    /// operator name.
    pub(crate) fn profile_operators(
        &mut self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, std::time::Duration>> {
        let mut totals = std::collections::BTreeMap::<String, std::time::Duration>::new();
        let input = tvec!(TValue::from_const(self.input.clone()));
        let result = self.on_pool(|state| {
            state.run_plan_with_eval(input, |context, state, node, inputs| {
                let start = std::time::Instant::now();
                let outputs = tract_onnx::tract_core::plan::eval(context, state, node, inputs);
                *totals.entry(node.op().name().to_string()).or_default() += start.elapsed();
                outputs
            })
        });
        self.clear_after_failure(result)?;
        Ok(totals)
    }

    /// Runs the plan on the current input.
    pub(crate) fn run(&mut self) -> anyhow::Result<TVec<TValue>> {
        let input = tvec!(TValue::from_const(self.input.clone()));
        let result = self.on_pool(|state| state.run(input));
        self.clear_after_failure(result)
    }

    /// Calls `f` with the input tensor's values, on the pool with tract's executor when
    /// there is one, so that `f` can split its work with [`crate::rewrite::for_each_band`].
    pub(crate) fn write_input<R: Send>(&mut self, f: impl FnOnce(&mut [f32]) -> R + Send) -> R {
        let pool = self.pool.clone();
        let input = self.input_mut();
        match pool {
            Some(pool) => {
                let executor = Executor::MultiThread(pool.clone());
                install(&pool, || multithread_tract_scope(executor, || f(input)))
            }
            None => f(input),
        }
    }

    /// Calls `f` with the state, marked as tract's execution, on one of the pool's threads
    /// when there is a pool and on this thread otherwise.
    fn on_pool<R: Send>(&mut self, f: impl FnOnce(&mut TypedSimpleState) -> R + Send) -> R {
        let state = &mut self.state;
        let marked = move || {
            let _scope = crate::exec_scope::ScopeGuard::tract();
            f(state)
        };
        match &self.pool {
            Some(pool) => install(pool, marked),
            None => marked(),
        }
    }

    /// Passes `result` through. On failure it also drops the values that the failed run
    /// left in the state, because tract 0.23.9 skips its own reset when a node fails and
    /// they would otherwise stay alive until the next run.
    fn clear_after_failure<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            if let Err(error) = self.state.reset_turn() {
                log::warn!("failed to clear the plan's state after a failed run: {error:#}");
            }
        }
        result
    }
}

impl BackboneOutput {
    /// Returns the class logits, 1 x classes x H x W, row-major.
    pub fn logits(&self) -> &[f32] {
        plain_f32(&self.outputs[0])
    }

    /// Returns the tapped activations in tap order, each CHW row-major.
    pub fn taps(&self) -> impl Iterator<Item = &[f32]> {
        self.outputs[1..].iter().map(|t| plain_f32(t))
    }

    /// Returns the tapped activations collected as slices, without allocating.
    pub fn tap_slices(&self) -> heapless::Vec<&[f32], MAX_TAPS> {
        // Backbone::load rejects more than MAX_TAPS taps.
        self.taps().take(MAX_TAPS).collect()
    }
}

pub use crate::rewrite::{onnx_parser, Rewrites};

/// Reads an ONNX file with `onnx`, lets `check` inspect it, applies `rewrites`, and
/// returns the model with its input fixed to an f32 tensor of `input_shape`.
pub(crate) fn load_fused_model(
    onnx: &tract_onnx::Onnx,
    path: &std::path::Path,
    input_shape: [usize; 4],
    rewrites: Rewrites,
    check: impl FnOnce(&tract_onnx::pb::ModelProto) -> anyhow::Result<()>,
) -> anyhow::Result<InferenceModel> {
    let mut proto = onnx.proto_model_for_path(path)?;
    check(&proto)?;
    rewrites.apply(&mut proto);
    onnx.model_for_proto_model(&proto)?
        .with_input_fact(0, f32::fact(input_shape).into())
}

/// Returns the f32 data of a tensor in host memory, or an empty slice for any other tensor
/// (the length checks of the consumers then name the mismatch).
fn plain_f32(tensor: &Tensor) -> &[f32] {
    tensor
        .as_plain_ram()
        .and_then(|view| view.as_slice::<f32>().ok())
        .unwrap_or(&[])
}

impl Backbone {
    /// Loads and optimises the model, with the outputs narrowed to logits and taps, and
    /// the [`Rewrites`] of [`Rewrites::from_env`].
    pub fn load(spec: &BackboneSpec) -> Result<Self, BackboneError> {
        Self::load_with(spec, Rewrites::from_env())
    }

    /// [`Backbone::load`] with the given rewrites.
    pub fn load_with(spec: &BackboneSpec, rewrites: Rewrites) -> Result<Self, BackboneError> {
        let load_error = |source: anyhow::Error| BackboneError::Load {
            path: spec.path.clone(),
            source,
        };
        if !spec.path.is_file() {
            return Err(load_error(anyhow::anyhow!(
                "file not found; pass the path of an ONNX model exported by daain-tools"
            )));
        }
        let input_shape = [1, 3, spec.input_height, spec.input_width];
        let mut model =
            load_fused_model(
                &onnx_parser(),
                &spec.path,
                input_shape,
                rewrites,
                |_| Ok(()),
            )
            .map_err(load_error)?;

        if spec.taps.len() > MAX_TAPS {
            return Err(load_error(anyhow::anyhow!(
                "{} taps requested, at most {MAX_TAPS} are supported; tap fewer layers",
                spec.taps.len()
            )));
        }
        let mut outputs = vec![spec.logits.clone()];
        outputs.extend(spec.taps.iter().cloned());
        for name in &outputs {
            let found = model.outlet_labels.values().any(|label| label == name)
                || model.nodes().iter().any(|node| &node.name == name);
            if !found {
                return Err(BackboneError::MissingTensor {
                    path: spec.path.clone(),
                    name: name.clone(),
                });
            }
        }
        model.select_outputs_by_name(&outputs).map_err(load_error)?;

        let mut typed = model.into_optimized().map_err(load_error)?;
        let mut shapes = Vec::with_capacity(outputs.len());
        for ix in 0..outputs.len() {
            let fact = typed.output_fact(ix).map_err(load_error)?;
            let shape = fact
                .shape
                .as_concrete()
                .map(|s| s.to_vec())
                .ok_or_else(|| {
                    load_error(anyhow::anyhow!(
                        "output {} has no concrete shape",
                        outputs[ix]
                    ))
                })?;
            shapes.push(shape);
        }
        let logits_shape = shapes[0].clone();
        let mut taps = Vec::with_capacity(spec.taps.len());
        for (name, shape) in spec.taps.iter().zip(&shapes[1..]) {
            match shape.as_slice() {
                [1, channels, height, width] => taps.push(TapShape {
                    name: name.clone(),
                    channels: *channels,
                    height: *height,
                    width: *width,
                }),
                _ => {
                    return Err(BackboneError::ShapeMismatch {
                        name: name.clone(),
                        actual: shape.clone(),
                        expected: vec![1, 0, 0, 0],
                    })
                }
            }
        }
        // After the shapes are read: the rewrites may merge the rows of tapped outputs.
        rewrites.apply_typed(&mut typed).map_err(load_error)?;
        let kernels = KernelSummary::of(&typed);
        let plan = runnable(typed, spec.threads).map_err(load_error)?;
        log::info!(
            "backbone {} loaded: input {:?}, logits {:?}, {} taps, {} thread(s)",
            spec.path.display(),
            input_shape,
            logits_shape,
            taps.len(),
            spec.threads.max(1)
        );
        log::info!("backbone plan: {kernels}");
        let runner = PlanRunner::new(plan, input_shape).map_err(load_error)?;
        Ok(Self {
            runner,
            logits_shape,
            taps,
            kernels,
        })
    }

    /// Returns the operators and kernels tract chose for this plan.
    pub fn kernels(&self) -> &KernelSummary {
        &self.kernels
    }

    pub fn input_shape(&self) -> [usize; 4] {
        self.runner.input_shape()
    }

    pub fn logits_shape(&self) -> &[usize] {
        &self.logits_shape
    }

    /// Returns the shapes of the tapped activations, in tap order.
    pub fn taps(&self) -> &[TapShape] {
        &self.taps
    }

    /// Checks that the taps have the shapes a bundle expects.
    pub fn check_taps(&self, expected: &[TapShape]) -> Result<(), BackboneError> {
        for (actual, expected) in self.taps.iter().zip(expected) {
            if actual != expected {
                return Err(BackboneError::ShapeMismatch {
                    name: expected.name.clone(),
                    actual: vec![1, actual.channels, actual.height, actual.width],
                    expected: vec![1, expected.channels, expected.height, expected.width],
                });
            }
        }
        Ok(())
    }

    /// Returns the input tensor's values for writing in place, CHW row-major, for
    /// [`Backbone::run_in_place`].
    pub fn input_mut(&mut self) -> &mut [f32] {
        self.runner.input_mut()
    }

    /// Calls `f` with the input tensor's values (CHW, row-major) to write them, on the
    /// backbone's threads when it has more than one, for work that splits its rows among
    /// them, such as [`crate::preprocess::Preprocessor::run`].
    pub fn write_input<R: Send>(&mut self, f: impl FnOnce(&mut [f32]) -> R + Send) -> R {
        self.runner.write_input(f)
    }

    /// Runs the backbone on the values written through [`Backbone::input_mut`].
    pub fn run_in_place(&mut self) -> Result<BackboneOutput, BackboneError> {
        let outputs = self.runner.run().map_err(BackboneError::Run)?;
        Ok(BackboneOutput { outputs })
    }

    /// Runs the backbone once on the values written through [`Backbone::input_mut`] and
    /// returns the time spent in each tract operator, keyed by operator name. Timing every
    /// node adds a little overhead of its own, so use the shares rather than the sum.
    pub fn profile_operators(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, std::time::Duration>, BackboneError> {
        self.runner.profile_operators().map_err(BackboneError::Run)
    }

    /// Copies one CHW input tensor into the plan's input and runs the backbone.
    pub fn run(&mut self, input: &[f32]) -> Result<BackboneOutput, BackboneError> {
        let input_shape = self.runner.input_shape();
        let expected: usize = input_shape.iter().product();
        if input.len() != expected {
            return Err(BackboneError::InputLength {
                actual: input.len(),
                expected,
                height: input_shape[2],
                width: input_shape[3],
            });
        }
        self.input_mut().copy_from_slice(input);
        self.run_in_place()
    }
}

/// Writes the per-pixel argmax of `logits` (classes x H x W) into `classes_out` (H x W).
pub fn argmax_classes(logits: &[f32], classes: usize, classes_out: &mut [u8]) {
    let plane = classes_out.len();
    for (pixel, out) in classes_out.iter_mut().enumerate() {
        let mut best = 0;
        let mut best_value = f32::NEG_INFINITY;
        for class in 0..classes {
            let value = logits[class * plane + pixel];
            if value > best_value {
                best_value = value;
                best = class;
            }
        }
        *out = best as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::BackbonePrecision;

    #[test]
    fn precision_names_round_trip() {
        for precision in [BackbonePrecision::F32, BackbonePrecision::Int8] {
            assert_eq!(
                precision.to_string().parse::<BackbonePrecision>(),
                Ok(precision)
            );
        }
    }

    #[test]
    fn unknown_precision_is_rejected() {
        let error = "fp16".parse::<BackbonePrecision>().unwrap_err();
        assert!(error.contains("\"fp16\""), "{error}");
        assert!(error.contains("f32 or int8"), "{error}");
    }
}
