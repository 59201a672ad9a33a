//! Per-frame cost of the detector's stages on the shipped bundle and a real frame: the
//! backbone, and the detector's own work after it (gather, flow, scores), measured in the
//! same run so that their ratio is meaningful on any machine.
//!
//! Run with `cargo bench --bench frame`.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};

use daain::bundle::Bundle;
use daain::pipeline::{Detector, StageTimings};
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

fn first_frame() -> Frame {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/footage/solidWhiteRight.mp4");
    let mut source = open_source(&SourceSpec::Video(path), &SourceOptions::default()).unwrap();
    let mut frame = Frame::new();
    assert!(source.next_frame(&mut frame).unwrap());
    frame
}

fn stages(c: &mut Criterion) {
    let bundle = Bundle::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default")).unwrap();
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

criterion_group!(benches, stages);
criterion_main!(benches);
