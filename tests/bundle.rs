//! The bundle format on the shipped default bundle: round trip, hash checks, bundles that
//! do not match their backbone, and the matmul kernels tract chooses for the backbone.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use daain::backbone::{Backbone, BackboneSpec};
use daain::bundle::{Bundle, BundleError, Manifest, MANIFEST_FILE};
use daain::pipeline::{DetectError, Detector};

fn default_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default")
}

/// Copies the default bundle into a temporary directory.
fn copy_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(default_bundle()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn read_manifest(dir: &Path) -> Manifest {
    serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap()).unwrap()
}

fn write_manifest(dir: &Path, manifest: &Manifest) {
    std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_string_pretty(manifest).unwrap()).unwrap();
}

#[test]
fn manifest_round_trips() {
    let text = std::fs::read_to_string(default_bundle().join(MANIFEST_FILE)).unwrap();
    let manifest: Manifest = serde_json::from_str(&text).unwrap();
    let again: Manifest = serde_json::from_str(&serde_json::to_string(&manifest).unwrap()).unwrap();
    assert_eq!(manifest, again);
}

#[test]
fn default_bundle_loads_every_stage() {
    let bundle = Bundle::open(&default_bundle()).unwrap();
    let manifest = bundle.manifest().clone();
    let points = bundle.mask_points().unwrap();
    assert_eq!(points.len(), manifest.mask.points);
    let flow = bundle.flow().unwrap();
    assert_eq!(flow.dim(), manifest.flow.dim);
    assert_eq!(flow.blocks().len(), manifest.flow.blocks);
    let (hbos, mahalanobis) = bundle.scores().unwrap();
    assert_eq!(hbos.dim(), manifest.flow.dim);
    assert_eq!(mahalanobis.dim(), manifest.flow.dim);
}

#[test]
fn altered_weight_file_is_rejected() {
    let dir = copy_bundle();
    let path = dir.path().join("flow.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let err = Bundle::open(dir.path()).err().expect("altered bundle must be rejected");
    assert!(matches!(err, BundleError::Hash { .. }), "{err}");
    assert!(err.to_string().contains("flow.safetensors"), "{err}");
}

#[test]
fn truncated_weight_file_is_rejected() {
    let dir = copy_bundle();
    let path = dir.path().join("score.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Bundle::open(dir.path()).err().expect("truncated bundle must be rejected");
    assert!(matches!(err, BundleError::Hash { .. }), "{err}");
}

#[test]
fn missing_bundle_names_the_directory() {
    let err = Bundle::open(Path::new("/nonexistent/bundle")).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/bundle"), "{err}");
}

#[test]
fn newer_format_version_is_rejected() {
    let dir = copy_bundle();
    let mut manifest = read_manifest(dir.path());
    manifest.format_version += 1;
    write_manifest(dir.path(), &manifest);
    let err = Bundle::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("format version"), "{err}");
}

#[test]
fn bundle_for_other_taps_is_rejected() {
    // A bundle made for a backbone whose tap has another shape.
    let dir = copy_bundle();
    let mut manifest = read_manifest(dir.path());
    manifest.backbone.taps[0].channels += 1;
    write_manifest(dir.path(), &manifest);
    let bundle = Bundle::open(dir.path()).unwrap();
    let err = Detector::new(&bundle, None).err().expect("mismatched taps must be rejected");
    assert!(matches!(err, DetectError::Backbone(_)), "{err}");
    assert!(err.to_string().contains(&manifest.backbone.taps[0].name), "{err}");
}

#[test]
fn bundle_naming_unknown_tensor_is_rejected() {
    let dir = copy_bundle();
    let mut manifest = read_manifest(dir.path());
    manifest.backbone.taps[1].name = "decoder.stage9".into();
    write_manifest(dir.path(), &manifest);
    let bundle = Bundle::open(dir.path()).unwrap();
    let err = Detector::new(&bundle, None).err().unwrap();
    assert!(err.to_string().contains("decoder.stage9"), "{err}");
}

/// Reads every file of the default bundle into memory, keyed by file name.
fn bundle_files() -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(default_bundle()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        files.insert(name, std::fs::read(entry.path()).unwrap());
    }
    let manifest = files.remove(MANIFEST_FILE).unwrap();
    (manifest, files)
}

