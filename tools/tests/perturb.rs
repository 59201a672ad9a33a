//! Perturbations on real frames: the dashcam stills in `data/footage/` and frames of
//! `solidWhiteRight.mp4`, decoded with the runtime's own sources.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use daain::source::{open_source, Frame, SourceOptions, SourceSpec};
use daain_tools::perturb::{FrostTextures, Perturbation};

fn footage(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/footage")
        .join(name)
}

/// Decodes the first `count` frames of a still or a video.
fn read_frames(spec: SourceSpec, count: usize) -> Vec<Frame> {
    let mut source = open_source(&spec, &SourceOptions::default()).unwrap();
    let mut frames = Vec::new();
    while frames.len() < count {
        let mut frame = Frame::new();
        if !source.next_frame(&mut frame).unwrap() {
            break;
        }
        frames.push(frame);
    }
    assert_eq!(
        frames.len(),
        count,
        "{spec:?} has fewer than {count} frames"
    );
    frames
}

fn still(name: &str) -> Frame {
    read_frames(SourceSpec::Stills(vec![footage(name)]), 1).remove(0)
}

fn video_frame(index: usize) -> Frame {
    let spec = SourceSpec::Video(footage("solidWhiteRight.mp4"));
    read_frames(spec, index + 1).remove(index)
}

fn mean_absolute_difference(a: &Frame, b: &Frame) -> f64 {
    assert_eq!(a.data.len(), b.data.len());
    let total: u64 = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    total as f64 / a.data.len() as f64
}

#[test]
fn names_round_trip() {
    let names: Vec<String> = Perturbation::ALL.iter().map(|p| p.to_string()).collect();
    let expected = [
        "fog",
        "frost",
        "colour-jitter",
        "vertical-flip",
        "gaussian-noise",
        "motion-blur",
        "brightness",
        "contrast",
        "jpeg",
    ];
    assert_eq!(names, expected);
    for perturbation in Perturbation::ALL {
        let parsed = Perturbation::from_str(perturbation.name()).unwrap();
        assert_eq!(parsed, perturbation);
    }
    let error = Perturbation::from_str("snow").unwrap_err().to_string();
    assert!(error.contains("unknown perturbation \"snow\""), "{error}");
    assert!(
        error.contains("colour-jitter"),
        "the message lists the names: {error}"
    );
}

#[test]
fn shipped_frost_textures_load() {
    let textures = FrostTextures::shipped().unwrap();
    assert_eq!(
        textures.len(),
        6,
        "{:?}",
        textures.paths().collect::<Vec<_>>()
    );
}

#[test]
fn seed_determines_output() {
    let frame = still("solidWhiteCurve.jpg");
    for perturbation in Perturbation::ALL {
        let first = perturbation.apply(&frame, 3, 7).unwrap();
        let again = perturbation.apply(&frame, 3, 7).unwrap();
        assert!(
            first.data == again.data,
            "{perturbation}: same seed, different bytes"
        );

        let other_seed = perturbation.apply(&frame, 3, 8).unwrap();
        if perturbation.is_random() {
            assert!(
                first.data != other_seed.data,
                "{perturbation}: seed has no effect"
            );
        } else {
            assert!(
                first.data == other_seed.data,
                "{perturbation}: depends on the seed"
            );
        }
    }
}

/// Mean absolute difference to `frame` at severities 1 to 5, averaged over `seeds`.
fn change_per_severity(frame: &Frame, perturbation: Perturbation, seeds: &[u64]) -> Vec<f64> {
    (1..=5)
        .map(|severity| {
            let total: f64 = seeds
                .iter()
                .map(|&seed| {
                    let perturbed = perturbation.apply(frame, severity, seed).unwrap();
                    mean_absolute_difference(frame, &perturbed)
                })
                .sum();
            total / seeds.len() as f64
        })
        .collect()
}

