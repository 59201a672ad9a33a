//! The fuzz target bodies of `daain::fuzzing` on seeds made from the real files (the
//! default bundle, `configs/default.toml`) and on deterministic mutations of them: bit
//! flips, byte overwrites, truncations, deletions, duplications and splices from a fixed
//! seed. A panic in either body fails the test. The cargo-fuzz targets in `fuzz/` run the
//! same bodies under libFuzzer.
//!
//! Bundle mutations go to one file at a time, and mostly to the manifest and the
//! safetensors headers, where the parsing is. The harness rewrites the manifest's hashes
//! to match the mutated files, so most inputs reach the weight readers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use daain::fuzzing::{bundle_reader, config_parser, BundleInput, BundleReach};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Mutated inputs per target. The bundle body hashes and parses about 2.8 MB per input,
/// so it gets fewer.
const BUNDLE_MUTATIONS: usize = 600;
const CONFIG_MUTATIONS: usize = 4000;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn bundle_seed() -> BundleInput {
    BundleInput::from_dir(&repo_path("models/default")).expect("the default bundle reads")
}

/// Returns the shipped config, and the same file with every commented-out key set.
fn config_seeds() -> Vec<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(repo_path("configs/default.toml")).unwrap();
    let every_key: String = text
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(setting) if setting.contains(" = ") => setting,
            _ => line,
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    vec![
        ("default.toml".into(), text.into_bytes()),
        ("every-key.toml".into(), every_key.into_bytes()),
    ]
}

/// Length of the safetensors header (8-byte length plus JSON), or the whole file when
/// the length field is unreadable.
fn safetensors_header_len(bytes: &[u8]) -> usize {
    let Some(len) = bytes.first_chunk::<8>() else {
        return bytes.len();
    };
    (u64::from_le_bytes(*len) as usize)
        .saturating_add(8)
        .min(bytes.len())
}

/// Values that often hit edge cases in parsers: zero, sign and size boundaries, and the
/// JSON and TOML characters that change structure.
const INTERESTING_BYTES: [u8; 12] = [
    0, 1, 0x7f, 0x80, 0xff, b'-', b'9', b'"', b'[', b'{', b'.', b'e',
];

/// Numbers that replace a whole number in JSON or TOML text: zero, negative values, the
/// limits of `u32`, `u64` and `usize`, and floats that overflow or lose every digit.
const INTERESTING_NUMBERS: [&str; 10] = [
    "0",
    "1",
    "-1",
    "2",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "1e-320",
];

/// Applies one random mutation to `bytes`, restricted to `bytes[..region]` where it picks
/// a position. `donor` provides the bytes of a splice.
fn mutate(rng: &mut ChaCha8Rng, bytes: &mut Vec<u8>, region: usize, donor: &[u8]) {
    let region = region.min(bytes.len());
    if region == 0 {
        bytes.extend_from_slice(&donor[..donor.len().min(64)]);
        return;
    }
    let at = rng.gen_range(0..region);
    match rng.gen_range(0..8) {
        0 => {
            for _ in 0..rng.gen_range(1..=4) {
                let position = rng.gen_range(0..region);
                bytes[position] ^= 1 << rng.gen_range(0..8);
            }
        }
        1 => bytes[at] = INTERESTING_BYTES[rng.gen_range(0..INTERESTING_BYTES.len())],
        2 => bytes.truncate(at),
        3 => {
            let end = (at + rng.gen_range(1..=16)).min(bytes.len());
            bytes.drain(at..end);
        }
        4 => {
            let end = (at + rng.gen_range(1..=16)).min(bytes.len());
            let copy = bytes[at..end].to_vec();
            bytes.splice(at..at, copy);
        }
        5 => {
            // Splice: keep the head, continue with the donor from a random point.
            let from = rng.gen_range(0..donor.len().max(1));
            bytes.truncate(at);
            bytes.extend_from_slice(&donor[from.min(donor.len())..]);
        }
        6 => {
            // Replace one digit of the next number, which changes sizes and shapes.
            if let Some(offset) = bytes[at..region].iter().position(u8::is_ascii_digit) {
                bytes[at + offset] = b'0' + rng.gen_range(0..10);
            }
        }
        _ => {
            // Replace the whole next number with an edge-case value.
            if let Some(offset) = bytes[at..region].iter().position(u8::is_ascii_digit) {
                let start = at + offset;
                let len = bytes[start..]
                    .iter()
                    .position(|b| !(b.is_ascii_digit() || b".eE+-".contains(b)))
                    .unwrap_or(bytes.len() - start);
                let number = INTERESTING_NUMBERS[rng.gen_range(0..INTERESTING_NUMBERS.len())];
                bytes.splice(start..start + len, number.bytes());
            }
        }
    }
}

#[test]
fn bundle_seed_reaches_every_stage() {
    let seed = bundle_seed();
    assert_eq!(BundleInput::decode(&seed.encode()), seed);
    assert_eq!(bundle_reader(&seed.encode()), BundleReach::Scored);

    let mut altered = seed.clone();
    altered.keep_hashes = true;
    assert_eq!(
        bundle_reader(&altered.encode()),
        BundleReach::Rejected,
        "the seed leaves the backbone empty, so its original hash must fail"
    );
}

