//! Prints where tract spends a backbone run, per operator, on a real frame of the shipped
//! clip: the share of each operator in the summed node times, over several runs.
//!
//! ```sh
//! cargo run --release --example profile_backbone -- [f32|int8] [RUNS] [MODEL.onnx]
//! ```
//!
//! MODEL replaces the default bundle's backbone of that precision, for comparing exports
//! of the same network; it must have the bundle's input, logits and tap names.
//!
//! `DAAIN_PRELU_FUSION=off` profiles tract's own lowering of PRelu instead of the fused
//! operator, and `DAAIN_DECONV_FUSION=off` tract's own transposed convolution instead of
//! the one-pass 2x2 operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use daain::backbone::{Backbone, BackbonePrecision, BackboneSpec};
use daain::bundle::Bundle;
use daain::preprocess::Preprocessor;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let precision = match args.next().as_deref() {
        None | Some("f32") => BackbonePrecision::F32,
        Some("int8") => BackbonePrecision::Int8,
        Some(other) => bail!("invalid precision {other:?}: pass f32 or int8"),
    };
    let runs: usize = match args.next() {
        None => 20,
        Some(text) => text
            .parse()
            .with_context(|| format!("invalid run count {text:?}: pass a positive integer"))?,
    };

    let model = args.next().map(PathBuf::from);

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = Bundle::open(&root.join("models/default"))?;
    let manifest = bundle.manifest();
    let path = match model {
        Some(path) => path,
        None => bundle.backbone_path_for(precision)?,
    };
    let mut backbone = Backbone::load(&BackboneSpec {
        path,
        input_height: manifest.input.height,
        input_width: manifest.input.width,
        logits: manifest.backbone.logits.clone(),
        taps: manifest
            .backbone
            .taps
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        threads: 1,
    })?;

    let spec = SourceSpec::Video(root.join("data/footage/solidWhiteRight.mp4"));
    let mut source = open_source(&spec, &SourceOptions::default())?;
    let mut frame = Frame::new();
    if !source.next_frame(&mut frame)? {
        bail!("the shipped clip has no frame");
    }
    Preprocessor::new(manifest.input.clone()).run(
        &frame.data,
        frame.width,
        frame.height,
        backbone.input_mut(),
    )?;

    // The first run allocates tract's buffers, so it is left out.
    backbone.profile_operators()?;
    let mut totals = BTreeMap::<String, Duration>::new();
    for _ in 0..runs {
        for (operator, time) in backbone.profile_operators()? {
            *totals.entry(operator).or_default() += time;
        }
    }
    let sum: Duration = totals.values().sum();
    let mut rows: Vec<_> = totals.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1));
    println!(
        "{precision} backbone, {runs} runs, {:.1} ms per run summed over nodes",
        sum.as_secs_f64() * 1e3 / runs as f64
    );
    for (operator, time) in rows {
        println!(
            "  {operator:24} {:7.2} ms  {:5.1}%",
            time.as_secs_f64() * 1e3 / runs as f64,
            100.0 * time.as_secs_f64() / sum.as_secs_f64()
        );
    }
    Ok(())
}
