//! Perturbations of RGB24 frames, for measuring how well a bundle detects corrupted input.
//!
//! Each [`Perturbation`] takes a severity from 1 (mild) to 5 (strong) and a seed. The same
//! frame, severity and seed always give the same bytes. Every random choice (fog map, frost
//! texture and crop, jitter direction, noise, blur angle) is drawn from ChaCha8 before the
//! severity is applied, so one seed gives the same fog map, texture or noise at every
//! severity and only the strength changes.
//!
//! Fog, frost, Gaussian noise, brightness, contrast and JPEG follow the ImageNet-C
//! corruptions of Hendrycks and Dietterich, with their severity constants, as written in
//! `ImageNet-C/imagenet_c/imagenet_c/corruptions.py` of github.com/hendrycks/robustness.
//! That code works on 224x224 images. Here fog uses a fractal map of the next power of two
//! above the longer frame side, and frost scales its texture up to cover the frame, as the
//! `imagecorruptions` package does for arbitrary sizes.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::imageops::{self, FilterType};
use image::{ExtendedColorType, ImageFormat, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use daain::source::Frame;

/// Mildest severity.
pub const MIN_SEVERITY: u8 = 1;
/// Strongest severity.
pub const MAX_SEVERITY: u8 = 5;

// NOTE: fog and frost keep the ImageNet-C constants, so that results compare with the
// literature, but their mean absolute change to the frame does not grow at every step. On
// solidWhiteRight.mp4 and test5.jpg it fell from severity 3 to 4 (frost lowers only the
// image weight there, fog only the wibble decay) and for some seeds from 2 to 3 (fog). It
// grows from severity 1 to 5 on average over seeds, which tools/tests/perturb.rs checks.

/// Fog: `(strength, wibble decay)` per severity. The strength scales the fractal haze that
/// is added to the image, and a lower decay gives the haze more fine detail.
const FOG: [(f32, f64); 5] = [(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)];
/// Frost: `(image weight, texture weight)` per severity.
const FROST: [(f32, f32); 5] = [(1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)];
/// Gaussian noise: standard deviation per severity, with pixel values scaled to 0..1.
const NOISE_SIGMA: [f32; 5] = [0.08, 0.12, 0.18, 0.26, 0.38];
/// Brightness: amount added to the HSV value channel (0..1) per severity.
const BRIGHTNESS: [f32; 5] = [0.1, 0.2, 0.3, 0.4, 0.5];
/// Contrast: factor applied to each pixel's distance from its channel mean per severity.
const CONTRAST: [f32; 5] = [0.4, 0.3, 0.2, 0.1, 0.05];
/// JPEG: encoder quality per severity.
const JPEG_QUALITY: [u8; 5] = [25, 18, 15, 10, 7];

// The constants below are this module's own choices, not ImageNet-C's.

/// Colour jitter: largest hue rotation per severity, as a fraction of the hue circle.
const HUE_SHIFT: [f32; 5] = [0.04, 0.08, 0.12, 0.16, 0.2];
/// Colour jitter: largest relative saturation change per severity. Saturation is scaled
/// by `1 + change` or `1 - change / 2`, depending on a random direction.
const SATURATION_CHANGE: [f32; 5] = [0.3, 0.6, 0.9, 1.2, 1.5];
/// Motion blur: line length per severity, as a fraction of the longer frame side. At
/// 960x540 this is 19 to 77 pixels.
const BLUR_LENGTH: [f32; 5] = [0.02, 0.035, 0.05, 0.065, 0.08];

/// A corruption of a camera frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Perturbation {
    /// Plasma-fractal haze added to the image, then the contrast renormalised (ImageNet-C).
    Fog,
    /// Blend with a randomly chosen and cropped frost texture (ImageNet-C).
    Frost,
    /// Random hue rotation and saturation change.
    ColourJitter,
    /// Frame mirrored top to bottom. The severity is checked but does not change the output.
    VerticalFlip,
    /// Additive Gaussian noise on every channel (ImageNet-C).
    GaussianNoise,
    /// Average along a line of pixels at a random angle, as from camera motion.
    MotionBlur,
    /// HSV value increased (ImageNet-C).
    Brightness,
    /// Pixel values pulled towards their channel mean (ImageNet-C).
    Contrast,
    /// Re-encoding as JPEG at low quality (ImageNet-C qualities).
    Jpeg,
}

