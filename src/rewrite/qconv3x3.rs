//! An int8 3x3 convolution for tract with an f32 output, and the ONNX rewrite that uses it.
//!
//! `daain-tools quantize` writes each quantised convolution whose output f32 operators
//! read as `ConvInteger -> Cast -> Mul (-> Add)`: the exact int32 sums, rescaled per
//! output channel. tract 0.23 runs `ConvInteger` through im2col, a requantisation of its
//! input, a sum of the input for the zero point and its integer matmul, then the cast,
//! multiplication and addition as three more passes. That made the int8 model slower than
//! the f32 one.
//!
//! [`QConv3x3`] does all of it in one pass for a 3x3 convolution of stride 1 with padding
//! equal to the dilation: in ESPNet the 65 of the ESP blocks' pyramids and the one before
//! the classifier. The input,
//! int8 or f32 quantised on the way when a `QuantizeLinear` fed the `ConvInteger`, is
//! copied into a padded scratch buffer of unsigned bytes (value + 128), four input
//! channels interleaved per pixel. On AVX-512 VNNI and AVX-VNNI one `vpdpbusd` then
//! multiplies the four channels of 16 or 8 pixels by the four weights of one output
//! channel and adds them into its int32 sums. The zero point is removed per output row.
//! The padding contains the zero point, so each kernel row inside the image adds the zero point
//! times the sum of that row's weights, which is subtracted at the end. The result equals
//! `ConvInteger`'s exactly, and the rescaling is the `Cast`, `Mul` and `Add` in f32.
//!
//! NEON runs a widening 16-bit multiply-accumulate and other CPUs portable integer code;
//! all give the same values.
//! NOTE: without a dot-product instruction (x86_64 without VNNI, Arm before ARMv8.2 such as
//! the Cortex-A72) int8 is no faster than f32 here, and the portable code is much slower:
//! choose f32 on those CPUs. An Arm `sdot` kernel would need a nightly Rust for
//! `vdotq_s32`, or inline assembly.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use anyhow::{ensure, Context};

use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{EvalContext, EvalOp, Op, StaticName, TypedOp};
use tract_onnx::tract_hir::internal::{
    check_output_arity, expand, Expansion, InferenceOp, InferenceResult, Solver, TensorProxy,
};

use super::{int, ints};

/// ONNX operator type of the rewritten node. Only this runtime's tract parser registers it.
pub const OP_TYPE: &str = "DaainQConv3x3";

/// Largest dilation rewritten, as for the f32 [`super::conv3x3`].
const MAX_DILATION: usize = 1024;

/// Output channels computed together.
const CHANNELS: usize = 4;

/// Input channels in one 32-bit word of the scratch buffer and of the packed weights.
const LANES: usize = 4;

/// Quantisation of an f32 input as ONNX defines `QuantizeLinear`:
/// `q = clamp(round_half_even(x / scale) + zero_point, -128, 127)`. tract 0.23.9 multiplies
/// by the reciprocal of the scale instead, so without this rewrite a value at a rounding
/// tie can land one step away.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputQuantization {
    pub scale: f32,
}

/// A 3x3 int8 convolution, stride 1, padding equal to the dilation, with its int32 sums
/// rescaled to f32 per output channel: `out[o] = f32(sum) * scale[o] + bias[o]`.
#[derive(Debug, Clone)]
pub struct QConv3x3 {
    inputs: usize,
    outputs: usize,
    dilation: usize,
    /// Zero point of the int8 input.
    zero_point: i8,
    /// Present when the operator reads f32 and quantises it itself.
    quantization: Option<InputQuantization>,
    /// `packed[((b * groups + g) * 9 + k) * CHANNELS + j]`: the weights of output channel
    /// `b * CHANNELS + j`, tap `k`, input channels `4g..4g + 4`, as four bytes (zero past
    /// the last input or output channel).
    packed: Vec<i32>,
    /// `row_sums[o * 3 + ky]`: the sum of output channel `o`'s weights in kernel row `ky`.
    row_sums: Vec<i32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
}

/// Bitwise equality, which tract needs to compare operators (`Eq`, so NaN equals itself).
impl PartialEq for QConv3x3 {
    fn eq(&self, other: &Self) -> bool {
        let same_quantization = match (self.quantization, other.quantization) {
            (Some(a), Some(b)) => a.scale.to_bits() == b.scale.to_bits(),
            (None, None) => true,
            _ => false,
        };
        self.inputs == other.inputs
            && self.outputs == other.outputs
            && self.dilation == other.dilation
            && self.zero_point == other.zero_point
            && same_quantization
            && self.packed == other.packed
            && super::same_bits(&self.scale, &other.scale)
            && super::same_bits(&self.bias, &other.bias)
    }
}

impl Eq for QConv3x3 {}

thread_local! {
    /// Padded, channel-interleaved copy of the input, reused across calls on this thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The input as unsigned bytes (value + 128), `[groups][height][width + 2d][4]`: four
/// input channels per 32-bit word, columns padded by the dilation with the zero point.
struct Padded<'a> {
    data: &'a [u8],
    height: usize,
    /// Words in a padded row: width + 2 * dilation.
    stride: usize,
}

impl Padded<'_> {
    /// Index of the word of group `g`, row `y` and padded column `x`.
    fn word(&self, g: usize, y: usize, x: usize) -> usize {
        (g * self.height + y) * self.stride + x
    }
}

/// Input of one run: int8 values, or f32 values to quantise.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    I8(&'a [i8]),
    F32(&'a [f32]),
}

