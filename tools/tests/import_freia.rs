//! `daain-tools import-freia` on the FrEIA reference flow: the written bundle flow file,
//! evaluated by the runtime, reproduces FrEIA's outputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use daain::flow::{params_from_safetensors, Flow};
use safetensors::SafeTensors;

fn reference_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/reference/daain_flow_hbos_reference.safetensors")
}

fn f64_rows(tensors: &SafeTensors<'_>, name: &str) -> (Vec<f64>, Vec<usize>) {
    let view = tensors.tensor(name).unwrap();
    let shape = view.shape().to_vec();
    let values = match view.dtype() {
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::F64 => {
            view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
        }
        other => panic!("{name} has dtype {other:?}"),
    };
    (values, shape)
}

#[test]
fn imported_flow_reproduces_freia() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("flow.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_daain-tools"))
        .args(["import-freia", "--input"])
        .arg(reference_path())
        .arg("--output")
        .arg(&output)
        .status()
        .unwrap();
    assert!(status.success());

    let bytes = std::fs::read(&output).unwrap();
    let flow = Flow::from_params(params_from_safetensors(&bytes).unwrap()).unwrap();
    let reference_bytes = std::fs::read(reference_path()).unwrap();
    let reference = SafeTensors::deserialize(&reference_bytes).unwrap();
    let (x, shape) = f64_rows(&reference, "x_test");
    let (z_expected, _) = f64_rows(&reference, "z_test_f64");
    let (log_det_expected, _) = f64_rows(&reference, "log_jac_det_test_f64");
    let dim = shape[1];
    assert_eq!(flow.dim(), dim);

    let mut scratch = flow.scratch::<f64>();
    let mut z = vec![0.0f64; dim];
    for (row, x_row) in x.chunks_exact(dim).enumerate() {
        let log_det = flow.forward(x_row, &mut z, &mut scratch).unwrap();
        let expected = &z_expected[row * dim..(row + 1) * dim];
        let max_error = z.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(max_error < 1e-4, "row {row}: z differs by {max_error}");
        let log_det_error = (log_det - log_det_expected[row]).abs();
        assert!(log_det_error < 1e-4, "row {row}: log-det differs by {log_det_error}");
    }
}

#[test]
fn import_of_missing_file_fails_cleanly() {
    let output = Command::new(env!("CARGO_BIN_EXE_daain-tools"))
        .args(["import-freia", "--input", "/nonexistent/flow.safetensors", "--output", "/tmp/x"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("/nonexistent/flow.safetensors"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}
