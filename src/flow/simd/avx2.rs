//! Coupling-block forward kernel for x86_64 with AVX2 and FMA, 8 f32 lanes.

use std::arch::x86_64::*;

use super::{
    EXP_INPUT_MAX, EXP_INPUT_MIN, EXP_POLYNOMIAL, LN2_HIGH, LN2_LOW, PACKED_LANES, TANH_POLYNOMIAL,
    TANH_SATURATION, TANH_SMALL,
};
use crate::flow::kernel::{block_forward, SUBNET_OUTPUT_FACTOR};
use crate::flow::Block;

const LANES: usize = 8;

/// `MASK_TABLE[8 - n..16 - n]` enables the first `n` lanes of a masked load or store.
const MASK_TABLE: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// Runs one block forward with AVX2 and FMA and returns its log|det J|. It is a drop-in
/// replacement for [`block_forward::<f32>`](block_forward).
///
/// Falls back to the scalar kernel when the CPU lacks AVX2 or FMA, when the buffer lengths
/// do not match the block (as [`Flow`](crate::flow::Flow) guarantees they do), or when the
/// dimension exceeds `i32::MAX` (the gather indices are 32-bit).
pub fn avx2_fma_coupling_forward_f32(
    block: &Block<'_>,
    clamp: f32,
    input: &[f32],
    output: &mut [f32],
    hidden: &mut [f32],
    subnet_out: &mut [f32],
) -> f32 {
    let supported = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let lengths_match = super::buffers_match(block, input, output, hidden, subnet_out);
    if !(supported && lengths_match && block.dim <= i32::MAX as usize) {
        return block_forward::<f32>(block, clamp, input, output, hidden, subnet_out);
    }
    // SAFETY: the CPU supports AVX2 and FMA (checked above), the only requirement
    // `#[target_feature]` adds.
    unsafe { coupling_forward(block, clamp, input, output, hidden, subnet_out) }
}

/// Runs the kernel body. It expects the buffer lengths and dimension checked by
/// [`avx2_fma_coupling_forward_f32`], and panics on other lengths but stays memory-safe.
#[target_feature(enable = "avx2,fma")]
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

    // Second Linear fused with the affine coupling, one packed chunk of 8 coupled values at
    // a time. The coupled values overwrite the shift half of `subnet_out`.
    let shifts = &mut subnet_out[d2..];
    let chunk_len = (1 + hidden.len()) * 2 * PACKED_LANES;
    let factor = _mm256_set1_ps(SUBNET_OUTPUT_FACTOR as f32);
    let clamp = _mm256_set1_ps(clamp);
    let mut log_det = _mm256_setzero_ps();
    for (c, packed) in block.packed_subnet_2.chunks_exact(chunk_len).enumerate() {
        let start = c * LANES;
        let lanes = LANES.min(d2 - start);
        let mut log_scale = load(&packed[..LANES]);
        let mut shift = load(&packed[LANES..2 * LANES]);
        for (h, weights) in packed[2 * LANES..].chunks_exact(2 * LANES).enumerate() {
            let unit = _mm256_set1_ps(hidden[h]);
            log_scale = _mm256_fmadd_ps(load(&weights[..LANES]), unit, log_scale);
            shift = _mm256_fmadd_ps(load(&weights[LANES..]), unit, shift);
        }
        // Padding lanes have zero weights and bias, so their s is 0 and adds nothing.
        let s = _mm256_mul_ps(clamp, tanh(_mm256_mul_ps(log_scale, factor)));
        log_det = _mm256_add_ps(log_det, s);
        let x = load_partial(&x2[start..], lanes);
        let y = _mm256_fmadd_ps(x, exp(s), _mm256_mul_ps(shift, factor));
        store_partial(&mut shifts[start..], lanes, y);
    }
    let log_det = block.log_scale_sum as f32 + horizontal_sum(log_det);

    permute_and_scale(block, input, shifts, output);
    log_det
}

