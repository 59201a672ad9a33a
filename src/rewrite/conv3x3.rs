//! A 3x3 convolution for tract, stride 1 and dilated or stride 2, and the ONNX rewrite
//! that uses it.
//!
//! Every ESP block of ESPNet runs five 3x3 convolutions with dilations 1, 2, 4, 8 and 16
//! over few channels (12 to 28) and 32x64 to 128x256 pixels, 65 of them per frame. One
//! more 3x3 convolution feeds the classifier, and three of stride 2 halve the resolution.
//! tract 0.23 runs some as `DirectSpatialConv`, a generic loop, and the others through
//! im2col and its matmul kernels, where the packing of nine shifted copies of a thin input
//! costs as much as the multiplication. Together they took about half of an f32 frame.
//!
//! [`Conv3x3`] computes each output row as vectors of 16 pixels (32 with AVX-512) for
//! four output channels at once. For every input channel and kernel tap it loads the 16 input pixels
//! once, shifted by the dilation, and multiplies them by four weights into eight
//! accumulators. The input rows are first copied into a zero-padded scratch buffer, kept
//! per thread, so that the columns need no bounds checks. Rows above and below the input
//! are skipped. For stride 2 the copy splits each row into its odd and even columns, so
//! that the columns one tap reads for consecutive output pixels are again consecutive.
//! Weights are packed at load time, four output channels interleaved.
//!
//! The rewrite replaces by a node of type [`OP_TYPE`], with the same output name, every
//! `Conv` with a 3x3 f32 initializer weight, one group, no bias or an f32 initializer
//! bias, and either stride 1 with padding equal to the dilation or stride 2 with dilation
//! 1 and padding 1.

use std::cell::RefCell;

use anyhow::{ensure, Context};

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{EvalContext, EvalOp, Op, StaticName, TypedOp};
use tract_onnx::tract_hir::internal::{
    check_output_arity, expand, Expansion, InferenceOp, InferenceResult, Solver, TensorProxy,
};

use super::{f32_initializers, int, ints, Simd};

/// ONNX operator type of the rewritten node. Only this runtime's tract parser registers it.
pub const OP_TYPE: &str = "DaainConv3x3";

/// Largest dilation rewritten; larger ones, which no image of a sensible size needs, stay
/// with tract.
const MAX_DILATION: usize = 1024;

/// Output channels computed together.
const CHANNELS: usize = 4;

/// Output pixels per row the AVX and NEON kernels compute together: two vectors of eight
/// lanes on AVX, four of four on NEON. The AVX-512 kernel takes 32, two vectors of 16.
const BLOCK: usize = 16;

/// Weights of a 3x3 convolution, packed for the kernels:
/// `packed[((b * inputs + i) * 9 + k) * CHANNELS + j] = w[b * CHANNELS + j, i, k]`, zero
/// for the output channels past the last one.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    inputs: usize,
    outputs: usize,
    geometry: Geometry,
    packed: Vec<f32>,
    /// One value per output channel, added to its sums (zero without a bias).
    bias: Vec<f32>,
}

/// Stride and dilation of a [`Conv3x3`]; the padding equals the dilation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Geometry {
    /// Stride 1 with this dilation: the output has the input's size.
    Dilated(usize),
    /// Stride 2, dilation 1: the output has half the input's size, rounded up.
    Strided,
}

impl Geometry {
    /// Returns the output size along an axis of `size` input pixels.
    pub fn output_size(self, size: usize) -> usize {
        match self {
            Geometry::Dilated(_) => size,
            Geometry::Strided => size.div_ceil(2),
        }
    }

    fn stride(self) -> usize {
        match self {
            Geometry::Dilated(_) => 1,
            Geometry::Strided => 2,
        }
    }

    fn dilation(self) -> usize {
        match self {
            Geometry::Dilated(d) => d,
            Geometry::Strided => 1,
        }
    }
}

