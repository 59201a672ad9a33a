//! A 2x2, stride-2 transposed convolution for tract, and the ONNX rewrite that uses it.
//!
//! ESPNet's decoder upsamples three times with `ConvTranspose` (kernel 2, stride 2, no
//! padding, no bias). tract 0.23 runs each as a matrix multiplication into a scratch
//! tensor of every (channel, ky, kx) product. `DeconvSum` then scatters and sums that
//! tensor into the output. The two passes over memory took about a tenth of an f32 frame. With kernel equal to stride the output windows do not overlap, so every output
//! value is one dot product over the input channels:
//!
//! `out[o, 2y + ky, 2x + kx] = sum_i w[i, o, ky, kx] * in[i, y, x]`
//!
//! [`Deconv2x2`] computes that in one pass: for 16 pixels of an input row it loads each
//! input channel once, adds it into the four (ky, kx) sums of an output channel, and
//! writes the two output rows interleaved. The rewrite replaces every `ConvTranspose` of that form whose
//! weight is an f32 initializer by a node of type [`OP_TYPE`] with the same output name.
//! The kernels use AVX-512F, AVX with FMA, or NEON where the CPU has them, and portable
//! code otherwise.
//!
//! A rewrite to a 1x1 convolution followed by `DepthToSpace` was measured first and was
//! slower: tract lowers `DepthToSpace` to a six-axis transpose that cost more than
//! `DeconvSum`.

use anyhow::ensure;

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{EvalContext, EvalOp, Op, StaticName, TypedOp};
use tract_onnx::tract_hir::internal::{
    check_input_arity, check_output_arity, expand, Expansion, InferenceOp, InferenceResult, Solver,
    TensorProxy,
};

use super::{f32_initializers, int, ints, Simd};

/// ONNX operator type of the rewritten node. Only this runtime's tract parser registers it.
pub const OP_TYPE: &str = "DaainDeconv2x2";

/// Output pixels per row the vector kernels compute together: two vectors of eight lanes
/// on AVX, four of four on NEON.
const BLOCK: usize = 16;

/// Weights of a 2x2 stride-2 transposed convolution, rearranged for the kernels:
/// `taps[((o * 2 + ky) * 2 + kx) * inputs + i] = w[i, o, ky, kx]`.
#[derive(Debug, Clone)]
pub struct Deconv2x2 {
    inputs: usize,
    outputs: usize,
    taps: Vec<f32>,
}

/// Bitwise equality, which tract needs to compare operators (`Eq`, so NaN equals itself).
impl PartialEq for Deconv2x2 {
    fn eq(&self, other: &Self) -> bool {
        self.inputs == other.inputs
            && self.outputs == other.outputs
            && super::same_bits(&self.taps, &other.taps)
    }
}

impl Eq for Deconv2x2 {}

impl Deconv2x2 {
    /// Builds the operator from an ONNX `ConvTranspose` weight, laid out
    /// `[inputs, outputs, 2, 2]`.
    pub fn from_onnx_weight(weight: &[f32], inputs: usize, outputs: usize) -> anyhow::Result<Self> {
        ensure!(
            weight.len() == inputs * outputs * 4,
            "transposed convolution weight has {} values, expected {inputs} x {outputs} x 2 x 2",
            weight.len()
        );
        ensure!(
            inputs > 0 && outputs > 0,
            "transposed convolution has {inputs} input and {outputs} output channels, expected \
             at least 1"
        );
        let mut taps = vec![0.0; weight.len()];
        for i in 0..inputs {
            for o in 0..outputs {
                for k in 0..4 {
                    taps[(o * 4 + k) * inputs + i] = weight[(i * outputs + o) * 4 + k];
                }
            }
        }
        Ok(Deconv2x2 {
            inputs,
            outputs,
            taps,
        })
    }

    /// Computes the output, `outputs x 2H x 2W`, of `input`, `inputs x H x W`, with the
    /// vector kernel of this CPU where there is one.
    pub fn run(&self, input: &[f32], height: usize, width: usize, output: &mut [f32]) {
        self.run_rows(input, height, width, output, vector_rows());
    }

