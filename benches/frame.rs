//! Per-frame cost of the detector on the shipped bundle and a real frame.
//!
//! - `frame/preprocess_backbone_gather` and `frame/flow_and_scores`: the stages out of
//!   plan, the backbone and the detector's own work after it.
//! - `execution/out-of-plan` and `execution/in-plan`: a whole frame (`score_frame`) with
//!   gather and flow after the backbone plan, and with backbone, gather and flow in the
//!   one combined plan of `plan.onnx`. Each iteration of either benchmark runs one frame
//!   in both modes, alternately, and times only its own, so both see the same machine
//!   load and their ratio is meaningful on a shared machine.
//!
//! Run with `cargo bench --bench frame`.

use std::time::{Duration, Instant};

mod common;

use common::{first_frame, open_bundle};
use criterion::{criterion_group, criterion_main, Criterion};

use daain::pipeline::{Detector, ExecutionMode, StageTimings};
use daain::source::Frame;

fn stages(c: &mut Criterion) {
    let bundle = open_bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let frame = first_frame();
    let mut timings = StageTimings::default();
    detector.sample_frame(&frame, false, &mut timings).unwrap();

    let mut group = c.benchmark_group("frame");
    group.sample_size(20);
    group.bench_function("preprocess_backbone_gather", |b| {
        b.iter(|| detector.sample_frame(&frame, false, &mut timings).unwrap())
    });
    group.bench_function("flow_and_scores", |b| {
        b.iter(|| detector.score_sample(&mut timings).unwrap())
    });
    group.finish();
}

/// Runs `iters` frames through `timed` and as many through `other`, alternately, and
/// returns the time `timed` took.
fn alternate(timed: &mut Detector<'_>, other: &mut Detector<'_>, frame: &Frame, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        other.score_frame(frame, false).unwrap();
        let start = Instant::now();
        timed.score_frame(frame, false).unwrap();
        total += start.elapsed();
    }
    total
}

fn execution_modes(c: &mut Criterion) {
    let bundle = open_bundle();
    let frame = first_frame();
    let mut out_of_plan = Detector::with_mode(&bundle, None, ExecutionMode::OutOfPlan).unwrap();
    let mut in_plan = Detector::with_mode(&bundle, None, ExecutionMode::InPlan).unwrap();

    let mut group = c.benchmark_group("execution");
    group.sample_size(10);
    group.bench_function("out-of-plan", |b| {
        b.iter_custom(|iters| alternate(&mut out_of_plan, &mut in_plan, &frame, iters))
    });
    group.bench_function("in-plan", |b| {
        b.iter_custom(|iters| alternate(&mut in_plan, &mut out_of_plan, &frame, iters))
    });
    group.finish();
}

criterion_group!(benches, stages, execution_modes);
criterion_main!(benches);