/// Bitwise equality, which tract needs to compare operators (`Eq`, so NaN equals itself).
impl PartialEq for Conv3x3 {
    fn eq(&self, other: &Self) -> bool {
        self.inputs == other.inputs
            && self.outputs == other.outputs
            && self.geometry == other.geometry
            && self
                .packed
                .iter()
                .map(|v| v.to_bits())
                .eq(other.packed.iter().map(|v| v.to_bits()))
            && super::same_bits(&self.bias, &other.bias)
    }
}

impl Eq for Conv3x3 {}

thread_local! {
    /// Zero-padded copy of the input rows, reused across calls on this thread.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The input, its rows widened by `dilation` zeros on both sides.
struct Padded<'a> {
    data: &'a [f32],
    height: usize,
    /// Length of a padded row: width + 2 * dilation.
    stride: usize,
}

impl Padded<'_> {
    /// Start of row `y` of input channel `i`; column `x` of the input is at `x + dilation`.
    fn row(&self, i: usize, y: usize) -> usize {
        (i * self.height + y) * self.stride
    }
}

impl Conv3x3 {
    /// Builds the operator from an ONNX `Conv` weight laid out `[outputs, inputs, 3, 3]`
    /// and its bias, if it has one.
    pub fn from_onnx_weight(
        weight: &[f32],
        bias: Option<&[f32]>,
        inputs: usize,
        outputs: usize,
        geometry: Geometry,
    ) -> anyhow::Result<Self> {
        ensure!(
            weight.len() == outputs * inputs * 9,
            "convolution weight has {} values, expected {outputs} x {inputs} x 3 x 3",
            weight.len()
        );
        ensure!(
            inputs > 0 && outputs > 0,
            "convolution has {inputs} input and {outputs} output channels, expected at least 1"
        );
        if let Some(bias) = bias {
            ensure!(
                bias.len() == outputs,
                "convolution bias has {} values, expected {outputs}",
                bias.len()
            );
        }
        let dilation = geometry.dilation();
        ensure!(
            (1..=MAX_DILATION).contains(&dilation),
            "convolution dilation {dilation} is outside 1 to {MAX_DILATION}"
        );
        let blocks = outputs.div_ceil(CHANNELS);
        let mut packed = vec![0.0; blocks * inputs * 9 * CHANNELS];
        for o in 0..outputs {
            let (b, j) = (o / CHANNELS, o % CHANNELS);
            for i in 0..inputs {
                for k in 0..9 {
                    packed[((b * inputs + i) * 9 + k) * CHANNELS + j] =
                        weight[(o * inputs + i) * 9 + k];
                }
            }
        }
        Ok(Conv3x3 {
            inputs,
            outputs,
            geometry,
            packed,
            bias: bias.map_or_else(|| vec![0.0; outputs], <[f32]>::to_vec),
        })
    }

    /// Returns the geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Computes the output, `outputs x H' x W'` with the sizes of
    /// [`Geometry::output_size`], of `input`, `inputs x H x W`, with the vector kernel of
    /// this CPU where there is one.
    pub fn run(&self, input: &[f32], height: usize, width: usize, output: &mut [f32]) {
        self.run_with(input, height, width, output, vector_rows());
    }

