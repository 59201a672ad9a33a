//! Checks the vectorised f32 block kernels against the scalar kernel and an f64 evaluation,
//! the kernel dispatcher, the FrEIA reference vectors through the dispatched kernel, and
//! flow files with F16 subnet weights.
//!
//! Kernels are compared block by block against an error bound derived from the standard
//! floating-point bounds: a sum of `n` products in any order, with or without FMA, is off by
//! at most `n * u * sum(|terms|)` with unit roundoff `u = 2^-24`. Both kernels must stay
//! within that bound of the f64 result, so they differ by at most twice the bound.

use std::borrow::Cow;
use std::collections::HashMap;

use daain::flow::{
    available_forward_kernels_f32, block_forward, forward_kernel_f32, params_from_safetensors,
    select_forward_kernel_f32, Block, BlockForwardFn, BlockParams, Flow, FlowError, ForwardKernel,
    FLOW_KERNEL_ENV, FREIA_DEFAULT_CLAMP,
};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// Unit roundoff of f32.
const U: f64 = f32::EPSILON as f64 / 2.0;
/// Relative error allowed for tanh and exp: 4 * 2^-23. The AVX2 approximations measure at
/// most 1.13 * 2^-23 (unit tests in src/flow/simd/avx2.rs). The scalar kernel, which uses
/// libm, is held to the same bound by `check_kernels`.
const APPROXIMATION: f64 = 8.0 * U;
/// Factor on the error bound for the second-order terms it leaves out.
const SAFETY_MARGIN: f64 = 2.0;

/// Owned parameters of one block.
#[derive(Clone)]
struct OwnedBlock {
    permutation: Vec<u32>,
    global_scale: Vec<f32>,
    global_offset: Vec<f32>,
    subnet_0_weight: Vec<f32>,
    subnet_0_bias: Vec<f32>,
    subnet_2_weight: Vec<f32>,
    subnet_2_bias: Vec<f32>,
}

impl OwnedBlock {
    /// A block with weights uniform in `[-weight_scale, weight_scale]`, raw global scales
    /// in `[-4, 4]`, offsets in `[-2, 2]` and a random permutation.
    fn random(dim: usize, hidden: usize, weight_scale: f32, rng: &mut ChaCha8Rng) -> Self {
        let d1 = dim - dim / 2;
        let d2 = dim / 2;
        let mut uniform = |len: usize, scale: f32| -> Vec<f32> {
            (0..len).map(|_| rng.gen_range(-scale..=scale)).collect()
        };
        let global_scale = uniform(dim, 4.0);
        let global_offset = uniform(dim, 2.0);
        let subnet_0_weight = uniform(hidden * d1, weight_scale);
        let subnet_0_bias = uniform(hidden, weight_scale);
        let subnet_2_weight = uniform(2 * d2 * hidden, weight_scale);
        let subnet_2_bias = uniform(2 * d2, weight_scale);
        let mut permutation: Vec<u32> = (0..dim as u32).collect();
        permutation.shuffle(rng);
        Self {
            permutation,
            global_scale,
            global_offset,
            subnet_0_weight,
            subnet_0_bias,
            subnet_2_weight,
            subnet_2_bias,
        }
    }

    fn params(&self) -> BlockParams<'_> {
        BlockParams {
            permutation: &self.permutation,
            global_scale: &self.global_scale,
            global_offset: &self.global_offset,
            subnet_0_weight: &self.subnet_0_weight,
            subnet_0_bias: &self.subnet_0_bias,
            subnet_2_weight: &self.subnet_2_weight,
            subnet_2_bias: &self.subnet_2_bias,
        }
    }

    /// The same block with its subnet tensors rounded to f16.
    fn rounded_to_f16(&self) -> Self {
        let round = |values: &[f32]| -> Vec<f32> {
            values
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect()
        };
        Self {
            subnet_0_weight: round(&self.subnet_0_weight),
            subnet_0_bias: round(&self.subnet_0_bias),
            subnet_2_weight: round(&self.subnet_2_weight),
            subnet_2_bias: round(&self.subnet_2_bias),
            ..self.clone()
        }
    }
}

/// Result of one block kernel call.
struct BlockOutput {
    z: Vec<f32>,
    log_det: f32,
}

