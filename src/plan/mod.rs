//! The combined plan: backbone, mask gather and flow as one tract model.
//!
//! A bundle may carry `plan.onnx`, the backbone graph extended by two custom operators
//! in the ONNX domain [`DOMAIN`]:
//!
//! - [`GATHER_OP`] reads the mask's values from the taps. Inputs: the mask points
//!   `[n, 3]` (`(channel, y, x)`, INT32 or INT64 initializer), then the tap tensors in the
//!   order the sampling space stacks them. Attributes: `input_height`, `input_width`.
//!   Output: `[n]` f32.
//! - [`COUPLING_OP`] runs one `AllInOneBlock` (see [`crate::flow`]). Inputs: `x` `[d]`, the
//!   log|det J| of the blocks before it (f32 scalar), then the block's seven tensors of
//!   the flow file layout as initializers, in the order of that layout. Attribute:
//!   `clamp`. Outputs: the block output `[d]` and the log|det J| including this block.
//!
//! The model's outputs are `logits`, [`SAMPLE_OUTPUT`], [`FLOW_OUTPUT`] and
//! [`LOG_DET_OUTPUT`]. [`register_ops`] adds the operators to a tract-onnx loader, which
//! then types, optimises and runs the whole model as one plan. The gather evaluates
//! [`GatherPlan::gather`](crate::sampling::GatherPlan::gather), and the coupling block
//! evaluates the kernel of [`forward_kernel_f32`](crate::flow::forward_kernel_f32), so
//! the plan computes the same values as the stages run one after the other.

mod ops;

use std::path::PathBuf;

use tract_onnx::model::OnnxOpRegister;
use tract_onnx::prelude::*;

use crate::backbone::{
    load_fused_model, runnable, BackboneError, KernelSummary, PlanRunner, Rewrites,
};

/// ONNX domain of the custom operators.
pub const DOMAIN: &str = "ai.daain";
/// Version of the operator set in [`DOMAIN`].
pub const DOMAIN_VERSION: i64 = 1;
/// Operator type of the mask gather.
pub const GATHER_OP: &str = "DaainGather";
/// Operator type of one coupling block.
pub const COUPLING_OP: &str = "DaainCoupling";
/// Name of the output holding the gathered activation vector.
pub const SAMPLE_OUTPUT: &str = "daain.sample";
/// Name of the output holding the flow output `z`.
pub const FLOW_OUTPUT: &str = "daain.z";
/// Name of the output holding the flow's log|det dz/dx| (f32 scalar).
pub const LOG_DET_OUTPUT: &str = "daain.log_det";
/// Metadata key of `plan.onnx` that records the SHA-256 of the mask file it was made from.
pub const MASK_SHA256_KEY: &str = "daain.mask_sha256";
/// Metadata key of `plan.onnx` that records the SHA-256 of the flow file it was made from.
pub const FLOW_SHA256_KEY: &str = "daain.flow_sha256";

/// Registers the custom operators in a tract-onnx operator register. tract-onnx keys
/// its register by operator type alone, so the names carry a `Daain` prefix.
pub fn register_ops(register: &mut OnnxOpRegister) {
    register.insert(GATHER_OP, ops::gather_from_onnx);
    register.insert(COUPLING_OP, ops::coupling_from_onnx);
}

/// Returns a tract-onnx loader for the standard operators, those of the backbone's
/// [`crate::rewrite::Rewrites`] and ours.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = crate::rewrite::onnx_parser();
    register_ops(&mut onnx.op_register);
    onnx
}

/// Combined plan file, tensors to read back and input size.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub path: PathBuf,
    pub input_height: usize,
    pub input_width: usize,
    /// Name of the class-logit output (1 x classes x H x W).
    pub logits: String,
    /// Flow dimension the bundle's manifest states.
    pub dim: usize,
    /// Threads of the pool that runs the plan, as for the backbone alone.
    pub threads: usize,
    /// SHA-256 of the bundle's mask and flow files. The plan carries its own copy of the
    /// mask points and flow weights, so it must record the same hashes.
    pub mask_sha256: String,
    pub flow_sha256: String,
}

/// A loaded, optimised combined plan.
pub struct CombinedPlan {
    runner: PlanRunner,
    logits_shape: Vec<usize>,
    dim: usize,
    kernels: KernelSummary,
}

/// Outputs of one combined run.
pub struct PlanOutput {
    outputs: TVec<TValue>,
}

impl PlanOutput {
    /// Returns the class logits, 1 x classes x H x W, row-major.
    pub fn logits(&self) -> &[f32] {
        plain_f32(&self.outputs[0])
    }

    /// Returns the gathered activation vector, the flow's input.
    pub fn sample(&self) -> &[f32] {
        plain_f32(&self.outputs[1])
    }

    /// Returns the flow output `z`.
    pub fn z(&self) -> &[f32] {
        plain_f32(&self.outputs[2])
    }

    /// Returns the flow's log|det dz/dx|.
    pub fn log_det(&self) -> f32 {
        self.outputs[3]
            .as_plain_ram()
            .and_then(|view| view.to_scalar::<f32>().ok().copied())
            .unwrap_or(f32::NAN)
    }
}

fn plain_f32(tensor: &Tensor) -> &[f32] {
    tensor
        .as_plain_ram()
        .and_then(|view| view.as_slice::<f32>().ok())
        .unwrap_or(&[])
}

