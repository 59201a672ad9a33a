//! The runtime's segmentation (the class maps `daain run --segmentation-out` writes)
//! against ESPNet in libtorch, on frames of the shipped clip decoded by the runtime.

use std::path::{Path, PathBuf};

use daain::bundle::Bundle;
use daain::pipeline::{write_class_png, Detector};
use daain::preprocess::{InputConvention, Preprocessor};
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};
use daain_tools::espnet::{Espnet, NUM_CLASSES};
use tch::{Kind, Tensor};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

fn frames(indices: &[u64]) -> Vec<Frame> {
    let spec = SourceSpec::Video(repo_path("data/footage/solidWhiteRight.mp4"));
    let mut source = open_source(&spec, &SourceOptions::default()).unwrap();
    let mut frame = Frame::new();
    let mut out = Vec::new();
    while source.next_frame(&mut frame).unwrap() {
        if indices.contains(&frame.index) {
            out.push(frame.clone());
        }
    }
    out
}

#[test]
fn runtime_segmentation_matches_libtorch() {
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let model = Espnet::load(&repo_path("models/espnet/espnet_p_2_q_8.pth")).unwrap();
    let mut preprocessor = Preprocessor::new(InputConvention::espnet_cityscapes());
    let mut input = vec![0.0f32; 3 * 256 * 512];
    let dir = tempfile::tempdir().unwrap();

    for frame in frames(&[0, 100, 220]) {
        detector.score_frame(&frame, true).unwrap();
        let png = dir.path().join(format!("{:06}.png", frame.index));
        write_class_png(&png, detector.segmentation(), detector.segmentation_size()).unwrap();
        let runtime_classes = image::open(&png).unwrap().to_luma8().into_raw();

        preprocessor
            .run(&frame.data, frame.width, frame.height, &mut input)
            .unwrap();
        let logits = tch::no_grad(|| {
            model
                .forward(&Tensor::from_slice(&input).reshape([1, 3, 256, 512]))
                .unwrap()
        });
        let torch_classes: Vec<i64> =
            Vec::try_from(&logits.argmax(1, false).to_kind(Kind::Int64).flatten(0, -1)).unwrap();

        assert_eq!(runtime_classes.len(), torch_classes.len());
        let agree = runtime_classes
            .iter()
            .zip(&torch_classes)
            .filter(|(a, b)| **a as i64 == **b)
            .count();
        let agreement = agree as f64 / runtime_classes.len() as f64;
        eprintln!("frame {}: argmax agreement {agreement:.5}", frame.index);
        assert!(
            agreement >= 0.999,
            "frame {}: only {agreement} of pixels agree",
            frame.index
        );
        assert!(runtime_classes.iter().all(|&c| (c as usize) < NUM_CLASSES));
    }
}