impl Perturbation {
    /// Every perturbation, in declaration order.
    pub const ALL: [Perturbation; 9] = [
        Perturbation::Fog,
        Perturbation::Frost,
        Perturbation::ColourJitter,
        Perturbation::VerticalFlip,
        Perturbation::GaussianNoise,
        Perturbation::MotionBlur,
        Perturbation::Brightness,
        Perturbation::Contrast,
        Perturbation::Jpeg,
    ];

    /// Returns the kebab-case name that [`FromStr`] and [`fmt::Display`] use.
    pub fn name(self) -> &'static str {
        match self {
            Perturbation::Fog => "fog",
            Perturbation::Frost => "frost",
            Perturbation::ColourJitter => "colour-jitter",
            Perturbation::VerticalFlip => "vertical-flip",
            Perturbation::GaussianNoise => "gaussian-noise",
            Perturbation::MotionBlur => "motion-blur",
            Perturbation::Brightness => "brightness",
            Perturbation::Contrast => "contrast",
            Perturbation::Jpeg => "jpeg",
        }
    }

    /// Whether the output depends on the seed. The other perturbations ignore it.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Perturbation::Fog
                | Perturbation::Frost
                | Perturbation::ColourJitter
                | Perturbation::GaussianNoise
                | Perturbation::MotionBlur
        )
    }

    /// Applies the perturbation at `severity` (1..=5) and returns the new frame, which keeps
    /// the size, index and timestamp of `frame`. Frost uses the textures shipped in
    /// `data/frost/` (see [`FrostTextures::shipped`]).
    ///
    /// Fails on a severity outside 1..=5, an empty frame, a pixel buffer whose length is
    /// not `width * height * 3`, and, for frost, textures that cannot be read.
    pub fn apply(self, frame: &Frame, severity: u8, seed: u64) -> Result<Frame> {
        let textures = match self {
            Perturbation::Frost => Some(FrostTextures::shipped()?),
            _ => None,
        };
        self.apply_inner(frame, severity, seed, textures)
    }

    /// Applies the perturbation as [`Perturbation::apply`] does, but frost draws from
    /// `textures` in place of the shipped ones.
    pub fn apply_with_textures(
        self,
        frame: &Frame,
        severity: u8,
        seed: u64,
        textures: &FrostTextures,
    ) -> Result<Frame> {
        self.apply_inner(frame, severity, seed, Some(textures))
    }

    fn apply_inner(
        self,
        frame: &Frame,
        severity: u8,
        seed: u64,
        textures: Option<&FrostTextures>,
    ) -> Result<Frame> {
        check_severity(severity)?;
        check_frame(frame)?;
        let level = usize::from(severity - 1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let data = match self {
            Perturbation::Fog => fog(frame, level, &mut rng),
            Perturbation::Frost => {
                let textures = textures.ok_or_else(|| anyhow!("frost needs textures"))?;
                frost(frame, level, &mut rng, textures)?
            }
            Perturbation::ColourJitter => colour_jitter(frame, level, &mut rng),
            Perturbation::VerticalFlip => vertical_flip(frame),
            Perturbation::GaussianNoise => gaussian_noise(frame, level, &mut rng),
            Perturbation::MotionBlur => motion_blur(frame, level, &mut rng),
            Perturbation::Brightness => brightness(frame, level),
            Perturbation::Contrast => contrast(frame, level),
            Perturbation::Jpeg => jpeg(frame, level)?,
        };
        Ok(Frame {
            index: frame.index,
            timestamp: frame.timestamp,
            width: frame.width,
            height: frame.height,
            data,
        })
    }
}