/// Checks that the plan was made from the bundle's current mask and flow files.
fn check_source_hashes(proto: &tract_onnx::pb::ModelProto, spec: &PlanSpec) -> anyhow::Result<()> {
    let recorded = |key: &str| {
        proto
            .metadata_props
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| entry.value.as_str())
    };
    for (key, file, expected) in [
        (MASK_SHA256_KEY, "mask", &spec.mask_sha256),
        (FLOW_SHA256_KEY, "flow", &spec.flow_sha256),
    ] {
        match recorded(key) {
            Some(value) if value == expected => {}
            Some(value) => anyhow::bail!(
                "the plan was made from a {file} file with SHA-256 {value}, but the bundle's \
                 {file} file has {expected}; re-create the plan with \
                 `daain-tools export-plan --bundle DIR`"
            ),
            None => anyhow::bail!(
                "the plan records no {file} hash ({key}); re-create it with \
                 `daain-tools export-plan --bundle DIR`"
            ),
        }
    }
    Ok(())
}

impl CombinedPlan {
    /// Loads the plan with our operators registered, then types and optimises it.
    pub fn load(spec: &PlanSpec) -> Result<Self, BackboneError> {
        let load_error = |source: anyhow::Error| BackboneError::Load {
            path: spec.path.clone(),
            source,
        };
        if !spec.path.is_file() {
            return Err(load_error(anyhow::anyhow!(
                "file not found; write it with `daain-tools export-plan --bundle DIR`"
            )));
        }
        let input_shape = [1, 3, spec.input_height, spec.input_width];
        let rewrites = Rewrites::from_env();
        let mut model = load_fused_model(&onnx(), &spec.path, input_shape, rewrites, |proto| {
            check_source_hashes(proto, spec)
        })
        .map_err(load_error)?;
        let outputs = [
            spec.logits.as_str(),
            SAMPLE_OUTPUT,
            FLOW_OUTPUT,
            LOG_DET_OUTPUT,
        ];
        for name in outputs {
            if !model.outlet_labels.values().any(|label| label == name) {
                return Err(BackboneError::MissingTensor {
                    path: spec.path.clone(),
                    name: name.to_owned(),
                });
            }
        }
        model.select_outputs_by_name(&outputs).map_err(load_error)?;
        let mut typed = model.into_optimized().map_err(load_error)?;

        let mut shapes = Vec::with_capacity(outputs.len());
        for (ix, name) in outputs.iter().enumerate() {
            let fact = typed.output_fact(ix).map_err(load_error)?;
            let shape = fact
                .shape
                .as_concrete()
                .map(|s| s.to_vec())
                .ok_or_else(|| {
                    load_error(anyhow::anyhow!("output {name} has no concrete shape"))
                })?;
            shapes.push(shape);
        }
        let expected_shapes = [vec![spec.dim], vec![spec.dim], vec![]];
        for ((name, actual), expected) in outputs[1..].iter().zip(&shapes[1..]).zip(expected_shapes)
        {
            if *actual != expected {
                return Err(BackboneError::ShapeMismatch {
                    name: (*name).to_owned(),
                    actual: actual.clone(),
                    expected,
                });
            }
        }
        // After the shapes are read: the rewrites may merge the rows of an output.
        rewrites.apply_typed(&mut typed).map_err(load_error)?;
        let kernels = KernelSummary::of(&typed);
        let plan = runnable(typed, spec.threads).map_err(load_error)?;
        let runner = PlanRunner::new(plan, input_shape).map_err(load_error)?;
        log::info!(
            "combined plan {} loaded: input {input_shape:?}, logits {:?}, flow dimension {}",
            spec.path.display(),
            shapes[0],
            spec.dim
        );
        log::info!("combined plan: {kernels}");
        Ok(Self {
            runner,
            logits_shape: shapes[0].clone(),
            dim: spec.dim,
            kernels,
        })
    }

    /// Returns the operators and kernels tract chose for this plan.
    pub fn kernels(&self) -> &KernelSummary {
        &self.kernels
    }

    pub fn logits_shape(&self) -> &[usize] {
        &self.logits_shape
    }

    /// Flow dimension, the length of the sample and of `z`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Returns the input tensor's values for writing in place, CHW row-major.
    pub fn input_mut(&mut self) -> &mut [f32] {
        self.runner.input_mut()
    }

    /// Calls `f` with the input tensor's values to write them, on the plan's threads, as
    /// [`crate::backbone::Backbone::write_input`] does.
    pub fn write_input<R: Send>(&mut self, f: impl FnOnce(&mut [f32]) -> R + Send) -> R {
        self.runner.write_input(f)
    }

    /// Runs the plan on the current input, timing every node, and returns the time per
    /// operator name.
    pub fn profile_operators(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, std::time::Duration>, anyhow::Error> {
        self.runner.profile_operators()
    }

    /// Runs backbone, gather and flow on the values written through
    /// [`CombinedPlan::input_mut`].
    ///
    /// A non-finite activation at a mask point fails the run with the
    /// [`SamplingError`](crate::sampling::SamplingError) of the gather inside the error.
    pub fn run(&mut self) -> Result<PlanOutput, anyhow::Error> {
        let outputs = self.runner.run()?;
        Ok(PlanOutput { outputs })
    }
}
