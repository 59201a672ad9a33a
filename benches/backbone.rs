//! Time of one ESPNet run through tract on a real frame of the shipped clip: the bundle's
//! f32 and int8 backbones, on 1 and 2 threads, and f32 without the BatchNorm+PRelu
//! fusion of `daain::prelu` (tract's own lowering of PRelu to Mul, Greater and Iff). Criterion times each variant, and then an
//! interleaved loop (one run of each variant per round, so that load from other processes
//! hits all of them alike) prints each variant's median as a ratio to f32 on 1 thread.
//!
//! Run with `cargo bench --bench backbone`. `DAAIN_BENCH_ROUNDS` sets the rounds of the
//! interleaved loop (default 20).

use std::time::Instant;

mod common;

use common::{first_frame, open_bundle};
use criterion::{criterion_group, criterion_main, Criterion};

use daain::backbone::{Backbone, BackbonePrecision, BackboneSpec};
use daain::bundle::Bundle;
use daain::preprocess::Preprocessor;

fn load(bundle: &Bundle, precision: BackbonePrecision, threads: usize) -> Backbone {
    let manifest = bundle.manifest();
    let spec = BackboneSpec {
        path: bundle.backbone_path_for(precision).unwrap(),
        input_height: manifest.input.height,
        input_width: manifest.input.width,
        logits: manifest.backbone.logits.clone(),
        taps: manifest.backbone.taps.iter().map(|t| t.name.clone()).collect(),
        threads,
    };
    Backbone::load(&spec).unwrap()
}

fn backbones(c: &mut Criterion) {
    let bundle = open_bundle();
    let frame = first_frame();
    let mut input = vec![0.0; bundle.manifest().input.tensor_len()];
    Preprocessor::new(bundle.manifest().input.clone())
        .run(&frame.data, frame.width, frame.height, &mut input)
        .unwrap();
    let mut variants: Vec<(String, Backbone)> = [
        (BackbonePrecision::F32, 1),
        (BackbonePrecision::Int8, 1),
        (BackbonePrecision::F32, 2),
        (BackbonePrecision::Int8, 2),
    ]
    .into_iter()
    .map(|(precision, threads)| {
        (format!("{precision}_{threads}_thread"), load(&bundle, precision, threads))
    })
    .collect();
    // The fusion is decided when a backbone loads, from this variable.
    std::env::set_var("DAAIN_PRELU_FUSION", "off");
    variants.push((
        "f32_unfused_1_thread".to_string(),
        load(&bundle, BackbonePrecision::F32, 1),
    ));
    std::env::remove_var("DAAIN_PRELU_FUSION");

    let mut group = c.benchmark_group("backbone");
    group.sample_size(10);
    for (name, backbone) in &mut variants {
        group.bench_function(name.as_str(), |b| b.iter(|| backbone.run(&input).unwrap()));
    }
    group.finish();

    let rounds: usize = std::env::var("DAAIN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut times = vec![Vec::with_capacity(rounds); variants.len()];
    for _ in 0..rounds {
        for ((_, backbone), samples) in variants.iter_mut().zip(&mut times) {
            let start = Instant::now();
            backbone.run(&input).unwrap();
            samples.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|samples| {
            samples.sort_by(f64::total_cmp);
            samples[samples.len() / 2]
        })
        .collect();
    println!("interleaved medians over {rounds} rounds, as a ratio to f32 on 1 thread:");
    for ((name, _), median) in variants.iter().zip(&medians) {
        println!("  {name:16} {median:8.1} ms  {:.2}x", median / medians[0]);
    }
}

criterion_group!(benches, backbones);
criterion_main!(benches);