impl fmt::Display for Perturbation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Perturbation {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        Perturbation::ALL
            .into_iter()
            .find(|perturbation| perturbation.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Perturbation::ALL.iter().map(|p| p.name()).collect();
                anyhow!(
                    "unknown perturbation {name:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

fn check_severity(severity: u8) -> Result<()> {
    if !(MIN_SEVERITY..=MAX_SEVERITY).contains(&severity) {
        bail!("invalid severity {severity}: expected {MIN_SEVERITY} to {MAX_SEVERITY}");
    }
    Ok(())
}

fn check_frame(frame: &Frame) -> Result<()> {
    let (width, height) = (frame.width, frame.height);
    if width == 0 || height == 0 {
        bail!("invalid frame size {width}x{height}: width and height must be positive");
    }
    let expected = width
        .checked_mul(height)
        .and_then(|pixels| pixels.checked_mul(3))
        .ok_or_else(|| anyhow!("invalid frame size {width}x{height}: too large"))?;
    if frame.data.len() != expected {
        bail!(
            "invalid frame buffer: {} bytes, but a {width}x{height} RGB24 frame has {expected}",
            frame.data.len()
        );
    }
    Ok(())
}

/// Frost textures, decoded to RGB and kept in file-name order so that a seed picks the same
/// texture on every run.
pub struct FrostTextures {
    textures: Vec<(PathBuf, RgbImage)>,
}

impl FrostTextures {
    /// Loads every `.png`, `.jpg` and `.jpeg` file in `dir`, dropping any alpha channel.
    /// Fails when the directory cannot be read, holds no such file, or a file cannot be
    /// decoded.
    pub fn load(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("failed to read frost texture directory {}", dir.display()))?;
        let mut paths = Vec::new();
        for entry in entries {
            let path = entry
                .with_context(|| {
                    format!("failed to read frost texture directory {}", dir.display())
                })?
                .path();
            let extension = path
                .extension()
                .and_then(|extension| extension.to_str())
                .map(str::to_ascii_lowercase);
            if matches!(extension.as_deref(), Some("png" | "jpg" | "jpeg")) {
                paths.push(path);
            }
        }
        paths.sort();
        if paths.is_empty() {
            bail!("no frost textures (.png, .jpg, .jpeg) in {}", dir.display());
        }
        let mut textures = Vec::with_capacity(paths.len());
        for path in paths {
            let texture = image::open(&path)
                .with_context(|| format!("failed to decode frost texture {}", path.display()))?
                .to_rgb8();
            textures.push((path, texture));
        }
        Ok(Self { textures })
    }

    /// Returns the textures of the repository's `data/frost/`, loaded once per process. The
    /// directory is located from this crate's path at build time.
    pub fn shipped() -> Result<&'static FrostTextures> {
        static SHIPPED: OnceLock<std::result::Result<FrostTextures, String>> = OnceLock::new();
        let loaded = SHIPPED.get_or_init(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/frost");
            FrostTextures::load(&dir).map_err(|error| format!("{error:#}"))
        });
        loaded.as_ref().map_err(|message| anyhow!("{message}"))
    }

    /// Number of textures.
    pub fn len(&self) -> usize {
        self.textures.len()
    }

    /// Whether no texture is loaded. [`FrostTextures::load`] never returns an empty set.
    pub fn is_empty(&self) -> bool {
        self.textures.is_empty()
    }

    /// Paths of the textures, in the order a seed indexes them.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.textures.iter().map(|(path, _)| path.as_path())
    }
}

/// Converts 0..1 values to bytes, clipping and rounding.
fn unit_to_byte(value: f32) -> u8 {
    (value.clamp(0.0, 1.0) * 255.0).round() as u8
}

fn fog(frame: &Frame, level: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let (strength, wibble_decay) = FOG[level];
    let map_size = frame.width.max(frame.height).next_power_of_two();
    let map = plasma_fractal(map_size, wibble_decay, rng);

    let max_value = f32::from(frame.data.iter().copied().max().unwrap_or(0)) / 255.0;
    // Haze is added on top of the image, then everything is scaled back so that the
    // brightest possible value is the brightest value of the original frame.
    let scale = max_value / (max_value + strength);
    let mut out = Vec::with_capacity(frame.data.len());
    for y in 0..frame.height {
        for x in 0..frame.width {
            let haze = strength * map[y * map_size + x] as f32;
            let offset = (y * frame.width + x) * 3;
            for &byte in &frame.data[offset..offset + 3] {
                let value = f32::from(byte) / 255.0;
                out.push(unit_to_byte((value + haze) * scale));
            }
        }
    }
    out
}