    fn run_with(
        &self,
        input: &[f32],
        height: usize,
        width: usize,
        output: &mut [f32],
        vector: Option<RowsFn>,
    ) {
        let (out_height, out_width) = (
            self.geometry.output_size(height),
            self.geometry.output_size(width),
        );
        let plane = out_height * out_width;
        assert_eq!(
            input.len(),
            self.inputs * height * width,
            "conv3x3 input length"
        );
        assert_eq!(output.len(), self.outputs * plane, "conv3x3 output length");
        let d = self.geometry.dilation();
        // Padded row layout and the offset in it of the first value each tap kx reads.
        let (stride, columns) = match self.geometry {
            Geometry::Dilated(_) => (width + 2 * d, [0, d, 2 * d]),
            // [odd columns, from -1 | even columns]: tap 0 reads input column 2x - 1, tap 1
            // column 2x and tap 2 column 2x + 1.
            Geometry::Strided => (2 * out_width + 1, [0, out_width + 1, 1]),
        };
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let len = self.inputs * height * stride;
            if scratch.len() != len {
                scratch.clear();
                scratch.resize(len, 0.0);
            }
            // Both passes split rows among the threads, so that each thread mostly reads
            // the scratch rows it copied itself.
            let geometry = self.geometry;
            super::for_each_band(&mut scratch, self.inputs, height, stride, |mut band| {
                let rows = band.rows();
                for i in 0..self.inputs {
                    let source = &input[(i * height + rows.start) * width..][..rows.len() * width];
                    let targets = band.plane(i).chunks_exact_mut(stride);
                    for (source, target) in source.chunks_exact(width).zip(targets) {
                        pad_row(geometry, source, target);
                    }
                }
            });
            let padded = Padded {
                data: &scratch,
                height,
                stride,
            };
            let blocks = self.outputs.div_ceil(CHANNELS);
            let weights_len = self.inputs * 9 * CHANNELS;
            // Rows are the outer loop, so that the input rows around row y stay in cache
            // while every block uses them.
            super::for_each_band(output, self.outputs, out_height, out_width, |mut band| {
                for y in band.rows() {
                    for block_index in 0..blocks {
                        let weights = &self.packed[block_index * weights_len..][..weights_len];
                        let mut bias = [0.0; CHANNELS];
                        for (j, b) in bias.iter_mut().enumerate() {
                            *b = self
                                .bias
                                .get(block_index * CHANNELS + j)
                                .copied()
                                .unwrap_or(0.0);
                        }
                        // Channels past the last one keep empty rows and are not stored.
                        let mut rows: [&mut [f32]; CHANNELS] =
                            band.planes_row(block_index * CHANNELS, y);
                        let job = Job {
                            padded: &padded,
                            weights,
                            inputs: self.inputs,
                            stride: self.geometry.stride(),
                            dilation: d,
                            columns,
                            y,
                            width: out_width,
                            bias,
                        };
                        let done = match vector {
                            // SAFETY: `vector_rows` returned the kernel only if the CPU
                            // supports it.
                            Some(kernel) => unsafe { kernel(&job, &mut rows) },
                            None => 0,
                        };
                        portable_rows(&job, done, &mut rows);
                    }
                }
            });
        });
    }
}

/// Copies one input row into its padded scratch row: with `dilation` zeros on both sides,
/// or for stride 2 as `[0, odd columns | even columns, 0...]`, so that each tap reads
/// consecutive values.
fn pad_row(geometry: Geometry, source: &[f32], target: &mut [f32]) {
    let width = source.len();
    match geometry {
        Geometry::Dilated(d) => {
            target[..d].fill(0.0);
            target[d..d + width].copy_from_slice(source);
            target[d + width..].fill(0.0);
        }
        Geometry::Strided => {
            let out_width = geometry.output_size(width);
            let (odd, even) = target.split_at_mut(out_width + 1);
            odd.fill(0.0);
            even.fill(0.0);
            let pairs = source.chunks_exact(2);
            if let [last] = pairs.remainder() {
                even[width / 2] = *last;
            }
            for ((pair, even), odd) in pairs.zip(&mut *even).zip(&mut odd[1..]) {
                *even = pair[0];
                *odd = pair[1];
            }
        }
    }
}

/// One output row of one block of [`CHANNELS`] output channels.
struct Job<'a> {
    padded: &'a Padded<'a>,
    /// The block's packed weights: `weights[(i * 9 + k) * CHANNELS + j]`.
    weights: &'a [f32],
    inputs: usize,
    /// Convolution stride and dilation.
    stride: usize,
    dilation: usize,
    /// Offset in a padded row of the value tap kx reads for output column 0.
    columns: [usize; 3],
    /// Output row and output width.
    y: usize,
    width: usize,
    /// Bias of each output channel of the block, added to its sums.
    bias: [f32; CHANNELS],
}

