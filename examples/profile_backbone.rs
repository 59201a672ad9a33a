//! Prints where tract spends a backbone run, per operator, on a real frame of the shipped
//! clip: the share of each operator in the summed node times, over several runs.
//!
//! ```sh
//! cargo run --release --example profile_backbone -- [f32|int8|plan] [RUNS] [MODEL.onnx]
//! ```
//!
//! `plan` profiles the bundle's combined plan (`plan.onnx`: backbone, gather and flow).
//! MODEL replaces the default bundle's model of that kind, for comparing exports of the
//! same network. It must have the bundle's input, logits and tap names.
//!
//! `DAAIN_PROFILE_THREADS=N` runs tract on N threads (default 1).
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
use daain::plan::{CombinedPlan, PlanSpec};
use daain::preprocess::Preprocessor;
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

fn main() -> Result<()> {
    // As the daain binary does; without it the time per run depends on glibc's state.
    daain::heap::tune_allocator();
    let mut args = std::env::args().skip(1);
    let kind = args.next().unwrap_or_else(|| "f32".to_owned());
    let precision = match kind.as_str() {
        "f32" | "plan" => BackbonePrecision::F32,
        "int8" => BackbonePrecision::Int8,
        other => bail!("invalid model kind {other:?}: pass f32, int8 or plan"),
    };
    let runs: usize = match args.next() {
        None => 20,
        Some(text) => text
            .parse()
            .with_context(|| format!("invalid run count {text:?}: pass a positive integer"))?,
    };

    let model = args.next().map(PathBuf::from);
    let threads: usize = match std::env::var("DAAIN_PROFILE_THREADS") {
        Err(_) => 1,
        Ok(text) => text.parse().with_context(|| {
            format!("invalid DAAIN_PROFILE_THREADS {text:?}: pass a positive integer")
        })?,
    };

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bundle = Bundle::open(&root.join("models/default"))?;
    let manifest = bundle.manifest();
    let mut target = if kind == "plan" {
        let path = match model {
            Some(path) => path,
            None => bundle
                .plan_path()
                .context("the default bundle has no plan.onnx")?,
        };
        Target::Plan(CombinedPlan::load(&PlanSpec {
            path,
            input_height: manifest.input.height,
            input_width: manifest.input.width,
            logits: manifest.backbone.logits.clone(),
            dim: manifest.flow.dim,
            threads,
            mask_sha256: manifest.mask.file.sha256.clone(),
            flow_sha256: manifest.flow.file.sha256.clone(),
        })?)
    } else {
        let mut spec = BackboneSpec::from_bundle(&bundle, precision, threads)?;
        if let Some(path) = model {
            spec.path = path;
        }
        Target::Backbone(Backbone::load(&spec)?)
    };

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
        target.input_mut(),
    )?;

    // The first run allocates tract's buffers, so it is left out.
    target.profile_operators()?;
    let mut totals = BTreeMap::<String, Duration>::new();
    for _ in 0..runs {
        for (operator, time) in target.profile_operators()? {
            *totals.entry(operator).or_default() += time;
        }
    }
    let sum: Duration = totals.values().sum();
    let mut rows: Vec<_> = totals.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1));
    println!(
        "{kind} model, {threads} thread(s), {runs} runs, {:.1} ms per run summed over nodes",
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

/// The model profiled: a backbone alone or the combined plan.
enum Target {
    Backbone(Backbone),
    Plan(CombinedPlan),
}

impl Target {
    fn input_mut(&mut self) -> &mut [f32] {
        match self {
            Target::Backbone(backbone) => backbone.input_mut(),
            Target::Plan(plan) => plan.input_mut(),
        }
    }

    fn profile_operators(&mut self) -> Result<BTreeMap<String, Duration>> {
        Ok(match self {
            Target::Backbone(backbone) => backbone.profile_operators()?,
            Target::Plan(plan) => plan.profile_operators()?,
        })
    }
}