fn run_block(kernel: BlockForwardFn<f32>, block: &Block<'_>, clamp: f32, x: &[f32]) -> BlockOutput {
    let hidden = block.params().subnet_0_bias.len();
    let mut z = vec![f32::NAN; x.len()];
    let mut hidden_buffer = vec![0.0; hidden];
    let mut subnet_out = vec![0.0; 2 * block.d2()];
    let log_det = kernel(block, clamp, x, &mut z, &mut hidden_buffer, &mut subnet_out);
    BlockOutput { z, log_det }
}

/// Exact (f64) block output and the error each f32 kernel may have against it.
struct Reference {
    z: Vec<f64>,
    z_bound: Vec<f64>,
    log_det: f64,
    log_det_bound: f64,
}

/// Evaluates `block` in f64 and bounds the error of an f32 evaluation whose subnet weights
/// and biases may differ from the block's by `weight_error` relative plus
/// `weight_error_absolute` (f16 rounding), on top of f32 rounding.
fn reference(
    block: &Block<'_>,
    clamp: f32,
    x: &[f32],
    weight_error: f64,
    weight_error_absolute: f64,
) -> Reference {
    let params = block.params();
    let d1 = block.d1();
    let d2 = block.d2();
    let hidden = params.subnet_0_bias.len();
    let clamp = f64::from(clamp);
    let x: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let w0 = |h: usize, j: usize| f64::from(params.subnet_0_weight[h * d1 + j]);
    let w2 = |o: usize, h: usize| f64::from(params.subnet_2_weight[o * hidden + h]);

    // First Linear and ReLU: value, and error bound of the f32 value.
    let x1_abs_sum: f64 = x[..d1].iter().map(|v| v.abs()).sum();
    let gamma_1 = (d1 + 2) as f64 * U * 1.01;
    let mut units = vec![0.0; hidden];
    let mut unit_errors = vec![0.0; hidden];
    for h in 0..hidden {
        let bias = f64::from(params.subnet_0_bias[h]);
        let sum = bias + (0..d1).map(|j| w0(h, j) * x[j]).sum::<f64>();
        let magnitude = bias.abs() + (0..d1).map(|j| (w0(h, j) * x[j]).abs()).sum::<f64>();
        units[h] = sum.max(0.0);
        unit_errors[h] =
            (gamma_1 + weight_error) * magnitude + weight_error_absolute * (1.0 + x1_abs_sum);
    }

    // Second Linear times 0.1.
    let unit_abs_sum: f64 = units.iter().zip(&unit_errors).map(|(u, e)| u + e).sum();
    let gamma_2 = (hidden + 3) as f64 * U * 1.01;
    let mut subnet_out = vec![0.0; 2 * d2];
    let mut subnet_errors = vec![0.0; 2 * d2];
    for o in 0..2 * d2 {
        let bias = f64::from(params.subnet_2_bias[o]);
        let sum = bias + (0..hidden).map(|h| w2(o, h) * units[h]).sum::<f64>();
        let magnitude = bias.abs()
            + (0..hidden)
                .map(|h| (w2(o, h) * units[h]).abs())
                .sum::<f64>();
        let propagated: f64 = (0..hidden)
            .map(|h| w2(o, h).abs() * (1.0 + weight_error) * unit_errors[h])
            .sum();
        subnet_out[o] = 0.1 * sum;
        subnet_errors[o] = 0.1
            * ((gamma_2 + weight_error) * magnitude
                + propagated
                + weight_error_absolute * (1.0 + unit_abs_sum))
            + 2.0 * U * (0.1 * sum).abs();
    }

    // Coupling: y = x2 * exp(s) + t with s = clamp * tanh(a).
    let mut y = x.clone();
    let mut y_errors = vec![0.0; x.len()];
    let mut log_det = block.log_scale_sum();
    let mut log_det_error = 0.0;
    let mut s_abs_sum = block.log_scale_sum().abs();
    for i in 0..d2 {
        let s = clamp * subnet_out[i].tanh();
        // tanh is 1-Lipschitz and bounded by 1, so its error is at most min(da, 2).
        let s_error = clamp * (subnet_errors[i].min(2.0) + APPROXIMATION) + 2.0 * U * s.abs();
        let e = s.exp();
        let e_error = e * (s_error.exp_m1() + APPROXIMATION + 2.0 * U);
        let x2 = x[d1 + i];
        let t = subnet_out[d2 + i];
        y[d1 + i] = x2 * e + t;
        y_errors[d1 + i] =
            x2.abs() * e_error + subnet_errors[d2 + i] + 2.0 * U * ((x2 * e).abs() + t.abs());
        log_det += s;
        log_det_error += s_error;
        s_abs_sum += s.abs();
    }
    log_det_error += (d2 + 2) as f64 * U * 1.01 * s_abs_sum;

    // Global affine and permutation. The f32 scale is the f64 one rounded.
    let scale = block.scale();
    let offset = params.global_offset;
    let mut z = Vec::with_capacity(x.len());
    let mut z_bound = Vec::with_capacity(x.len());
    for &p in params.permutation {
        let p = p as usize;
        let offset = f64::from(offset[p]);
        z.push(y[p] * scale[p] + offset);
        let rounding = 3.0 * U * ((y[p] * scale[p]).abs() + offset.abs());
        z_bound.push(SAFETY_MARGIN * (scale[p] * y_errors[p] + rounding));
    }
    Reference {
        z,
        z_bound,
        log_det,
        log_det_bound: SAFETY_MARGIN * log_det_error,
    }
}

