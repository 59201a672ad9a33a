//! The custom operators of the combined plan: the mask gather and the coupling block.
//!
//! Each operator exists twice, as tract requires. The ONNX loader builds an
//! [`Expansion`] from the node's attributes. When the inference model is typed, the
//! expansion reads the node's weight inputs, which must be initializers, validates them
//! with the same code as the bundle loader, and wires a typed operator that owns the
//! prepared weights and has only the activations as inputs.
//!
//! The typed operators keep their output tensors in an [`OpState`] and write each frame
//! into them again, so that evaluating them inside a plan allocates nothing once the
//! previous frame's outputs have been released.

use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::exec_scope::ScopeGuard;
use crate::flow::{forward_kernel_f32, BlockParams, Flow, ForwardKernel};
use crate::sampling::{GatherPlan, TapShape, MAX_TAPS};

/// Number of weight inputs of a coupling node after `x` and `log_det`.
const COUPLING_WEIGHTS: usize = 7;

/// Builds the gather expansion from a `DaainGather` node.
pub(super) fn gather_from_onnx(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let input_height: i64 = node.get_attr("input_height")?;
    let input_width: i64 = node.get_attr("input_width")?;
    node.expect_attr("input_height", input_height > 0, "a positive height")?;
    node.expect_attr("input_width", input_width > 0, "a positive width")?;
    node.expect(
        node.input.len() >= 2,
        "the mask points followed by at least one tap",
    )?;
    let tap_names = node.input[1..].to_vec();
    Ok((
        expand(GatherExpansion {
            input_height: input_height as usize,
            input_width: input_width as usize,
            tap_names,
        }),
        vec![],
    ))
}

/// Builds the coupling-block expansion from a `DaainCoupling` node.
pub(super) fn coupling_from_onnx(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let clamp: f32 = node.get_attr("clamp")?;
    node.expect(
        node.input.len() == 2 + COUPLING_WEIGHTS,
        "inputs x, log_det, permutation, global_scale, global_offset, subnet.0.weight, \
         subnet.0.bias, subnet.2.weight, subnet.2.bias",
    )?;
    Ok((expand(CouplingExpansion { clamp }), vec![]))
}

/// `DaainGather` before typing. Inputs: mask points `[n, 3]` (i32 or i64, an
/// initializer), then the taps in the order the sampling space stacks them. Output: the
/// gathered f32 vector `[n]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GatherExpansion {
    input_height: usize,
    input_width: usize,
    /// Names of the tap inputs, for the messages of the gather plan.
    tap_names: Vec<String>,
}

impl Expansion for GatherExpansion {
    fn name(&self) -> StaticName {
        "DaainGather".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1 + self.tap_names.len())?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&inputs[0].shape[1], 3.to_dim())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].rank, 1)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        for tap in &inputs[1..] {
            s.equals(&tap.datum_type, f32::datum_type())?;
            s.equals(&tap.rank, 4)?;
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let points = constant_input(model, inputs[0], prefix, "mask points")?;
        let points = points.cast_to::<i64>()?;
        let points = points.try_as_plain_ram()?.as_slice::<i64>()?;
        let mut voxels = Vec::with_capacity(points.len() / 3);
        for (index, point) in points.chunks_exact(3).enumerate() {
            let coordinate = |axis: usize| {
                u32::try_from(point[axis]).map_err(|_| {
                    format_err!(
                        "{prefix}: mask point {index} has the coordinate {} on axis {axis}, \
                         which is negative or too large; re-export the plan",
                        point[axis]
                    )
                })
            };
            voxels.push([coordinate(0)?, coordinate(1)?, coordinate(2)?]);
        }

        let mut taps = Vec::with_capacity(inputs.len() - 1);
        for (name, &outlet) in self.tap_names.iter().zip(&inputs[1..]) {
            let fact = model.outlet_fact(outlet)?;
            let shape = fact.shape.as_concrete().with_context(|| {
                format!("{prefix}: tap {name} has no concrete shape; fix the input size")
            })?;
            let [1, channels, height, width] = *shape else {
                bail!("{prefix}: tap {name} has shape {shape:?}, expected [1, C, H, W]");
            };
            taps.push(TapShape {
                name: name.clone(),
                channels,
                height,
                width,
            });
        }
        let plan = GatherPlan::new(&voxels, &taps, self.input_height, self.input_width)
            .with_context(|| format!("{prefix}: the mask does not fit the taps"))?;
        model.wire_node(
            prefix,
            GatherOp {
                plan: Arc::new(plan),
            },
            &inputs[1..],
        )
    }
}

