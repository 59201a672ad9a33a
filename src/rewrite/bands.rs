//! Additions, concatenations, reshapes and average pooling that split rows among tract's
//! threads as the convolutions do, replacing tract's own operators in an optimised plan.
//!
//! ESPNet adds and concatenates the branches of every ESP block. tract 0.23 runs each
//! `Concat` on the plan's thread, and its `Add` splits the flat tensor in its own way. On
//! two threads, each convolution leaves half of the rows of every channel in the cache of
//! the core that computed them. An operator that reads the whole tensor on one thread
//! then fetches half of it from the other core. Measured on the 2-core development machine,
//! such a read runs at about 40% of the speed of a read from the core's own cache, and the
//! additions and concatenations took twice as long on two threads as on one.
//! [`BandAdd`] and [`BandConcat`] read and write the same bands of rows that
//! [`super::for_each_band`] gives the convolutions, so each thread mostly stays in its own
//! core's cache.
//!
//! [`ConcatPRelu`] then runs the whole tail of an ESP block in one pass, [`BandReshape`]
//! relabels block outputs for the next 1x1 convolution without copying them, and
//! [`BandAvgPool`] pools the input image for the blocks that read it again.
//!
//! Unlike the other rewrites, these replace operators of the optimised tract plan, where
//! the shapes are known, rather than nodes of the ONNX graph. They keep every addition in
//! its place and at most swap its two operands, which changes no rounding. The plan's
//! values therefore stay the same to the bit, which `tests/rewrites.rs` checks on the
//! real model.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{DimLike, EvalContext, EvalOp, Op, StaticName, TypedOp};
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::OptBinUnicast;
use tract_onnx::tract_core::ops::change_axes::IntoShape;
use tract_onnx::tract_core::ops::cnn::{OptSumPool, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::prelu::AffinePRelu;

/// `a + b` for two f32 tensors of the same shape `[1, C, H, W]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandAdd;

/// The f32 tensors `[1, C_k, H, W]` concatenated along the channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandConcat;

/// Returns the shape of an f32 tensor `[1, C, H, W]` with known sizes, or `None`.
fn nchw(fact: &TypedFact) -> Option<[usize; 3]> {
    if fact.datum_type != f32::datum_type() || fact.shape.rank() != 4 {
        return None;
    }
    let dims: Vec<usize> = fact
        .shape
        .iter()
        .map(|d| d.to_usize().ok())
        .collect::<Option<_>>()?;
    (dims[0] == 1).then_some([dims[1], dims[2], dims[3]])
}

/// A reshape of an f32 `[1, C, H, W]` tensor, such as the `[1, C, H * W]` that tract's
/// matrix multiplication reads for a 1x1 convolution. Like tract's `IntoShape` it only
/// relabels the tensor when the plan holds the only reference to it. When another node
/// still reads it, as the residual input of the next block does, tract copied it on the
/// plan's thread. This operator copies it in bands of rows, as its producer wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandReshape {
    dims: TVec<usize>,
}

/// A 2D average pooling of an f32 `[1, C, H, W]` tensor with a square kernel, equal
/// padding on every side and no dilation, as ESPNet's input reinforcement runs it (3x3,
/// stride 2, padding 1, padding counted). tract ran it on one thread through its generic
/// pooling at about 0.6 ms a frame. Each value sums the window's taps inside the image in
/// row-major order, starting from the same zero, and multiplies the sum by the reciprocal
/// of the divisor, as tract does, so the values are the same to the bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandAvgPool {
    kernel: usize,
    stride: usize,
    pad: usize,
    /// Whether the divisor counts the padding (the whole window) or only the taps inside.
    count_include_pad: bool,
}

/// Output columns that [`BandAvgPool`] sums side by side.
const LANES: usize = 16;

impl BandAvgPool {
    /// Returns the output size along an axis of `size` input values.
    fn output_size(&self, size: usize) -> usize {
        (size + 2 * self.pad).saturating_sub(self.kernel) / self.stride + 1
    }

