//! Checks the runtime flow and HBOS against reference vectors computed with FrEIA 0.2
//! (8 `AllInOneBlock`s on d = 257, subnet width 10) and PyOD 3.6.7
//! (`HBOS(n_bins=40, contamination=0.001)`), stored in
//! tests/data/reference/daain_flow_hbos_reference.safetensors. The JSON file next to it
//! records how they were produced.

use std::collections::HashMap;

use daain::flow::{params_from_safetensors, BlockParams, Flow, FlowError, FREIA_DEFAULT_CLAMP};
use daain::score::{Hbos, ScoreKind, Scorer};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/reference/daain_flow_hbos_reference.safetensors"
);
const DIM: usize = 257;
const BLOCKS: usize = 8;
const TEST_ROWS: usize = 32;
/// Rows 0..24 of `x_test` are inlier-like, rows 24..32 outlier-like.
const INLIER_ROWS: usize = 24;

const HBOS_BINS: usize = 40;
const HBOS_ALPHA: f64 = 0.1;
const HBOS_TOL: f64 = 0.5;

/// The reference tensors, copied out of the file so alignment does not matter.
struct Reference {
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Reference {
    fn load() -> Self {
        let bytes = std::fs::read(REFERENCE).expect("reference file is readable");
        let file = SafeTensors::deserialize(&bytes).expect("reference file is valid safetensors");
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let values: Vec<f64> = match view.dtype() {
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
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Self { tensors }
    }

    fn shape(&self, name: &str) -> &[usize] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no tensor {name}"))
            .0
    }

    fn f64(&self, name: &str) -> &[f64] {
        &self
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no tensor {name}"))
            .1
    }

    /// Values of a tensor stored as F32, exactly.
    fn f32(&self, name: &str) -> Vec<f32> {
        self.f64(name).iter().map(|&v| v as f32).collect()
    }
}

/// Owned parameters of one block in the runtime layout.
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
}

/// Turns a `[d, d]` permutation matrix into `permutation` with `w[i, permutation[i]] = 1`,
/// or explains why the matrix is not a permutation matrix.
fn permutation_from_matrix(matrix: &[f64], dim: usize) -> Result<Vec<u32>, String> {
    let mut permutation = Vec::with_capacity(dim);
    let mut column_used = vec![false; dim];
    for (i, row) in matrix.chunks_exact(dim).enumerate() {
        let ones: Vec<usize> = (0..dim).filter(|&j| row[j] == 1.0).collect();
        let zeros = row.iter().filter(|&&v| v == 0.0).count();
        if ones.len() != 1 || zeros != dim - 1 {
            return Err(format!("row {i} has {} ones and {zeros} zeros", ones.len()));
        }
        let column = ones[0];
        if column_used[column] {
            return Err(format!("column {column} has more than one 1"));
        }
        column_used[column] = true;
        permutation.push(column as u32);
    }
    Ok(permutation)
}

fn reference_blocks(reference: &Reference) -> Vec<OwnedBlock> {
    (0..BLOCKS)
        .map(|k| {
            let name = |tensor: &str| format!("flow.module_list.{k}.{tensor}");
            assert_eq!(reference.shape(&name("global_scale")), [1, DIM]);
            assert_eq!(reference.shape(&name("w_perm")), [DIM, DIM]);
            let permutation = permutation_from_matrix(reference.f64(&name("w_perm")), DIM)
                .unwrap_or_else(|reason| {
                    panic!("block {k}: w_perm is not a permutation: {reason}")
                });
            let inverse = permutation_from_matrix(reference.f64(&name("w_perm_inv")), DIM)
                .unwrap_or_else(|reason| {
                    panic!("block {k}: w_perm_inv is not a permutation: {reason}")
                });
            for (i, &p) in permutation.iter().enumerate() {
                assert_eq!(
                    inverse[p as usize] as usize, i,
                    "block {k}: w_perm_inv is not w_perm^T"
                );
            }
            OwnedBlock {
                permutation,
                global_scale: reference.f32(&name("global_scale")),
                global_offset: reference.f32(&name("global_offset")),
                subnet_0_weight: reference.f32(&name("subnet.0.weight")),
                subnet_0_bias: reference.f32(&name("subnet.0.bias")),
                subnet_2_weight: reference.f32(&name("subnet.2.weight")),
                subnet_2_bias: reference.f32(&name("subnet.2.bias")),
            }
        })
        .collect()
}