/// Generates a `size` x `size` height map (row-major, values 0..1) with the diamond-square
/// algorithm, as ImageNet-C's `plasma_fractal` does: the map wraps around at its edges, and
/// each new point is the mean of its four neighbours plus uniform noise whose amplitude is
/// divided by `wibble_decay` at each finer step. `size` must be a power of two.
fn plasma_fractal(size: usize, wibble_decay: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    debug_assert!(size.is_power_of_two());
    let mut map = vec![0.0f64; size * size];
    let index = |row: usize, column: usize| (row % size) * size + column % size;
    let mut step = size;
    let mut wibble = 100.0f64;
    // ImageNet-C draws the noise as `wibble * uniform(-wibble, wibble)`, so its amplitude
    // is wibble squared. This is kept, because it sets how rough the fog looks.
    let noise = |rng: &mut ChaCha8Rng, wibble: f64| wibble * rng.gen_range(-wibble..wibble);

    while step >= 2 {
        let half = step / 2;
        let cells = size / step;

        // Squares: the centre of each cell from its four corners.
        for i in 0..cells {
            for j in 0..cells {
                let (row, column) = (i * step, j * step);
                let sum = map[index(row, column)]
                    + map[index(row + step, column)]
                    + map[index(row, column + step)]
                    + map[index(row + step, column + step)];
                map[index(row + half, column + half)] = sum / 4.0 + noise(rng, wibble);
            }
        }

        // Diamonds: the midpoints of cell edges from the two corners and the two centres
        // next to them. Both passes read only corners and centres, never each other's output.
        for i in 0..cells {
            for j in 0..cells {
                let (row, column) = (i * step, j * step + half);
                let sum = map[index(row + size - half, column)]
                    + map[index(row + half, column)]
                    + map[index(row, column - half)]
                    + map[index(row, column + half)];
                map[index(row, column)] = sum / 4.0 + noise(rng, wibble);
            }
        }
        for i in 0..cells {
            for j in 0..cells {
                let (row, column) = (i * step + half, j * step);
                let sum = map[index(row, column + size - half)]
                    + map[index(row, column + half)]
                    + map[index(row - half, column)]
                    + map[index(row + half, column)];
                map[index(row, column)] = sum / 4.0 + noise(rng, wibble);
            }
        }

        step = half;
        wibble /= wibble_decay;
    }

    let min = map.iter().copied().fold(f64::INFINITY, f64::min);
    let max = map.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = max - min;
    // A 1x1 map has no noise and stays all zero.
    if range > 0.0 {
        for value in &mut map {
            *value = (*value - min) / range;
        }
    }
    map
}

fn frost(
    frame: &Frame,
    level: usize,
    rng: &mut ChaCha8Rng,
    textures: &FrostTextures,
) -> Result<Vec<u8>> {
    let (image_weight, frost_weight) = FROST[level];
    let (_, texture) = &textures.textures[rng.gen_range(0..textures.len())];
    let texture = cover(texture, frame.width, frame.height)?;
    let max_x = texture.width() as usize - frame.width;
    let max_y = texture.height() as usize - frame.height;
    let start_y = rng.gen_range(0..=max_y);
    let start_x = rng.gen_range(0..=max_x);

    let mut out = Vec::with_capacity(frame.data.len());
    for y in 0..frame.height {
        for x in 0..frame.width {
            let frost = texture.get_pixel((start_x + x) as u32, (start_y + y) as u32);
            let offset = (y * frame.width + x) * 3;
            for channel in 0..3 {
                let value = image_weight * f32::from(frame.data[offset + channel])
                    + frost_weight * f32::from(frost[channel]);
                out.push(value.round().clamp(0.0, 255.0) as u8);
            }
        }
    }
    Ok(out)
}

