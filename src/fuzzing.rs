//! Fuzz target bodies for the readers of untrusted files: the bundle reader and the config
//! parser. The cargo-fuzz targets in `fuzz/` and the stable smoke test `tests/fuzz_smoke.rs`
//! both call them, so every `cargo test` runs them too.
//!
//! This module is test support, not runtime API. Each body must return normally on every
//! input: an error from the code under test is an expected outcome, and a panic is a bug.
//! The bodies assert the contracts that the readers document, so a broken contract shows
//! up as a panic too.

use std::collections::HashMap;
use std::path::Path;

use crate::bundle::{sha256_hex, Bundle, MANIFEST_FILE};
use crate::config::{Config, MAX_ALERT_CAPACITY, MAX_QUEUE_CAPACITY};

/// Manifest sections that name a file, in the order of the parts of a [`BundleInput`],
/// with the file name the shipped bundles use.
const FILE_SECTIONS: [(&str, &str); 4] = [
    ("backbone", "backbone.onnx"),
    ("mask", "mask.safetensors"),
    ("flow", "flow.safetensors"),
    ("score", "score.safetensors"),
];

/// Flag bit of [`BundleInput::encode`]'s first byte: keep the manifest's hashes as they
/// are instead of rewriting them to match the files.
const KEEP_HASHES: u8 = 1;

/// The files of one bundle, packed into one fuzz input.
///
/// Encoded as one flag byte followed by five parts, each a little-endian `u32` length and
/// that many bytes: the manifest, then the files of the `backbone`, `mask`, `flow` and
/// `score` sections. Decoding accepts every input: a part whose length runs past the end
/// takes what is left, and missing parts are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleInput {
    /// Keep the manifest's hashes. When false, the harness rewrites the `sha256` of each
    /// file section to match the part, so that mutated files get past the hash check and
    /// reach the safetensors and weight readers.
    pub keep_hashes: bool,
    pub manifest: Vec<u8>,
    /// Files in the order of [`FILE_SECTIONS`].
    pub files: [Vec<u8>; 4],
}