impl QConv3x3 {
    /// Builds the operator from an ONNX `ConvInteger` weight laid out
    /// `[outputs, inputs, 3, 3]`, the input zero point and the per-channel rescaling.
    pub fn new(
        weight: &[i8],
        inputs: usize,
        outputs: usize,
        dilation: usize,
        zero_point: i8,
        quantization: Option<InputQuantization>,
        scale: Vec<f32>,
        bias: Vec<f32>,
    ) -> anyhow::Result<Self> {
        ensure!(
            inputs > 0 && outputs > 0,
            "int8 convolution has {inputs} input and {outputs} output channels, expected at \
             least 1"
        );
        ensure!(
            weight.len() == outputs * inputs * 9,
            "int8 convolution weight has {} values, expected {outputs} x {inputs} x 3 x 3",
            weight.len()
        );
        ensure!(
            (1..=MAX_DILATION).contains(&dilation),
            "int8 convolution dilation {dilation} is outside 1 to {MAX_DILATION}"
        );
        ensure!(
            scale.len() == outputs && bias.len() == outputs,
            "int8 convolution has {} scales and {} biases for {outputs} output channels",
            scale.len(),
            bias.len()
        );
        if let Some(q) = quantization {
            ensure!(
                q.scale.is_finite() && q.scale > 0.0,
                "int8 convolution input scale {} is invalid: expected a positive number",
                q.scale
            );
        }
        let groups = inputs.div_ceil(LANES);
        let blocks = outputs.div_ceil(CHANNELS);
        let mut bytes = vec![0i8; blocks * groups * 9 * CHANNELS * LANES];
        let mut row_sums = vec![0i32; outputs * 3];
        for o in 0..outputs {
            let (b, j) = (o / CHANNELS, o % CHANNELS);
            for i in 0..inputs {
                let (g, lane) = (i / LANES, i % LANES);
                for k in 0..9 {
                    let w = weight[(o * inputs + i) * 9 + k];
                    bytes[(((b * groups + g) * 9 + k) * CHANNELS + j) * LANES + lane] = w;
                    row_sums[o * 3 + k / 3] += i32::from(w);
                }
            }
        }
        let packed = bytes
            .chunks_exact(LANES)
            .map(|word| {
                i32::from_le_bytes([word[0] as u8, word[1] as u8, word[2] as u8, word[3] as u8])
            })
            .collect();
        Ok(QConv3x3 {
            inputs,
            outputs,
            dilation,
            zero_point,
            quantization,
            packed,
            row_sums,
            scale,
            bias,
        })
    }

    /// Returns whether the operator reads f32 and quantises it.
    pub fn quantizes_input(&self) -> bool {
        self.quantization.is_some()
    }

    /// Computes the output, `outputs x H x W`, of `input`, `inputs x H x W`, with the
    /// vector kernel of this CPU where there is one.
    pub fn run(&self, input: Input, height: usize, width: usize, output: &mut [f32]) {
        if height == 0 || width == 0 {
            return;
        }
        self.run_with(input, height, width, output, Kernel::best());
    }