/// Asserts that `actual` lies within `tolerance_factor` times the reference bound.
fn assert_within(label: &str, actual: &BlockOutput, reference: &Reference, tolerance_factor: f64) {
    for (i, ((&z, &expected), &bound)) in actual
        .z
        .iter()
        .zip(&reference.z)
        .zip(&reference.z_bound)
        .enumerate()
    {
        let error = (f64::from(z) - expected).abs();
        assert!(
            error <= tolerance_factor * bound,
            "{label}: z[{i}] = {z}, f64 {expected}, error {error} > bound {}",
            tolerance_factor * bound
        );
    }
    let error = (f64::from(actual.log_det) - reference.log_det).abs();
    assert!(
        error <= tolerance_factor * reference.log_det_bound,
        "{label}: log_det = {}, f64 {}, error {error} > bound {}",
        actual.log_det,
        reference.log_det,
        tolerance_factor * reference.log_det_bound
    );
}

/// The vector kernels this CPU supports, without the scalar one.
fn vector_kernels() -> Vec<ForwardKernel> {
    available_forward_kernels_f32()
        .into_iter()
        .filter(|kernel| kernel.name() != "scalar")
        .collect()
}

/// Compares every vector kernel with the scalar kernel and the f64 evaluation on one block.
fn check_kernels(block: &Block<'_>, clamp: f32, x: &[f32]) {
    let reference = reference(block, clamp, x, 0.0, 0.0);
    let scalar = run_block(block_forward::<f32>, block, clamp, x);
    assert_within("scalar vs f64", &scalar, &reference, 1.0);
    for kernel in vector_kernels() {
        let vector = run_block(kernel.kernel(), block, clamp, x);
        assert_within(
            &format!("{} vs f64", kernel.name()),
            &vector,
            &reference,
            1.0,
        );
        // Both lie within the bound of the f64 result, so within twice it of each other.
        let scalar_as_reference = Reference {
            z: scalar.z.iter().map(|&v| f64::from(v)).collect(),
            z_bound: reference.z_bound.clone(),
            log_det: f64::from(scalar.log_det),
            log_det_bound: reference.log_det_bound,
        };
        assert_within(
            &format!("{} vs scalar", kernel.name()),
            &vector,
            &scalar_as_reference,
            2.0,
        );
    }
}

/// Input of `dim` values of magnitude up to `scale`, with every `zero_every`-th value zero
/// and, when `negative` is set, no positive values.
fn random_input(
    dim: usize,
    scale: f32,
    zero_every: usize,
    negative: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    (0..dim)
        .map(|i| {
            if zero_every > 0 && i % zero_every == 0 {
                return 0.0;
            }
            let value: f32 = rng.gen_range(-scale..=scale);
            if negative {
                -value.abs()
            } else {
                value
            }
        })
        .collect()
}

fn dimension() -> impl Strategy<Value = usize> {
    prop_oneof![2usize..=70, 1990usize..=2030]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn vector_kernels_match_scalar(
        dim in dimension(),
        hidden in 1usize..=16,
        seed in any::<u64>(),
        weight_scale in prop::sample::select(vec![0.01f32, 0.3, 3.0]),
        input_scale in prop::sample::select(vec![0.0f32, 1e-3, 1.0, 100.0, 1e5]),
        zero_every in prop::sample::select(vec![0usize, 2, 7]),
        negative in any::<bool>(),
        clamp in prop::sample::select(vec![0.5f32, FREIA_DEFAULT_CLAMP, 5.0]),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let block = OwnedBlock::random(dim, hidden, weight_scale, &mut rng);
        let flow = Flow::new(dim, hidden, clamp, vec![block.params()]).unwrap();
        let x = random_input(dim, input_scale, zero_every, negative, &mut rng);
        check_kernels(&flow.blocks()[0], clamp, &x);
    }
}