    /// Pools `input`, `channels x height x width`, into `output`.
    pub fn run(
        &self,
        input: &[f32],
        channels: usize,
        height: usize,
        width: usize,
        output: &mut [f32],
    ) {
        let (out_height, out_width) = (self.output_size(height), self.output_size(width));
        assert_eq!(
            input.len(),
            channels * height * width,
            "avgpool input length"
        );
        assert_eq!(
            output.len(),
            channels * out_height * out_width,
            "avgpool output length"
        );

        // The input rows or columns of output index `o` along an axis of `size` values.
        let taps = |o: usize, size: usize| {
            let start = (o * self.stride) as isize - self.pad as isize;
            let first = start.max(0) as usize;
            let end = (start + self.kernel as isize).clamp(0, size as isize) as usize;
            first..end.max(first)
        };

        let divisor = |taps: usize| {
            let count = if self.count_include_pad {
                self.kernel * self.kernel
            } else {
                taps
            };
            (count as f32).recip()
        };

        // The value a float sum in std starts from, which tract's sums start from too.
        let zero = std::iter::empty::<f32>().sum::<f32>();
        // Output columns whose window lies inside the image, computed LANES at a time.
        let first_inside = self.pad.div_ceil(self.stride);
        let last_inside = match width + self.pad {
            reach if reach >= self.kernel => (reach - self.kernel) / self.stride + 1,
            _ => 0,
        };
        let inside = first_inside..last_inside.min(out_width).max(first_inside);

        super::for_each_band(output, channels, out_height, out_width, |mut band| {
            for c in 0..channels {
                let plane = &input[c * height * width..][..height * width];
                for y in band.rows() {
                    let [row] = band.planes_row(c, y);
                    let rows = taps(y, height);
                    for (x, value) in row.iter_mut().enumerate() {
                        if inside.contains(&x) {
                            continue;
                        }
                        let columns = taps(x, width);
                        let sum: f32 = rows
                            .clone()
                            .flat_map(|iy| plane[iy * width..][columns.clone()].iter())
                            .copied()
                            .sum();
                        *value = sum * divisor(rows.len() * columns.len());
                    }

                    // The same sums, in the same order, for LANES columns side by side.
                    let scale = divisor(rows.len() * self.kernel);
                    let mut x = inside.start;
                    while x < inside.end {
                        let n = (inside.end - x).min(LANES);
                        let mut sums = [zero; LANES];
                        for iy in rows.clone() {
                            let line = &plane[iy * width..][..width];
                            for kx in 0..self.kernel {
                                let start = x * self.stride + kx - self.pad;
                                let values = line[start..].iter().step_by(self.stride);
                                for (sum, value) in sums[..n].iter_mut().zip(values) {
                                    *sum += *value;
                                }
                            }
                        }
                        for (value, sum) in row[x..x + n].iter_mut().zip(&sums) {
                            *value = sum * scale;
                        }
                        x += n;
                    }
                }
            }
        });
    }

    /// Returns the pooling of a tract `OptSumPool` that this operator computes the same
    /// way, if it is one.
    fn of(op: &OptSumPool) -> Option<Self> {
        let spec = &op.pool_spec;
        let square = |v: &[usize]| (v.len() == 2 && v[0] == v[1]).then_some(v[0]);
        let kernel = square(&spec.kernel_shape)?;
        let stride = square(spec.strides.as_deref().unwrap_or(&[1, 1]))?;
        let dilation = square(spec.dilations.as_deref().unwrap_or(&[1, 1]))?;
        let pad = match &spec.padding {
            PaddingSpec::Explicit(before, after)
            | PaddingSpec::ExplicitOnnxPool(before, after, false) => {
                let pad = square(before)?;
                (square(after)? == pad).then_some(pad)?
            }
            PaddingSpec::Valid => 0,
            _ => return None,
        };
        let usable = op.normalize
            && spec.data_format == DataFormat::NCHW
            && dilation == 1
            && kernel > 0
            && stride > 0
            && pad < kernel;
        usable.then_some(BandAvgPool {
            kernel,
            stride,
            pad,
            count_include_pad: op.count_include_pad,
        })
    }
}

/// Replaces tract's operators on f32 NCHW tensors in an optimised plan by the band
/// operators: each `Add` of two tensors of the same shape by [`BandAdd`], each channel
/// `Concat` of tensors of the same size by [`BandConcat`], and each reshape by
/// [`BandReshape`]. Each average pooling that [`BandAvgPool`] computes alike is replaced
/// too. Returns the number of additions and concatenations replaced.
pub fn replace_band_ops(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut adds, mut concats) = (0, 0);
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let shapes: Vec<Option<[usize; 3]>> = node
            .inputs
            .iter()
            .map(|&outlet| Ok(nchw(model.outlet_fact(outlet)?)))
            .collect::<TractResult<_>>()?;
        let Some(shapes) = shapes.into_iter().collect::<Option<Vec<_>>>() else {
            continue;
        };
        let is_add = node
            .op_as::<OptBinUnicast>()
            .is_some_and(|op| op.binop.name() == "Add")
            && shapes.len() == 2
            && shapes[0] == shapes[1];
        let is_concat = node.op_as::<TypedConcat>().is_some_and(|op| op.axis == 1)
            && !shapes.is_empty()
            && shapes.iter().all(|s| s[1..] == shapes[0][1..]);
        let pool = node
            .op_as::<OptSumPool>()
            .filter(|_| shapes.len() == 1)
            .and_then(BandAvgPool::of);
        if let Some(pool) = pool {
            model.node_mut(id).op = Box::new(pool);
            continue;
        }
        let reshape = node
            .op_as::<IntoShape>()
            .filter(|op| shapes.len() == 1 && op.dims.iter().product::<usize>() == op.len)
            .map(|op| BandReshape {
                dims: op.dims.clone(),
            });
        if let Some(reshape) = reshape {
            model.node_mut(id).op = Box::new(reshape);
        } else if is_add {
            model.node_mut(id).op = Box::new(BandAdd);
            adds += 1;
        } else if is_concat {
            model.node_mut(id).op = Box::new(BandConcat);
            concats += 1;
        }
    }
    Ok((adds, concats))
}