    fn run_with(
        &self,
        input: Input,
        height: usize,
        width: usize,
        output: &mut [f32],
        kernel: Kernel,
    ) {
        let plane = height * width;
        let len = match input {
            Input::I8(values) => values.len(),
            Input::F32(values) => values.len(),
        };
        assert_eq!(len, self.inputs * plane, "qconv3x3 input length");
        assert_eq!(output.len(), self.outputs * plane, "qconv3x3 output length");
        let d = self.dilation;
        let groups = self.inputs.div_ceil(LANES);
        let stride = width + 2 * d;
        let padding = (self.zero_point as u8) ^ 0x80;
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let words = groups * height * stride;
            scratch.clear();
            scratch.resize(words * LANES, padding);
            // Both passes split rows among the threads, so that each thread mostly reads
            // the scratch rows it quantised itself.
            super::for_each_band(&mut scratch, groups, height, stride * LANES, |mut band| {
                let rows = band.rows();
                for g in 0..groups {
                    let targets = band.plane(g).chunks_exact_mut(stride * LANES);
                    for (y, row) in rows.clone().zip(targets) {
                        self.fill_row(input, g, y, height, width, kernel.fill(), row);
                    }
                }
            });
            let padded = Padded {
                data: &scratch,
                height,
                stride,
            };
            let blocks = self.outputs.div_ceil(CHANNELS);
            let weights_len = groups * 9 * CHANNELS;
            super::for_each_band(output, self.outputs, height, width, |mut band| {
                for y in band.rows() {
                    for b in 0..blocks {
                        let weights = &self.packed[b * weights_len..][..weights_len];
                        // Channels past the last one keep empty rows and are not stored.
                        let mut rows: [&mut [f32]; CHANNELS] = band.planes_row(b * CHANNELS, y);
                        // The zero point times the weights of each kernel row inside the
                        // image, per output channel of the block.
                        let mut offset = [0i32; CHANNELS];
                        let mut scale = [0f32; CHANNELS];
                        let mut bias = [0f32; CHANNELS];
                        for j in 0..CHANNELS {
                            let o = b * CHANNELS + j;
                            if o >= self.outputs {
                                break;
                            }
                            let inside: i32 = (0..3)
                                .filter(|&ky| row_inside(y, ky, d, height).is_some())
                                .map(|ky| self.row_sums[o * 3 + ky])
                                .sum();
                            offset[j] = i32::from(padding) * inside;
                            scale[j] = self.scale[o];
                            bias[j] = self.bias[o];
                        }
                        let job = Job {
                            padded: &padded,
                            weights,
                            groups,
                            dilation: d,
                            y,
                            width,
                            offset,
                            scale,
                            bias,
                        };
                        let done = match kernel.rows() {
                            // SAFETY: `Kernel::supported` listed the kernel, so the CPU
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

    /// Writes row `y` of the input channels of group `g`, as unsigned bytes, into `row`, a
    /// padded scratch row whose columns `d..d + width` are the image (the padding already
    /// contains the zero point).
    #[allow(clippy::too_many_arguments)]
    fn fill_row(
        &self,
        input: Input,
        g: usize,
        y: usize,
        height: usize,
        width: usize,
        fill: Option<FillFn>,
        row: &mut [u8],
    ) {
        let d = self.dilation;
        let target = &mut row[d * LANES..(d + width) * LANES];
        // The rows of the group's channels; channels past the last keep the zero point.
        let source = |lane: usize| {
            let i = g * LANES + lane;
            (i < self.inputs).then(|| (i * height + y) * width..(i * height + y + 1) * width)
        };
        match input {
            Input::I8(values) => {
                for lane in 0..LANES {
                    let Some(source) = source(lane) else { continue };
                    for (t, v) in target[lane..]
                        .iter_mut()
                        .step_by(LANES)
                        .zip(&values[source])
                    {
                        *t = (*v as u8) ^ 0x80;
                    }
                }
            }
            Input::F32(values) => {
                let rows =
                    [source(0), source(1), source(2), source(3)].map(|r| r.map(|r| &values[r]));
                let scale = self.quantization.map_or(1.0, |q| q.scale);
                let done = match fill {
                    // SAFETY: `Kernel::supported` listed the kernel, so the CPU supports it.
                    Some(fill) => unsafe { fill(&rows, scale, self.zero_point, target) },
                    None => 0,
                };
                let tail = &mut target[done * LANES..];
                for (lane, row) in rows.iter().enumerate() {
                    let Some(row) = row else { continue };
                    let columns = tail.iter_mut().skip(lane).step_by(LANES);
                    for (t, v) in columns.zip(&row[done..]) {
                        *t = quantize(*v, scale, self.zero_point);
                    }
                }
            }
        }
    }
}

/// Quantises `value` as `QuantizeLinear` does and returns it plus 128. `value / scale` is
/// first limited to [-1024, 1024], with NaN at the low end, as the vector code does it.
fn quantize(value: f32, scale: f32, zero_point: i8) -> u8 {
    let t = value / scale;
    let t = if t > -1024.0 { t } else { -1024.0 };
    let t = if t < 1024.0 { t } else { 1024.0 };
    let q = (t.round_ties_even() as i32 + i32::from(zero_point)).clamp(-128, 127);
    (q + 128) as u8
}

/// A vector kernel that quantises the f32 rows of one group of [`LANES`] input channels
/// into their padded scratch row, from column 0 to a multiple of its width. Channels past
/// the last are `None` and get the zero point. It returns the number of columns done.
type FillFn = unsafe fn(&[Option<&[f32]>; LANES], f32, i8, &mut [u8]) -> usize;

/// AVX-512 quantisation of 16 columns per step.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_fill(
    rows: &[Option<&[f32]>; LANES],
    scale: f32,
    zero_point: i8,
    target: &mut [u8],
) -> usize {
    use std::arch::x86_64::*;

    let width = target.len() / LANES;
    let end = width / 16 * 16;
    assert!(rows.iter().flatten().all(|row| row.len() == width));
    let scale = _mm512_set1_ps(scale);
    let (low, high) = (_mm512_set1_ps(-1024.0), _mm512_set1_ps(1024.0));
    let zero = _mm512_set1_epi32(i32::from(zero_point) + 128);
    let (min, max) = (_mm512_set1_epi32(0), _mm512_set1_epi32(255));
    for x in (0..end).step_by(16) {
        let mut words = _mm512_setzero_si512();
        for (lane, row) in rows.iter().enumerate() {
            let value = match row {
                Some(row) => {
                    // In bounds: every row has `width` values.
                    let t = _mm512_div_ps(_mm512_loadu_ps(row.as_ptr().add(x)), scale);
                    let t = _mm512_min_ps(_mm512_max_ps(t, low), high);
                    let q = _mm512_add_epi32(_mm512_cvtps_epi32(t), zero);
                    _mm512_min_epi32(_mm512_max_epi32(q, min), max)
                }
                None => zero,
            };
            let shifted = match lane {
                0 => value,
                1 => _mm512_slli_epi32::<8>(value),
                2 => _mm512_slli_epi32::<16>(value),
                _ => _mm512_slli_epi32::<24>(value),
            };
            words = _mm512_or_si512(words, shifted);
        }
        _mm512_storeu_si512(target.as_mut_ptr().add(x * LANES).cast(), words);
    }
    end
}

/// AVX2 quantisation of 8 columns per step.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_fill(
    rows: &[Option<&[f32]>; LANES],
    scale: f32,
    zero_point: i8,
    target: &mut [u8],
) -> usize {
    use std::arch::x86_64::*;

    let width = target.len() / LANES;
    let end = width / 8 * 8;
    assert!(rows.iter().flatten().all(|row| row.len() == width));
    let scale = _mm256_set1_ps(scale);
    let (low, high) = (_mm256_set1_ps(-1024.0), _mm256_set1_ps(1024.0));
    let zero = _mm256_set1_epi32(i32::from(zero_point) + 128);
    let (min, max) = (_mm256_set1_epi32(0), _mm256_set1_epi32(255));
    for x in (0..end).step_by(8) {
        let mut words = _mm256_setzero_si256();
        for (lane, row) in rows.iter().enumerate() {
            let value = match row {
                Some(row) => {
                    // In bounds: every row has `width` values.
                    let t = _mm256_div_ps(_mm256_loadu_ps(row.as_ptr().add(x)), scale);
                    let t = _mm256_min_ps(_mm256_max_ps(t, low), high);
                    let q = _mm256_add_epi32(_mm256_cvtps_epi32(t), zero);
                    _mm256_min_epi32(_mm256_max_epi32(q, min), max)
                }
                None => zero,
            };
            let shifted = match lane {
                0 => value,
                1 => _mm256_slli_epi32::<8>(value),
                2 => _mm256_slli_epi32::<16>(value),
                _ => _mm256_slli_epi32::<24>(value),
            };
            words = _mm256_or_si256(words, shifted);
        }
        _mm256_storeu_si256(target.as_mut_ptr().add(x * LANES).cast(), words);
    }
    end
}
/// Returns the input row that kernel row `ky` reads for output row `y`, if it lies inside
/// the image.
fn row_inside(y: usize, ky: usize, dilation: usize, height: usize) -> Option<usize> {
    let yy = (y + ky * dilation).checked_sub(dilation)?;
    (yy < height).then_some(yy)
}

/// One output row of one block of [`CHANNELS`] output channels.
struct Job<'a> {
    padded: &'a Padded<'a>,
    /// The block's packed weights: `weights[(g * 9 + k) * CHANNELS + j]`.
    weights: &'a [i32],
    groups: usize,
    dilation: usize,
    /// Output row and width.
    y: usize,
    width: usize,
    /// Per output channel of the block: what the zero point added to the sums, the scale
    /// and the bias.
    offset: [i32; CHANNELS],
    scale: [f32; CHANNELS],
    bias: [f32; CHANNELS],
}

impl Job<'_> {
    /// Checks that every tap of the columns `0..end` lies inside a padded row, which is
    /// what the vector kernels rely on for their unchecked loads.
    fn assert_bounds(&self, end: usize) {
        let padded = self.padded;
        assert_eq!(self.weights.len(), self.groups * 9 * CHANNELS);
        assert!(padded.data.len() >= self.groups * padded.height * padded.stride * LANES);
        assert!(2 * self.dilation + end <= padded.stride);
    }

    /// Returns the kernel rows `ky` whose input row lies inside the image, with that row.
    fn kernel_rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..3).filter_map(move |ky| {
            row_inside(self.y, ky, self.dilation, self.padded.height).map(|yy| (ky, yy))
        })
    }