fn hidden_width(reference: &Reference) -> usize {
    reference.shape("flow.module_list.0.subnet.0.weight")[0]
}

fn build_flow<'a>(reference: &Reference, blocks: &'a [OwnedBlock]) -> Flow<'a> {
    let params = blocks.iter().map(OwnedBlock::params).collect();
    Flow::new(DIM, hidden_width(reference), FREIA_DEFAULT_CLAMP, params)
        .expect("reference flow is valid")
}

/// Runs the flow on every row of `x_test` in precision `T` and returns `z` and log|det J|
/// widened to f64.
fn run_flow<T: daain::flow::Element>(flow: &Flow<'_>, x: &[T]) -> (Vec<f64>, Vec<f64>) {
    let mut scratch = flow.scratch::<T>();
    let mut z = vec![T::default(); DIM];
    let mut all_z = Vec::with_capacity(x.len());
    let mut log_dets = Vec::with_capacity(x.len() / DIM);
    for row in x.chunks_exact(DIM) {
        let log_det = flow
            .forward(row, &mut z, &mut scratch)
            .expect("forward succeeds");
        all_z.extend(z.iter().map(|v| v.to_f64()));
        log_dets.push(log_det.to_f64());
    }
    (all_z, log_dets)
}

fn max_abs_difference(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn rows(values: &[f64], range: std::ops::Range<usize>) -> &[f64] {
    &values[range.start * DIM..range.end * DIM]
}

#[test]
fn flow_f64_matches_freia_f64() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let flow = build_flow(&reference, &blocks);
    let x: Vec<f64> = reference
        .f32("x_test")
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let (z, log_det) = run_flow::<f64>(&flow, &x);

    // Same weights and formulas in f64: only summation order and libm differ, which stays
    // below 1e-9 even on the outlier rows, where the f32 results differ by 0.03.
    let z_error = max_abs_difference(&z, reference.f64("z_test_f64"));
    assert!(z_error < 1e-9, "max |z - z_f64| = {z_error}");
    let log_det_error = max_abs_difference(&log_det, reference.f64("log_jac_det_test_f64"));
    assert!(
        log_det_error < 1e-9,
        "max |log_det - log_det_f64| = {log_det_error}"
    );
}

#[test]
fn flow_f32_matches_freia_within_f32_error() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let flow = build_flow(&reference, &blocks);
    let x = reference.f32("x_test");
    let (z, log_det) = run_flow::<f32>(&flow, &x);
    let z_f64 = reference.f64("z_test_f64");
    let z_freia_f32 = reference.f64("z_test");
    let log_det_f64 = reference.f64("log_jac_det_test_f64");
    let log_det_freia_f32 = reference.f64("log_jac_det_test");

    // FrEIA's own f32 result shows how far f32 rounding moves z on these rows. The Rust f32
    // path may round differently but must stay within twice that distance of the f64 values,
    // per row group, because the outlier rows amplify rounding far more than the inliers.
    for (group, range) in [
        ("inlier", 0..INLIER_ROWS),
        ("outlier", INLIER_ROWS..TEST_ROWS),
    ] {
        let freia_error =
            max_abs_difference(rows(z_freia_f32, range.clone()), rows(z_f64, range.clone()));
        let rust_error = max_abs_difference(rows(&z, range.clone()), rows(z_f64, range.clone()));
        assert!(
            rust_error <= 2.0 * freia_error.max(1e-6),
            "{group} rows: max |z - z_f64| = {rust_error}, FrEIA f32 reaches {freia_error}"
        );
        let rust_vs_freia =
            max_abs_difference(rows(&z, range.clone()), rows(z_freia_f32, range.clone()));
        assert!(
            rust_vs_freia <= 3.0 * freia_error.max(1e-6),
            "{group} rows: max |z - z_freia_f32| = {rust_vs_freia}, FrEIA f32 vs f64 reaches \
             {freia_error}"
        );
    }

    let freia_error = max_abs_difference(log_det_freia_f32, log_det_f64);
    let rust_error = max_abs_difference(&log_det, log_det_f64);
    assert!(
        rust_error <= 2.0 * freia_error.max(1e-5),
        "max |log_det - log_det_f64| = {rust_error}, FrEIA f32 reaches {freia_error}"
    );
}

