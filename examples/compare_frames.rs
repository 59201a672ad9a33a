//! One variant of the side-by-side comparison in `benches/compare/run.sh`: the detector
//! of the shipped bundle with the f32 or int8 backbone on a thread count, over frames of
//! the shipped clip. Prints one JSON object with per-frame stage times in milliseconds and
//! the process's peak resident memory.
//!
//! ```sh
//! cargo run --release --example compare_frames -- --precision int8 --threads 1 \
//!     --frames 20 [--rounds 1] [--dump-inputs inputs.f32]
//! ```
//!
//! `--dump-inputs` writes the preprocessed input tensors (f32, little-endian,
//! `frames x 3 x 256 x 512`) so that other runtimes can be fed the same frames.
//! `--dump-calibration` writes every fourth of the bundle's training frames in the same
//! form, for calibrating another quantiser.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use daain::backbone::BackbonePrecision;
use daain::bundle::Bundle;
use daain::pipeline::{Detector, DetectorOptions, StageTimings};
use daain::preprocess::Preprocessor;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

struct Args {
    precision: BackbonePrecision,
    threads: usize,
    frames: usize,
    rounds: usize,
    dump_inputs: Option<PathBuf>,
    dump_calibration: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        precision: BackbonePrecision::F32,
        threads: 1,
        frames: 20,
        rounds: 1,
        dump_inputs: None,
        dump_calibration: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let value = iter
            .next()
            .with_context(|| format!("option {flag} needs a value"))?;
        match flag.as_str() {
            "--precision" => {
                args.precision = match value.as_str() {
                    "f32" => BackbonePrecision::F32,
                    "int8" => BackbonePrecision::Int8,
                    _ => bail!("--precision {value} is invalid: use f32 or int8"),
                }
            }
            "--threads" => args.threads = value.parse().context("--threads takes a count")?,
            "--frames" => args.frames = value.parse().context("--frames takes a count")?,
            "--rounds" => args.rounds = value.parse().context("--rounds takes a count")?,
            "--dump-inputs" => args.dump_inputs = Some(PathBuf::from(value)),
            "--dump-calibration" => args.dump_calibration = Some(PathBuf::from(value)),
            _ => bail!(
                "unknown option {flag}: use --precision, --threads, --frames, --rounds, \
                 --dump-inputs or --dump-calibration"
            ),
        }
    }
    if args.frames == 0 || args.threads == 0 || args.rounds == 0 {
        bail!("--frames, --threads and --rounds must be at least 1");
    }
    Ok(args)
}

fn read_clip(path: &Path) -> Result<Vec<Frame>> {
    let mut source = open_source(&SourceSpec::Video(path.to_owned()), &SourceOptions::default())?;
    let mut all = Vec::new();
    let mut frame = Frame::new();
    while source.next_frame(&mut frame)? {
        all.push(frame.clone());
    }
    Ok(all)
}

/// Writes the preprocessed input tensors of `frames` to `path`.
fn dump_inputs(bundle: &Bundle, frames: &[&Frame], path: &Path) -> Result<()> {
    let convention = bundle.manifest().input.clone();
    let mut preprocessor = Preprocessor::new(convention.clone());
    let mut input = vec![0.0f32; convention.tensor_len()];
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for frame in frames {
        preprocessor.run(&frame.data, frame.width, frame.height, &mut input)?;
        file.write_all(bytemuck::cast_slice(&input))?;
    }
    file.flush()?;
    Ok(())
}

/// Returns the peak resident set size of this process in KiB (Linux `VmHWM`).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> Result<()> {
    // As the daain binary does, so that the whole detector is measured as it runs there.
    daain::heap::tune_allocator();
    let args = parse_args()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = Bundle::open(&root.join("models/default"))?;
    let clip = read_clip(&root.join("data/footage/solidWhiteRight.mp4"))?;
    if clip.len() < args.frames {
        bail!("the clip has {} frames, fewer than --frames {}", clip.len(), args.frames);
    }
    // Frames spread evenly over the clip.
    let frames: Vec<Frame> = clip
        .iter()
        .step_by(clip.len() / args.frames)
        .take(args.frames)
        .cloned()
        .collect();
    if let Some(path) = &args.dump_inputs {
        dump_inputs(&bundle, &frames.iter().collect::<Vec<_>>(), path)?;
    }
    if let Some(path) = &args.dump_calibration {
        let train: Vec<u64> = serde_json::from_value(bundle.manifest().training["train_frames"].clone())
            .context("the bundle manifest lists no training.train_frames")?;
        let chosen: Vec<&Frame> = train
            .iter()
            .step_by(4)
            .filter_map(|&i| clip.get(i as usize))
            .collect();
        dump_inputs(&bundle, &chosen, path)?;
    }
    let options = DetectorOptions {
        threshold: None,
        precision: args.precision,
        threads: args.threads,
        ..Default::default()
    };
    let mut detector = Detector::with_options(&bundle, &options)?;
    detector.score_frame(&frames[0], false)?;
    let mut records: Vec<StageTimings> = Vec::new();
    let mut totals = Vec::new();
    for _ in 0..args.rounds {
        for frame in &frames {
            let start = std::time::Instant::now();
            let (_, timings) = detector.score_frame(frame, false)?;
            totals.push(start.elapsed().as_secs_f64() * 1e3);
            records.push(timings);
        }
    }
    let json = serde_json::json!({
        "runtime": "tract",
        "precision": args.precision.to_string(),
        "threads": args.threads,
        "frame_ms": totals,
        "backbone_ms": records.iter().map(|t| t.backbone_ms).collect::<Vec<_>>(),
        "after_backbone_ms": records
            .iter()
            .map(|t| t.sampling_ms + t.flow_ms + t.score_ms)
            .collect::<Vec<_>>(),
        "peak_rss_kib": peak_rss_kib(),
        "matmul_kernels": detector.backbone_kernels().matmul_kernels,
    });
    println!("{json}");
    Ok(())
}