/// The tail of an ESP block in one pass: a channel concatenation whose parts are sums of
/// inputs, plus an optional residual input, then the per-channel affine map and PRelu.
///
/// In ESPNet the parts are the hierarchical sums of the dilated branches (`d1`, `d2`,
/// `d2 + d4`, `d2 + d4 + d8`, ...), so tract's plan ran three additions, a concatenation,
/// the residual addition and the PRelu, six passes, where this runs one. Each part's
/// terms are added left to right, as the additions it replaces did, the residual is
/// added last and the PRelu is [`AffinePRelu`]'s, so the values are the same to the bit.
#[derive(Debug, Clone)]
pub struct ConcatPRelu {
    /// The output's channel groups in order: the inputs summed for each.
    parts: Vec<Vec<usize>>,
    /// Input added to the concatenation before the PRelu.
    residual: Option<usize>,
    prelu: AffinePRelu,
    /// Height and width of the output, which inputs with merged rows do not show.
    size: (usize, usize),
}

/// Values of one channel that [`ConcatPRelu`] sums, adds and maps before the next.
const CHUNK: usize = 256;

/// Adds `values` into `sum`.
fn add(sum: &mut [f32], values: &[f32]) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s += *v;
    }
}

impl PartialEq for ConcatPRelu {
    fn eq(&self, other: &Self) -> bool {
        self.parts == other.parts
            && self.residual == other.residual
            && self.prelu == other.prelu
            && self.size == other.size
    }
}

impl Eq for ConcatPRelu {}

impl ConcatPRelu {
    /// Computes the output, `channels x height x width`, from `inputs`, each with its
    /// channel count. Every input of a part has that part's channels; the residual has
    /// all of them.
    pub fn run(&self, inputs: &[(&[f32], usize)], height: usize, width: usize, output: &mut [f32]) {
        let channels: usize = self.parts.iter().map(|part| inputs[part[0]].1).sum();
        let plane = height * width;
        assert_eq!(output.len(), channels * plane, "concat prelu output length");
        assert!(
            inputs.iter().all(|(data, c)| data.len() == c * plane),
            "concat prelu input lengths"
        );
        super::for_each_band(output, channels, height, width, |mut band| {
            let rows = band.rows();
            let part_of = |input: usize, c: usize| {
                let start = c * plane + rows.start * width;
                &inputs[input].0[start..start + rows.len() * width]
            };
            let mut first = 0;
            for part in &self.parts {
                for c in 0..inputs[part[0]].1 {
                    let target = band.plane(first + c);
                    let residual = self.residual.map(|r| part_of(r, first + c));
                    // Every pass over a chunk of this size stays in the first-level cache.
                    // Summing the parts that extend the part before with one running sum
                    // read less but was slower, because it interleaved the stores to four
                    // planes.
                    for (index, chunk) in target.chunks_mut(CHUNK).enumerate() {
                        let at = index * CHUNK..index * CHUNK + chunk.len();
                        chunk.copy_from_slice(&part_of(part[0], c)[at.clone()]);
                        for &term in &part[1..] {
                            add(chunk, &part_of(term, c)[at.clone()]);
                        }
                        // tract added the concatenation to the residual. Addition commutes
                        // exactly, so the order of the operands does not matter.
                        if let Some(residual) = residual {
                            add(chunk, &residual[at.clone()]);
                        }
                        self.prelu.apply_channel(first + c, chunk);
                    }
                }
                first += inputs[part[0]].1;
            }
        });
    }
}

/// Replaces each [`AffinePRelu`] that alone reads a [`BandConcat`], or a [`BandAdd`] of a
/// concatenation and another tensor, by one [`ConcatPRelu`] that also takes in the
/// additions that only feed the concatenation. Returns the number of replacements.
pub fn fuse_concat_prelu(model: &mut TypedModel) -> TractResult<usize> {
    let mut count = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(prelu) = node.op_as::<AffinePRelu>() else {
            continue;
        };
        let Some((inputs, parts, residual)) = match_concat(model, node.inputs[0], id) else {
            continue;
        };
        let Some([channels, height, width]) = nchw(model.outlet_fact(node.inputs[0])?) else {
            continue;
        };
        if prelu.channels() != channels {
            continue;
        }
        let op = ConcatPRelu {
            parts,
            residual,
            prelu: prelu.clone(),
            size: (height, width),
        };
        TypedModelPatch::replace_single_op(model, node, &inputs, op)?.apply(model)?;
        count += 1;
    }
    model.compact()?;
    Ok(count)
}