impl BundleInput {
    /// Reads a bundle directory as a fuzz input with the hashes rewritten by the harness.
    /// The backbone is left empty: the reader only hashes it, so its size would only slow
    /// each run down.
    pub fn from_dir(dir: &Path) -> std::io::Result<Self> {
        let read = |name: &str| std::fs::read(dir.join(name));
        Ok(Self {
            keep_hashes: false,
            manifest: read(MANIFEST_FILE)?,
            files: [
                Vec::new(),
                read(FILE_SECTIONS[1].1)?,
                read(FILE_SECTIONS[2].1)?,
                read(FILE_SECTIONS[3].1)?,
            ],
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![if self.keep_hashes { KEEP_HASHES } else { 0 }];
        for part in std::iter::once(&self.manifest).chain(&self.files) {
            let len = u32::try_from(part.len()).expect("bundle part larger than 4 GiB");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    pub fn decode(data: &[u8]) -> Self {
        let Some((&flags, mut rest)) = data.split_first() else {
            return Self::default();
        };
        let mut next_part = || {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                rest = &[];
                return Vec::new();
            };
            let len = (u32::from_le_bytes(*len) as usize).min(tail.len());
            let (part, tail) = tail.split_at(len);
            rest = tail;
            part.to_vec()
        };
        let manifest = next_part();
        let files = std::array::from_fn(|_| next_part());
        Self {
            keep_hashes: flags & KEEP_HASHES != 0,
            manifest,
            files,
        }
    }

    /// Returns the manifest to open and the files keyed by the names the manifest gives
    /// them, falling back to the shipped names where the manifest names none.
    fn prepare(&self) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
        let mut json: Option<serde_json::Value> = serde_json::from_slice(&self.manifest).ok();
        // Inputs carry no int8 backbone and no combined plan. Like the f32 backbone they
        // would only be hashed, so their manifest entries are dropped rather than their
        // bytes packed.
        if let Some(backbone) = json
            .as_mut()
            .and_then(|j| j.get_mut("backbone"))
            .and_then(|b| b.as_object_mut())
        {
            backbone.remove("int8");
        }
        if let Some(manifest) = json.as_mut().and_then(|j| j.as_object_mut()) {
            manifest.remove("plan");
        }
        let mut files = HashMap::new();
        for ((section, default_name), bytes) in FILE_SECTIONS.iter().zip(&self.files) {
            let entry = json.as_mut().and_then(|j| j.get_mut(section));
            let name = entry
                .as_ref()
                .and_then(|e| e.get("file"))
                .and_then(|f| f.as_str())
                .unwrap_or(default_name)
                .to_owned();
            if !self.keep_hashes {
                if let Some(serde_json::Value::Object(entry)) = entry {
                    entry.insert("sha256".into(), sha256_hex(bytes).into());
                }
            }
            files.insert(name, bytes.clone());
        }
        let manifest = match json {
            Some(json) if !self.keep_hashes => {
                serde_json::to_vec(&json).expect("a parsed JSON value serialises")
            }
            _ => self.manifest.clone(),
        };
        (manifest, files)
    }
}

/// How far [`bundle_reader`] got with an input, so that tests can check that mutated
/// inputs reach past the hash check into the weight readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BundleReach {
    /// The manifest or a hash was rejected.
    Rejected,
    /// The bundle opened, but the flow did not load or failed on the zero vector.
    Opened,
    /// The flow loaded and evaluated the zero vector, but the scores did not load.
    FlowEvaluated,
    /// The flow and both scores loaded and scored the flow output.
    Scored,
}

/// Opens a bundle from a [`BundleInput`] and reads every part a detector reads from it:
/// the mask points, the flow and both scores. A flow that loads is
/// evaluated on a zero vector and its output scored.
///
/// The backbone is never loaded, because ONNX parsing belongs to tract and the backbone
/// bytes are only hash-checked by the bundle reader.
pub fn bundle_reader(data: &[u8]) -> BundleReach {
    let input = BundleInput::decode(data);
    let (manifest, files) = input.prepare();
    let Ok(bundle) = Bundle::from_memory(Path::new("fuzz-bundle"), &manifest, &files) else {
        return BundleReach::Rejected;
    };
    let manifest = bundle.manifest();

    // The gather plan is left out: the detector builds it from the backbone's taps after
    // checking them against the manifest's, and the backbone is not loaded here.
    if let Ok(points) = bundle.mask_points() {
        assert_eq!(points.len(), manifest.mask.points, "mask point count");
    }

    let scores = bundle.scores();
    let Ok(flow) = bundle.flow() else {
        return BundleReach::Opened;
    };
    assert_eq!(flow.dim(), manifest.flow.dim, "flow dimension");
    let x = vec![0.0f32; flow.dim()];
    let mut z = vec![0.0f32; flow.dim()];
    let mut scratch = flow.scratch();
    if flow.forward(&x, &mut z, &mut scratch).is_err() {
        return BundleReach::Opened;
    }
    let Ok((hbos, mahalanobis)) = scores else {
        return BundleReach::FlowEvaluated;
    };
    if let Ok(decision) = hbos.decision(&z) {
        let probability = hbos.probability(decision);
        assert!(
            (0.0..=1.0).contains(&probability),
            "HBOS probability {probability}"
        );
    }
    let _ = mahalanobis.score(&z);
    BundleReach::Scored
}

/// Parses `data` as a TOML config (invalid UTF-8 replaced) and checks that an accepted
/// config keeps the ranges [`Config`] documents. Returns whether the config was accepted.
pub fn config_parser(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::from_toml(&text, Path::new("fuzz.toml")) else {
        return false;
    };
    if let Some(threshold) = config.detector.threshold {
        assert!(threshold.is_finite(), "threshold {threshold}");
    }
    let alerts = &config.alerts;
    assert!(
        (1..=MAX_ALERT_CAPACITY).contains(&alerts.capacity),
        "alert capacity {}",
        alerts.capacity
    );
    assert!(
        alerts.raise_after >= 1,
        "raise_after {}",
        alerts.raise_after
    );
    assert!(
        alerts.clear_after >= 1,
        "clear_after {}",
        alerts.clear_after
    );
    let pipeline = &config.pipeline;
    assert!(
        (1..=MAX_QUEUE_CAPACITY).contains(&pipeline.queue_capacity),
        "queue capacity {}",
        pipeline.queue_capacity
    );
    assert!(
        pipeline.deadline_ms >= 1,
        "deadline_ms {}",
        pipeline.deadline_ms
    );
    assert!(
        pipeline.watchdog_ms >= 1,
        "watchdog_ms {}",
        pipeline.watchdog_ms
    );
    true
}
