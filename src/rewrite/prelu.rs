//! A fused per-channel affine map and PRelu for tract, and the ONNX rewrite that uses it.
//!
//! tract 0.23 lowers ONNX `PRelu` to three passes over the tensor (Mul, Greater, Iff)
//! and a `BatchNormalization` that it cannot fold into a convolution to two more (Mul,
//! Add). ESPNet has 20 PRelus, most of them after a BatchNorm that follows a Concat or
//! an Add, so these element-wise passes take about a third of an f32 frame. The rewrite
//! replaces every `PRelu`, together with the BatchNorm in front of it when nothing else
//! reads the BatchNorm's output, by one node of type [`OP_TYPE`]. tract evaluates it in
//! one pass: `y = scale[c] * x + bias[c]`, then `y` where `y > 0` and `slope[c] * y`
//! elsewhere. The output keeps the PRelu's name, so taps and graph outputs are unchanged.
//!
//! The rewritten model exists only in memory for tract: the ONNX files stay standard.

use std::collections::HashMap;

use anyhow::{ensure, Context};

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{EvalContext, EvalOp, Op, StaticName, TypedOp};
use tract_onnx::tract_hir::internal::{
    check_input_arity, check_output_arity, expand, Expansion, InferenceOp, InferenceResult, Solver,
    TensorProxy,
};

/// ONNX operator type of the fused node. Only this runtime's tract parser registers it.
pub const OP_TYPE: &str = "DaainAffinePRelu";

/// The typed tract operator: per-channel affine map and PRelu on an NCHW f32 tensor.
#[derive(Debug, Clone)]
pub struct AffinePRelu {
    scale: Vec<f32>,
    bias: Vec<f32>,
    slope: Vec<f32>,
}

/// Bitwise equality, which tract needs to compare operators (`Eq`, so NaN equals itself).
impl PartialEq for AffinePRelu {
    fn eq(&self, other: &Self) -> bool {
        super::same_bits(&self.scale, &other.scale)
            && super::same_bits(&self.bias, &other.bias)
            && super::same_bits(&self.slope, &other.slope)
    }
}

impl Eq for AffinePRelu {}

impl AffinePRelu {
    fn apply(&self, data: &mut [f32], channels: usize, height: usize) {
        let width = data.len() / (channels * height).max(1);
        if width == 0 {
            return;
        }
        // Bands of rows go to tract's threads, split as the convolutions split theirs.
        super::for_each_band(data, channels, height, width, |mut band| {
            for c in 0..channels {
                self.apply_channel(c, band.plane(c));
            }
        });
    }

    /// Returns the number of channels.
    pub(crate) fn channels(&self) -> usize {
        self.slope.len()
    }

    /// Maps `values` of channel `c` in place.
    pub(crate) fn apply_channel(&self, c: usize, values: &mut [f32]) {
        let (scale, bias, slope) = (self.scale[c], self.bias[c], self.slope[c]);
        for v in values {
            let a = scale * *v + bias;
            *v = if a > 0.0 { a } else { slope * a };
        }
    }
}

impl Op for AffinePRelu {
    fn name(&self) -> StaticName {
        "AffinePRelu".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for AffinePRelu {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs
            .into_iter()
            .next()
            .context("AffinePRelu has one input")?;
        let mut tensor = input.into_tensor();
        let shape = tensor.shape().to_vec();
        ensure!(
            shape.len() == 4 && shape[0] == 1 && shape[1] == self.slope.len(),
            "AffinePRelu input has shape {shape:?}, expected [1, {}, H, W]",
            self.slope.len()
        );
        let mut view = tensor.try_as_plain_ram_mut()?;
        self.apply(view.as_slice_mut::<f32>()?, shape[1], shape[2]);
        Ok(tvec!(tensor.into_tvalue()))
    }
}

impl TypedOp for AffinePRelu {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    tract_onnx::tract_core::as_op!();
}

/// The ONNX-level operator: inputs `x`, `scale`, `bias`, `slope`, the last three
/// constant, one value per channel.
#[derive(Debug, Clone)]
struct AffinePReluExpansion;

impl Expansion for AffinePReluExpansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 4)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        name: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let constant = |ix: usize| -> TractResult<Vec<f32>> {
            Ok(super::constant_f32(model, inputs[ix], OP_TYPE, name)?.1)
        };
        let op = AffinePRelu {
            scale: constant(1)?,
            bias: constant(2)?,
            slope: constant(3)?,
        };
        model.wire_node(name, op, &[inputs[0]])
    }
}