    /// Returns the f32 output of output channel `j` for the int32 sum `sum`.
    fn rescale(&self, j: usize, sum: i32) -> f32 {
        (sum - self.offset[j]) as f32 * self.scale[j] + self.bias[j]
    }
}

/// A vector kernel. It fills the rows, one per output channel of the block (fewer for
/// the last block), from column 0 to a multiple of its block width, and returns the
/// number of columns done.
type RowsFn = unsafe fn(&Job, &mut [&mut [f32]; CHANNELS]) -> usize;

/// Integer dot-product instruction sets with a kernel, best first.
// Each target architecture constructs only its own variants.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AVX-512 VNNI: 512-bit `vpdpbusd`.
    Avx512Vnni,
    /// AVX-VNNI: 256-bit `vpdpbusd`.
    AvxVnni,
    /// NEON: widening multiply-accumulate of 16-bit values into 32-bit sums.
    Neon,
    Portable,
}

impl Kernel {
    fn supported() -> Vec<Kernel> {
        let mut supported = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
            {
                supported.push(Kernel::Avx512Vnni);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("avxvnni")
            {
                supported.push(Kernel::AvxVnni);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            supported.push(Kernel::Neon);
        }
        supported.push(Kernel::Portable);
        supported
    }

    /// Returns the best kernel of this CPU, detected once, because every run asks.
    fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Kernel::supported()[0])
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Vnni => "avx512vnni",
            Kernel::AvxVnni => "avxvnni",
            Kernel::Neon => "neon",
            Kernel::Portable => "portable",
        }
    }

    fn fill(self) -> Option<FillFn> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => Some(avx512_fill),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => Some(avx2_fill),
            _ => None,
        }
    }

    fn rows(self) -> Option<RowsFn> {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => Some(avx512_vnni_rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => Some(avx_vnni_rows),
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => Some(neon_rows),
            _ => None,
        }
    }
}

/// Returns the name of the kernel this CPU runs, for logs.
pub fn kernel_name() -> &'static str {
    Kernel::best().name()
}