/// Scales `texture` with bicubic (Catmull-Rom) interpolation so that it covers a
/// `width` x `height` frame with 10% to spare, leaving room for a random crop. A texture
/// already larger than the frame is still scaled by 1.1, as `imagecorruptions` does.
fn cover(texture: &RgbImage, width: usize, height: usize) -> Result<RgbImage> {
    let scale_x = width as f64 / f64::from(texture.width());
    let scale_y = height as f64 / f64::from(texture.height());
    let scale = scale_x.max(scale_y).max(1.0) * 1.1;
    let new_width = (f64::from(texture.width()) * scale).ceil();
    let new_height = (f64::from(texture.height()) * scale).ceil();
    if new_width > f64::from(u32::MAX) || new_height > f64::from(u32::MAX) {
        bail!("frame {width}x{height} is too large for the frost texture to cover");
    }
    let (new_width, new_height) = (new_width as u32, new_height as u32);
    Ok(imageops::resize(
        texture,
        new_width,
        new_height,
        FilterType::CatmullRom,
    ))
}

fn colour_jitter(frame: &Frame, level: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let hue_direction = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
    let hue_fraction: f32 = rng.gen_range(0.75..=1.0);
    let saturate = rng.gen_bool(0.5);
    let saturation_fraction: f32 = rng.gen_range(0.75..=1.0);

    let hue_shift = hue_direction * hue_fraction * HUE_SHIFT[level];
    let change = saturation_fraction * SATURATION_CHANGE[level];
    let saturation_factor = if saturate {
        1.0 + change
    } else {
        1.0 - change / 2.0
    };

    map_hsv(frame, |hue, saturation, value| {
        let hue = (hue + hue_shift).rem_euclid(1.0);
        let saturation = (saturation * saturation_factor).clamp(0.0, 1.0);
        (hue, saturation, value)
    })
}

fn vertical_flip(frame: &Frame) -> Vec<u8> {
    let stride = frame.width * 3;
    let mut out = Vec::with_capacity(frame.data.len());
    for row in frame.data.chunks_exact(stride).rev() {
        out.extend_from_slice(row);
    }
    out
}

fn gaussian_noise(frame: &Frame, level: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let sigma = NOISE_SIGMA[level];
    frame
        .data
        .iter()
        .map(|&byte| unit_to_byte(f32::from(byte) / 255.0 + sigma * standard_normal(rng)))
        .collect()
}

/// Draws one standard normal value with the Box-Muller transform.
fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // 1 - u lies in (0, 1], so the logarithm is finite.
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

fn motion_blur(frame: &Frame, level: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let angle = rng.gen_range(0.0..std::f64::consts::PI);
    let longer_side = frame.width.max(frame.height) as f32;
    let length = ((BLUR_LENGTH[level] * longer_side).round() as usize).max(2);

    // Integer offsets of the kernel's taps, on a line centred on the pixel.
    let (sin, cos) = angle.sin_cos();
    let centre = (length - 1) as f64 / 2.0;
    let offsets: Vec<(isize, isize)> = (0..length)
        .map(|k| {
            let t = k as f64 - centre;
            ((t * cos).round() as isize, (t * sin).round() as isize)
        })
        .collect();

    let (width, height) = (frame.width as isize, frame.height as isize);
    let mut sums = vec![0u32; frame.data.len()];
    for &(dx, dy) in &offsets {
        for y in 0..height {
            // Taps outside the frame repeat the edge pixel.
            let source_y = (y + dy).clamp(0, height - 1);
            for x in 0..width {
                let source_x = (x + dx).clamp(0, width - 1);
                let source = ((source_y * width + source_x) * 3) as usize;
                let target = ((y * width + x) * 3) as usize;
                for channel in 0..3 {
                    sums[target + channel] += u32::from(frame.data[source + channel]);
                }
            }
        }
    }
    let taps = offsets.len() as f32;
    sums.iter()
        .map(|&sum| (sum as f32 / taps).round() as u8)
        .collect()
}

fn brightness(frame: &Frame, level: usize) -> Vec<u8> {
    let amount = BRIGHTNESS[level];
    map_hsv(frame, |hue, saturation, value| {
        (hue, saturation, (value + amount).clamp(0.0, 1.0))
    })
}