/// `DaainCoupling` before typing. Inputs: `x` `[d]`, `log_det` (scalar, the sum of the
/// previous blocks), then the block's weights in the flow file layout (permutation as
/// i32 or i64). Outputs: the block output `[d]` and `log_det` plus the block's
/// log|det J|.
#[derive(Debug, Clone, PartialEq)]
struct CouplingExpansion {
    clamp: f32,
}

impl Eq for CouplingExpansion {}

impl std::hash::Hash for CouplingExpansion {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.clamp.to_bits().hash(state)
    }
}

impl Expansion for CouplingExpansion {
    fn name(&self) -> StaticName {
        "DaainCoupling".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2 + COUPLING_WEIGHTS)?;
        check_output_arity(outputs, 2)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, 1)?;
        s.equals(&inputs[1].datum_type, f32::datum_type())?;
        s.equals(&inputs[1].rank, 0)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].shape, &inputs[0].shape)?;
        s.equals(&outputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[1].rank, 0)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let weight = |ix: usize, what: &str| constant_input(model, inputs[ix], prefix, what);
        let permutation = weight(2, "permutation")?.cast_to::<i64>()?.into_owned();
        let global_scale = weight(3, "global_scale")?;
        let global_offset = weight(4, "global_offset")?;
        let subnet_0_weight = weight(5, "subnet.0.weight")?;
        let subnet_0_bias = weight(6, "subnet.0.bias")?;
        let subnet_2_weight = weight(7, "subnet.2.weight")?;
        let subnet_2_bias = weight(8, "subnet.2.bias")?;

        let permutation = permutation
            .try_as_plain_ram()?
            .as_slice::<i64>()?
            .iter()
            .map(|&p| {
                u32::try_from(p).map_err(|_| {
                    format_err!("{prefix}: permutation value {p} is negative or too large")
                })
            })
            .collect::<TractResult<Vec<u32>>>()?;
        let f32s = |tensor: &Tensor, what: &str| -> TractResult<Vec<f32>> {
            let values = tensor
                .try_as_plain_ram()?
                .as_slice::<f32>()
                .with_context(|| format!("{prefix}: {what} must be f32"))?;
            Ok(values.to_vec())
        };
        let dim = permutation.len();
        let hidden = subnet_0_bias.len();
        let global_scale = f32s(&global_scale, "global_scale")?;
        let global_offset = f32s(&global_offset, "global_offset")?;
        let subnet_0_weight = f32s(&subnet_0_weight, "subnet.0.weight")?;
        let subnet_0_bias = f32s(&subnet_0_bias, "subnet.0.bias")?;
        let subnet_2_weight = f32s(&subnet_2_weight, "subnet.2.weight")?;
        let subnet_2_bias = f32s(&subnet_2_bias, "subnet.2.bias")?;
        let block = BlockParams {
            permutation: &permutation,
            global_scale: &global_scale,
            global_offset: &global_offset,
            subnet_0_weight: &subnet_0_weight,
            subnet_0_bias: &subnet_0_bias,
            subnet_2_weight: &subnet_2_weight,
            subnet_2_bias: &subnet_2_bias,
        };
        let flow = Flow::new(dim, hidden, self.clamp, vec![block])
            .with_context(|| format!("{prefix}: invalid coupling block"))?
            .into_owned();
        let input_dim = model
            .outlet_fact(inputs[0])?
            .shape
            .as_concrete()
            .map(|s| s[0]);
        ensure!(
            input_dim == Some(dim),
            "{prefix}: input has shape {:?}, the block's dimension is {dim}",
            model.outlet_fact(inputs[0])?.shape
        );
        model.wire_node(
            prefix,
            CouplingOp {
                block: Arc::new(flow),
                kernel: forward_kernel_f32(),
            },
            &inputs[..2],
        )
    }
}