/// Computes the output columns from `start` on, portably, 16 columns at a time in
/// fixed-size loops that compilers turn into vector code (NEON on aarch64, SSE2 on
/// x86_64).
fn portable_rows(job: &Job, start: usize, rows: &mut [&mut [f32]; CHANNELS]) {
    const STEP: usize = 16;
    let padded = job.padded;
    let mut x = start;
    while x < job.width {
        let n = STEP.min(job.width - x);
        let mut sums = [[0i32; STEP]; CHANNELS];
        for g in 0..job.groups {
            for (ky, yy) in job.kernel_rows() {
                for kx in 0..3 {
                    let at = padded.word(g, yy, x + kx * job.dilation) * LANES;
                    let mut values = [[0i32; STEP]; LANES];
                    for (p, pixel) in padded.data[at..at + n * LANES]
                        .chunks_exact(LANES)
                        .enumerate()
                    {
                        for (lane, byte) in pixel.iter().enumerate() {
                            values[lane][p] = i32::from(*byte);
                        }
                    }
                    let w = &job.weights[(g * 9 + ky * 3 + kx) * CHANNELS..][..CHANNELS];
                    for (sums, w) in sums.iter_mut().zip(w) {
                        for (values, w) in values.iter().zip(w.to_le_bytes()) {
                            let w = i32::from(w as i8);
                            for (sum, value) in sums.iter_mut().zip(values) {
                                *sum += w * value;
                            }
                        }
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() != job.width {
                continue;
            }
            for (value, sum) in row[x..x + n].iter_mut().zip(sums[j]) {
                *value = job.rescale(j, sum);
            }
        }
        x += n;
    }
}

/// AVX-512 VNNI kernel: 32 columns as two vectors of 16 int32 sums, eight accumulators.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn avx512_vnni_rows(job: &Job, rows: &mut [&mut [f32]; CHANNELS]) -> usize {
    use std::arch::x86_64::*;

    const WIDE: usize = 32;
    let padded = job.padded;
    let end = job.width / WIDE * WIDE;
    job.assert_bounds(end);
    let base = padded.data.as_ptr();
    for x in (0..end).step_by(WIDE) {
        let mut acc = [_mm512_setzero_si512(); 2 * CHANNELS];
        for g in 0..job.groups {
            for (ky, yy) in job.kernel_rows() {
                for kx in 0..3 {
                    // In bounds: checked by `assert_bounds` for the last column.
                    let p = base.add(padded.word(g, yy, x + kx * job.dilation) * LANES);
                    let v0 = _mm512_loadu_si512(p.cast());
                    let v1 = _mm512_loadu_si512(p.add(16 * LANES).cast());
                    let w = job.weights.as_ptr().add((g * 9 + ky * 3 + kx) * CHANNELS);
                    for j in 0..CHANNELS {
                        let w = _mm512_set1_epi32(*w.add(j));
                        acc[2 * j] = _mm512_dpbusd_epi32(acc[2 * j], v0, w);
                        acc[2 * j + 1] = _mm512_dpbusd_epi32(acc[2 * j + 1], v1, w);
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() != job.width {
                continue;
            }
            let offset = _mm512_set1_epi32(job.offset[j]);
            let scale = _mm512_set1_ps(job.scale[j]);
            let bias = _mm512_set1_ps(job.bias[j]);
            for half in 0..2 {
                let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * j + half], offset));
                // Multiply, then add, each rounded, as the `Mul` and `Add` it replaces.
                let value = _mm512_add_ps(_mm512_mul_ps(sum, scale), bias);
                _mm512_storeu_ps(row.as_mut_ptr().add(x + 16 * half), value);
            }
        }
    }
    end
}

/// AVX-VNNI kernel: 16 columns as two vectors of 8 int32 sums, eight accumulators.
///
/// # Safety
/// The CPU must support AVX2 and AVX-VNNI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn avx_vnni_rows(job: &Job, rows: &mut [&mut [f32]; CHANNELS]) -> usize {
    use std::arch::x86_64::*;

    const WIDE: usize = 16;
    let padded = job.padded;
    let end = job.width / WIDE * WIDE;
    job.assert_bounds(end);
    let base = padded.data.as_ptr();
    for x in (0..end).step_by(WIDE) {
        let mut acc = [_mm256_setzero_si256(); 2 * CHANNELS];
        for g in 0..job.groups {
            for (ky, yy) in job.kernel_rows() {
                for kx in 0..3 {
                    // In bounds: checked by `assert_bounds` for the last column.
                    let p = base.add(padded.word(g, yy, x + kx * job.dilation) * LANES);
                    let v0 = _mm256_loadu_si256(p.cast());
                    let v1 = _mm256_loadu_si256(p.add(8 * LANES).cast());
                    let w = job.weights.as_ptr().add((g * 9 + ky * 3 + kx) * CHANNELS);
                    for j in 0..CHANNELS {
                        let w = _mm256_set1_epi32(*w.add(j));
                        acc[2 * j] = _mm256_dpbusd_avx_epi32(acc[2 * j], v0, w);
                        acc[2 * j + 1] = _mm256_dpbusd_avx_epi32(acc[2 * j + 1], v1, w);
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() != job.width {
                continue;
            }
            let offset = _mm256_set1_epi32(job.offset[j]);
            let scale = _mm256_set1_ps(job.scale[j]);
            let bias = _mm256_set1_ps(job.bias[j]);
            for half in 0..2 {
                let sum = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[2 * j + half], offset));
                let value = _mm256_add_ps(_mm256_mul_ps(sum, scale), bias);
                _mm256_storeu_ps(row.as_mut_ptr().add(x + 8 * half), value);
            }
        }
    }
    end
}

/// NEON kernel: 16 columns, their four channels of a group loaded apart (`ld4`), widened
/// to 16 bits and multiplied into sixteen vectors of four 32-bit sums. On CPUs without
/// dot-product instructions this does as many multiplications per instruction as the f32
/// kernel, plus the widening, so it is not expected to be faster.
/// NOTE: its speed was only checked under emulation, not on Arm hardware.
///
/// # Safety
/// The CPU must support NEON.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon_rows(job: &Job, rows: &mut [&mut [f32]; CHANNELS]) -> usize {
    use std::arch::aarch64::*;

    const WIDE: usize = 16;
    let padded = job.padded;
    let end = job.width / WIDE * WIDE;
    job.assert_bounds(end);
    let base = padded.data.as_ptr();
    for x in (0..end).step_by(WIDE) {
        let mut acc = [vdupq_n_s32(0); 4 * CHANNELS];
        for g in 0..job.groups {
            for (ky, yy) in job.kernel_rows() {
                for kx in 0..3 {
                    // In bounds: checked by `assert_bounds` for the last column.
                    let p = base.add(padded.word(g, yy, x + kx * job.dilation) * LANES);
                    let loaded = vld4q_u8(p);
                    let channels = [loaded.0, loaded.1, loaded.2, loaded.3];
                    let w = job.weights.as_ptr().add((g * 9 + ky * 3 + kx) * CHANNELS);
                    for (lane, channel) in channels.iter().enumerate() {
                        let low = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(*channel)));
                        let high = vreinterpretq_s16_u16(vmovl_high_u8(*channel));
                        for j in 0..CHANNELS {
                            let weight = i16::from((*w.add(j)).to_le_bytes()[lane] as i8);
                            acc[4 * j] = vmlal_n_s16(acc[4 * j], vget_low_s16(low), weight);
                            acc[4 * j + 1] = vmlal_high_n_s16(acc[4 * j + 1], low, weight);
                            acc[4 * j + 2] =
                                vmlal_n_s16(acc[4 * j + 2], vget_low_s16(high), weight);
                            acc[4 * j + 3] = vmlal_high_n_s16(acc[4 * j + 3], high, weight);
                        }
                    }
                }
            }
        }
        for (j, row) in rows.iter_mut().enumerate() {
            if row.len() != job.width {
                continue;
            }
            let offset = vdupq_n_s32(job.offset[j]);
            let bias = vdupq_n_f32(job.bias[j]);
            for q in 0..4 {
                let sum = vcvtq_f32_s32(vsubq_s32(acc[4 * j + q], offset));
                let value = vaddq_f32(vmulq_n_f32(sum, job.scale[j]), bias);
                vst1q_f32(row.as_mut_ptr().add(x + 4 * q), value);
            }
        }
    }
    end
}

