//! Still images (JPEG, PNG) replayed as a video at a fixed frame interval.

use std::path::{Path, PathBuf};
use std::time::Duration;

use image::{ColorType, DynamicImage, ImageDecoder, ImageReader};

use super::{Frame, FrameSource, SourceError};

/// File extensions, compared case-insensitively, that name still images.
const STILL_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Returns whether `path` has a still-image extension (`.jpg`, `.jpeg`, `.png`).
pub fn is_still_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            STILL_EXTENSIONS
                .iter()
                .any(|known| extension.eq_ignore_ascii_case(known))
        })
}

/// Still images decoded one per frame, in a fixed order. Frame `i` has the timestamp
/// `i * interval`.
#[derive(Debug, Clone)]
pub struct ImageSequence {
    paths: Vec<PathBuf>,
    interval: Duration,
    next: usize,
    /// Pixel buffer an image is decoded into before it replaces the frame's buffer.
    spare: Vec<u8>,
    /// Directory or first path, for descriptions.
    origin: PathBuf,
}

impl ImageSequence {
    /// Creates a sequence of the given images in the given order. Files are read only when
    /// their frame is requested, so a missing or damaged file is reported at its frame.
    pub fn from_paths(paths: Vec<PathBuf>, interval: Duration) -> Result<Self, SourceError> {
        let origin = paths.first().cloned().ok_or(SourceError::NoPaths)?;
        check_interval(&origin, interval)?;
        for path in &paths {
            if !path.is_file() {
                return Err(SourceError::NotFound { path: path.clone() });
            }
        }
        Ok(Self {
            paths,
            interval,
            next: 0,
            spare: Vec::new(),
            origin,
        })
    }

    /// Creates a sequence of the `.jpg`, `.jpeg` and `.png` files in `directory`, sorted by
    /// file name. Other files and subdirectories are skipped.
    pub fn from_directory(
        directory: impl AsRef<Path>,
        interval: Duration,
    ) -> Result<Self, SourceError> {
        let directory = directory.as_ref();
        check_interval(directory, interval)?;
        let io_error = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound {
                path: directory.to_path_buf(),
            },
            _ => SourceError::Io {
                path: directory.to_path_buf(),
                source,
            },
        };
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(directory).map_err(io_error)? {
            let path = entry.map_err(io_error)?.path();
            if path.is_file() && is_still_image_path(&path) {
                paths.push(path);
            }
        }
        if paths.is_empty() {
            return Err(SourceError::NoImages {
                path: directory.to_path_buf(),
            });
        }
        paths.sort();
        log::info!(
            "opened {} still images in {}, one every {:?}",
            paths.len(),
            directory.display(),
            interval
        );
        Ok(Self {
            paths,
            interval,
            next: 0,
            spare: Vec::new(),
            origin: directory.to_path_buf(),
        })
    }

    /// Returns the image paths in replay order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
}

fn check_interval(path: &Path, interval: Duration) -> Result<(), SourceError> {
    if interval.is_zero() {
        return Err(SourceError::InvalidRequest {
            path: path.to_path_buf(),
            reason: "the interval between still images is zero; give a positive interval"
                .to_string(),
        });
    }
    Ok(())
}

/// Decodes the image at `path` into `frame`, using `spare` as the decoding buffer so that
/// `frame` changes only when the whole image decoded.
fn decode_into(path: &Path, spare: &mut Vec<u8>, frame: &mut Frame) -> Result<(), SourceError> {
    let image_error = |source: image::ImageError| SourceError::Image {
        path: path.to_path_buf(),
        source,
    };
    let io_error = |source: std::io::Error| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let reader = ImageReader::open(path)
        .map_err(io_error)?
        .with_guessed_format()
        .map_err(io_error)?;
    let decoder = reader.into_decoder().map_err(image_error)?;
    let (width, height) = decoder.dimensions();
    let (width, height) = (width as usize, height as usize);

    if decoder.color_type() == ColorType::Rgb8 {
        spare.resize(width * height * 3, 0);
        decoder.read_image(spare).map_err(image_error)?;
        std::mem::swap(&mut frame.data, spare);
        frame.width = width;
        frame.height = height;
    } else {
        // Grayscale, 16-bit and alpha images: decode in their own layout, then convert.
        let rgb = DynamicImage::from_decoder(decoder)
            .map_err(image_error)?
            .to_rgb8();
        frame.resize(width, height);
        frame.data.copy_from_slice(rgb.as_raw());
    }
    Ok(())
}

impl FrameSource for ImageSequence {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        let Some(path) = self.paths.get(self.next) else {
            return Ok(false);
        };
        let index = self.next as u64;
        // A damaged image is skipped after its error is reported.
        self.next += 1;
        decode_into(path, &mut self.spare, frame)?;
        frame.index = index;
        frame.timestamp = self
            .interval
            .saturating_mul(u32::try_from(index).unwrap_or(u32::MAX));
        Ok(true)
    }

    fn describe(&self) -> String {
        format!(
            "{} still images from {}, one every {:?}",
            self.paths.len(),
            self.origin.display(),
            self.interval
        )
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        Some(1.0 / self.interval.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn still_extensions() {
        assert!(is_still_image_path(Path::new("a/b.JPG")));
        assert!(is_still_image_path(Path::new("b.jpeg")));
        assert!(is_still_image_path(Path::new("b.png")));
        assert!(!is_still_image_path(Path::new("b.mp4")));
        assert!(!is_still_image_path(Path::new("jpg")));
    }

    #[test]
    fn zero_interval_rejected() {
        let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/footage");
        let error = ImageSequence::from_directory(&directory, Duration::ZERO).unwrap_err();
        assert!(
            matches!(error, SourceError::InvalidRequest { .. }),
            "{error}"
        );
    }

    #[test]
    fn damaged_image_is_skipped() {
        let directory = tempfile::tempdir().unwrap();
        let footage = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/footage");
        let good = directory.path().join("a.jpg");
        let bad = directory.path().join("b.jpg");
        let last = directory.path().join("c.jpg");
        std::fs::copy(footage.join("test1.jpg"), &good).unwrap();
        std::fs::write(&bad, b"not a jpeg").unwrap();
        std::fs::copy(footage.join("solidWhiteCurve.jpg"), &last).unwrap();

        let mut sequence =
            ImageSequence::from_directory(directory.path(), Duration::from_millis(50)).unwrap();
        let mut frame = Frame::new();
        assert!(sequence.next_frame(&mut frame).unwrap());
        assert_eq!((frame.width, frame.height), (1280, 720));

        let error = sequence.next_frame(&mut frame).unwrap_err();
        assert!(matches!(error, SourceError::Image { .. }), "{error}");
        assert!(error.to_string().contains("b.jpg"), "{error}");
        assert_eq!((frame.index, frame.width, frame.height), (0, 1280, 720));
        assert_eq!(frame.data.len(), 1280 * 720 * 3);

        assert!(sequence.next_frame(&mut frame).unwrap());
        assert_eq!((frame.index, frame.width, frame.height), (2, 960, 540));
        assert_eq!(frame.timestamp, Duration::from_millis(100));
        assert!(!sequence.next_frame(&mut frame).unwrap());
    }
}