/// Returns the constant value of an input, or an error naming the weight when it is
/// computed at run time.
fn constant_input(
    model: &TypedModel,
    outlet: OutletId,
    prefix: &str,
    what: &str,
) -> TractResult<Arc<Tensor>> {
    model.outlet_fact(outlet)?.konst.clone().with_context(|| {
        format!(
            "{prefix}: the {what} must be an initializer (a constant), not a value computed \
             at run time"
        )
    })
}

/// Replaces `slot` with a zeroed tensor of `shape` unless this state holds the only
/// reference to it, and returns it for writing. The previous frame's outputs are
/// released by then in a plan run, so only the first evaluation allocates.
fn writable<'s>(slot: &'s mut Arc<Tensor>, shape: &[usize]) -> TractResult<&'s mut Tensor> {
    if Arc::get_mut(slot).is_none_or(|tensor| tensor.shape() != shape) {
        *slot = Arc::new(Tensor::zero::<f32>(shape)?);
    }
    Ok(Arc::get_mut(slot).expect("a fresh Arc has one reference"))
}

/// Returns the f32 data of an input tensor.
fn input_f32<'t>(tensor: &'t Tensor, what: &str) -> TractResult<&'t [f32]> {
    tensor
        .try_as_plain_ram()?
        .as_slice::<f32>()
        .with_context(|| format!("{what} is not an f32 tensor in host memory"))
}

/// Typed gather: reads the mask's values from the taps with a [`GatherPlan`].
#[derive(Debug, Clone)]
pub struct GatherOp {
    plan: Arc<GatherPlan>,
}

impl PartialEq for GatherOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.plan, &other.plan)
    }
}

impl Eq for GatherOp {}

impl GatherOp {
    fn gather_into(&self, inputs: &[TValue], output: &mut Tensor) -> TractResult<()> {
        let mut taps = heapless::Vec::<&[f32], MAX_TAPS>::new();
        for (tap, shape) in inputs.iter().zip(self.plan.taps()) {
            // GatherPlan::new has rejected more than MAX_TAPS taps.
            let _ = taps.push(input_f32(tap, &shape.name)?);
        }
        let mut output = output.try_as_plain_ram_mut()?;
        self.plan.gather(&taps, output.as_slice_mut::<f32>()?)?;
        Ok(())
    }
}

impl Op for GatherOp {
    fn name(&self) -> StaticName {
        "DaainGather".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} points from {} taps",
            self.plan.len(),
            self.plan.taps().len()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GatherOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut output = Tensor::zero::<f32>(&[self.plan.len()])?;
        self.gather_into(&inputs, &mut output)?;
        Ok(tvec!(output.into_tvalue()))
    }

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(GatherState {
            output: Arc::new(Tensor::zero::<f32>(&[self.plan.len()])?),
        })))
    }
}

impl TypedOp for GatherOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == self.plan.taps().len(),
            "DaainGather expects {} taps, got {}",
            self.plan.taps().len(),
            inputs.len()
        );
        Ok(tvec!(f32::fact([self.plan.len()])))
    }

    as_op!();
}

/// Output buffer of a [`GatherOp`] kept between frames.
#[derive(Debug, Clone)]
struct GatherState {
    output: Arc<Tensor>,
}

impl OpState for GatherState {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let _scope = ScopeGuard::daain();
        let op = op
            .downcast_ref::<GatherOp>()
            .context("op and state mismatch")?;
        let output = writable(&mut self.output, &[op.plan.len()])?;
        op.gather_into(&inputs, output)?;
        Ok(tvec!(TValue::from_const(self.output.clone())))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        Ok(())
    }
}