/// Builds a one-block flow and checks the kernels on `x`.
fn check_one_block(block: &OwnedBlock, clamp: f32, x: &[f32]) {
    let dim = x.len();
    let hidden = block.subnet_0_bias.len();
    let flow = Flow::new(dim, hidden, clamp, vec![block.params()]).unwrap();
    check_kernels(&flow.blocks()[0], clamp, x);
}

#[test]
fn smallest_dimension() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let block = OwnedBlock::random(2, 1, 0.5, &mut rng);
    check_one_block(&block, 2.0, &[0.7, -1.3]);
}

#[test]
fn every_tail_length() {
    // d2 = dim / 2 runs through every remainder modulo 8, and d1 through every remainder
    // modulo 32 (the dot-product block).
    for dim in 2..=80 {
        let mut rng = ChaCha8Rng::seed_from_u64(dim as u64);
        let block = OwnedBlock::random(dim, 3, 0.5, &mut rng);
        let x = random_input(dim, 2.0, 0, false, &mut rng);
        check_one_block(&block, 2.0, &x);
    }
}

#[test]
fn zero_input_and_weights_give_offset() {
    let dim = 37;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut block = OwnedBlock::random(dim, 4, 0.0, &mut rng);
    block.global_offset = (0..dim).map(|i| i as f32 - 10.0).collect();
    let flow = Flow::new(dim, 4, 2.0, vec![block.params()]).unwrap();
    let x = vec![0.0f32; dim];
    for kernel in available_forward_kernels_f32() {
        let output = run_block(kernel.kernel(), &flow.blocks()[0], 2.0, &x);
        for (i, &z) in output.z.iter().enumerate() {
            let expected = block.global_offset[block.permutation[i] as usize];
            assert_eq!(z, expected, "{}: z[{i}]", kernel.name());
        }
    }
}

#[test]
fn saturated_log_scale_hits_clamp() {
    // Subnet biases of +-1e4 give a = +-1e3, far into tanh saturation: s = +-clamp exactly.
    let dim = 21;
    let d2 = dim / 2;
    let clamp = 1.5;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut block = OwnedBlock::random(dim, 2, 0.0, &mut rng);
    block.global_scale = vec![50.0; dim];
    block.subnet_2_bias = (0..2 * d2)
        .map(|o| {
            if o < d2 && o % 2 == 0 {
                1e4
            } else if o < d2 {
                -1e4
            } else {
                0.0
            }
        })
        .collect();
    let flow = Flow::new(dim, 2, clamp, vec![block.params()]).unwrap();
    let x: Vec<f32> = (0..dim).map(|i| i as f32 * 0.25 - 2.0).collect();
    let expected_log_det =
        flow.blocks()[0].log_scale_sum() as f32 + if d2 % 2 == 0 { 0.0 } else { clamp };
    for kernel in available_forward_kernels_f32() {
        let output = run_block(kernel.kernel(), &flow.blocks()[0], clamp, &x);
        let error = (output.log_det - expected_log_det).abs();
        assert!(
            error < 1e-4,
            "{}: log_det {}",
            kernel.name(),
            output.log_det
        );
    }
    check_one_block(&block, clamp, &x);
}

#[test]
fn large_inputs_stay_finite() {
    let dim = 2021;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let block = OwnedBlock::random(dim, 10, 0.3, &mut rng);
    let x = random_input(dim, 1e30, 3, false, &mut rng);
    check_one_block(&block, 2.0, &x);
}