fn contrast(frame: &Frame, level: usize) -> Vec<u8> {
    let factor = CONTRAST[level];
    let pixels = (frame.width * frame.height) as f64;
    let mut means = [0.0f32; 3];
    for (channel, mean) in means.iter_mut().enumerate() {
        let sum: f64 = frame.data[channel..]
            .iter()
            .step_by(3)
            .map(|&byte| f64::from(byte))
            .sum();
        *mean = (sum / pixels / 255.0) as f32;
    }
    frame
        .data
        .iter()
        .enumerate()
        .map(|(i, &byte)| {
            let mean = means[i % 3];
            unit_to_byte((f32::from(byte) / 255.0 - mean) * factor + mean)
        })
        .collect()
}

fn jpeg(frame: &Frame, level: usize) -> Result<Vec<u8>> {
    jpeg_round_trip(frame, JPEG_QUALITY[level])
}

/// Encodes the frame as JPEG at `quality` (1..=100) and decodes it again.
pub(crate) fn jpeg_round_trip(frame: &Frame, quality: u8) -> Result<Vec<u8>> {
    let (width, height) = (frame.width, frame.height);
    let too_large = || anyhow!("frame {width}x{height} is too large to encode as JPEG");
    let width_u32 = u32::try_from(width).map_err(|_| too_large())?;
    let height_u32 = u32::try_from(height).map_err(|_| too_large())?;

    let mut encoded = Vec::new();
    JpegEncoder::new_with_quality(&mut encoded, quality)
        .encode(&frame.data, width_u32, height_u32, ExtendedColorType::Rgb8)
        .with_context(|| format!("failed to encode a {width}x{height} frame as JPEG"))?;
    let decoded = image::load(Cursor::new(&encoded), ImageFormat::Jpeg)
        .context("failed to decode the re-encoded JPEG")?
        .to_rgb8();
    if decoded.dimensions() != (width_u32, height_u32) {
        bail!(
            "re-encoded JPEG is {}x{}, expected {width}x{height}",
            decoded.width(),
            decoded.height()
        );
    }
    Ok(decoded.into_raw())
}

/// Applies `change` to every pixel in HSV space, with hue, saturation and value in 0..1.
fn map_hsv(frame: &Frame, change: impl Fn(f32, f32, f32) -> (f32, f32, f32)) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.data.len());
    for pixel in frame.data.chunks_exact(3) {
        let [red, green, blue] = [pixel[0], pixel[1], pixel[2]].map(|v| f32::from(v) / 255.0);
        let (hue, saturation, value) = rgb_to_hsv(red, green, blue);
        let (hue, saturation, value) = change(hue, saturation, value);
        let (red, green, blue) = hsv_to_rgb(hue, saturation, value);
        out.extend([red, green, blue].map(unit_to_byte));
    }
    out
}

/// Converts RGB in 0..1 to HSV in 0..1 (hue as a fraction of the circle).
fn rgb_to_hsv(red: f32, green: f32, blue: f32) -> (f32, f32, f32) {
    let max = red.max(green).max(blue);
    let min = red.min(green).min(blue);
    let delta = max - min;
    let value = max;
    let saturation = if max > 0.0 { delta / max } else { 0.0 };
    let hue = if delta == 0.0 {
        0.0
    } else if max == red {
        ((green - blue) / delta).rem_euclid(6.0) / 6.0
    } else if max == green {
        ((blue - red) / delta + 2.0) / 6.0
    } else {
        ((red - green) / delta + 4.0) / 6.0
    };
    (hue, saturation, value)
}

/// Converts HSV in 0..1 back to RGB in 0..1.
fn hsv_to_rgb(hue: f32, saturation: f32, value: f32) -> (f32, f32, f32) {
    let sector = (hue * 6.0).rem_euclid(6.0);
    let chroma = value * saturation;
    let second = chroma * (1.0 - (sector % 2.0 - 1.0).abs());
    let base = value - chroma;
    let (red, green, blue) = match sector as u32 {
        0 => (chroma, second, 0.0),
        1 => (second, chroma, 0.0),
        2 => (0.0, chroma, second),
        3 => (0.0, second, chroma),
        4 => (second, 0.0, chroma),
        _ => (chroma, 0.0, second),
    };
    (red + base, green + base, blue + base)
}