impl Op for QConv3x3 {
    fn name(&self) -> StaticName {
        "QConv3x3".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for QConv3x3 {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = inputs
            .into_iter()
            .next()
            .context("QConv3x3 has one input")?;
        let shape = input.shape().to_vec();
        ensure!(
            shape.len() == 4
                && shape[0] == 1
                && shape[1] == self.inputs
                && shape[2] > 0
                && shape[3] > 0,
            "QConv3x3 input has shape {shape:?}, expected [1, {}, H, W] with H, W > 0",
            self.inputs
        );
        let (height, width) = (shape[2], shape[3]);
        let source = input.try_as_plain_ram()?;
        let values = if self.quantizes_input() {
            Input::F32(source.as_slice::<f32>()?)
        } else {
            Input::I8(source.as_slice::<i8>()?)
        };
        // SAFETY: `run` writes every value of the output.
        let output = unsafe {
            super::new_f32_tensor(&[1, self.outputs, height, width], |target| {
                self.run(values, height, width, target);
                Ok(())
            })?
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for QConv3x3 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        let expected = if self.quantizes_input() {
            DatumType::F32
        } else {
            DatumType::I8
        };
        ensure!(
            fact.datum_type.unquantized() == expected,
            "QConv3x3 input is {:?}, expected {expected:?}",
            fact.datum_type
        );
        let shape = &fact.shape;
        ensure!(
            shape.rank() == 4 && shape[0] == 1.into() && shape[1] == self.inputs.into(),
            "QConv3x3 input has shape {shape:?}, expected [1, {}, H, W]",
            self.inputs
        );
        let dims = [
            1.into(),
            self.outputs.into(),
            shape[2].clone(),
            shape[3].clone(),
        ];
        Ok(tvec!(f32::fact(dims)))
    }

    tract_onnx::tract_core::as_op!();
}

/// The ONNX-level operator. Its inputs are `x` (int8, or f32 with attribute
/// `input_scale`), the constant int8 weight, the per-channel scale and optionally the
/// per-channel bias. Its attributes are `dilation` and `zero_point`.
#[derive(Debug, Clone)]
struct QConv3x3Expansion {
    dilation: usize,
    zero_point: i8,
    quantization: Option<InputQuantization>,
}

impl Expansion for QConv3x3Expansion {
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
            (3..=4).contains(&inputs.len()),
            "{OP_TYPE} has {} inputs, expected 3 or 4",
            inputs.len()
        );
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[1].shape[0], &outputs[0].shape[1])?;
        s.equals(&inputs[0].shape[1], &inputs[1].shape[1])?;
        s.equals(&inputs[0].shape[2], &outputs[0].shape[2])?;
        s.equals(&inputs[0].shape[3], &outputs[0].shape[3])?;
        Ok(())
    }

    fn wire(
        &self,
        name: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let constant = |slot: usize| -> TractResult<Arc<Tensor>> {
            model
                .outlet_fact(inputs[slot])?
                .konst
                .clone()
                .with_context(|| format!("{OP_TYPE} input {slot} of {name} is not a constant"))
        };
        let weight = constant(1)?;
        let shape = weight.shape().to_vec();
        ensure!(
            shape.len() == 4 && shape[2] == 3 && shape[3] == 3,
            "{OP_TYPE} weight of {name} has shape {shape:?}, expected [outputs, inputs, 3, 3]"
        );
        let weight = weight.cast_to::<i8>()?;
        let outputs = shape[0];
        let per_channel = |slot: usize| -> TractResult<Vec<f32>> {
            let values = constant(slot)?
                .cast_to::<f32>()?
                .try_as_plain_ram()?
                .as_slice::<f32>()?
                .to_vec();
            match values.len() {
                1 => Ok(vec![values[0]; outputs]),
                n if n == outputs => Ok(values),
                n => anyhow::bail!(
                    "{OP_TYPE} input {slot} of {name} has {n} values, expected 1 or {outputs}"
                ),
            }
        };
        let scale = per_channel(2)?;
        let bias = if inputs.len() == 4 {
            per_channel(3)?
        } else {
            vec![0.0; outputs]
        };
        let op = QConv3x3::new(
            weight.try_as_plain_ram()?.as_slice::<i8>()?,
            shape[1],
            outputs,
            self.dilation,
            self.zero_point,
            self.quantization,
            scale,
            bias,
        )?;
        model.wire_node(name, op, &[inputs[0]])
    }
}

/// Parses an [`OP_TYPE`] node; [`super::onnx_parser`] registers it.
pub fn parse_qconv3x3(
    _ctx: &tract_onnx::model::ParsingContext,
    node: &pb::NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let dilation = int(node, "dilation", 1);
    let dilation = usize::try_from(dilation)
        .ok()
        .filter(|d| (1..=MAX_DILATION).contains(d))
        .with_context(|| format!("{OP_TYPE} dilation {dilation} is outside 1 to {MAX_DILATION}"))?;
    let zero_point = int(node, "zero_point", 0);
    let zero_point = i8::try_from(zero_point)
        .with_context(|| format!("{OP_TYPE} zero point {zero_point} is outside -128 to 127"))?;
    let quantization = node
        .attribute
        .iter()
        .find(|a| a.name == "input_scale")
        .map(|a| InputQuantization { scale: a.f });
    Ok((
        expand(QConv3x3Expansion {
            dilation,
            zero_point,
            quantization,
        }),
        vec![],
    ))
}

/// Returns the dilation of `node` if it is a `ConvInteger` this operator computes:
/// kernel 3x3, stride 1, padding equal to the dilation, one group, no weight zero point.
fn conv_integer_dilation(node: &pb::NodeProto) -> Option<usize> {
    let auto_pad = node
        .attribute
        .iter()
        .find(|a| a.name == "auto_pad")
        .map(|a| a.s.as_slice());
    let dilations = ints(node, "dilations", &[1, 1]);
    let fits = node.op_type == "ConvInteger"
        && (2..=4).contains(&node.input.len())
        && ints(node, "kernel_shape", &[3, 3]) == [3, 3]
        && ints(node, "strides", &[1, 1]) == [1, 1]
        && dilations.len() == 2
        && dilations[0] == dilations[1]
        && (1..=MAX_DILATION as i64).contains(&dilations[0])
        && ints(node, "pads", &[0; 4]) == [dilations[0]; 4]
        && int(node, "group", 1) == 1
        && matches!(auto_pad, None | Some(b"NOTSET"));
    fits.then_some(dilations[0] as usize)
}

/// Returns the values of an INT8 or FLOAT initializer, or `None` for other types.
fn initializer_values(tensor: &pb::TensorProto) -> Option<Vec<f64>> {
    use pb::tensor_proto::DataType;
    let count: i64 = tensor.dims.iter().product();
    let values: Vec<f64> = if tensor.data_type == DataType::Int8 as i32 {
        if !tensor.raw_data.is_empty() {
            tensor
                .raw_data
                .iter()
                .map(|&b| f64::from(b as i8))
                .collect()
        } else {
            tensor.int32_data.iter().map(|&v| f64::from(v)).collect()
        }
    } else if tensor.data_type == DataType::Float as i32 {
        if !tensor.raw_data.is_empty() {
            tensor
                .raw_data
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect()
        } else {
            tensor.float_data.iter().map(|&v| f64::from(v)).collect()
        }
    } else {
        return None;
    };
    (values.len() as i64 == count).then_some(values)
}

/// Returns whether the f32 initializer `tensor` contains one value per output channel of an
/// NCHW tensor with `channels` channels: shape `[1, C, 1, 1]`, `[C, 1, 1]` or a scalar.
fn per_channel_shape(tensor: &pb::TensorProto, channels: i64) -> bool {
    match tensor.dims[..] {
        [] | [1] | [1, 1, 1] | [1, 1, 1, 1] => true,
        [c, 1, 1] | [1, c, 1, 1] => c == channels,
        _ => false,
    }
}

