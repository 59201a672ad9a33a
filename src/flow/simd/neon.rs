//! Coupling-block forward kernel for aarch64 with NEON, 4 f32 lanes.

use std::arch::aarch64::*;

use super::{
    EXP_INPUT_MAX, EXP_INPUT_MIN, EXP_POLYNOMIAL, LN2_HIGH, LN2_LOW, PACKED_LANES, TANH_POLYNOMIAL,
    TANH_SATURATION, TANH_SMALL,
};
use crate::flow::kernel::{block_forward, SUBNET_OUTPUT_FACTOR};
use crate::flow::Block;

const LANES: usize = 4;

/// Runs one block forward with NEON and returns its log|det J|. It is a drop-in
/// replacement for [`block_forward::<f32>`](block_forward).
///
/// NOTE: tests/flow_kernels.rs passes with this kernel under qemu-aarch64 emulating a
/// Cortex-A72 (targets/cross-test.sh), but it has not run on aarch64 hardware yet.
///
/// Falls back to the scalar kernel when the CPU lacks NEON or when the buffer lengths do
/// not match the block (as [`Flow`](crate::flow::Flow) guarantees they do).
pub fn neon_coupling_forward_f32(
    block: &Block<'_>,
    clamp: f32,
    input: &[f32],
    output: &mut [f32],
    hidden: &mut [f32],
    subnet_out: &mut [f32],
) -> f32 {
    let supported = std::arch::is_aarch64_feature_detected!("neon");
    let lengths_match = super::buffers_match(block, input, output, hidden, subnet_out);
    if !(supported && lengths_match) {
        return block_forward::<f32>(block, clamp, input, output, hidden, subnet_out);
    }
    // SAFETY: the CPU supports NEON (checked above), the only requirement
    // `#[target_feature]` adds.
    unsafe { coupling_forward(block, clamp, input, output, hidden, subnet_out) }
}

/// Runs the kernel body. It expects the buffer lengths checked by
/// [`neon_coupling_forward_f32`], and panics on other lengths but stays memory-safe.
#[target_feature(enable = "neon")]
fn coupling_forward(
    block: &Block<'_>,
    clamp: f32,
    input: &[f32],
    output: &mut [f32],
    hidden: &mut [f32],
    subnet_out: &mut [f32],
) -> f32 {
    let d1 = block.d1();
    let d2 = block.d2();
    let (x1, x2) = input.split_at(d1);

    // First Linear and ReLU. `sum > 0` maps NaN to 0, as the scalar kernel does.
    let weight = &block.subnet_0_weight;
    for (h, value) in hidden.iter_mut().enumerate() {
        let sum = block.subnet_0_bias[h] + dot(&weight[h * d1..(h + 1) * d1], x1);
        *value = if sum > 0.0 { sum } else { 0.0 };
    }

    // Second Linear fused with the affine coupling, one packed chunk of 8 coupled values
    // (two vectors) at a time. The coupled values overwrite the shift half of `subnet_out`.
    let shifts = &mut subnet_out[d2..];
    let chunk_len = (1 + hidden.len()) * 2 * PACKED_LANES;
    let factor = vdupq_n_f32(SUBNET_OUTPUT_FACTOR as f32);
    let clamp = vdupq_n_f32(clamp);
    let mut log_det = vdupq_n_f32(0.0);
    for (c, packed) in block.packed_subnet_2.chunks_exact(chunk_len).enumerate() {
        for half in 0..PACKED_LANES / LANES {
            let start = c * PACKED_LANES + half * LANES;
            if start >= d2 {
                break;
            }
            let lanes = LANES.min(d2 - start);
            let offset = half * LANES;
            let mut log_scale = load(&packed[offset..]);
            let mut shift = load(&packed[PACKED_LANES + offset..]);
            let weights = &packed[2 * PACKED_LANES..];
            for (h, pair) in weights.chunks_exact(2 * PACKED_LANES).enumerate() {
                let unit = vdupq_n_f32(hidden[h]);
                log_scale = vfmaq_f32(log_scale, load(&pair[offset..]), unit);
                shift = vfmaq_f32(shift, load(&pair[PACKED_LANES + offset..]), unit);
            }
            // Padding lanes have zero weights and bias, so their s is 0 and adds nothing.
            let s = vmulq_f32(clamp, tanh(vmulq_f32(log_scale, factor)));
            log_det = vaddq_f32(log_det, s);
            let x = load_partial(&x2[start..], lanes);
            let y = vfmaq_f32(vmulq_f32(shift, factor), x, exp(s));
            store_partial(&mut shifts[start..], lanes, y);
        }
    }
    let log_det = block.log_scale_sum as f32 + vaddvq_f32(log_det);

    permute_and_scale(block, input, shifts, output);
    log_det
}

/// Writes `output[i] = v[p] * scale[p] + offset[p]` with `p = permutation[i]`, where `v` is
/// `x1` followed by the coupled values. NEON has no gather, so this loop is scalar.
#[target_feature(enable = "neon")]
fn permute_and_scale(block: &Block<'_>, x1: &[f32], coupled: &[f32], output: &mut [f32]) {
    let d1 = block.d1();
    let outputs = output.iter_mut().zip(block.permutation.iter()).zip(
        block
            .permuted_scale_f32
            .iter()
            .zip(&block.permuted_offset_f32[..]),
    );
    for ((out, &p), (&scale, &offset)) in outputs {
        let p = p as usize;
        let value = if p < d1 { x1[p] } else { coupled[p - d1] };
        *out = value.mul_add(scale, offset);
    }
}