/// Lets each [`ConcatPRelu`] that reads a tensor which a [`BandReshape`] also reads take
/// the reshaped tensor instead, the same values with their rows merged, and makes a plan
/// output of the tensor an output of the reshape. The reshape is then the tensor's only
/// reader and relabels it in place instead of copying it. In ESPNet that is the output of
/// each ESP block, read by the next block's 1x1 convolution (through the reshape), as its
/// residual, and tapped. The tapped values and their order in memory stay the same, but
/// such a plan output gets the shape `[1, C, H * W]`. Callers must therefore read the
/// output shapes before this rewrite. Returns the number of inputs and outputs moved.
pub fn share_reshaped_inputs(model: &mut TypedModel) -> TractResult<usize> {
    let mut moved = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(reshape) = node.op_as::<BandReshape>() else {
            continue;
        };
        let source = node.inputs[0];
        let Some([channels, height, width]) = nchw(model.outlet_fact(source)?) else {
            continue;
        };
        if *reshape.dims != [1, channels, height * width] {
            continue;
        }
        let others: Vec<InletId> = model.node(source.node).outputs[source.slot]
            .successors
            .iter()
            .copied()
            .filter(|inlet| inlet.node != id)
            .collect();
        let all_fused = others
            .iter()
            .all(|inlet| model.node(inlet.node).op_as::<ConcatPRelu>().is_some());
        if !all_fused {
            continue;
        }
        let reshaped = OutletId::new(id, 0);
        for inlet in others {
            model.add_edge(reshaped, inlet)?;
            moved += 1;
        }
        for output in model.outputs.iter_mut().filter(|o| **o == source) {
            *output = reshaped;
            moved += 1;
        }
        if let Some(label) = model.outlet_labels.remove(&source) {
            model.set_outlet_label(reshaped, label)?;
        }
    }
    model.compact()?;
    Ok(moved)
}

/// The inputs, parts and residual of a [`ConcatPRelu`] that replaces the PRelu `reader`
/// of `value`, if the pattern matches.
type Matched = (Vec<OutletId>, Vec<Vec<usize>>, Option<usize>);

fn match_concat(model: &TypedModel, value: OutletId, reader: usize) -> Option<Matched> {
    // `outlet` is read by `node` alone and is no output of the plan.
    let only_for = |outlet: OutletId, node: usize| {
        let successors = &model.node(outlet.node).outputs[outlet.slot].successors;
        successors.len() == 1 && successors[0].node == node && !model.outputs.contains(&outlet)
    };
    let is_add = |outlet: OutletId| model.node(outlet.node).op_as::<BandAdd>().is_some();
    let is_concat = |outlet: OutletId| model.node(outlet.node).op_as::<BandConcat>().is_some();

    let (concat, residual) = if is_add(value) && only_for(value, reader) {
        let add = model.node(value.node);
        let (a, b) = (add.inputs[0], add.inputs[1]);
        if is_concat(a) && only_for(a, add.id) {
            (a, Some(b))
        } else if is_concat(b) && only_for(b, add.id) {
            (b, Some(a))
        } else {
            return None;
        }
    } else if is_concat(value) && only_for(value, reader) {
        (value, None)
    } else {
        return None;
    };

    // Each part as the terms of a left-to-right sum, taking in the additions whose every
    // reader is taken in too.
    let mut absorbed = std::collections::HashSet::new();
    let mut terms_of = |outlet: OutletId| {
        let mut terms = Vec::new();
        let mut current = outlet;
        while is_add(current) && !model.outputs.contains(&current) {
            let add = model.node(current.node);
            let (a, b) = (add.inputs[0], add.inputs[1]);
            // Addition commutes, so the chain may continue through either operand.
            let (left, right) = if is_add(b) && !is_add(a) {
                (b, a)
            } else {
                (a, b)
            };
            absorbed.insert(current.node);
            terms.push(right);
            current = left;
        }
        terms.push(current);
        terms.reverse();
        terms
    };

    let concat_node = model.node(concat.node);
    let part_terms: Vec<Vec<OutletId>> = concat_node.inputs.iter().map(|&o| terms_of(o)).collect();
    let contained = absorbed.iter().all(|&add| {
        model.node(add).outputs[0]
            .successors
            .iter()
            .all(|s| s.node == concat.node || absorbed.contains(&s.node))
    });
    if !contained {
        return None;
    }

    let mut inputs: Vec<OutletId> = Vec::new();
    let mut index = |outlet: OutletId| match inputs.iter().position(|&o| o == outlet) {
        Some(ix) => ix,
        None => {
            inputs.push(outlet);
            inputs.len() - 1
        }
    };
    let parts = part_terms
        .iter()
        .map(|terms| terms.iter().map(|&t| index(t)).collect())
        .collect();
    let residual = residual.map(&mut index);
    Some((inputs, parts, residual))
}