impl Job<'_> {
    /// Checks that every tap of the columns `0..end` lies inside a padded row, which is
    /// what the vector kernels rely on for their unchecked loads.
    fn assert_bounds(&self, end: usize) {
        let padded = self.padded;
        assert_eq!(self.weights.len(), self.inputs * 9 * CHANNELS);
        assert!(padded.data.len() >= self.inputs * padded.height * padded.stride);
        for column in self.columns {
            assert!(column + end <= padded.stride);
        }
    }

    /// Returns the kernel rows `ky` whose input row lies inside the image, with that row.
    fn kernel_rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..3).filter_map(move |ky| {
            let yy = (self.y * self.stride + ky * self.dilation).checked_sub(self.dilation)?;
            (yy < self.padded.height).then_some((ky, yy))
        })
    }
}

/// A vector kernel. It fills the rows, one per output channel of the block (fewer for
/// the last block), from column 0 to a multiple of its block width (16 or 32), and
/// returns the number of columns done.
type RowsFn = unsafe fn(&Job, &mut [&mut [f32]; CHANNELS]) -> usize;

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

/// Computes the output columns from `start` on, portably.
fn portable_rows(job: &Job, start: usize, rows: &mut [&mut [f32]; CHANNELS]) {
    let padded = job.padded;
    for x in start..job.width {
        let mut acc = job.bias;
        for i in 0..job.inputs {
            for (ky, yy) in job.kernel_rows() {
                let row = &padded.data[padded.row(i, yy)..][..padded.stride];
                for kx in 0..3 {
                    let v = row[job.columns[kx] + x];
                    let w = &job.weights[(i * 9 + ky * 3 + kx) * CHANNELS..][..CHANNELS];
                    for (acc, w) in acc.iter_mut().zip(w) {
                        *acc += w * v;
                    }
                }
            }
        }
        for (row, acc) in rows.iter_mut().zip(acc) {
            if let Some(value) = row.get_mut(x) {
                *value = acc;
            }
        }
    }
}