/// Writes `output[i] = v[p] * scale[p] + offset[p]` with `p = permutation[i]`, where `v` is
/// `x1` followed by the coupled values.
#[target_feature(enable = "avx2,fma")]
fn permute_and_scale(block: &Block<'_>, x1: &[f32], coupled: &[f32], output: &mut [f32]) {
    let d1 = block.d1();
    let dim = output.len();
    assert!(
        block.permutation.len() == dim
            && block.permuted_scale_f32.len() == dim
            && block.permuted_offset_f32.len() == dim
            && x1.len() >= d1
            && coupled.len() == dim - d1,
        "buffer lengths do not match the block"
    );
    let split = _mm256_set1_epi32(d1 as i32);
    let zero = _mm256_setzero_ps();
    let mut start = 0;
    while start < dim {
        let lanes = LANES.min(dim - start);
        let lane_mask = mask(lanes);
        // SAFETY: `lane_mask` enables only the first `lanes` elements, which lie inside
        // `permutation[start..]`. Disabled lanes are not read.
        let index = unsafe {
            _mm256_maskload_epi32(block.permutation[start..].as_ptr().cast::<i32>(), lane_mask)
        };
        // Flow::new has checked that every index is below dim <= i32::MAX, so the signed
        // comparison is exact.
        let in_x1 = _mm256_and_si256(_mm256_cmpgt_epi32(split, index), lane_mask);
        let in_coupled = _mm256_andnot_si256(in_x1, lane_mask);
        // SAFETY: lanes enabled in `in_x1` have 0 <= index < d1 <= x1.len(), and lanes
        // enabled in `in_coupled` have d1 <= index < dim, so index - d1 < coupled.len().
        // A masked gather does not read the disabled lanes.
        let values = unsafe {
            let from_x1 =
                _mm256_mask_i32gather_ps::<4>(zero, x1.as_ptr(), index, _mm256_castsi256_ps(in_x1));
            _mm256_mask_i32gather_ps::<4>(
                from_x1,
                coupled.as_ptr(),
                _mm256_sub_epi32(index, split),
                _mm256_castsi256_ps(in_coupled),
            )
        };
        let scale = load_partial(&block.permuted_scale_f32[start..], lanes);
        let offset = load_partial(&block.permuted_offset_f32[start..], lanes);
        store_partial(
            &mut output[start..],
            lanes,
            _mm256_fmadd_ps(values, scale, offset),
        );
        start += LANES;
    }
}

/// Dot product with four accumulators, so that consecutive FMAs do not wait on each other.
#[target_feature(enable = "avx2,fma")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut sums = [_mm256_setzero_ps(); 4];
    let mut a_blocks = a.chunks_exact(4 * LANES);
    let mut b_blocks = b.chunks_exact(4 * LANES);
    for (a_block, b_block) in (&mut a_blocks).zip(&mut b_blocks) {
        for (k, sum) in sums.iter_mut().enumerate() {
            let range = k * LANES..(k + 1) * LANES;
            *sum = _mm256_fmadd_ps(load(&a_block[range.clone()]), load(&b_block[range]), *sum);
        }
    }
    let (a_rest, b_rest) = (a_blocks.remainder(), b_blocks.remainder());
    for (k, start) in (0..a_rest.len()).step_by(LANES).enumerate() {
        let lanes = LANES.min(a_rest.len() - start);
        let product = _mm256_mul_ps(
            load_partial(&a_rest[start..], lanes),
            load_partial(&b_rest[start..], lanes),
        );
        sums[k] = _mm256_add_ps(sums[k], product);
    }
    let sum = _mm256_add_ps(
        _mm256_add_ps(sums[0], sums[1]),
        _mm256_add_ps(sums[2], sums[3]),
    );
    horizontal_sum(sum)
}