#[test]
fn overflow_is_rejected_by_every_kernel() {
    // exp(s) with s = clamp = 100 overflows f32, and so does 3e38 * exp(2).
    let dim = 19;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut block = OwnedBlock::random(dim, 3, 0.0, &mut rng);
    block.global_scale = vec![50.0; dim];
    block.subnet_2_bias = vec![100.0; 2 * (dim / 2)];
    let large_clamp = Flow::new(dim, 3, 100.0, vec![block.params()]).unwrap();
    let mut x = vec![1.0f32; dim];
    for kernel in available_forward_kernels_f32() {
        let mut z = vec![0.0f32; dim];
        let result =
            large_clamp.forward_with(kernel.kernel(), &x, &mut z, &mut large_clamp.scratch());
        assert!(
            matches!(result, Err(FlowError::NonFiniteOutput { .. })),
            "{}: {result:?}",
            kernel.name()
        );
    }
    let default_clamp = Flow::new(dim, 3, 2.0, vec![block.params()]).unwrap();
    x[dim - 1] = 3e38;
    for kernel in available_forward_kernels_f32() {
        let mut z = vec![0.0f32; dim];
        let result =
            default_clamp.forward_with(kernel.kernel(), &x, &mut z, &mut default_clamp.scratch());
        assert!(
            matches!(result, Err(FlowError::NonFiniteOutput { .. })),
            "{}: {result:?}",
            kernel.name()
        );
    }
}

#[test]
fn full_flow_blocks_match_scalar() {
    // Eight blocks at a bundle's size (odd, so that every kernel's tail runs), each checked
    // on the input the scalar chain gives it, so the bound does not have to cover
    // amplification across blocks.
    let (dim, hidden, blocks) = (2021, 10, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let owned: Vec<OwnedBlock> = (0..blocks)
        .map(|_| OwnedBlock::random(dim, hidden, 0.3, &mut rng))
        .collect();
    let flow = Flow::new(
        dim,
        hidden,
        2.0,
        owned.iter().map(OwnedBlock::params).collect(),
    )
    .unwrap();
    let mut x = random_input(dim, 1.0, 0, false, &mut rng);
    for block in flow.blocks() {
        check_kernels(block, 2.0, &x);
        x = run_block(block_forward::<f32>, block, 2.0, &x).z;
    }
}

#[test]
fn dispatcher_picks_fastest_kernel() {
    let fastest = select_forward_kernel_f32(None).unwrap();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            assert_eq!(fastest.name(), "avx2+fma");
        } else {
            eprintln!("skipped: this CPU lacks AVX2 or FMA");
            assert_eq!(fastest.name(), "scalar");
        }
    }
    // NEON is part of every aarch64 Linux target (the compiler enables it by default), so
    // no aarch64 CPU this crate runs on lacks it and the NEON kernel must be chosen.
    #[cfg(target_arch = "aarch64")]
    {
        assert!(cfg!(target_feature = "neon"));
        assert!(std::arch::is_aarch64_feature_detected!("neon"));
        assert_eq!(fastest.name(), "neon");
    }
    assert_eq!(
        select_forward_kernel_f32(Some("auto")).unwrap().name(),
        fastest.name()
    );
    assert_eq!(
        select_forward_kernel_f32(Some("")).unwrap().name(),
        fastest.name()
    );
    // Without an override, the cached choice is the fastest kernel.
    if std::env::var_os(FLOW_KERNEL_ENV).is_none() {
        assert_eq!(forward_kernel_f32().name(), fastest.name());
    }
}

#[test]
fn dispatcher_honours_requests() {
    let scalar = select_forward_kernel_f32(Some(" Scalar ")).unwrap();
    assert_eq!(scalar.name(), "scalar");
    let error = select_forward_kernel_f32(Some("avx512")).unwrap_err();
    assert_eq!(error.requested, "avx512");
    assert!(error.available.contains(&"scalar"), "{error}");
    assert!(error.to_string().contains("avx512"), "{error}");
    for kernel in available_forward_kernels_f32() {
        assert_eq!(
            select_forward_kernel_f32(Some(kernel.name()))
                .unwrap()
                .name(),
            kernel.name()
        );
    }
    assert_eq!(
        available_forward_kernels_f32().last().unwrap().name(),
        "scalar"
    );
}

