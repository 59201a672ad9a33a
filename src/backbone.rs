//! The segmentation backbone, run through tract.
//!
//! The ONNX model is loaded once, its input fixed to `1x3xHxW`, its outputs narrowed to
//! the logits plus the tapped activations the mask needs, and then optimised into one
//! plan. Tapping a tensor keeps it alive in the plan, so tap tensors that the optimiser
//! would otherwise fold away (a BatchNorm output followed by an activation, say) cost
//! extra work; the exported ESPNet taps the PReLU outputs, which survive optimisation.

use std::path::PathBuf;
use std::sync::Arc;

use tract_onnx::prelude::*;

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
    #[error("backbone inference failed: {0}")]
    Run(anyhow::Error),
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
}

/// A loaded, optimised backbone plan.
pub struct Backbone {
    runner: PlanRunner,
    logits_shape: Vec<usize>,
    taps: Vec<TapShape>,
}

/// Outputs of one backbone run: logits first, then one tensor per tap.
pub struct BackboneOutput {
    outputs: TVec<TValue>,
}

/// An optimised plan with one f32 input, run through a state and an input tensor that
/// live as long as the plan, so that a run allocates only what tract allocates itself.
pub(crate) struct PlanRunner {
    state: TypedSimpleState,
    /// The input, shared with the plan during a run and written in place between runs.
    input: Arc<Tensor>,
    input_shape: [usize; 4],
}

impl PlanRunner {
    pub(crate) fn new(
        plan: Arc<TypedRunnableModel>,
        input_shape: [usize; 4],
    ) -> anyhow::Result<Self> {
        let state = TypedSimpleState::new(&plan)?;
        let input = Arc::new(Tensor::zero::<f32>(&input_shape)?);
        Ok(Self {
            state,
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

    /// Runs the plan on the current input.
    pub(crate) fn run(&mut self) -> anyhow::Result<TVec<TValue>> {
        let _scope = crate::exec_scope::ScopeGuard::tract();
        self.state
            .run(tvec!(TValue::from_const(self.input.clone())))
    }
}

impl BackboneOutput {
    /// Returns the class logits, 1 x classes x H x W, row-major.
    pub fn logits(&self) -> &[f32] {
        plain_f32(&self.outputs[0])
    }

    /// Returns the tapped activations in tap order, each CHW row-major.
    pub fn taps(&self) -> impl Iterator<Item = &[f32]> {
        self.outputs[1..]
            .iter()
            .map(|t| plain_f32(t))
    }

    /// Returns the tapped activations collected as slices, without allocating.
    pub fn tap_slices(&self) -> heapless::Vec<&[f32], MAX_TAPS> {
        // Backbone::load rejects more than MAX_TAPS taps.
        self.taps().take(MAX_TAPS).collect()
    }
}

/// Returns the f32 data of a tensor in host memory, or an empty slice for any other tensor
/// (the length checks of the consumers then name the mismatch).
fn plain_f32(tensor: &Tensor) -> &[f32] {
    tensor.as_plain_ram().and_then(|view| view.as_slice::<f32>().ok()).unwrap_or(&[])
}

impl Backbone {
    /// Loads and optimises the model, with the outputs narrowed to logits and taps.
    pub fn load(spec: &BackboneSpec) -> Result<Self, BackboneError> {
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
        let mut model = tract_onnx::onnx()
            .model_for_path(&spec.path)
            .map_err(load_error)?
            .with_input_fact(0, f32::fact(input_shape).into())
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

        let typed = model.into_optimized().map_err(load_error)?;
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
        let plan = typed.into_runnable().map_err(load_error)?;
        log::info!(
            "backbone {} loaded: input {:?}, logits {:?}, {} taps",
            spec.path.display(),
            input_shape,
            logits_shape,
            taps.len()
        );
        let runner = PlanRunner::new(plan, input_shape).map_err(load_error)?;
        Ok(Self {
            runner,
            logits_shape,
            taps,
        })
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

    /// Runs the backbone on the values written through [`Backbone::input_mut`].
    pub fn run_in_place(&mut self) -> Result<BackboneOutput, BackboneError> {
        let outputs = self.runner.run().map_err(BackboneError::Run)?;
        Ok(BackboneOutput { outputs })
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
