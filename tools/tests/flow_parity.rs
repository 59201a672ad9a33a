//! Checks that the libtorch flow and the runtime flow compute the same function: a flow
//! trained here, written as a flow file and loaded by the runtime, and the FrEIA reference
//! flow imported from its state dict.

use daain::flow::{params_from_safetensors, Flow};
use daain_tools::flow::{FlowConfig, TchFlow, TrainConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/reference/daain_flow_hbos_reference.safetensors"
);

/// Odd, so the coupling split is uneven as with the real sampling masks.
const DIM: usize = 301;
const ROWS: usize = 256;

/// Correlated Gaussian rows: a fixed random mixing matrix applied to standard normal noise.
fn correlated_data(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mixing: Vec<f32> = (0..dim * dim)
        .map(|_| rng.gen_range(-1.0..1.0) / (dim as f32).sqrt())
        .collect();
    let mut data = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let noise: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.7f32..1.7)).collect();
        for i in 0..dim {
            let row = &mixing[i * dim..(i + 1) * dim];
            data.push(row.iter().zip(&noise).map(|(a, b)| a * b).sum::<f32>() + 0.5);
        }
    }
    data
}

/// Copies `bytes` into an 8-byte-aligned buffer, as a memory map would provide.
fn aligned(bytes: &[u8]) -> Vec<u64> {
    let mut storage = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut storage)[..bytes.len()].copy_from_slice(bytes);
    storage
}