#[test]
fn in_memory_bundle_matches_directory() {
    let (manifest, files) = bundle_files();
    let from_memory = Bundle::from_memory(&default_bundle(), &manifest, &files).unwrap();
    let opened = Bundle::open(&default_bundle()).unwrap();
    assert_eq!(from_memory.manifest(), opened.manifest());
    assert_eq!(from_memory.backbone_path(), opened.backbone_path());
    assert_eq!(
        from_memory.mask_points().unwrap(),
        opened.mask_points().unwrap()
    );
    let flow = from_memory.flow().unwrap();
    assert_eq!(flow.dim(), opened.flow().unwrap().dim());
    // The in-memory copy is aligned, so the flow borrows its weights as from the map.
    assert!(from_memory.scores().is_ok());
}

#[test]
fn in_memory_bundle_checks_hashes() {
    let (manifest, mut files) = bundle_files();
    files.get_mut("mask.safetensors").unwrap()[100] ^= 1;
    let err = Bundle::from_memory(Path::new("in-memory"), &manifest, &files)
        .err()
        .expect("altered mask must be rejected");
    assert!(matches!(err, BundleError::Hash { .. }), "{err}");
    assert!(err.to_string().contains("mask.safetensors"), "{err}");

    files.get_mut("mask.safetensors").unwrap()[100] ^= 1;
    files.remove("score.safetensors");
    let err = Bundle::from_memory(Path::new("in-memory"), &manifest, &files)
        .err()
        .expect("missing file must be rejected");
    assert!(matches!(err, BundleError::Io { .. }), "{err}");
    assert!(err.to_string().contains("score.safetensors"), "{err}");
}

#[test]
fn file_name_outside_bundle_is_rejected() {
    for name in ["../mask.safetensors", "/etc/hostname", ""] {
        let dir = copy_bundle();
        let mut manifest = read_manifest(dir.path());
        manifest.mask.file.file = name.into();
        write_manifest(dir.path(), &manifest);
        let err = Bundle::open(dir.path())
            .err()
            .expect("file outside the bundle must be rejected");
        assert!(matches!(err, BundleError::Manifest { .. }), "{name}: {err}");
        assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
    }
}

#[test]
fn backbone_uses_native_matmul_kernels() {
    let bundle = Bundle::open(&default_bundle()).unwrap();
    let manifest = bundle.manifest();
    let spec = BackboneSpec {
        path: bundle.backbone_path(),
        input_height: manifest.input.height,
        input_width: manifest.input.width,
        logits: manifest.backbone.logits.clone(),
        taps: manifest.backbone.taps.iter().map(|tap| tap.name.clone()).collect(),
        threads: 1,
    };
    let backbone = Backbone::load(&spec).unwrap();
    let kernels = backbone.kernels();
    // ESPNet's convolutions become matmuls in tract's optimised plan.
    assert!(!kernels.matmul_kernels.is_empty(), "no matmul node in the optimised plan");
    // NOTE: checked on aarch64 only, the target the kernels were verified on under qemu.
    #[cfg(target_arch = "aarch64")]
    for (kernel, nodes) in &kernels.matmul_kernels {
        assert!(
            !kernels.portable_matmul_kernels.contains(kernel),
            "{kernel} ({nodes} nodes) is tract's portable fallback"
        );
        // SVE2, SME and Apple's AMX kernels would be native too, but the vehicle computers
        // this crate targets (Cortex-A57 to A78) and the emulated Cortex-A72 have NEON only.
        if !std::arch::is_aarch64_feature_detected!("sve2") {
            assert!(kernel.starts_with("arm64"), "{kernel}");
        }
    }
}