/// Returns the shape of an f32 tensor `[1, C, H, W]` as `[C, H, W]`.
fn nchw_shape(op_name: &str, tensor: &Tensor) -> TractResult<[usize; 3]> {
    let shape = tensor.shape();
    anyhow::ensure!(
        tensor.datum_type() == f32::datum_type() && shape.len() == 4 && shape[0] == 1,
        "{op_name} input has type {:?} and shape {shape:?}, expected f32 [1, C, H, W]",
        tensor.datum_type()
    );
    Ok([shape[1], shape[2], shape[3]])
}

impl BandAdd {
    /// Writes `a + b` into `output`, all three `channels x height x width`. `a` is `None`
    /// when it is `output` itself.
    pub fn run(
        output: &mut [f32],
        a: Option<&[f32]>,
        b: &[f32],
        channels: usize,
        height: usize,
        width: usize,
    ) {
        assert_eq!(output.len(), b.len(), "band add lengths");
        assert!(a.is_none_or(|a| a.len() == b.len()), "band add lengths");
        let plane = height * width;
        super::for_each_band(output, channels, height, width, |mut band| {
            let rows = band.rows();
            let part = |data: &'_ [f32], c: usize| -> std::ops::Range<usize> {
                let start = c * plane + rows.start * width;
                debug_assert!(start + rows.len() * width <= data.len());
                start..start + rows.len() * width
            };
            for c in 0..channels {
                let b = &b[part(b, c)];
                let target = band.plane(c);
                match a {
                    Some(a) => {
                        for ((t, a), b) in target.iter_mut().zip(&a[part(a, c)]).zip(b) {
                            *t = *a + *b;
                        }
                    }
                    None => {
                        for (t, b) in target.iter_mut().zip(b) {
                            *t += *b;
                        }
                    }
                }
            }
        });
    }
}

impl BandConcat {
    /// Writes `inputs`, each `channels x height x width` with its own channel count, one
    /// after the other into `output`.
    pub fn run(inputs: &[(&[f32], usize)], height: usize, width: usize, output: &mut [f32]) {
        let channels: usize = inputs.iter().map(|(_, c)| c).sum();
        let plane = height * width;
        assert!(
            inputs.iter().all(|(data, c)| data.len() == c * plane),
            "band concat input lengths"
        );
        super::for_each_band(output, channels, height, width, |mut band| {
            let rows = band.rows();
            let mut first = 0;
            for (data, count) in inputs {
                for c in 0..*count {
                    let source = &data[c * plane + rows.start * width..][..rows.len() * width];
                    band.plane(first + c).copy_from_slice(source);
                }
                first += count;
            }
        });
    }
}