#[test]
fn flow_forward_uses_dispatched_kernel() {
    let (dim, hidden) = (257, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let owned: Vec<OwnedBlock> = (0..3)
        .map(|_| OwnedBlock::random(dim, hidden, 0.3, &mut rng))
        .collect();
    let flow = Flow::new(
        dim,
        hidden,
        2.0,
        owned.iter().map(OwnedBlock::params).collect(),
    )
    .unwrap();
    let x = random_input(dim, 1.0, 0, false, &mut rng);
    let mut scratch = flow.scratch();
    let mut z_default = vec![0.0f32; dim];
    let log_det_default = flow.forward(&x, &mut z_default, &mut scratch).unwrap();
    let mut z_dispatched = vec![0.0f32; dim];
    let log_det_dispatched = flow
        .forward_with(
            forward_kernel_f32().kernel(),
            &x,
            &mut z_dispatched,
            &mut scratch,
        )
        .unwrap();
    assert_eq!(z_default, z_dispatched);
    assert_eq!(log_det_default, log_det_dispatched);
}

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/reference/daain_flow_hbos_reference.safetensors"
);
const REFERENCE_DIM: usize = 257;
const REFERENCE_BLOCKS: usize = 8;
/// Rows 0..24 of `x_test` are inlier-like, rows 24..32 outlier-like.
const REFERENCE_INLIER_ROWS: usize = 24;

/// Reference tensors widened to f64, by name.
fn load_reference() -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(REFERENCE).expect("reference file is readable");
    let file = SafeTensors::deserialize(&bytes).expect("reference file is valid safetensors");
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
                    .collect(),
                Dtype::F64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                other => panic!("reference tensor {name} has unexpected dtype {other:?}"),
            };
            (name, values)
        })
        .collect()
}

fn reference_blocks(reference: &HashMap<String, Vec<f64>>) -> Vec<OwnedBlock> {
    let f32s = |name: String| -> Vec<f32> { reference[&name].iter().map(|&v| v as f32).collect() };
    (0..REFERENCE_BLOCKS)
        .map(|k| {
            let name = |tensor: &str| format!("flow.module_list.{k}.{tensor}");
            let w_perm = &reference[&name("w_perm")];
            let permutation = w_perm
                .chunks_exact(REFERENCE_DIM)
                .map(|row| row.iter().position(|&v| v == 1.0).unwrap() as u32)
                .collect();
            OwnedBlock {
                permutation,
                global_scale: f32s(name("global_scale")),
                global_offset: f32s(name("global_offset")),
                subnet_0_weight: f32s(name("subnet.0.weight")),
                subnet_0_bias: f32s(name("subnet.0.bias")),
                subnet_2_weight: f32s(name("subnet.2.weight")),
                subnet_2_bias: f32s(name("subnet.2.bias")),
            }
        })
        .collect()
}

fn max_abs_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn reference_vectors_through_every_kernel() {
    let reference = load_reference();
    let blocks = reference_blocks(&reference);
    let hidden = blocks[0].subnet_0_bias.len();
    let flow = Flow::new(
        REFERENCE_DIM,
        hidden,
        FREIA_DEFAULT_CLAMP,
        blocks.iter().map(OwnedBlock::params).collect(),
    )
    .unwrap();
    let x: Vec<f32> = reference["x_test"].iter().map(|&v| v as f32).collect();
    let z_f64 = &reference["z_test_f64"];
    let z_freia_f32 = &reference["z_test"];
    let log_det_f64 = &reference["log_jac_det_test_f64"];
    let log_det_freia_f32 = &reference["log_jac_det_test"];
    let rows = x.len() / REFERENCE_DIM;

    let mut kernels = vec![forward_kernel_f32()];
    kernels.extend(available_forward_kernels_f32());
    for kernel in kernels {
        let mut scratch = flow.scratch::<f32>();
        let mut z_row = vec![0.0f32; REFERENCE_DIM];
        let mut z = Vec::with_capacity(x.len());
        let mut log_det = Vec::with_capacity(rows);
        for row in x.chunks_exact(REFERENCE_DIM) {
            let value = flow
                .forward_with(kernel.kernel(), row, &mut z_row, &mut scratch)
                .unwrap();
            z.extend(z_row.iter().map(|&v| f64::from(v)));
            log_det.push(f64::from(value));
        }
        // Same tolerances as tests/reference_vectors.rs: within twice FrEIA's own f32
        // distance from the f64 result per row group, within three times it of FrEIA's f32
        // result.
        let split = REFERENCE_INLIER_ROWS * REFERENCE_DIM;
        for (group, range) in [("inlier", 0..split), ("outlier", split..z.len())] {
            let freia_error =
                max_abs_difference(&z_freia_f32[range.clone()], &z_f64[range.clone()]);
            let error = max_abs_difference(&z[range.clone()], &z_f64[range.clone()]);
            assert!(
                error <= 2.0 * freia_error.max(1e-6),
                "{} {group} rows: max |z - z_f64| = {error}, FrEIA f32 reaches {freia_error}",
                kernel.name()
            );
            let versus_freia = max_abs_difference(&z[range.clone()], &z_freia_f32[range.clone()]);
            assert!(
                versus_freia <= 3.0 * freia_error.max(1e-6),
                "{} {group} rows: max |z - z_freia_f32| = {versus_freia}, FrEIA f32 vs f64 \
                 reaches {freia_error}",
                kernel.name()
            );
        }
        let freia_error = max_abs_difference(log_det_freia_f32, log_det_f64);
        let error = max_abs_difference(&log_det, log_det_f64);
        assert!(
            error <= 2.0 * freia_error.max(1e-5),
            "{}: max |log_det - log_det_f64| = {error}, FrEIA f32 reaches {freia_error}",
            kernel.name()
        );
    }
}