#[test]
fn flow_inverse_round_trips() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let flow = build_flow(&reference, &blocks);
    let x: Vec<f64> = reference
        .f32("x_test")
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let mut scratch = flow.scratch::<f64>();
    let mut z = vec![0.0; DIM];
    let mut back = vec![0.0; DIM];
    for (row_index, row) in x.chunks_exact(DIM).enumerate() {
        let forward_log_det = flow.forward(row, &mut z, &mut scratch).unwrap();
        let inverse_log_det = flow.inverse(&z, &mut back, &mut scratch).unwrap();
        let error = max_abs_difference(row, &back);
        assert!(
            error < 1e-9,
            "row {row_index}: max |x - inverse(forward(x))| = {error}"
        );
        let log_det_sum = forward_log_det + inverse_log_det;
        assert!(
            log_det_sum.abs() < 1e-9,
            "row {row_index}: log-dets sum to {log_det_sum}"
        );
    }
}

#[test]
fn negative_log_likelihood_matches_formula() {
    let reference = Reference::load();
    let z = &reference.f64("z_test_f64")[..DIM];
    let log_det = reference.f64("log_jac_det_test_f64")[0];
    let squared_norm: f64 = z.iter().map(|v| v * v).sum();
    let expected =
        0.5 * squared_norm + 0.5 * DIM as f64 * (2.0 * std::f64::consts::PI).ln() - log_det;
    let actual = Flow::negative_log_likelihood(z, log_det);
    assert!(
        (actual - expected).abs() < 1e-9 * expected.abs(),
        "{actual} != {expected}"
    );
}

fn fit_reference_hbos(reference: &Reference) -> Hbos {
    assert_eq!(reference.shape("z_train"), [400, DIM]);
    let z_train = reference.f32("z_train");
    Hbos::fit(&z_train, 400, DIM, HBOS_BINS, HBOS_ALPHA, HBOS_TOL).expect("HBOS fit succeeds")
}

fn assert_relative(actual: &[f64], expected: &[f64], tolerance: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        let error = (a - e).abs();
        assert!(
            error <= tolerance * e.abs().max(1.0),
            "{what}[{i}]: {a} != {e} (difference {error})"
        );
    }
}

/// NumPy and this crate compute the same f32 histogram edges and counts, so the decision
/// values differ only by summation order: far below 1e-9 relative.
const HBOS_TOLERANCE: f64 = 1e-9;

#[test]
fn hbos_decisions_match_pyod() {
    let reference = Reference::load();
    let hbos = fit_reference_hbos(&reference);

    let z_train = reference.f32("z_train");
    let train: Vec<f64> = z_train
        .chunks_exact(DIM)
        .map(|row| hbos.decision(row).unwrap())
        .collect();
    assert_relative(
        &train,
        reference.f64("hbos_decision_train"),
        HBOS_TOLERANCE,
        "decision_train",
    );

    let z_test = reference.f32("z_test");
    let test: Vec<f64> = z_test
        .chunks_exact(DIM)
        .map(|row| hbos.decision(row).unwrap())
        .collect();
    assert_relative(
        &test,
        reference.f64("hbos_decision_test"),
        HBOS_TOLERANCE,
        "decision_test",
    );

    let inlier_max = test[..INLIER_ROWS].iter().copied().fold(f64::MIN, f64::max);
    let outlier_min = test[INLIER_ROWS..].iter().copied().fold(f64::MAX, f64::min);
    assert!(
        outlier_min > inlier_max,
        "outliers {outlier_min} must score above inliers {inlier_max}"
    );
}