/// AVX kernel with fused multiply-add: 16 columns as two vectors, eight accumulators.
///
/// # Safety
/// The CPU must support AVX and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn avx_fma_rows(job: &Job, rows: &mut [&mut [f32]; CHANNELS]) -> usize {
    use std::arch::x86_64::*;

    let padded = job.padded;
    let end = job.width / BLOCK * BLOCK;
    job.assert_bounds(end);
    for x in (0..end).step_by(BLOCK) {
        let mut acc = [_mm256_setzero_ps(); 2 * CHANNELS];
        for j in 0..CHANNELS {
            acc[2 * j] = _mm256_set1_ps(job.bias[j]);
            acc[2 * j + 1] = acc[2 * j];
        }
        for i in 0..job.inputs {
            for (ky, yy) in job.kernel_rows() {
                // In bounds: checked by `assert_bounds` for the last column.
                let row = padded.data.as_ptr().add(padded.row(i, yy) + x);
                for kx in 0..3 {
                    let p = row.add(job.columns[kx]);
                    let (v0, v1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                    let w = job.weights.as_ptr().add((i * 9 + ky * 3 + kx) * CHANNELS);
                    for j in 0..CHANNELS {
                        let w = _mm256_broadcast_ss(&*w.add(j));
                        acc[2 * j] = _mm256_fmadd_ps(w, v0, acc[2 * j]);
                        acc[2 * j + 1] = _mm256_fmadd_ps(w, v1, acc[2 * j + 1]);
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() == job.width {
                _mm256_storeu_ps(row.as_mut_ptr().add(x), acc[2 * j]);
                _mm256_storeu_ps(row.as_mut_ptr().add(x + 8), acc[2 * j + 1]);
            }
        }
    }
    end
}

/// AVX-512 kernel: 32 columns as two vectors, eight accumulators. It returns
/// `width / 32 * 32`, leaving a narrower tail to the portable kernel.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_rows(job: &Job, rows: &mut [&mut [f32]; CHANNELS]) -> usize {
    use std::arch::x86_64::*;

    const WIDE: usize = 32;
    let padded = job.padded;
    let end = job.width / WIDE * WIDE;
    job.assert_bounds(end);
    for x in (0..end).step_by(WIDE) {
        let mut acc = [_mm512_setzero_ps(); 2 * CHANNELS];
        for j in 0..CHANNELS {
            acc[2 * j] = _mm512_set1_ps(job.bias[j]);
            acc[2 * j + 1] = acc[2 * j];
        }
        for i in 0..job.inputs {
            for (ky, yy) in job.kernel_rows() {
                // In bounds: checked by `assert_bounds` for the last column.
                let row = padded.data.as_ptr().add(padded.row(i, yy) + x);
                for kx in 0..3 {
                    let p = row.add(job.columns[kx]);
                    let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                    let w = job.weights.as_ptr().add((i * 9 + ky * 3 + kx) * CHANNELS);
                    for j in 0..CHANNELS {
                        let w = _mm512_set1_ps(*w.add(j));
                        acc[2 * j] = _mm512_fmadd_ps(w, v0, acc[2 * j]);
                        acc[2 * j + 1] = _mm512_fmadd_ps(w, v1, acc[2 * j + 1]);
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() == job.width {
                _mm512_storeu_ps(row.as_mut_ptr().add(x), acc[2 * j]);
                _mm512_storeu_ps(row.as_mut_ptr().add(x + 16), acc[2 * j + 1]);
            }
        }
    }
    end
}

/// NEON kernel: 16 columns as four vectors, sixteen accumulators.
///
/// # Safety
/// The CPU must support NEON.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon_rows(job: &Job, rows: &mut [&mut [f32]; CHANNELS]) -> usize {
    use std::arch::aarch64::*;

    let padded = job.padded;
    let end = job.width / BLOCK * BLOCK;
    job.assert_bounds(end);
    for x in (0..end).step_by(BLOCK) {
        let mut acc = [vdupq_n_f32(0.0); 4 * CHANNELS];
        for j in 0..CHANNELS {
            for q in 0..4 {
                acc[4 * j + q] = vdupq_n_f32(job.bias[j]);
            }
        }
        for i in 0..job.inputs {
            for (ky, yy) in job.kernel_rows() {
                // In bounds: checked by `assert_bounds` for the last column.
                let row = padded.data.as_ptr().add(padded.row(i, yy) + x);
                for kx in 0..3 {
                    let p = row.add(job.columns[kx]);
                    let v = [
                        vld1q_f32(p),
                        vld1q_f32(p.add(4)),
                        vld1q_f32(p.add(8)),
                        vld1q_f32(p.add(12)),
                    ];
                    let w = vld1q_f32(job.weights.as_ptr().add((i * 9 + ky * 3 + kx) * CHANNELS));
                    for q in 0..4 {
                        acc[q] = vfmaq_laneq_f32::<0>(acc[q], v[q], w);
                        acc[4 + q] = vfmaq_laneq_f32::<1>(acc[4 + q], v[q], w);
                        acc[8 + q] = vfmaq_laneq_f32::<2>(acc[8 + q], v[q], w);
                        acc[12 + q] = vfmaq_laneq_f32::<3>(acc[12 + q], v[q], w);
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() == job.width {
                for q in 0..4 {
                    vst1q_f32(row.as_mut_ptr().add(x + 4 * q), acc[4 * j + q]);
                }
            }
        }
    }
    end
}

impl Op for Conv3x3 {
    fn name(&self) -> StaticName {
        "Conv3x3".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for Conv3x3 {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let geometry = self.geometry;
        super::eval_nchw(
            "Conv3x3",
            inputs,
            self.inputs,
            self.outputs,
            |size| geometry.output_size(size),
            |x, h, w, y| self.run(x, h, w, y),
        )
    }
}

impl TypedOp for Conv3x3 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let geometry = self.geometry;
        super::nchw_output_facts(
            "Conv3x3",
            inputs,
            self.inputs,
            self.outputs,
            |size| match geometry {
                Geometry::Dilated(_) => size,
                Geometry::Strided => size.div_ceil(2),
            },
        )
    }

    tract_onnx::tract_core::as_op!();
}

/// The ONNX-level operator. Its inputs are `x`, the constant weight and optionally the
/// constant bias. Its attributes are `stride` (1 or 2, default 1) and `dilation` (1 with
/// stride 2).
#[derive(Debug, Clone)]
struct Conv3x3Expansion {
    geometry: Geometry,
}

impl Expansion for Conv3x3Expansion {
    fn name(&self) -> StaticName {
        OP_TYPE.into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        ensure!(
            (2..=3).contains(&inputs.len()),
            "{OP_TYPE} has {} inputs, expected 2 or 3",
            inputs.len()
        );
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[1].shape[0], &outputs[0].shape[1])?;
        s.equals(&inputs[0].shape[1], &inputs[1].shape[1])?;
        for axis in [2, 3] {
            match self.geometry {
                Geometry::Dilated(_) => {
                    s.equals(&inputs[0].shape[axis], &outputs[0].shape[axis])?
                }
                Geometry::Strided => s.given(&inputs[0].shape[axis], move |s, size| {
                    s.equals(&outputs[0].shape[axis], size.div_ceil(2))
                })?,
            }
        }
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
            shape.len() == 4 && shape[2] == 3 && shape[3] == 3,
            "{OP_TYPE} weight of {name} has shape {shape:?}, expected [outputs, inputs, 3, 3]"
        );
        let bias = match inputs.get(2) {
            Some(&bias) => Some(super::constant_f32(model, bias, OP_TYPE, name)?.1),
            None => None,
        };
        let op =
            Conv3x3::from_onnx_weight(&weight, bias.as_deref(), shape[1], shape[0], self.geometry)?;
        model.wire_node(name, op, &[inputs[0]])
    }
}

/// Parses an [`OP_TYPE`] node; [`super::onnx_parser`] registers it.
pub fn parse_conv3x3(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let dilation = int(node, "dilation", 1);
    let geometry = match int(node, "stride", 1) {
        1 => usize::try_from(dilation)
            .ok()
            .filter(|d| (1..=MAX_DILATION).contains(d))
            .map(Geometry::Dilated)
            .with_context(|| {
                format!("{OP_TYPE} dilation {dilation} is outside 1 to {MAX_DILATION}")
            })?,
        2 if dilation == 1 => Geometry::Strided,
        stride => anyhow::bail!(
            "{OP_TYPE} has stride {stride} and dilation {dilation}; expected stride 1, or \
             stride 2 with dilation 1"
        ),
    };
    Ok((expand(Conv3x3Expansion { geometry }), vec![]))
}

/// Returns the geometry of `node` if it is a `Conv` this operator computes: kernel 3x3,
/// one group, and stride 1 with padding equal to the dilation on every side or
/// stride 2 with dilation 1 and padding 1.
fn conv3x3_geometry(node: &pb::NodeProto) -> Option<Geometry> {
    let auto_pad = node
        .attribute
        .iter()
        .find(|a| a.name == "auto_pad")
        .map(|a| a.s.as_slice());
    let dilations = ints(node, "dilations", &[1, 1]);
    let fits = node.op_type == "Conv"
        && (2..=3).contains(&node.input.len())
        && ints(node, "kernel_shape", &[3, 3]) == [3, 3]
        && dilations.len() == 2
        && dilations[0] == dilations[1]
        && (1..=MAX_DILATION as i64).contains(&dilations[0])
        && ints(node, "pads", &[0; 4]) == [dilations[0]; 4]
        && int(node, "group", 1) == 1
        && matches!(auto_pad, None | Some(b"NOTSET"));
    if !fits {
        return None;
    }
    match ints(node, "strides", &[1, 1])[..] {
        [1, 1] => Some(Geometry::Dilated(dilations[0] as usize)),
        [2, 2] if dilations[0] == 1 => Some(Geometry::Strided),
        _ => None,
    }
}

/// Replaces each `Conv` that [`Conv3x3`] computes, with a 3x3 f32 weight initializer and
/// no bias or an f32 initializer bias, by an [`OP_TYPE`] node. Returns the number replaced.
pub fn fuse_conv3x3(model: &mut pb::ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let weights = f32_initializers(graph, 4);
    let biases = f32_initializers(graph, 1);
    let replace: Vec<(usize, Geometry)> = graph
        .node
        .iter()
        .enumerate()
        .filter_map(|(index, node)| {
            let geometry = conv3x3_geometry(node)?;
            let weight = weights.get(node.input[1].as_str())?;
            let bias_fits = node.input.get(2).is_none_or(|bias| {
                biases
                    .get(bias.as_str())
                    .is_some_and(|b| b.dims[0] == weight.dims[0])
            });
            (weight.dims[2] == 3 && weight.dims[3] == 3 && bias_fits).then_some((index, geometry))
        })
        .collect();
    for &(index, geometry) in &replace {
        let node = &mut graph.node[index];
        node.op_type = OP_TYPE.to_owned();
        node.domain.clear();
        let int_attribute = |name: &str, value: usize| pb::AttributeProto {
            name: name.into(),
            i: value as i64,
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            ..Default::default()
        };
        node.attribute = vec![
            int_attribute("stride", geometry.stride()),
            int_attribute("dilation", geometry.dilation()),
        ];
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
        geometry: Geometry,
        input: &[f32],
        h: usize,
        w: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (stride, dilation) = (geometry.stride(), geometry.dilation());
        let (out_h, out_w) = (geometry.output_size(h), geometry.output_size(w));
        let mut out = vec![0.0; outputs * out_h * out_w];
        let mut magnitudes = vec![0.0; outputs * out_h * out_w];
        for o in 0..outputs {
            for y in 0..out_h {
                for x in 0..out_w {
                    let mut sum = 0.0f64;
                    let mut magnitude = 0.0f64;
                    for i in 0..inputs {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let yy = (y * stride + ky * dilation) as isize - dilation as isize;
                                let xx = (x * stride + kx * dilation) as isize - dilation as isize;
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = input[(i * h + yy as usize) * w + xx as usize];
                                let product =
                                    f64::from(weight[((o * inputs + i) * 3 + ky) * 3 + kx])
                                        * f64::from(v);
                                sum += product;
                                magnitude += product.abs();
                            }
                        }
                    }
                    out[(o * out_h + y) * out_w + x] = sum as f32;
                    magnitudes[(o * out_h + y) * out_w + x] = magnitude as f32;
                }
            }
        }
        (out, magnitudes)
    }

    proptest! {
        #[test]
        fn matches_the_definition(
            inputs in 1usize..14,
            outputs in 1usize..10,
            geometry in prop::sample::select(vec![
                Geometry::Dilated(1),
                Geometry::Dilated(2),
                Geometry::Dilated(3),
                Geometry::Dilated(8),
                Geometry::Dilated(16),
                Geometry::Strided,
            ]),
            height in 1usize..20,
            width in prop_oneof![1usize..53, Just(64usize), Just(97usize), Just(128usize)],
            with_bias in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            };
            let weight: Vec<f32> = (0..outputs * inputs * 9).map(|_| next()).collect();
            let input: Vec<f32> = (0..inputs * height * width).map(|_| next() * 10.0).collect();
            let bias: Option<Vec<f32>> = with_bias.then(|| (0..outputs).map(|_| next()).collect());
            let op = Conv3x3::from_onnx_weight(&weight, bias.as_deref(), inputs, outputs, geometry)
                .unwrap();
            let (mut expected, magnitudes) =
                reference(&weight, inputs, outputs, geometry, &input, height, width);
            if let Some(bias) = &bias {
                let plane = expected.len() / outputs;
                for (channel, b) in expected.chunks_exact_mut(plane).zip(bias) {
                    channel.iter_mut().for_each(|v| *v += b);
                }
            }
            for (name, kernel) in supported_kernels() {
                let mut actual = vec![f32::NAN; expected.len()];
                op.run_with(&input, height, width, &mut actual, kernel);
                for (index, (e, a)) in expected.iter().zip(&actual).enumerate() {
                    // An f32 sum of n terms is off by at most about n * 6e-8 of the
                    // summed magnitudes, and n is at most 13 * 9 here.
                    let tolerance = 1e-5 * (magnitudes[index] + 1.0) + f32::MIN_POSITIVE;
                    prop_assert!((e - a).abs() <= tolerance, "{} [{}]: {} vs {}", name, index, a, e);
                }
            }
        }
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
            eprintln!("conv3x3 kernels tested on this CPU: {names:?}");
        });
        kernels
    }

    #[test]
    fn weight_of_the_wrong_size_is_rejected() {
        let error =
            Conv3x3::from_onnx_weight(&[0.0; 17], None, 1, 2, Geometry::Dilated(1)).unwrap_err();
        assert!(error.to_string().contains("17 values"), "{error}");
    }

    fn conv(attributes: Vec<pb::AttributeProto>) -> pb::NodeProto {
        pb::NodeProto {
            op_type: "Conv".into(),
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
    fn only_supported_3x3_convs_are_matched() {
        let kernel = ints_attribute("kernel_shape", &[3, 3]);
        let dilated = |d: i64| {
            vec![
                kernel.clone(),
                ints_attribute("dilations", &[d, d]),
                ints_attribute("pads", &[d; 4]),
            ]
        };
        assert_eq!(
            conv3x3_geometry(&conv(dilated(1))),
            Some(Geometry::Dilated(1))
        );
        assert_eq!(
            conv3x3_geometry(&conv(dilated(8))),
            Some(Geometry::Dilated(8))
        );
        let mut strided = dilated(1);
        strided.push(ints_attribute("strides", &[2, 2]));
        assert_eq!(conv3x3_geometry(&conv(strided)), Some(Geometry::Strided));
        let mut strided_dilated = dilated(2);
        strided_dilated.push(ints_attribute("strides", &[2, 2]));
        assert_eq!(
            conv3x3_geometry(&conv(strided_dilated)),
            None,
            "stride 2, dilation 2"
        );
        let mut stride_three = dilated(1);
        stride_three.push(ints_attribute("strides", &[3, 3]));
        assert_eq!(conv3x3_geometry(&conv(stride_three)), None, "stride 3");
        assert_eq!(
            conv3x3_geometry(&conv(vec![kernel.clone()])),
            None,
            "no padding"
        );
        let mut with_bias = conv(dilated(2));
        with_bias.input.push("b".into());
        assert_eq!(conv3x3_geometry(&with_bias), Some(Geometry::Dilated(2)));
        with_bias.input.push("extra".into());
        assert_eq!(conv3x3_geometry(&with_bias), None, "four inputs");
        assert_eq!(
            conv3x3_geometry(&conv(vec![ints_attribute("kernel_shape", &[1, 1])])),
            None
        );
        let mut grouped = dilated(1);
        grouped.push(pb::AttributeProto {
            name: "group".into(),
            i: 2,
            ..Default::default()
        });
        assert_eq!(conv3x3_geometry(&conv(grouped)), None, "groups");
        let asymmetric = vec![kernel.clone(), ints_attribute("pads", &[1, 1, 0, 0])];
        assert_eq!(
            conv3x3_geometry(&conv(asymmetric)),
            None,
            "asymmetric padding"
        );
        let unequal = vec![
            kernel.clone(),
            ints_attribute("dilations", &[1, 2]),
            ints_attribute("pads", &[1, 2, 1, 2]),
        ];
        assert_eq!(conv3x3_geometry(&conv(unequal)), None, "unequal dilations");
        let mut same_upper = vec![kernel.clone()];
        same_upper.push(pb::AttributeProto {
            name: "auto_pad".into(),
            s: b"SAME_UPPER".to_vec(),
            ..Default::default()
        });
        assert_eq!(conv3x3_geometry(&conv(same_upper)), None, "auto_pad");
        assert_eq!(
            conv3x3_geometry(&conv(dilated(2000))),
            None,
            "dilation too large"
        );
    }
}
