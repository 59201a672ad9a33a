//! Scalar arithmetic of one AllInOneBlock coupling block, forward and inverse.
//!
//! Every kernel has the signature of [`BlockForwardFn`]: the prepared block, the affine
//! clamp, the block input, the block output and two work buffers (`hidden`, sized to the
//! subnet width, and `subnet_out`, sized to `2 * d2`). [`Flow`](super::Flow) guarantees
//! all lengths before it calls a kernel, so a vectorised kernel with the same signature can
//! replace the scalar one without repeating the checks.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

use super::Block;

/// Signature shared by the block kernels: `(block, clamp, input, output, hidden,
/// subnet_out) -> log|det J|` of the block.
pub type BlockForwardFn<T> = fn(&Block<'_>, T, &[T], &mut [T], &mut [T], &mut [T]) -> T;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// Floating-point type a flow can be evaluated in: `f32` at run time, `f64` for reference
/// checks. The parameters are always `f32` and are widened on use.
pub trait Element:
    sealed::Sealed
    + Copy
    + Debug
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    const ZERO: Self;

    fn from_f32(value: f32) -> Self;
    /// Rounds an f64 constant to this precision.
    fn from_f64(value: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
    fn is_finite(self) -> bool;
    /// Picks the precomputed per-block values of this precision.
    fn pick<'s>(single: &'s [f32], double: &'s [f64]) -> &'s [Self];
    /// Picks the precomputed per-block scalar of this precision.
    fn pick_scalar(single: f32, double: f64) -> Self;
    /// Returns the block kernel [`Flow::forward`](super::Flow::forward) runs in this
    /// precision: the one [`forward_kernel_f32`](super::forward_kernel_f32) picks for f32,
    /// the scalar [`block_forward`] for f64.
    fn default_forward_kernel() -> BlockForwardFn<Self>;
}

impl Element for f32 {
    const ZERO: Self = 0.0;

    fn from_f32(value: f32) -> Self {
        value
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn pick<'s>(single: &'s [f32], _double: &'s [f64]) -> &'s [Self] {
        single
    }
    fn pick_scalar(single: f32, _double: f64) -> Self {
        single
    }
    fn default_forward_kernel() -> BlockForwardFn<Self> {
        super::forward_kernel_f32().kernel()
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;

    fn from_f32(value: f32) -> Self {
        f64::from(value)
    }
    fn from_f64(value: f64) -> Self {
        value
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn pick<'s>(_single: &'s [f32], double: &'s [f64]) -> &'s [Self] {
        double
    }
    fn pick_scalar(_single: f32, double: f64) -> Self {
        double
    }
    fn default_forward_kernel() -> BlockForwardFn<Self> {
        block_forward::<f64>
    }
}

/// FrEIA multiplies the subnet output by this factor before splitting it into log-scale
/// and shift (`AllInOneBlock._affine`, FrEIA 0.2).
pub(super) const SUBNET_OUTPUT_FACTOR: f64 = 0.1;

/// Evaluates the subnet `Linear(d1, hidden) -> ReLU -> Linear(hidden, 2 * d2)` on `x1`
/// and writes `0.1 * output` into `subnet_out`.
fn evaluate_subnet<T: Element>(
    block: &Block<'_>,
    x1: &[T],
    hidden: &mut [T],
    subnet_out: &mut [T],
) {
    let d1 = x1.len();
    for (h, value) in hidden.iter_mut().enumerate() {
        let row = &block.subnet_0_weight[h * d1..(h + 1) * d1];
        let mut sum = T::from_f32(block.subnet_0_bias[h]);
        for (&w, &x) in row.iter().zip(x1) {
            sum += T::from_f32(w) * x;
        }
        *value = if sum > T::ZERO { sum } else { T::ZERO };
    }

    let width = hidden.len();
    let factor = T::from_f64(SUBNET_OUTPUT_FACTOR);
    for (o, value) in subnet_out.iter_mut().enumerate() {
        let row = &block.subnet_2_weight[o * width..(o + 1) * width];
        let mut sum = T::from_f32(block.subnet_2_bias[o]);
        for (&w, &h) in row.iter().zip(hidden.iter()) {
            sum += T::from_f32(w) * h;
        }
        *value = sum * factor;
    }
}

/// Runs one block forward and returns its log|det J|.
///
/// The affine coupling leaves `x1 = input[..d1]` unchanged and maps
/// `x2 = input[d1..]` to `x2 * exp(s) + t` with `s = clamp * tanh(a[..d2])`,
/// `t = a[d2..]` and `a = 0.1 * subnet(x1)`. The global affine then maps every value `v`
/// to `v * scale + offset`, and the permutation writes `output[i] = v[permutation[i]]`.
pub fn block_forward<T: Element>(
    block: &Block<'_>,
    clamp: T,
    input: &[T],
    output: &mut [T],
    hidden: &mut [T],
    subnet_out: &mut [T],
) -> T {
    let d1 = block.d1();
    let d2 = block.d2();
    evaluate_subnet(block, &input[..d1], hidden, subnet_out);

    // The coupled half goes into subnet_out[d2..], over the shift it no longer needs.
    let mut log_det = T::pick_scalar(block.log_scale_sum as f32, block.log_scale_sum);
    let (log_scales, shifts) = subnet_out.split_at_mut(d2);
    for ((log_scale, shift), &x2) in log_scales
        .iter_mut()
        .zip(shifts.iter_mut())
        .zip(&input[d1..])
    {
        let s = clamp * log_scale.tanh();
        *log_scale = s;
        log_det += s;
        *shift = x2 * s.exp() + *shift;
    }

    let scale = T::pick(&block.scale_f32, &block.scale_f64);
    for (out, &p) in output.iter_mut().zip(block.permutation.iter()) {
        let p = p as usize;
        let y = if p < d1 { input[p] } else { shifts[p - d1] };
        *out = y * scale[p] + T::from_f32(block.global_offset[p]);
    }
    log_det
}

/// Inverts [`block_forward`]: maps a block output back to its input and returns the
/// log|det J| of the inverse (the negative of the forward value).
pub fn block_inverse<T: Element>(
    block: &Block<'_>,
    clamp: T,
    input: &[T],
    output: &mut [T],
    hidden: &mut [T],
    subnet_out: &mut [T],
) -> T {
    let d1 = block.d1();
    let scale = T::pick(&block.scale_f32, &block.scale_f64);

    // Undo the permutation and the global affine: v[permutation[i]] = input[i].
    for (&value, &p) in input.iter().zip(block.permutation.iter()) {
        let p = p as usize;
        output[p] = (value - T::from_f32(block.global_offset[p])) / scale[p];
    }

    let (x1, x2) = output.split_at_mut(d1);
    evaluate_subnet(block, x1, hidden, subnet_out);
    let d2 = block.d2();
    let mut log_det = -T::pick_scalar(block.log_scale_sum as f32, block.log_scale_sum);
    let (log_scales, shifts) = subnet_out.split_at(d2);
    for ((value, &a), &shift) in x2.iter_mut().zip(log_scales).zip(shifts) {
        let s = clamp * a.tanh();
        log_det += -s;
        *value = (*value - shift) * (-s).exp();
    }
    log_det
}