/// Replaces each `ConvInteger -> Cast(float) -> Mul (-> Add)` chain that [`QConv3x3`]
/// computes by one [`OP_TYPE`] node with the chain's last output name. When a
/// `QuantizeLinear` produced the `ConvInteger`'s input, the node reads that f32 input
/// instead, and a `QuantizeLinear` left without readers is removed. Returns the number of
/// chains replaced.
pub fn fuse_qconv3x3(model: &mut pb::ModelProto) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let initializers: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut producer: HashMap<&str, usize> = HashMap::new();
    for (index, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            readers.entry(input.as_str()).or_default().push(index);
        }
        for output in &node.output {
            producer.insert(output.as_str(), index);
        }
    }
    let graph_outputs: HashSet<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    // The only reader of `value`, if it has exactly one and is not a graph output.
    let only_reader = |value: &str| -> Option<usize> {
        match readers.get(value).map(Vec::as_slice) {
            Some([reader]) if !graph_outputs.contains(value) => Some(*reader),
            _ => None,
        }
    };
    // The other input of a two-input node, as a per-channel f32 initializer.
    let constant_operand = |node: &pb::NodeProto, value: &str, channels: i64| -> Option<String> {
        let [a, b] = &node.input[..] else {
            return None;
        };
        let other = if a == value { b } else { a };
        let tensor = initializers.get(other.as_str())?;
        (tensor.data_type == pb::tensor_proto::DataType::Float as i32
            && per_channel_shape(tensor, channels))
        .then(|| other.clone())
    };

    struct Chain {
        conv: usize,
        removed: Vec<usize>,
        node: pb::NodeProto,
    }
    let mut chains = Vec::new();
    for (index, node) in graph.node.iter().enumerate() {
        let Some(dilation) = conv_integer_dilation(node) else {
            continue;
        };
        let Some(weight) = initializers.get(node.input[1].as_str()) else {
            continue;
        };
        if weight.data_type != pb::tensor_proto::DataType::Int8 as i32
            || weight.dims.len() != 4
            || weight.dims[2..] != [3, 3]
        {
            continue;
        }
        let channels = weight.dims[0];
        // An int8 zero point initializer also fixes the input type: without one the input
        // could be uint8, which this operator does not read.
        let zero_point = match node.input.get(2).filter(|name| !name.is_empty()) {
            None => None,
            Some(name) => initializers
                .get(name.as_str())
                .filter(|t| t.data_type == pb::tensor_proto::DataType::Int8 as i32)
                .and_then(|t| initializer_values(t))
                .and_then(|v| (v.len() == 1).then(|| v[0] as i64)),
        };
        let weight_zero_point_is_zero = match node.input.get(3).filter(|name| !name.is_empty()) {
            None => true,
            Some(name) => initializers
                .get(name.as_str())
                .and_then(|t| initializer_values(t))
                .is_some_and(|v| v.iter().all(|&z| z == 0.0)),
        };
        let (Some(zero_point), true) = (zero_point, weight_zero_point_is_zero) else {
            continue;
        };
        let Some(cast) = only_reader(&node.output[0]) else {
            continue;
        };
        let cast_node = &graph.node[cast];
        let to_float = int(cast_node, "to", 0) == pb::tensor_proto::DataType::Float as i64;
        if cast_node.op_type != "Cast" || !to_float {
            continue;
        }
        let Some(mul) = only_reader(&cast_node.output[0]) else {
            continue;
        };
        let mul_node = &graph.node[mul];
        if mul_node.op_type != "Mul" {
            continue;
        }
        let Some(scale) = constant_operand(mul_node, &cast_node.output[0], channels) else {
            continue;
        };
        let mut removed = vec![cast, mul];
        let mut inputs = vec![String::new(), node.input[1].clone(), scale];
        let mut output = mul_node.output[0].clone();
        if let Some(add) = only_reader(&output) {
            let add_node = &graph.node[add];
            if add_node.op_type == "Add" {
                if let Some(bias) = constant_operand(add_node, &output, channels) {
                    inputs.push(bias);
                    output = add_node.output[0].clone();
                    removed.push(add);
                }
            }
        }
        // Read the f32 value a QuantizeLinear of the same zero point quantised.
        let mut attribute = vec![
            int_attribute("dilation", dilation as i64),
            int_attribute("zero_point", zero_point),
        ];
        inputs[0] = node.input[0].clone();
        if let Some(&quantize) = producer.get(node.input[0].as_str()) {
            let quantize = &graph.node[quantize];
            let scale = quantize
                .input
                .get(1)
                .and_then(|name| initializers.get(name.as_str()))
                .filter(|t| t.data_type == pb::tensor_proto::DataType::Float as i32)
                .and_then(|t| initializer_values(t))
                .filter(|v| v.len() == 1);
            let same_zero_point = quantize
                .input
                .get(2)
                .and_then(|name| initializers.get(name.as_str()))
                .filter(|t| t.data_type == pb::tensor_proto::DataType::Int8 as i32)
                .and_then(|t| initializer_values(t))
                .is_some_and(|v| v.len() == 1 && v[0] as i64 == zero_point);
            if let (true, Some(scale), true) =
                (quantize.op_type == "QuantizeLinear", scale, same_zero_point)
            {
                inputs[0] = quantize.input[0].clone();
                attribute.push(pb::AttributeProto {
                    name: "input_scale".into(),
                    f: scale[0] as f32,
                    r#type: pb::attribute_proto::AttributeType::Float as i32,
                    ..Default::default()
                });
            }
        }
        chains.push(Chain {
            conv: index,
            removed,
            node: pb::NodeProto {
                name: node.name.clone(),
                op_type: OP_TYPE.into(),
                input: inputs,
                output: vec![output],
                attribute,
                ..Default::default()
            },
        });
    }

    let count = chains.len();
    let mut remove = HashSet::new();
    for chain in chains {
        graph.node[chain.conv] = chain.node;
        remove.extend(chain.removed);
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !remove.contains(&(index - 1))
    });
    // Drop each QuantizeLinear whose output nothing reads any more.
    let read: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    graph
        .node
        .retain(|n| n.op_type != "QuantizeLinear" || n.output.iter().any(|o| read.contains(o)));
    count
}

