//! Cost of sampling the tapped activations at the bundle's mask, on the real activations
//! of a frame of the shipped clip.
//!
//! - `gather/mask`: [`GatherPlan::gather`], which reads only the masked elements.
//! - `gather/upsample_then_index`: the peer, sampling as the reference Python pipeline
//!   does: every tap upsampled (nearest neighbour) to the input size, then the mask's
//!   points read from the upsampled maps. The maps are upsampled one tap at a time into one reused buffer,
//!   which is cheaper in memory than the reference and still does all the copying.
//!
//! Both produce the same vector (checked before timing). Run with
//! `cargo bench --bench gather`.


mod common;

use common::{first_frame, open_bundle};
use criterion::{criterion_group, criterion_main, Criterion};

use daain::backbone::{Backbone, BackboneSpec};
use daain::preprocess::Preprocessor;
use daain::sampling::{GatherPlan, TapShape};

/// Upsamples every tap to `height x width` (nearest neighbour, PyTorch's index rule)
/// and reads the points `(channel, y, x)` of the stacked space from the upsampled maps.
/// `points_by_tap[t]` lists `(output index, channel in tap t, y, x)`.
fn upsample_then_index(
    taps: &[TapShape],
    activations: &[&[f32]],
    points_by_tap: &[Vec<(usize, usize, usize, usize)>],
    (height, width): (usize, usize),
    upsampled: &mut [f32],
    output: &mut [f32],
) {
    for ((tap, values), points) in taps.iter().zip(activations).zip(points_by_tap) {
        let plane = height * width;
        for channel in 0..tap.channels {
            let source = &values[channel * tap.height * tap.width..][..tap.height * tap.width];
            let target = &mut upsampled[channel * plane..][..plane];
            for y in 0..height {
                let row = &source[(y * tap.height / height) * tap.width..][..tap.width];
                for (x, value) in target[y * width..][..width].iter_mut().enumerate() {
                    *value = row[x * tap.width / width];
                }
            }
        }
        for &(index, channel, y, x) in points {
            output[index] = upsampled[(channel * height + y) * width + x];
        }
    }
}

fn gather(c: &mut Criterion) {
    let bundle = open_bundle();
    let manifest = bundle.manifest();
    let (height, width) = (manifest.input.height, manifest.input.width);
    let mut backbone = Backbone::load(&BackboneSpec {
        path: bundle.backbone_path(),
        input_height: height,
        input_width: width,
        logits: manifest.backbone.logits.clone(),
        taps: manifest.backbone.taps.iter().map(|t| t.name.clone()).collect(),
        threads: 1,
    })
    .unwrap();
    let frame = first_frame();
    Preprocessor::new(manifest.input.clone())
        .run(&frame.data, frame.width, frame.height, backbone.input_mut())
        .unwrap();
    let output = backbone.run_in_place().unwrap();
    let activations = output.tap_slices();
    let taps = backbone.taps().to_vec();
    let points = bundle.mask_points().unwrap();
    let plan = GatherPlan::new(&points, &taps, height, width).unwrap();

    let mut points_by_tap = vec![Vec::new(); taps.len()];
    let mut first_channel = 0;
    let mut starts = Vec::new();
    for tap in &taps {
        starts.push(first_channel);
        first_channel += tap.channels;
    }
    for (index, &[channel, y, x]) in points.iter().enumerate() {
        let tap = starts.partition_point(|&s| s <= channel as usize) - 1;
        let local = channel as usize - starts[tap];
        points_by_tap[tap].push((index, local, y as usize, x as usize));
    }
    let widest = taps.iter().map(|t| t.channels).max().unwrap();
    let mut upsampled = vec![0.0f32; widest * height * width];

    let mut fast = vec![0.0f32; plan.len()];
    let mut slow = vec![0.0f32; plan.len()];
    plan.gather(&activations, &mut fast).unwrap();
    let mut upsample_all = |output: &mut [f32]| {
        upsample_then_index(
            &taps,
            &activations,
            &points_by_tap,
            (height, width),
            &mut upsampled,
            output,
        )
    };
    upsample_all(&mut slow);
    assert_eq!(fast, slow, "the two samplings disagree");

    let mut group = c.benchmark_group("gather");
    group.sample_size(10);
    group.bench_function("mask", |b| {
        b.iter(|| plan.gather(&activations, &mut fast).unwrap())
    });
    group.bench_function("upsample_then_index", |b| b.iter(|| upsample_all(&mut slow)));
    group.finish();
}

criterion_group!(benches, gather);
criterion_main!(benches);