/// Serializes blocks in the flow file layout with the subnet tensors in `subnet_dtype`
/// (F32 or F16).
fn flow_file(blocks: &[OwnedBlock], dim: usize, hidden: usize, subnet_dtype: Dtype) -> Vec<u8> {
    let d1 = dim - dim / 2;
    let d2 = dim / 2;
    let encode = |values: &[f32], dtype: Dtype| -> Vec<u8> {
        match dtype {
            Dtype::F32 => bytemuck::cast_slice(values).to_vec(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            other => panic!("unsupported test dtype {other:?}"),
        }
    };
    let mut named: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, block) in blocks.iter().enumerate() {
        let permutation: Vec<i32> = block.permutation.iter().map(|&p| p as i32).collect();
        let tensors = [
            ("global_scale", &block.global_scale, vec![dim], Dtype::F32),
            ("global_offset", &block.global_offset, vec![dim], Dtype::F32),
            (
                "subnet.0.weight",
                &block.subnet_0_weight,
                vec![hidden, d1],
                subnet_dtype,
            ),
            (
                "subnet.0.bias",
                &block.subnet_0_bias,
                vec![hidden],
                subnet_dtype,
            ),
            (
                "subnet.2.weight",
                &block.subnet_2_weight,
                vec![2 * d2, hidden],
                subnet_dtype,
            ),
            (
                "subnet.2.bias",
                &block.subnet_2_bias,
                vec![2 * d2],
                subnet_dtype,
            ),
        ];
        named.push((
            format!("blocks.{k}.permutation"),
            Dtype::I32,
            vec![dim],
            bytemuck::cast_slice(&permutation).to_vec(),
        ));
        for (tensor, values, shape, dtype) in tensors {
            named.push((
                format!("blocks.{k}.{tensor}"),
                dtype,
                shape,
                encode(values, dtype),
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = named
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, &None).expect("serialization succeeds")
}

/// Copies `bytes` into a buffer aligned to 8 bytes.
fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut storage = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut storage)[..bytes.len()].copy_from_slice(bytes);
    storage
}

#[test]
fn f16_weights_widen_at_load() {
    let (dim, hidden) = (257, 10);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let blocks: Vec<OwnedBlock> = (0..2)
        .map(|_| OwnedBlock::random(dim, hidden, 0.5, &mut rng))
        .collect();
    let f32_file = flow_file(&blocks, dim, hidden, Dtype::F32);
    let f16_file = flow_file(&blocks, dim, hidden, Dtype::F16);
    let f32_storage = aligned(&f32_file);
    let f16_storage = aligned(&f16_file);
    let f32_params =
        params_from_safetensors(&bytemuck::cast_slice(&f32_storage)[..f32_file.len()]).unwrap();
    let f16_params =
        params_from_safetensors(&bytemuck::cast_slice(&f16_storage)[..f16_file.len()]).unwrap();
    assert!(f16_file.len() < f32_file.len());

    for (k, (from_f32, from_f16)) in f32_params.blocks.iter().zip(&f16_params.blocks).enumerate() {
        assert!(
            matches!(from_f32.subnet_0_weight, Cow::Borrowed(_)),
            "block {k}"
        );
        assert!(
            matches!(from_f32.subnet_2_bias, Cow::Borrowed(_)),
            "block {k}"
        );
        assert!(
            matches!(from_f16.subnet_0_weight, Cow::Owned(_)),
            "block {k}"
        );
        assert!(matches!(from_f16.subnet_2_bias, Cow::Owned(_)), "block {k}");
        // Widening f16 to f32 is exact, so the loaded values are the f16-rounded ones.
        let rounded = blocks[k].rounded_to_f16();
        assert_eq!(
            *from_f16.subnet_0_weight,
            rounded.subnet_0_weight[..],
            "block {k}"
        );
        assert_eq!(
            *from_f16.subnet_0_bias,
            rounded.subnet_0_bias[..],
            "block {k}"
        );
        assert_eq!(
            *from_f16.subnet_2_weight,
            rounded.subnet_2_weight[..],
            "block {k}"
        );
        assert_eq!(
            *from_f16.subnet_2_bias,
            rounded.subnet_2_bias[..],
            "block {k}"
        );
        assert_eq!(
            from_f16.global_scale,
            &blocks[k].global_scale[..],
            "block {k}"
        );
    }

    let f32_flow = Flow::from_params(f32_params).unwrap();
    let f16_flow = Flow::from_params(f16_params).unwrap();
    let x = random_input(dim, 2.0, 0, false, &mut rng);
    // f16 rounds to nearest with relative error 2^-11 for normal values and absolute error
    // 2^-25 below 2^-14.
    let f16_relative = 2f64.powi(-11);
    let f16_absolute = 2f64.powi(-25);
    for (k, (block_f32, block_f16)) in f32_flow.blocks().iter().zip(f16_flow.blocks()).enumerate() {
        let exact = reference(block_f32, 2.0, &x, 0.0, 0.0);
        let widened = reference(block_f32, 2.0, &x, f16_relative, f16_absolute);
        let kernel = forward_kernel_f32().kernel();
        let output_f32 = run_block(kernel, block_f32, 2.0, &x);
        let output_f16 = run_block(kernel, block_f16, 2.0, &x);
        assert_within(&format!("block {k} from F32"), &output_f32, &exact, 1.0);
        assert_within(&format!("block {k} from F16"), &output_f16, &widened, 1.0);
        let max_difference = output_f32
            .z
            .iter()
            .zip(&output_f16.z)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // The F16 weights must change the result, or the test would not exercise them.
        assert!(
            max_difference > 0.0,
            "block {k}: F16 and F32 results are identical"
        );
    }

    // The F16 flow equals an F32 flow built from the f16-rounded weights, bit for bit.
    let rounded: Vec<OwnedBlock> = blocks.iter().map(OwnedBlock::rounded_to_f16).collect();
    let rounded_flow = Flow::new(
        dim,
        hidden,
        FREIA_DEFAULT_CLAMP,
        rounded.iter().map(OwnedBlock::params).collect(),
    )
    .unwrap();
    let mut z_f16 = vec![0.0f32; dim];
    let mut z_rounded = vec![0.0f32; dim];
    let log_det_f16 = f16_flow
        .forward(&x, &mut z_f16, &mut f16_flow.scratch())
        .unwrap();
    let log_det_rounded = rounded_flow
        .forward(&x, &mut z_rounded, &mut rounded_flow.scratch())
        .unwrap();
    assert_eq!(z_f16, z_rounded);
    assert_eq!(log_det_f16, log_det_rounded);
}

#[test]
fn other_weight_dtypes_are_rejected() {
    let (dim, hidden) = (6, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let block = OwnedBlock::random(dim, hidden, 0.5, &mut rng);
    let mut file = flow_file(std::slice::from_ref(&block), dim, hidden, Dtype::F32);
    // Rewrite the header's dtype of one subnet tensor from F32 to I32, which has the same
    // size, so the offsets stay valid.
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&file[8..8 + header_len])
        .unwrap()
        .to_string();
    let key = "\"blocks.0.subnet.2.weight\":{\"dtype\":\"F32\"";
    assert!(header.contains(key), "{header}");
    let patched = header.replace(key, "\"blocks.0.subnet.2.weight\":{\"dtype\":\"I32\"");
    file[8..8 + header_len].copy_from_slice(patched.as_bytes());
    let storage = aligned(&file);
    let error = params_from_safetensors(&bytemuck::cast_slice(&storage)[..file.len()]).unwrap_err();
    assert_eq!(
        error,
        FlowError::Dtype {
            name: "blocks.0.subnet.2.weight".into(),
            expected: "F32 or F16",
            actual: "I32".into(),
        }
    );
}