#[test]
fn severity_increases_change() {
    let frames = [video_frame(40), still("test5.jpg")];
    for frame in &frames {
        let size = format!("{}x{}", frame.width, frame.height);
        for perturbation in Perturbation::ALL {
            match perturbation {
                Perturbation::VerticalFlip => {
                    // A flip has no strength, so every severity gives the same frame.
                    let differences = change_per_severity(frame, perturbation, &[21]);
                    assert!(differences[0] > 0.5, "{size}: {differences:?}");
                    let first = differences[0];
                    assert!(
                        differences.iter().all(|&d| d == first),
                        "{size}: {differences:?}"
                    );
                }
                Perturbation::Fog | Perturbation::Frost => {
                    // With the ImageNet-C constants the change does not grow at every step
                    // (see the note in perturb.rs), only from severity 1 to 5.
                    let differences = change_per_severity(frame, perturbation, &[1, 2, 3, 21]);
                    assert!(
                        differences[0] > 0.5,
                        "{perturbation} on {size}: {differences:?}"
                    );
                    assert!(
                        differences[4] > differences[0],
                        "{perturbation} on {size}: mean absolute difference per severity \
                         {differences:?}"
                    );
                }
                _ => {
                    let differences = change_per_severity(frame, perturbation, &[21]);
                    assert!(
                        differences[0] > 0.5,
                        "{perturbation} on {size}: {differences:?}"
                    );
                    for pair in differences.windows(2) {
                        assert!(
                            pair[1] > pair[0],
                            "{perturbation} on {size}: mean absolute difference per severity \
                             {differences:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn sizes_are_kept() {
    let frames = [still("test1.jpg"), video_frame(0)];
    for frame in &frames {
        for perturbation in Perturbation::ALL {
            let perturbed = perturbation.apply(frame, 3, 1).unwrap();
            assert_eq!(perturbed.width, frame.width, "{perturbation}");
            assert_eq!(perturbed.height, frame.height, "{perturbation}");
            assert_eq!(perturbed.data.len(), frame.data.len(), "{perturbation}");
            assert_eq!(perturbed.index, frame.index, "{perturbation}");
            assert_eq!(perturbed.timestamp, frame.timestamp, "{perturbation}");
        }
    }
}

#[test]
fn perturbations_do_what_they_name() {
    let frame = still("whiteCarLaneSwitch.jpg");
    let (width, height) = (frame.width, frame.height);

    let flipped = Perturbation::VerticalFlip.apply(&frame, 1, 0).unwrap();
    for (x, y) in [(0, 0), (17, 100), (width - 1, height - 1), (480, 270)] {
        assert_eq!(
            flipped.pixel(x, y),
            frame.pixel(x, height - 1 - y),
            "pixel ({x}, {y})"
        );
    }

    // Contrast scales distances from the channel mean, so the mean stays.
    let reduced = Perturbation::Contrast.apply(&frame, 5, 0).unwrap();
    for channel in 0..3 {
        let mean = |f: &Frame| {
            let sum: u64 = f.data[channel..]
                .iter()
                .step_by(3)
                .map(|&v| u64::from(v))
                .sum();
            sum as f64 / (width * height) as f64
        };
        let (before, after) = (mean(&frame), mean(&reduced));
        assert!(
            (before - after).abs() < 1.0,
            "channel {channel}: {before} -> {after}"
        );
    }

    // Brightness raises the HSV value, the largest channel, and never lowers it.
    let brighter = Perturbation::Brightness.apply(&frame, 2, 0).unwrap();
    for (before, after) in frame
        .data
        .chunks_exact(3)
        .zip(brighter.data.chunks_exact(3))
    {
        let value_before = *before.iter().max().unwrap();
        let value_after = *after.iter().max().unwrap();
        assert!(value_after >= value_before, "{before:?} -> {after:?}");
    }

    // Gaussian noise at severity 1 has a standard deviation of 0.08 * 255 = 20.4 where
    // clipping cannot interfere.
    let noisy = Perturbation::GaussianNoise.apply(&frame, 1, 3).unwrap();
    let residuals: Vec<f64> = frame
        .data
        .iter()
        .zip(&noisy.data)
        .filter(|(&original, _)| (80..=175).contains(&original))
        .map(|(&original, &perturbed)| f64::from(perturbed) - f64::from(original))
        .collect();
    assert!(
        residuals.len() > 100_000,
        "{} mid-range values",
        residuals.len()
    );
    let mean = residuals.iter().sum::<f64>() / residuals.len() as f64;
    let variance =
        residuals.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / residuals.len() as f64;
    assert!(mean.abs() < 0.5, "noise mean {mean}");
    assert!(
        (variance.sqrt() - 20.4).abs() < 0.5,
        "noise standard deviation {}",
        variance.sqrt()
    );
}

#[test]
fn invalid_input_is_rejected() {
    let frame = video_frame(0);
    for perturbation in Perturbation::ALL {
        for severity in [0, 6, 255] {
            let error = perturbation
                .apply(&frame, severity, 0)
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("invalid severity {severity}")),
                "{perturbation}: {error}"
            );
        }

        let mut short = frame.clone();
        short.data.truncate(short.data.len() - 1);
        let error = perturbation.apply(&short, 1, 0).unwrap_err().to_string();
        assert!(
            error.contains("invalid frame buffer"),
            "{perturbation}: {error}"
        );

        let mut empty = frame.clone();
        empty.resize(0, 540);
        let error = perturbation.apply(&empty, 1, 0).unwrap_err().to_string();
        assert!(
            error.contains("invalid frame size 0x540"),
            "{perturbation}: {error}"
        );
    }

    let missing = FrostTextures::load(Path::new("/nonexistent/frost"));
    let error = format!("{:#}", missing.err().unwrap());
    assert!(
        error.contains("failed to read frost texture directory"),
        "{error}"
    );
}

/// Writes one example per perturbation at severity 3 as PNG, into the directory named by
/// `DAAIN_PERTURB_EXAMPLES` when it is set (to look at them), else into a temporary one.
#[test]
fn examples_written_as_png() {
    let temporary = tempfile::tempdir().unwrap();
    let dir = match std::env::var_os("DAAIN_PERTURB_EXAMPLES") {
        Some(dir) => PathBuf::from(dir),
        None => temporary.path().to_owned(),
    };
    std::fs::create_dir_all(&dir).unwrap();

    let frame = video_frame(100);
    for perturbation in Perturbation::ALL {
        let perturbed = perturbation.apply(&frame, 3, 2).unwrap();
        let path = dir.join(format!("{perturbation}-3.png"));
        let image = image::RgbImage::from_raw(
            perturbed.width as u32,
            perturbed.height as u32,
            perturbed.data,
        )
        .unwrap();
        image.save(&path).unwrap();

        let reread = image::open(&path).unwrap().to_rgb8();
        assert_eq!(
            reread.dimensions(),
            (frame.width as u32, frame.height as u32)
        );
    }
}