/// Cephes `tanhf`: the odd polynomial below [`TANH_SMALL`], `1 - 2 / (exp(2|x|) + 1)` with
/// the sign of `x` above it. NaN stays NaN.
#[target_feature(enable = "avx2,fma")]
fn tanh(x: __m256) -> __m256 {
    let sign_bit = _mm256_set1_ps(-0.0);
    let magnitude = _mm256_andnot_ps(sign_bit, x);

    let square = _mm256_mul_ps(x, x);
    let mut polynomial = _mm256_set1_ps(TANH_POLYNOMIAL[0]);
    for &coefficient in &TANH_POLYNOMIAL[1..] {
        polynomial = _mm256_fmadd_ps(polynomial, square, _mm256_set1_ps(coefficient));
    }
    let small = _mm256_fmadd_ps(_mm256_mul_ps(polynomial, square), x, x);

    // MINPS returns its second operand when either is NaN, so NaN passes through.
    let magnitude_capped = _mm256_min_ps(_mm256_set1_ps(TANH_SATURATION), magnitude);
    let one = _mm256_set1_ps(1.0);
    let exp_2x = exp(_mm256_add_ps(magnitude_capped, magnitude_capped));
    let large = _mm256_sub_ps(
        one,
        _mm256_div_ps(_mm256_set1_ps(2.0), _mm256_add_ps(exp_2x, one)),
    );
    let large = _mm256_or_ps(large, _mm256_and_ps(sign_bit, x));

    let is_small = _mm256_cmp_ps::<_CMP_LT_OQ>(magnitude, _mm256_set1_ps(TANH_SMALL));
    _mm256_blendv_ps(large, small, is_small)
}

/// Cephes `expf`: `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and a polynomial for
/// `exp(r)`. Overflows to infinity above about 88.72 and underflows to 0 below about
/// -103.97, as libm does. NaN stays NaN.
#[target_feature(enable = "avx2,fma")]
fn exp(x: __m256) -> __m256 {
    // MAXPS and MINPS return their second operand when either is NaN, so NaN passes through.
    let x = _mm256_max_ps(_mm256_set1_ps(EXP_INPUT_MIN), x);
    let x = _mm256_min_ps(_mm256_set1_ps(EXP_INPUT_MAX), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HIGH), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LOW), r);

    let mut polynomial = _mm256_set1_ps(EXP_POLYNOMIAL[0]);
    for &coefficient in &EXP_POLYNOMIAL[1..] {
        polynomial = _mm256_fmadd_ps(polynomial, r, _mm256_set1_ps(coefficient));
    }
    let r_squared = _mm256_mul_ps(r, r);
    let exp_r = _mm256_add_ps(
        _mm256_fmadd_ps(polynomial, r_squared, r),
        _mm256_set1_ps(1.0),
    );

    // n lies in [-150, 129], so 2^n is applied as 2^(n / 2) * 2^(n - n / 2): both factors
    // are normal floats, and the product overflows or underflows like the exact result.
    let n = _mm256_cvtps_epi32(n);
    let half = _mm256_srai_epi32::<1>(n);
    let rest = _mm256_sub_epi32(n, half);
    exp_r_times_power_of_two(exp_r, half, rest)
}

#[target_feature(enable = "avx2,fma")]
fn exp_r_times_power_of_two(value: __m256, first: __m256i, second: __m256i) -> __m256 {
    let bias = _mm256_set1_epi32(127);
    let first = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(first, bias)));
    let second = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(second, bias)));
    _mm256_mul_ps(_mm256_mul_ps(value, first), second)
}

#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(v: __m256) -> f32 {
    let sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    let sum = _mm_add_ss(sum, _mm_shuffle_ps::<0b01>(sum, sum));
    _mm_cvtss_f32(sum)
}

/// Mask enabling the first `lanes` (0 to 8) lanes.
#[target_feature(enable = "avx2,fma")]
fn mask(lanes: usize) -> __m256i {
    let table = &MASK_TABLE[LANES - lanes..2 * LANES - lanes];
    // SAFETY: `table` contains exactly 8 i32 values.
    unsafe { _mm256_loadu_si256(table.as_ptr().cast::<__m256i>()) }
}