/// Typed coupling block: runs the prepared block through the flow's block kernel.
#[derive(Debug, Clone)]
pub struct CouplingOp {
    /// A one-block flow, validated and prepared by [`Flow::new`].
    block: Arc<Flow<'static>>,
    kernel: ForwardKernel,
}

impl PartialEq for CouplingOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.block, &other.block) && self.kernel.name() == other.kernel.name()
    }
}

impl Eq for CouplingOp {}

impl CouplingOp {
    fn dim(&self) -> usize {
        self.block.dim()
    }

    /// Runs the block on `inputs` (`x`, `log_det`) into `y` and `log_det_out`.
    fn forward_into(
        &self,
        inputs: &[TValue],
        y: &mut Tensor,
        log_det_out: &mut Tensor,
        hidden: &mut [f32],
        subnet_out: &mut [f32],
    ) -> TractResult<()> {
        let x = input_f32(&inputs[0], "coupling input")?;
        let log_det_in = *inputs[1].try_as_plain_ram()?.to_scalar::<f32>()?;
        ensure!(
            x.len() == self.dim(),
            "coupling input has {} values, expected {}",
            x.len(),
            self.dim()
        );
        let mut y_view = y.try_as_plain_ram_mut()?;
        let y = y_view.as_slice_mut::<f32>()?;
        let block = &self.block.blocks()[0];
        let kernel = self.kernel.kernel();
        let log_det = kernel(block, self.block.clamp(), x, y, hidden, subnet_out);
        let mut log_det_view = log_det_out.try_as_plain_ram_mut()?;
        *log_det_view.to_scalar_mut::<f32>()? = log_det_in + log_det;
        Ok(())
    }
}

impl Op for CouplingOp {
    fn name(&self) -> StaticName {
        "DaainCoupling".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "dim {}, hidden {}, kernel {}",
            self.dim(),
            self.block.hidden(),
            self.kernel.name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for CouplingOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let mut y = Tensor::zero::<f32>(&[self.dim()])?;
        let mut log_det = Tensor::zero::<f32>(&[])?;
        let mut hidden = vec![0.0; self.block.hidden()];
        let mut subnet_out = vec![0.0; 2 * (self.dim() / 2)];
        self.forward_into(&inputs, &mut y, &mut log_det, &mut hidden, &mut subnet_out)?;
        Ok(tvec!(y.into_tvalue(), log_det.into_tvalue()))
    }

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::new(CouplingState {
            y: Arc::new(Tensor::zero::<f32>(&[self.dim()])?),
            log_det: Arc::new(Tensor::zero::<f32>(&[])?),
            hidden: vec![0.0; self.block.hidden()],
            subnet_out: vec![0.0; 2 * (self.dim() / 2)],
        })))
    }
}

impl TypedOp for CouplingOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 2,
            "DaainCoupling expects 2 inputs, got {}",
            inputs.len()
        );
        Ok(tvec!(f32::fact([self.dim()]), f32::scalar_fact()))
    }

    as_op!();
}

/// Output buffers and kernel work buffers of a [`CouplingOp`] kept between frames.
#[derive(Debug, Clone)]
struct CouplingState {
    y: Arc<Tensor>,
    log_det: Arc<Tensor>,
    hidden: Vec<f32>,
    subnet_out: Vec<f32>,
}

impl OpState for CouplingState {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let _scope = ScopeGuard::daain();
        let op = op
            .downcast_ref::<CouplingOp>()
            .context("op and state mismatch")?;
        let dim = op.dim();
        let y = writable(&mut self.y, &[dim])?;
        let log_det = writable(&mut self.log_det, &[])?;
        op.forward_into(&inputs, y, log_det, &mut self.hidden, &mut self.subnet_out)?;
        Ok(tvec!(
            TValue::from_const(self.y.clone()),
            TValue::from_const(self.log_det.clone())
        ))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        Ok(())
    }
}
