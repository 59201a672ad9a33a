//! The shipped default bundle on real footage: held-out frames of the training clip score
//! mostly below the threshold, and the same frames flipped upside down or fogged mostly
//! above.

mod common;

use daain::bundle::Bundle;
use daain::pipeline::Detector;
use daain::source::Frame;

use common::{evenly_spaced, fog, frame_limit, held_out_indices, read_clip_frames, repo_path, vertical_flip};

fn fraction_above(detector: &mut Detector<'_>, frames: &[Frame]) -> f64 {
    let threshold = detector.threshold();
    let kind = detector.score_kind();
    let mut above = 0;
    for frame in frames {
        let (scores, _) = detector.score_frame(frame, false).unwrap();
        eprintln!("frame {:4}: {scores:?}", frame.index);
        if scores.get(kind) > threshold {
            above += 1;
        }
    }
    above as f64 / frames.len() as f64
}

#[test]
fn default_bundle_separates_clean_from_perturbed() {
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let indices = held_out_indices(&bundle);
    assert!(indices.len() >= 20, "only {} held-out frames", indices.len());
    let clean = read_clip_frames(&evenly_spaced(&indices, frame_limit(indices.len())));

    let clean_above = fraction_above(&mut detector, &clean);
    let flipped: Vec<Frame> = clean.iter().map(vertical_flip).collect();
    let flipped_above = fraction_above(&mut detector, &flipped);
    let fogged: Vec<Frame> = clean.iter().map(fog).collect();
    let fogged_above = fraction_above(&mut detector, &fogged);
    eprintln!("above threshold: clean {clean_above:.2}, flipped {flipped_above:.2}, fogged {fogged_above:.2}");

    assert!(clean_above <= 0.25, "{clean_above} of clean held-out frames above the threshold");
    assert!(flipped_above >= 0.75, "only {flipped_above} of flipped frames above the threshold");
    assert!(fogged_above >= 0.75, "only {fogged_above} of fogged frames above the threshold");
}