#[test]
fn bundle_reader_survives_edge_numbers() {
    // Every size and count in the manifest, set to each edge-case number in turn.
    const FIELDS: [(&str, &str); 9] = [
        ("input", "height"),
        ("input", "width"),
        ("backbone", "classes"),
        ("mask", "points"),
        ("flow", "dim"),
        ("flow", "blocks"),
        ("flow", "hidden"),
        ("score", "mahalanobis_components"),
        ("threshold", "calibration_frames"),
    ];
    let seed = bundle_seed();
    let manifest: serde_json::Value = serde_json::from_slice(&seed.manifest).unwrap();
    let mut cases: Vec<(String, serde_json::Value)> = Vec::new();
    for (section, key) in FIELDS {
        for number in INTERESTING_NUMBERS {
            let mut edited = manifest.clone();
            edited[section][key] = serde_json::from_str(number).unwrap();
            cases.push((format!("{section}.{key} = {number}"), edited));
        }
    }
    for number in INTERESTING_NUMBERS {
        let mut edited = manifest.clone();
        edited["score"]["hbos"]["bins"] = serde_json::from_str(number).unwrap();
        cases.push((format!("score.hbos.bins = {number}"), edited));
    }
    for (case, edited) in cases {
        let mut input = seed.clone();
        input.manifest = serde_json::to_vec(&edited).unwrap();
        eprintln!("{case}: {:?}", bundle_reader(&input.encode()));
    }
}

#[test]
fn bundle_reader_survives_mutations() {
    let seed = bundle_seed();
    let mut rng = ChaCha8Rng::seed_from_u64(0x0da1_17ed);
    let mut reached: HashMap<BundleReach, usize> = HashMap::new();
    for _ in 0..BUNDLE_MUTATIONS {
        let mut input = seed.clone();
        // One input in 16 keeps the manifest's hashes, which exercises the hash check.
        input.keep_hashes = rng.gen_range(0..16) == 0;
        let part = rng.gen_range(0..4);
        let donor_part = rng.gen_range(0..4);
        let donor = if donor_part == 0 {
            seed.manifest.clone()
        } else {
            seed.files[donor_part].clone()
        };
        let bytes = if part == 0 {
            &mut input.manifest
        } else {
            &mut input.files[part]
        };
        // Three mutations in four go to the safetensors header.
        let region = if part == 0 || rng.gen_range(0..4) == 0 {
            bytes.len()
        } else {
            safetensors_header_len(bytes)
        };
        for _ in 0..rng.gen_range(1..=3) {
            mutate(&mut rng, bytes, region, &donor);
        }
        *reached.entry(bundle_reader(&input.encode())).or_default() += 1;
    }
    eprintln!("bundle inputs by reach: {reached:?}");
    // Without the hash rewrite, nearly every input would stop at the hash check.
    let opened = BUNDLE_MUTATIONS - reached.get(&BundleReach::Rejected).copied().unwrap_or(0);
    assert!(
        opened >= BUNDLE_MUTATIONS / 4,
        "only {opened} of {BUNDLE_MUTATIONS} inputs opened: {reached:?}"
    );
    assert!(
        reached.contains_key(&BundleReach::Scored),
        "no mutated input reached the scores: {reached:?}"
    );
}

#[test]
fn config_parser_survives_mutations() {
    let seeds = config_seeds();
    for (name, seed) in &seeds {
        assert!(config_parser(seed), "seed {name} is rejected");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0xc0f1_6);
    let mut accepted = 0;
    for _ in 0..CONFIG_MUTATIONS {
        let (_, seed) = &seeds[rng.gen_range(0..seeds.len())];
        let (_, donor) = &seeds[rng.gen_range(0..seeds.len())];
        let mut input = seed.clone();
        for _ in 0..rng.gen_range(1..=4) {
            let region = input.len();
            mutate(&mut rng, &mut input, region, donor);
        }
        accepted += usize::from(config_parser(&input));
    }
    eprintln!("{accepted} of {CONFIG_MUTATIONS} mutated configs accepted");
    assert!(accepted > 0, "no mutated config was accepted");
}

/// Writes the seed corpora of the cargo-fuzz targets into `fuzz/corpus/`. Run it once
/// before `cargo fuzz run`:
/// `cargo test --test fuzz_smoke -- --ignored write_seed_corpus`.
#[test]
#[ignore = "writes into the source tree; run by hand before fuzzing"]
fn write_seed_corpus() {
    let bundle_dir = repo_path("fuzz/corpus/bundle_reader");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    std::fs::write(bundle_dir.join("default-bundle"), bundle_seed().encode()).unwrap();

    let config_dir = repo_path("fuzz/corpus/config_parser");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (name, seed) in config_seeds() {
        std::fs::write(config_dir.join(name), seed).unwrap();
    }
}