    fn run_rows(
        &self,
        input: &[f32],
        height: usize,
        width: usize,
        output: &mut [f32],
        vector: Option<RowsFn>,
    ) {
        let plane = height * width;
        assert_eq!(input.len(), self.inputs * plane, "deconv input length");
        assert_eq!(
            output.len(),
            self.outputs * 4 * plane,
            "deconv output length"
        );
        let out_width = 2 * width;
        // Input row y of every channel stays in cache while the output channels use it,
        // so rows are the outer loop. Bands of input rows, each the two output rows it
        // makes, go to tract's threads.
        super::for_each_band(output, self.outputs, height, 2 * out_width, |mut band| {
            for y in band.rows() {
                let row = Row {
                    input,
                    plane,
                    offset: y * width,
                    width,
                };
                for o in 0..self.outputs {
                    let taps = &self.taps[o * 4 * self.inputs..(o + 1) * 4 * self.inputs];
                    let (w00, rest) = taps.split_at(self.inputs);
                    let (w01, rest) = rest.split_at(self.inputs);
                    let (w10, w11) = rest.split_at(self.inputs);
                    let weights = [w00, w01, w10, w11];
                    let [rows] = band.planes_row(o, y);
                    let (top, bottom) = rows.split_at_mut(out_width);
                    let done = match vector {
                        // SAFETY: `vector_rows` returned the kernel only if the CPU
                        // supports it.
                        Some(kernel) => unsafe { kernel(&weights, &row, top, bottom) },
                        None => 0,
                    };
                    portable_rows(&weights, &row, done, top, bottom);
                }
            }
        });
    }
}

/// One input row `y` of every input channel: `input[i * plane + offset + x]`.
struct Row<'a> {
    input: &'a [f32],
    plane: usize,
    offset: usize,
    width: usize,
}

/// A vector kernel: fills the two output rows of one input row and one output channel for
/// the first `width / BLOCK * BLOCK` input columns and returns that count. `weights` are
/// the taps (ky, kx) = (0, 0), (0, 1), (1, 0), (1, 1), one value per input channel.
type RowsFn = unsafe fn(&[&[f32]; 4], &Row, &mut [f32], &mut [f32]) -> usize;

/// Returns the vector kernel for `simd`, or `None` for the portable code.
fn kernel_for(simd: Simd) -> Option<RowsFn> {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => Some(avx512_rows),
        #[cfg(target_arch = "x86_64")]
        Simd::AvxFma => Some(avx_fma_rows),
        #[cfg(target_arch = "aarch64")]
        Simd::Neon => Some(neon_rows),
        _ => None,
    }
}

/// Returns the vector kernel of the best instruction set this CPU supports, if any.
fn vector_rows() -> Option<RowsFn> {
    kernel_for(Simd::best())
}

/// Computes the output columns of the input columns from `start` on, portably: four sums
/// per pixel in input-channel order, the order the vector kernels keep.
fn portable_rows(
    weights: &[&[f32]; 4],
    row: &Row,
    start: usize,
    top: &mut [f32],
    bottom: &mut [f32],
) {
    for x in start..row.width {
        let mut acc = [0.0f32; 4];
        for (i, channel) in row.input.chunks_exact(row.plane).enumerate() {
            let v = channel[row.offset + x];
            for (acc, w) in acc.iter_mut().zip(weights) {
                *acc += w[i] * v;
            }
        }
        top[2 * x] = acc[0];
        top[2 * x + 1] = acc[1];
        bottom[2 * x] = acc[2];
        bottom[2 * x + 1] = acc[3];
    }
}

/// AVX kernel with fused multiply-add: 16 columns as two vectors, eight accumulators.
///
/// # Safety
/// The CPU must support AVX and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn avx_fma_rows(
    weights: &[&[f32]; 4],
    row: &Row,
    top: &mut [f32],
    bottom: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;

    /// Stores `[a0 b0 a1 b1 ... a7 b7]` at `out`.
    #[inline(always)]
    unsafe fn store_interleaved(out: *mut f32, a: __m256, b: __m256) {
        let low = _mm256_unpacklo_ps(a, b);
        let high = _mm256_unpackhi_ps(a, b);
        _mm256_storeu_ps(out, _mm256_permute2f128_ps::<0x20>(low, high));
        _mm256_storeu_ps(out.add(8), _mm256_permute2f128_ps::<0x31>(low, high));
    }

    let inputs = weights[0].len();
    let end = row.width / BLOCK * BLOCK;
    assert!(weights.iter().all(|w| w.len() == inputs));
    assert!(row.input.len() >= (inputs - 1) * row.plane + row.offset + end);
    assert!(top.len() >= 2 * end);
    assert!(bottom.len() >= 2 * end);
    for x in (0..end).step_by(BLOCK) {
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in 0..inputs {
            // In bounds: asserted above for the last channel and column.
            let p = row.input.as_ptr().add(i * row.plane + row.offset + x);
            let (v0, v1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            for k in 0..4 {
                let w = _mm256_set1_ps(*weights[k].get_unchecked(i));
                acc[2 * k] = _mm256_fmadd_ps(w, v0, acc[2 * k]);
                acc[2 * k + 1] = _mm256_fmadd_ps(w, v1, acc[2 * k + 1]);
            }
        }
        for half in 0..2 {
            let column = 2 * (x + 8 * half);
            store_interleaved(top.as_mut_ptr().add(column), acc[half], acc[2 + half]);
            store_interleaved(
                bottom.as_mut_ptr().add(column),
                acc[4 + half],
                acc[6 + half],
            );
        }
    }
    end
}

