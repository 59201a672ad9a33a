//! Activation recording: frames of a video through the runtime's own preprocessing,
//! backbone and gather, so that training sees exactly the vectors the runtime will.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{imageops, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use daain::backbone::{Backbone, BackboneSpec};
use daain::preprocess::{InputConvention, Preprocessor};
use daain::sampling::GatherPlan;
use daain::source::{self, Frame, FrameSource, SourceOptions, SourceSpec};

use crate::perturb::jpeg_round_trip;

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
    /// Another exposure, white balance, focus or codec: every channel scaled by its gain
    /// (red, green, blue), then a Gaussian blur of `blur_sigma` pixels (none at 0), then a
    /// JPEG round trip at `jpeg_quality` when set.
    Photometric { gains: [f32; 3], blur_sigma: f32, jpeg_quality: Option<u8> },
}

/// Ranges that [`random_photometric`] draws from. Each variant changes exposure and white
/// balance; half of them also get a blur and half a JPEG round trip, independently.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhotometricRanges {
    /// Smallest and largest exposure gain, drawn uniformly in log space.
    pub exposure: [f64; 2],
    /// Largest relative change of the red and of the blue gain against green.
    pub white_balance: f64,
    /// Largest blur standard deviation, in pixels of the source frame.
    pub blur_sigma: f64,
    /// Lowest and highest JPEG quality.
    pub jpeg_quality: [u8; 2],
}

/// Draws `count` photometric variants within `ranges`.
pub fn random_photometric(count: usize, ranges: &PhotometricRanges, rng: &mut ChaCha8Rng) -> Vec<Augmentation> {
    let [low, high] = ranges.exposure.map(f64::ln);
    (0..count)
        .map(|_| {
            let exposure = rng.gen_range(low..=high).exp();
            let mut balance = || 1.0 + rng.gen_range(-ranges.white_balance..=ranges.white_balance);
            let (red, blue) = (balance(), balance());
            let gains = [exposure * red, exposure, exposure * blue].map(|gain| gain as f32);
            let blur_sigma =
                if ranges.blur_sigma > 0.0 && rng.gen_bool(0.5) { rng.gen_range(0.0..=ranges.blur_sigma) } else { 0.0 };
            let [worst, best] = ranges.jpeg_quality;
            let jpeg_quality = rng.gen_bool(0.5).then(|| rng.gen_range(worst..=best));
            Augmentation::Photometric { gains, blur_sigma: blur_sigma as f32, jpeg_quality }
        })
        .collect()
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
///
/// Fails only when a JPEG round trip fails (a frame too large to encode).
pub fn augment(frame: &Frame, augmentation: Augmentation) -> Result<Frame> {
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
        Augmentation::Photometric { gains, blur_sigma, jpeg_quality } => {
            out.resize(frame.width, frame.height);
            for (dst, src) in out.data.chunks_exact_mut(3).zip(frame.data.chunks_exact(3)) {
                for ((value, &source), gain) in dst.iter_mut().zip(src).zip(gains) {
                    *value = (f32::from(source) * gain).round().clamp(0.0, 255.0) as u8;
                }
            }
            if blur_sigma > 0.0 {
                let image = RgbImage::from_raw(frame.width as u32, frame.height as u32, std::mem::take(&mut out.data))
                    .context("frame buffer does not match its size")?;
                out.data = imageops::blur(&image, blur_sigma).into_raw();
            }
            if let Some(quality) = jpeg_quality {
                out.data = jpeg_round_trip(&out, quality)?;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(width: usize, height: usize) -> Frame {
        let mut frame = Frame::new();
        frame.resize(width, height);
        for (i, value) in frame.data.iter_mut().enumerate() {
            *value = (i * 7 % 256) as u8;
        }
        frame
    }

    const RANGES: PhotometricRanges =
        PhotometricRanges { exposure: [0.8, 1.25], white_balance: 0.06, blur_sigma: 1.0, jpeg_quality: [50, 90] };

    #[test]
    fn photometric_gains_scale_and_clip_each_channel() {
        let frame = gradient(8, 4);
        let neutral = Augmentation::Photometric { gains: [1.0; 3], blur_sigma: 0.0, jpeg_quality: None };
        assert_eq!(augment(&frame, neutral).unwrap().data, frame.data);

        let gains = [2.0, 1.0, 0.5];
        let changed = augment(&frame, Augmentation::Photometric { gains, blur_sigma: 0.0, jpeg_quality: None }).unwrap();
        for (out, (&source, gain)) in changed.data.iter().zip(frame.data.iter().zip(gains.iter().cycle())) {
            let expected = (f32::from(source) * gain).round().min(255.0) as u8;
            assert_eq!(*out, expected);
        }
    }

    #[test]
    fn photometric_blur_and_jpeg_change_pixels() {
        let frame = gradient(64, 32);
        for augmentation in [
            Augmentation::Photometric { gains: [1.0; 3], blur_sigma: 1.0, jpeg_quality: None },
            Augmentation::Photometric { gains: [1.0; 3], blur_sigma: 0.0, jpeg_quality: Some(50) },
        ] {
            let changed = augment(&frame, augmentation).unwrap();
            assert_eq!((changed.width, changed.height), (64, 32));
            assert_eq!(changed.data.len(), frame.data.len());
            assert_ne!(changed.data, frame.data, "{augmentation:?} changed nothing");
        }
    }

    #[test]
    fn photometric_draws_repeat_per_seed() {
        let draws = random_photometric(200, &RANGES, &mut augmentation_rng(7));
        assert_eq!(draws, random_photometric(200, &RANGES, &mut augmentation_rng(7)));
        let (mut blurred, mut encoded) = (0, 0);
        for draw in &draws {
            let Augmentation::Photometric { gains, blur_sigma, jpeg_quality } = *draw else {
                panic!("not photometric: {draw:?}");
            };
            let exposure = f64::from(gains[1]);
            assert!((0.8 - 1e-6..=1.25 + 1e-6).contains(&exposure), "exposure {exposure}");
            for balance in [gains[0] / gains[1], gains[2] / gains[1]] {
                assert!((0.94 - 1e-5..=1.06 + 1e-5).contains(&balance), "white balance {balance}");
            }
            assert!((0.0..=1.0).contains(&blur_sigma));
            blurred += usize::from(blur_sigma > 0.0);
            if let Some(quality) = jpeg_quality {
                assert!((50..=90).contains(&quality));
                encoded += 1;
            }
        }
        // Half of the draws blur and half encode, independently.
        assert!((70..=130).contains(&blurred), "{blurred} of 200 blurred");
        assert!((70..=130).contains(&encoded), "{encoded} of 200 encoded");
    }
}