#[test]
fn hbos_probability_and_daain_score_match_pyod() {
    let reference = Reference::load();
    let hbos = fit_reference_hbos(&reference);
    let z_test = reference.f32("z_test");
    let probability: Vec<f64> = z_test
        .chunks_exact(DIM)
        .map(|row| hbos.probability(hbos.decision(row).unwrap()))
        .collect();
    assert_relative(
        &probability,
        reference.f64("hbos_proba_outlier_test"),
        HBOS_TOLERANCE,
        "proba",
    );

    let scorer = Scorer::HbosProbability(hbos);
    assert_eq!(scorer.kind(), ScoreKind::HbosProbability);
    let daain: Vec<f64> = z_test
        .chunks_exact(DIM)
        .map(|row| scorer.score(row, 0.0).unwrap())
        .collect();
    assert_relative(
        &daain,
        reference.f64("daain_score_test"),
        HBOS_TOLERANCE,
        "daain_score",
    );
}

#[test]
fn flow_rejects_wrong_length() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let mut params: Vec<BlockParams<'_>> = blocks.iter().map(OwnedBlock::params).collect();
    params[3].subnet_0_bias = &blocks[3].subnet_0_bias[1..];
    let error = Flow::new(DIM, hidden_width(&reference), 2.0, params).unwrap_err();
    assert_eq!(
        error,
        FlowError::ParameterLength {
            block: 3,
            parameter: "subnet.0.bias",
            expected: 10,
            actual: 9
        }
    );
}

#[test]
fn flow_rejects_non_permutation() {
    let reference = Reference::load();
    let mut blocks = reference_blocks(&reference);
    let original = blocks[2].permutation.clone();

    blocks[2].permutation[5] = blocks[2].permutation[6];
    let params = blocks.iter().map(OwnedBlock::params).collect();
    let error = Flow::new(DIM, hidden_width(&reference), 2.0, params).unwrap_err();
    assert!(
        matches!(
            error,
            FlowError::PermutationDuplicate {
                block: 2,
                first: 5,
                second: 6,
                ..
            }
        ),
        "{error:?}"
    );

    blocks[2].permutation = original;
    blocks[2].permutation[7] = DIM as u32;
    let params = blocks.iter().map(OwnedBlock::params).collect();
    let error = Flow::new(DIM, hidden_width(&reference), 2.0, params).unwrap_err();
    assert_eq!(
        error,
        FlowError::PermutationOutOfRange {
            block: 2,
            index: 7,
            value: DIM as u32,
            dim: DIM
        }
    );
}