fn int_attribute(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        i: value,
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Computes `ConvInteger -> Cast -> Mul -> Add` by its definition, with the input
    /// quantised first as `QuantizeLinear` does when `quantization` is given.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        weight: &[i8],
        inputs: usize,
        outputs: usize,
        dilation: usize,
        zero_point: i8,
        input: &[i8],
        h: usize,
        w: usize,
        scale: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let d = dilation as isize;
        let mut out = vec![0.0; outputs * h * w];
        for o in 0..outputs {
            for y in 0..h {
                for x in 0..w {
                    let mut sum = 0i32;
                    for i in 0..inputs {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let yy = y as isize + (ky as isize - 1) * d;
                                let xx = x as isize + (kx as isize - 1) * d;
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = input[(i * h + yy as usize) * w + xx as usize];
                                sum += i32::from(weight[((o * inputs + i) * 3 + ky) * 3 + kx])
                                    * (i32::from(v) - i32::from(zero_point));
                            }
                        }
                    }
                    out[(o * h + y) * w + x] = sum as f32 * scale[o] + bias[o];
                }
            }
        }
        out
    }

    /// Quantises as `QuantizeLinear` defines it, for values well inside [-1024, 1024]
    /// times the scale.
    fn quantize_linear(values: &[f32], scale: f32, zero_point: i8) -> Vec<i8> {
        values
            .iter()
            .map(|v| {
                ((v / scale).round_ties_even() + f32::from(zero_point)).clamp(-128.0, 127.0) as i8
            })
            .collect()
    }

    proptest! {
        #[test]
        fn matches_the_definition(
            inputs in 1usize..14,
            outputs in 1usize..10,
            dilation in prop::sample::select(vec![1usize, 2, 3, 8, 16]),
            height in 1usize..20,
            width in prop_oneof![1usize..53, Just(64usize), Just(97usize), Just(128usize)],
            zero_point in any::<i8>(),
            f32_input in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            };
            let weight: Vec<i8> = (0..outputs * inputs * 9).map(|_| (next() * 127.0) as i8).collect();
            let scale: Vec<f32> = (0..outputs).map(|_| next().abs() * 0.01 + 1e-4).collect();
            let bias: Vec<f32> = (0..outputs).map(|_| next()).collect();
            // f32 values that overflow the int8 range at both ends, to test the clamp.
            let real: Vec<f32> = (0..inputs * height * width).map(|_| next() * 3.0).collect();
            let input_scale = 0.01;
            let quantized = quantize_linear(&real, input_scale, zero_point);
            let quantization = f32_input.then_some(InputQuantization { scale: input_scale });
            let op = QConv3x3::new(
                &weight, inputs, outputs, dilation, zero_point, quantization, scale.clone(), bias.clone(),
            ).unwrap();
            let expected = reference(
                &weight, inputs, outputs, dilation, zero_point, &quantized, height, width, &scale, &bias,
            );
            let input = if f32_input { Input::F32(&real) } else { Input::I8(&quantized) };
            for kernel in supported_kernels() {
                let mut actual = vec![f32::NAN; expected.len()];
                op.run_with(input, height, width, &mut actual, kernel);
                for (index, (e, a)) in expected.iter().zip(&actual).enumerate() {
                    prop_assert!(e.to_bits() == a.to_bits(), "{} [{}]: {} vs {}", kernel.name(), index, a, e);
                }
            }
        }
    }

    /// Returns every kernel this CPU can run, the portable one included, and prints their
    /// names, so that a log shows which vector kernels a run left out.
    fn supported_kernels() -> Vec<Kernel> {
        let kernels = Kernel::supported();
        static PRINTED: std::sync::Once = std::sync::Once::new();
        PRINTED.call_once(|| {
            let names: Vec<_> = kernels.iter().map(|k| k.name()).collect();
            eprintln!("qconv3x3 kernels tested on this CPU: {names:?}");
        });
        kernels
    }

    /// Returns `ConvInteger(x, w[, zp]) -> Cast -> Mul(scale)` with int8 initializers.
    fn chain(zero_point: bool) -> pb::ModelProto {
        use pb::tensor_proto::DataType;
        let tensor =
            |name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>| pb::TensorProto {
                name: name.into(),
                dims: dims.to_vec(),
                data_type: data_type as i32,
                raw_data: raw,
                ..Default::default()
            };
        let node = |op: &str, inputs: &[&str], output: &str, attribute| pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|i| i.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        };
        let mut conv_inputs = vec!["x", "w"];
        let mut initializer = vec![
            tensor("w", &[1, 1, 3, 3], DataType::Int8, vec![1; 9]),
            tensor(
                "s",
                &[1, 1, 1, 1],
                DataType::Float,
                0.5f32.to_le_bytes().to_vec(),
            ),
        ];
        if zero_point {
            conv_inputs.push("zp");
            initializer.push(tensor("zp", &[], DataType::Int8, vec![3]));
        }
        let pads = pb::AttributeProto {
            name: "pads".into(),
            ints: vec![1; 4],
            ..Default::default()
        };
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: vec![
                    node("ConvInteger", &conv_inputs, "acc", vec![pads]),
                    node("Cast", &["acc"], "acc_f32", vec![int_attribute("to", 1)]),
                    node("Mul", &["acc_f32", "s"], "y", vec![]),
                ],
                initializer,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn chain_with_int8_zero_point_is_fused() {
        let mut model = chain(true);
        assert_eq!(fuse_qconv3x3(&mut model), 1);
        let nodes = &model.graph.unwrap().node;
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].op_type, OP_TYPE);
        assert_eq!(nodes[0].output, ["y"]);
        assert_eq!(int(&nodes[0], "zero_point", 0), 3);
    }

    /// Without an int8 zero point the input may be uint8, which the operator does not read.
    #[test]
    fn chain_without_zero_point_is_kept() {
        let mut model = chain(false);
        assert_eq!(fuse_qconv3x3(&mut model), 0);
        assert_eq!(model.graph.unwrap().node.len(), 3);
    }

    #[test]
    fn weight_of_the_wrong_size_is_rejected() {
        let error =
            QConv3x3::new(&[0; 17], 1, 2, 1, 0, None, vec![1.0; 2], vec![0.0; 2]).unwrap_err();
        assert!(error.to_string().contains("17 values"), "{error}");
    }

    #[test]
    fn invalid_input_scale_is_rejected() {
        let quantization = Some(InputQuantization { scale: 0.0 });
        let error =
            QConv3x3::new(&[0; 9], 1, 1, 1, 0, quantization, vec![1.0], vec![0.0]).unwrap_err();
        assert!(error.to_string().contains("input scale 0"), "{error}");
    }
}