/// AVX-512 kernel with fused multiply-add: 32 columns as two vectors, eight
/// accumulators. It returns `width / 32 * 32`, leaving a narrower tail to the portable
/// kernel.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_rows(
    weights: &[&[f32]; 4],
    row: &Row,
    top: &mut [f32],
    bottom: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;

    const WIDE: usize = 32;
    // Lane indices into the pair (a, b) for [a0 b0 ... a7 b7] and [a8 b8 ... a15 b15].
    let low_index = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high_index =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let store_interleaved = |out: *mut f32, a: __m512, b: __m512| {
        _mm512_storeu_ps(out, _mm512_permutex2var_ps(a, low_index, b));
        _mm512_storeu_ps(out.add(16), _mm512_permutex2var_ps(a, high_index, b));
    };

    let inputs = weights[0].len();
    let end = row.width / WIDE * WIDE;
    assert!(weights.iter().all(|w| w.len() == inputs));
    assert!(row.input.len() >= (inputs - 1) * row.plane + row.offset + end);
    assert!(top.len() >= 2 * end);
    assert!(bottom.len() >= 2 * end);
    for x in (0..end).step_by(WIDE) {
        let mut acc = [_mm512_setzero_ps(); 8];
        for i in 0..inputs {
            // In bounds: asserted above for the last channel and column.
            let p = row.input.as_ptr().add(i * row.plane + row.offset + x);
            let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            for k in 0..4 {
                let w = _mm512_set1_ps(*weights[k].get_unchecked(i));
                acc[2 * k] = _mm512_fmadd_ps(w, v0, acc[2 * k]);
                acc[2 * k + 1] = _mm512_fmadd_ps(w, v1, acc[2 * k + 1]);
            }
        }
        for half in 0..2 {
            let column = 2 * (x + 16 * half);
            store_interleaved(top.as_mut_ptr().add(column), acc[half], acc[2 + half]);
            store_interleaved(
                bottom.as_mut_ptr().add(column),
                acc[4 + half],
                acc[6 + half],
            );
        }
    }
    end
}

/// NEON kernel with fused multiply-add: 16 columns as four vectors, sixteen accumulators,
/// interleaved stores.
///
/// # Safety
/// The CPU must support NEON.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon_rows(
    weights: &[&[f32]; 4],
    row: &Row,
    top: &mut [f32],
    bottom: &mut [f32],
) -> usize {
    use std::arch::aarch64::*;

    let inputs = weights[0].len();
    let end = row.width / BLOCK * BLOCK;
    assert!(weights.iter().all(|w| w.len() == inputs));
    assert!(row.input.len() >= (inputs - 1) * row.plane + row.offset + end);
    assert!(top.len() >= 2 * end);
    assert!(bottom.len() >= 2 * end);
    for x in (0..end).step_by(BLOCK) {
        let mut acc = [vdupq_n_f32(0.0); 16];
        for i in 0..inputs {
            // In bounds: asserted above for the last channel and column.
            let p = row.input.as_ptr().add(i * row.plane + row.offset + x);
            let v = [
                vld1q_f32(p),
                vld1q_f32(p.add(4)),
                vld1q_f32(p.add(8)),
                vld1q_f32(p.add(12)),
            ];
            for k in 0..4 {
                let w = vdupq_n_f32(*weights[k].get_unchecked(i));
                for q in 0..4 {
                    acc[4 * k + q] = vfmaq_f32(acc[4 * k + q], w, v[q]);
                }
            }
        }
        for q in 0..4 {
            let column = 2 * (x + 4 * q);
            vst2q_f32(
                top.as_mut_ptr().add(column),
                float32x4x2_t(acc[q], acc[4 + q]),
            );
            vst2q_f32(
                bottom.as_mut_ptr().add(column),
                float32x4x2_t(acc[8 + q], acc[12 + q]),
            );
        }
    }
    end
}

