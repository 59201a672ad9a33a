//! Activation recording: frames of a video through the runtime's own preprocessing,
//! backbone and gather, so that training sees exactly the vectors the runtime will.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use daain::backbone::{Backbone, BackboneSpec};
use daain::preprocess::{InputConvention, Preprocessor};
use daain::sampling::GatherPlan;
use daain::source::{self, Frame, FrameSource, SourceOptions, SourceSpec};

/// Preprocessing, backbone and gather for recording sampled activation vectors.
pub struct Recorder {
    preprocessor: Preprocessor,
    backbone: Backbone,
    gather: GatherPlan,
    input: Vec<f32>,
}

impl Recorder {
    pub fn new(backbone: Backbone, gather: GatherPlan, convention: InputConvention) -> Self {
        Self {
            input: vec![0.0; convention.tensor_len()],
            preprocessor: Preprocessor::new(convention),
            backbone,
            gather,
        }
    }

    pub fn dim(&self) -> usize {
        self.gather.len()
    }

    /// Writes the sampled activation vector of one RGB24 frame into `output`.
    pub fn record(&mut self, rgb: &[u8], width: usize, height: usize, output: &mut [f32]) -> Result<()> {
        self.preprocessor.run(rgb, width, height, &mut self.input)?;
        let result = self.backbone.run(&self.input)?;
        self.gather.gather(&result.tap_slices(), output)?;
        Ok(())
    }
}

/// Loads a backbone with the given taps at the convention's input size.
pub fn load_backbone(onnx: &Path, logits: &str, taps: &[String], convention: &InputConvention) -> Result<Backbone> {
    let spec = BackboneSpec {
        path: onnx.to_owned(),
        input_height: convention.height,
        input_width: convention.width,
        logits: logits.to_owned(),
        taps: taps.to_vec(),
        threads: 1,
    };
    Ok(Backbone::load(&spec)?)
}

/// Decodes every frame of a video into memory (RGB24).
pub fn read_video(path: &Path) -> Result<Vec<Frame>> {
    let mut source: Box<dyn FrameSource> =
        source::open_source(&SourceSpec::Video(path.to_owned()), &SourceOptions::default())
            .with_context(|| format!("failed to open video {}", path.display()))?;
    let mut frames = Vec::new();
    loop {
        let mut frame = Frame::new();
        if !source.next_frame(&mut frame)? {
            break;
        }
        frames.push(frame);
    }
    if frames.is_empty() {
        bail!("video {} has no frames", path.display());
    }
    Ok(frames)
}

/// An in-distribution change applied to a training frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Augmentation {
    /// Mirror left to right, as if driving on the other side of the lane.
    HorizontalFlip,
    /// Crop the window `(x, y, width, height)` (pixels); the preprocessor resizes it.
    Crop { x: usize, y: usize, width: usize, height: usize },
}

/// Draws `count` crops keeping `scale` of each side at random positions.
pub fn random_crops(width: usize, height: usize, count: usize, scale: f64, rng: &mut ChaCha8Rng) -> Vec<Augmentation> {
    let crop_w = ((width as f64) * scale).round() as usize;
    let crop_h = ((height as f64) * scale).round() as usize;
    (0..count)
        .map(|_| Augmentation::Crop {
            x: rng.gen_range(0..=width - crop_w),
            y: rng.gen_range(0..=height - crop_h),
            width: crop_w,
            height: crop_h,
        })
        .collect()
}

/// Returns a new seeded generator for augmentation choices.
pub fn augmentation_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Applies an augmentation and returns the new frame.
pub fn augment(frame: &Frame, augmentation: Augmentation) -> Frame {
    let mut out = Frame::new();
    out.index = frame.index;
    out.timestamp = frame.timestamp;
    match augmentation {
        Augmentation::HorizontalFlip => {
            out.resize(frame.width, frame.height);
            for y in 0..frame.height {
                for x in 0..frame.width {
                    let src = (y * frame.width + x) * 3;
                    let dst = (y * frame.width + (frame.width - 1 - x)) * 3;
                    out.data[dst..dst + 3].copy_from_slice(&frame.data[src..src + 3]);
                }
            }
        }
        Augmentation::Crop { x, y, width, height } => {
            out.resize(width, height);
            for row in 0..height {
                let src = ((y + row) * frame.width + x) * 3;
                let dst = row * width * 3;
                out.data[dst..dst + width * 3].copy_from_slice(&frame.data[src..src + width * 3]);
            }
        }
    }
    out
}