impl Op for BandAdd {
    fn name(&self) -> StaticName {
        "BandAdd".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for BandAdd {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        anyhow::ensure!(
            inputs.len() == 2,
            "BandAdd has {} inputs, expected 2",
            inputs.len()
        );
        let mut inputs = inputs.into_iter();
        let (a, b) = (inputs.next().unwrap(), inputs.next().unwrap());
        let [channels, height, width] = nchw_shape("BandAdd", &a)?;
        anyhow::ensure!(
            a.shape() == b.shape(),
            "BandAdd inputs have shapes {:?} and {:?}, expected the same",
            a.shape(),
            b.shape()
        );

        let shape = [1, channels, height, width];
        // In place when the plan holds the only reference to one of the inputs, because
        // addition commutes, and into a new tensor otherwise. Either way it is one pass.
        let (a, b) = (a.into_arc_tensor(), b.into_arc_tensor());
        let (mut output, a, b) = match Arc::try_unwrap(a) {
            Ok(a) => (a, None, b),
            Err(a) => match Arc::try_unwrap(b) {
                Ok(b) => (b, None, a),
                Err(b) => {
                    // SAFETY: `run` below writes every value of the output.
                    let output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
                    (output, Some(a), b)
                }
            },
        };

        {
            let mut target = output.try_as_plain_ram_mut()?;
            let a_view = a.as_ref().map(|a| a.try_as_plain_ram()).transpose()?;
            let a_slice = a_view.as_ref().map(|v| v.as_slice::<f32>()).transpose()?;
            let source = b.try_as_plain_ram()?;
            BandAdd::run(
                target.as_slice_mut::<f32>()?,
                a_slice,
                source.as_slice::<f32>()?,
                channels,
                height,
                width,
            );
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BandAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    tract_onnx::tract_core::as_op!();
}

impl Op for ConcatPRelu {
    fn name(&self) -> StaticName {
        "ConcatPRelu".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for ConcatPRelu {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (height, width) = self.size;
        let shapes = inputs
            .iter()
            .map(|input| {
                let shape = input.shape();
                let merged = shape.len() == 3 && shape[0] == 1 && shape[2] == height * width;
                if merged && input.datum_type() == f32::datum_type() {
                    Ok([shape[1], height, width])
                } else {
                    nchw_shape("ConcatPRelu", input)
                }
            })
            .collect::<TractResult<TVec<_>>>()?;
        anyhow::ensure!(
            shapes.iter().all(|s| s[1..] == [height, width]),
            "ConcatPRelu inputs have shapes {shapes:?}, expected one size"
        );

        let channels = self.prelu.channels();
        for part in &self.parts {
            let c = shapes[part[0]][0];
            anyhow::ensure!(
                part.iter().all(|&i| shapes[i][0] == c),
                "ConcatPRelu part {part:?} sums inputs of shapes {shapes:?}"
            );
        }
        let total: usize = self.parts.iter().map(|part| shapes[part[0]][0]).sum();
        anyhow::ensure!(
            total == channels && self.residual.is_none_or(|r| shapes[r][0] == channels),
            "ConcatPRelu inputs have shapes {shapes:?}, expected {channels} channels"
        );

        let views = inputs
            .iter()
            .map(|input| input.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let slices = views
            .iter()
            .zip(&shapes)
            .map(|(view, shape)| Ok((view.as_slice::<f32>()?, shape[0])))
            .collect::<TractResult<TVec<_>>>()?;
        // SAFETY: `run` writes every value of the output, one channel of a part each.
        let output = unsafe {
            super::new_f32_tensor(&[1, channels, height, width], |target| {
                self.run(&slices, height, width, target);
                Ok(())
            })?
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for ConcatPRelu {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (height, width) = self.size;
        let dims = [1, self.prelu.channels(), height, width];
        Ok(tvec!(inputs[0].datum_type.fact(dims)))
    }

    tract_onnx::tract_core::as_op!();
}

impl Op for BandReshape {
    fn name(&self) -> StaticName {
        "BandReshape".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for BandReshape {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        anyhow::ensure!(
            inputs.len() == 1,
            "BandReshape has {} inputs, expected 1",
            inputs.len()
        );
        let input = inputs.into_iter().next().unwrap().into_arc_tensor();
        let [channels, height, width] = nchw_shape("BandReshape", &input)?;
        anyhow::ensure!(
            input.len() == self.dims.iter().product::<usize>(),
            "BandReshape input has shape {:?}, which does not fit {:?}",
            input.shape(),
            self.dims
        );
        let output = match Arc::try_unwrap(input) {
            Ok(tensor) => tensor.into_shape(&self.dims)?,
            Err(shared) => {
                let source = shared.try_as_plain_ram()?;
                let source = [(source.as_slice::<f32>()?, channels)];
                // SAFETY: `run` writes every value of the output.
                unsafe {
                    super::new_f32_tensor(&self.dims, |target| {
                        BandConcat::run(&source, height, width, target);
                        Ok(())
                    })?
                }
            }
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BandReshape {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(&*self.dims)))
    }

    tract_onnx::tract_core::as_op!();
}

impl Op for BandAvgPool {
    fn name(&self) -> StaticName {
        "BandAvgPool".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for BandAvgPool {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        anyhow::ensure!(
            inputs.len() == 1,
            "BandAvgPool has {} inputs, expected 1",
            inputs.len()
        );
        let [channels, height, width] = nchw_shape("BandAvgPool", &inputs[0])?;
        anyhow::ensure!(
            height.min(width) + 2 * self.pad >= self.kernel,
            "BandAvgPool input {height}x{width} with padding {} is smaller than the kernel {}",
            self.pad,
            self.kernel
        );
        let shape = [
            1,
            channels,
            self.output_size(height),
            self.output_size(width),
        ];
        let source = inputs[0].try_as_plain_ram()?;
        let source = source.as_slice::<f32>()?;
        // SAFETY: `run` writes every value of the output.
        let output = unsafe {
            super::new_f32_tensor(&shape, |target| {
                self.run(source, channels, height, width, target);
                Ok(())
            })?
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BandAvgPool {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = &inputs[0].shape;
        anyhow::ensure!(
            shape.rank() == 4,
            "BandAvgPool input has shape {shape:?}, expected [1, C, H, W]"
        );
        let (height, width) = (shape[2].to_usize()?, shape[3].to_usize()?);
        let dims = [
            shape[0].to_usize()?,
            shape[1].to_usize()?,
            self.output_size(height),
            self.output_size(width),
        ];
        Ok(tvec!(inputs[0].datum_type.fact(dims)))
    }

    tract_onnx::tract_core::as_op!();
}

impl Op for BandConcat {
    fn name(&self) -> StaticName {
        "BandConcat".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for BandConcat {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        anyhow::ensure!(!inputs.is_empty(), "BandConcat has no input");
        let mut channels = 0;
        let [_, height, width] = nchw_shape("BandConcat", &inputs[0])?;
        for input in &inputs {
            let [c, h, w] = nchw_shape("BandConcat", input)?;
            anyhow::ensure!(
                (h, w) == (height, width),
                "BandConcat input has size {h}x{w}, expected {height}x{width} as the first"
            );
            channels += c;
        }
        let views = inputs
            .iter()
            .map(|input| input.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let slices = views
            .iter()
            .zip(&inputs)
            .map(|(view, input)| Ok((view.as_slice::<f32>()?, input.shape()[1])))
            .collect::<TractResult<TVec<_>>>()?;
        // SAFETY: `run` writes every value of the output, one input channel each.
        let output = unsafe {
            super::new_f32_tensor(&[1, channels, height, width], |target| {
                BandConcat::run(&slices, height, width, target);
                Ok(())
            })?
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BandConcat {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape[1] = inputs.iter().map(|fact| fact.shape[1].clone()).sum();
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    tract_onnx::tract_core::as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `f` as a plan on `threads` threads would: on the pool, with tract's executor.
    fn on_threads(threads: usize, f: impl FnOnce() + Send) {
        use tract_onnx::tract_core::tract_linalg::multithread::{
            multithread_tract_scope, Executor,
        };
        let pool = std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        );
        let executor = Executor::MultiThread(pool.clone());
        pool.install(|| multithread_tract_scope(executor, f));
    }

    #[test]
    fn bands_on_several_threads_cover_every_row_once() {
        for threads in [2, 3, 5] {
            for (channels, height, width) in [(1, 1, 3), (2, 2, 1), (3, 7, 5), (4, 16, 8)] {
                let len = channels * height * width;
                let a: Vec<f32> = (0..len).map(|i| i as f32).collect();
                let b: Vec<f32> = (0..len).map(|i| (i * 3) as f32).collect();
                let mut sum = vec![f32::NAN; len];
                let mut stacked = vec![f32::NAN; 2 * len];
                on_threads(threads, || {
                    BandAdd::run(&mut sum, Some(&a), &b, channels, height, width);
                    let inputs = [(a.as_slice(), channels), (b.as_slice(), channels)];
                    BandConcat::run(&inputs, height, width, &mut stacked);
                });
                let expected: Vec<f32> = (0..len).map(|i| (i * 4) as f32).collect();
                assert_eq!(
                    sum, expected,
                    "{threads} threads, {channels}x{height}x{width}"
                );
                assert_eq!(stacked, [a.clone(), b].concat(), "{threads} threads");
            }
        }
    }

    /// The convolutions split output rows, and the quantising or padding copy input rows,
    /// among the threads; every split must give the values of one thread.
    #[test]
    fn convolutions_on_several_threads_equal_one_thread() {
        use crate::rewrite::conv3x3::{Conv3x3, Geometry};
        use crate::rewrite::deconv::Deconv2x2;
        use crate::rewrite::qconv3x3::{Input, InputQuantization, QConv3x3};

        let (inputs, outputs) = (6, 5);
        let value = |i: usize| ((i * 7919) % 113) as f32 / 113.0 - 0.4;
        let weight: Vec<f32> = (0..outputs * inputs * 9).map(value).collect();
        let weight_i8: Vec<i8> = (0..outputs * inputs * 9)
            .map(|i| ((i * 37) % 255) as i8)
            .collect();
        let deconv_weight: Vec<f32> = (0..inputs * outputs * 4).map(value).collect();
        let bias: Vec<f32> = (0..outputs).map(value).collect();
        let scale = vec![0.01; outputs];
        let quantization = Some(InputQuantization { scale: 0.02 });
        let conv =
            Conv3x3::from_onnx_weight(&weight, Some(&bias), inputs, outputs, Geometry::Dilated(2))
                .unwrap();
        let strided =
            Conv3x3::from_onnx_weight(&weight, None, inputs, outputs, Geometry::Strided).unwrap();
        let qconv = QConv3x3::new(
            &weight_i8,
            inputs,
            outputs,
            3,
            -5,
            quantization,
            scale,
            bias,
        )
        .unwrap();
        let deconv = Deconv2x2::from_onnx_weight(&deconv_weight, inputs, outputs).unwrap();
        for (height, width) in [(1, 1), (3, 5), (7, 9), (11, 20)] {
            let input: Vec<f32> = (0..inputs * height * width).map(value).collect();
            let run_all = || {
                let plane = height * width;
                let (h2, w2) = (height.div_ceil(2), width.div_ceil(2));
                let mut results = vec![
                    vec![0.0; outputs * plane],
                    vec![0.0; outputs * h2 * w2],
                    vec![0.0; outputs * plane],
                    vec![0.0; outputs * 4 * plane],
                ];
                conv.run(&input, height, width, &mut results[0]);
                strided.run(&input, height, width, &mut results[1]);
                qconv.run(Input::F32(&input), height, width, &mut results[2]);
                deconv.run(&input, height, width, &mut results[3]);
                results
            };
            let expected = run_all();
            for threads in [2, 3] {
                let mut actual = Vec::new();
                on_threads(threads, || actual = run_all());
                assert_eq!(actual, expected, "{threads} threads, {height}x{width}");
            }
        }
    }

    proptest! {
        #[test]
        fn avgpool_matches_the_definition(
            (channels, height, width, input) in (1usize..4, 1usize..12, 1usize..40)
                .prop_flat_map(|(c, h, w)| {
                    (Just(c), Just(h), Just(w), prop::collection::vec(-1e3f32..1e3, c * h * w))
                }),
            (kernel, stride, pad) in (1usize..4, 1usize..3, 0usize..3)
                .prop_filter("padding inside the kernel", |(k, _, p)| p < k),
            count_include_pad in any::<bool>(),
        ) {
            prop_assume!(height.min(width) + 2 * pad >= kernel);
            let pool = BandAvgPool { kernel, stride, pad, count_include_pad };
            let (oh, ow) = (pool.output_size(height), pool.output_size(width));
            let mut output = vec![f32::NAN; channels * oh * ow];
            on_threads(2, || pool.run(&input, channels, height, width, &mut output));
            for c in 0..channels {
                for y in 0..oh {
                    for x in 0..ow {
                        // Row-major over the taps inside the image, as tract sums them.
                        let mut taps = Vec::new();
                        for ky in 0..kernel {
                            for kx in 0..kernel {
                                let iy = (y * stride + ky) as isize - pad as isize;
                                let ix = (x * stride + kx) as isize - pad as isize;
                                let inside = (0..height as isize).contains(&iy)
                                    && (0..width as isize).contains(&ix);
                                if inside {
                                    taps.push(input[(c * height + iy as usize) * width + ix as usize]);
                                }
                            }
                        }
                        let count = if count_include_pad { kernel * kernel } else { taps.len() };
                        let expected = taps.iter().sum::<f32>() * (count as f32).recip();
                        let actual = output[(c * oh + y) * ow + x];
                        prop_assert_eq!(actual.to_bits(), expected.to_bits(), "{} {} {}", c, y, x);
                    }
                }
            }
        }

        #[test]
        fn band_add_adds(
            (channels, height, width, a, b) in (1usize..6, 1usize..9, 1usize..9)
                .prop_flat_map(|(c, h, w)| {
                    let values = prop::collection::vec(-1e3f32..1e3, c * h * w);
                    (Just(c), Just(h), Just(w), values.clone(), values)
                })
        ) {
            let mut in_place = a.clone();
            BandAdd::run(&mut in_place, None, &b, channels, height, width);
            let mut fresh = vec![f32::NAN; a.len()];
            BandAdd::run(&mut fresh, Some(&a), &b, channels, height, width);
            for (((s, f), a), b) in in_place.iter().zip(&fresh).zip(&a).zip(&b) {
                prop_assert_eq!(s.to_bits(), (a + b).to_bits());
                prop_assert_eq!(f.to_bits(), (a + b).to_bits());
            }
        }

        #[test]
        fn band_concat_stacks_channels(
            (counts, height, width) in (prop::collection::vec(1usize..4, 1..5), 1usize..7, 1usize..7)
        ) {
            let plane = height * width;
            let inputs: Vec<Vec<f32>> = counts
                .iter()
                .enumerate()
                .map(|(k, &c)| (0..c * plane).map(|i| (k * 1000 + i) as f32).collect())
                .collect();
            let slices: Vec<(&[f32], usize)> =
                inputs.iter().zip(&counts).map(|(v, &c)| (v.as_slice(), c)).collect();
            let mut output = vec![f32::NAN; counts.iter().sum::<usize>() * plane];
            BandConcat::run(&slices, height, width, &mut output);
            let expected: Vec<f32> = inputs.concat();
            prop_assert_eq!(output, expected);
        }
    }
}