/// Loads `values[..8]`.
#[target_feature(enable = "avx2,fma")]
fn load(values: &[f32]) -> __m256 {
    let values = &values[..LANES];
    // SAFETY: `values` contains exactly 8 floats.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

/// Loads `values[..lanes]` and zeroes the remaining lanes.
#[target_feature(enable = "avx2,fma")]
fn load_partial(values: &[f32], lanes: usize) -> __m256 {
    if lanes == LANES {
        return load(values);
    }
    let values = &values[..lanes];
    // SAFETY: the mask enables only the first `values.len()` lanes, which lie inside
    // `values`. Disabled lanes are not read.
    unsafe { _mm256_maskload_ps(values.as_ptr(), mask(values.len())) }
}

/// Stores the first `lanes` lanes of `vector` into `values[..lanes]`.
#[target_feature(enable = "avx2,fma")]
fn store_partial(values: &mut [f32], lanes: usize, vector: __m256) {
    let values = &mut values[..lanes];
    if lanes == LANES {
        // SAFETY: `values` contains exactly 8 floats.
        unsafe { _mm256_storeu_ps(values.as_mut_ptr(), vector) };
    } else {
        // SAFETY: the mask enables only the first `values.len()` lanes, which lie inside
        // `values`. Disabled lanes are not written.
        unsafe { _mm256_maskstore_ps(values.as_mut_ptr(), mask(values.len()), vector) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Applies `function` to 8 values at a time.
    fn map_lanes(values: &[f32], function: unsafe fn(__m256) -> __m256) -> Vec<f32> {
        let mut results = Vec::with_capacity(values.len());
        for chunk in values.chunks(LANES) {
            let mut lanes = [0.0f32; LANES];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut out = [0.0f32; LANES];
            // SAFETY: the caller has checked that the CPU supports AVX2 and FMA, and both
            // arrays contain 8 floats.
            unsafe {
                let vector = function(_mm256_loadu_ps(lanes.as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), vector);
            }
            results.extend_from_slice(&out[..chunk.len()]);
        }
        results
    }

    /// Returns the largest relative error against f64 over `values`, in units of
    /// `f32::EPSILON` (2^-23), relative to max(|exact|, f32::MIN_POSITIVE).
    fn max_relative_error(values: &[f32], results: &[f32], exact: fn(f64) -> f64) -> f64 {
        values
            .iter()
            .zip(results)
            .map(|(&x, &y)| {
                let expected = exact(f64::from(x));
                let error = (f64::from(y) - expected).abs();
                error / expected.abs().max(f64::from(f32::MIN_POSITIVE)) / f64::from(f32::EPSILON)
            })
            .fold(0.0, f64::max)
    }

    fn sweep(low: f32, high: f32, count: usize) -> Vec<f32> {
        (0..=count)
            .map(|i| low + (high - low) * (i as f32 / count as f32))
            .collect()
    }

    #[test]
    fn tanh_approximation_error() {
        if !supported() {
            return;
        }
        let mut values = sweep(-12.0, 12.0, 200_000);
        values.extend(sweep(-1e-3, 1e-3, 10_000));
        values.extend([
            0.0,
            -0.0,
            0.625,
            -0.625,
            9.0,
            9.5,
            10.0,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
        ]);
        let results = map_lanes(&values, tanh);
        let error = max_relative_error(&values, &results, f64::tanh);
        eprintln!("max tanh error {error} ulp");
        // Measured 1.13 (1.3e-7 relative) on this sweep.
        assert!(error < 4.0, "max tanh error {error} ulp");
        assert_eq!(map_lanes(&[f32::INFINITY], tanh), [1.0]);
        assert!(map_lanes(&[f32::NAN], tanh)[0].is_nan());
    }

    #[test]
    fn exp_approximation_error() {
        if !supported() {
            return;
        }
        let mut values = sweep(-87.0, 88.7, 400_000);
        values.extend(sweep(-2.5, 2.5, 50_000));
        let results = map_lanes(&values, exp);
        let error = max_relative_error(&values, &results, f64::exp);
        eprintln!("max exp error {error} ulp");
        // Measured 0.68 (8.1e-8 relative) on this sweep.
        assert!(error < 4.0, "max exp error {error} ulp");

        let edges = [
            88.8f32,
            1e30,
            f32::INFINITY,
            -104.5,
            -1e30,
            f32::NEG_INFINITY,
        ];
        assert_eq!(
            map_lanes(&edges, exp),
            [f32::INFINITY, f32::INFINITY, f32::INFINITY, 0.0, 0.0, 0.0]
        );
        assert!(map_lanes(&[f32::NAN], exp)[0].is_nan());
        // Subnormal results keep their magnitude within the subnormal spacing.
        let subnormal = map_lanes(&[-100.0], exp)[0];
        assert!(
            (f64::from(subnormal) - (-100.0f64).exp()).abs() < 2e-45,
            "{subnormal}"
        );
    }
}
