//! Time of one ESPNet run through tract on a real frame of the shipped clip: the bundle's
//! f32 and int8 backbones, on 1 and 2 threads, and f32 without each of the loader's
//! rewrites (`daain::backbone::Rewrites`): without the BatchNorm+PRelu fusion (tract's
//! own lowering of PRelu to Mul, Greater and Iff), without the one-pass 2x2 transposed
//! convolution (tract's matmul and `DeconvSum`), without the 3x3 convolution, and without
//! any, int8 without the int8 3x3 convolution (tract's `ConvInteger`), and both on 2
//! threads without the band operators (tract's Add, Concat, reshape and pooling).
//! Criterion times each variant alone, and then an interleaved loop (one run of each
//! variant per round, so that load from other processes hits all of them alike) prints
//! each variant's median as a ratio to f32 on 1 thread. In that loop every variant's plan
//! is loaded at once and the threads of a pool sleep while the other variants run, which
//! penalises the variants on 2 threads.
//!
//! Run with `cargo bench --bench backbone`. `DAAIN_BENCH_ROUNDS` sets the rounds of the
//! interleaved loop (default 20).

use std::time::Instant;

mod common;

use common::{first_frame, open_bundle};
use criterion::{criterion_group, criterion_main, Criterion};

use daain::backbone::{Backbone, BackbonePrecision, BackboneSpec, Rewrites};
use daain::bundle::Bundle;
use daain::preprocess::Preprocessor;

fn load(
    bundle: &Bundle,
    precision: BackbonePrecision,
    threads: usize,
    rewrites: Rewrites,
) -> Backbone {
    let spec = BackboneSpec::from_bundle(bundle, precision, threads).unwrap();
    Backbone::load_with(&spec, rewrites).unwrap()
}

fn backbones(c: &mut Criterion) {
    let bundle = open_bundle();
    let frame = first_frame();
    let mut input = vec![0.0; bundle.manifest().input.tensor_len()];
    Preprocessor::new(bundle.manifest().input.clone())
        .run(&frame.data, frame.width, frame.height, &mut input)
        .unwrap();
    let mut specs: Vec<(String, BackbonePrecision, usize, Rewrites)> = [
        (BackbonePrecision::F32, 1),
        (BackbonePrecision::Int8, 1),
        (BackbonePrecision::F32, 2),
        (BackbonePrecision::Int8, 2),
    ]
    .into_iter()
    .map(|(precision, threads)| {
        let name = format!("{precision}_{threads}_thread");
        (name, precision, threads, Rewrites::ALL)
    })
    .collect();
    let without = [
        (
            "f32_no_prelu_fusion",
            Rewrites {
                prelu: false,
                ..Rewrites::ALL
            },
        ),
        (
            "f32_no_deconv_rewrite",
            Rewrites {
                deconv: false,
                ..Rewrites::ALL
            },
        ),
        (
            "f32_no_conv3x3_rewrite",
            Rewrites {
                conv3x3: false,
                ..Rewrites::ALL
            },
        ),
        ("f32_no_rewrites", Rewrites::NONE),
    ];
    for (name, rewrites) in without {
        specs.push((name.to_string(), BackbonePrecision::F32, 1, rewrites));
    }
    // The int8 model's 3x3 convolutions as tract lowers `ConvInteger` and the operators
    // around it.
    let tract_int8 = Rewrites {
        qconv3x3: false,
        ..Rewrites::ALL
    };
    specs.push((
        "int8_no_qconv3x3_rewrite".to_string(),
        BackbonePrecision::Int8,
        1,
        tract_int8,
    ));
    // tract's own additions, concatenations, reshapes and pooling on two threads, where
    // the band operators matter most.
    let no_bands = Rewrites {
        bands: false,
        ..Rewrites::ALL
    };
    for precision in [BackbonePrecision::F32, BackbonePrecision::Int8] {
        let name = format!("{precision}_2_thread_no_band_ops");
        specs.push((name, precision, 2, no_bands));
    }

    // Criterion times each variant with no other backbone loaded, as a process that runs
    // the detector has one.
    let mut group = c.benchmark_group("backbone");
    group.sample_size(10);
    for (name, precision, threads, rewrites) in &specs {
        let mut backbone = load(&bundle, *precision, *threads, *rewrites);
        group.bench_function(name.as_str(), |b| b.iter(|| backbone.run(&input).unwrap()));
    }
    group.finish();

    let mut variants: Vec<(String, Backbone)> = specs
        .iter()
        .map(|(name, precision, threads, rewrites)| {
            let backbone = load(&bundle, *precision, *threads, *rewrites);
            (name.clone(), backbone)
        })
        .collect();
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
        println!("  {name:30} {median:8.1} ms  {:.2}x", median / medians[0]);
    }
}

criterion_group!(benches, backbones);
criterion_main!(benches);