#[test]
fn flow_rejects_nan_weight() {
    let reference = Reference::load();
    let mut blocks = reference_blocks(&reference);
    blocks[6].subnet_2_weight[11] = f32::NAN;
    let params = blocks.iter().map(OwnedBlock::params).collect();
    let error = Flow::new(DIM, hidden_width(&reference), 2.0, params).unwrap_err();
    assert!(
        matches!(
            error,
            FlowError::NonFiniteParameter {
                block: 6,
                parameter: "subnet.2.weight",
                index: 11,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn flow_rejects_non_finite_input() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let flow = build_flow(&reference, &blocks);
    let mut x = reference.f32("x_test")[..DIM].to_vec();
    let mut z = vec![0.0f32; DIM];
    let mut scratch = flow.scratch::<f32>();
    x[40] = f32::NAN;
    assert_eq!(
        flow.forward(&x, &mut z, &mut scratch),
        Err(FlowError::NonFinite { index: 40 })
    );
    x[40] = 0.0;
    x[2] = f32::INFINITY;
    assert_eq!(
        flow.forward(&x, &mut z, &mut scratch),
        Err(FlowError::NonFinite { index: 2 })
    );
}

#[test]
fn flow_rejects_wrong_buffer_sizes() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let flow = build_flow(&reference, &blocks);
    let x = vec![0.0f32; DIM];
    let mut z = vec![0.0f32; DIM];
    let mut scratch = flow.scratch::<f32>();
    assert_eq!(
        flow.forward(&x[1..], &mut z, &mut scratch),
        Err(FlowError::LengthMismatch {
            what: "input",
            expected: DIM,
            actual: DIM - 1
        })
    );
    assert_eq!(
        flow.forward(&x, &mut z[1..], &mut scratch),
        Err(FlowError::LengthMismatch {
            what: "output",
            expected: DIM,
            actual: DIM - 1
        })
    );
}

/// Serializes the reference flow in the bundle's flow file layout.
fn serialize_flow_file(
    blocks: &[OwnedBlock],
    hidden: usize,
    metadata: Option<(&str, &str)>,
) -> Vec<u8> {
    let d1 = DIM - DIM / 2;
    let d2 = DIM / 2;
    let mut named: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (k, block) in blocks.iter().enumerate() {
        let permutation: Vec<i32> = block.permutation.iter().map(|&p| p as i32).collect();
        named.push((
            format!("blocks.{k}.permutation"),
            Dtype::I32,
            vec![DIM],
            bytemuck::cast_slice(&permutation).to_vec(),
        ));
        let floats: [(&str, &Vec<f32>, Vec<usize>); 6] = [
            ("global_scale", &block.global_scale, vec![DIM]),
            ("global_offset", &block.global_offset, vec![DIM]),
            ("subnet.0.weight", &block.subnet_0_weight, vec![hidden, d1]),
            ("subnet.0.bias", &block.subnet_0_bias, vec![hidden]),
            (
                "subnet.2.weight",
                &block.subnet_2_weight,
                vec![2 * d2, hidden],
            ),
            ("subnet.2.bias", &block.subnet_2_bias, vec![2 * d2]),
        ];
        for (tensor, values, shape) in floats {
            named.push((
                format!("blocks.{k}.{tensor}"),
                Dtype::F32,
                shape,
                bytemuck::cast_slice(values).to_vec(),
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
    let metadata =
        metadata.map(|(key, value)| HashMap::from([(key.to_string(), value.to_string())]));
    safetensors::serialize(views, &metadata).expect("serialization succeeds")
}

/// Copies `bytes` to a buffer whose start is aligned to 8 bytes plus `shift`.
fn aligned_copy(bytes: &[u8], shift: usize) -> (Vec<u64>, std::ops::Range<usize>) {
    let mut storage = vec![0u64; bytes.len() / 8 + 2];
    let buffer: &mut [u8] = bytemuck::cast_slice_mut(&mut storage);
    buffer[shift..shift + bytes.len()].copy_from_slice(bytes);
    (storage, shift..shift + bytes.len())
}

#[test]
fn flow_file_round_trips() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let hidden = hidden_width(&reference);
    let file = serialize_flow_file(&blocks, hidden, Some(("affine_clamping", "2.0")));
    let (storage, range) = aligned_copy(&file, 0);
    let bytes = &bytemuck::cast_slice::<u64, u8>(&storage)[range];

    let params = params_from_safetensors(bytes).expect("flow file is readable");
    assert_eq!(params.dim, DIM);
    assert_eq!(params.hidden, hidden);
    assert_eq!(params.clamp, 2.0);
    assert_eq!(params.blocks.len(), BLOCKS);
    let from_file = Flow::from_params(params).unwrap();
    let direct = build_flow(&reference, &blocks);

    let x = reference.f32("x_test");
    let (z_file, log_det_file) = run_flow::<f32>(&from_file, &x);
    let (z_direct, log_det_direct) = run_flow::<f32>(&direct, &x);
    assert_eq!(z_file, z_direct);
    assert_eq!(log_det_file, log_det_direct);
}

#[test]
fn flow_file_errors() {
    let reference = Reference::load();
    let blocks = reference_blocks(&reference);
    let hidden = hidden_width(&reference);

    let file = serialize_flow_file(&blocks, hidden, None);
    let (storage, range) = aligned_copy(&file, 2);
    let bytes = &bytemuck::cast_slice::<u64, u8>(&storage)[range];
    let error = params_from_safetensors(bytes).unwrap_err();
    assert!(matches!(error, FlowError::Unaligned { .. }), "{error:?}");

    let file = serialize_flow_file(&blocks, hidden, Some(("affine_clamping", "two")));
    let (storage, range) = aligned_copy(&file, 0);
    let bytes = &bytemuck::cast_slice::<u64, u8>(&storage)[range];
    let error = params_from_safetensors(bytes).unwrap_err();
    assert!(
        matches!(error, FlowError::InvalidMetadata { .. }),
        "{error:?}"
    );

    let error = params_from_safetensors(b"not a safetensors file").unwrap_err();
    assert!(matches!(error, FlowError::Safetensors(_)), "{error:?}");
}