/// Parses an [`OP_TYPE`] node; [`super::onnx_parser`] registers it.
pub fn parse_affine_prelu(
    _ctx: &tract_onnx::model::ParsingContext,
    _node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(AffinePReluExpansion), vec![]))
}

fn f32_values(tensor: &pb::TensorProto) -> Option<Vec<f32>> {
    if tensor.data_type != pb::tensor_proto::DataType::Float as i32 {
        return None;
    }
    if !tensor.raw_data.is_empty() {
        Some(
            tensor
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    } else {
        Some(tensor.float_data.clone())
    }
}

fn f32_initializer(name: &str, values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: pb::tensor_proto::DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// Replaces each `PRelu` with constant per-channel slopes, and the `BatchNormalization`
/// before it when the PRelu is its only reader and it is no graph output, by one
/// [`OP_TYPE`] node. Returns the number of PRelus and of BatchNorms replaced. A PRelu
/// whose slope is not a per-channel initializer is left as it is.
pub fn fuse_affine_prelu(model: &mut pb::ModelProto) -> (usize, usize) {
    let Some(graph) = model.graph.as_mut() else {
        return (0, 0);
    };
    let initializers: HashMap<String, usize> = graph
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let values = |name: &str| {
        initializers
            .get(name)
            .and_then(|&i| f32_values(&graph.initializer[i]))
    };
    let mut readers: HashMap<String, usize> = HashMap::new();
    for node in &graph.node {
        for input in &node.input {
            *readers.entry(input.clone()).or_default() += 1;
        }
    }
    let outputs: Vec<&String> = graph.output.iter().map(|o| &o.name).collect();
    let producers: HashMap<&String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o, i)))
        .collect();

    let mut removed = vec![false; graph.node.len()];
    let mut replacements: Vec<(usize, pb::NodeProto, [Vec<f32>; 3])> = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        if node.op_type != "PRelu" || node.input.len() != 2 {
            continue;
        }
        let Some(slope) = values(&node.input[1]) else {
            continue;
        };
        let channels = slope.len();
        let mut input = node.input[0].clone();
        let mut scale = vec![1.0; channels];
        let mut bias = vec![0.0; channels];
        let batch_norm = producers.get(&node.input[0]).map(|&i| (i, &graph.node[i]));
        if let Some((bn_index, bn)) = batch_norm {
            let fusable = bn.op_type == "BatchNormalization"
                && readers.get(&bn.output[0]) == Some(&1)
                && !outputs.contains(&&bn.output[0]);
            let params: Option<Vec<Vec<f32>>> = bn.input[1..].iter().map(|n| values(n)).collect();
            if let (true, Some(params)) = (fusable, params) {
                let epsilon = bn
                    .attribute
                    .iter()
                    .find(|a| a.name == "epsilon")
                    .map(|a| a.f)
                    .unwrap_or(1e-5);
                let [gamma, beta, mean, var] = [&params[0], &params[1], &params[2], &params[3]];
                if gamma.len() == channels {
                    for c in 0..channels {
                        scale[c] = gamma[c] / (var[c] + epsilon).sqrt();
                        bias[c] = beta[c] - mean[c] * scale[c];
                    }
                    input = bn.input[0].clone();
                    removed[bn_index] = true;
                }
            }
        }
        let fused = pb::NodeProto {
            name: format!("{}.affine_prelu", node.output[0]),
            op_type: OP_TYPE.to_owned(),
            input: vec![
                input,
                format!("{}.fused_scale", node.output[0]),
                format!("{}.fused_bias", node.output[0]),
                format!("{}.fused_slope", node.output[0]),
            ],
            output: node.output.clone(),
            ..Default::default()
        };
        replacements.push((index, fused, [scale, bias, slope]));
    }
    let prelus = replacements.len();
    let batch_norms = removed.iter().filter(|&&r| r).count();
    for (index, fused, [scale, bias, slope]) in replacements {
        graph
            .initializer
            .push(f32_initializer(&fused.input[1], &scale));
        graph
            .initializer
            .push(f32_initializer(&fused.input[2], &bias));
        graph
            .initializer
            .push(f32_initializer(&fused.input[3], &slope));
        graph.node[index] = fused;
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !removed[index - 1]
    });
    (prelus, batch_norms)
}