impl Op for Deconv2x2 {
    fn name(&self) -> StaticName {
        "Deconv2x2".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for Deconv2x2 {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        super::eval_nchw(
            "Deconv2x2",
            inputs,
            self.inputs,
            self.outputs,
            |size| 2 * size,
            |x, h, w, y| self.run(x, h, w, y),
        )
    }
}

impl TypedOp for Deconv2x2 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        super::nchw_output_facts("Deconv2x2", inputs, self.inputs, self.outputs, |size| {
            2 * size
        })
    }

    tract_onnx::tract_core::as_op!();
}

/// The ONNX-level operator: inputs `x` and the constant `ConvTranspose` weight.
#[derive(Debug, Clone)]
struct Deconv2x2Expansion;

impl Expansion for Deconv2x2Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[1].shape[1], &outputs[0].shape[1])?;
        s.equals(&inputs[0].shape[1], &inputs[1].shape[0])?;
        s.given(&inputs[0].shape[2], move |s, height| {
            s.equals(&outputs[0].shape[2], height * 2)
        })?;
        s.given(&inputs[0].shape[3], move |s, width| {
            s.equals(&outputs[0].shape[3], width * 2)
        })?;
        Ok(())
    }

    fn wire(
        &self,
        name: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let (shape, weight) = super::constant_f32(model, inputs[1], OP_TYPE, name)?;
        ensure!(
            shape.len() == 4 && shape[2] == 2 && shape[3] == 2,
            "{OP_TYPE} weight of {name} has shape {shape:?}, expected [inputs, outputs, 2, 2]"
        );
        let op = Deconv2x2::from_onnx_weight(&weight, shape[0], shape[1])?;
        model.wire_node(name, op, &[inputs[0]])
    }
}

/// Parses an [`OP_TYPE`] node; [`super::onnx_parser`] registers it.
pub fn parse_deconv2x2(
    _ctx: &tract_onnx::model::ParsingContext,
    _node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(Deconv2x2Expansion), vec![]))
}

/// Returns whether `node` is a `ConvTranspose` this operator computes: kernel 2x2, stride 2, no
/// padding, dilation 1, one group, no output padding or output shape, no bias.
fn is_deconv2x2(node: &pb::NodeProto) -> bool {
    let auto_pad = node
        .attribute
        .iter()
        .find(|a| a.name == "auto_pad")
        .map(|a| a.s.as_slice());
    node.op_type == "ConvTranspose"
        && node.input.len() == 2
        && ints(node, "kernel_shape", &[2, 2]) == [2, 2]
        && ints(node, "strides", &[1, 1]) == [2, 2]
        && ints(node, "pads", &[0; 4]).iter().all(|&p| p == 0)
        && ints(node, "dilations", &[1, 1]) == [1, 1]
        && ints(node, "output_padding", &[0, 0])
            .iter()
            .all(|&p| p == 0)
        && ints(node, "output_shape", &[]).is_empty()
        && int(node, "group", 1) == 1
        && matches!(auto_pad, None | Some(b"NOTSET") | Some(b"VALID"))
}