fn tensor_rows(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&tensor.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

#[test]
fn trained_flow_matches_runtime() {
    let config = FlowConfig {
        dim: DIM,
        hidden: 32,
        blocks: 4,
        clamp: 2.0,
    };
    let mut flow = TchFlow::new(config, Device::Cpu, 7).unwrap();
    let data = correlated_data(ROWS, DIM, 11);
    let data = Tensor::from_slice(&data).reshape([ROWS as i64, DIM as i64]);
    let settings = TrainConfig {
        epochs: 4,
        batch_size: 64,
        learning_rate: 1e-3,
        weight_decay: 1e-5,
        seed: 3,
    };
    let mut reports = Vec::new();
    let losses = flow
        .train(&data, settings, |report| reports.push(report))
        .unwrap();
    assert_eq!(losses.len(), 4);
    assert_eq!(reports.len(), 4);
    assert!(
        losses[3] < losses[0],
        "training did not lower the loss: {losses:?}"
    );

    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("flow.safetensors");
    flow.write_safetensors(&path).unwrap();

    let (z, log_det) = tch::no_grad(|| flow.forward(&data)).unwrap();
    let nll_tch = tensor_rows(&TchFlow::negative_log_likelihood(&z, &log_det));
    let z_tch = tensor_rows(&z);

    let bytes = std::fs::read(&path).unwrap();
    let storage = aligned(&bytes);
    let bytes = &bytemuck::cast_slice::<u64, u8>(&storage)[..bytes.len()];
    let params = params_from_safetensors(bytes).unwrap();
    assert_eq!(params.dim, DIM);
    assert_eq!(params.hidden, 32);
    assert_eq!(params.clamp, 2.0);
    assert_eq!(params.blocks.len(), 4);
    let runtime = Flow::from_params(params).unwrap();

    let x = tensor_rows(&data);
    let mut scratch = runtime.scratch::<f32>();
    let mut z_runtime = vec![0.0f32; DIM];
    // Both sides run in f32 with different summation orders. The NLL is about 1e2 to 1e3
    // here, so 1e-4 relative allows a few hundred f32 roundings and catches any layout error.
    for (row, x_row) in x.chunks_exact(DIM).enumerate() {
        let log_det = runtime
            .forward(x_row, &mut z_runtime, &mut scratch)
            .unwrap();
        let nll = Flow::negative_log_likelihood(&z_runtime, log_det);
        let relative = (nll - f64::from(nll_tch[row])).abs() / f64::from(nll_tch[row]).abs();
        assert!(
            relative < 1e-4,
            "row {row}: runtime NLL {nll}, libtorch {}",
            nll_tch[row]
        );
        let z_row = &z_tch[row * DIM..(row + 1) * DIM];
        for (i, (a, b)) in z_runtime.iter().zip(z_row).enumerate() {
            assert!(
                (a - b).abs() < 1e-4 * b.abs().max(1.0),
                "row {row}, z[{i}]: {a} != {b}"
            );
        }
    }

    let reread = TchFlow::read_safetensors(&path, Device::Cpu).unwrap();
    let (z_reread, log_det_reread) = tch::no_grad(|| reread.forward(&data)).unwrap();
    assert_eq!(tensor_rows(&z_reread), z_tch);
    assert_eq!(tensor_rows(&log_det_reread), tensor_rows(&log_det));
}

fn reference_tensor(named: &[(String, Tensor)], name: &str) -> Tensor {
    named
        .iter()
        .find(|(key, _)| key == name)
        .unwrap_or_else(|| panic!("reference has no tensor {name}"))
        .1
        .shallow_clone()
}

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn freia_import_reproduces_reference() {
    let named = Tensor::read_safetensors(REFERENCE).unwrap();
    let x_test = reference_tensor(&named, "x_test");

    // The reference flow in f64 against FrEIA in f64: the same arithmetic, so only
    // summation order differs.
    let mut flow = TchFlow::import_freia(&named, 2.0, Device::Cpu).unwrap();
    assert_eq!(
        flow.config(),
        FlowConfig {
            dim: 257,
            hidden: 10,
            blocks: 8,
            clamp: 2.0
        }
    );
    flow.set_kind(Kind::Double).unwrap();
    let (z, log_det) = tch::no_grad(|| flow.forward(&x_test.to_kind(Kind::Double))).unwrap();
    let z_error = max_abs_difference(&z, &reference_tensor(&named, "z_test_f64"));
    assert!(z_error < 1e-9, "max |z - z_f64| = {z_error}");
    let log_det_error =
        max_abs_difference(&log_det, &reference_tensor(&named, "log_jac_det_test_f64"));
    assert!(
        log_det_error < 1e-9,
        "max |log_det - log_det_f64| = {log_det_error}"
    );

    // In f32, compare with FrEIA's f32 output. The outlier rows amplify rounding: FrEIA's own
    // f32 and f64 results differ by up to 0.034 in z and 2.6e-4 in log|det J| there.
    flow.set_kind(Kind::Float).unwrap();
    let (z, log_det) = tch::no_grad(|| flow.forward(&x_test)).unwrap();
    let z_error = max_abs_difference(&z, &reference_tensor(&named, "z_test"));
    assert!(z_error < 0.05, "max |z - z_freia_f32| = {z_error}");
    let log_det_error = max_abs_difference(&log_det, &reference_tensor(&named, "log_jac_det_test"));
    assert!(
        log_det_error < 1e-3,
        "max |log_det - log_det_freia_f32| = {log_det_error}"
    );
}

#[test]
fn freia_import_rejects_bad_state_dict() {
    let named = Tensor::read_safetensors(REFERENCE).unwrap();

    let mut soft = named
        .iter()
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect::<Vec<_>>();
    let position = soft
        .iter()
        .position(|(k, _)| k == "flow.module_list.3.w_perm")
        .unwrap();
    soft[position].1 = soft[position].1.copy() * 0.5;
    let error = TchFlow::import_freia(&soft, 2.0, Device::Cpu).unwrap_err();
    assert!(
        format!("{error:#}").contains("module_list.3.w_perm"),
        "{error:#}"
    );

    let missing: Vec<(String, Tensor)> = named
        .iter()
        .filter(|(k, _)| k != "flow.module_list.5.subnet.2.bias")
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let error = TchFlow::import_freia(&missing, 2.0, Device::Cpu).unwrap_err();
    assert!(
        format!("{error:#}").contains("flow.module_list.5.subnet.2.bias"),
        "{error:#}"
    );

    let unrelated: Vec<(String, Tensor)> = named
        .iter()
        .filter(|(k, _)| !k.contains("module_list"))
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    assert!(TchFlow::import_freia(&unrelated, 2.0, Device::Cpu).is_err());
}