/// Dot product with four accumulators, so that consecutive FMAs do not wait on each other.
#[target_feature(enable = "neon")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut sums = [vdupq_n_f32(0.0); 4];
    let mut a_blocks = a.chunks_exact(4 * LANES);
    let mut b_blocks = b.chunks_exact(4 * LANES);
    for (a_block, b_block) in (&mut a_blocks).zip(&mut b_blocks) {
        for (k, sum) in sums.iter_mut().enumerate() {
            let range = k * LANES..(k + 1) * LANES;
            *sum = vfmaq_f32(*sum, load(&a_block[range.clone()]), load(&b_block[range]));
        }
    }
    let (a_rest, b_rest) = (a_blocks.remainder(), b_blocks.remainder());
    for (k, start) in (0..a_rest.len()).step_by(LANES).enumerate() {
        let lanes = LANES.min(a_rest.len() - start);
        let product = vmulq_f32(
            load_partial(&a_rest[start..], lanes),
            load_partial(&b_rest[start..], lanes),
        );
        sums[k] = vaddq_f32(sums[k], product);
    }
    let sum = vaddq_f32(vaddq_f32(sums[0], sums[1]), vaddq_f32(sums[2], sums[3]));
    vaddvq_f32(sum)
}

/// Cephes `tanhf`: the odd polynomial below [`TANH_SMALL`], `1 - 2 / (exp(2|x|) + 1)` with
/// the sign of `x` above it. NaN stays NaN.
#[target_feature(enable = "neon")]
fn tanh(x: float32x4_t) -> float32x4_t {
    let magnitude = vabsq_f32(x);

    let square = vmulq_f32(x, x);
    let mut polynomial = vdupq_n_f32(TANH_POLYNOMIAL[0]);
    for &coefficient in &TANH_POLYNOMIAL[1..] {
        polynomial = vfmaq_f32(vdupq_n_f32(coefficient), polynomial, square);
    }
    let small = vfmaq_f32(x, vmulq_f32(polynomial, square), x);

    // FMIN returns NaN when either operand is NaN.
    let magnitude_capped = vminq_f32(vdupq_n_f32(TANH_SATURATION), magnitude);
    let one = vdupq_n_f32(1.0);
    let exp_2x = exp(vaddq_f32(magnitude_capped, magnitude_capped));
    let large = vsubq_f32(one, vdivq_f32(vdupq_n_f32(2.0), vaddq_f32(exp_2x, one)));
    // Copy the sign of x onto the non-negative result.
    let sign_bit = vdupq_n_u32(0x8000_0000);
    let large = vbslq_f32(sign_bit, x, large);

    let is_small = vcltq_f32(magnitude, vdupq_n_f32(TANH_SMALL));
    vbslq_f32(is_small, small, large)
}

/// Cephes `expf`: `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and a polynomial for
/// `exp(r)`. Overflows to infinity above about 88.72 and underflows to 0 below about
/// -103.97, as libm does. NaN stays NaN.
#[target_feature(enable = "neon")]
fn exp(x: float32x4_t) -> float32x4_t {
    // FMAX and FMIN return NaN when either operand is NaN.
    let x = vmaxq_f32(vdupq_n_f32(EXP_INPUT_MIN), x);
    let x = vminq_f32(vdupq_n_f32(EXP_INPUT_MAX), x);
    let n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
    let r = vfmsq_f32(x, n, vdupq_n_f32(LN2_HIGH));
    let r = vfmsq_f32(r, n, vdupq_n_f32(LN2_LOW));

    let mut polynomial = vdupq_n_f32(EXP_POLYNOMIAL[0]);
    for &coefficient in &EXP_POLYNOMIAL[1..] {
        polynomial = vfmaq_f32(vdupq_n_f32(coefficient), polynomial, r);
    }
    let r_squared = vmulq_f32(r, r);
    let exp_r = vaddq_f32(vfmaq_f32(r, polynomial, r_squared), vdupq_n_f32(1.0));

    // n lies in [-150, 129], so 2^n is applied as 2^(n / 2) * 2^(n - n / 2): both factors
    // are normal floats, and the product overflows or underflows like the exact result.
    let n = vcvtq_s32_f32(n);
    let half = vshrq_n_s32::<1>(n);
    let rest = vsubq_s32(n, half);
    let bias = vdupq_n_s32(127);
    let first = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(half, bias)));
    let second = vreinterpretq_f32_s32(vshlq_n_s32::<23>(vaddq_s32(rest, bias)));
    vmulq_f32(vmulq_f32(exp_r, first), second)
}

/// Loads `values[..4]`.
#[target_feature(enable = "neon")]
fn load(values: &[f32]) -> float32x4_t {
    let values = &values[..LANES];
    // SAFETY: `values` contains exactly 4 floats.
    unsafe { vld1q_f32(values.as_ptr()) }
}

/// Loads `values[..lanes]` and zeroes the remaining lanes.
#[target_feature(enable = "neon")]
fn load_partial(values: &[f32], lanes: usize) -> float32x4_t {
    let mut padded = [0.0f32; LANES];
    padded[..lanes].copy_from_slice(&values[..lanes]);
    load(&padded)
}

/// Stores the first `lanes` lanes of `vector` into `values[..lanes]`.
#[target_feature(enable = "neon")]
fn store_partial(values: &mut [f32], lanes: usize, vector: float32x4_t) {
    let mut padded = [0.0f32; LANES];
    // SAFETY: `padded` contains exactly 4 floats.
    unsafe { vst1q_f32(padded.as_mut_ptr(), vector) };
    values[..lanes].copy_from_slice(&padded[..lanes]);
}