/// Replaces each `ConvTranspose` that [`Deconv2x2`] computes, with a 4-d f32 weight
/// initializer of kernel 2x2, by an [`OP_TYPE`] node. Returns the number replaced.
pub fn fuse_deconv2x2(model: &mut pb::ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let weights = f32_initializers(graph, 4);
    let replace: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, node)| is_deconv2x2(node))
        .filter(|(_, node)| {
            let weight = weights.get(node.input[1].as_str());
            weight.is_some_and(|w| w.dims[2] == 2 && w.dims[3] == 2)
        })
        .map(|(index, _)| index)
        .collect();
    for &index in &replace {
        let node = &mut graph.node[index];
        node.op_type = OP_TYPE.to_owned();
        node.attribute.clear();
        node.domain.clear();
    }
    replace.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Computes the definition in f64, one output value at a time, and the sum of the
    /// magnitudes of the products of each, which bounds its rounding error in f32.
    fn reference(
        weight: &[f32],
        inputs: usize,
        outputs: usize,
        input: &[f32],
        h: usize,
        w: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = vec![0.0; outputs * 4 * h * w];
        let mut magnitudes = vec![0.0; outputs * 4 * h * w];
        for o in 0..outputs {
            for y in 0..h {
                for x in 0..w {
                    for ky in 0..2 {
                        for kx in 0..2 {
                            let (mut sum, mut magnitude) = (0.0f64, 0.0f64);
                            for i in 0..inputs {
                                let product =
                                    f64::from(weight[((i * outputs + o) * 2 + ky) * 2 + kx])
                                        * f64::from(input[(i * h + y) * w + x]);
                                sum += product;
                                magnitude += product.abs();
                            }
                            let index = (o * 2 * h + 2 * y + ky) * 2 * w + 2 * x + kx;
                            out[index] = sum as f32;
                            magnitudes[index] = magnitude as f32;
                        }
                    }
                }
            }
        }
        (out, magnitudes)
    }

    /// Returns every kernel this CPU can run, the portable one included, and prints their
    /// names, so that a log shows which vector kernels a run left out.
    fn supported_kernels() -> Vec<(&'static str, Option<RowsFn>)> {
        let kernels: Vec<_> = Simd::supported()
            .into_iter()
            .map(|simd| (simd.name(), kernel_for(simd)))
            .collect();
        static PRINTED: std::sync::Once = std::sync::Once::new();
        PRINTED.call_once(|| {
            let names: Vec<_> = kernels.iter().map(|(name, _)| *name).collect();
            eprintln!("deconv2x2 kernels tested on this CPU: {names:?}");
        });
        kernels
    }

    proptest! {
        #[test]
        fn matches_the_definition(
            inputs in 1usize..24,
            outputs in 1usize..6,
            height in 1usize..5,
            width in prop_oneof![1usize..53, Just(64usize), Just(97usize)],
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            };
            let weight: Vec<f32> = (0..inputs * outputs * 4).map(|_| next()).collect();
            let input: Vec<f32> = (0..inputs * height * width).map(|_| next() * 100.0).collect();
            let op = Deconv2x2::from_onnx_weight(&weight, inputs, outputs).unwrap();
            let (expected, magnitudes) = reference(&weight, inputs, outputs, &input, height, width);
            for (name, kernel) in supported_kernels() {
                let mut actual = vec![f32::NAN; expected.len()];
                op.run_rows(&input, height, width, &mut actual, kernel);
                for (index, (e, a)) in expected.iter().zip(&actual).enumerate() {
                    // An f32 sum of n terms is off by at most about n * 6e-8 of the
                    // summed magnitudes, and n is at most 23 here.
                    let tolerance = 1e-5 * magnitudes[index] + f32::MIN_POSITIVE;
                    prop_assert!((e - a).abs() <= tolerance, "{} [{}]: {} vs {}", name, index, a, e);
                }
            }
        }
    }

    #[test]
    fn weight_of_the_wrong_size_is_rejected() {
        let error = Deconv2x2::from_onnx_weight(&[0.0; 15], 2, 2).unwrap_err();
        assert!(error.to_string().contains("15 values"), "{error}");
    }

    fn conv_transpose(attributes: Vec<pb::AttributeProto>) -> pb::NodeProto {
        pb::NodeProto {
            op_type: "ConvTranspose".into(),
            input: vec!["x".into(), "w".into()],
            output: vec!["y".into()],
            attribute: attributes,
            ..Default::default()
        }
    }

    fn ints_attribute(name: &str, values: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            ints: values.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn only_stride_two_kernel_two_is_matched() {
        let kernel = ints_attribute("kernel_shape", &[2, 2]);
        let stride = ints_attribute("strides", &[2, 2]);
        assert!(is_deconv2x2(&conv_transpose(vec![
            kernel.clone(),
            stride.clone()
        ])));
        assert!(!is_deconv2x2(&conv_transpose(vec![kernel.clone()])));
        assert!(!is_deconv2x2(&conv_transpose(vec![
            ints_attribute("kernel_shape", &[3, 3]),
            stride.clone()
        ])));
        assert!(!is_deconv2x2(&conv_transpose(vec![
            kernel.clone(),
            stride.clone(),
            ints_attribute("pads", &[1, 1, 1, 1])
        ])));
        let mut with_bias = conv_transpose(vec![kernel, stride]);
        with_bias.input.push("b".into());
        assert!(!is_deconv2x2(&with_bias));
    }
}
