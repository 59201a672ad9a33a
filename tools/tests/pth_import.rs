//! The `.pth` reader against the safetensors copy of the ESPNet weights, in both PyTorch
//! layouts. `tests/data/*_zip.pth` come from `tests/data/make_zip_fixtures.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use daain_tools::espnet::{Weights, NUM_WEIGHTS};
use daain_tools::pth::{self, DType};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Reads the safetensors weights as name -> (shape, little-endian bytes).
fn safetensors_reference() -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(repo_path("models/espnet/espnet_p_2_q_8.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            (name, (view.shape().to_vec(), view.data().to_vec()))
        })
        .collect()
}

fn assert_matches_safetensors(path: &Path) {
    let reference = safetensors_reference();
    assert_eq!(reference.len(), NUM_WEIGHTS);
    let state_dict = pth::load(path).unwrap();
    assert_eq!(
        state_dict.tensors.len(),
        NUM_WEIGHTS,
        "tensor count of {}",
        path.display()
    );

    let mut names: Vec<&str> = state_dict.names().collect();
    names.sort_unstable();
    let reference_names: Vec<&str> = reference.keys().map(String::as_str).collect();
    assert_eq!(names, reference_names);

    for (name, tensor) in &state_dict.tensors {
        let (shape, bytes) = &reference[name];
        assert_eq!(tensor.dtype, DType::F32, "dtype of {name}");
        assert_eq!(&tensor.shape, shape, "shape of {name}");
        assert!(
            &tensor.bytes == bytes,
            "values of {name} differ from the safetensors copy"
        );
    }
}

#[test]
fn legacy_pth_matches_safetensors() {
    assert_matches_safetensors(&repo_path("models/espnet/espnet_p_2_q_8.pth"));
}

#[test]
fn zip_pth_matches_safetensors() {
    assert_matches_safetensors(&fixture_path("espnet_p_2_q_8_zip.pth"));
}

#[test]
fn legacy_pth_keeps_file_order() {
    let state_dict = pth::load(&repo_path("models/espnet/espnet_p_2_q_8.pth")).unwrap();
    let first: Vec<&str> = state_dict.names().take(2).collect();
    assert_eq!(
        first,
        ["encoder.level1.conv.weight", "encoder.level1.bn.weight"]
    );
}

#[test]
fn zip_views_are_copied_out() {
    let state_dict = pth::load(&fixture_path("views_zip.pth")).unwrap();
    let values = |name: &str| state_dict.get(name).unwrap().to_f32().unwrap();

    let base: Vec<f32> = (0..12).map(|v| v as f32).collect();
    assert_eq!(values("base"), base);
    assert_eq!(state_dict.get("transposed").unwrap().shape, vec![4, 3]);
    let transposed = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11].map(|v| v as f32);
    assert_eq!(values("transposed"), transposed);
    assert_eq!(values("row"), [4.0, 5.0, 6.0, 7.0]);
    assert_eq!(values("column"), [2.0, 6.0, 10.0]);
}

#[test]
fn zip_int64_scalar_rejects_f32() {
    let state_dict = pth::load(&fixture_path("views_zip.pth")).unwrap();
    let steps = state_dict.get("steps").unwrap();
    assert_eq!(steps.dtype, DType::I64);
    assert!(steps.shape.is_empty());
    assert_eq!(steps.bytes, 7i64.to_le_bytes());
    let error = steps.to_f32().unwrap_err();
    assert!(error.to_string().contains("int64"), "{error}");
}

#[test]
fn truncated_files_are_rejected() {
    for path in [
        repo_path("models/espnet/espnet_p_2_q_8.pth"),
        fixture_path("espnet_p_2_q_8_zip.pth"),
    ] {
        let bytes = std::fs::read(&path).unwrap();
        let cuts = [
            0,
            1,
            3,
            14,
            30,
            137,
            5_000,
            23_706,
            23_710,
            bytes.len() / 2,
            bytes.len() - 1,
        ];
        for cut in cuts {
            let result = pth::load_bytes(&bytes[..cut]);
            assert!(
                result.is_err(),
                "{} cut at {cut} bytes was accepted",
                path.display()
            );
        }
    }
}

#[test]
fn truncated_storage_error_names_storage() {
    let bytes = std::fs::read(repo_path("models/espnet/espnet_p_2_q_8.pth")).unwrap();
    let error = pth::load_bytes(&bytes[..bytes.len() - 1]).unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("truncated in storage"), "{message}");
}

#[test]
fn weights_from_pth_equal_safetensors() {
    let from_pth = Weights::load(&repo_path("models/espnet/espnet_p_2_q_8.pth")).unwrap();
    let from_zip = Weights::load(&fixture_path("espnet_p_2_q_8_zip.pth")).unwrap();
    let from_safetensors =
        Weights::load(&repo_path("models/espnet/espnet_p_2_q_8.safetensors")).unwrap();
    assert_eq!(from_pth.tensors, from_safetensors.tensors);
    assert_eq!(from_zip.tensors, from_safetensors.tensors);
}

#[test]
fn tch_tensors_equal_safetensors() {
    let path = repo_path("models/espnet/espnet_p_2_q_8.safetensors");
    let reference: BTreeMap<String, tch::Tensor> = tch::Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect();
    let state_dict = pth::load(&repo_path("models/espnet/espnet_p_2_q_8.pth")).unwrap();
    let converted = state_dict.to_tch().unwrap();
    assert_eq!(converted.len(), reference.len());
    for (name, tensor) in converted {
        let expected = &reference[&name];
        assert_eq!(tensor.size(), expected.size(), "shape of {name}");
        assert!(tensor.equal(expected), "values of {name}");
    }
}

#[test]
fn unknown_extension_is_rejected() {
    let error = Weights::load(Path::new("weights.bin")).unwrap_err();
    assert!(
        error.to_string().contains(".safetensors, .pth or .pt"),
        "{error}"
    );
}

#[test]
fn non_pytorch_file_is_rejected() {
    let bytes = std::fs::read(repo_path("models/espnet/espnet_p_2_q_8.safetensors")).unwrap();
    let error = pth::load_bytes(&bytes).unwrap_err();
    assert!(error.to_string().contains("not a PyTorch file"), "{error}");
}
